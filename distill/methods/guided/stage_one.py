"""Stage one of guided distillation (guided-distillation paper, Algorithm 1).

A single w-conditioned student x̂_η(z_t, w) learns to match the classifier-free-guided teacher
x̂^w_θ(z_t) = (1 + w)·x̂_c,θ(z_t) − w·x̂_θ(z_t) for every w in [w_min, w_max], so that sampling it costs one
network evaluation per step instead of two (docs/design.md §3).

Models are x-functions (`distill.losses`).
"""
from __future__ import annotations

import jax

from distill import diffusion
from distill.losses import LossFn, XFn, cond_uncond, sample_w, weighted_regression
from distill.schedules import LogSNRFn


def stage_one_target(teacher_x: XFn, teacher_params, z, logsnr, labels, w, null_label: int):
  """The guided teacher prediction (1 + w)·x̂_c(z) − w·x̂_∅(z), not differentiated.

  z: [B, H, W, C]; logsnr: [B]; labels: [B] int32; w: [B] float32. The conditional and unconditional
  passes are one teacher call of 2B rows (the cost CFG pays per step, batched). Returns [B, H, W, C].
  """
  cond, uncond = cond_uncond(teacher_x, teacher_params, z, logsnr, labels, w, null_label)
  return jax.lax.stop_gradient(diffusion.cfg_mix(cond, uncond, w))


def stage_one_loss(student_x: XFn, teacher_x: XFn, *, logsnr_fn: LogSNRFn, null_label: int, w_min: float,
                   w_max: float, weighting: str = "snr") -> LossFn:
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
