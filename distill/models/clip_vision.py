"""CLIP's image tower (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"):
a ViT whose class token, layer-normed and projected, is the image embedding CLIP compares with a caption's.

Layout (D = hidden_size, P = patch_size, S = image_size, N = (S / P)² patches):

  embeddings:   patch_embedding (P×P conv, stride P, no bias) → [B, N, D]; class_embedding [D] prepended;
                position_embedding [N + 1, D] added
  pre_layrnorm  (LayerNorm)
  encoder:      layers_0 … layers_{L−1}, each x + self_attn(layer_norm1(x)), then x + mlp(layer_norm2(x));
                self_attn: q_proj, k_proj, v_proj, out_proj (num_heads heads, no mask); mlp: fc1 → act → fc2
  post_layernorm on the class token's state → [B, D]
  visual_projection (no bias) → image embedding [B, projection_dim], not normalised

Module and parameter names are those of transformers' FlaxCLIPVisionModel under `vision_model` (layers as
`encoder/layers/{i}`), beside FlaxCLIPModel's `visual_projection`, so a FlaxCLIPModel's `vision_model` and
`visual_projection` subtrees load into `ClipVision` unchanged. Every LayerNorm has ε = layer_norm_eps.
`act`: 'quick_gelu' (x·σ(1.702x), OpenAI's CLIPs) or 'gelu' (exact; LAION's OpenCLIP ViT-H/14, ViT-g/14,
ViT-bigG/14), as the checkpoint's config.json says (`hidden_act`).

Preprocessing (`preprocess`) is CLIPImageProcessor's on 8-bit images: resize the shorter side to S (bicubic,
antialiased when shrinking, rounded to 8-bit levels as PIL does), center crop S×S, scale to [0, 1], normalise
with `MEAN` / `STD`.
"""
from __future__ import annotations

import json
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill.models.clip_encoder import ACTIVATIONS, Encoder, LayerSpec

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's training-set pixel statistics, RGB in [0, 1]
STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' CLIPVisionConfig defaults (ViT-B/32), used for fields a config.json leaves out.
DEFAULTS = {"image_size": 224, "patch_size": 32, "hidden_size": 768, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 3072, "projection_dim": 512, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5}


class Embeddings(nn.Module):
  """pixels [B, S, S, 3] → tokens [B, N + 1, D], the class token first."""
  image_size: int
  patch_size: int
  hidden_size: int

  @nn.compact
  def __call__(self, pixels):
    p, d = self.patch_size, self.hidden_size
    patches = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, name="patch_embedding")(pixels)
    b = patches.shape[0]
    patches = patches.reshape(b, -1, d)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (d,))
    tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(patches.dtype), patches], axis=1)
    positions = (self.image_size // p) ** 2 + 1
    table = nn.Embed(positions, d, name="position_embedding")(jnp.arange(positions))
    return tokens + table[None]


class VisionTransformer(nn.Module):
  """pixels [B, S, S, 3] (normalised) → pooled class-token state [B, D] (after post_layernorm)."""
  image_size: int
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  act: str
  eps: float

  @nn.compact
  def __call__(self, pixels):
    x = Embeddings(self.image_size, self.patch_size, self.hidden_size, name="embeddings")(pixels)
    x = nn.LayerNorm(self.eps, name="pre_layrnorm")(x)  # sic: transformers' name
    spec = LayerSpec(self.num_heads, self.intermediate_size, self.act, self.eps, self.num_layers)
    x = Encoder(spec, name="encoder")(x, 0.0)  # no mask: every token sees every token
    return nn.LayerNorm(self.eps, name="post_layernorm")(x[:, 0])


class ClipVision(nn.Module):
  """CLIP's image tower with its projection: pixels [B, S, S, 3], already `preprocess`ed → image embeddings
  [B, projection_dim] (not normalised). Defaults: ViT-B/32."""
  image_size: int = 224
  patch_size: int = 32
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  projection_dim: int = 512
  act: str = "quick_gelu"
  eps: float = 1e-5

  def __post_init__(self):
    if self.act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.act!r} is not one of {', '.join(ACTIVATIONS)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
    super().__post_init__()

  @nn.compact
  def __call__(self, pixels):
    pooled = VisionTransformer(self.image_size, self.patch_size, self.hidden_size, self.num_layers, self.num_heads,
                               self.intermediate_size, self.act, self.eps, name="vision_model")(pixels)
    return nn.Dense(self.projection_dim, use_bias=False, name="visual_projection")(pooled)


def from_config(config: Mapping) -> ClipVision:
  """A `ClipVision` from a transformers config (the dict of a config.json): a CLIPModel's (its `vision_config`
  and top-level `projection_dim`), or a CLIPVisionConfig's / CLIPVisionModelWithProjection's (its own
  `projection_dim`). Fields it leaves out take transformers' defaults (`DEFAULTS`)."""
  vision = config.get("vision_config", config)
  if not isinstance(vision, Mapping):
    raise ValueError(f"vision_config is a {type(vision).__name__}, not an object")
  merged = {**DEFAULTS, **{k: v for k, v in vision.items() if k in DEFAULTS and v is not None}}
  if "vision_config" in config and config.get("projection_dim") is not None:
    merged["projection_dim"] = config["projection_dim"]
  return ClipVision(image_size=int(merged["image_size"]), patch_size=int(merged["patch_size"]),
                    hidden_size=int(merged["hidden_size"]), num_layers=int(merged["num_hidden_layers"]),
                    num_heads=int(merged["num_attention_heads"]), intermediate_size=int(merged["intermediate_size"]),
                    projection_dim=int(merged["projection_dim"]), act=str(merged["hidden_act"]),
                    eps=float(merged["layer_norm_eps"]))


def read_config(path: str) -> ClipVision:
  """`from_config` of a config.json file; ValueError (one line naming the file) when it is not JSON."""
  from etils import epath
  try:
    config = json.loads(epath.Path(path).read_text())
  except ValueError as e:
    raise ValueError(f"{path}: not a JSON config ({str(e).splitlines()[0][:120]})") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path}: the config is a JSON {type(config).__name__}, not an object")
  try:
    return from_config(config)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from None


def _to_levels(x):
  return jnp.round(jnp.clip(x, 0.0, 255.0))


def preprocess(images, image_size: int) -> jnp.ndarray:
  """CLIP's preprocessing of images [B, H, W, C] in [−1, 1], C = 1 (repeated to RGB) or 3 → [B, S, S, 3] with
  S = image_size: the shorter side resized to S and the longer to int(S · long / short), as CLIPImageProcessor
  (bicubic, a = −0.5, antialiased when shrinking; width then height, each pass clipped and rounded to 8-bit
  levels as PIL's resize of an 8-bit image: within one level of PIL's); a centered S×S crop (offsets
  (H' − S) // 2, (W' − S) // 2); then (x / 255 − MEAN) / STD."""
  x = jnp.asarray(images, jnp.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [B, H, W, 1 or 3], got shape {tuple(x.shape)}")
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  b, h, w, _ = x.shape
  short, long = min(h, w), max(h, w)
  new_long = int(image_size * long / short)
  nh, nw = (image_size, new_long) if h <= w else (new_long, image_size)
  x = _to_levels((x + 1.0) * 127.5)
  # PIL resizes width first, then height, each pass rounded to 8 bits (a bicubic overshoot clipped in between).
  if nw != w:
    x = _to_levels(jax.image.resize(x, (b, h, nw, 3), "bicubic", antialias=True))
  if nh != h:
    x = _to_levels(jax.image.resize(x, (b, nh, nw, 3), "bicubic", antialias=True))
  x = x / 255.0
  top, left = (nh - image_size) // 2, (nw - image_size) // 2
  x = x[:, top:top + image_size, left:left + image_size]
  return (x - jnp.asarray(MEAN)) / jnp.asarray(STD)


def embed_images(params, model: ClipVision, images) -> jnp.ndarray:
  """images [B, H, W, C] in [−1, 1] → image embeddings [B, projection_dim] (not normalised)."""
  return model.apply({"params": params}, preprocess(images, model.image_size))


def param_shapes(model: ClipVision) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path: shape} of every parameter of `model` (traced, nothing computed)."""
  from flax import traverse_util
  s = model.image_size
  tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)))["params"]
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(tree).items()}


def random_params(model: ClipVision, seed: int = 0, scale: float = 0.1) -> dict:
  """Random numpy float32 values in every leaf of `model`'s tree (tests; a fresh init would hide swapped LayerNorm
  scales and biases)."""
  from flax import traverse_util
  rng = np.random.default_rng(seed)
  def leaf(path, shape):
    noise = rng.standard_normal(shape) * scale
    return (noise + 1.0 if path[-1] == "scale" else noise).astype(np.float32)
  return traverse_util.unflatten_dict({p: leaf(p, s) for p, s in param_shapes(model).items()})
