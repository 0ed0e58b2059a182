"""The pieces distillation losses are built of, each written once: the x-function convention, guidance draws,
classifier-free guidance as one batched call, the noised draws of diffusion training, two DDIM steps of a model
and the one-step target they define, and ω(λ)-weighted regression. Methods build their losses from these;
nothing here knows a method.

Models are seen through x-functions (the stages build them from the U-Net, `models.x_function`; tests from
the exact Gaussian mixture and tiny MLPs):

  x_fn(params, z [B, H, W, C], logsnr [B], labels [B] int32, w [B] float32, *, train=False, rng=None)
      -> x̂ [B, H, W, C]

An x-function always receives w; a model without a w-input (a plain CFG teacher) ignores it. The
unconditional pass uses `null_label` (= num_classes). `labels` may be any condition of `distill.conditions`
(an inpainting model's labels, mask and masked image): only its labels are ever dropped to the null class.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from distill import conditions, diffusion
from distill.schedules import LogSNRFn

# x_fn(params, z, logsnr, labels, w, *, train=False, rng=None) -> x̂; see the module docstring.
XFn = Callable[..., jnp.ndarray]
# loss_fn(params, frozen, batch, rng) -> (scalar loss, dict of scalar metrics): what a method hands the trainer
# (`train.Stage`). `frozen` holds what the loss reads but never trains (a teacher's parameters).
LossFn = Callable[..., tuple[jnp.ndarray, dict]]


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
              conditions.cond_and_null(labels, null_label), jnp.concatenate([w, w]), **kwargs)
  return both[:b], both[b:]


def cfg_x_fn(pair_x: XFn, null_label: int) -> XFn:
  """A classifier-free-guided model (conditional or unconditional by label; ignores w) as the x-function of
  its guided prediction (1 + w)·x̂_c − w·x̂_∅, both passes one call of 2B rows. train/rng reach that call, so
  a gradient through it reaches both heads."""
  def x_fn(params, z, logsnr, labels, w, **kwargs):
    return diffusion.cfg_mix(*cond_uncond(pair_x, params, z, logsnr, labels, w, null_label, **kwargs), w)
  return x_fn


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
    labels = conditions.drop_labels(labels, jax.random.uniform(k_drop, (x.shape[0],)) < p_uncond, null_label)
  return t, logsnr, eps, z, labels, k_dropout


def two_ddim_steps(x_fn: XFn, params, z_t, logsnrs, labels, w, x_hat_t=None):
  """Two DDIM steps of a model t → t' → t'' (either direction: sampling or encoding).

  z_t: [B, H, W, C]; logsnrs = (λ_t, λ_t', λ_t''), each [B]; labels: [B] int32; w: [B] float32 (what x_fn
  takes). x_hat_t: x̂(z_t) [B, H, W, C] when the caller already has it (one evaluation, of z_t'), else None
  (two evaluations, run as a `lax.scan` of length 2 so that a train step holds one copy of the network and
  compiles about twice as fast). Returns (z_t'', x̂(z_t), x̂(z_t')), each [B, H, W, C]. Differentiable as
  written; `two_step_distillation_target` detaches.
  """
  logsnr_t, logsnr_1, logsnr_2 = logsnrs
  if x_hat_t is not None:
    z_1 = diffusion.ddim_step(z_t, x_hat_t, logsnr_t, logsnr_1)
    x_hat_1 = x_fn(params, z_1, logsnr_1, labels, w)
    return diffusion.ddim_step(z_1, x_hat_1, logsnr_1, logsnr_2), x_hat_t, x_hat_1

  def step(z, lams):
    lam_from, lam_to = lams
    x_hat = x_fn(params, z, lam_from, labels, w)
    return diffusion.ddim_step(z, x_hat, lam_from, lam_to), x_hat

  z_2, x_hats = jax.lax.scan(step, z_t, (jnp.stack([logsnr_t, logsnr_1]), jnp.stack([logsnr_1, logsnr_2])))
  return z_2, x_hats[0], x_hats[1]


def two_step_distillation_target(x_fn: XFn, params, z_t, logsnrs, labels, w, *, is_last=None, x_hat_t=None):
  """The detached target of step distillation: the x̃ whose single DDIM step t → t'' lands where
  `two_ddim_steps` of x_fn lands, x̃ = (z_t'' − (σ_t''/σ_t) z_t) / (α_t'' − (σ_t''/σ_t) α_t)
  (`diffusion.distillation_target`); where is_last ([B] bool: t'' is the data end) it is the model's own
  x̂(z_t') instead (`diffusion.distillation_target_with_last_step`, docs/design.md §6). is_last None: no such rows.

  Arguments as `two_ddim_steps` (params and x_hat_t are detached first). Returns (x̃ [B, H, W, C],
  (z_t'', x̂(z_t), x̂(z_t'))), all stop-gradient.
  """
  params, x_hat_t = jax.lax.stop_gradient((params, x_hat_t))
  z_2, x_hat_t, x_hat_1 = two_ddim_steps(x_fn, params, z_t, logsnrs, labels, w, x_hat_t)
  logsnr_t, _, logsnr_2 = logsnrs
  if is_last is None:
    target = diffusion.distillation_target(z_t, z_2, logsnr_t, logsnr_2)
  else:
    target = diffusion.distillation_target_with_last_step(z_t, z_2, x_hat_1, logsnr_t, logsnr_2, is_last)
  return jax.lax.stop_gradient((target, (z_2, x_hat_t, x_hat_1)))


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
