"""The frozen text encoder of a text-conditioned run, below the methods: the contrastive text-image pair the
'text_encoder' stage trains (`distill/methods/text_encoder.py`), and `load_text_encoder`, which reads a finished
stage back (docs/text_task.md).

The pair (CLIP, Radford et al. 2021, §2.3, at toy size):
  text:  `distill.models.clip_text.CLIPTextModel` over `distill.text.WordTokenizer` ids → last hidden state
         [B, L, D] (after final_layer_norm: what a U-Net cross-attends to) and the pooled state at EOS [B, D],
         then text_projection (no bias) → [B, E];
  image: `ImageTower`, 3×3 convolutions (GroupNorm, GELU, 2×2 average pooling down to 4×4), a global mean and a
         projection → [B, E];
  logit_scale: log of the softmax's inverse temperature, CLIP's learnable scalar (initialised to log(1 / 0.07)).
Parameters: {'text_model': {'text_model': …} (the CLIPTextModel's own tree), 'text_projection', 'image',
'logit_scale'}.

A finished stage directory (WORKDIR/text_encoder/, or config.text.encoder_dir):
  final/                     the trainer's: the parameters above and meta.json (extra.architecture rebuilds the pair)
  tokenizer.json             `WordTokenizer.to_dict()`
  captions_{train,test}.npz  tokens int32 [N, L] and captions str [N] of the split's rows in the data set's order,
                             labels int32 [N], attributes float64 [N, 3] (`text.image_attributes`, in
                             `text.ATTRIBUTES` order), thresholds (a JSON string: `text.caption_thresholds` of
                             the training split)
  text_encoder.json          the held-out numbers; written last
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from distill import batching, text, train, writers
from distill.models import clip_text

STAGE = "text_encoder"
TOKENIZER = "tokenizer.json"
RESULTS = "text_encoder.json"
SPLITS = ("train", "test")
INIT_LOGIT_SCALE = math.log(1.0 / 0.07)  # CLIP's initial temperature 0.07
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the scale at 100


def captions_path(stage_dir: str, split: str) -> str:
  return os.path.join(stage_dir, f"captions_{split}.npz")


def encoder_dir(config, workdir: str) -> str:
  """The text encoder stage a run reads: config.text.encoder_dir, '' = WORKDIR/text_encoder."""
  return config.text.encoder_dir or os.path.join(workdir, STAGE)


class ImageTower(nn.Module):
  """images [B, H, W, C] in [−1, 1] → embeddings [B, embed_dim] (not normalised).

  Each of `widths`: a 3×3 convolution, GroupNorm (min(8, width) groups), GELU, then 2×2 average pooling while the
  side exceeds 4; a global mean over space and a dense projection."""
  widths: tuple[int, ...]
  embed_dim: int

  @nn.compact
  def __call__(self, x):
    h = x
    for i, width in enumerate(self.widths):
      h = nn.Conv(width, (3, 3), padding="SAME", name=f"conv_{i}")(h)
      h = nn.gelu(nn.GroupNorm(num_groups=min(8, width), name=f"norm_{i}")(h))
      if h.shape[1] > 4:
        h = nn.avg_pool(h, (2, 2), strides=(2, 2))
    return nn.Dense(self.embed_dim, name="projection")(jnp.mean(h, axis=(1, 2)))


class ContrastivePair(nn.Module):
  """The text and image towers and CLIP's logit scale (the module docstring).

  __call__(images [B, H, W, C], tokens [B, L] int) → (image embeddings [B, E], text embeddings [B, E], logit_scale
  scalar), embeddings not normalised. encode_text(tokens) → (last hidden state [B, L, D], embeddings [B, E]);
  encode_image(images) → [B, E]."""
  text_model: clip_text.CLIPTextModel
  image_widths: tuple[int, ...]
  embed_dim: int

  def setup(self):
    self.text_projection = nn.Dense(self.embed_dim, use_bias=False)
    self.image = ImageTower(tuple(self.image_widths), self.embed_dim)
    self.logit_scale = self.param("logit_scale", lambda _: jnp.asarray(INIT_LOGIT_SCALE, jnp.float32))

  def encode_text(self, tokens):
    hidden, pooled = self.text_model(tokens)
    return hidden, self.text_projection(pooled)

  def encode_image(self, images):
    return self.image(images)

  def __call__(self, images, tokens):
    return self.encode_image(images), self.encode_text(tokens)[1], self.logit_scale


def text_model_of(arch: dict) -> clip_text.CLIPTextModel:
  """The CLIPTextModel of `architecture['text']` (CLIPTextModel's field names)."""
  return clip_text.CLIPTextModel(**arch["text"])


def pair_of(arch: dict) -> ContrastivePair:
  """The pair an architecture record describes: {'text': CLIPTextModel fields, 'image_widths': [...],
  'embed_dim': E}."""
  return ContrastivePair(text_model_of(arch), tuple(int(w) for w in arch["image_widths"]), int(arch["embed_dim"]))


def init_params(model: ContrastivePair, image_shape: tuple, max_length: int, seed: int):
  """Fresh parameters of `model` for images [H, W, C] and tokens [max_length] (one compiled call, not one per
  operation)."""
  images = jnp.zeros((1, *image_shape), jnp.float32)
  tokens = jnp.zeros((1, max_length), jnp.int32)
  return jax.jit(model.init)(jax.random.PRNGKey(seed), images, tokens)["params"]


def normalize(x, axis: int = -1):
  """x / ‖x‖ along `axis` (a zero row stays zero). jnp in, jnp out."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
  """A finished text encoder stage, read-only (`load_text_encoder`).

  tokenizer: the captions' `text.WordTokenizer` (tokens [N, L = tokenizer.max_length] int32).
  text_model, text_params: the CLIPTextModel and its parameters (text_model.apply({'params': text_params},
    tokens) → (last hidden state [N, L, D], pooled [N, D])), for code that wants the network itself.
  hidden_size: D. embed_dim: E, the shared embedding's width. model, params: the whole pair.
  stage_dir: where it was read from. batch_size: rows per call of the embedding methods.
  """
  tokenizer: text.WordTokenizer
  text_model: clip_text.CLIPTextModel
  text_params: Any
  hidden_size: int
  embed_dim: int
  model: ContrastivePair
  params: Any
  stage_dir: str
  batch_size: int = 500

  @functools.cached_property
  def _hidden_fn(self):
    return jax.jit(lambda p, t: self.text_model.apply({"params": p}, t)[0])

  @functools.cached_property
  def _text_embed_fn(self):
    return jax.jit(lambda p, t: normalize(self.model.apply({"params": p}, t, method=ContrastivePair.encode_text)[1]))

  @functools.cached_property
  def _image_embed_fn(self):
    return jax.jit(lambda p, x: normalize(self.model.apply({"params": p}, x, method=ContrastivePair.encode_image)))

  def encode(self, texts) -> np.ndarray:
    """N texts → tokens int32 [N, L] (`tokenizer.encode`)."""
    return self.tokenizer.encode(texts)

  def hidden_states(self, tokens) -> jax.Array:
    """tokens int [N, L] → float32 [N, L, D]: the final-layer-normed last hidden state (what a U-Net
    cross-attends to). A jax array; a pure jitted function of the tokens, so it may be called inside jit."""
    return self._hidden_fn(self.text_params, jnp.asarray(tokens, jnp.int32))

  def caption_tokens(self, split: str) -> np.ndarray:
    """int32 [N, L]: the tokens of the split's captions in its row order (`load_captions`), the same method as
    `sd_import.SDTextEncoder.caption_tokens`."""
    return np.asarray(load_captions(self.stage_dir, split)["tokens"], np.int32)

  def captions(self, split: str) -> list[str]:
    """The split's caption strings in its row order (`load_captions`)."""
    return list(load_captions(self.stage_dir, split)["captions"])

  def embed_text(self, tokens) -> np.ndarray:
    """tokens int [N, L] → float32 [N, E], L2-normalised."""
    return batching.in_batches(lambda t: self._text_embed_fn(self.params, t), self._tokens(tokens), self.batch_size)

  def embed_images(self, images) -> np.ndarray:
    """images [N, H, W, C] in [−1, 1] → float32 [N, E], L2-normalised."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    return batching.in_batches(lambda x: self._image_embed_fn(self.params, x), images, self.batch_size)

  def score(self, images, tokens) -> np.ndarray:
    """The CLIP score's per-pair term 100 · max(cos, 0), float32 [N], of images [N, H, W, C] in [−1, 1] against
    tokens [N, L] (row i with row i) or [1, L] (one prompt for every image)."""
    from distill.evaluation import clip_score
    return clip_score.per_sample_scores(self.embed_images(images), self.embed_text(tokens)).astype(np.float32)

  def _tokens(self, tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != self.tokenizer.max_length or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"tokens must be integers [N, {self.tokenizer.max_length}], got shape {tokens.shape} "
                       f"({tokens.dtype})")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.tokenizer.vocab_size):
      raise ValueError(f"token ids range [{tokens.min()}, {tokens.max()}]; the vocabulary has "
                       f"{self.tokenizer.vocab_size} ids")
    return tokens.astype(np.int32)


def read_tokenizer(stage_dir: str) -> text.WordTokenizer:
  """The stage's tokenizer.json; TrainingError (one line, naming the file) when absent or unreadable."""
  path = os.path.join(stage_dir, TOKENIZER)
  if not epath.Path(path).exists():
    raise train.TrainingError(f"{path}: missing; the text encoder stage in {stage_dir} has not written its "
                              "tokenizer (run the 'text_encoder' stage)")
  try:
    return text.WordTokenizer.from_json(epath.Path(path).read_text())
  except (OSError, ValueError) as e:
    raise train.TrainingError(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def load_text_encoder(stage_dir: str, batch_size: int = 500) -> TextEncoder:
  """The finished text encoder stage at `stage_dir` (`encoder_dir`). TrainingError (one line, naming the
  directory or file) when it has not finished or its files do not fit together."""
  if not train.has_final(stage_dir):
    raise train.TrainingError(f"{stage_dir}: no finished text encoder (no final/); run the '{STAGE}' stage first")
  tokenizer = read_tokenizer(stage_dir)
  params, meta = train.load_final_params(stage_dir)
  arch = meta.get("architecture")
  if meta.get("kind") != STAGE or not isinstance(arch, dict):
    raise train.TrainingError(f"{os.path.join(stage_dir, 'final', 'meta.json')}: kind {meta.get('kind')!r}, "
                              f"not a text encoder stage ('{STAGE}' with extra.architecture)")
  model = pair_of(arch)
  rows = np.shape(params["text_model"]["text_model"]["embeddings"]["token_embedding"]["embedding"])[0]
  if (rows, model.text_model.eos_token_id, model.text_model.max_position_embeddings) != (
      tokenizer.vocab_size, tokenizer.eos_id, tokenizer.max_length):
    raise train.TrainingError(
        f"{stage_dir}: the parameters' vocabulary ({rows} ids, eos {model.text_model.eos_token_id}, "
        f"{model.text_model.max_position_embeddings} positions) is not {TOKENIZER}'s ({tokenizer.vocab_size} ids, "
        f"eos {tokenizer.eos_id}, max_length {tokenizer.max_length})")
  params = jax.device_put(params)
  return TextEncoder(tokenizer=tokenizer, text_model=model.text_model, text_params=params["text_model"],
                     hidden_size=int(model.text_model.hidden_size), embed_dim=int(model.embed_dim), model=model,
                     params=params, stage_dir=stage_dir, batch_size=batch_size)


def load_captions(stage_dir: str, split: str) -> dict:
  """captions_{split}.npz of a stage: {'tokens' int32 [N, L], 'captions' list[str], 'labels' int32 [N],
  'attributes' float64 [N, 3], 'thresholds' dict}. TrainingError (one line) when absent or unreadable."""
  path = captions_path(stage_dir, split)
  if not epath.Path(path).exists():
    raise train.TrainingError(f"{path}: missing; run the '{STAGE}' stage")
  try:
    with writers.read_npz(path) as d:
      return {"tokens": np.asarray(d["tokens"], np.int32), "captions": [str(s) for s in d["captions"]],
              "labels": np.asarray(d["labels"], np.int32), "attributes": np.asarray(d["attributes"], np.float64),
              "thresholds": json.loads(str(d["thresholds"]))}
  except (OSError, KeyError, ValueError) as e:
    raise train.TrainingError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
