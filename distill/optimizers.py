"""Optimizer recipes the methods share, each returning (optimizer, schedule), the schedule for logging. Cached
where equal settings should share one optimizer object, and with it one compiled train step."""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def adam_with_warmup(lr: float, warmup_steps: int, grad_clip: float, weight_decay: float = 0.0):
  """Adam at `lr` after a linear warm-up from 0, with global-norm gradient clipping; with weight_decay > 0,
  AdamW's decoupled decay (the update gains −lr·weight_decay·param, as flax.optim.Adam's `weight_decay` did
  in the progressive-distillation code).

  Returns (optimizer, schedule)."""
  schedule = optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps else optax.constant_schedule(lr)
  adam = optax.adamw(schedule, weight_decay=weight_decay) if weight_decay else optax.adam(schedule)
  return optax.chain(optax.clip_by_global_norm(grad_clip), adam), schedule


@functools.lru_cache(maxsize=8)
def annealed_adam(lr, num_updates, grad_clip, warmup_steps=0):
  """Adam with lr annealed linearly to 0 over the round, after a linear warm-up from 0 over its first
  `warmup_steps` updates when > 0 (the latent rounds of Meng et al. 2023, App. C). Cached: equal rounds share one
  compiled step."""
  schedule = optax.linear_schedule(lr, 0.0, num_updates)
  if warmup_steps:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps),
                                     optax.linear_schedule(lr, 0.0, max(num_updates - warmup_steps, 1))],
                                    [warmup_steps])
  return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(schedule)), schedule


def cosine_schedule(peak_lr: float, total_updates: int, *, final_fraction: float = 0.1,
                           warmup_steps: int = 0) -> optax.Schedule:
  """Cosine annealing from peak_lr to final_fraction·peak_lr over the whole run (§5: "gradually decreasing to
  10 % of the original learning rate over the duration of each distillation procedure"; Table 3's lr-end is
  lr-start/10). Appendix I mentions a warm-up without its length: warmup_steps (default 0) ramps from 0."""
  if warmup_steps:
    return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, total_updates,
                                              end_value=final_fraction * peak_lr)
  return optax.cosine_decay_schedule(peak_lr, total_updates, alpha=final_fraction)


@functools.lru_cache(maxsize=8)
def cosine_adam(lr: float, updates: int, final_fraction: float, warmup_steps: int, b1: float, b2: float,
                grad_clip: float):
  """Table 3's optimiser: global-norm clipping, Adam(b1, b2) on `cosine_schedule`. Cached, so
  stages with equal settings share it (and with it the compiled step). Returns (optimizer, schedule)."""
  schedule = cosine_schedule(lr, updates, final_fraction=final_fraction, warmup_steps=warmup_steps)
  return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(schedule, b1=b1, b2=b2)), schedule


class TenfoldDropState(NamedTuple):
  count: jax.Array  # int32 updates so far
  drop_at: jax.Array  # int32 update from which the learning rate is divided by 10


def _tenfold_drop_update(updates, state: TenfoldDropState, params=None):
  del params
  factor = jnp.where(state.count < state.drop_at, 1.0, 0.1)
  return (jax.tree.map(lambda u: factor * u, updates),
          TenfoldDropState(optax.safe_increment(state.count), state.drop_at))


def tenfold_drop(drop_at: int) -> optax.GradientTransformation:
  """× 1 before update `drop_at`, × 0.1 from it on. The step lives in the state, not in the update function,
  so students of different lengths compile to one program (the persistent compilation cache then serves the
  next student's step; a schedule constant would make each a new one)."""
  return optax.GradientTransformation(
      lambda params: TenfoldDropState(jnp.zeros((), jnp.int32), jnp.asarray(drop_at, jnp.int32)),
      _tenfold_drop_update)


@functools.lru_cache(maxsize=16)
def adam_tenfold_drop(lr: float, num_updates: int):
  """Adam (β 0.9, 0.999) at lr, divided by 10 halfway through num_updates (Table 6: the learning rate "divided
  by 10 halfway through training"); no clipping, no EMA. Returns (optimizer, schedule for logging); cached, so
  a rerun of the same student reuses its compiled step."""
  drop_at = max(1, num_updates // 2)
  optimizer = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999), tenfold_drop(drop_at), optax.scale(-lr))
  return optimizer, lambda step: lr * (1.0 if step < drop_at else 0.1)
