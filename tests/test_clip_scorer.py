"""The evaluation's CLIP score from a CLIP model folder (distill/evaluation/clip_score.py `Scorer`, eval.clip_path):
a tiny transformers FlaxCLIPModel's weights written in PyTorch layout (model.safetensors) beside its config.json
and a tokenizer give, for images and caption strings, 100·max(cos, 0) of FlaxCLIPModel's own image and text
features of the same ids (the reference; skipped when transformers is absent); and a folder that lacks a piece
is one line naming it."""
import json

import numpy as np
import pytest

from distill.evaluation import clip_score, protocol
from distill.models import clip_vision

from test_clip_tokenizer import TEXTS, write_files
from test_clip_vision import reference_model, to_torch_layout

CAPTIONS = TEXTS[:2] + ["a cat", "photo of cats"]
TEXT_CONFIG = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                   max_position_embeddings=16, hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=2)
VISION_CONFIG = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                     num_attention_heads=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def write_clip_folder(folder, seed: int = 0):
  """A tiny random CLIPModel folder in transformers' layout written from our own modules (no transformers
  needed): config.json, model.safetensors, vocab.json + merges.txt. What eval.clip_path reads."""
  import jax
  from safetensors.numpy import save_file
  from distill.models import clip_keys, clip_text
  folder.mkdir(parents=True, exist_ok=True)
  config = {"text_config": TEXT_CONFIG, "vision_config": VISION_CONFIG, "projection_dim": 24}
  (folder / "config.json").write_text(json.dumps(config))
  vision = clip_vision.from_config(config)
  text = clip_text.clip_text_from_config(config)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  state = to_torch_layout(vision.init(k1, np.zeros((1, 32, 32, 3), np.float32))["params"])
  state.update(clip_keys.text_encoder_state_dict(text.init(k2, np.zeros((1, 16), np.int32))["params"]))
  state["text_projection.weight"] = np.asarray(jax.random.normal(k3, (24, 32)), np.float32)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, str(folder / "model.safetensors"))
  write_files(folder)
  return folder


def write_folder(folder, ref):
  """The transformers CLIPModel folder of `ref`: config.json, model.safetensors, the tokenizer."""
  from safetensors.numpy import save_file
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(ref.config.to_dict()))
  state = to_torch_layout(ref.params)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, str(folder / "model.safetensors"))
  write_files(folder)
  return folder


def reference_cosines(ref, images, ids):
  """cos of FlaxCLIPModel's image features (of CLIP's preprocessing of the 8-bit images) and its text features of
  `ids`, row i with row i."""
  pixels = np.asarray(clip_vision.preprocess(protocol.quantize(images), ref.config.vision_config.image_size))
  img = np.asarray(ref.get_image_features(np.transpose(pixels, (0, 3, 1, 2)), params=ref.params), np.float64)
  txt = np.asarray(ref.get_text_features(ids, params=ref.params), np.float64)
  return np.sum(img * txt, 1) / (np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1))


def test_same_score_as_flax_clip_model(tmp_path):
  _, ref = reference_model("quick_gelu")
  images = np.random.default_rng(0).uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)  # gray, resized to 32
  tokenizer = clip_score.clip_tokenizer.load_clip_tokenizer(write_files(tmp_path / "tok"), max_length=16)
  ids = tokenizer(CAPTIONS)
  cos = reference_cosines(ref, images, ids)
  if cos.mean() < 0:  # a random model: turn its text embeddings around so that the clipping at 0 is not all
    ref.params["text_projection"]["kernel"] = -ref.params["text_projection"]["kernel"]
    cos = -cos
  assert cos.std() > 0.01 and (cos > 0).all()  # the pairs differ by more than the tolerance: a swap would show
  scorer = clip_score.Scorer(str(write_folder(tmp_path / "clip", ref)), batch_size=3)
  np.testing.assert_array_equal(scorer.tokenizer(CAPTIONS), ids)  # the text tower's 16 positions
  ours = scorer.embed_images(images) @ scorer.embed_texts(CAPTIONS).T
  ours = np.diag(ours) / np.linalg.norm(scorer.embed_images(images), axis=1) / np.linalg.norm(
      scorer.embed_texts(CAPTIONS), axis=1)
  np.testing.assert_allclose(ours, cos, atol=1e-4)
  out = scorer.score(images, CAPTIONS, bootstrap=50, seed=0)
  assert out["clip_score"] == pytest.approx(100 * np.maximum(cos, 0).mean(), abs=1e-3)
  assert out["clip_score_ci"][0] <= out["clip_score"] <= out["clip_score_ci"][1]
  # Text embeddings batch and cache: the same vectors in any order and repetition.
  e = scorer.embed_texts(CAPTIONS)
  np.testing.assert_allclose(scorer.embed_texts(CAPTIONS[::-1] + CAPTIONS)[:4], e[::-1], atol=1e-6)
  np.testing.assert_allclose(e, np.asarray(ref.get_text_features(ids, params=ref.params)), atol=1e-4)


@pytest.mark.parametrize("case, needle", [
    ("no_projection", "missing key 'text_projection.weight'"),
    ("no_tokenizer", "no tokenizer.json, nor vocab.json and merges.txt"),
    ("no_config", "no config.json"),
    ("a_file", "not a folder"),
    ("layer_missing", "missing key 'text_model.final_layer_norm.weight'"),
])
def test_a_folder_missing_a_piece_is_one_line(tmp_path, case, needle):
  folder = write_clip_folder(tmp_path / "clip")
  clip_score.Scorer(str(folder))  # whole, it loads
  drop = {"no_projection": "text_projection.weight", "layer_missing": "text_model.final_layer_norm.weight"}
  if case in drop:
    from safetensors.numpy import load_file, save_file
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != drop[case]}, str(folder / "model.safetensors"))
  if case == "no_tokenizer":
    for name in ("vocab.json", "merges.txt"):
      (folder / name).unlink()
  if case == "no_config":
    (folder / "config.json").unlink()
  path = folder / "model.safetensors" if case == "a_file" else folder
  with pytest.raises(ValueError) as error:
    clip_score.Scorer(str(path))
  message = str(error.value)
  assert needle in message and "\n" not in message, message


def test_clip_fields_are_for_text_runs_only():
  from configs import digits
  from distill import configuration
  for field in ("clip_path", "captions"):
    config = digits.get_config()
    config.eval[field] = "/some/path"
    with pytest.raises(configuration.ConfigError) as error:
      configuration.validate(config)
    assert str(error.value).startswith(f"config.eval.{field}=") and "text.enabled=True" in str(error.value)


@pytest.mark.parametrize("content, needle", [(None, "cannot be read"), (b"\n  \n", "holds no caption"),
                                             (b"\xff\xfe\x00bad", "cannot be read as UTF-8")])
def test_a_bad_captions_file_is_one_line(tmp_path, content, needle):
  from distill import evaluate
  path = tmp_path / "captions.txt"
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(evaluate.EvaluationError) as error:
    evaluate.read_captions(str(path))
  assert needle in str(error.value) and "\n" not in str(error.value) and str(path) in str(error.value)


def test_captions_are_read_one_per_line_and_name_the_rows_cache_key(tmp_path):
  from configs import fashion_mnist
  from distill import evaluate
  path = tmp_path / "captions.txt"
  path.write_text("a dark bag\n\n  a bright large shirt  \n")
  assert evaluate.read_captions(str(path)) == ["a dark bag", "a bright large shirt"]
  config = fashion_mnist.get_config("text")
  key = lambda: evaluate.row_key(config, "fp", "ddim", 1.0, 4, "classifier", 100)
  plain = key()
  config.eval.captions = str(path)
  with_file = key()
  path.write_text("a dark bag\n")
  assert len({plain, with_file, key()}) == 3  # another file's captions are other rows
  config.eval.captions = ""
  assert key() == plain  # rows cached before the fields existed keep their keys
