"""CLIP's image tower (distill/models/clip_vision.py) and its weight loader (distill/evaluation/clip_score.py):
against transformers' FlaxCLIPModel on a tiny random config (the same image embeddings from its own parameter tree
and from its weights written in PyTorch layout; skipped when transformers is absent); preprocessing against
CLIPImageProcessor; a hand-written PyTorch-layout round trip; bad files one line naming the key."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from distill import weights
from distill.evaluation import clip_score
from distill.models import clip_vision

MODEL = clip_vision.ClipVision(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
                               intermediate_size=37, projection_dim=24)


def reference_model(act: str):
  """A tiny transformers FlaxCLIPModel with random values in every leaf (a fresh init has zero biases and unit
  LayerNorms, which would hide swaps)."""
  transformers = pytest.importorskip("transformers", reason="transformers (4.57.x, with Flax) is the optional "
                                     "reference; install it to compare against FlaxCLIPModel")
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=16),
      vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, hidden_act=act),
      projection_dim=24)
  ref = transformers.FlaxCLIPModel(config, seed=0)
  rng = np.random.default_rng(1)
  flat = traverse_util.flatten_dict(ref.params)
  ref.params = traverse_util.unflatten_dict({
      p: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for p, v in flat.items()})
  return config, ref


def ours_from_reference(ref) -> dict:
  return {"vision_model": ref.params["vision_model"], "visual_projection": ref.params["visual_projection"]}


def to_torch_layout(flax_params: dict) -> dict:
  """A Flax CLIP parameter tree → transformers' PyTorch state dict, spelled out here independently of the loader:
  names joined by '.', kernel / scale / embedding → weight; Dense kernels [in, out] → [out, in], conv kernels
  [kh, kw, I, O] → [O, I, kh, kw]."""
  out = {}
  for path, v in traverse_util.flatten_dict(flax_params).items():
    v = np.asarray(v)
    *modules, leaf = path
    if leaf == "kernel":
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
    name = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    out[".".join([*modules, name])] = np.ascontiguousarray(v)
  return out


def pixels(n=3, seed=0):
  return np.random.default_rng(seed).standard_normal((n, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_same_image_embeddings_as_flax_clip_model(act):
  config, ref = reference_model(act)
  model = clip_vision.from_config(config.to_dict())
  assert model == MODEL.clone(act=act)
  ours = ours_from_reference(ref)
  assert set(traverse_util.flatten_dict(ours)) == set(clip_vision.param_shapes(model))
  x = pixels()
  want = np.asarray(ref.get_image_features(jnp.transpose(x, (0, 3, 1, 2)), params=ref.params))
  got = np.asarray(model.apply({"params": ours}, x))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_loads_a_transformers_folder_in_pytorch_layout(tmp_path):
  config, ref = reference_model("quick_gelu")
  state = to_torch_layout(ref.params)  # text_model.*, text_projection.weight, logit_scale too: not read
  assert "text_projection.weight" in state and "logit_scale" in state
  state["vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]  # old files' buffer
  weights.write_safetensors(tmp_path / "model.safetensors", state)
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
  model, params = clip_score.load_vision(str(tmp_path))
  assert model == MODEL
  x = pixels()
  want = np.asarray(ref.get_image_features(jnp.transpose(x, (0, 3, 1, 2)), params=ref.params))
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, x)), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 40, 56, 3), (2, 56, 40, 3), (2, 20, 24, 3), (2, 32, 32, 3)])
def test_preprocess_matches_clip_image_processor(shape):
  transformers = pytest.importorskip("transformers", reason="transformers is the optional reference")
  pytest.importorskip("PIL", reason="CLIPImageProcessor resizes through PIL")
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  u8 = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
  want = processor(images=list(u8), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  got = np.asarray(clip_vision.preprocess(u8 / 127.5 - 1.0, 32))
  assert got.shape == want.shape
  # Both round to 8-bit levels after each resize pass; PIL's fixed-point weights can put a value on a rounding
  # boundary one level apart.
  levels = np.abs(got - want) * np.asarray(clip_vision.STD) * 255
  assert levels.max() < 1.01 and levels.mean() < 0.01, (levels.max(), levels.mean())


def test_preprocess_grayscale_is_repeated_and_normalised():
  gray = np.linspace(-1, 1, 2 * 32 * 32).reshape(2, 32, 32, 1).astype(np.float32)
  got = np.asarray(clip_vision.preprocess(gray, 32))
  np.testing.assert_allclose(got, np.asarray(clip_vision.preprocess(np.repeat(gray, 3, -1), 32)))
  levels = np.round((gray + 1) * 127.5) / 255  # no resize at 32: only the 8-bit rounding and the normalisation
  np.testing.assert_allclose(got, (levels - np.asarray(clip_vision.MEAN)) / np.asarray(clip_vision.STD), atol=1e-5)
  with pytest.raises(ValueError, match=r"\[B, H, W, 1 or 3\]"):
    clip_vision.preprocess(np.zeros((1, 8, 8, 2)), 32)


@pytest.fixture(scope="module")
def params():
  return clip_vision.random_params(MODEL)


@pytest.fixture(scope="module")
def state(params):
  return to_torch_layout(params)


def test_pytorch_layout_round_trip_is_exact(params, state):
  assert state["vision_model.embeddings.patch_embedding.weight"].shape == (32, 3, 8, 8)
  assert state["visual_projection.weight"].shape == (24, 32)
  loaded = clip_score.vision_params(state, MODEL)
  flat, want = traverse_util.flatten_dict(loaded), traverse_util.flatten_dict(params)
  assert set(flat) == set(want)
  for p in want:
    np.testing.assert_array_equal(flat[p], want[p])
  assert {clip_score.torch_key(p) for p in want} == set(state)


def _one_line(fn, match):
  with pytest.raises(ValueError, match=match) as e:
    fn()
  assert "\n" not in str(e.value)


def test_bad_keys_are_one_line_naming_the_key(state, tmp_path):
  load = lambda s: lambda: clip_score.vision_params(s, MODEL)  # noqa: E731
  _one_line(load({**state, "vision_model.encoder.layers.2.mlp.fc1.weight": np.zeros((37, 32), np.float32)}),
            r"unknown key 'vision_model\.encoder\.layers\.2\.mlp\.fc1\.weight'")
  missing = {k: v for k, v in state.items() if k != "vision_model.pre_layrnorm.bias"}
  _one_line(load(missing), r"missing key 'vision_model\.pre_layrnorm\.bias'")
  no_projection = {k: v for k, v in state.items() if not k.startswith("visual_projection")}
  _one_line(load(no_projection), r"missing key 'visual_projection\.weight' \(a CLIPVisionModel")
  wrong = {**state, "vision_model.encoder.layers.0.mlp.fc1.weight": np.zeros((32, 37), np.float32)}
  _one_line(load(wrong), r"'vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight' has shape \(32, 37\), "
            r"expected \(37, 32\)")
  ints = {**state, "vision_model.embeddings.class_embedding": np.zeros(32, np.int32)}
  _one_line(load(ints), r"'vision_model\.embeddings\.class_embedding' has dtype int32")
  _one_line(load({"text_model.final_layer_norm.weight": np.ones(32, np.float32)}),
            r"no CLIP image-tower tensors.*'text_model\.final_layer_norm\.weight'")
  # From a file: the file's name first, and nothing returned.
  weights.write_safetensors(tmp_path / "model.safetensors", missing)
  (tmp_path / "config.json").write_text(json.dumps({"vision_config": {
      "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
      "intermediate_size": 37}, "projection_dim": 24}))
  _one_line(lambda: clip_score.load_vision(str(tmp_path)), r"model\.safetensors: missing key 'vision_model\.pre")
  alone = tmp_path / "alone"
  alone.mkdir()
  weights.write_safetensors(alone / "clip.safetensors", state)
  _one_line(lambda: clip_score.load_vision(str(alone / "clip.safetensors")), r"no config\.json")
  assert clip_score.load_vision(str(alone / "clip.safetensors"), MODEL)[0] is MODEL
  empty = tmp_path / "empty"
  empty.mkdir()
  _one_line(lambda: clip_score.load_vision(str(empty)), r"without a transformers weight file")


def test_config_of_a_vision_model_with_projection_and_defaults():
  m = clip_vision.from_config({"hidden_size": 1024, "patch_size": 14, "num_hidden_layers": 24,
                               "num_attention_heads": 16, "intermediate_size": 4096, "projection_dim": 768})
  assert (m.image_size, m.hidden_size, m.projection_dim, m.act, m.eps) == (224, 1024, 768, "quick_gelu", 1e-5)
  _one_line(lambda: clip_vision.from_config({"hidden_act": "relu6"}), r"hidden_act 'relu6'")
  _one_line(lambda: clip_vision.from_config({"hidden_size": 30}), r"not divisible by num_attention_heads")


@pytest.mark.parametrize("vision, projection_dim, params", [
    (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14),
     768, 303_966_208),  # OpenAI's ViT-L/14
    (dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=40, num_attention_heads=16, patch_size=14,
          hidden_act="gelu"), 1024, 1_012_645_632)])  # LAION's ViT-g/14, the paper's evaluation model
def test_full_size_configs_have_flax_clip_models_tree(vision, projection_dim, params):
  transformers = pytest.importorskip("transformers", reason="transformers is the optional reference")
  import jax
  from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule
  config = transformers.CLIPConfig(vision_config=vision, projection_dim=projection_dim)
  ids = jnp.zeros((1, 77), jnp.int32)
  tree = jax.eval_shape(FlaxCLIPModule(config).init, jax.random.PRNGKey(0), ids, jnp.zeros((1, 224, 224, 3)),
                        jnp.ones_like(ids), jnp.arange(77)[None])["params"]
  want = traverse_util.flatten_dict({k: tree[k] for k in ("vision_model", "visual_projection")})
  got = clip_vision.param_shapes(clip_vision.from_config(config.to_dict()))
  assert got == {k: tuple(v.shape) for k, v in want.items()}
  assert sum(int(np.prod(s)) for s in got.values()) == params
