"""Direct self-distillation as pipeline stages (DSD paper): 'dsd', 'tsd' and 'training_dsd'.

    WORKDIR/dsd/<KIND>/      Alg. 2: the start model distilled into itself along its own DDIM trajectories,
                             one student per schedule KIND in config.dsd.kinds (DSDN, DSDI, DSDGL, DSDGEXP)
    WORKDIR/tsd/<KIND>/      the same schedules with the start model frozen as a separate teacher (the paper's TSD)
    WORKDIR/training_dsd/    a CFG model trained from data with α·L_v + β·L_distill (Eq. 1), on the teacher
                             stage's recipe and budget: the plain teacher is the same run at β = 0

The math is `distill.methods.dsd`; this module builds `train.Stage`s from the config (`config.dsd`).

One stage per schedule, across all its depths. Each update's batch is `dsd.trajectory_batch(plan, step)`:
B trajectories at one (N_i, position j); in a text or inpainting run a trajectory's condition is that of
training batch `trajectory` (`Context.data_conditions`) in place of its drawn class labels. N_i and j travel in the batch as [B] int32 arrays, the loss replays
the trajectory prefix in a `fori_loop` whose trip count is traced, so one compiled step serves every depth
and position (tests/test_dsd_stages.py counts the compilations). The schedules of one stage type share the
loss and the optimizer, so all kinds of 'dsd' reuse one compiled step, and all kinds of 'tsd' another.

Updates. `config.dsd.updates` is P, the parameter updates a schedule makes, as §5 states them ("4000 and
5000 total parameter updates (P)"). The printed U_i = P/|N|·1/N_i makes
U_i·N_i/2 updates per depth, ≈ P/2 in all (`dsd.depth_schedule`), so the plan is built with 2P (our reading:
§5's count wins over the printed formula); with U_i
rounded the stage makes P up to a few updates (the meta records the exact count as num_steps). The cosine
learning rate (to `lr_final_fraction` of `lr`, §5) runs over P for every kind, so that kinds share one
compiled step; a kind that makes more than P updates spends the extra few at the final rate.

Start model (`config.dsd.init`):
  'teacher'    the CFG teacher itself (Alg. 2 as the paper runs it): the model is its guided prediction
               (1 + w)·x̂_c − w·x̂_∅, w ~ U[w_min, w_max] per trajectory, both heads trained through that mix;
               sampled with 'cfg_ddim', 2 network evaluations per step.
  'stage_one'  the w-conditioned student of guided stage one (WORKDIR/stage_one): 1 evaluation per step,
               sampled with the guided-PD students' 'ddim'; its stage-one cost is counted (cost_parents).

Cost fields (per example and update, network evaluations; a CFG model's guided prediction counts 2):
  DSD  student: the replayed prefix (2j steps at position j, averaged over the plan's updates) + x̂(z_t) with
       gradient + the target's second step; teacher: 0.
  TSD  teacher: the replay + x̂(z_t) + the second step; student: x̂(z_t) with gradient.
  training DSD  student: v̂(z_t) with gradient + the target's second step (2); teacher: 0.
Backward passes are not counted (every method pays one per update).
"""
from __future__ import annotations

import functools

import jax
import optax

from distill import data as data_lib
from distill import contract, optimizers, registry, train
from distill.context import (Context, init_params, load_stage, run_stage, student_model, teacher_model,
                             teacher_params, write_student_grid, x_fn_of)
from distill.losses import cfg_x_fn
from distill.methods.dsd import core as dsd

INITS = ("teacher", "stage_one")


# --- plans and costs -------------------------------------------------------------------------------------


def schedule_plan(d, kind: str) -> list[tuple[int, int]]:
  """[(N_i, U_i)] of schedule `kind` for config section d (config.dsd): P = d.updates updates made, so the
  printed formula gets 2P (module docstring); DSDN stays at d.start_steps."""
  end = d.start_steps if kind == "DSDN" else d.end_steps
  return dsd.depth_schedule(kind, d.start_steps, 2 * d.updates, end)


def mean_replayed_steps(plan) -> float:
  """The DDIM steps replayed before an update (2j at position j), averaged over the plan's updates: a
  trajectory of N steps makes N/2 updates and replays Σ_j 2j = (N/2)(N/2 − 1) steps over them."""
  updates = sum(dsd.updates_per_depth(plan))
  return sum(u * (n // 2) * (n // 2 - 1) for n, u in plan) / updates


def evals_per_update(plan, mode: str, evals_per_call: int) -> tuple[float, float]:
  """(teacher, student) network evaluations per example of one update of `plan`. mode: 'dsd' or 'tsd';
  evals_per_call: 2 for a CFG model's guided prediction, 1 for a w-conditioned student."""
  trajectory = evals_per_call * (2.0 + mean_replayed_steps(plan))  # prefix + x̂(z_t) + the second step
  if mode == "dsd":
    return 0.0, trajectory
  return trajectory, float(evals_per_call)


# --- batches -------------------------------------------------------------------------------------------


def trajectory_batch_fn(plan, *, batch_size: int, image_shape, num_classes: int, w_min: float, w_max: float,
                        seed: int, conditions_fn=None):
  """step -> this process's rows of `dsd.trajectory_batch(plan, step)` (numpy, [batch_size / processes]):
  a pure function of the step, so a resumed run sees the same trajectories. conditions_fn
  (`Context.data_conditions`, a text or inpainting run): trajectory id -> this process's rows of the condition
  that replaces the drawn labels (every update of a trajectory sees the same rows)."""
  if batch_size % jax.device_count():
    raise data_lib.DataError(f"dsd.batch_size={batch_size} does not split over the {jax.device_count()} devices; "
                             f"use a multiple of {jax.device_count()}")
  per_process = batch_size // jax.process_count()
  lo = jax.process_index() * per_process

  def batch_at(step):
    batch = dsd.trajectory_batch(plan, step, batch_size=batch_size, shape=image_shape, num_classes=num_classes,
                                 w_min=w_min, w_max=w_max, seed=seed)
    rows = {k: v[lo:lo + per_process] for k, v in batch.items()}
    if conditions_fn is not None:
      rows["label"] = conditions_fn(dsd.update_position(plan, step)[1])
    return rows

  return batch_at


# --- the start model -------------------------------------------------------------------------------------


def start_kind(d) -> tuple[bool, int, list]:
  """(w_conditioned, evaluations per guided call, cost_parents) of the start model config.dsd.init names."""
  return (False, 2, []) if d.init == "teacher" else (True, 1, ["stage_one"])


def fine_tuning_meta(d, mode: str, kind: str) -> contract.StageMeta:
  """The one-stage record of schedule `kind` of stage type `mode` ('dsd', or 'tsd' with the start model frozen)."""
  w_conditioned, evals_per_call, cost_parents = start_kind(d)
  plan = schedule_plan(d, kind)
  teacher_evals, student_evals = evals_per_update(plan, mode, evals_per_call)
  fields = {"tsd_teacher": "start_model"} if mode == "tsd" else {}
  return contract.StageMeta.of(**fields, **{
      "kind": "dsd_student" if mode == "dsd" else "tsd_student", "sampler": "ddim" if w_conditioned else "cfg_ddim",
      "num_sampling_steps": plan[-1][0] // 2, "eval_steps": sorted({int(n) for n in d.eval_steps}),
      "w_range": [float(d.w_min), float(d.w_max)], "w_conditioned": w_conditioned, "evals_per_step": evals_per_call,
      "method": kind if mode == "dsd" else f"TSD ({kind})", "report_sampler": "deterministic",
      "stage_kind": mode, "schedule": kind, "init": d.init,
      "plan": [[n, u] for n, u in plan], "updates_per_depth": dsd.updates_per_depth(plan),
      "lr": float(d.lr), "lr_schedule_updates": int(d.updates), "batch_size": int(d.batch_size),
      "teacher_evals_per_update": round(teacher_evals, 4), "student_evals_per_update": round(student_evals, 4),
      "mean_replayed_steps": round(mean_replayed_steps(plan), 4), "cost_parents": cost_parents})


def tsd_depth_name(d, kind: str, depth: int) -> str:
  return f"tsd/{kind}/N{schedule_plan(d, kind)[depth][0]:04d}"


def tsd_depth_meta(d, kind: str, depth: int, teacher_fingerprint: str = "") -> contract.StageMeta:
  """The record of depth `depth` of TSD by depth: its teacher is the previous depth's student, whose cost it
  builds on; only the last depth is scored."""
  w_conditioned, evals_per_call, start_parents = start_kind(d)
  plan = schedule_plan(d, kind)
  teacher_evals, student_evals = evals_per_update([plan[depth]], "tsd", evals_per_call)
  return contract.StageMeta.of(**{
      "kind": "tsd_student", "sampler": "ddim" if w_conditioned else "cfg_ddim",
      "num_sampling_steps": plan[depth][0] // 2, "eval_steps": sorted({int(k) for k in d.eval_steps}),
      "w_range": [float(d.w_min), float(d.w_max)], "w_conditioned": w_conditioned, "evals_per_step": evals_per_call,
      "method": f"TSD ({kind})", "report_sampler": "deterministic", "scored": depth == len(plan) - 1,
      "stage_kind": "tsd", "schedule": kind, "init": d.init, "depth": depth, "tsd_teacher": "previous_depth",
      "teacher_fingerprint": teacher_fingerprint, "plan": [[k, u] for k, u in plan],
      "updates_per_depth": dsd.updates_per_depth(plan), "lr": float(d.lr), "lr_schedule_updates": int(d.updates),
      "batch_size": int(d.batch_size), "teacher_evals_per_update": round(teacher_evals, 4),
      "student_evals_per_update": round(student_evals, 4),
      "mean_replayed_steps": round(mean_replayed_steps([plan[depth]]), 4),
      "cost_parents": [tsd_depth_name(d, kind, depth - 1)] if depth else start_parents})


def training_meta(c) -> contract.StageMeta:
  """Training DSD's record: a CFG model (2 evaluations per step) scored like the teacher."""
  d = c.dsd
  w_values = tuple(c.eval.w_values) + tuple(c.sample.w_values)
  return contract.StageMeta.of(**{
      "kind": "training_dsd", "sampler": "cfg_ddim", "num_sampling_steps": c.sample.num_steps, "evals_per_step": 2,
      # The paper judges training DSD by full-length sampling (128 steps, Fig. 3); the few-step counts too.
      "eval_steps": sorted({int(n) for n in d.eval_steps} | {int(c.sample.num_steps)}),
      "w_range": [0.0, float(max(w_values))], "w_conditioned": False, "parameterization": "v",
      "method": "training-DSD", "report_sampler": "deterministic", "stage_kind": "training_dsd",
      "alpha": float(d.alpha), "beta": float(d.beta), "distill_steps": int(d.training_distill_steps),
      "batch_size": int(c.teacher.batch_size), "teacher_evals_per_update": 0.0, "student_evals_per_update": 2.0,
      "cost_parents": []})


def plan(config, stage: str) -> list[tuple[str, contract.StageMeta]]:
  """The stages `stage` writes, with their records (teacher fingerprints left empty)."""
  d = config.dsd
  if stage == "dsd":
    return [(f"dsd/{k}", fine_tuning_meta(d, "dsd", k)) for k in d.kinds]
  if stage == "tsd" and d.tsd_teacher == "start_model":
    return [(f"tsd/{k}", fine_tuning_meta(d, "tsd", k)) for k in d.tsd_kinds]
  if stage == "tsd":
    return [(tsd_depth_name(d, k, depth), tsd_depth_meta(d, k, depth))
            for k in d.tsd_kinds for depth in range(len(schedule_plan(d, k)))]
  return [("training_dsd", training_meta(config))]


def start_model(ctx: Context):
  """(params, x_fn) of the model DSD/TSD fine-tune, per config.dsd.init (`start_kind` says what it is); x_fn is
  cached on the context, so every stage built on it shares compiled steps."""
  d = ctx.config.dsd
  if d.init == "teacher":
    # The teacher's architecture with the students' dropout (distill.dropout): its parameters fit as they are.
    model = student_model(ctx)
    key = ("dsd_guided_x", model)
    if key not in ctx.cache:
      ctx.cache[key] = cfg_x_fn(x_fn_of(ctx, model), ctx.null_label)
    return teacher_params(ctx), ctx.cache[key]
  params, meta = load_stage(ctx, "stage_one", needed_by="dsd.init='stage_one'")
  if not meta.w_conditioned:
    raise train.TrainingError(f"{ctx.stage_dir('stage_one')}: not a w-conditioned stage-one student")
  return params, x_fn_of(ctx, student_model(ctx, w_embedding=True))


# --- fine-tuning stages: DSD and TSD -------------------------------------------------------------------


def _loss(ctx: Context, mode: str, x_fn):
  """The stage type's one loss (cached: every schedule of it reuses one compiled step)."""
  key = ("dsd_loss", mode, x_fn, ctx.config.dsd.weighting)
  if key not in ctx.cache:
    kw = dict(logsnr_fn=ctx.logsnr_fn, weighting=ctx.config.dsd.weighting)
    ctx.cache[key] = (dsd.fine_tuning_loss(x_fn, **kw) if mode == "dsd"
                      else dsd.teacher_student_loss(x_fn, x_fn, **kw))
  return ctx.cache[key]


def fine_tuning_stage(ctx: Context, mode: str, kind: str) -> tuple[train.Stage, list]:
  """The train.Stage of schedule `kind` ('DSDI', ...) of stage type `mode` ('dsd' or 'tsd'), and its plan."""
  c = ctx.config
  d = c.dsd
  params, x_fn = start_model(ctx)
  plan = schedule_plan(d, kind)
  per_depth = dsd.updates_per_depth(plan)
  optimizer, schedule = optimizers.cosine_adam(float(d.lr), int(d.updates), float(d.lr_final_fraction),
                                               int(d.warmup_steps), float(d.adam_b1), float(d.adam_b2),
                                               float(d.grad_clip))
  meta = fine_tuning_meta(d, mode, kind)
  stage = train.Stage(
      name=f"{mode}/{kind}", loss_fn=_loss(ctx, mode, x_fn), init_params=params, optimizer=optimizer,
      num_steps=sum(per_depth),
      batch_fn=trajectory_batch_fn(plan, batch_size=d.batch_size, image_shape=ctx.image_shape,
                                   num_classes=c.data.num_classes, w_min=d.w_min, w_max=d.w_max, seed=c.seed,
                                   conditions_fn=ctx.data_conditions(d.batch_size)),
      seed=c.seed, ema_decay=d.ema_decay, frozen={"teacher": params} if mode == "tsd" else None,
      log_every=d.log_every, ckpt_every=d.ckpt_every, images_per_step=d.batch_size, lr_schedule=schedule,
      meta=meta.to_dict(), fsdp=c.mesh.fsdp, fsdp_min_size=c.mesh.fsdp_min_size)
  return stage, plan


def _run_fine_tuning(ctx: Context, mode: str) -> dict:
  out = {}
  for kind in (ctx.config.dsd.kinds if mode == "dsd" else ctx.config.dsd.tsd_kinds):
    stage, plan = fine_tuning_stage(ctx, mode, kind)
    print(f"[{stage.name}] depths (N, trajectories): {plan}; {stage.num_steps} updates of "
          f"{ctx.config.dsd.batch_size} trajectories")
    params, meta = run_stage(ctx, stage)
    _grid(ctx, stage.name, params, meta)
    out[kind] = (params, meta)
  return out


def run_dsd(ctx: Context) -> dict:
  """Stage 'dsd': fine-tuning DSD (Alg. 2), one student per config.dsd.kinds in WORKDIR/dsd/<KIND>.
  Returns {kind: (params, meta)}."""
  return _run_fine_tuning(ctx, "dsd")


def tsd_depth_stage(ctx: Context, kind: str, depth: int, params) -> tuple[train.Stage, list]:
  """TSD as progressive distillation (dsd.tsd_teacher='previous_depth'): depth `depth` of schedule `kind` as its
  own stage WORKDIR/tsd/<KIND>/N<N_depth>, whose student starts from, and whose frozen teacher is, `params` —
  the previous depth's student (the start model at depth 0). Batches and the learning rate continue the
  schedule's over all depths (offset by the updates of the depths before), as the one-stage form has them;
  Adam's moments restart with each depth, as they do in each halving round. Returns (stage, its depth's plan)."""
  c = ctx.config
  d = c.dsd
  x_fn = start_model(ctx)[1]
  plan = schedule_plan(d, kind)
  per_depth = dsd.updates_per_depth(plan)
  offset, n = sum(per_depth[:depth]), plan[depth][0]
  cosine = optimizers.cosine_schedule(float(d.lr), int(d.updates), final_fraction=float(d.lr_final_fraction),
                                      warmup_steps=int(d.warmup_steps))
  schedule = lambda step: cosine(step + offset)
  optimizer = optax.chain(optax.clip_by_global_norm(float(d.grad_clip)),
                          optax.adam(schedule, b1=float(d.adam_b1), b2=float(d.adam_b2)))
  meta = tsd_depth_meta(d, kind, depth, train.fingerprint(params))
  whole = trajectory_batch_fn(plan, batch_size=d.batch_size, image_shape=ctx.image_shape,
                              num_classes=c.data.num_classes, w_min=d.w_min, w_max=d.w_max, seed=c.seed,
                              conditions_fn=ctx.data_conditions(d.batch_size))
  stage = train.Stage(
      name=f"tsd/{kind}/N{n:04d}", loss_fn=_loss(ctx, "tsd", x_fn), init_params=params, optimizer=optimizer,
      # seed + depth: the trainer counts steps from 0 in every stage, so each depth draws its own keys.
      num_steps=per_depth[depth], batch_fn=lambda step: whole(step + offset), seed=c.seed + depth,
      ema_decay=d.ema_decay, frozen={"teacher": params}, log_every=d.log_every, ckpt_every=d.ckpt_every,
      images_per_step=d.batch_size, lr_schedule=schedule, meta=meta.to_dict(), fsdp=c.mesh.fsdp,
      fsdp_min_size=c.mesh.fsdp_min_size)
  return stage, [plan[depth]]


def _run_tsd_by_depth(ctx: Context) -> dict:
  out = {}
  for kind in ctx.config.dsd.tsd_kinds:
    params = start_model(ctx)[0]
    for depth in range(len(schedule_plan(ctx.config.dsd, kind))):
      stage, plan = tsd_depth_stage(ctx, kind, depth, params)
      teacher = tsd_depth_name(ctx.config.dsd, kind, depth - 1) if depth else "the start model"
      print(f"[{stage.name}] depth {depth} (N, trajectories): {plan}; {stage.num_steps} updates, teacher: {teacher}")
      params, meta = run_stage(ctx, stage)
    _grid(ctx, stage.name, params, meta)
    out[kind] = (params, meta)
  return out


def run_tsd(ctx: Context) -> dict:
  """Stage 'tsd', DSD's teacher-student control. dsd.tsd_teacher='previous_depth' (the paper's reading: TSD
  "mimics" progressive distillation): each depth is a stage WORKDIR/tsd/<KIND>/N<N> whose teacher is the
  previous depth's student, the last depth's student the one scored. 'start_model': one stage per schedule,
  WORKDIR/tsd/<KIND>, the start model frozen as the teacher at every depth. Returns {kind: (params, meta)}."""
  if ctx.config.dsd.tsd_teacher == "previous_depth":
    return _run_tsd_by_depth(ctx)
  return _run_fine_tuning(ctx, "tsd")


# --- training DSD (§4.2, Eq. 1) ------------------------------------------------------------------------


def v_function(model):
  """The raw output of a v-prediction U-Net: v_fn(params, z, logsnr, labels, *, train, rng) -> v̂."""
  def v_fn(params, z, logsnr, labels, *, train: bool = False, rng=None):
    return model.apply({"params": params}, z, logsnr, labels, train=train,
                       rngs={"dropout": rng} if (train and rng is not None) else {})
  return v_fn


def training_stage(ctx: Context) -> train.Stage:
  """The teacher stage with Eq. 1's loss: the same architecture, init, data order, per-step draws, optimiser,
  EMA and budget (dsd.training_steps, 0 = teacher.num_steps), so β = 0 is the plain teacher's run."""
  c = ctx.config
  tc, d = c.teacher, c.dsd
  if c.model.parameterization != "v":
    raise train.TrainingError(f"training DSD trains v-prediction (Eq. 1); model.parameterization is "
                              f"{c.model.parameterization!r}")
  model = teacher_model(ctx)
  loss_fn = dsd.training_loss(v_function(model), logsnr_fn=ctx.logsnr_fn, distill_steps=d.training_distill_steps,
                              alpha=d.alpha, beta=d.beta, weighting=d.training_weighting, p_uncond=tc.p_uncond,
                              null_label=ctx.null_label)
  optimizer, schedule = optimizers.adam_with_warmup(tc.lr, tc.warmup_steps, tc.grad_clip, tc.weight_decay)
  meta = training_meta(c)
  return train.Stage(
      name="training_dsd", loss_fn=loss_fn, init_params=init_params(ctx, model),
      optimizer=optimizer, num_steps=d.training_steps or tc.num_steps,
      batch_fn=ctx.train_batches(tc.batch_size, plain=True), seed=c.seed, ema_decay=tc.ema_decay,
      log_every=tc.log_every, ckpt_every=tc.ckpt_every, skip_nonfinite=tc.skip_nonfinite,
      images_per_step=tc.batch_size, lr_schedule=schedule, meta=meta.to_dict(), fsdp=c.mesh.fsdp,
      fsdp_min_size=c.mesh.fsdp_min_size)


def run_training_dsd(ctx: Context):
  """Stage 'training_dsd': WORKDIR/training_dsd, scored beside the teacher (DDIM at the same step counts)."""
  stage = training_stage(ctx)
  params, meta = run_stage(ctx, stage)
  _grid(ctx, stage.name, params, meta)
  return params, meta


def _grid(ctx: Context, name: str, params, meta: contract.StageMeta):
  """A DSD student's grid, with the sampler of the model it started from (`registry.sampler`)."""
  write_student_grid(ctx, name, registry.sampler(ctx, params, meta)[0], ctx.config.distill.grid_w)
