"""Direct self-distillation (DSD) and its teacher-student twin (TSD): the self-distillation paper (seed 004).

DSD fine-tunes ONE model to do in N/2 steps what it currently does in N: no teacher copy, no data set. TSD is
the same procedure with a separate frozen teacher producing the trajectory and the targets (a data-free PD).
"Training DSD" adds the same self-distillation term to ordinary v-prediction training from data (Eq. 1).

Reading of the paper (Algorithm 2, §4.1, §4.1.1, §4.2, Appendix I–J, Table 3):

- A trajectory is the model's own deterministic DDIM sample of N_i uniform steps, z_1 ~ N(0, I) → z_0, on the
  integer grid k = N_i, …, 0 (t = k/N_i). At every second grid point k = N_i, N_i − 2, …, 2 — the positions
  j = 0 … N_i/2 − 1, k = N_i − 2j — the model takes two DDIM steps k → k − 1 → k − 2 (stop-gradient) and the
  trajectory continues from z_{k−2}. Each position is ONE parameter update (Alg. 2 writes θ ← θ − γ∇L inside
  the loop over t; §4.1.1: "we update once for every two sampling steps"): all positions in order, none drawn
  at random, N_i/2 updates per trajectory. Alg. 2 is written for one trajectory at a time and the paper states
  no batch size; here a batch holds B trajectories at the same position (`dsd.batch_size`, ours).
- Loss at a position: x′ = (z_t' − (σ_t'/σ_t) z_t)/(α_t' − (σ_t'/σ_t) α_t), which is exactly x̂_θ(z_t) (with
  gradient), against the detached two-step target x″ = `diffusion.distillation_target(z_t, z_t'', …)`, weighted
  by truncated SNR max(e^λ_t, 1): L = ω(λ_t)·‖x′ − x″‖². The student's step is 2/N_i long, the teacher's 1/N_i.
  At the last position (t'' = 0) x″ is the model's x̂(z_t') (docs/design.md §6), which is where the closed form tends.
- Guided models: w ~ U[w_min, w_max] once per trajectory (§5's guidance scale s ∈ [1, 3] is w = s − 1 ∈ [0, 2]
  in our convention: `diffusion.w_from_guidance_scale`). A CFG model's "model" is its guided x̂^w =
  (1 + w) x̂_c − w x̂_∅ (`losses.cfg_x_fn`, one 2B-row call); a w-conditioned student takes w directly.
- Two network evaluations per update (x̂(z_t) is shared by x′ and the target's first step), as §6 notes.

What differs from a literal Alg. 2 and why: the trainer's batches are a pure function of the step and its
state is only (params, optimizer, EMA), so the loss cannot carry z_{t''} from one update to the next. Instead
`fine_tuning_loss` replays the trajectory prefix (2j stop-gradient DDIM steps from the trajectory's stored noise)
with the CURRENT parameters. Alg. 2 built that prefix with the parameters of the previous ≤ N_i/2 − 1 updates;
with Table 3's learning rates (1e-6 to 1e-8) the two differ by that drift only. The price is 2j extra forward
evaluations per update (about N_i/2 on average). TSD's trajectory is the frozen teacher's, so its replay is
exact. A trainer that carries the trajectory can call `position_loss` (which returns z_{t''}) and skip replay.

Schedules (§4.1.1, Appendix J): see `depth_schedule`. Learning rate: cosine annealing to 10 % over the whole
run (§5), `optimizers.cosine_schedule`; Table 3 in `PAPER_HYPERPARAMETERS`.

Models are x-functions as in `distill.methods.guided`:
  x_fn(params, z [B, H, W, C], logsnr [B], labels [B] int32, w [B] float32, *, train=False, rng=None) -> x̂.
"""
from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill import diffusion, optimizers
from distill.losses import LossFn, XFn, noised_batch, two_step_distillation_target, weighted_regression
from distill.schedules import LogSNRFn

# Table 3 (fine-tuning DSD/TSD, identical for every schedule) and §5. Grad clip "0-1": global norm 1. §5's
# sentence gives 4000 updates to the conditional and 5000 to the unconditional models; Table 3 and Table 2's
# "(5K)"/"(4K)" say the opposite, and are followed here. w_range: the guidance range of the conditional model.
PAPER_HYPERPARAMETERS = {
    "imagenet256": {"params_millions": 400.92, "updates": 5000, "lr_start": 1e-7, "lr_end": 1e-8,
                    "adam_b1": 0.99, "adam_b2": 0.999, "ema_decay": 0.9995, "grad_clip": 1.0,
                    "start_steps": 64, "w_range": (1.0, 3.0)},
    "celeba_hq256": {"params_millions": 274.06, "updates": 4000, "lr_start": 1e-6, "lr_end": 1e-7,
                     "adam_b1": 0.9, "adam_b2": 0.98, "ema_decay": 0.995, "grad_clip": 1.0, "start_steps": 64},
    "lsun_bedroom": {"params_millions": 274.06, "updates": 4000, "lr_start": 1e-6, "lr_end": 1e-7,
                     "adam_b1": 0.9, "adam_b2": 0.98, "ema_decay": 0.995, "grad_clip": 1.0, "start_steps": 64},
}

# Training DSD (§5.2): 64x64 v-prediction models from scratch, L = α·L_v + β·L_distill.
TRAINING_HYPERPARAMETERS = {
    "celeba64": {"updates": 65000, "lr": 1e-4, "alpha": 0.85, "beta": 0.15},
    "lsun_bedroom64": {"updates": 50000, "lr": 4e-4, "alpha": 0.85, "beta": 0.15},
    "lsun_church64": {"updates": 40000, "lr": 4e-4, "alpha": 0.85, "beta": 0.15},
}

SCHEDULE_KINDS = ("DSDN", "DSDI", "DSDGL", "DSDGEXP")


# --- models ------------------------------------------------------------------------------------------


# --- one position of a trajectory --------------------------------------------------------------------


def position_times(position, num_steps):
  """Times of position j ∈ {0 … N/2 − 1} of an N-step trajectory: grid point k = N − 2j, t = k/N, t' = t − 1/N,
  t'' = t − 2/N (exactly 0 at the last position). position, num_steps: [B] int (or scalars); three [B] float32."""
  n = jnp.asarray(num_steps, jnp.float32)
  k = n - 2.0 * jnp.asarray(position, jnp.float32)
  return k / n, (k - 1.0) / n, jnp.maximum(k - 2.0, 0.0) / n


def two_step_target(x_fn: XFn, params, z_t, x_hat_t, position, num_steps, labels, w, logsnr_fn: LogSNRFn):
  """Alg. 2's detached target: two DDIM steps t → t' → t'' of x_fn (the first with the given x̂(z_t)), then
  x″ = distillation_target(z_t, z_t''), or x̂(z_t') at the last position (t'' = 0).

  z_t, x_hat_t: [B, H, W, C]; position, num_steps: [B] int32; labels [B]; w [B]. Returns (x″, z_t''), both
  [B, H, W, C] and not differentiated; z_t'' is where the trajectory continues."""
  t, t_1, t_2 = position_times(position, num_steps)
  logsnrs = (logsnr_fn(t), logsnr_fn(t_1), logsnr_fn(t_2))
  target, (z_2, _, _) = two_step_distillation_target(x_fn, params, z_t, logsnrs, labels, w, is_last=t_2 == 0.0,
                                                     x_hat_t=x_hat_t)
  return target, z_2


def position_loss(model_x: XFn, params, z_t, position, num_steps, labels, w, *, logsnr_fn: LogSNRFn,
                  weighting: str = "truncated_snr", teacher_x: XFn | None = None, teacher_params=None, rng=None):
  """One parameter update of Alg. 2 at a trajectory position, given the trajectory state z_t.

  x′ = x̂_θ(z_t) in train mode (dropout rng `rng`) carries the gradient; the target x″ comes from two
  stop-gradient DDIM steps of the model itself (DSD; its first step reuses x′, detached) or of
  `teacher_x(teacher_params, …)` (TSD). Loss ω(λ_t)·mean‖x′ − x″‖² (`guided.weighted_regression`).

  z_t: [B, H, W, C]; position, num_steps: [B] int32 (N even, 0 ≤ j < N/2); labels [B] int32; w [B] float32.
  Returns (loss, metrics, z_t''), z_t'' [B, H, W, C] detached: the next position's z_t.
  """
  t, _, _ = position_times(position, num_steps)
  logsnr_t = logsnr_fn(t)
  x_prime = model_x(params, z_t, logsnr_t, labels, w, train=True, rng=rng)
  if teacher_x is None:
    target_x, target_params, x_hat_t = model_x, params, x_prime
  else:
    target_x, target_params = teacher_x, teacher_params
    x_hat_t = teacher_x(teacher_params, z_t, logsnr_t, labels, w)
  target, z_next = two_step_target(target_x, target_params, z_t, x_hat_t, position, num_steps, labels, w,
                                   logsnr_fn)
  loss, metrics = weighted_regression(x_prime, target, logsnr_t, weighting)
  return loss, metrics, z_next


def replay_trajectory(x_fn: XFn, params, noise, position, num_steps, labels, w, logsnr_fn: LogSNRFn):
  """The trajectory state at a position: 2j DDIM steps of length 1/N from z_1 = noise, not differentiated.

  noise: [B, H, W, C]; position, num_steps: [B] int32 (rows may differ: each stops at its own 2j steps);
  labels [B]; w [B]. Returns z_t [B, H, W, C] at t = (N − 2j)/N. A `fori_loop` up to max(2j) steps, each one
  evaluation of the whole batch."""
  params = jax.lax.stop_gradient(params)
  n = jnp.asarray(num_steps, jnp.float32)
  todo = 2 * jnp.asarray(position, jnp.int32)

  def step(s, z):
    # Rows already at their position still evaluate (at clipped, valid times) but keep their z.
    t = jnp.clip((n - s) / n, 0.0, 1.0)
    t_next = jnp.clip((n - s - 1.0) / n, 0.0, 1.0)
    logsnr_t, logsnr_next = logsnr_fn(t), logsnr_fn(t_next)
    z_next = diffusion.ddim_step(z, x_fn(params, z, logsnr_t, labels, w), logsnr_t, logsnr_next)
    keep = (s < todo).reshape((-1,) + (1,) * (z.ndim - 1))
    return jnp.where(keep, z_next, z)

  return jax.lax.stop_gradient(jax.lax.fori_loop(0, jnp.max(todo), step, jnp.asarray(noise, jnp.float32)))


# --- fine-tuning losses (Alg. 2) ------------------------------------------------------------------------


def _trajectory_loss(model_x: XFn, teacher_x: XFn | None, logsnr_fn: LogSNRFn, weighting: str) -> LossFn:
  diffusion.loss_weight(0.0, weighting)  # fail at construction, not inside the first jitted step

  def loss_fn(params, frozen, batch, rng):
    labels, w = batch["label"], jnp.asarray(batch["w"], jnp.float32)
    b = w.shape[0]
    position = jnp.broadcast_to(jnp.asarray(batch["position"], jnp.int32), (b,))
    num_steps = jnp.broadcast_to(jnp.asarray(batch["num_steps"], jnp.int32), (b,))
    teacher_params = None if teacher_x is None else frozen["teacher"]
    z_t = replay_trajectory(model_x if teacher_x is None else teacher_x,
                            params if teacher_x is None else teacher_params,
                            batch["noise"], position, num_steps, labels, w, logsnr_fn)
    loss, metrics, _ = position_loss(model_x, params, z_t, position, num_steps, labels, w, logsnr_fn=logsnr_fn,
                                     weighting=weighting, teacher_x=teacher_x, teacher_params=teacher_params,
                                     rng=rng)
    return loss, metrics

  return loss_fn


def fine_tuning_loss(model_x: XFn, *, logsnr_fn: LogSNRFn, weighting: str = "truncated_snr") -> LossFn:
  """DSD, Alg. 2: loss_fn(params, frozen, batch, rng); frozen unused (None or {}).

  batch (one trajectory per row, see `trajectory_batch`): noise [B, H, W, C] (its z_1), label [B] int32,
  w [B] float32, num_steps [B] or scalar int32 (N_i, even), position [B] or scalar int32 (j < N_i/2). The loss
  replays the model's own trajectory to position j (stop-gradient) and returns `position_loss` there; rng is
  the dropout rng of the one evaluation with gradient."""
  return _trajectory_loss(model_x, None, logsnr_fn, weighting)


def teacher_student_loss(student_x: XFn, teacher_x: XFn, *, logsnr_fn: LogSNRFn,
                         weighting: str = "truncated_snr") -> LossFn:
  """TSD: Alg. 2 with the frozen teacher frozen['teacher'] sampling the trajectory and giving the two-step
  targets; the student (initialised from the teacher) learns its 2/N_i step. batch as in `fine_tuning_loss`."""
  return _trajectory_loss(student_x, teacher_x, logsnr_fn, weighting)


# --- training DSD (§4.2, Eq. 1) ------------------------------------------------------------------------


def training_loss(v_fn, *, logsnr_fn: LogSNRFn, distill_steps: int, alpha: float = 0.85, beta: float = 0.15,
                  weighting: str = "truncated_snr", p_uncond: float = 0.0, null_label: int | None = None
                  ) -> LossFn:
  """Eq. 1, L = α·mean‖v̂_t − v_t‖² + β·L_distill, for training a v-prediction model from data.

  v_fn(params, z, logsnr, labels, *, train=False, rng=None) -> v̂ [B, H, W, C] (the raw network output).
  batch: image [B, H, W, C], label [B]; frozen unused. t, ε and label dropout (p_uncond → null_label) are drawn
  as `teacher.teacher_loss` draws them (rng split in 4: t, ε, label drop, dropout), so β = 0 is plain v-MSE
  training. L_distill shares the forward pass (§4.2): x′ = α_t z_t − σ_t v̂ is the same v̂ with gradient; x″
  takes two stop-gradient DDIM steps t → t − 1/N → t − 2/N (N = distill_steps; the first step uses x′,
  detached, so one more evaluation) and L_distill = mean over the batch of ω(λ_t)‖x′ − x″‖², rows with
  t < 2/N counting 0 (no room for two steps). The paper gives no step length for training DSD and prints Eq. 1
  without a weight; ω defaults to Alg. 2's truncated SNR ('constant' is the literal Eq. 1).
  Metrics: v_mse, distill, x_mse (unweighted distillation error).
  """
  diffusion.loss_weight(0.0, weighting)
  if p_uncond > 0 and null_label is None:
    raise ValueError("training_loss: p_uncond > 0 needs null_label")
  h = 1.0 / distill_steps

  def x_fn(params, z, logsnr, labels, w):  # the model as an x-function (no w input) for the target's step
    del w
    return diffusion.x_from_v(z, v_fn(params, z, logsnr, labels), logsnr)

  def loss_fn(params, frozen, batch, rng):
    del frozen
    x = batch["image"]
    t, logsnr, eps, z, labels, k_dropout = noised_batch(batch, rng, logsnr_fn, p_uncond, null_label)
    v_hat = v_fn(params, z, logsnr, labels, train=True, rng=k_dropout)
    v_mse = jnp.mean((v_hat - diffusion.v_from_x_eps(x, eps, logsnr)) ** 2)

    x_prime = diffusion.x_from_v(z, v_hat, logsnr)
    t_1, t_2 = jnp.maximum(t - h, 0.0), jnp.maximum(t - 2 * h, 0.0)
    # Where t'' clips to 0 the closed form may divide by ~0; those rows take x̂(z_t') and are masked below.
    target, _ = two_step_distillation_target(x_fn, params, z, (logsnr, logsnr_fn(t_1), logsnr_fn(t_2)), labels,
                                             None, is_last=t_2 == 0.0, x_hat_t=x_prime)
    err = jnp.mean((x_prime - target) ** 2, axis=tuple(range(1, x.ndim)))
    active = t >= 2 * h
    distill = jnp.mean(jnp.where(active, diffusion.loss_weight(logsnr, weighting) * err, 0.0))
    loss = alpha * v_mse + beta * distill
    return loss, {"v_mse": v_mse, "distill": distill,
                  "x_mse": jnp.sum(jnp.where(active, err, 0.0)) / jnp.maximum(jnp.sum(active), 1)}

  return loss_fn


# --- schedules of N (§4.1.1, Appendix J) -----------------------------------------------------------------


def _nearest(u) -> int:
  """Round half up (U_i counts trajectories; the paper does not say how it rounds)."""
  return int(math.floor(u + Fraction(1, 2) if isinstance(u, Fraction) else u + 0.5))


def depth_schedule(kind: str, start_steps: int, total_updates: int, end_steps: int | None = None
                   ) -> list[tuple[int, int]]:
  """The depths of a DSD run: [(N_i, U_i)], N_i the DDIM steps of the trajectories sampled at depth i (even;
  the model learns N_i/2-step sampling there), U_i how many trajectories are sampled at it. P = total_updates.

  DSDN    one depth, N constant: [(N, P/N)] (the DSDI formula with |N| = 1).
  DSDI    N_{i+1} = N_i/2 (as PD),  U_i = P/|N| · 1/N_i   (|N| = number of depths).
  DSDGL   N_{i+1} = N_i − 2,        U_i = P/|N| · 1/N_i.
  DSDGEXP N_{i+1} = N_i − 2, depth i's share of P exponential (Eq. 2):
          P_i = P · e^{1/S_{n+1−i}} / Σ_j e^{1/S_j},  S = (1, 2, 4, 6, …) (its first n = |N| terms),
          U_i = P_i/N_i.
  Eq. 2 is printed garbled, e^{(S^{-1})_{n−1}} / Σ_j e^{S_j}; read here as S^{-1} = elementwise 1/S, index
  n + 1 − i, and the same exponent in the denominator, so that the shares sum to 1 and grow as N falls, which
  is what Appendix J says DSDGEXP is for ("increase the number of parameter updates as the model distills
  towards fewer DDIM steps"); P_i/N_i applies DSDI's rule (U_i = share/N_i) to that share. A literal e^{S_j}
  denominator (e^62 at N = 64) would make every U_i 0.

  Updates: Alg. 2 updates once per position, N_i/2 times per trajectory, so depth i makes U_i·N_i/2 updates
  (`updates_per_depth`), equal across depths for DSDI/DSDGL — and ≈ P/2 in all, not P: the printed formula
  and §5's "P total parameter updates" disagree by 2. We take §5's count as the intended one and pass 2P for P
  updates (a reading: the paper does not say which of the two its runs followed).
  U_i is rounded half up; a depth whose U_i rounds to 0 is listed and makes no update.

  end_steps: the last N (default 2, one position per trajectory: one-step sampling); DSDN takes none (or N).
  """
  if kind not in SCHEDULE_KINDS:
    raise ValueError(f"depth_schedule: unknown kind {kind!r}; allowed: {SCHEDULE_KINDS}")
  if kind == "DSDN":
    end_steps = start_steps if end_steps is None else end_steps
  end_steps = 2 if end_steps is None else end_steps
  ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (start_steps, end_steps, total_updates))
  ok = ok and start_steps >= end_steps >= 2 and start_steps % 2 == 0 and end_steps % 2 == 0 and total_updates > 0
  if kind == "DSDN":
    ok = ok and end_steps == start_steps
  if kind == "DSDI":
    ratio = start_steps // end_steps if ok else 0
    ok = ok and start_steps % end_steps == 0 and ratio & (ratio - 1) == 0
  if not ok:
    raise ValueError(f"depth_schedule({kind!r}): start_steps={start_steps!r}, end_steps={end_steps!r}, "
                     f"total_updates={total_updates!r}; need even step counts start >= end >= 2, a power-of-two "
                     "ratio for DSDI, end == start for DSDN, and total_updates > 0")

  if kind == "DSDN":
    steps = [start_steps]
  elif kind == "DSDI":
    steps = [start_steps]
    while steps[-1] > end_steps:
      steps.append(steps[-1] // 2)
  else:
    steps = list(range(start_steps, end_steps - 1, -2))
  n = len(steps)
  if kind == "DSDGEXP":
    s = [1] + [2 * j for j in range(1, n)]                     # S_1 … S_n = 1, 2, 4, 6, …
    weights = [math.exp(1.0 / s[n - 1 - i]) for i in range(n)]  # depth i (0-based) ↔ S_{n−i} (1-based)
    shares = [total_updates * wt / sum(weights) for wt in weights]
  else:
    shares = [Fraction(total_updates, n)] * n
  return [(steps_i, _nearest(share / steps_i)) for steps_i, share in zip(steps, shares)]


def updates_per_depth(plan: list[tuple[int, int]]) -> list[int]:
  """U_i·N_i/2: the parameter updates each depth makes (one per position of each trajectory)."""
  return [u * n // 2 for n, u in plan]


def update_position(plan: list[tuple[int, int]], update: int) -> tuple[int, int, int]:
  """(N_i, trajectory, position j) of parameter update `update` (0-based) in a run following `plan`:
  depths in order, each trajectory's N_i/2 positions in order; `trajectory` counts from the run's start."""
  first_trajectory = 0
  for n, u in plan:
    per_trajectory = n // 2
    if update < u * per_trajectory:
      return n, first_trajectory + update // per_trajectory, update % per_trajectory
    update -= u * per_trajectory
    first_trajectory += u
  raise ValueError(f"update_position: update beyond the plan's {sum(updates_per_depth(plan))} updates")


def trajectory_batch(plan: list[tuple[int, int]], update: int, *, batch_size: int, shape, num_classes: int,
                     w_min: float, w_max: float, seed: int) -> dict:
  """The host batch of update `update`: `batch_size` trajectories at position j of depth N_i. A trajectory's
  noise [B, *shape], labels U{0 … num_classes − 1} and w ~ U[w_min, w_max] are drawn from (seed, trajectory),
  so all N_i/2 updates of one trajectory see the same rows; a pure function of `update` (the trainer's step).
  Returns numpy: noise float32, label int32, w float32, num_steps int32 [B], position int32 [B]."""
  n, trajectory, position = update_position(plan, update)
  rng = np.random.default_rng([seed, trajectory])
  return {"noise": rng.standard_normal((batch_size,) + tuple(shape)).astype(np.float32),
          "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
          "w": rng.uniform(w_min, w_max, batch_size).astype(np.float32),
          "num_steps": np.full((batch_size,), n, np.int32),
          "position": np.full((batch_size,), position, np.int32)}


# --- optimisation (§5, Table 3) -------------------------------------------------------------------------


def paper_optimizer(name: str, total_updates: int | None = None):
  """Table 3's optimiser for `name` in PAPER_HYPERPARAMETERS: global-norm clipping, then Adam(β1, β2) on the
  cosine schedule lr_start → lr_end over total_updates (default the table's). Returns (optimizer, schedule);
  the EMA decay for the trainer is PAPER_HYPERPARAMETERS[name]['ema_decay']."""
  hp = PAPER_HYPERPARAMETERS[name]
  schedule = optimizers.cosine_schedule(hp["lr_start"], total_updates or hp["updates"],
                                    final_fraction=hp["lr_end"] / hp["lr_start"])
  optimizer = optax.chain(optax.clip_by_global_norm(hp["grad_clip"]),
                          optax.adam(schedule, b1=hp["adam_b1"], b2=hp["adam_b2"]))
  return optimizer, schedule
