"""Diffusion arithmetic as pure functions of arrays (docs/design.md §3, §6).

Conventions: images `x, z, eps: [B, ...]`; per-example log-SNR `logsnr: [B]` (or a scalar), broadcast
from the left over the trailing image axes. Variance preserving: z_t = α_t x + σ_t ε.
"""
from __future__ import annotations

import jax.numpy as jnp

from distill.schedules import alpha_sigma, sigma_ratio

PARAMETERIZATIONS = ("x", "eps", "v", "both")
WEIGHTINGS = ("constant", "snr", "truncated_snr", "snr_plus_one")


def bcast_like(a, like):
  """Broadcast a per-example value [B] (or scalar) from the left to like's shape [B, ...]."""
  a = jnp.asarray(a, jnp.float32)
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def _alpha_sigma_like(logsnr, like):
  alpha, sigma = alpha_sigma(logsnr)
  return bcast_like(alpha, like), bcast_like(sigma, like)


def q_sample(x, eps, logsnr):
  """z_t = α_t x + σ_t ε.  x, eps: [B, ...]; logsnr: [B]."""
  alpha, sigma = _alpha_sigma_like(logsnr, x)
  return alpha * x + sigma * eps


def v_from_x_eps(x, eps, logsnr):
  """v = α_t ε − σ_t x."""
  alpha, sigma = _alpha_sigma_like(logsnr, x)
  return alpha * eps - sigma * x


def x_from_v(z, v, logsnr):
  """x̂ = α_t z_t − σ_t v̂."""
  alpha, sigma = _alpha_sigma_like(logsnr, z)
  return alpha * z - sigma * v


def eps_from_v(z, v, logsnr):
  """ε̂ = σ_t z_t + α_t v̂."""
  alpha, sigma = _alpha_sigma_like(logsnr, z)
  return sigma * z + alpha * v


def x_from_eps(z, eps, logsnr):
  """x̂ = (z_t − σ_t ε̂)/α_t (unstable as α → 0: prefer v or x outputs near t = 1)."""
  alpha, sigma = _alpha_sigma_like(logsnr, z)
  return (z - sigma * eps) / alpha


def eps_from_x(z, x, logsnr):
  """ε̂ = (z_t − α_t x̂)/σ_t."""
  alpha, sigma = _alpha_sigma_like(logsnr, z)
  return (z - alpha * x) / sigma


def v_from_x(z, x, logsnr):
  """v̂ implied by x̂ at z_t: v = α ε̂ − σ x̂ with ε̂ = (z − α x̂)/σ, i.e. (α z − x̂)/σ."""
  alpha, sigma = _alpha_sigma_like(logsnr, z)
  return (alpha * z - x) / sigma


def x_from_output(output, z, logsnr, parameterization: str):
  """x̂ from a network output in the given parameterisation.

  output: [B, H, W, C] (or [B, H, W, 2C] for 'both': the x-half then the ε-half); z: [B, H, W, C].
  'both' reconciles its two heads as the progressive-distillation code does:
  x̂ = σ²·x_out + (1 − σ²)·(z − σ ε_out)/α  (x-head near the noise end, ε-head near the data end).
  ValueError when the output's shape does not fit z's (it would broadcast: a network predicting fewer channels
  than it is given).
  """
  expected = tuple(z.shape[:-1]) + (2 * z.shape[-1] if parameterization == "both" else z.shape[-1],)
  if tuple(output.shape) != expected:
    raise ValueError(f"network output of shape {tuple(output.shape)} for z of shape {tuple(z.shape)}: a "
                     f"{parameterization!r} network must output {expected}")
  if parameterization == "x":
    return output
  if parameterization == "eps":
    return x_from_eps(z, output, logsnr)
  if parameterization == "v":
    return x_from_v(z, output, logsnr)
  if parameterization == "both":
    x_out, eps_out = jnp.split(output, 2, axis=-1)
    alpha, sigma = _alpha_sigma_like(logsnr, z)
    # (1 − σ²)/α = α, so the ε-head's x̂ enters as α·(z − σ ε) without dividing by α.
    return sigma**2 * x_out + alpha * (z - sigma * eps_out)
  raise ValueError(f"parameterization: unknown {parameterization!r}; allowed: {PARAMETERIZATIONS}")


def output_channels(parameterization: str, channels: int) -> int:
  """Network output channels for a parameterisation: 2C for 'both', else C."""
  return 2 * channels if parameterization == "both" else channels


def loss_weight(logsnr, weighting: str):
  """ω(λ) for an x-space loss ω·‖x̂ − x‖²: 'constant' 1, 'snr' e^λ, 'truncated_snr' max(e^λ, 1),
  'snr_plus_one' 1 + e^λ (equal to plain v-MSE, since ‖v̂ − v‖² = (1 + e^λ)‖x̂ − x‖²). logsnr: [B]."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  if weighting == "constant":
    return jnp.ones_like(logsnr)
  if weighting == "snr":
    return jnp.exp(logsnr)
  if weighting == "truncated_snr":
    return jnp.exp(jnp.maximum(logsnr, 0.0))
  if weighting == "snr_plus_one":
    return 1.0 + jnp.exp(logsnr)
  raise ValueError(f"weighting: unknown {weighting!r}; allowed: {WEIGHTINGS}")


def cfg_mix(cond, uncond, w):
  """Classifier-free guidance: (1 + w)·cond − w·uncond, for x̂, ε̂ or v̂ alike.

  cond, uncond: [B, ...]; w: scalar or [B].
  """
  w = bcast_like(w, cond)
  return (1.0 + w) * cond - w * uncond


def w_from_guidance_scale(s):
  """Our w of a guidance scale s in the latent-diffusion / Stable Diffusion convention uncond + s·(cond − uncond)
  (s = 1: no guidance): the same mix is `cfg_mix` at w = s − 1."""
  return s - 1.0


def ddim_step(z_t, x_hat, logsnr_t, logsnr_s):
  """DDIM from t to s: z_s = α_s x̂ + (σ_s/σ_t)(z_t − α_t x̂). s < t samples, s > t encodes.

  z_t, x_hat: [B, ...]; logsnr_t, logsnr_s: [B] or scalars.
  """
  alpha_t, _ = _alpha_sigma_like(logsnr_t, z_t)
  alpha_s, _ = _alpha_sigma_like(logsnr_s, z_t)
  ratio = bcast_like(sigma_ratio(logsnr_s, logsnr_t), z_t)
  return alpha_s * x_hat + ratio * (z_t - alpha_t * x_hat)


def distillation_target(z_t, z_tpp, logsnr_t, logsnr_tpp):
  """The x̃ whose single DDIM step t → t'' lands on z_t'' (the teacher's multi-step result):

  x̃ = (z_t'' − (σ_t''/σ_t)·z_t) / (α_t'' − (σ_t''/σ_t)·α_t).
  """
  alpha_t, _ = _alpha_sigma_like(logsnr_t, z_t)
  alpha_tpp, _ = _alpha_sigma_like(logsnr_tpp, z_t)
  ratio = bcast_like(sigma_ratio(logsnr_tpp, logsnr_t), z_t)
  return (z_tpp - ratio * z_t) / (alpha_tpp - ratio * alpha_t)


def distillation_target_with_last_step(z_t, z_tpp, x_hat_last, logsnr_t, logsnr_tpp, is_last):
  """`distillation_target`, except where `is_last` ([B] bool: t'' is the data end, t'' = 0) the target is
  the teacher's own x̂ from its final evaluation (docs/design.md §6: there z_t'' ≈ x̂ and the closed form
  divides two nearly equal numbers)."""
  x_tilde = distillation_target(z_t, z_tpp, logsnr_t, logsnr_tpp)
  return jnp.where(bcast_like(is_last, z_t) > 0, x_hat_last, x_tilde)


def clip_x(x_hat, clip: bool):
  """Clip x̂ to [−1, 1] when sampling images (the DDIM step then uses ε̂ implied by the clipped x̂)."""
  return jnp.clip(x_hat, -1.0, 1.0) if clip else x_hat
