"""Guided distillation's pipeline stages (Meng et al. 2023): stage one (Alg. 1), deterministic and stochastic
halving (Alg. 2, 3), the single-w and two-student (Alg. 5) baselines, encoder distillation (Alg. 4), and the
samplers of their students ('ddim', 'stochastic')."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distill import contract, optimizers, samplers, train
from distill.context import (Context, init_params, load_stage, run_stage, student_model, teacher_model,
                             teacher_params, write_student_grid, x_fn_of)
from distill.methods.guided import progressive
from distill.methods.guided import stage_one as guided

STAGE_ONE = "stage_one"


def _training_stage(ctx, name, loss_fn, init, frozen, num_steps, optimizer, schedule, ema):
  c = ctx.config.distill
  return train.Stage(name=name, loss_fn=loss_fn, init_params=init, optimizer=optimizer, num_steps=num_steps,
                     batch_fn=ctx.train_batches(c.batch_size), seed=ctx.config.seed,
                     ema_decay=ema, frozen=frozen, log_every=c.log_every, ckpt_every=c.ckpt_every,
                     images_per_step=c.batch_size, lr_schedule=schedule,
                     fsdp=ctx.config.mesh.fsdp, fsdp_min_size=ctx.config.mesh.fsdp_min_size)


def run_stage_one_into(ctx: Context, name: str, w_min: float, w_max: float, w_conditioned: bool, method: str):
  """Algorithm 1: a student matching the CFG teacher's mix; w-conditioned over [w_min, w_max], or a
  single-w student without w input when w_min == w_max and not w_conditioned. Returns (params, model)."""
  d = ctx.config.distill
  student = student_model(ctx, w_embedding=w_conditioned)
  t_params = teacher_params(ctx)
  loss_fn = guided.stage_one_loss(x_fn_of(ctx, student), x_fn_of(ctx, teacher_model(ctx)), logsnr_fn=ctx.logsnr_fn,
                                  null_label=ctx.null_label, w_min=w_min, w_max=w_max,
                                  weighting=d.stage_one_weighting)
  optimizer, schedule = optimizers.adam_with_warmup(d.stage_one_lr, d.stage_one_warmup, d.grad_clip)
  meta = stage_one_meta(d, w_min, w_max, w_conditioned, method)
  stage = _training_stage(ctx, name, loss_fn, init_params(ctx, student, t_params), {"teacher": t_params},
                          d.stage_one_steps, optimizer, schedule, d.stage_one_ema)
  params, meta = run_stage(ctx, stage, meta)
  write_student_grid(ctx, name, student_sampler(ctx, params, meta, meta.num_sampling_steps, "ddim")[0], d.grid_w)
  return params, student


ROUND_LOSSES = {
    "deterministic": progressive.deterministic_round_loss,
    "stochastic": progressive.stochastic_round_loss,
    "encoder": progressive.encoder_round_loss,
    "two_student": progressive.two_student_round_loss,
}


def run_rounds(ctx: Context, name: str, kind: str, teacher_p, student_m, w_min, w_max, *, method: str,
               start_steps=None, parent: str | None = None):
  """Halving rounds start_steps → … → end_steps under WORKDIR/<name>/N<steps>. Round k's teacher is round k−1's
  final student (the first round's is `teacher_p`, a model of `student_m`'s architecture or the CFG teacher's),
  and each student starts from its teacher's parameters. parent: the stage the first teacher came from (its
  cost is part of every round's)."""
  d = ctx.config.distill
  start_steps = start_steps or d.start_steps
  teacher_fingerprint = train.fingerprint(teacher_p)
  # The CFG teacher lifted into the student's architecture: its extra layers (the w-embedding) are
  # zero-initialised, so it computes exactly what it computed before, and every round shares one loss.
  teacher_p = init_params(ctx, student_m, teacher_p)
  kw = dict(logsnr_fn=ctx.logsnr_fn, w_min=w_min, w_max=w_max, weighting=d.weighting)
  if kind == "two_student":
    kw["null_label"] = ctx.null_label
  student_x = x_fn_of(ctx, student_m)
  loss_fn = ROUND_LOSSES[kind](student_x, student_x, **kw)  # rounds reuse one compiled step
  for k, n in enumerate(progressive.round_plan(start_steps, d.end_steps), start=1):
    num_updates = round_updates(d, n)
    if kind == "stochastic" and n == 1:
      # Alg. 3 at N = 1 has only i = 1, whose target is the teacher's own x̂(z_1): the student starts at the
      # optimum (loss 0, gradient 0 but for float rounding), and Adam's normalised updates would turn that
      # rounding noise, which depends on the device layout, into lr-sized steps. The student is its teacher.
      num_updates = 0
    optimizer, schedule = optimizers.annealed_adam(d.lr, num_updates, d.grad_clip, d.round_warmup)
    round_name = f"{name}/N{n:04d}"
    meta = round_meta(d, kind, k, n, w_min, w_max, bool(student_m.w_embedding), method, parent,
                      teacher_fingerprint)
    stage = _training_stage(ctx, round_name, loss_fn, teacher_p, {"teacher": teacher_p, "num_steps": jnp.int32(n)},
                            num_updates, optimizer, schedule, None)
    params, meta = run_stage(ctx, stage, meta)
    if kind != "encoder":
      write_student_grid(ctx, round_name, student_sampler(ctx, params, meta, n, meta.sampler)[0], d.grid_w)
    teacher_p, parent = params, round_name
    teacher_fingerprint = train.fingerprint(teacher_p)
  return teacher_p


def round_updates(d, n: int) -> int:
  """Updates of the halving round to an n-step student (d: config.distill): final_round_steps for n in
  final_rounds, else round_steps (the warm-up, round_warmup, is part of them)."""
  return d.final_round_steps if n in tuple(d.final_rounds) else d.round_steps


def stage_one_meta(d, w_min: float, w_max: float, w_conditioned: bool, method: str) -> contract.StageMeta:
  """Stage one's record (d: config.distill). Its target is the CFG teacher's (conditional, unconditional) pair:
  2 teacher evaluations per example."""
  return contract.StageMeta(
      kind="w_student" if w_conditioned else "single_w_student", method=method, sampler="ddim",
      num_sampling_steps=d.start_steps, w_range=(w_min, w_max), w_conditioned=w_conditioned,
      batch_size=d.batch_size, teacher_evals_per_update=2.0, student_evals_per_update=1.0,
      extra={"round": 0, "stage_kind": "stage_one"})


def round_meta(d, kind: str, k: int, n: int, w_min: float, w_max: float, w_conditioned: bool, method: str,
               parent: str | None, teacher_fingerprint: str = "") -> contract.StageMeta:
  """Round k's record (an n-step student; d: config.distill): two teacher DDIM steps per example, each a pair's
  2 evaluations for the two-student baseline, which also samples with 2 per step."""
  pair = kind == "two_student"
  return contract.StageMeta(
      kind="two_student" if pair else ("w_student" if w_conditioned else "single_w_student"),
      method=method, sampler={"stochastic": "stochastic", "encoder": ""}.get(kind, "ddim"),
      report_sampler="stochastic" if kind == "stochastic" else "deterministic",
      num_sampling_steps=n, w_range=(w_min, w_max), w_conditioned=w_conditioned,
      batch_size=d.batch_size, teacher_evals_per_update=4.0 if pair else 2.0,
      student_evals_per_update=2.0 if pair else 1.0, evals_per_step=2 if pair else 1,
      cost_parents=(parent,) if parent else (), scored=kind != "encoder",
      extra={"round": k, "stage_kind": kind, "teacher_steps": 2 * n, "teacher_fingerprint": teacher_fingerprint})


def plan(config, stage: str) -> list[tuple[str, contract.StageMeta]]:
  """The stages `stage` writes, with their records (teacher fingerprints left empty)."""
  d, b = config.distill, config.baselines

  def rounds(name, kind, w_min, w_max, w_conditioned, method, start, parent):
    return [(f"{name}/N{n:04d}", round_meta(d, kind, k, n, w_min, w_max, w_conditioned, method,
                                            parent if k == 1 else f"{name}/N{2 * n:04d}"))
            for k, n in enumerate(progressive.round_plan(start or d.start_steps, d.end_steps), start=1)]

  if stage == "stage_one":
    return [(STAGE_ONE, stage_one_meta(d, d.w_min, d.w_max, True, "stage one"))]
  if stage in ("distill_deterministic", "distill_stochastic", "encoder"):
    kind = {"distill_deterministic": "deterministic", "distill_stochastic": "stochastic"}.get(stage, "encoder")
    start = d.encoder_start_steps if stage == "encoder" else 0
    return rounds(stage, kind, d.w_min, d.w_max, True, "encoder" if kind == "encoder" else "guided PD", start,
                  STAGE_ONE)
  if stage == "two_student":
    return rounds("two_student", "two_student", d.w_min, d.w_max, True, "two-student", b.start_steps, None)
  out = []
  for w in b.single_w:
    name, label = f"single_w/w{float(w):g}", f"single-w (w={float(w):g})"
    out.append((f"{name}/stage_one", stage_one_meta(d, float(w), float(w), False, label)))
    out += rounds(name, "deterministic", float(w), float(w), False, label, b.start_steps, f"{name}/stage_one")
  return out


def run_stage_one(ctx: Context):
  d = ctx.config.distill
  run_stage_one_into(ctx, STAGE_ONE, d.w_min, d.w_max, w_conditioned=True, method="stage one")


def _stage_one_result(ctx: Context, stage: str):
  params, _ = load_stage(ctx, STAGE_ONE, needed_by=f"the {stage!r} stage")
  return params, student_model(ctx, w_embedding=True)


def run_distill_deterministic(ctx: Context):
  params, model = _stage_one_result(ctx, "distill_deterministic")
  d = ctx.config.distill
  run_rounds(ctx, "distill_deterministic", "deterministic", params, model, d.w_min, d.w_max, method="guided PD",
             parent=STAGE_ONE)


def run_distill_stochastic(ctx: Context):
  params, model = _stage_one_result(ctx, "distill_stochastic")
  d = ctx.config.distill
  run_rounds(ctx, "distill_stochastic", "stochastic", params, model, d.w_min, d.w_max, method="guided PD",
             parent=STAGE_ONE)


def run_encoder(ctx: Context):
  d = ctx.config.distill
  params, model = _stage_one_result(ctx, "encoder")
  run_rounds(ctx, "encoder", "encoder", params, model, d.w_min, d.w_max, method="encoder",
             start_steps=d.encoder_start_steps or None, parent=STAGE_ONE)


def run_single_w(ctx: Context):
  """The paper's Single-w baseline: per fixed w, a stage-one student without w input and its rounds."""
  for w in ctx.config.baselines.single_w:
    name, label = f"single_w/w{float(w):g}", f"single-w (w={float(w):g})"
    params, model = run_stage_one_into(ctx, f"{name}/stage_one", float(w), float(w), w_conditioned=False,
                                       method=label)
    run_rounds(ctx, name, "deterministic", params, model, float(w), float(w), method=label,
               start_steps=ctx.config.baselines.start_steps or None, parent=f"{name}/stage_one")


def run_two_student(ctx: Context):
  """Algorithm 5 baseline: the CFG teacher's (conditional, unconditional) pair distilled as a pair."""
  c = ctx.config
  run_rounds(ctx, "two_student", "two_student", teacher_params(ctx), student_model(ctx, w_embedding=True),
             c.distill.w_min, c.distill.w_max, method="two-student", start_steps=c.baselines.start_steps or None)


# --- samplers ------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("x_fn", "logsnr_fn", "sampler", "pair", "null_label", "clip"))
def sample_student(params, z, labels, w, rng, *, x_fn, logsnr_fn, num_steps, sampler: str, pair: bool,
                   null_label: int, clip: bool):
  """Samples of a distilled student: z [B,H,W,C], labels [B], w [B] → x [B,H,W,C]. num_steps is traced.

  sampler: 'ddim' (deterministic) or 'stochastic' (Eq. 4–7); pair: a two-student model (2 evaluations/step).
  """
  den = (progressive.two_student_denoiser(x_fn, params, labels, w, null_label) if pair
         else progressive.student_denoiser(x_fn, params, labels, w))
  if sampler == "stochastic":
    return samplers.stochastic_sample(den, z, logsnr_fn, num_steps, rng, clip=clip).x
  return samplers.ddim_sample(den, z, logsnr_fn, num_steps, clip=clip).x


def student_sampler(ctx: Context, params, meta: contract.StageMeta, num_steps: int, sampler: str):
  """'ddim' / 'stochastic': a guided-PD student (either sampler serves any of them), one evaluation per step;
  two for a two-student pair."""
  rng = jax.random.PRNGKey(ctx.config.seed + 7)
  pair = meta.kind == "two_student"
  x_fn = x_fn_of(ctx, student_model(ctx, w_embedding=meta.w_conditioned))
  fn = lambda z, labels, w: sample_student(
      params, z, labels, w, rng, x_fn=x_fn, logsnr_fn=ctx.logsnr_fn, num_steps=int(num_steps),
      sampler=sampler, pair=pair, null_label=ctx.null_label, clip=ctx.config.sample.clip)
  return fn, (2 if pair else 1) * int(num_steps)
