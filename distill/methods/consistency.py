"""Guided consistency distillation (CD): the method in one module — its pure pieces, its pipeline stage
'consistency', its sampler 'consistency' and its config section `consistency`. The trainer owns the loop.

Consistency models (Song et al. 2023, CD with the teacher's ODE solver) in the guided form of Latent
Consistency Models (Luo et al. 2023): a w-conditioned student f_θ(z_t, t, w) learns to map every point of the
classifier-free-guided teacher's probability-flow ODE trajectory to the trajectory's end at t = 0.

Time grid: N intervals on the uniform VP grid t_n = n/N, n = 0..N, λ_n = logsnr_fn(t_n); t_0 = 0 is the data
end (λ_0 = λ_max, σ_0 ≈ e^{−λ_max/2}, e.g. 4.5e-5 at λ_max = 20), where z_0 ≈ x. Optionally LCM's skip-k: the
teacher steps t_{n+k} → t_n.

Parameterisation (the boundary condition f(z, t_0) = z built in). The student's network is an x-function
x̂_θ(z_t, λ_t, label, w) and

  f_θ(z_t, t) = c_skip(t)·z_t + c_out(t)·x̂_θ,   c_skip = σ_0/σ_t,   c_out = α_0 − (σ_0/σ_t)·α_t,

i.e. one DDIM step of the student from t straight to t_0. At t = t_0, c_skip = 1 and c_out = 0 exactly, so
f(z, t_0) = z whatever the network outputs. Why this form rather than the EDM/LCM c_skip = σ_d²/(σ² + σ_d²):
it is the VP process's own map (no σ_d to pick, no VE/VP translation), a student initialised from the teacher
starts as the teacher's one-step DDIM (a sensible consistency function already), and any consistency function
has this form for x̂ = the DDIM distillation target of (z_t, f(z_t)), so nothing is lost. As with LCM's scaled
c_skip, f ≈ x̂ everywhere but next to t_0 (c_skip(t_1) ≈ 1.5e-3 at N = 50 on the cosine schedule).

  boundary_coefficients   (c_skip, c_out) at λ_t
  consistency_fn          f_θ(z_t, t, w) from an x-function
  cfg_teacher_x           the guided teacher (1 + w)·x̂_c − w·x̂_∅ as ONE call of 2B rows
  consistency_target      one teacher DDIM step t_{n+k} → t_n, then the target network f_θ⁻ (stop-gradient)
  distance                'l2' (per-example mean of squares) or 'pseudo_huber' (iCT, c = 0.00054·√d)
  loss                    the trainer's loss_fn(params, frozen, batch, rng) over params = {online, target}
  init_params             {'online': p, 'target': p}
  ema_target_optimizer    inner optimizer on 'online', θ⁻ ← μθ⁻ + (1 − μ)θ through the update of 'target'
  sample                  multistep consistency sampling (CM Alg. 1), one evaluation per step

Models are x-functions, x_fn(params, z [B, H, W, C], logsnr [B], labels [B] int32, w [B] float32, *,
train=False, rng=None) -> x̂ [B, H, W, C]; the teacher ignores w, the student uses it. The unconditional
pass uses `null_label` (= num_classes).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from distill import contract, diffusion, losses, samplers, train, validation
from distill.context import (Context, init_params as context_init_params, run_stage, student_model,
                             teacher_model, teacher_params, write_student_grid, x_fn_of)
from distill.losses import XFn
from distill.schedules import LogSNRFn, alpha_sigma, sigma_ratio

METRICS = ("l2", "pseudo_huber")
WEIGHTINGS = ("constant", "ict")


def bcast_like(a, like):
  """[B] (or scalar) → broadcastable against like [B, ...]."""
  return diffusion.bcast_like(a, like)


def _per_example(value, z):
  return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (z.shape[0],))


def data_logsnr(logsnr_fn: LogSNRFn):
  """λ_0 = logsnr_fn(0), the log-SNR of the grid's data end t_0 = 0 (a float32 scalar). The boundary condition
  holds exactly where the λ a caller passes equals this value bit for bit, which evaluating the same
  schedule at t = 0 guarantees."""
  return logsnr_fn(jnp.zeros((), jnp.float32))


# --- the consistency function --------------------------------------------------------------------------


def boundary_coefficients(logsnr, logsnr_data):
  """(c_skip, c_out) = (σ_0/σ_t, α_0 − (σ_0/σ_t)·α_t): f = c_skip·z_t + c_out·x̂ is a DDIM step t → t_0.

  logsnr: [B] (or scalar) λ_t; logsnr_data: λ_0 (scalar). Returns two arrays of logsnr's shape. At
  λ_t = λ_0: c_skip = exp(0) = 1 and c_out = α_0 − α_0 = 0 exactly (same float ops on equal inputs)."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  c_skip = sigma_ratio(logsnr_data, logsnr)  # stable: no σ_0 ≈ 4.5e-5 formed and divided
  alpha_t, _ = alpha_sigma(logsnr)
  alpha_0, _ = alpha_sigma(jnp.broadcast_to(jnp.asarray(logsnr_data, jnp.float32), logsnr.shape))
  return c_skip, alpha_0 - c_skip * alpha_t


def consistency_fn(x_fn: XFn, params, z, logsnr, labels, w, *, logsnr_data, train: bool = False, rng=None):
  """f_θ(z_t, t, w) = c_skip(t)·z_t + c_out(t)·x̂_θ(z_t, λ_t, label, w): the trajectory's point at t_0.

  z: [B, H, W, C]; logsnr: [B]; labels: [B] int32; w: [B] float32; logsnr_data: λ_0 (see `data_logsnr`).
  One network evaluation. Returns [B, H, W, C]; equals z exactly where λ_t = λ_0 (for finite x̂)."""
  x_hat = x_fn(params, z, logsnr, labels, w, train=train, rng=rng)
  c_skip, c_out = boundary_coefficients(logsnr, logsnr_data)
  return bcast_like(c_skip, z) * z + bcast_like(c_out, z) * x_hat


# --- the teacher and the target --------------------------------------------------------------------------


def cfg_teacher_x(teacher_x: XFn, teacher_params, z, logsnr, labels, w, null_label: int):
  """The guided teacher x̂^w = (1 + w)·x̂_c − w·x̂_∅, the conditional and unconditional passes as ONE call of
  2B rows (the cost CFG pays per step, batched). z: [B, H, W, C]; logsnr: [B]; labels: [B] int32; w: [B]
  (given to both halves; a plain CFG teacher ignores it). Returns [B, H, W, C]."""
  return losses.cfg_x_fn(teacher_x, null_label)(teacher_params, z, logsnr, labels, w)


def grid_logsnr(logsnr_fn: LogSNRFn, n, num_intervals: int):
  """λ(t_n) at t_n = n/N on the uniform grid. n: [B] int (or traced); returns [B] float32."""
  return logsnr_fn(jnp.asarray(n, jnp.float32) / num_intervals)


def consistency_target(student_x: XFn, target_params, teacher_x: XFn, teacher_params, z_next, n, labels, w, *,
                       logsnr_fn: LogSNRFn, num_intervals: int, null_label: int, skip: int = 1):
  """The CD target f_θ⁻(ẑ_{t_n}, t_n, w), ẑ_{t_n} = one DDIM step of the guided teacher from z_{t_{n+k}}.

  z_next: [B, H, W, C], the state at t_{n+k}; n: [B] int32 in {0..N−k}; labels: [B] int32; w: [B] float32;
  k = skip. The target network runs deterministically (train=False) and nothing is differentiated: neither
  the teacher nor θ⁻. Returns [B, H, W, C]; at n = 0 it is ẑ_{t_0} itself (the boundary condition)."""
  lam_next = grid_logsnr(logsnr_fn, n + skip, num_intervals)
  lam_n = grid_logsnr(logsnr_fn, n, num_intervals)
  x_teacher = cfg_teacher_x(teacher_x, teacher_params, z_next, lam_next, labels, w, null_label)
  z_n = diffusion.ddim_step(z_next, x_teacher, lam_next, lam_n)
  target = consistency_fn(student_x, target_params, z_n, lam_n, labels, w, logsnr_data=data_logsnr(logsnr_fn))
  return jax.lax.stop_gradient(target)


def distance(a, b, metric: str = "l2"):
  """d(a, b) per example: a, b [B, ...] -> [B].

  'l2': mean of squares over the d = prod(a.shape[1:]) entries; 'pseudo_huber': √(‖a − b‖² + c²) − c with
  c = 0.00054·√d (improved consistency training, Song & Dhariwal 2023), ‖·‖ over the whole example."""
  diff = (a - b).reshape(a.shape[0], -1)
  if metric == "l2":
    return jnp.mean(diff**2, axis=1)
  if metric == "pseudo_huber":
    c = 0.00054 * np.sqrt(diff.shape[1])
    sq = jnp.sum(diff**2, axis=1)
    return sq / (jnp.sqrt(sq + c**2) + c)  # = √(‖δ‖² + c²) − c without cancellation near 0
  raise ValueError(f"metric: unknown {metric!r}; allowed: {METRICS}")


def interval_weight(lam_n, lam_next, weighting: str):
  """λ(n) of the CM loss per example ([B] each): 'constant' 1 (CM, LCM); 'ict' 1/(σ_{n+k} − σ_n) in the VE
  noise levels σ = e^{−λ/2} (iCT; with the VP grid's σ_VE up to e^{10} it all but ignores the noisiest
  intervals)."""
  if weighting == "constant":
    return jnp.ones_like(lam_n)
  if weighting == "ict":
    return 1.0 / (jnp.exp(-0.5 * lam_next) - jnp.exp(-0.5 * lam_n))
  raise ValueError(f"weighting: unknown {weighting!r}; allowed: {WEIGHTINGS}")


# --- the loss and its parameters ---------------------------------------------------------------------------


def init_params(student_params):
  """The trainable tree of CD: {'online': θ, 'target': θ⁻}, both starting at the student's (teacher-initialised)
  parameters. Separate buffers are not needed: the trainer copies the tree into its state."""
  return {"online": student_params, "target": student_params}


def loss(student_x: XFn, teacher_x: XFn, *, logsnr_fn: LogSNRFn, null_label: int, w_min: float, w_max: float,
         num_intervals: int, metric: str = "l2", weighting: str = "constant", skip: int = 1):
  """loss_fn(params, frozen, batch, rng) -> (loss, metrics) of guided CD; params = {'online', 'target'}
  (`init_params`), frozen = {'teacher': teacher_params}. batch: image [B, H, W, C] in [−1, 1], label [B].

  Per example: n ~ U{0..N−k}, w ~ U[w_min, w_max], ε; z_{t_{n+k}} = α x + σ ε; the online student (train mode,
  with a dropout rng) f_θ(z_{t_{n+k}}, t_{n+k}, w) regresses onto `consistency_target` with d = `metric`,
  weighted by `interval_weight`. θ⁻ enters through stop_gradient, so grads['target'] is exactly zero; update it
  with `ema_target_optimizer`. Metrics: 'distance' (mean unweighted d), 'f_mse' (mean squared f error)."""
  if not (isinstance(num_intervals, int) and num_intervals >= 1):
    raise ValueError(f"num_intervals: {num_intervals!r}, needs an int >= 1")
  if not (isinstance(skip, int) and 1 <= skip <= num_intervals):
    raise ValueError(f"skip: {skip!r}, needs an int in [1, num_intervals={num_intervals}]")
  if metric not in METRICS:
    raise ValueError(f"metric: unknown {metric!r}; allowed: {METRICS}")
  interval_weight(jnp.zeros(1), jnp.ones(1), weighting)  # fail at construction, not inside the first jitted step

  def loss_fn(params, frozen, batch, rng):
    x, labels = batch["image"], batch["label"]
    b = x.shape[0]
    k_n, k_w, k_eps, k_dropout = jax.random.split(rng, 4)
    n = jax.random.randint(k_n, (b,), 0, num_intervals - skip + 1)
    w = jax.random.uniform(k_w, (b,), jnp.float32, minval=w_min, maxval=w_max)
    lam_next = grid_logsnr(logsnr_fn, n + skip, num_intervals)
    z_next = diffusion.q_sample(x, jax.random.normal(k_eps, x.shape, x.dtype), lam_next)
    target = consistency_target(student_x, jax.lax.stop_gradient(params["target"]), teacher_x, frozen["teacher"],
                                z_next, n, labels, w, logsnr_fn=logsnr_fn, num_intervals=num_intervals,
                                null_label=null_label, skip=skip)
    f = consistency_fn(student_x, params["online"], z_next, lam_next, labels, w, logsnr_data=data_logsnr(logsnr_fn),
                       train=True, rng=k_dropout)
    d = distance(f, target, metric)
    weight = interval_weight(grid_logsnr(logsnr_fn, n, num_intervals), lam_next, weighting)
    f_mse = jnp.mean((f - target) ** 2)
    return jnp.mean(weight * d), {"distance": jnp.mean(d), "f_mse": f_mse}

  return loss_fn


def ema_target_optimizer(inner: optax.GradientTransformation, mu) -> optax.GradientTransformation:
  """`inner` on params['online']; params['target'] follows θ⁻ ← μ·θ⁻ + (1 − μ)·θ_new with no trainer change.

  The 'target' update is (1 − μ)·(θ + u − θ⁻), θ + u being the online parameters after this step, so
  `optax.apply_updates` lands θ⁻ on the EMA (to float rounding: θ⁻ + (θ_new − θ⁻) may differ from θ_new in
  the last bit at μ = 0). The gradients of 'target' are ignored. Needs `params` in update(), which
  `distill.train.make_train_step` passes: optimizer.update(grads, opt_state, params). mu: float in [0, 1]
  (or a scalar array); the state is inner's state of the online tree."""
  if isinstance(mu, (int, float)) and not 0.0 <= mu <= 1.0:
    raise ValueError(f"mu: {mu!r}, needs 0 <= mu <= 1")

  def init_fn(params):
    return inner.init(params["online"])

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("ema_target_optimizer: update() needs params (the EMA reads the current θ and θ⁻)")
    online, state = inner.update(updates["online"], state, params["online"])
    target = jax.tree.map(lambda p, u, p_t: (1.0 - mu) * (p + u - p_t), params["online"], online, params["target"])
    return {"online": online, "target": target}, state

  return optax.GradientTransformation(init_fn, update_fn)


# --- sampling ------------------------------------------------------------------------------------------------


def row_noise(key, shape, dtype=jnp.float32):
  """ε of shape [B, ...] whose row r is drawn from fold_in(key, r) alone: a row's noise does not depend on the
  batch size or on its neighbours (sampling 5 rows or the same 5 inside 8 gives the same rows)."""
  keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(shape[0]))
  return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(keys)


def sample(x_fn: XFn, params, z, labels, w, *, logsnr_fn: LogSNRFn, num_steps, rng, clip: bool = False
           ) -> samplers.Samples:
  """Multistep consistency sampling (CM Alg. 1) with K = num_steps evaluations at τ_i = 1 − i/K, i = 0..K−1.

  x ← f(z, 1); then for each later τ: z = α_τ x + σ_τ ε_i, x ← f(z, τ), ε_i = `row_noise`(fold_in(rng, i)).
  The τ are evenly spaced in t; for K dividing the student's N they lie on its grid t_n = n/N (K = 1: {1};
  2: {1, 1/2}; 4: {1, 3/4, 1/2, 1/4}). params: the student's tree (params['target'], the EMA, or
  params['online']); z: [B, H, W, C] ~ N(0, I); labels: [B] int32; w: scalar or [B]; clip: clip every x to
  [−1, 1] (images). num_steps may be a traced int32: one lax.fori_loop body holds the single network call,
  so one compilation serves every K. Returns Samples(x, nfe = K)."""
  w = _per_example(w, z)
  lam_data = data_logsnr(logsnr_fn)

  def step(i, x):
    lam = _per_example(logsnr_fn(samplers.time_at(i, num_steps)), z)
    renoised = diffusion.q_sample(x, row_noise(jax.random.fold_in(rng, i), z.shape, z.dtype), lam)
    z_i = jnp.where(i == 0, z, renoised)  # the first evaluation starts from the given noise
    return diffusion.clip_x(consistency_fn(x_fn, params, z_i, lam, labels, w, logsnr_data=lam_data), clip)

  x = jax.lax.fori_loop(0, num_steps, step, jnp.zeros_like(z))
  return samplers.Samples(x, num_steps)


# --- the pipeline stage -------------------------------------------------------------------------------


def stage_meta(config) -> contract.StageMeta:
  """One update per example: one CFG teacher DDIM step (2 evaluations, one call of 2B rows) and the online and
  target students (2 evaluations)."""
  s = config.consistency
  return contract.StageMeta(
      kind="cd_student", method="CD", sampler="consistency", num_sampling_steps=max(s.sample_steps),
      eval_steps=tuple(sorted(set(s.sample_steps))), w_range=(float(s.w_min), float(s.w_max)), w_conditioned=True,
      batch_size=int(s.batch_size), teacher_evals_per_update=2.0, student_evals_per_update=2.0,
      extra={"num_intervals": int(s.num_intervals), "skip": int(s.skip), "mu": float(s.mu), "metric": s.metric,
             "weighting": s.weighting, "sampled_params": "target"})


def run_consistency(ctx: Context):
  """Stage 'consistency': a w-conditioned student initialised from the CFG teacher (its w-embedding at zero),
  trained by guided CD against the teacher's DDIM step; WORKDIR/consistency."""
  c = ctx.config
  s = c.consistency
  student = student_model(ctx, w_embedding=True)
  t_params = teacher_params(ctx)
  loss_fn = loss(x_fn_of(ctx, student), x_fn_of(ctx, teacher_model(ctx)), logsnr_fn=ctx.logsnr_fn,
                 null_label=ctx.null_label, w_min=float(s.w_min), w_max=float(s.w_max),
                 num_intervals=int(s.num_intervals), metric=s.metric, weighting=s.weighting, skip=int(s.skip))
  inner = optax.chain(optax.clip_by_global_norm(s.grad_clip), optax.adam(s.lr))
  stage = train.Stage(
      name="consistency", loss_fn=loss_fn, init_params=init_params(context_init_params(ctx, student, t_params)),
      optimizer=ema_target_optimizer(inner, float(s.mu)), num_steps=int(s.num_steps),
      batch_fn=ctx.train_batches(s.batch_size), seed=c.seed, ema_decay=None,
      frozen={"teacher": t_params}, log_every=s.log_every, ckpt_every=s.ckpt_every, images_per_step=s.batch_size,
      lr_schedule=lambda step: s.lr, fsdp=c.mesh.fsdp, fsdp_min_size=c.mesh.fsdp_min_size)
  params, meta = run_stage(ctx, stage, stage_meta(c))
  write_student_grid(ctx, "consistency", consistency_sampler(ctx, params, meta, meta.num_sampling_steps)[0],
                     c.distill.grid_w)
  return params, meta


@functools.partial(jax.jit, static_argnames=("x_fn", "logsnr_fn", "clip"))
def _sample(params, z, labels, w, rng, *, x_fn, logsnr_fn, num_steps, clip: bool):
  return sample(x_fn, params, z, labels, w, logsnr_fn=logsnr_fn, num_steps=num_steps, rng=rng, clip=clip).x


def consistency_sampler(ctx: Context, params, meta: contract.StageMeta, num_steps: int, sampler: str = "consistency"):
  """The 'consistency' sampler: multistep consistency sampling of the target (EMA) network, one evaluation per
  step; the re-noising draws come from seed + 11, per row."""
  del sampler
  x_fn = x_fn_of(ctx, student_model(ctx, w_embedding=True))
  rng = jax.random.PRNGKey(ctx.config.seed + 11)
  fn = functools.partial(_sample, params[meta.extra.get("sampled_params", "target")], rng=rng, x_fn=x_fn,
                         logsnr_fn=ctx.logsnr_fn, num_steps=int(num_steps), clip=ctx.config.sample.clip)
  return (lambda z, labels, w: fn(z, labels, w)), int(num_steps)


def config_sections():
  return {"consistency": ml_collections.ConfigDict(dict(
      num_intervals=64,                 # N: the teacher's DDIM grid t_n = n/N (LCM's skip-k: `skip`)
      skip=1,
      w_min=0.0, w_max=4.0,             # w ~ U[w_min, w_max] per example, a student input (LCM)
      mu=0.95,                          # EMA decay of the target network θ⁻ (CD, Song et al. 2023)
      metric="l2",                      # 'l2' | 'pseudo_huber' (iCT's c = 0.00054·√d)
      weighting="constant",             # 'constant' | 'ict' (1 / (σ_{n+k} − σ_n))
      num_steps=2000, batch_size=128, lr=1e-4, grad_clip=1.0,
      sample_steps=(1, 2, 4),           # multistep consistency sampling: evaluations per sample scored
      log_every=100, ckpt_every=500,
  ))}


def validate(c) -> None:
  v = validation
  for f in ("num_intervals", "skip", "num_steps", "batch_size", "log_every", "ckpt_every"):
    v.positive_int(c, f"consistency.{f}")
  if c.consistency.skip > c.consistency.num_intervals:
    v.fail("consistency.skip", c.consistency.skip, f"must not exceed consistency.num_intervals="
           f"{c.consistency.num_intervals}")
  v.number(c, "consistency.w_min", 0.0)
  v.number(c, "consistency.w_max", 0.0)
  if c.consistency.w_min > c.consistency.w_max:
    v.fail("consistency.w_min", c.consistency.w_min, f"must not exceed consistency.w_max={c.consistency.w_max}")
  v.number(c, "consistency.mu", 0.0, 1.0, hi_open=True)
  v.number(c, "consistency.lr", 0.0, 1.0, lo_open=True)
  v.number(c, "consistency.grad_clip", 0.0, lo_open=True)
  v.choice(c, "consistency.metric", METRICS)
  v.choice(c, "consistency.weighting", WEIGHTINGS)
  steps = c.consistency.sample_steps
  if (not isinstance(steps, (tuple, list)) or not steps
      or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in steps)):
    v.fail("consistency.sample_steps", steps, "must be a non-empty tuple of positive integers")


def quick(c) -> None:
  s = c.consistency
  s.num_intervals, s.num_steps, s.batch_size, s.log_every, s.ckpt_every = 16, 20, 32, 10, 20


METHOD = contract.Method(name="consistency", order=40, stages={"consistency": run_consistency},
                         samplers={"consistency": consistency_sampler}, schedule_samplers=("consistency",),
                         config=config_sections, validate=validate,
                         quick=quick, data_batches=("consistency.batch_size",),
                         plan=lambda config, stage: [("consistency", stage_meta(config))])
