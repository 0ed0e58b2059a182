"""Stage two of guided distillation: progressive rounds that halve the student's step count.

In a round the student takes N steps on the uniform grid t = i/N; each of its DDIM steps is taught to land
where two steps of the frozen teacher (the previous round's student) land (guided-distillation paper,
Algorithms 2–5; docs/design.md §3, §6):

  deterministic_round_loss   Alg. 2: t → t − 0.5/N → t − 1/N          (N-step DDIM student)
  stochastic_round_loss      Alg. 3: t → t − 1/N → t − 2/N            (N-step stochastic sampler)
  encoder_round_loss         Alg. 4: t → t + 0.5/N → t + 1/N          (N-step reverse-DDIM encoder)
  two_student_round_loss     Alg. 5: the naive baseline, a conditional + unconditional pair per model

Models are x-functions (see `distill.losses`). Every loss reads the teacher from
frozen['teacher'] and N from frozen['num_steps'] (an int32 scalar): N is traced, so one compiled train step
serves every round. `round_plan` lists the N of successive rounds.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from distill import conditions, diffusion, samplers
from distill.losses import LossFn, XFn, cond_uncond, sample_w, two_step_distillation_target, weighted_regression
from distill.schedules import LogSNRFn


# --- targets -----------------------------------------------------------------------------------------
# Shared arguments: z_t: [B, H, W, C]; i: [B] int32 step index; num_steps: N, int or int32 scalar;
# labels: [B] int32; w: [B] float32. Each returns x̃ [B, H, W, C] with a single DDIM step of the student
# from z_t reproducing the teacher's move. None differentiates through the teacher.


def round_times(i, num_steps, offsets):
  """t = i/N and t + o/N for each offset o, clamped to [0, 1] (the clamp only matters for the branch
  `stochastic_target` computes and discards at i = 1, which would otherwise reach t < 0). [B] each."""
  n = jnp.asarray(num_steps, jnp.float32)
  t = jnp.asarray(i, jnp.float32) / n
  return (t,) + tuple(jnp.clip(t + o / n, 0.0, 1.0) for o in offsets)


def _teacher_target(teacher_x: XFn, teacher_params, z_t, i, num_steps, offsets, labels, w, logsnr_fn: LogSNRFn,
                    is_last=None):
  """`losses.two_step_distillation_target` of the teacher's two steps t = i/N → t + o'/N → t + o''/N,
  offsets = (o', o''). Returns (x̃, (z_t'', x̂(z_t), x̂(z_t')))."""
  logsnrs = tuple(logsnr_fn(s) for s in round_times(i, num_steps, offsets))
  return two_step_distillation_target(teacher_x, teacher_params, z_t, logsnrs, labels, w, is_last=is_last)


def deterministic_target(teacher_x: XFn, teacher_params, z_t, i, num_steps, labels, w, logsnr_fn: LogSNRFn):
  """Algorithm 2, i ∈ {1..N}: the teacher's two steps t = i/N → t − 0.5/N → t − 1/N. At i = 1 (t'' = 0) the
  target is the teacher's second x̂, at t' = 0.5/N (docs/design.md §6)."""
  target, _ = _teacher_target(teacher_x, teacher_params, z_t, i, num_steps, (-0.5, -1.0), labels, w, logsnr_fn,
                              is_last=i == 1)
  return target


def stochastic_target(teacher_x: XFn, teacher_params, z_t, i, num_steps, labels, w, logsnr_fn: LogSNRFn):
  """Algorithm 3, i ∈ {1..N}: for i ≥ 2 the teacher's two steps t → t − 1/N → t − 2/N, the student's step
  being 2/N long as in the stochastic sampler (at i = 2, t'' = 0: the teacher's second x̂, at 1/N); at i = 1
  the teacher's single step to 0, whose one-step target is just the teacher's x̂(z_t)."""
  i = jnp.asarray(i)
  # Both branches are computed and one selected, so N can stay traced; at i = 1 the second evaluation
  # (from t' = 0 to t'' = 0, a no-op step) is wasted.
  two_step, (_, x_hat_t, _) = _teacher_target(teacher_x, teacher_params, z_t, i, num_steps, (-1.0, -2.0), labels,
                                              w, logsnr_fn, is_last=i == 2)
  first = (i == 1).reshape(i.shape + (1,) * (z_t.ndim - 1))
  return jnp.where(first, x_hat_t, two_step)


def encoder_target(teacher_x: XFn, teacher_params, z_t, i, num_steps, labels, w, logsnr_fn: LogSNRFn):
  """Algorithm 4, i ∈ {0..N−1}: the teacher's two reversed DDIM steps t → t + 0.5/N → t + 1/N. No last-step
  rule: t'' ≥ 1/N is never the data end. (At i = 0, z_t = z_0 ≈ x.)"""
  target, _ = _teacher_target(teacher_x, teacher_params, z_t, i, num_steps, (0.5, 1.0), labels, w, logsnr_fn)
  return target


def two_student_target(teacher_x: XFn, teacher_params, z_t, i, num_steps, labels, w, logsnr_fn: LogSNRFn,
                       null_label: int):
  """Algorithm 5, i ∈ {1..N}, for a teacher that is a (conditional, unconditional) pair of one network.

  The first step t → t − 0.5/N follows the guided x̂^w = (1 + w)·x̂_c − w·x̂_∅; the second, from that shared
  z_t', is taken twice — with x̂_c alone and with x̂_∅ alone — giving the targets (x̃_c, x̃_∅). At i = 1 they
  are the teacher's x̂_c(z_t') and x̂_∅(z_t') (last-step rule, as in Alg. 2). Each teacher evaluation is one
  call of 2B rows. Returns (x̃_c, x̃_∅), each [B, H, W, C]; their guided mix is Alg. 2's target for the
  teacher's guided two steps.
  """
  ts = round_times(i, num_steps, (-0.5, -1.0))
  logsnr_t, logsnr_1, logsnr_2 = (logsnr_fn(s) for s in ts)
  cond_t, uncond_t = cond_uncond(teacher_x, teacher_params, z_t, logsnr_t, labels, w, null_label)
  # The two heads as one batch of 2B rows (class rows, then null-label rows) that share the guided x̂^w(z_t):
  # the shared block's first step lands both on the same z_t', and its one evaluation of z_t' is then
  # cond_uncond's single 2B-row call.
  two = lambda a: jnp.concatenate([a, a])
  logsnrs = (two(logsnr_t), two(logsnr_1), two(logsnr_2))
  heads, _ = two_step_distillation_target(teacher_x, teacher_params, two(z_t), logsnrs,
                                          conditions.cond_and_null(labels, null_label), two(w),
                                          is_last=two(i == 1), x_hat_t=two(diffusion.cfg_mix(cond_t, uncond_t, w)))
  b = z_t.shape[0]
  return heads[:b], heads[b:]


# --- losses ------------------------------------------------------------------------------------------


def _round_loss(predict, target_fn, first_index: int, *, logsnr_fn: LogSNRFn, w_min: float, w_max: float,
                weighting: str) -> LossFn:
  """The part every round shares: i ~ U{first_index .. first_index + N − 1}, t = i/N, w ~ U[w_min, w_max],
  ε, z_t = α_t x + σ_t ε, then the ω(λ_t)-weighted regression of the student onto the teacher's target.

  predict(params, z_t, λ_t, labels, w, dropout_rng) -> prediction (a pytree of [B, ...], as the target);
  target_fn(teacher_params, z_t, i, N, labels, w) -> target.
  """
  diffusion.loss_weight(0.0, weighting)  # fail at construction, not inside the first jitted step

  def loss_fn(params, frozen, batch, rng):
    x, labels = batch["image"], batch["label"]
    b = x.shape[0]
    num_steps = jnp.asarray(frozen["num_steps"], jnp.int32)
    k_i, k_w, k_eps, k_dropout = jax.random.split(rng, 4)
    i = jax.random.randint(k_i, (b,), first_index, first_index + num_steps)
    w = sample_w(k_w, (b,), w_min, w_max)
    (t,) = round_times(i, num_steps, ())
    logsnr_t = logsnr_fn(t)
    z_t = diffusion.q_sample(x, jax.random.normal(k_eps, x.shape, x.dtype), logsnr_t)
    target = target_fn(frozen["teacher"], z_t, i, num_steps, labels, w)
    prediction = predict(params, z_t, logsnr_t, labels, w, k_dropout)
    return weighted_regression(prediction, target, logsnr_t, weighting)

  return loss_fn


def _single_student(student_x: XFn):
  return lambda params, z, logsnr, labels, w, rng: student_x(params, z, logsnr, labels, w, train=True, rng=rng)


def deterministic_round_loss(student_x: XFn, teacher_x: XFn, *, logsnr_fn: LogSNRFn, w_min: float, w_max: float,
                             weighting: str = "truncated_snr") -> LossFn:
  """Algorithm 2. loss_fn(params, frozen, batch, rng); frozen = {'teacher': params, 'num_steps': int32 N}."""
  def target_fn(teacher_params, z_t, i, n, labels, w):
    return deterministic_target(teacher_x, teacher_params, z_t, i, n, labels, w, logsnr_fn)
  return _round_loss(_single_student(student_x), target_fn, 1, logsnr_fn=logsnr_fn, w_min=w_min, w_max=w_max,
                     weighting=weighting)


def stochastic_round_loss(student_x: XFn, teacher_x: XFn, *, logsnr_fn: LogSNRFn, w_min: float, w_max: float,
                          weighting: str = "truncated_snr") -> LossFn:
  """Algorithm 3 (students for `samplers.stochastic_sample`). frozen as in `deterministic_round_loss`."""
  def target_fn(teacher_params, z_t, i, n, labels, w):
    return stochastic_target(teacher_x, teacher_params, z_t, i, n, labels, w, logsnr_fn)
  return _round_loss(_single_student(student_x), target_fn, 1, logsnr_fn=logsnr_fn, w_min=w_min, w_max=w_max,
                     weighting=weighting)


def encoder_round_loss(student_x: XFn, teacher_x: XFn, *, logsnr_fn: LogSNRFn, w_min: float, w_max: float,
                       weighting: str = "truncated_snr") -> LossFn:
  """Algorithm 4 (students for `samplers.ddim_encode`). frozen as in `deterministic_round_loss`.

  i = 0 puts t at the data end, where λ_t = λ_max: ω = 'snr' or 'truncated_snr' is e^λ_max (≈ 5e8 at 20)
  there, i.e. the error is measured in ε-space, which is what an encoder step from z_0 is sensitive to.
  """
  def target_fn(teacher_params, z_t, i, n, labels, w):
    return encoder_target(teacher_x, teacher_params, z_t, i, n, labels, w, logsnr_fn)
  return _round_loss(_single_student(student_x), target_fn, 0, logsnr_fn=logsnr_fn, w_min=w_min, w_max=w_max,
                     weighting=weighting)


def two_student_round_loss(student_x: XFn, teacher_x: XFn, *, logsnr_fn: LogSNRFn, null_label: int,
                           w_min: float, w_max: float, weighting: str = "truncated_snr") -> LossFn:
  """Algorithm 5, the naive baseline: student and teacher are each the (conditional, unconditional) pair of
  one network, every evaluation one call of 2B rows; the student is also given w. Loss
  ω(λ_t)·(‖x̃_c − x̂_c,η(z_t, w)‖² + ‖x̃_∅ − x̂_∅,η(z_t, w)‖²). frozen as in `deterministic_round_loss`."""
  def predict(params, z, logsnr, labels, w, rng):
    return cond_uncond(student_x, params, z, logsnr, labels, w, null_label, train=True, rng=rng)

  def target_fn(teacher_params, z_t, i, n, labels, w):
    return two_student_target(teacher_x, teacher_params, z_t, i, n, labels, w, logsnr_fn, null_label)

  return _round_loss(predict, target_fn, 1, logsnr_fn=logsnr_fn, w_min=w_min, w_max=w_max, weighting=weighting)


# --- plan and sampling --------------------------------------------------------------------------------


def _is_power_of_two(n) -> bool:
  return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def round_plan(start_steps: int, end_steps: int) -> list[int]:
  """Student step counts N of successive halving rounds; the first round's teacher runs at start_steps = 2N.

  round_plan(64, 1) == [32, 16, 8, 4, 2, 1]. Both must be powers of two with start_steps > end_steps >= 1.
  """
  if not (_is_power_of_two(start_steps) and _is_power_of_two(end_steps) and start_steps > end_steps):
    raise ValueError(f"round_plan: start_steps={start_steps!r}, end_steps={end_steps!r}; need powers of two "
                     "with start_steps > end_steps >= 1")
  plan, n = [], start_steps
  while n > end_steps:
    n //= 2
    plan.append(n)
  return plan


def _per_example_w(w, z):
  return jnp.broadcast_to(jnp.asarray(w, jnp.float32), (z.shape[0],))


def student_denoiser(x_fn: XFn, params, labels, w) -> samplers.Denoiser:
  """A distilled w-conditioned student as a sampler's Denoiser: one evaluation per call.
  labels: [B] int32; w: scalar or [B]."""
  return samplers.Denoiser(lambda z, logsnr: x_fn(params, z, logsnr, labels, _per_example_w(w, z)),
                           evals_per_call=1)


def two_student_denoiser(x_fn: XFn, params, labels, w, null_label: int) -> samplers.Denoiser:
  """A two-student (Alg. 5) pair as a Denoiser: (1 + w)·x̂_c,η(z, w) − w·x̂_∅,η(z, w), one call of 2B rows,
  two evaluations per call. labels: [B] int32; w: scalar or [B]."""
  def fn(z, logsnr):
    w_b = _per_example_w(w, z)
    cond, uncond = cond_uncond(x_fn, params, z, logsnr, labels, w_b, null_label)
    return diffusion.cfg_mix(cond, uncond, w_b)
  return samplers.Denoiser(fn, evals_per_call=2)
