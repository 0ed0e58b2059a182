"""A KL autoencoder of Stable Diffusion's family (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", §3 and App. G): the model latent diffusion runs in.

Layout (channels last; `block_out_channels` = (c_0, …, c_{L-1}), L levels, L − 1 halvings):

  encoder:  conv_in 3x3 → c_0
            down_blocks_i, i < L: `layers_per_block` resnets (→ c_i), then downsamplers_0 (a stride-2 3x3 conv after
              padding bottom/right by one) except on the last level
            mid_block: resnets_0, attentions_0 (one head over all positions), resnets_1, at c_{L-1}
            conv_norm_out (GroupNorm) → SiLU → conv_out 3x3 → 2·latent_channels (mean, logvar)
  quant_conv 1x1 (2·latent → 2·latent)        post_quant_conv 1x1 (latent → latent)
  decoder:  conv_in 3x3 → c_{L-1}; mid_block as the encoder's
            up_blocks_i, i < L, channels reversed(c): `layers_per_block + 1` resnets, then upsamplers_0 (nearest ×2
              and a 3x3 conv) except on the last
            conv_norm_out → SiLU → conv_out 3x3 → image channels
  resnet:   norm1 → SiLU → conv1 → norm2 → SiLU → conv2, plus the input (through conv_shortcut 1x1 when the width
            changes). Every GroupNorm has `norm_num_groups` groups and ε = 1e-6.

Module and parameter names are those of diffusers' Flax AutoencoderKL (`models/vae_flax.py`, diffusers ≤ 0.39), so
its parameter tree — `encoder/down_blocks_0/resnets_0/conv1/kernel`, `…/downsamplers_0/conv`,
`encoder/mid_block/attentions_0/{group_norm,query,key,value,proj_attn}`, `quant_conv`, `decoder/up_blocks_0/
upsamplers_0/conv`, … — loads into `AutoencoderKL` unchanged (Stable Diffusion's VAE: block_out_channels
(128, 256, 512, 512), layers_per_block 2, latent_channels 4, norm_num_groups 32, scale factor 0.18215).

Images are [B, H, W, C] in [−1, 1]; latents [B, H / 2^(L−1), W / 2^(L−1), latent_channels]. Diffusion runs on
`scale_factor · z` (≈ unit variance; SD: 1 / std of training latents), and decoding divides it back out.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# SD's clip of the posterior's log-variance (ldm/modules/distributions/distributions.py).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
_EPS = 1e-6  # every GroupNorm's epsilon in SD's autoencoder


def _conv(features: int, kernel: int, name: str, stride: int = 1, padding="SAME"):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, name=name)


class ResnetBlock(nn.Module):
  """x [B, H, W, C_in] → [B, H, W, out_channels]."""
  out_channels: int
  groups: int

  @nn.compact
  def __call__(self, x):
    h = nn.swish(nn.GroupNorm(self.groups, epsilon=_EPS, name="norm1")(x))
    h = _conv(self.out_channels, 3, "conv1")(h)
    h = nn.swish(nn.GroupNorm(self.groups, epsilon=_EPS, name="norm2")(h))
    h = _conv(self.out_channels, 3, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over all H·W positions, with a residual: x [B, H, W, C] → [B, H, W, C]."""
  groups: int

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = nn.GroupNorm(self.groups, epsilon=_EPS, name="group_norm")(x).reshape(b, hgt * wid, c)
    q, k, v = (nn.Dense(c, name=n)(h) for n in ("query", "key", "value"))
    weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(c), axis=-1)
    h = nn.Dense(c, name="proj_attn")(jnp.einsum("bqk,bkc->bqc", weights, v))
    return x + h.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
  """resnets_0 → attentions_0 → resnets_1 at constant width."""
  groups: int

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, name="resnets_0")(x)
    x = AttentionBlock(self.groups, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, name="resnets_1")(x)


class Downsample(nn.Module):
  """x [B, H, W, C] → [B, H/2, W/2, C]: pad bottom/right by one, then a stride-2 3x3 conv (SD's asymmetric pad)."""

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  """x [B, H, W, C] → [B, 2H, 2W, C]: nearest-neighbour ×2, then a 3x3 conv."""

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
    return _conv(c, 3, "conv")(x)


class Encoder(nn.Module):
  """x [B, H, W, C] → moments [B, h, w, 2·latent_channels] (before quant_conv)."""
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  latent_channels: int
  groups: int

  @nn.compact
  def __call__(self, x):
    h = _conv(self.block_out_channels[0], 3, "conv_in")(x)
    last = len(self.block_out_channels) - 1
    for i, width in enumerate(self.block_out_channels):
      h = _DownBlock(width, self.layers_per_block, self.groups, downsample=i < last, name=f"down_blocks_{i}")(h)
    h = MidBlock(self.groups, name="mid_block")(h)
    h = nn.swish(nn.GroupNorm(self.groups, epsilon=_EPS, name="conv_norm_out")(h))
    return _conv(2 * self.latent_channels, 3, "conv_out")(h)


class _DownBlock(nn.Module):
  out_channels: int
  num_layers: int
  groups: int
  downsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, name=f"resnets_{j}")(x)
    return Downsample(name="downsamplers_0")(x) if self.downsample else x


class _UpBlock(nn.Module):
  out_channels: int
  num_layers: int
  groups: int
  upsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, name=f"resnets_{j}")(x)
    return Upsample(name="upsamplers_0")(x) if self.upsample else x


class Decoder(nn.Module):
  """z [B, h, w, latent_channels] (after post_quant_conv) → x [B, H, W, out_channels]."""
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  out_channels: int
  groups: int

  @nn.compact
  def __call__(self, z):
    widths = tuple(reversed(self.block_out_channels))
    h = _conv(widths[0], 3, "conv_in")(z)
    h = MidBlock(self.groups, name="mid_block")(h)
    for i, width in enumerate(widths):
      h = _UpBlock(width, self.layers_per_block + 1, self.groups, upsample=i < len(widths) - 1,
                   name=f"up_blocks_{i}")(h)
    h = nn.swish(nn.GroupNorm(self.groups, epsilon=_EPS, name="conv_norm_out")(h))
    return _conv(self.out_channels, 3, "conv_out")(h)


class AutoencoderKL(nn.Module):
  """SD's KL autoencoder. `encode_moments` and `decode` are its two halves (call them through `model.apply(…,
  method=…)`, or the pure functions `encode` / `decode` below); `__call__` (used by `init`) runs both on the
  posterior mean."""
  in_channels: int = 3
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32

  def setup(self):
    self.encoder = Encoder(self.block_out_channels, self.layers_per_block, self.latent_channels,
                           self.norm_num_groups)
    self.decoder = Decoder(self.block_out_channels, self.layers_per_block, self.in_channels, self.norm_num_groups)
    self.quant_conv = _conv(2 * self.latent_channels, 1, None, padding="VALID")
    self.post_quant_conv = _conv(self.latent_channels, 1, None, padding="VALID")

  def encode_moments(self, x):
    """x [B, H, W, C] → moments [B, h, w, 2·latent_channels]: mean, then the unclipped log-variance."""
    return self.quant_conv(self.encoder(x))

  def decode(self, z):
    """z [B, h, w, latent_channels] (unscaled) → x [B, H, W, C] (unclipped)."""
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, x):
    mean, _ = jnp.split(self.encode_moments(x), 2, axis=-1)
    return self.decode(mean)

  @property
  def downsampling(self) -> int:
    """Image pixels per latent pixel along each side: 2^(levels − 1)."""
    return 2 ** (len(self.block_out_channels) - 1)

  def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(H, W, C) → (h, w, latent_channels)."""
    h, w, _ = image_shape
    return (h // self.downsampling, w // self.downsampling, self.latent_channels)


@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
  """The posterior q(z | x) = N(mean, diag(exp(logvar))), arrays [B, h, w, c], logvar clipped to [−30, 20]."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """moments [..., 2c] (mean first, then log-variance, as the encoder writes them)."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    """z = mean + std · ε, ε ~ N(0, I) from `key` (the reparameterisation: differentiable in mean and logvar)."""
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q ‖ N(0, I)) per example, summed over every latent element: [B].
    ½ Σ (mean² + var − 1 − logvar)."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=tuple(range(1, self.mean.ndim)))

  def nll(self, z: jax.Array) -> jax.Array:
    """−log q(z) per example, summed over every latent element: [B]."""
    return 0.5 * jnp.sum(math.log(2 * math.pi) + self.logvar + jnp.square(z - self.mean) / self.var,
                         axis=tuple(range(1, self.mean.ndim)))


def autoencoder_from_config(ae_cfg, channels: int) -> AutoencoderKL:
  """The autoencoder a config section describes (config.autoencoder; image channels from config.data)."""
  return AutoencoderKL(in_channels=int(channels), block_out_channels=tuple(int(c) for c in ae_cfg.block_out_channels),
                       layers_per_block=int(ae_cfg.layers_per_block), latent_channels=int(ae_cfg.latent_channels),
                       norm_num_groups=int(ae_cfg.norm_num_groups))


@functools.lru_cache(maxsize=8)
def init_params(model: AutoencoderKL, image_shape: tuple, seed: int):
  """Fresh parameters of `model` for images (H, W, C); cached, as a test or a stage may ask twice."""
  return jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1,) + tuple(image_shape)))["params"]


@functools.partial(jax.jit, static_argnames=("model",))
def encode(model: AutoencoderKL, params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [B, H, W, C] in [−1, 1] → (mean, logvar) of the posterior, each [B, h, w, latent_channels] (logvar
  clipped to [−30, 20]); unscaled latents."""
  posterior = DiagonalGaussian.from_moments(model.apply({"params": params}, x, method=AutoencoderKL.encode_moments))
  return posterior.mean, posterior.logvar


@functools.partial(jax.jit, static_argnames=("model",))
def decode(model: AutoencoderKL, params, z: jax.Array) -> jax.Array:
  """z [B, h, w, latent_channels] (unscaled) → x [B, H, W, C] (the decoder's output, not clipped)."""
  return model.apply({"params": params}, z, method=AutoencoderKL.decode)


def reconstruction_loss_fn(model: AutoencoderKL, *, kl_weight: float, loss: str = "l1", perceptual_weight: float = 0.0,
                           perceptual_fn=None):
  """loss_fn(params, frozen, batch, rng) → (loss, metrics), the trainer's LossFn, of SD's autoencoder objective
  without its discriminator (ldm `LPIPSWithDiscriminator` with disc_weight 0 and a fixed log-variance 0):

    per example: Σ_pixels [ rec(x, x̂) + perceptual_weight · P(x, x̂) ] + kl_weight · KL(q(z|x) ‖ N(0, I)),

  averaged over the batch; rec = |x − x̂| ('l1') or (x − x̂)² ('l2'); x̂ decodes a posterior sample z ~ q(z|x)
  (noise from `rng`). P(a, b) → [B] is the perceptual distance (LPIPS), added at every pixel as SD does; it reads
  `frozen` (its parameters: frozen, never saved with the stage). batch: {'image': [B, H, W, C] in [−1, 1]}.
  Metrics: l1, l2 (per-pixel means), kl (per example), perceptual (per example) when used."""
  if loss not in ("l1", "l2"):
    raise ValueError(f"loss={loss!r}: allowed 'l1', 'l2'")

  def loss_fn(params, frozen, batch, rng):
    x = batch["image"]
    moments = model.apply({"params": params}, x, method=AutoencoderKL.encode_moments)
    posterior = DiagonalGaussian.from_moments(moments)
    x_hat = model.apply({"params": params}, posterior.sample(rng), method=AutoencoderKL.decode)
    diff = x_hat - x
    per_pixel = jnp.abs(diff) if loss == "l1" else jnp.square(diff)
    pixels = math.prod(x.shape[1:])
    per_example = jnp.sum(per_pixel, axis=tuple(range(1, x.ndim)))
    metrics = {"l1": jnp.mean(jnp.abs(diff)), "l2": jnp.mean(jnp.square(diff))}
    if perceptual_weight:
      p = perceptual_fn(frozen, x, x_hat)
      per_example = per_example + perceptual_weight * pixels * p
      metrics["perceptual"] = jnp.mean(p)
    kl = posterior.kl()
    metrics["kl"] = jnp.mean(kl)
    return jnp.mean(per_example + kl_weight * kl), metrics

  return loss_fn
