"""configs/imagenet256_ldm.py (App. C.1 of the guided-distillation paper, in a pretrained KL-f8's latent space):
the config loads and validates (but for the data source the data layer lacks), holds C.1's settings, and its
:quick variant is the same path at toy sizes. ImageNet itself is not run here."""
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import imagenet256_ldm
from distill import configuration, optimizers, validation
from distill.methods.autoencoder import architecture
from distill.methods.guided import progressive, stages
from distill.latent import model_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_weights(config, path="/weights/sd-vae"):
  config.autoencoder.weights = path
  return config


def check(config):
  configuration.validate(config)


@pytest.mark.parametrize("arg", [None, "quick"])
def test_config_loads_and_validates(arg):
  config = imagenet256_ldm.get_config(arg)
  check(with_weights(config) if arg is None else config)


def test_the_autoencoder_weights_are_required():
  config = imagenet256_ldm.get_config()
  config.data.name = "imagenet64"
  with pytest.raises(validation.ConfigError) as error:
    configuration.validate(config)
  assert str(error.value).startswith("config.autoencoder.weights=None: must be set")


def test_appendix_c1_settings():
  c = with_weights(imagenet256_ldm.get_config())
  assert c.pipeline[:3] == ("autoencoder", "teacher", "teacher_v") and c.pipeline[-1] == "evaluate"
  assert c.latent.enabled and not c.sample.clip
  # SD's VAE / LDM's kl-f8: 256×256×3 -> 32×32×4, SD's factor.
  assert model_of(architecture(c)).latent_shape((256, 256, 3)) == (32, 32, 4)
  assert c.autoencoder.scale_factor == 0.18215
  # ε teacher fine-tuned to v before distillation.
  assert c.teacher.parameterization == "eps" and c.model.parameterization == "v"
  d = c.distill
  assert (d.w_min, d.w_max, d.batch_size) == (0.0, 14.0, 2048)
  # Stage one: 2,000 updates with constant weighting after 500 warm-up updates.
  assert (d.stage_one_steps - d.stage_one_warmup, d.stage_one_warmup, d.stage_one_weighting) == (2000, 500, "constant")
  # Stage two: from the 512-step DDIM teacher to 1 step; 2,000 updates per round, 20,000 for 4, 2 and 1 steps,
  # each after 500 warm-up updates; truncated SNR.
  plan = progressive.round_plan(d.start_steps, d.end_steps)
  assert plan == [256, 128, 64, 32, 16, 8, 4, 2, 1] and 2 * plan[0] == 512 == c.sample.num_steps
  updates = {n: stages.round_updates(d, n) - d.round_warmup for n in plan}
  assert updates == {**{n: 2000 for n in plan[:6]}, 4: 20_000, 2: 20_000, 1: 20_000}
  assert d.round_warmup == 500 and d.weighting == "truncated_snr"
  assert c.eval.metric == "inception" and c.eval.per_class * c.data.num_classes == 50_000


def test_quick_is_the_same_path_at_toy_sizes():
  full, quick = with_weights(imagenet256_ldm.get_config()), imagenet256_ldm.get_config("quick")
  assert quick.pipeline == full.pipeline and quick.data.name == full.data.name
  assert quick.autoencoder.weights == ""  # a tiny autoencoder trained here: no weight file needed
  assert model_of(architecture(quick)).latent_shape((256, 256, 3))[:2] == (32, 32)
  for section, field in [("teacher", "num_steps"), ("teacher", "batch_size"), ("teacher", "v_steps"),
                         ("distill", "stage_one_steps"), ("distill", "round_steps"), ("distill", "final_round_steps"),
                         ("distill", "batch_size"), ("distill", "start_steps"), ("sample", "num_steps"),
                         ("model", "ch"), ("eval", "per_class")]:
    assert quick[section][field] < full[section][field], (section, field)
  d = quick.distill
  assert d.start_steps > d.end_steps and d.round_steps > d.round_warmup and d.stage_one_steps > d.stage_one_warmup
  assert {n: stages.round_updates(d, n) for n in progressive.round_plan(d.start_steps, d.end_steps)} == {
      8: d.round_steps, 4: d.final_round_steps, 2: d.final_round_steps, 1: d.final_round_steps}
  with pytest.raises(ValueError, match="unknown variant 'sfd'"):
    imagenet256_ldm.get_config("sfd")


def test_round_warm_up_then_linear_annealing():
  _, schedule = optimizers.annealed_adam(1e-4, 2500, 1.0, 500)
  values = np.array([float(schedule(s)) for s in (0, 250, 500, 1500, 2500)])
  np.testing.assert_allclose(values, [0.0, 5e-5, 1e-4, 5e-5, 0.0], atol=1e-12)
  _, plain = optimizers.annealed_adam(1e-4, 2500, 1.0)
  assert float(plain(0)) == pytest.approx(1e-4) and float(plain(1250)) == pytest.approx(5e-5)


@pytest.mark.parametrize("bad, needle", [
    ({"distill.final_rounds": (3,)}, "config.distill.final_rounds=(3,)"),
    ({"distill.round_warmup": 2500}, "must exceed distill.round_warmup=2500"),
    ({"distill.round_warmup": -1}, "config.distill.round_warmup=-1"),
])
def test_bad_round_fields_are_one_line(bad, needle):
  config = with_weights(imagenet256_ldm.get_config())
  config.data.name = "imagenet64"
  for field, value in bad.items():
    section, name = field.split(".")
    config[section][name] = value
  with pytest.raises(validation.ConfigError) as error:
    configuration.validate(config)
  assert "\n" not in str(error.value) and needle in str(error.value), str(error.value)


@pytest.mark.parametrize("kind", ["ckpt_file", "safetensors_missing", "diffusers_unet_folder"])
def test_a_teacher_dir_of_u_net_weights_is_refused_in_one_line(tmp_path, kind):
  if kind == "ckpt_file":
    target = tmp_path / "cin256-v2" / "model.ckpt"
    target.parent.mkdir()
    target.write_bytes(b"PK\x03\x04")
  elif kind == "safetensors_missing":
    target = tmp_path / "unet.safetensors"
  else:
    target = tmp_path / "sd"
    (target / "unet").mkdir(parents=True)
    (target / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
  workdir = tmp_path / "wd"
  proc = subprocess.run([sys.executable, "-m", "distill.main", "--config=configs/digits.py",
                         f"--config.distill.teacher_dir={target}", f"--workdir={workdir}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  assert f"config.distill.teacher_dir='{target}': a weight file, not a finished stage" in lines[0], lines[0]
  assert "cannot load LDM's or Stable Diffusion's U-Net weights" in lines[0] and not workdir.exists()
