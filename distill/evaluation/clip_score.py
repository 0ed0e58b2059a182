"""CLIP score (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning"; the
text-to-image form of torchmetrics' `CLIPScore` and of the guided-distillation paper's Table 2 / Fig. 10):

  score_i = 100 · max(cos(image_embed_i, text_embed_i), 0),    CLIP score = mean_i score_i,

with image_embed from CLIP's image tower (`models.clip_vision`) and text_embed [N, D] from its text tower, given
here as an array so the metric does not depend on how captions were encoded. Hessel et al. weigh by 2.5 and clip
each sample; torchmetrics weighs by 100 and clips the mean; we weigh by 100 and clip each sample (the two agree
when no cosine is negative, as with any real caption). The paper reports the cosine itself (score / 100).

Weights: a transformers CLIP checkpoint in PyTorch layout, read without torch through
`distill.weights.read_state_dict`: the image tower and `visual_projection` (`vision_model.*`,
`visual_projection.weight`; a CLIPModel's or a CLIPVisionModelWithProjection's folder or file, `load_vision`) and
the text tower and `text_projection` (`text_model.*`, `text_projection.weight`, `load_text`). `Scorer` holds both
towers and the folder's tokenizer: the evaluation's CLIP score of images against caption strings
(eval.clip_path).
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from distill import batching, weights
from distill.evaluation import metrics
from distill.models import clip_keys, clip_text, clip_tokenizer, clip_vision

SCALE = 100.0
RANGE = (0.0, SCALE)
VISION_PREFIXES = ("vision_model.", "visual_projection.")
TEXT_PREFIXES = ("text_model.", "text_projection.")
TEXT_PROJECTION = "text_projection.weight"
# transformers' CLIPTextConfig defaults, for the fields a config.json leaves out (save_pretrained writes them all).
TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "layer_norm_eps": 1e-5, "eos_token_id": 2}
IGNORED = ("vision_model.embeddings.position_ids",)  # a buffer older transformers saved with the weights
# A transformers model folder's weight file, in the order transformers prefers them.
MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def per_sample_scores(image_embeds, text_embeds) -> np.ndarray:
  """100 · max(cos, 0) [N] of image_embeds [N, D] against text_embeds [N, D] (row i with row i) or [1, D] (one
  caption for every image). float64."""
  img = np.asarray(image_embeds, np.float64)
  txt = np.asarray(text_embeds, np.float64)
  if img.ndim != 2 or len(img) == 0:
    raise ValueError(f"image_embeds must be [N >= 1, D], got shape {img.shape}")
  if txt.ndim != 2 or txt.shape[1] != img.shape[1] or len(txt) not in (1, len(img)):
    raise ValueError(f"text_embeds must be [{len(img)} or 1, {img.shape[1]}] to match image_embeds {img.shape}, "
                     f"got shape {txt.shape}")
  norms = np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1)
  if not np.all(np.isfinite(norms)) or np.any(norms == 0):
    raise ValueError("an embedding is zero or not finite: its cosine is undefined")
  cos = np.sum(img * txt, axis=1) / norms
  return SCALE * np.maximum(cos, 0.0)


def clip_score(image_embeds, text_embeds, *, bootstrap: int = 0, seed: int = 0) -> dict:
  """{'clip_score': mean of `per_sample_scores` in [0, 100], 'num_samples': N} and with bootstrap = B > 0
  'clip_score_ci': the 95 % interval estimate ± 1.96 standard deviations of B resamplings of the samples (with
  replacement, a fixed seed; `metrics.normal_interval`), clipped to [0, 100]."""
  s = per_sample_scores(image_embeds, text_embeds)
  out = {"clip_score": float(s.mean()), "num_samples": int(len(s))}
  if bootstrap:
    rng = np.random.default_rng(seed)
    reps = [s[rng.integers(0, len(s), len(s))].mean() for _ in range(bootstrap)]
    lo, hi = metrics.normal_interval(out["clip_score"], reps)
    out["clip_score_ci"] = [lo, hi] if not np.isfinite(lo) else [max(lo, RANGE[0]), min(hi, RANGE[1])]
  return out


def image_embedder(params, model: clip_vision.ClipVision, batch_size: int = 64
                   ) -> Callable[[np.ndarray], np.ndarray]:
  """images [N, H, W, C] in [−1, 1] → image embeddings [N, projection_dim] (numpy): each image first quantised to
  8-bit levels (`protocol.quantize`, as if saved to PNG), then `clip_vision.embed_images` in batches of
  `batch_size` (the last padded: one compilation)."""
  from distill.evaluation import protocol
  params = jax.device_put(params)
  apply = jax.jit(lambda p, x: clip_vision.embed_images(p, model, x))

  def embed(images):
    return batching.in_batches(lambda x: apply(params, x), protocol.quantize(images), batch_size, full=True)

  return embed


def score_images(embed: Callable[[np.ndarray], np.ndarray], images, text_embeds, *, bootstrap: int = 0,
                 seed: int = 0) -> dict:
  """`clip_score` of images [N, H, W, C] in [−1, 1] (through `embed`, e.g. `image_embedder`) against
  text_embeds [N or 1, D]."""
  return clip_score(embed(images), text_embeds, bootstrap=bootstrap, seed=seed)


# --- weights ---------------------------------------------------------------------------------------------------


def torch_key(path: tuple[str, ...]) -> str:
  """Our parameter path ('vision_model', 'encoder', 'layers', '0', 'mlp', 'fc1', 'kernel') → transformers'
  PyTorch name ('vision_model.encoder.layers.0.mlp.fc1.weight')."""
  *modules, leaf = path
  return ".".join([*modules, _LEAF.get(leaf, leaf)])


def _to_flax(value, shape: tuple[int, ...], key: str) -> np.ndarray:
  """A torch tensor → our leaf of `shape`: conv [O, I, kh, kw] → [kh, kw, I, O]; linear [out, in] → [in, out];
  others unchanged. float32."""
  value = np.asarray(value)
  if value.dtype.kind != "f":
    raise ValueError(f"key {key!r} has dtype {value.dtype}, expected floating point")
  if len(shape) == 4:
    want, order = (shape[3], shape[2], shape[0], shape[1]), (2, 3, 1, 0)
  elif len(shape) == 2 and key.endswith(".weight") and "position_embedding" not in key:
    want, order = (shape[1], shape[0]), (1, 0)
  else:
    want, order = shape, None
  if value.shape != want:
    raise ValueError(f"key {key!r} has shape {value.shape}, expected {want}")
  return np.ascontiguousarray(value if order is None else value.transpose(order), np.float32)


def vision_params(state: Mapping[str, np.ndarray], model: clip_vision.ClipVision) -> dict:
  """A transformers CLIP state dict (PyTorch layout) → `model`'s parameter tree (numpy float32), reading only
  `vision_model.*` and `visual_projection.weight`. ValueError, one line naming the key, for a missing key, an
  unknown one under those prefixes, a shape or dtype that does not fit; nothing is returned unless all hold."""
  vision = {k: v for k, v in state.items() if k.startswith(VISION_PREFIXES) and k not in IGNORED}
  if not vision:
    first = next(iter(state), None)
    raise ValueError("holds no CLIP image-tower tensors (vision_model.*, visual_projection.weight)"
                     + (f"; its first key is {first!r}" if first is not None else ""))
  shapes = clip_vision.param_shapes(model)
  expected = {torch_key(p): p for p in shapes}
  for key in vision:
    if key not in expected:
      raise ValueError(f"unknown key {key!r} (not in the image tower of {model.num_layers} layers)")
  flat = {}
  for key, path in expected.items():
    if key not in vision:
      hint = " (a CLIPVisionModel without the projection?)" if key.startswith("visual_projection") else ""
      raise ValueError(f"missing key {key!r}{hint}")
    flat[path] = _to_flax(vision[key], shapes[path], key)
  return traverse_util.unflatten_dict(flat)


def _weight_file(folder: epath.Path) -> epath.Path:
  for name in MODEL_FILES:
    if (folder / name).is_file():
      return folder / name
  raise ValueError(f"{folder}: a folder without a transformers weight file ({' or '.join(MODEL_FILES)})")


def load_vision(path: str, model: clip_vision.ClipVision | None = None
                ) -> tuple[clip_vision.ClipVision, dict]:
  """(model, params) of a transformers CLIP checkpoint: a folder (config.json beside model.safetensors or
  pytorch_model.bin) or one weight file (`.safetensors`, `.bin`, …; config.json beside it). `model`: the
  architecture to load into; None reads it from the config.json. ValueError (one line naming the file and the
  key) for anything that does not fit (`vision_params`)."""
  p = epath.Path(path)
  file = _weight_file(p) if p.is_dir() else p
  if model is None:
    config = file.parent / "config.json"
    if not config.is_file():
      raise ValueError(f"{path}: no config.json beside the weights to read the architecture from; pass the model")
    model = clip_vision.read_config(str(config))
  state = weights.read_state_dict(str(file), select=lambda k: k.startswith(VISION_PREFIXES))
  try:
    return model, vision_params(state, model)
  except ValueError as e:
    raise ValueError(f"{file}: {e}") from None


def _read_json_config(file: epath.Path) -> dict:
  import json
  config = file.parent / "config.json"
  if not config.is_file():
    raise ValueError(f"{file.parent}: no config.json beside the weights to read the architecture from")
  try:
    out = json.loads(config.read_text())
  except ValueError as e:
    raise ValueError(f"{config}: not a JSON config ({str(e).splitlines()[0][:120]})") from None
  if not isinstance(out, dict):
    raise ValueError(f"{config}: the config is a JSON {type(out).__name__}, not an object")
  return out


def text_model_of(config: Mapping) -> tuple[clip_text.CLIPTextModel, int]:
  """(the text tower, projection_dim) of a transformers config: a CLIPModel's (`text_config` and top-level
  `projection_dim`) or a CLIPTextModelWithProjection's (its own fields). Fields left out take TEXT_DEFAULTS."""
  text = config.get("text_config", config)
  if not isinstance(text, Mapping):
    raise ValueError(f"text_config is a {type(text).__name__}, not an object")
  merged = {**TEXT_DEFAULTS, **{k: v for k, v in text.items() if k in TEXT_DEFAULTS and v is not None}}
  projection = config.get("projection_dim", text.get("projection_dim", 512))
  try:
    return clip_text.clip_text_from_config(merged), int(projection)
  except (TypeError, ValueError) as e:
    raise ValueError(f"text_config: {e}") from None


def text_params(state: Mapping[str, np.ndarray], model: clip_text.CLIPTextModel, projection_dim: int) -> dict:
  """A transformers CLIP state dict (PyTorch layout) → {'tower': `model`'s parameters, 'projection': float32
  [hidden_size, projection_dim]}, reading only `text_model.*` and `text_projection.weight` (`clip_keys` checks
  the tower: every key, shape and the architecture). ValueError, one line naming the key, otherwise."""
  tower = {k: v for k, v in state.items() if k.startswith("text_model.")}
  if not tower:
    raise ValueError("holds no CLIP text-tower tensors (text_model.*, text_projection.weight)")
  params, _ = clip_keys.text_encoder_params(tower, model)
  if TEXT_PROJECTION not in state:
    raise ValueError(f"missing key {TEXT_PROJECTION!r} (a CLIPTextModel without the projection?)")
  unknown = [k for k in state if k.startswith("text_projection.") and k != TEXT_PROJECTION]
  if unknown:
    raise ValueError(f"unknown key {unknown[0]!r}")
  projection = _to_flax(state[TEXT_PROJECTION], (model.hidden_size, projection_dim), TEXT_PROJECTION)
  return {"tower": params, "projection": projection}


def load_text(path: str) -> tuple[clip_text.CLIPTextModel, dict]:
  """(model, `text_params`) of a transformers CLIP checkpoint's text tower and text_projection: a folder
  (config.json beside model.safetensors or pytorch_model.bin) or one weight file with config.json beside it.
  ValueError (one line naming the file and the key) for anything that does not fit."""
  p = epath.Path(path)
  file = _weight_file(p) if p.is_dir() else p
  config = _read_json_config(file)
  try:
    model, projection_dim = text_model_of(config)
  except ValueError as e:
    raise ValueError(f"{file.parent / 'config.json'}: {e}") from None
  state = weights.read_state_dict(str(file), select=lambda k: k.startswith(TEXT_PREFIXES))
  try:
    return model, text_params(state, model, projection_dim)
  except ValueError as e:
    raise ValueError(f"{file}: {e}") from None


def embed_text(params, model: clip_text.CLIPTextModel, ids) -> jnp.ndarray:
  """ids int [B, L] → text embeddings [B, projection_dim] (not normalised): the pooled state at the end-of-text
  token through text_projection, as transformers' CLIPModel.get_text_features. Causal attention keeps the
  padding after the end-of-text token out of the pooled state, so no attention mask is needed."""
  _, pooled = model.apply({"params": params["tower"]}, ids)
  return pooled @ params["projection"]


class Scorer:
  """The CLIP score of images against caption strings under a CLIP checkpoint's two towers and its tokenizer
  (eval.clip_path: a transformers CLIPModel folder with config.json, model.safetensors or pytorch_model.bin, and
  tokenizer.json or vocab.json + merges.txt, in it or in its tokenizer/). Each distinct caption is encoded once.
  ValueError (one line naming the file) when the folder does not hold all of it."""

  def __init__(self, path: str, batch_size: int = 64):
    self.path = str(path)
    if not epath.Path(self.path).is_dir():
      raise ValueError(f"{self.path}: not a folder (a CLIP model folder: config.json, its weights and tokenizer)")
    vision_model, vision = load_vision(self.path)
    self.embed_images = image_embedder(vision, vision_model, batch_size)
    self.text_model, params = load_text(self.path)
    self.tokenizer = clip_tokenizer.load_clip_tokenizer(self.path,
                                                        max_length=self.text_model.max_position_embeddings)
    params = jax.device_put(params)
    apply = jax.jit(lambda p, ids: embed_text(p, self.text_model, ids))
    self._embed_ids = lambda ids: np.asarray(apply(params, jnp.asarray(ids)), np.float64)
    self.batch_size, self._texts = batch_size, {}

  def embed_texts(self, captions) -> np.ndarray:
    """N caption strings → text embeddings float64 [N, projection_dim] (not normalised)."""
    captions = list(captions)
    new = sorted({c for c in captions if c not in self._texts})
    if new:  # one compiled shape for any number of captions
      self._texts.update(zip(new, batching.in_batches(self._embed_ids, self.tokenizer(new), self.batch_size,
                                                      full=True)))
    return np.stack([self._texts[c] for c in captions])

  def score(self, images, captions, *, bootstrap: int = 0, seed: int = 0) -> dict:
    """{'clip_score', and with bootstrap > 0 'clip_score_ci'} (`clip_score`) of images [N, H, W, C] in [−1, 1]
    against their captions (N strings, row i with row i)."""
    out = clip_score(self.embed_images(images), self.embed_texts(captions), bootstrap=bootstrap, seed=seed)
    out.pop("num_samples")
    return out
