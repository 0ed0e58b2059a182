"""Stable Diffusion's text-conditioned U-Net (Rombach et al. 2022, §3.3 and App. E: LDM's openaimodel with
spatial transformers), in diffusers' UNet2DConditionModel layout with the Flax parameter names of diffusers ≤ 0.39
(`models/unets/unet_2d_condition_flax.py`), so a FlaxUNet2DConditionModel's parameter tree applies unchanged.

Layout (channels last; `block_out_channels` = (c_0, …, c_{L−1}), n = `layers_per_block`):

  time:        sinusoidal features of the timestep t (dim c_0; `flip_sin_to_cos`, `freq_shift`) →
               time_embedding/linear_1 → SiLU → linear_2 (dim 4·c_0) = emb
  conv_in      3×3 → c_0
  down_blocks_i  (CrossAttnDownBlock2D or DownBlock2D): n × [resnets_j (→ c_i), attentions_j for a cross-attention
               level], then downsamplers_0/conv (3×3, stride 2, padding 1) except on the last level; every output is
               kept for the skip connections
  mid_block    resnets_0 → attentions_0 → resnets_1 at c_{L−1}
  up_blocks_i  (reversed widths; UpBlock2D or CrossAttnUpBlock2D): n + 1 × [concat the latest skip, resnets_j,
               attentions_j for a cross-attention level], then upsamplers_0/conv (nearest ×2, 3×3) except on the last
  conv_norm_out (GroupNorm) → SiLU → conv_out 3×3 → out_channels

  resnet:      norm1 → SiLU → conv1 → + time_emb_proj(SiLU(emb)) → norm2 → SiLU → conv2, plus the input
               (through conv_shortcut 1×1 when the width changes); GroupNorm ε `norm_eps`
  attention (Transformer2DModel): norm (GroupNorm, ε `transformer_norm_eps`) → proj_in (1×1 conv; a Dense with
               `use_linear_projection`, SD 2.x) → transformer_blocks_k: x += attn1(norm1(x)) (self-attention),
               x += attn2(norm2(x), context) (cross-attention on encoder_hidden_states), x += ff(norm3(x)) with
               ff = net_2(GEGLU(net_0/proj(x))) at 4× width → proj_out → + the input.
               Attentions: to_q, to_k, to_v (no bias), to_out_0; heads `num_attention_heads[i]` of width c_i / heads.

Heads: diffusers' configs call the per-level head *count* `attention_head_dim` (a misnomer it keeps for
compatibility, diffusers issue 2011); `num_attention_heads` here is that count (SD 1.x: 8 at every level;
SD 2.x: (5, 10, 20, 20), i.e. 64 channels per head).

Two numerical choices differ between the PyTorch models the weights were trained with (LDM, diffusers' torch
UNet2DConditionModel) and diffusers' Flax port: the transformer's GroupNorm ε (torch 1e-6, Flax 1e-5) and GEGLU's
GELU (torch exact, Flax tanh-approximate). The defaults follow torch; `FLAX_REFERENCE` reproduces the Flax port,
against which tests/test_sd_unet.py checks equivalence.

Inputs: sample [B, H, W, in_channels] (H, W divisible by 2^(L−1)), timesteps [B] (or a scalar), the discrete
step in [0, 1000) for SD; encoder_hidden_states [B, L_text, cross_attention_dim]. Output [B, H, W, out_channels]
(SD: ε or v of the 4 latent channels; inpainting reads 9 = latent + mask + masked-image latent).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

CROSS_ATTN_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"

# Published architectures (diffusers' unet/config.json of each). SD 1.x (CompVis/runwayml v1-*): in 4 (9 for
# inpainting), out 4; SD 2.x (stabilityai 2-base, 2, 2.1): the same widths, heads of 64 channels, OpenCLIP-H
# context of 1024 and linear projections.
SD1 = {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "num_attention_heads": (8, 8, 8, 8),
       "cross_attention_dim": 768, "use_linear_projection": False,
       "down_block_types": (CROSS_ATTN_DOWN,) * 3 + (DOWN,), "up_block_types": (UP,) + (CROSS_ATTN_UP,) * 3}
SD2 = {**SD1, "num_attention_heads": (5, 10, 20, 20), "cross_attention_dim": 1024, "use_linear_projection": True}
# diffusers' Flax port's two numerical differences from torch (see the module docstring).
FLAX_REFERENCE = {"transformer_norm_eps": 1e-5, "gelu_approximate": True}


def timestep_features(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                      max_period: float = 10_000.0) -> jax.Array:
  """t [B] (any real) → [B, dim] features: frequencies f_k = exp(−log(max_period) · k / (dim/2 − freq_shift)),
  k < dim/2; [sin(t f), cos(t f)], or [cos, sin] with flip_sin_to_cos (diffusers' Timesteps; SD: flip, shift 0)."""
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(max_period) / (half - freq_shift)))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


def _conv(features: int, kernel: int, name: str, dtype, stride: int = 1):
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """x [B, H, W, C_in], emb [B, E] → [B, H, W, out_channels]."""
  out_channels: int
  groups: int
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb):
    h = nn.swish(nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm1")(x))
    h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
    h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.swish(emb))[:, None, None, :]
    h = nn.swish(nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm2")(h))
    h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
    return x + h


class Attention(nn.Module):
  """Multi-head attention: x [B, N, C] attends to context [B, M, D] (x itself when None) → [B, N, C]."""
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    b, n, c = x.shape
    d = c // self.heads
    q, k, v = (nn.Dense(c, use_bias=False, dtype=self.dtype, name=name)(inp).reshape(b, -1, self.heads, d)
               for name, inp in (("to_q", x), ("to_k", context), ("to_v", context)))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * d ** -0.5
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, c)
    return nn.Dense(c, dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
  """x [..., C] → proj to 2·inner, split (value, gate) → value · GELU(gate): [..., inner]."""
  inner: int
  approximate: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    value, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
    return value * jax.nn.gelu(gate, approximate=self.approximate)


class FeedForward(nn.Module):
  """x [..., C] → net_2(GEGLU net_0(x)) [..., C], inner width 4C."""
  gelu_approximate: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = GEGLU(4 * c, self.gelu_approximate, self.dtype, name="net_0")(x)
    return nn.Dense(c, dtype=self.dtype, name="net_2")(h)


class TransformerBlock(nn.Module):
  """x [B, N, C], context [B, M, D] → [B, N, C]: self-attention, cross-attention, GEGLU feed-forward, each
  pre-LayerNorm (ε 1e-5) with a residual."""
  heads: int
  gelu_approximate: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    def norm(name):
      return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    x = x + Attention(self.heads, self.dtype, name="attn1")(norm("norm1")(x))
    x = x + Attention(self.heads, self.dtype, name="attn2")(norm("norm2")(x), context)
    return x + FeedForward(self.gelu_approximate, self.dtype, name="ff")(norm("norm3")(x))


class Transformer2D(nn.Module):
  """A spatial transformer: x [B, H, W, C], context [B, M, D] → [B, H, W, C]."""
  heads: int
  depth: int
  use_linear_projection: bool
  groups: int
  eps: float
  gelu_approximate: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    b, hgt, wid, c = x.shape
    h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm")(x)

    def project(name, h):
      if self.use_linear_projection:
        return nn.Dense(c, dtype=self.dtype, name=name)(h)
      return nn.Conv(c, (1, 1), padding="VALID", dtype=self.dtype, name=name)(h)

    if self.use_linear_projection:
      h = project("proj_in", h.reshape(b, hgt * wid, c))
    else:
      h = project("proj_in", h).reshape(b, hgt * wid, c)
    for k in range(self.depth):
      h = TransformerBlock(self.heads, self.gelu_approximate, self.dtype, name=f"transformer_blocks_{k}")(h, context)
    if self.use_linear_projection:
      h = project("proj_out", h).reshape(b, hgt, wid, c)
    else:
      h = project("proj_out", h.reshape(b, hgt, wid, c))
    return x + h


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """What every block of one U-Net shares: GroupNorm groups and ε, the transformers' GroupNorm ε, linear or 1×1
  projections, GEGLU's GELU, the compute dtype."""
  groups: int
  eps: float
  transformer_eps: float
  use_linear_projection: bool
  gelu_approximate: bool
  dtype: Any = jnp.float32

  def resnet(self, width: int, name: str) -> ResnetBlock:
    return ResnetBlock(width, self.groups, self.eps, self.dtype, name=name)

  def transformer(self, heads: int, depth: int, name: str) -> Transformer2D:
    return Transformer2D(heads, depth, self.use_linear_projection, self.groups, self.transformer_eps,
                         self.gelu_approximate, self.dtype, name=name)


class TimestepEmbedding(nn.Module):
  """features [B, F] → linear_1 → SiLU → linear_2: [B, dim]."""
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features):
    h = nn.swish(nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(features))
    return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(h)


class Resample(nn.Module):
  """conv: x [B, H, W, C] → [B, H/2, W/2, C] (`down`: 3×3, stride 2, padding 1) or [B, 2H, 2W, C] (nearest ×2,
  then 3×3)."""
  down: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    if not self.down:
      x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
    return _conv(c, 3, "conv", self.dtype, stride=2 if self.down else 1)(x)


class DownBlock(nn.Module):
  """CrossAttnDownBlock2D (heads > 0) or DownBlock2D: x [B, H, W, C] → (h, the outputs kept for the skips: one
  per resnet, and the downsampled h when `downsample`)."""
  width: int
  layers: int
  heads: int  # 0: no attention
  depth: int
  downsample: bool
  spec: BlockSpec

  @nn.compact
  def __call__(self, x, emb, context):
    outs = []
    for j in range(self.layers):
      x = self.spec.resnet(self.width, f"resnets_{j}")(x, emb)
      if self.heads:
        x = self.spec.transformer(self.heads, self.depth, f"attentions_{j}")(x, context)
      outs.append(x)
    if self.downsample:
      x = Resample(True, self.spec.dtype, name="downsamplers_0")(x)
      outs.append(x)
    return x, tuple(outs)


class UpBlock(nn.Module):
  """CrossAttnUpBlock2D (heads > 0) or UpBlock2D: x [B, H, W, C] and `len(skips)` skips, used last first, each
  concatenated before its resnet → [B, H, W, width] ([B, 2H, 2W, width] when `upsample`)."""
  width: int
  heads: int  # 0: no attention
  depth: int
  upsample: bool
  spec: BlockSpec

  @nn.compact
  def __call__(self, x, skips, emb, context):
    for j, skip in enumerate(reversed(skips)):
      x = self.spec.resnet(self.width, f"resnets_{j}")(jnp.concatenate([x, skip], axis=-1), emb)
      if self.heads:
        x = self.spec.transformer(self.heads, self.depth, f"attentions_{j}")(x, context)
    return Resample(False, self.spec.dtype, name="upsamplers_0")(x) if self.upsample else x


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnets_0 → attentions_0 → resnets_1 at constant width."""
  heads: int
  depth: int
  spec: BlockSpec

  @nn.compact
  def __call__(self, x, emb, context):
    c = x.shape[-1]
    x = self.spec.resnet(c, "resnets_0")(x, emb)
    x = self.spec.transformer(self.heads, self.depth, "attentions_0")(x, context)
    return self.spec.resnet(c, "resnets_1")(x, emb)


# The blocks with gradient checkpointing (SDUNet.remat): same parameters, activations recomputed in the backward pass.
REMAT_BLOCKS = {block: nn.remat(block) for block in (DownBlock, MidBlock, UpBlock)}


class SDUNet(nn.Module):
  """SD's U-Net: __call__(sample [B, H, W, in_channels], timesteps [B] or scalar, encoder_hidden_states
  [B, L, cross_attention_dim]) → [B, H, W, out_channels] float32. Per-level fields hold one entry per level
  (`block_out_channels`' order); an int `num_attention_heads` / `transformer_layers_per_block` applies to all.
  `in_channels` is not read by the network (the first conv takes what it is given) but fixes `init`'s input
  and the weight files it accepts."""
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = SD1["block_out_channels"]
  down_block_types: tuple[str, ...] = SD1["down_block_types"]
  up_block_types: tuple[str, ...] = SD1["up_block_types"]
  layers_per_block: int = 2
  num_attention_heads: int | tuple[int, ...] = 8
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  transformer_layers_per_block: int | tuple[int, ...] = 1
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  transformer_norm_eps: float = 1e-6
  gelu_approximate: bool = False
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32
  # Gradient checkpointing: each down, mid and up block recomputes its activations in the backward pass instead of
  # keeping them (`nn.remat`), trading about one more forward pass for the memory of SD's 512² activations. The
  # parameter tree and the outputs are the same either way.
  remat: bool = False

  def per_level(self, value) -> tuple[int, ...]:
    """An int or per-level tuple field → one int per level."""
    return (int(value),) * len(self.block_out_channels) if isinstance(value, int) else tuple(value)

  def check(self) -> None:
    """ValueError (one line) when the fields do not describe a U-Net this module builds."""
    levels = len(self.block_out_channels)
    for field in ("down_block_types", "up_block_types", "num_attention_heads", "transformer_layers_per_block"):
      value = getattr(self, field)
      if not isinstance(value, int) and len(value) != levels:
        raise ValueError(f"{field}={tuple(value)} has {len(value)} entries for {levels} levels")
    for types, allowed in ((self.down_block_types, (CROSS_ATTN_DOWN, DOWN)), (self.up_block_types,
                                                                              (CROSS_ATTN_UP, UP))):
      for t in types:
        if t not in allowed:
          raise ValueError(f"block type {t!r}: allowed {', '.join(map(repr, allowed))}")
    for c, heads in zip(self.block_out_channels, self.per_level(self.num_attention_heads)):
      if c % heads or c % self.norm_num_groups:
        raise ValueError(f"width {c} is not divisible by its {heads} attention heads and {self.norm_num_groups} "
                         "groups")

  @property
  def downsampling(self) -> int:
    """Input pixels per pixel of the lowest level, along each side: 2^(levels − 1)."""
    return 2 ** (len(self.block_out_channels) - 1)

  def spec(self) -> BlockSpec:
    return BlockSpec(self.norm_num_groups, self.norm_eps, self.transformer_norm_eps, self.use_linear_projection,
                     self.gelu_approximate, self.dtype)

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, extra_emb=None):
    """sample [B, H, W, in_channels], timesteps [B] (or a scalar), encoder_hidden_states [B, L, cross_attention_dim];
    extra_emb [B, 4·block_out_channels[0]] or None: added to the time embedding (a distilled student's guidance-w
    embedding). Returns [B, H, W, out_channels] float32."""
    self.check()
    spec, widths = self.spec(), self.block_out_channels
    heads, depths = self.per_level(self.num_attention_heads), self.per_level(self.transformer_layers_per_block)
    levels = len(widths)
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (sample.shape[0],))
    features = timestep_features(t, widths[0], self.flip_sin_to_cos, self.freq_shift)
    emb = TimestepEmbedding(4 * widths[0], self.dtype, name="time_embedding")(features.astype(self.dtype))
    if extra_emb is not None:
      emb = emb + extra_emb.astype(self.dtype)
    context = encoder_hidden_states.astype(self.dtype)
    down, mid, up = (REMAT_BLOCKS[b] if self.remat else b for b in (DownBlock, MidBlock, UpBlock))

    h = _conv(widths[0], 3, "conv_in", self.dtype)(sample.astype(self.dtype))
    skips = [h]
    for i, width in enumerate(widths):
      attends = self.down_block_types[i] == CROSS_ATTN_DOWN
      h, outs = down(width, self.layers_per_block, heads[i] if attends else 0, depths[i], i < levels - 1,
                     spec, name=f"down_blocks_{i}")(h, emb, context)
      skips += outs
    h = mid(heads[-1], depths[-1], spec, name="mid_block")(h, emb, context)
    per_block = self.layers_per_block + 1
    for i in range(levels):
      level = levels - 1 - i  # the up blocks run the levels in reverse, with reversed per-level fields
      attends = self.up_block_types[i] == CROSS_ATTN_UP
      block_skips, skips = skips[-per_block:], skips[:-per_block]
      h = up(widths[level], heads[level] if attends else 0, depths[level], i < levels - 1, spec,
             name=f"up_blocks_{i}")(h, block_skips, emb, context)
    h = nn.GroupNorm(self.norm_num_groups, epsilon=self.norm_eps, dtype=self.dtype, name="conv_norm_out")(h)
    return _conv(self.out_channels, 3, "conv_out", self.dtype)(nn.swish(h)).astype(jnp.float32)


# diffusers' UNet2DConditionModel config.json fields read here, and those whose other values this U-Net cannot
# build (SDXL's added embeddings, class embeddings, other time embeddings, …) with the value it needs.
_CONFIG_FIELDS = ("in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
                  "layers_per_block", "cross_attention_dim", "use_linear_projection", "transformer_layers_per_block",
                  "flip_sin_to_cos", "freq_shift", "norm_num_groups", "norm_eps")
_CONFIG_REQUIRED = {"mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu", "center_input_sample": False,
                    "only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None,
                    "num_class_embeds": None, "addition_embed_type": None, "time_embedding_type": "positional",
                    "time_cond_proj_dim": None, "timestep_post_act": None, "encoder_hid_dim": None,
                    "encoder_hid_dim_type": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
                    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
                    "resnet_out_scale_factor": 1.0, "attention_type": "default", "mid_block_scale_factor": 1,
                    "downsample_padding": 1, "class_embeddings_concat": False, "cross_attention_norm": None,
                    "reverse_transformer_layers_per_block": None, "addition_time_embed_dim": None,
                    "projection_class_embeddings_input_dim": None, "time_embedding_dim": None,
                    "time_embedding_act_fn": None, "mid_block_only_cross_attention": None, "dropout": 0.0}


def sd_unet_from_diffusers_config(config: dict, **overrides) -> SDUNet:
  """The SDUNet a diffusers `unet/config.json` (as a dict) describes; `overrides` set SDUNet fields (dtype,
  FLAX_REFERENCE's numerics). Heads: `num_attention_heads` when set, else `attention_head_dim` (diffusers reads
  it as the head count too). ValueError (one line naming the field) for a config this U-Net cannot build."""
  name = config.get("_class_name", "UNet2DConditionModel")
  if name not in ("UNet2DConditionModel", "FlaxUNet2DConditionModel"):
    raise ValueError(f"_class_name {name!r} is not a UNet2DConditionModel")
  for field, needed in _CONFIG_REQUIRED.items():
    value = config.get(field, needed)
    if value != needed:
      raise ValueError(f"config field {field}={value!r} is not supported (this U-Net needs {needed!r})")
  fields = {f: config[f] for f in _CONFIG_FIELDS if f in config}
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
  heads = tuple(heads) if isinstance(heads, list) else heads
  model = SDUNet(**{**fields, "num_attention_heads": heads, **overrides})
  model.check()
  return model
