"""Noise schedules as functions of continuous time t ∈ [0, 1] (t = 0 data, t = 1 noise).

Everything is driven by the log signal-to-noise ratio λ_t = log(α_t² / σ_t²) of a variance-preserving
process z_t = α_t x + σ_t ε, α_t² + σ_t² = 1 (docs/design.md §3). The EDM / variance-exploding view used by
SFD is the same process read as x_σ = z_t / α_t with σ_VE = σ_t / α_t = exp(-λ_t / 2).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

LogSNRFn = Callable[[jnp.ndarray], jnp.ndarray]

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0


def cosine_logsnr(t, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX):
  """Clipped cosine schedule in log-SNR form: λ(0) = logsnr_max, λ(1) = logsnr_min.

  t: any shape, in [0, 1]. Returns λ_t of the same shape.
  """
  b = math.atan(math.exp(-0.5 * logsnr_max))
  a = math.atan(math.exp(-0.5 * logsnr_min)) - b
  # The clip only removes float32 rounding of tan near π/2 (|error| ~1e-3 at t = 1).
  return jnp.clip(-2.0 * jnp.log(jnp.tan(a * jnp.asarray(t, jnp.float32) + b)), logsnr_min, logsnr_max)


def cosine_time(logsnr, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX):
  """Inverse of `cosine_logsnr`: the t ∈ [0, 1] at which the schedule reaches λ."""
  b = math.atan(math.exp(-0.5 * logsnr_max))
  a = math.atan(math.exp(-0.5 * logsnr_min)) - b
  return (jnp.arctan(jnp.exp(-0.5 * jnp.asarray(logsnr, jnp.float32))) - b) / a


def alpha_sigma(logsnr):
  """α = sqrt(sigmoid(λ)), σ = sqrt(sigmoid(-λ)); same shape as λ."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def sigma_ratio(logsnr_to, logsnr_from):
  """σ_to / σ_from computed stably: exp(0.5·(softplus(λ_from) − softplus(λ_to))) (docs/design.md §6).

  Uses log σ² = −softplus(λ), so no σ is ever formed near σ ≈ 0.
  """
  return jnp.exp(0.5 * (jnp.logaddexp(0.0, logsnr_from) - jnp.logaddexp(0.0, logsnr_to)))


# --- EDM / variance-exploding view ------------------------------------------------------------


def ve_sigma(logsnr):
  """σ_VE = σ/α = exp(−λ/2): the noise level of x_σ = z_t / α_t."""
  return jnp.exp(-0.5 * jnp.asarray(logsnr, jnp.float32))


def logsnr_from_ve_sigma(sigma):
  """λ = −2 log σ_VE."""
  return -2.0 * jnp.log(jnp.asarray(sigma, jnp.float32))


def edm_sigmas(num: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
  """EDM ρ-polynomial grid, decreasing from sigma_max to sigma_min (no trailing 0).

  σ_i = (σmax^(1/ρ) + i/(num−1)·(σmin^(1/ρ) − σmax^(1/ρ)))^ρ, i = 0..num−1. Returns [num] float32.
  """
  if num < 2:
    raise ValueError(f"edm_sigmas: num={num}, needs at least 2 points")
  i = np.arange(num, dtype=np.float64) / (num - 1)
  inv = sigma_max ** (1.0 / rho) + i * (sigma_min ** (1.0 / rho) - sigma_max ** (1.0 / rho))
  return jnp.asarray(inv**rho, jnp.float32)


# --- discrete linear-β (DDPM / latent-diffusion models) ----------------------------------------


def linear_beta_logsnrs(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                        scaled: bool = False) -> np.ndarray:
  """λ_i for i = 1..T of a discrete schedule with β linear in i (DDPM) or in √β (`scaled`, as in
  latent diffusion). ᾱ_i = Π_{j≤i}(1 − β_j), λ_i = log(ᾱ_i / (1 − ᾱ_i)). Returns [T] float64, decreasing.
  """
  if scaled:
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
  else:
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  alphas_cumprod = np.cumprod(1.0 - betas)
  return np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)


def linear_beta_logsnr_fn(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                          scaled: bool = False, logsnr_max: float = LOGSNR_MAX) -> LogSNRFn:
  """Continuous-time view of a discrete schedule: step i sits at t = i/T; λ is interpolated linearly
  in t between grid points, and t = 0 maps to `logsnr_max` (the clean end the discrete grid lacks)."""
  grid = np.concatenate([[logsnr_max], linear_beta_logsnrs(num_timesteps, beta_start, beta_end, scaled)])
  ts = jnp.linspace(0.0, 1.0, num_timesteps + 1)
  grid = jnp.asarray(grid, jnp.float32)

  def logsnr_fn(t):
    t = jnp.asarray(t, jnp.float32)
    return jnp.interp(t.reshape(-1), ts, grid).reshape(t.shape)

  return logsnr_fn


def linear_beta_time_fn(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                        scaled: bool = False, logsnr_max: float = LOGSNR_MAX) -> LogSNRFn:
  """The inverse of `linear_beta_logsnr_fn`: λ → t (linear in λ between grid points, as λ is linear in t there),
  clamped to [0, 1] outside the grid."""
  grid = np.concatenate([[logsnr_max], linear_beta_logsnrs(num_timesteps, beta_start, beta_end, scaled)])
  ts = jnp.linspace(0.0, 1.0, num_timesteps + 1)
  increasing = jnp.asarray(grid[::-1], jnp.float32)  # jnp.interp needs increasing abscissae

  def time_fn(logsnr):
    logsnr = jnp.asarray(logsnr, jnp.float32)
    return jnp.interp(logsnr.reshape(-1), increasing, ts[::-1]).reshape(logsnr.shape)

  return time_fn


def get_time_fn(name: str, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX) -> LogSNRFn:
  """λ → t, the inverse of `get_logsnr_fn(name, …)`: the time a network that takes t (Stable Diffusion's U-Net,
  as the timestep T·t − 1 of a discrete schedule) is given for log-SNR λ."""
  if name == "cosine":
    return lambda logsnr: cosine_time(logsnr, logsnr_min, logsnr_max)
  if name == "linear_beta":
    return linear_beta_time_fn(logsnr_max=logsnr_max)
  if name == "scaled_linear_beta":
    return linear_beta_time_fn(beta_start=0.00085, beta_end=0.012, scaled=True, logsnr_max=logsnr_max)
  raise ValueError(f"schedule: unknown name {name!r}; allowed: 'cosine', 'linear_beta', 'scaled_linear_beta'")


DISCRETE_SCHEDULES = {"linear_beta": 1000, "scaled_linear_beta": 1000}  # name -> its number of timesteps T


def get_logsnr_fn(name: str, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX) -> LogSNRFn:
  """The t → λ map a config names: 'cosine' | 'linear_beta' | 'scaled_linear_beta'."""
  if name == "cosine":
    return lambda t: cosine_logsnr(t, logsnr_min, logsnr_max)
  if name == "linear_beta":
    return linear_beta_logsnr_fn(logsnr_max=logsnr_max)
  if name == "scaled_linear_beta":
    return linear_beta_logsnr_fn(beta_start=0.00085, beta_end=0.012, scaled=True, logsnr_max=logsnr_max)
  raise ValueError(f"schedule: unknown name {name!r}; allowed: 'cosine', 'linear_beta', 'scaled_linear_beta'")
