"""Classifier-free-guided teacher training: one network, conditional and unconditional jointly.

Each example's label is replaced by the null class with probability p_uncond (0.1 in the guidance
literature); the loss is the x-space ω(λ)·‖x̂ − x‖² with t ~ U[0, 1] (DESIGN §3).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from distill import diffusion, train
from distill.schedules import LogSNRFn


def noised_batch(batch, rng, logsnr_fn: LogSNRFn, p_uncond: float, null_label: int | None):
  """The draws of diffusion training, shared by every from-data loss: t ~ U[0, 1] [B], λ_t, ε, z_t = α x + σ ε,
  labels dropped to `null_label` with probability p_uncond, and a dropout key.

  batch: image [B, H, W, C], label [B]. Returns (t, logsnr, eps, z, labels, dropout_rng)."""
  x, labels = batch["image"], batch["label"]
  k_t, k_eps, k_drop, k_dropout = jax.random.split(rng, 4)
  t = jax.random.uniform(k_t, (x.shape[0],))
  logsnr = logsnr_fn(t)
  eps = jax.random.normal(k_eps, x.shape, x.dtype)
  z = diffusion.q_sample(x, eps, logsnr)
  if p_uncond > 0:
    labels = jnp.where(jax.random.uniform(k_drop, labels.shape) < p_uncond, null_label, labels)
  return t, logsnr, eps, z, labels, k_dropout


def teacher_loss(model, parameterization: str, weighting: str, p_uncond: float, logsnr_fn: LogSNRFn,
                 null_label: int) -> train.LossFn:
  """loss_fn(params, frozen, batch, rng) for CFG training (frozen unused). batch: image [B, H, W, C] in
  [−1, 1], label [B]."""

  def loss_fn(params, frozen, batch, rng):
    del frozen
    x = batch["image"]
    t, logsnr, eps, z, labels, k_dropout = noised_batch(batch, rng, logsnr_fn, p_uncond, null_label)
    out = model.apply({"params": params}, z, logsnr, labels, train=True, rngs={"dropout": k_dropout})
    x_hat = diffusion.x_from_output(out, z, logsnr, parameterization)
    per_example = jnp.mean((x_hat - x) ** 2, axis=tuple(range(1, x.ndim)))
    loss = jnp.mean(diffusion.loss_weight(logsnr, weighting) * per_example)
    return loss, {"x_mse": jnp.mean(per_example)}

  return loss_fn


def adam_with_warmup(lr: float, warmup_steps: int, grad_clip: float):
  """Adam at `lr` after a linear warm-up from 0, with global-norm gradient clipping.

  Returns (optimizer, schedule)."""
  schedule = optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps else optax.constant_schedule(lr)
  return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(schedule)), schedule
