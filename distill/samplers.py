"""Samplers over a uniform time grid, each a `lax.scan` over steps (DESIGN §3).

A sampler sees the network only through a `Denoiser`: z [B, ...], logsnr [B] → x̂ [B, ...], plus the
number of network evaluations one call costs (2 for classifier-free guidance, which batches the
conditional and unconditional passes into one call). Every sampler returns `Samples(x, nfe)` where
nfe counts network evaluations per sample: steps × evaluations per call.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from distill import diffusion
from distill.schedules import LogSNRFn, alpha_sigma


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """x̂(z, λ) with its evaluation cost. fn: (z [B, ...], logsnr [B]) → x̂ [B, ...]."""
  fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
  evals_per_call: int = 1

  def __call__(self, z, logsnr):
    return self.fn(z, logsnr)


class Samples(NamedTuple):
  x: jnp.ndarray  # [B, ...] final samples (x̂ of the last step)
  nfe: int        # network evaluations per sample


# model_fn(z [B,...], logsnr [B], labels [B] int, w [B] float | None) -> x̂ [B,...]
ModelFn = Callable[..., jnp.ndarray]


def conditional_denoiser(model_fn: ModelFn, labels, w=None) -> Denoiser:
  """One evaluation per call: the model at fixed labels (and guidance w, for w-conditioned students)."""
  return Denoiser(lambda z, logsnr: model_fn(z, logsnr, labels, w), evals_per_call=1)


def guided_denoiser(model_fn: ModelFn, labels, w, null_label: int) -> Denoiser:
  """Classifier-free guidance (1 + w)·x̂_c − w·x̂_∅ with both passes batched as one call of 2B rows.

  labels: [B] int; w: scalar or [B]; null_label: the class index meaning 'unconditional'.
  """
  def fn(z, logsnr):
    b = z.shape[0]
    both = model_fn(jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]),
                    jnp.concatenate([labels, jnp.full_like(labels, null_label)]), None)
    return diffusion.cfg_mix(both[:b], both[b:], w)
  return Denoiser(fn, evals_per_call=2)


def time_grid(num_steps: int, encode: bool = False):
  """Uniform grid [N+1]: 1 → 0 for sampling, 0 → 1 for encoding."""
  ts = jnp.linspace(1.0, 0.0, num_steps + 1)
  return ts[::-1] if encode else ts


def _per_example(value, z):
  return jnp.full((z.shape[0],), value, jnp.float32)


def ddim_sample(denoiser: Denoiser, z_init, logsnr_fn: LogSNRFn, num_steps: int, clip: bool = False) -> Samples:
  """Deterministic DDIM from t = 1 to 0 in `num_steps` uniform steps; returns the last step's x̂.

  z_init: [B, ...] ~ N(0, I) (times σ_1 ≈ 1). clip: clip x̂ to [−1, 1] at every step (images).
  """
  ts = time_grid(num_steps)

  def step(carry, i):
    z, _ = carry
    logsnr_t = _per_example(logsnr_fn(ts[i]), z)
    logsnr_s = _per_example(logsnr_fn(ts[i + 1]), z)
    x_hat = diffusion.clip_x(denoiser(z, logsnr_t), clip)
    return (diffusion.ddim_step(z, x_hat, logsnr_t, logsnr_s), x_hat), None

  (_, x_hat), _ = jax.lax.scan(step, (z_init, jnp.zeros_like(z_init)), jnp.arange(num_steps))
  return Samples(x_hat, num_steps * denoiser.evals_per_call)


def ddpm_sample(denoiser: Denoiser, z_init, logsnr_fn: LogSNRFn, num_steps: int, rng, clip: bool = False) -> Samples:
  """Ancestral sampling from the posterior q(z_s | z_t, x̂):

  mean = e^{λ_t−λ_s}(α_s/α_t) z_t + (1 − e^{λ_t−λ_s}) α_s x̂,  var = (1 − e^{λ_t−λ_s}) σ_s².
  The last step returns x̂ without noise.
  """
  ts = time_grid(num_steps)

  def step(carry, inputs):
    z, _ = carry
    i, key = inputs
    logsnr_t = _per_example(logsnr_fn(ts[i]), z)
    logsnr_s = _per_example(logsnr_fn(ts[i + 1]), z)
    x_hat = diffusion.clip_x(denoiser(z, logsnr_t), clip)
    alpha_t, _ = alpha_sigma(logsnr_t)
    alpha_s, sigma_s = alpha_sigma(logsnr_s)
    one_minus_ratio = -jnp.expm1(logsnr_t - logsnr_s)
    b = lambda a: diffusion._bcast(a, z)
    mean = b((1.0 - one_minus_ratio) * alpha_s / alpha_t) * z + b(one_minus_ratio * alpha_s) * x_hat
    std = b(jnp.sqrt(one_minus_ratio) * sigma_s)
    return (mean + std * jax.random.normal(key, z.shape, z.dtype), x_hat), None

  keys = jax.random.split(rng, num_steps)
  (_, x_hat), _ = jax.lax.scan(step, (z_init, jnp.zeros_like(z_init)), (jnp.arange(num_steps), keys))
  return Samples(x_hat, num_steps * denoiser.evals_per_call)


def ddim_encode(denoiser: Denoiser, x, logsnr_fn: LogSNRFn, num_steps: int) -> Samples:
  """Reverse DDIM: deterministic encoding of data x (taken as z_0) to z_1 in `num_steps` steps.

  x: [B, ...]; returns Samples(z_1, nfe). Decoding z_1 with `ddim_sample` at many steps returns x.
  """
  ts = time_grid(num_steps, encode=True)

  def step(z, i):
    logsnr_t = _per_example(logsnr_fn(ts[i]), z)
    logsnr_s = _per_example(logsnr_fn(ts[i + 1]), z)
    return diffusion.ddim_step(z, denoiser(z, logsnr_t), logsnr_t, logsnr_s), None

  z, _ = jax.lax.scan(step, x, jnp.arange(num_steps))
  return Samples(z, num_steps * denoiser.evals_per_call)


def stochastic_sample(denoiser: Denoiser, z_init, logsnr_fn: LogSNRFn, num_steps: int, rng,
                      clip: bool = False) -> Samples:
  """The distilled stochastic N-step sampler (guided-distillation paper, Eq. 4–7), one evaluation per step.

  At t > 1/N: a DDIM step of length 2/N to k = t − 2/N, then forward re-noising to s = t − 1/N:
  z_s = (α_s/α_k) z_k + σ_{s|k} ε with σ²_{s|k} = (1 − e^{λ_s − λ_k}) σ_s². At t = 1/N: a deterministic
  step to 0 (returns x̂). N evaluations in all.
  """
  n = num_steps

  def step(carry, inputs):
    z, _ = carry
    i, key = inputs  # evaluation i at t = 1 − i/N
    t = 1.0 - i / n
    logsnr_t = _per_example(logsnr_fn(t), z)
    logsnr_k = _per_example(logsnr_fn(jnp.maximum(t - 2.0 / n, 0.0)), z)
    logsnr_s = _per_example(logsnr_fn(t - 1.0 / n), z)
    x_hat = diffusion.clip_x(denoiser(z, logsnr_t), clip)
    z_k = diffusion.ddim_step(z, x_hat, logsnr_t, logsnr_k)
    alpha_k, _ = alpha_sigma(logsnr_k)
    alpha_s, sigma_s = alpha_sigma(logsnr_s)
    std = jnp.sqrt(-jnp.expm1(logsnr_s - logsnr_k)) * sigma_s
    b = lambda a: diffusion._bcast(a, z)
    z_s = b(alpha_s / alpha_k) * z_k + b(std) * jax.random.normal(key, z.shape, z.dtype)
    return (z_s, x_hat), None

  keys = jax.random.split(rng, n)
  # The scan covers evaluations at t = 1 .. 2/N; the last, at t = 1/N, is deterministic.
  (z, _), _ = jax.lax.scan(step, (z_init, jnp.zeros_like(z_init)), (jnp.arange(n - 1), keys[: n - 1]))
  logsnr_last = _per_example(logsnr_fn(1.0 / n), z)
  x_hat = diffusion.clip_x(denoiser(z, logsnr_last), clip)
  return Samples(x_hat, n * denoiser.evals_per_call)


SAMPLERS = ("ddim", "ddpm", "stochastic")
