"""The 'autoencoder' pipeline stage (distill/methods/autoencoder.py) on a tiny config over digits: training through
the trainer, the latent cache, the scale factor, the metrics file and what the latent stages read."""
import json
import os

import jax
import numpy as np
import pytest

from distill import configuration, contract, registry, train, validation
from distill.context import Context
from distill.methods import autoencoder as stage_lib


def tiny_config(**autoencoder):
  c = configuration.base_config()
  c.data.name, c.data.image_size, c.data.channels, c.data.num_classes = "digits", 8, 1, 10
  c.model.attn_resolutions = (4,)
  c.pipeline = ("autoencoder",)
  a = c.autoencoder
  a.block_out_channels, a.layers_per_block, a.latent_channels, a.norm_num_groups = (8, 16), 1, 2, 4
  a.steps, a.batch_size, a.log_every, a.ckpt_every, a.warmup_steps, a.encode_batch_size = 6, 32, 3, 3, 0, 512
  a.update(autoencoder)
  c.eval.classifier_steps, c.eval.classifier_widths, c.eval.classifier_features = 20, (8, 16), 16
  return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ae_run"))
  config = tiny_config()
  configuration.validate(config)
  stage_lib.run_autoencoder(Context(config, workdir))
  return config, workdir


def test_stage_writes_final_meta_caches_and_results(finished):
  config, workdir = finished
  stage_dir = os.path.join(workdir, "autoencoder")
  _, raw = train.load_final_params(stage_dir)
  meta = contract.StageMeta.from_dict(raw)
  assert meta.kind == "autoencoder" and not meta.scored and meta.sampler == "" and raw["num_steps"] == 6
  assert meta.extra["architecture"]["block_out_channels"] == [8, 16]
  results = json.load(open(os.path.join(stage_dir, "autoencoder.json")))
  assert results["latent_shape"] == [4, 4, 2] and results["image_shape"] == [8, 8, 1]
  test = results["test"]
  assert test["num_images"] == 297 and 0 < test["l1"] and 0 < test["l2"] and np.isfinite(test["psnr"])
  assert test["classifier_fid"] >= 0 and 0 <= test["classifier_accuracy_reconstructions"] <= 1
  assert test["classifier_fid_train_vs_test"] >= 0
  assert os.path.exists(os.path.join(stage_dir, "reconstructions.png"))
  assert os.path.exists(os.path.join(workdir, "classifier", "digits.npz"))
  # The cache: posterior mean and logvar of every image in the data set's order, and its factor.
  with np.load(os.path.join(stage_dir, "latents_train.npz")) as d:
    assert d["mean"].shape == d["logvar"].shape == (1500, 4, 4, 2) and d["labels"].shape == (1500,)
    np.testing.assert_allclose(float(d["scale_factor"]), results["scale_factor"], rtol=1e-12)
    expected = 1.0 / np.sqrt(np.var(d["mean"].astype(np.float64)) + np.mean(np.exp(d["logvar"].astype(np.float64))))
    np.testing.assert_allclose(results["scale_factor"], expected, rtol=1e-9)
  assert registry.stage_owner("autoencoder").name == "autoencoder"


def test_load_latents_and_load_autoencoder(finished):
  config, workdir = finished
  latents, labels = stage_lib.load_latents(workdir, "train")
  same, _ = stage_lib.load_latents(os.path.join(workdir, "autoencoder"), "train")
  np.testing.assert_array_equal(latents, same)
  assert latents.shape == (1500, 4, 4, 2) and latents.dtype == np.float32 and labels.dtype == np.int32
  sampled, _ = stage_lib.load_latents(workdir, "train", sample_seed=0)
  # Scaled posterior samples have unit std over the training set (the scale factor's definition), up to the
  # sampling noise of 48,000 draws.
  assert abs(float(np.std(sampled.astype(np.float64))) - 1.0) < 0.02
  test_latents, test_labels = stage_lib.load_latents(workdir, "test")
  assert test_latents.shape == (297, 4, 4, 2)

  from distill import data
  test = data.make_source(config.data, "test")
  np.testing.assert_array_equal(test_labels, test.get_batch(np.arange(len(test)))["label"])
  encode_fn, decode_fn, scale, latent_shape = stage_lib.load_autoencoder(os.path.join(workdir, "autoencoder"))
  assert latent_shape == (4, 4, 2)
  x = test.get_batch(np.arange(16))["image"]
  z = encode_fn(x)
  np.testing.assert_allclose(z, test_latents[:16], rtol=1e-4, atol=1e-5)
  x_hat = np.asarray(decode_fn(z))
  assert x_hat.shape == x.shape and x_hat.min() >= -1 and x_hat.max() <= 1
  noisy = encode_fn(x, jax.random.PRNGKey(0))
  assert noisy.shape == z.shape and not np.allclose(noisy, z)


def test_rerun_skips_and_a_foreign_cache_is_refused(finished, tmp_path):
  config, workdir = finished
  results = stage_lib.run_autoencoder(Context(config, workdir))  # final/ and autoencoder.json exist: no work
  assert results == json.load(open(os.path.join(workdir, "autoencoder", "autoencoder.json")))
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  path = copy / "autoencoder" / "latents_test.npz"
  with np.load(path) as d:
    arrays = dict(d)
  arrays["fingerprint"] = np.array("0" * 16)
  np.savez(path, **arrays)
  with pytest.raises(stage_lib.AutoencoderError, match="encoded by other parameters"):
    stage_lib.load_latents(str(copy), "test")
  os.remove(copy / "autoencoder" / "autoencoder.json")
  with pytest.raises(stage_lib.AutoencoderError, match="finished training but not its encoding"):
    stage_lib.load_autoencoder(str(copy))
  with pytest.raises(stage_lib.AutoencoderError, match="has not finished training"):
    stage_lib.load_latents(str(tmp_path / "nowhere"), "train")


@pytest.mark.parametrize("field, value, needle", [
    ("block_out_channels", (8, 10), "multiples of autoencoder.norm_num_groups=4"),
    ("block_out_channels", (8, 8, 8, 8, 8), "data.image_size=8 must divide by 16"),
    ("loss", "huber", "'l1', 'l2'"),
    ("kl_weight", -1.0, "must lie in"),
    ("perceptual_weight", 1.0, "autoencoder.lpips.trunk"),
])
def test_bad_config_is_one_line(field, value, needle):
  config = tiny_config(**{field: value})
  with pytest.raises(validation.ConfigError) as error:
    configuration.validate(config)
  message = str(error.value)
  assert "\n" not in message and f"config.autoencoder." in message and needle in message, message


def test_perceptual_term_through_lpips_files(tmp_path):
  from distill.evaluation import lpips
  from distill.models import autoencoder as ae
  rng = np.random.default_rng(0)
  trunk_shapes, lin_shapes = lpips.expected_shapes("alex")
  np.savez(tmp_path / "trunk.npz", **{k: (0.05 * rng.standard_normal(s)).astype(np.float32)
                                      for k, s in trunk_shapes.items()})
  np.savez(tmp_path / "lin.npz", **{k: rng.uniform(0, 1, s).astype(np.float32) for k, s in lin_shapes.items()})
  config = tiny_config(perceptual_weight=0.5)
  config.autoencoder.lpips.update(trunk=str(tmp_path / "trunk.npz"), lin=str(tmp_path / "lin.npz"), resize=32)
  configuration.validate(config)
  stage_lib.preflight(config)
  frozen, distance = stage_lib._perceptual(config)
  model = stage_lib.model_of(stage_lib.architecture(config))
  params = ae.init_params(model, (8, 8, 1), 0)
  x = jax.numpy.asarray(rng.uniform(-1, 1, (4, 8, 8, 1)), jax.numpy.float32)
  with_p = ae.reconstruction_loss_fn(model, kl_weight=1e-6, perceptual_weight=0.5, perceptual_fn=distance)
  without = ae.reconstruction_loss_fn(model, kl_weight=1e-6)
  key = jax.random.PRNGKey(0)
  (loss_p, metrics), (loss, _) = with_p(params, frozen, {"image": x}, key), without(params, None, {"image": x}, key)
  assert metrics["perceptual"] > 0
  np.testing.assert_allclose(loss_p, loss + 0.5 * 64 * metrics["perceptual"], rtol=1e-5)
  config.autoencoder.lpips.lin = str(tmp_path / "absent.npz")
  with pytest.raises(validation.ConfigError) as error:
    stage_lib.preflight(config)
  assert "\n" not in str(error.value) and "config.autoencoder.lpips" in str(error.value)


# --- pretrained weights (autoencoder.weights) ---------------------------------------------------------------


def _pretrained_params(config, seed=0):
  """Parameters of the config's architecture unlike any training's: a fresh init, moved by noise."""
  from distill.models import autoencoder as ae
  fresh = ae.init_params(stage_lib.model_of(stage_lib.architecture(config)), (8, 8, 1), 0)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: np.asarray(p) + 0.05 * rng.standard_normal(np.shape(p)).astype(np.float32), fresh)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  from distill import weights
  from distill.models import sd_keys
  tmp = tmp_path_factory.mktemp("pretrained")
  params = _pretrained_params(tiny_config())
  path = tmp / "sd.safetensors"  # SD's single-file layout, a U-Net tensor beside it that is not read
  weights.write_safetensors(path, {**sd_keys.state_dict_of(params, "ldm", "first_stage_model."),
                                   "model.diffusion_model.out.2.weight": np.zeros((2, 8, 3, 3), np.float32)})
  config = tiny_config(weights=str(path))
  configuration.validate(config)
  stage_lib.preflight(config)
  workdir = str(tmp / "run")
  results = stage_lib.run_autoencoder(Context(config, workdir))
  return config, workdir, params, results, path


def test_pretrained_weights_are_loaded_instead_of_trained(pretrained):
  config, workdir, params, results, path = pretrained
  stage_dir = os.path.join(workdir, "autoencoder")
  final, raw = train.load_final_params(stage_dir)
  _assert_trees_equal(final, params)
  checkpoints = os.path.join(stage_dir, "checkpoints")
  assert raw["num_steps"] == 0 and not (os.path.exists(checkpoints) and os.listdir(checkpoints))  # no step taken
  record = {"path": str(path), "file": str(path), "layout": "ldm", "prefix": "first_stage_model.", "ignored_keys": 0}
  assert contract.StageMeta.from_dict(raw).extra["weights"] == record and results["weights"] == record
  assert results == json.load(open(os.path.join(stage_dir, "autoencoder.json")))
  # SD's factor by default; the measured one beside it.
  assert results["scale_factor"] == 0.18215 and results["scale_factor_source"] == "config.autoencoder.scale_factor"
  with np.load(os.path.join(stage_dir, "latents_train.npz")) as d:
    measured = stage_lib.scale_factor(d["mean"], d["logvar"])
  assert results["scale_factor_measured"] == measured != 0.18215
  # The cache is the file's autoencoder's encoding, scaled by 0.18215.
  from distill import data
  from distill.models import autoencoder as ae
  test = data.make_source(config.data, "test")
  x = test.get_batch(np.arange(16))["image"]
  mean, _ = ae.encode(stage_lib.model_of(stage_lib.architecture(config)), params, x)
  latents, _ = stage_lib.load_latents(workdir, "test")
  np.testing.assert_allclose(latents[:16], 0.18215 * np.asarray(mean), rtol=1e-5, atol=1e-6)


def test_a_finished_pretrained_stage_does_not_read_the_file_again(pretrained, tmp_path):
  import shutil
  config, workdir, _, results, path = pretrained
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  os.remove(copy / "autoencoder" / "autoencoder.json")  # the stage redoes its encoding from final/
  moved = config.copy_and_resolve_references()
  moved.autoencoder.weights = str(tmp_path / "gone.safetensors")
  # Metrics on the first 40 test images, without the classifier (as a data set scored with Inception has them).
  moved.autoencoder.metric_images, moved.eval.metric = 40, "inception"
  again = stage_lib.run_autoencoder(Context(moved, str(copy)))
  assert again["weights"] == results["weights"] and again["scale_factor"] == results["scale_factor"]
  assert again["test"]["num_images"] == 40 and "classifier_fid" not in again["test"]


def test_encode_split_reads_in_chunks_and_pads_the_last():
  from distill import data
  from distill.models import autoencoder as ae
  config = tiny_config()
  model = stage_lib.model_of(stage_lib.architecture(config))
  params = ae.init_params(model, (8, 8, 1), 0)
  images, labels = data.load_digits("test", 8)
  source = data.ArraySource(images[:37], labels[:37], 10, 8)
  mean, logvar, got_labels = stage_lib.encode_split(model, params, source, 16)
  want_mean, want_logvar = ae.encode(model, params, images[:37])
  assert mean.shape == (37, 4, 4, 2) and mean.dtype == np.float32
  np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logvar, want_logvar, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got_labels, labels[:37])


def test_a_diffusers_folder_and_its_config_json(tmp_path):
  from distill import weights
  from distill.models import sd_keys
  config = tiny_config()
  params = _pretrained_params(config, seed=1)
  vae = tmp_path / "pipeline" / "vae"
  vae.mkdir(parents=True)
  weights.write_safetensors(vae / "diffusion_pytorch_model.safetensors", sd_keys.state_dict_of(params, "diffusers"))
  (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "norm_num_groups": 4}))
  config = tiny_config(weights=str(tmp_path / "pipeline"))
  loaded, record = stage_lib.load_pretrained(config)
  _assert_trees_equal(loaded, params)
  assert record["layout"] == "diffusers" and record["file"] == str(vae / "diffusion_pytorch_model.safetensors")
  config.autoencoder.norm_num_groups = 8
  with pytest.raises(validation.ConfigError) as error:
    stage_lib.preflight(config)
  assert "\n" not in str(error.value) and "norm_num_groups=4 where the config has autoencoder.norm_num_groups=8" in \
      str(error.value)


def _write_weights(path, block_out_channels):
  from distill import weights
  from distill.models import autoencoder as ae
  from distill.models import sd_keys
  model = ae.AutoencoderKL(in_channels=1, block_out_channels=block_out_channels, layers_per_block=1,
                           latent_channels=2, norm_num_groups=4)
  shapes = sd_keys.param_shapes(model)
  from flax import traverse_util
  params = traverse_util.unflatten_dict({p: np.zeros(s, np.float32) for p, s in shapes.items()})
  weights.write_safetensors(path, sd_keys.state_dict_of(params, "ldm", "first_stage_model."))


@pytest.mark.parametrize("case, needle", [
    ("missing", "FileNotFoundError"),
    ("unreadable", "header length"),
    ("not_a_weight_file", "not a weight file this reads"),
    ("other_architecture", "holds an autoencoder with block_out_channels=(8, 16) but the config has "
                           "config.autoencoder.block_out_channels=(8, 16, 16); set it to the file's"),
])
def test_bad_weights_are_one_line_and_exit_2_from_main(tmp_path, case, needle):
  import subprocess
  import sys
  path = {"missing": tmp_path / "nope.safetensors", "unreadable": tmp_path / "junk.safetensors",
          "not_a_weight_file": tmp_path / "vae.onnx", "other_architecture": tmp_path / "other.safetensors"}[case]
  if case == "unreadable":
    path.write_bytes(b"\xff" * 100)
  elif case == "not_a_weight_file":
    path.write_bytes(b"onnx")
  elif case == "other_architecture":
    _write_weights(path, (8, 16))
  workdir = tmp_path / "wd"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "distill.main", "--config=configs/digits.py", "--config.pipeline=('autoencoder',)",
       "--config.autoencoder.block_out_channels=(8,16,16)", "--config.autoencoder.norm_num_groups=4",
       f"--config.autoencoder.weights={path}", f"--workdir={workdir}"],
      cwd=root, capture_output=True, text=True, timeout=300)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith(f"error: config.autoencoder.weights='{path}': ") and needle in lines[0], lines[0]
  assert not workdir.exists()
