"""Stage one of guided distillation (guided-distillation paper, Algorithm 1).

A single w-conditioned student x̂_η(z_t, w) learns to match the classifier-free-guided teacher
x̂^w_θ(z_t) = (1 + w)·x̂_c,θ(z_t) − w·x̂_θ(z_t) for every w in [w_min, w_max], so that sampling it costs one
network evaluation per step instead of two (DESIGN §3).

Models are seen through x-functions (the pipeline builds them from the U-Net; tests from the exact
Gaussian mixture and a tiny MLP):

  x_fn(params, z [B, H, W, C], logsnr [B], labels [B] int32, w [B] float32, *, train=False, rng=None)
      -> x̂ [B, H, W, C]

An x-function always receives w; a model without a w-input (a plain CFG teacher) ignores it. The
unconditional pass uses `null_label` (= num_classes).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from distill import diffusion, train
from distill.schedules import LogSNRFn

# x_fn(params, z, logsnr, labels, w, *, train=False, rng=None) -> x̂; see the module docstring.
XFn = Callable[..., jnp.ndarray]


def sample_w(rng, shape, w_min: float, w_max: float):
  """Guidance strengths w ~ U[w_min, w_max]: float32 array of `shape`. w_min == w_max gives exactly w_min
  everywhere (the single-w baseline)."""
  return jax.random.uniform(rng, shape, jnp.float32, minval=w_min, maxval=w_max)


def cond_uncond(x_fn: XFn, params, z, logsnr, labels, w, null_label: int, **kwargs):
  """(x̂_c, x̂_∅): the conditional and unconditional outputs of one network as ONE call of 2B rows.

  z: [B, H, W, C]; logsnr: [B]; labels: [B] int32; w: [B] float32 (given to both halves). kwargs
  (train, rng) go to the x-function. Returns two [B, H, W, C] arrays.
  """
  b = z.shape[0]
  both = x_fn(params, jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]),
              jnp.concatenate([labels, jnp.full_like(labels, null_label)]), jnp.concatenate([w, w]), **kwargs)
  return both[:b], both[b:]


def stage_one_target(teacher_x: XFn, teacher_params, z, logsnr, labels, w, null_label: int):
  """The guided teacher prediction (1 + w)·x̂_c(z) − w·x̂_∅(z), not differentiated.

  z: [B, H, W, C]; logsnr: [B]; labels: [B] int32; w: [B] float32. The conditional and unconditional
  passes are one teacher call of 2B rows (the cost CFG pays per step, batched). Returns [B, H, W, C].
  """
  cond, uncond = cond_uncond(teacher_x, teacher_params, z, logsnr, labels, w, null_label)
  return jax.lax.stop_gradient(diffusion.cfg_mix(cond, uncond, w))


def weighted_regression(x_hat, target, logsnr, weighting: str):
  """ω(λ)-weighted x-space regression shared by the distillation losses.

  x_hat, target: matching pytrees of [B, ...] arrays (one array, or several heads such as a conditional
  and an unconditional output, whose per-example errors add as ‖a‖² + ‖b‖² do in the paper);
  logsnr: [B]. Each head's error is a mean over its pixels. Returns (loss, {'x_mse': unweighted mean}).
  """
  def per_example(a, b):
    return jnp.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))

  err = sum(jax.tree.leaves(jax.tree.map(per_example, x_hat, target)))
  loss = jnp.mean(diffusion.loss_weight(logsnr, weighting) * err)
  return loss, {"x_mse": jnp.mean(err)}


def stage_one_loss(student_x: XFn, teacher_x: XFn, *, logsnr_fn: LogSNRFn, null_label: int, w_min: float,
                   w_max: float, weighting: str = "snr") -> train.LossFn:
  """loss_fn(params, frozen, batch, rng) of Algorithm 1; frozen = {'teacher': teacher_params}.

  t ~ U[0, 1], w ~ U[w_min, w_max] and ε per example; the student x̂_η(z_t, w) (train mode, with a dropout
  rng) regresses onto the frozen guided teacher with weight ω(λ_t). batch: image [B, H, W, C], label [B].
  """
  diffusion.loss_weight(0.0, weighting)  # fail at construction, not inside the first jitted step

  def loss_fn(params, frozen, batch, rng):
    x, labels = batch["image"], batch["label"]
    k_t, k_w, k_eps, k_dropout = jax.random.split(rng, 4)
    t = jax.random.uniform(k_t, (x.shape[0],))
    w = sample_w(k_w, (x.shape[0],), w_min, w_max)
    logsnr = logsnr_fn(t)
    z = diffusion.q_sample(x, jax.random.normal(k_eps, x.shape, x.dtype), logsnr)
    target = stage_one_target(teacher_x, frozen["teacher"], z, logsnr, labels, w, null_label)
    x_hat = student_x(params, z, logsnr, labels, w, train=True, rng=k_dropout)
    return weighted_regression(x_hat, target, logsnr, weighting)

  return loss_fn
