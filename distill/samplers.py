"""Samplers over a uniform time grid, each a `lax.fori_loop` over steps (docs/design.md §3).

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

from distill import conditions, diffusion
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

  labels: [B] int (or a `distill.conditions` condition); w: scalar or [B]; null_label: the class index meaning
  'unconditional'.
  """
  def guided(z, logsnr):
    b = z.shape[0]
    both = model_fn(jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]),
                    conditions.cond_and_null(labels, null_label), None)
    return diffusion.cfg_mix(both[:b], both[b:], w)

  def fn(z, logsnr):
    # At w = 0 for every row the mix is (1 + 0)·x̂_c − 0·x̂_∅ = x̂_c: the unconditional pass is skipped (one
    # branch runs; the result equals the mix up to the batch's rounding). NFE still counts both passes.
    return jax.lax.cond(jnp.all(jnp.asarray(w) == 0), lambda: model_fn(z, logsnr, labels, None),
                        lambda: guided(z, logsnr))
  return Denoiser(fn, evals_per_call=2)


def time_at(i, num_steps, encode: bool = False):
  """Time of grid point i on the uniform grid of `num_steps` steps: 1 − i/N (sampling) or i/N (encoding).

  i and num_steps may be traced integers, so one compiled sampler serves every step count."""
  frac = jnp.asarray(i, jnp.float32) / jnp.asarray(num_steps, jnp.float32)
  return frac if encode else 1.0 - frac


def _per_example(value, z):
  return jnp.full((z.shape[0],), value, jnp.float32)


def _nfe(num_steps, denoiser: Denoiser):
  return num_steps * denoiser.evals_per_call


# Every sampler loops with `lax.fori_loop`, so `num_steps` may be a Python int (the loop lowers to a scan)
# or a traced int32 scalar (a while loop): in the second case one compilation serves all step counts.


def ddim_sample(denoiser: Denoiser, z_init, logsnr_fn: LogSNRFn, num_steps, clip: bool = False) -> Samples:
  """Deterministic DDIM from t = 1 to 0 in `num_steps` uniform steps; returns the last step's x̂.

  z_init: [B, ...] ~ N(0, I) (times σ_1 ≈ 1). clip: clip x̂ to [−1, 1] at every step (images).
  """
  def step(i, carry):
    z, _ = carry
    logsnr_t = _per_example(logsnr_fn(time_at(i, num_steps)), z)
    logsnr_s = _per_example(logsnr_fn(time_at(i + 1, num_steps)), z)
    x_hat = diffusion.clip_x(denoiser(z, logsnr_t), clip)
    return diffusion.ddim_step(z, x_hat, logsnr_t, logsnr_s), x_hat

  _, x_hat = jax.lax.fori_loop(0, num_steps, step, (z_init, jnp.zeros_like(z_init)))
  return Samples(x_hat, _nfe(num_steps, denoiser))


def ddpm_sample(denoiser: Denoiser, z_init, logsnr_fn: LogSNRFn, num_steps, rng, clip: bool = False) -> Samples:
  """Ancestral sampling from the posterior q(z_s | z_t, x̂):

  mean = e^{λ_t−λ_s}(α_s/α_t) z_t + (1 − e^{λ_t−λ_s}) α_s x̂,  var = (1 − e^{λ_t−λ_s}) σ_s².
  The last step returns x̂ without noise. Step i draws its noise from fold_in(rng, i).
  """
  def step(i, carry):
    z, _ = carry
    logsnr_t = _per_example(logsnr_fn(time_at(i, num_steps)), z)
    logsnr_s = _per_example(logsnr_fn(time_at(i + 1, num_steps)), z)
    x_hat = diffusion.clip_x(denoiser(z, logsnr_t), clip)
    alpha_t, _ = alpha_sigma(logsnr_t)
    alpha_s, sigma_s = alpha_sigma(logsnr_s)
    one_minus_ratio = -jnp.expm1(logsnr_t - logsnr_s)
    b = lambda a: diffusion.bcast_like(a, z)
    mean = b((1.0 - one_minus_ratio) * alpha_s / alpha_t) * z + b(one_minus_ratio * alpha_s) * x_hat
    std = b(jnp.sqrt(one_minus_ratio) * sigma_s)
    return mean + std * jax.random.normal(jax.random.fold_in(rng, i), z.shape, z.dtype), x_hat

  _, x_hat = jax.lax.fori_loop(0, num_steps, step, (z_init, jnp.zeros_like(z_init)))
  return Samples(x_hat, _nfe(num_steps, denoiser))


def ddim_encode(denoiser: Denoiser, x, logsnr_fn: LogSNRFn, num_steps) -> Samples:
  """Reverse DDIM: deterministic encoding of data x (taken as z_0) to z_1 in `num_steps` steps.

  x: [B, ...]; returns Samples(z_1, nfe). Decoding z_1 with `ddim_sample` at many steps returns x.
  """
  def step(i, z):
    logsnr_t = _per_example(logsnr_fn(time_at(i, num_steps, encode=True)), z)
    logsnr_s = _per_example(logsnr_fn(time_at(i + 1, num_steps, encode=True)), z)
    return diffusion.ddim_step(z, denoiser(z, logsnr_t), logsnr_t, logsnr_s)

  z = jax.lax.fori_loop(0, num_steps, step, x)
  return Samples(z, _nfe(num_steps, denoiser))


def stochastic_sample(denoiser: Denoiser, z_init, logsnr_fn: LogSNRFn, num_steps, rng,
                      clip: bool = False) -> Samples:
  """The distilled stochastic N-step sampler (guided-distillation paper, Eq. 4–7), one evaluation per step.

  At t > 1/N: a DDIM step of length 2/N to k = t − 2/N, then forward re-noising to s = t − 1/N:
  z_s = (α_s/α_k) z_k + σ_{s|k} ε with σ²_{s|k} = (1 − e^{λ_s − λ_k}) σ_s². At t = 1/N: a deterministic
  step to 0 (returns x̂). N evaluations in all; evaluation i draws row r's noise from fold_in(k_r, i), k_r a
  key of rng and a hash of row r of z_init: a row's sample depends on its own z_init and rng only, not on
  the batch it is drawn in (its size, padding, the row's position, the device layout).
  """
  n = num_steps
  # An exact, order-free integer hash of each row's float32 bits (murmur3's finaliser of bits ⊕ position,
  # summed mod 2^32), twice with different constants: 64 bits per row.
  bits = jax.lax.bitcast_convert_type(z_init.reshape(z_init.shape[0], -1).astype(jnp.float32), jnp.uint32)
  position = jnp.arange(bits.shape[1], dtype=jnp.uint32)

  def row_hash(salt):
    h = bits ^ (position * jnp.uint32(0x9E3779B9) + jnp.uint32(salt))
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return jnp.sum(h ^ (h >> 16), axis=1, dtype=jnp.uint32)

  row_keys = jax.vmap(lambda a, b: jax.random.fold_in(jax.random.fold_in(rng, a), b))(row_hash(0x2545F491),
                                                                                     row_hash(0x6A09E667))

  def step(i, z):  # evaluation i at t = 1 − i/N
    t = time_at(i, n)
    logsnr_t = _per_example(logsnr_fn(t), z)
    logsnr_k = _per_example(logsnr_fn(jnp.maximum(time_at(i + 2, n), 0.0)), z)
    logsnr_s = _per_example(logsnr_fn(time_at(i + 1, n)), z)
    x_hat = diffusion.clip_x(denoiser(z, logsnr_t), clip)
    z_k = diffusion.ddim_step(z, x_hat, logsnr_t, logsnr_k)
    alpha_k, _ = alpha_sigma(logsnr_k)
    alpha_s, sigma_s = alpha_sigma(logsnr_s)
    std = jnp.sqrt(-jnp.expm1(logsnr_s - logsnr_k)) * sigma_s
    b = lambda a: diffusion.bcast_like(a, z)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), z.shape[1:], z.dtype))(row_keys)
    return b(alpha_s / alpha_k) * z_k + b(std) * noise

  # The loop covers evaluations at t = 1 .. 2/N; the last, at t = 1/N, is deterministic.
  z = jax.lax.fori_loop(0, n - 1, step, z_init)
  logsnr_last = _per_example(logsnr_fn(time_at(n - 1, n)), z)
  x_hat = diffusion.clip_x(denoiser(z, logsnr_last), clip)
  return Samples(x_hat, _nfe(n, denoiser))


SAMPLERS = ("ddim", "ddpm", "stochastic")
