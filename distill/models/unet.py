"""U-Net of the progressive-distillation / ADM family, with the conditionings distillation needs.

One network serves teachers and students:

* noise level: log-SNR λ → t = arctan(exp(−λ/2)) / (π/2) ∈ [0, 1] (λ clipped to [−20, 20]),
  sinusoidal features of 1000·t → Dense → swish → Dense (``time_embed``);
* class: one-hot over ``num_classes + 1`` labels, the last one (``num_classes``) being the null
  class of classifier-free guidance → Dense, added to the time embedding (``class_embed``);
* guidance strength w (stage-one students, ``w_embedding=True``): sinusoidal features of
  1000·w/w_max → Dense → swish → Dense, added to the embedding (``w_embed``);
* sampling-step count n (SFD-v, ``step_embedding=True``): sinusoidal features of the integer n
  (as DDPM embeds its integer timestep) → Dense → swish → Dense gives a second embedding from
  which every residual block gets its own Dense producing an extra FiLM (scale, shift), applied
  after the main one (``step_embed``).

The layers that turn a teacher into a student are zero-initialised at their output and live in
their own top-level parameter subtrees (``w_embed``, ``step_embed``); every other parameter has the
same name in all variants. So a student initialised as ``{**student_params, **teacher_params}``
computes exactly (bit for bit) what the teacher computes, for any w and any n, until it trains.

Residual blocks follow the PD code: ``GN → swish → [resample] → conv3x3 → FiLM GN(h)·(1+scale)+shift
→ swish → dropout → conv3x3 (zero init)`` plus a 1×1 skip when channels change; down/upsampling
happens inside residual blocks (BigGAN style) unless ``resample_with_resblock=False``. Self-attention
follows residual blocks at the spatial sizes in ``attn_resolutions`` and always sits in the middle
(as in the PD and ADM networks). The output head is GN → swish → conv3x3 with a zero-initialised
conv, so a fresh network outputs zeros.

Parameter counts (``param_count``, pinned in tests/test_unet.py):

* digits, 8×8×1, ch 32, mult (1, 2), 2 res blocks, attention at 4, 10 classes, out 1: 1,153,025;
* CIFAR-10 teacher, 32×32×3, ch 256, mult (1, 1, 1), 3 res blocks, attention at 16 and 8,
  10 classes, out 3: 60,016,387;
* ImageNet 64 teacher, 64×64×3, ch 192, mult (1, 2, 3, 4), 3 res blocks, attention at 32/16/8,
  head dim 64, emb 768, 1000 classes, out 3: 295,900,803 (out 6, a 'both' output: 295,905,990).
A w-embedding adds ch·emb + emb² + 2·emb (ImageNet 64: +738,816; CIFAR-10: +1,312,768).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LOGSNR_CLIP = 20.0  # docs/design.md §6: log-SNR lives in [−20, 20] everywhere.


def sinusoidal_embedding(x: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Transformer-style features ``[sin(x·f_i), cos(x·f_i)]``, f_i from 1 down to 1/max_period.

  x: [B] float (any scale; callers map their input to roughly [0, 1000]). Returns [B, dim];
  an odd ``dim`` is zero-padded by one column.
  """
  half = dim // 2
  exponent = math.log(max_period) / max(half - 1, 1)
  freqs = jnp.exp(-exponent * jnp.arange(half, dtype=jnp.float32))
  args = x.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def logsnr_to_time(logsnr: jax.Array) -> jax.Array:
  """t = arctan(exp(−λ/2)) / (π/2): the cosine schedule's time for log-SNR λ, in [0, 1]."""
  logsnr = jnp.clip(logsnr, -LOGSNR_CLIP, LOGSNR_CLIP)
  return jnp.arctan(jnp.exp(-0.5 * logsnr)) / (0.5 * jnp.pi)


def group_count(channels: int, max_groups: int) -> int:
  """The largest group count ≤ max_groups that divides ``channels`` (GroupNorm needs a divisor)."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1


def nearest_upsample(x: jax.Array) -> jax.Array:
  """[B, H, W, C] → [B, 2H, 2W, C] by repeating pixels."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def avg_downsample(x: jax.Array) -> jax.Array:
  """[B, H, W, C] → [B, H/2, W/2, C] by 2×2 mean pooling."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


def group_norm(x: jax.Array, num_groups: int, name: str) -> jax.Array:
  """GroupNorm with the largest group count ≤ num_groups dividing x's channels (inside a compact method)."""
  return nn.GroupNorm(num_groups=group_count(x.shape[-1], num_groups), name=name)(x)


class TimeEmbedding(nn.Module):
  """Sinusoidal features of ``scale · x`` → Dense → swish → Dense. x: [B] → [B, emb_ch]."""

  ch: int
  emb_ch: int
  scale: float = 1000.0
  zero_init_out: bool = False  # True for embeddings added to a trained teacher's

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = sinusoidal_embedding(self.scale * x.astype(jnp.float32), self.ch)
    h = nn.Dense(self.emb_ch, name="dense0")(h)
    out_init = nn.initializers.zeros if self.zero_init_out else nn.linear.default_kernel_init
    return nn.Dense(self.emb_ch, kernel_init=out_init, name="dense1")(nn.swish(h))


class StepEmbedding(nn.Module):
  """Step-count embedding plus one zero-initialised FiLM projection per residual block.

  steps: [B] int. Returns {block name: [B, 1, 1, 2·channels]} (scale then shift), all exactly
  zero at initialisation, so a model with it starts equal to the model without it.
  """

  ch: int
  emb_ch: int
  blocks: tuple[tuple[str, int], ...]  # (residual block name, its output channels)

  @nn.compact
  def __call__(self, steps: jax.Array) -> dict[str, jax.Array]:
    # The integer count is embedded as is (like DDPM's integer timestep): distinct, smooth in n.
    emb = TimeEmbedding(self.ch, self.emb_ch, scale=1.0, name="mlp")(steps)
    emb = nn.swish(emb)
    return {
        name: nn.Dense(2 * c, kernel_init=nn.initializers.zeros, name=name)(emb)[:, None, None, :]
        for name, c in self.blocks
    }


class ResBlock(nn.Module):
  """Residual block with FiLM conditioning, optional resampling and optional step FiLM."""

  out_ch: int | None = None
  dropout: float = 0.0
  resample: str | None = None  # None, 'up' or 'down'
  num_groups: int = 32

  @nn.compact
  def __call__(self, x, emb, step_film=None, *, train: bool):
    c_in = x.shape[-1]
    out_ch = c_in if self.out_ch is None else self.out_ch

    h = nn.swish(group_norm(x, self.num_groups, "norm1"))
    if self.resample is not None:
      resample = {"up": nearest_upsample, "down": avg_downsample}[self.resample]
      h, x = resample(h), resample(x)
    h = nn.Conv(out_ch, (3, 3), name="conv1")(h)

    film = nn.Dense(2 * out_ch, name="temb_proj")(nn.swish(emb))[:, None, None, :]
    scale, shift = jnp.split(film, 2, axis=-1)
    h = group_norm(h, self.num_groups, "norm2") * (1 + scale) + shift
    if step_film is not None:
      # Applied after the main FiLM; its projection starts at zero, so h*(1+0)+0 == h exactly.
      s_scale, s_shift = jnp.split(step_film, 2, axis=-1)
      h = h * (1 + s_scale) + s_shift
    h = nn.swish(h)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = nn.Conv(out_ch, (3, 3), kernel_init=nn.initializers.zeros, name="conv2")(h)

    if c_in != out_ch:
      x = nn.Dense(out_ch, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Multi-head self-attention over all pixels, residual, output projection zero-initialised."""

  head_dim: int = 64
  num_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    num_heads = max(1, c // self.head_dim)
    head_dim = c // num_heads
    h = group_norm(x, self.num_groups, "norm").reshape(b, hh * ww, c)
    q = nn.DenseGeneral((num_heads, head_dim), name="q")(h)
    k = nn.DenseGeneral((num_heads, head_dim), name="k")(h)
    v = nn.DenseGeneral((num_heads, head_dim), name="v")(h)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(np.float32)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    h = nn.DenseGeneral(c, axis=(-2, -1), kernel_init=nn.initializers.zeros, name="proj_out")(h)
    return x + h.reshape(b, hh, ww, c)


class UNet(nn.Module):
  """Class-conditional U-Net predicting x, ε, v or (x, ε) from (z_t, λ_t, label[, w][, n]).

  Parameter subtrees (top level of ``params``): ``time_embed``, ``class_embed``, ``w_embed``
  (only with w_embedding), ``step_embed`` (only with step_embedding), ``conv_in``,
  ``down{level}_block{i}``, ``down{level}_attn{i}``, ``down{level}_downsample``, ``mid_block1``,
  ``mid_attn``, ``mid_block2``, ``up{level}_block{i}``, ``up{level}_attn{i}``,
  ``up{level}_upsample``, ``norm_out``, ``conv_out``.
  """

  num_classes: int  # label value num_classes is the NULL class (classifier-free guidance)
  out_channels: int  # C for x/eps/v output, 2C for 'both'
  ch: int = 128
  ch_mult: tuple = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple = ()  # spatial sizes (e.g. (16, 8); the height) at which attention is applied
  head_dim: int = 64  # attention head dim (num_heads = channels // head_dim, at least 1)
  dropout: float = 0.0
  emb_ch: int | None = None  # default 4*ch
  w_embedding: bool = False  # guidance-w conditioning (stage-one students)
  step_embedding: bool = False  # sampling-step-count conditioning (SFD-v)
  resample_with_resblock: bool = True  # down/upsampling inside res blocks (BigGAN style)
  num_groups: int = 32  # GroupNorm groups, min(num_groups, channels) / divisor-safe
  w_max: float = 8.0  # w is embedded as sinusoidal features of 1000·w/w_max (cf. 1000·t)
  cond_channels: int = 0  # > 0: an inpainting model (SD Inpainting's layout): mask (1) + masked image (C) channels

  def res_blocks(self) -> tuple[tuple[str, int], ...]:
    """(name, output channels) of every residual block, in call order."""
    blocks = []
    levels = len(self.ch_mult)
    c = self.ch
    for level, mult in enumerate(self.ch_mult):
      c = self.ch * mult
      blocks += [(f"down{level}_block{i}", c) for i in range(self.num_res_blocks)]
      if level != levels - 1 and self.resample_with_resblock:
        blocks.append((f"down{level}_downsample", c))
    blocks += [("mid_block1", c), ("mid_block2", c)]
    for level in reversed(range(levels)):
      c = self.ch * self.ch_mult[level]
      blocks += [(f"up{level}_block{i}", c) for i in range(self.num_res_blocks + 1)]
      if level != 0 and self.resample_with_resblock:
        blocks.append((f"up{level}_upsample", c))
    return tuple(blocks)

  @nn.compact
  def __call__(self, z, logsnr, labels, w=None, steps=None, *, train: bool):
    """z: [B, H, W, C]; logsnr: [B] float; labels: [B] int32 in [0, num_classes] (num_classes =
    null), or with cond_channels an inpainting condition {'label', 'mask' [B, H, W, 1], 'masked' [B, H, W, C]}
    (`distill.conditions`) whose mask and masked image join z on channels before conv_in; w: [B] float
    (required iff w_embedding); steps: [B] int (required iff step_embedding).
    Scalars broadcast to [B]. H and W must be divisible by 2**(len(ch_mult) − 1).
    Returns [B, H, W, out_channels].
    """
    if self.cond_channels != (labels["mask"].shape[-1] + labels["masked"].shape[-1]
                              if isinstance(labels, dict) else 0):
      raise ValueError(f"an inpainting condition must be given iff cond_channels > 0 (cond_channels="
                       f"{self.cond_channels}, labels {'a dict' if isinstance(labels, dict) else 'an array'})")
    if isinstance(labels, dict):
      z = jnp.concatenate([z, labels["mask"].astype(z.dtype), labels["masked"].astype(z.dtype)], axis=-1)
      labels = labels["label"]
    b, height, width, _ = z.shape
    factor = 2 ** (len(self.ch_mult) - 1)
    if height % factor or width % factor:
      raise ValueError(f"image size {height}x{width} not divisible by {factor} (ch_mult={self.ch_mult})")
    if self.w_embedding != (w is not None):
      raise ValueError(f"w must be given iff w_embedding (w_embedding={self.w_embedding})")
    if self.step_embedding != (steps is not None):
      raise ValueError(f"steps must be given iff step_embedding (step_embedding={self.step_embedding})")
    emb_ch = self.emb_ch or 4 * self.ch
    batch = lambda a: jnp.broadcast_to(jnp.asarray(a), (b,))

    emb = TimeEmbedding(self.ch, emb_ch, name="time_embed")(logsnr_to_time(batch(logsnr)))
    onehot = jax.nn.one_hot(batch(labels), self.num_classes + 1, dtype=emb.dtype)
    emb = emb + nn.Dense(emb_ch, name="class_embed")(onehot)
    if self.w_embedding:
      w_emb = TimeEmbedding(self.ch, emb_ch, scale=1000.0 / self.w_max, zero_init_out=True, name="w_embed")
      emb = emb + w_emb(batch(w).astype(jnp.float32))
    films: dict[str, Any] = {}
    if self.step_embedding:
      films = StepEmbedding(self.ch, emb_ch, self.res_blocks(), name="step_embed")(batch(steps))
    used = []

    def res_block(h, name, out_ch=None, resample=None):
      used.append(name)
      block = ResBlock(out_ch, self.dropout, resample, self.num_groups, name=name)
      return block(h, emb, films.get(name), train=train)

    def maybe_attn(h, name):
      if h.shape[1] in self.attn_resolutions:
        h = AttnBlock(self.head_dim, self.num_groups, name=name)(h)
      return h

    levels = len(self.ch_mult)
    hs = [nn.Conv(self.ch, (3, 3), name="conv_in")(z)]
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = res_block(hs[-1], f"down{level}_block{i}", self.ch * mult)
        hs.append(maybe_attn(h, f"down{level}_attn{i}"))
      if level != levels - 1:
        name = f"down{level}_downsample"
        if self.resample_with_resblock:
          hs.append(res_block(hs[-1], name, resample="down"))
        else:
          hs.append(nn.Conv(hs[-1].shape[-1], (3, 3), strides=(2, 2), name=name)(hs[-1]))

    h = res_block(hs[-1], "mid_block1")
    h = AttnBlock(self.head_dim, self.num_groups, name="mid_attn")(h)
    h = res_block(h, "mid_block2")

    for level in reversed(range(levels)):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = res_block(h, f"up{level}_block{i}", self.ch * self.ch_mult[level])
        h = maybe_attn(h, f"up{level}_attn{i}")
      if level != 0:
        name = f"up{level}_upsample"
        if self.resample_with_resblock:
          h = res_block(h, name, resample="up")
        else:
          h = nn.Conv(h.shape[-1], (3, 3), name=name)(nearest_upsample(h))
    assert not hs and tuple(used) == tuple(n for n, _ in self.res_blocks()), "res_blocks() out of sync"

    h = nn.swish(group_norm(h, self.num_groups, "norm_out"))
    return nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros, name="conv_out")(h)


def example_inputs(model: UNet, image_shape: tuple[int, int, int], batch: int = 1) -> dict[str, Any]:
  """Abstract inputs (``jax.ShapeDtypeStruct``) for ``model`` on images of ``image_shape`` (H, W, C).

  The keyword arguments of ``model.init`` / ``model.apply`` (besides ``train``), for jax.eval_shape.
  """
  sds = jax.ShapeDtypeStruct
  return dict(
      z=sds((batch, *image_shape), jnp.float32),
      logsnr=sds((batch,), jnp.float32),
      labels=example_condition(model, image_shape, batch, sds),
      w=sds((batch,), jnp.float32) if model.w_embedding else None,
      steps=sds((batch,), jnp.int32) if model.step_embedding else None,
  )


def example_condition(model: UNet, image_shape, batch: int = 1, make=None):
  """A condition of the form `model` takes, of zeros (or `make(shape, dtype)`, e.g. jax.ShapeDtypeStruct):
  labels [batch], or an inpainting model's {'label', 'mask', 'masked'}."""
  make = make or jnp.zeros
  labels = make((batch,), jnp.int32)
  cond = {}
  if getattr(model, "context_length", 0):  # a text U-Net (`text_unet.TextUNet`)
    cond["context"] = make((batch, model.context_length, model.context_dim), jnp.float32)
  if model.cond_channels:
    h, w, c = image_shape
    cond.update(mask=make((batch, h, w, 1), jnp.float32), masked=make((batch, h, w, model.cond_channels - 1),
                                                                      jnp.float32))
  return {"label": labels, **cond} if cond else labels


def param_count(model: UNet, image_shape: tuple[int, int, int]) -> int:
  """Number of parameters, computed with jax.eval_shape (no real allocation). image_shape: (H, W, C)."""
  init = lambda rng, inputs: model.init(rng, **inputs, train=False)
  shapes = jax.eval_shape(init, jax.random.key(0), example_inputs(model, image_shape))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))
