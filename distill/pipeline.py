"""The config's pipeline of stages, run in order in one workdir.

    WORKDIR/config.json            the resolved config
    WORKDIR/teacher/               checkpoints/, final/, tb/, samples.png, eval.json
    WORKDIR/classifier/            the cached feature classifier of embedded data sets
    WORKDIR/summary.json           wall-clock per stage

Each stage resumes from its last checkpoint or is skipped when finished, so re-running the same
command after an interruption continues where it stopped. WORKDIR may be local or a URL (gs://bucket/run):
files go through etils.epath, checkpoints through Orbax.
"""
from __future__ import annotations

import functools
import importlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from distill import data as data_lib
from distill import models, parallel, samplers, schedules, train, writers
from distill.evaluation import classifier as classifier_lib
from distill.evaluation import protocol
from distill.methods import guided, progressive
from distill.methods import teacher as teacher_lib

EMBEDDED = protocol.EMBEDDED


class Context:
  """What every stage shares: config, workdir, data and the model family."""

  def __init__(self, config, workdir: str, train_source=None):
    self.config = config
    self.workdir = workdir
    self._train_source = train_source
    self.logsnr_fn = schedules.get_logsnr_fn(config.model.schedule, config.model.logsnr_min, config.model.logsnr_max)
    self.image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    self.null_label = config.data.num_classes
    self.is_main_process = jax.process_index() == 0
    self.cache = {}  # teacher parameters and x-functions shared by stages

  @property
  def train_source(self):
    if self._train_source is None:  # sampling from a checkpoint needs no data
      self._train_source = data_lib.make_source(self.config.data, "train")
    return self._train_source

  def stage_dir(self, name: str) -> str:
    return os.path.join(self.workdir, name)


def batch_fn(source, batch_size: int, seed: int):
  """step -> this process's rows of global batch `step` (numpy [batch_size // process_count, ...]);
  train.run_stage splits them over the devices, so batch_size must divide over all of them."""
  if batch_size % jax.device_count():
    raise data_lib.DataError(f"batch size {batch_size} does not split over the {jax.device_count()} devices; "
                             f"use a multiple of {jax.device_count()}")
  batches = data_lib.Batches(source, batch_size, seed, jax.process_index(), jax.process_count())
  return batches.batch_at


@functools.lru_cache(maxsize=8)
def init_params(model, image_shape: tuple, seed: int):
  """Fresh parameters of `model` (a w-input when it has a w-embedding); cached, as stages share inits."""
  b = 1
  z = jnp.zeros((b,) + tuple(image_shape))
  kwargs = {"w": jnp.zeros((b,))} if model.w_embedding else {}
  key = jax.random.PRNGKey(seed)
  init = jax.jit(lambda key: model.init(key, z, jnp.zeros((b,)), jnp.zeros((b,), jnp.int32), train=False, **kwargs))
  # Init runs once: XLA's lowest backend optimisation compiles it ~4x faster on CPU (5 s, not 20 s, for digits).
  return init.lower(key).compile({"xla_backend_optimization_level": 0})(key)["params"]


# --- stages ------------------------------------------------------------------------------------


def run_teacher(ctx: Context):
  c = ctx.config
  tc = c.teacher
  model = models.unet_from_config(c.model, c.data)
  optimizer, schedule = teacher_lib.adam_with_warmup(tc.lr, tc.warmup_steps, tc.grad_clip)
  stage = train.Stage(
      name="teacher",
      loss_fn=teacher_lib.teacher_loss(model, c.model.parameterization, tc.weighting, tc.p_uncond,
                                       ctx.logsnr_fn, ctx.null_label),
      init_params=init_params(model, ctx.image_shape, c.seed),
      optimizer=optimizer, num_steps=tc.num_steps,
      batch_fn=batch_fn(ctx.train_source, tc.batch_size, c.seed),
      seed=c.seed, ema_decay=tc.ema_decay, log_every=tc.log_every, ckpt_every=tc.ckpt_every,
      skip_nonfinite=tc.skip_nonfinite, images_per_step=tc.batch_size, lr_schedule=schedule,
      fsdp=c.mesh.fsdp, fsdp_min_size=c.mesh.fsdp_min_size,
      meta={"kind": "cfg_teacher", "sampler": "ddim", "num_sampling_steps": c.sample.num_steps,
            "parameterization": c.model.parameterization})
  stage_dir = ctx.stage_dir("teacher")
  params, meta = train.run_stage(stage, stage_dir, is_main_process=ctx.is_main_process)
  sample_fn = functools.partial(guided_ddim, params, model=model, parameterization=c.model.parameterization,
                                logsnr_fn=ctx.logsnr_fn, null_label=ctx.null_label, clip=c.sample.clip)
  if ctx.is_main_process and not epath.Path(stage_dir, "samples.png").exists():
    write_guided_grid(ctx, functools.partial(sample_fn, num_steps=c.sample.num_steps),
                      os.path.join(stage_dir, "samples.png"))
  if (ctx.is_main_process and c.eval.class_agreement and c.data.name in EMBEDDED
      and not epath.Path(stage_dir, "eval.json").exists()):
    report = teacher_class_agreement(ctx, functools.partial(sample_fn, num_steps=c.eval.agreement_steps))
    report["teacher_train_seconds"] = meta.get("train_seconds")
    writers.atomic_write_json(os.path.join(stage_dir, "eval.json"), report, indent=1)
    print(f"[teacher] class agreement: {report['agreement']} (classifier test accuracy "
          f"{report['classifier_test_accuracy']:.4f})")


# --- guided distillation: stage one, halving rounds, baselines -----------------------------------------


def _merge(fresh, loaded):
  """`fresh` with every entry that `loaded` also has replaced by loaded's: a student initialised from its
  teacher keeps only its new parameters (the zero-initialised w-embedding) from its own init."""
  if isinstance(fresh, dict):
    return {k: _merge(v, loaded[k]) if k in loaded else v for k, v in fresh.items()}
  if fresh.shape != loaded.shape:
    raise train.TrainingError(f"teacher parameter of shape {loaded.shape} does not fit student shape {fresh.shape}")
  return jnp.asarray(loaded)


def teacher_params(ctx: Context):
  """The CFG teacher's final parameters, read-only (WORKDIR/teacher or distill.teacher_dir)."""
  if "teacher" not in ctx.cache:
    stage_dir = ctx.config.distill.teacher_dir or ctx.stage_dir("teacher")
    params, meta = train.load_final_params(stage_dir)
    if meta.get("kind") != "cfg_teacher":
      raise train.TrainingError(f"{stage_dir}: not a CFG teacher (kind={meta.get('kind')!r})")
    ctx.cache["teacher"] = params
  return ctx.cache["teacher"]


def student_model(ctx: Context, w_conditioned: bool):
  c = ctx.config
  model_cfg = c.model.copy_and_resolve_references()
  model_cfg.dropout = c.distill.dropout
  return models.unet_from_config(model_cfg, c.data, w_embedding=w_conditioned)


def x_fn_of(ctx: Context, model):
  """One x-function per model (cached, so jitted functions that take it as static reuse compilations)."""
  key = ("x_fn", model)
  if key not in ctx.cache:
    ctx.cache[key] = models.x_function(model, ctx.config.model.parameterization)
  return ctx.cache[key]


def _distill_stage(ctx, name, loss_fn, init, frozen, num_steps, optimizer, schedule, ema, meta):
  c = ctx.config.distill
  return train.Stage(name=name, loss_fn=loss_fn, init_params=init, optimizer=optimizer, num_steps=num_steps,
                     batch_fn=batch_fn(ctx.train_source, c.batch_size, ctx.config.seed), seed=ctx.config.seed,
                     ema_decay=ema, frozen=frozen, log_every=c.log_every, ckpt_every=c.ckpt_every,
                     images_per_step=c.batch_size, lr_schedule=schedule, meta=meta,
                     fsdp=ctx.config.mesh.fsdp, fsdp_min_size=ctx.config.mesh.fsdp_min_size)


def run_stage_one_into(ctx: Context, name: str, w_min: float, w_max: float, w_conditioned: bool):
  """Algorithm 1: a student matching the CFG teacher's mix; w-conditioned over [w_min, w_max], or a
  single-w student without w input when w_min == w_max and not w_conditioned. Returns (params, model)."""
  c = ctx.config
  d = c.distill
  teacher = models.unet_from_config(c.model, c.data)
  student = student_model(ctx, w_conditioned)
  t_params = teacher_params(ctx)
  init = _merge(init_params(student, ctx.image_shape, c.seed),
                t_params)
  loss_fn = guided.stage_one_loss(x_fn_of(ctx, student), x_fn_of(ctx, teacher), logsnr_fn=ctx.logsnr_fn,
                                  null_label=ctx.null_label, w_min=w_min, w_max=w_max,
                                  weighting=d.stage_one_weighting)
  optimizer, schedule = teacher_lib.adam_with_warmup(d.stage_one_lr, d.stage_one_warmup, d.grad_clip)
  meta = {"kind": "w_student" if w_conditioned else "single_w_student", "sampler": "ddim",
          "num_sampling_steps": d.start_steps, "w_conditioned": w_conditioned, "w_range": [w_min, w_max],
          "round": 0, "stage_kind": "stage_one"}
  stage = _distill_stage(ctx, name, loss_fn, init, {"teacher": t_params}, d.stage_one_steps, optimizer, schedule,
                         d.stage_one_ema, meta)
  params, meta = train.run_stage(stage, ctx.stage_dir(name), is_main_process=ctx.is_main_process)
  _student_grid(ctx, name, student, params, meta)
  return params, student


def run_rounds(ctx: Context, name: str, kind: str, teacher_p, teacher_m, student_m, w_min, w_max,
               start_steps=None):
  """Halving rounds start_steps → … → end_steps. Round k's teacher is round k−1's final student (the
  first round's is `teacher_p`), and each student starts from its teacher's parameters."""
  c = ctx.config
  d = c.distill
  start_steps = start_steps or d.start_steps
  teacher_fingerprint = train.fingerprint(teacher_p)
  if teacher_m != student_m:
    # The first teacher lifted into the student's architecture: its extra layers (the w-embedding) are
    # zero-initialised, so it computes exactly what it computed before, and every round shares one loss.
    teacher_p = _merge(init_params(student_m, ctx.image_shape, c.seed), teacher_p)
  kw = dict(logsnr_fn=ctx.logsnr_fn, w_min=w_min, w_max=w_max, weighting=d.weighting)
  if kind == "two_student":
    kw["null_label"] = ctx.null_label
  student_x = x_fn_of(ctx, student_m)
  loss_fn = ROUND_LOSSES[kind](student_x, student_x, **kw)  # rounds reuse one compiled step
  for k, n in enumerate(progressive.round_plan(start_steps, d.end_steps), start=1):
    num_updates = d.final_round_steps if n <= 2 else d.round_steps
    optimizer, schedule = _annealed_adam(d.lr, num_updates, d.grad_clip)
    meta = {"kind": {"two_student": "two_student"}.get(kind, "w_student" if student_m.w_embedding else
                                                         "single_w_student"),
            "sampler": {"stochastic": "stochastic", "encoder": "encoder"}.get(kind, "ddim"),
            "num_sampling_steps": n, "w_conditioned": bool(student_m.w_embedding), "w_range": [w_min, w_max],
            "round": k, "stage_kind": kind, "teacher_steps": 2 * n,
            "teacher_fingerprint": teacher_fingerprint}
    round_name = f"{name}/N{n:04d}"
    # Each student starts from its teacher's parameters.
    stage = _distill_stage(ctx, round_name, loss_fn, teacher_p, {"teacher": teacher_p, "num_steps": jnp.int32(n)},
                           num_updates, optimizer, schedule, None, meta)
    params, meta = train.run_stage(stage, ctx.stage_dir(round_name), is_main_process=ctx.is_main_process)
    if kind != "encoder":
      _student_grid(ctx, round_name, student_m, params, meta)
    teacher_p = params
    teacher_fingerprint = train.fingerprint(teacher_p)
  return teacher_p


@functools.lru_cache(maxsize=8)
def _annealed_adam(lr, num_updates, grad_clip):
  """Adam with lr annealed linearly to 0 over the round (cached: equal rounds share one compiled step)."""
  schedule = optax.linear_schedule(lr, 0.0, num_updates)
  return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(schedule)), schedule


ROUND_LOSSES = {
    "deterministic": progressive.deterministic_round_loss,
    "stochastic": progressive.stochastic_round_loss,
    "encoder": progressive.encoder_round_loss,
    "two_student": progressive.two_student_round_loss,
}


def run_stage_one(ctx: Context):
  d = ctx.config.distill
  run_stage_one_into(ctx, "stage_one", d.w_min, d.w_max, w_conditioned=True)


def _stage_one_result(ctx: Context):
  params, _ = train.load_final_params(ctx.stage_dir("stage_one"))
  return params, student_model(ctx, w_conditioned=True)


def run_distill_deterministic(ctx: Context):
  params, model = _stage_one_result(ctx)
  run_rounds(ctx, "distill_deterministic", "deterministic", params, model, model, ctx.config.distill.w_min,
             ctx.config.distill.w_max)


def run_distill_stochastic(ctx: Context):
  params, model = _stage_one_result(ctx)
  run_rounds(ctx, "distill_stochastic", "stochastic", params, model, model, ctx.config.distill.w_min,
             ctx.config.distill.w_max)


def run_encoder(ctx: Context):
  d = ctx.config.distill
  params, model = _stage_one_result(ctx)
  run_rounds(ctx, "encoder", "encoder", params, model, model, d.w_min, d.w_max,
             start_steps=d.encoder_start_steps or None)


def run_single_w(ctx: Context):
  """The paper's Single-w baseline: per fixed w, a stage-one student without w input and its rounds."""
  for w in ctx.config.baselines.single_w:
    name = f"single_w/w{float(w):g}"
    params, model = run_stage_one_into(ctx, f"{name}/stage_one", float(w), float(w), w_conditioned=False)
    run_rounds(ctx, name, "deterministic", params, model, model, float(w), float(w),
               start_steps=ctx.config.baselines.start_steps or None)


def run_two_student(ctx: Context):
  """Algorithm 5 baseline: the CFG teacher's (conditional, unconditional) pair distilled as a pair."""
  c = ctx.config
  teacher = models.unet_from_config(c.model, c.data)
  run_rounds(ctx, "two_student", "two_student", teacher_params(ctx), teacher, student_model(ctx, True),
             c.distill.w_min, c.distill.w_max, start_steps=c.baselines.start_steps or None)


def run_evaluate(ctx: Context):
  from distill import evaluate  # it builds on this module's sampling helpers
  evaluate.run_stage(ctx)


def _lazy(module: str, name: str):
  """A registry entry that imports its method's module when first called (the method modules build on this one)."""
  return lambda *args, **kwargs: getattr(importlib.import_module(module), name)(*args, **kwargs)


# Stage name (config.pipeline) -> fn(ctx). Each stage writes under WORKDIR/<name>/; every directory below it
# holding a finished `train.run_stage` (final/) is a student the evaluate stage scores, as its meta describes.
STAGES = {"teacher": run_teacher, "stage_one": run_stage_one, "distill_deterministic": run_distill_deterministic,
          "distill_stochastic": run_distill_stochastic, "single_w": run_single_w, "two_student": run_two_student,
          "encoder": run_encoder,
          "sfd": _lazy("distill.stages.sfd", "run_sfd"), "sfd_v": _lazy("distill.stages.sfd", "run_sfd_v"),
          "sfd_one_nfe": _lazy("distill.stages.sfd", "run_second_stage"),
          "dsd": _lazy("distill.stages.dsd", "run_dsd"), "tsd": _lazy("distill.stages.dsd", "run_tsd"),
          "training_dsd": _lazy("distill.stages.dsd", "run_training_dsd"),
          "evaluate": run_evaluate}


def run(config, workdir: str, train_source=None):
  """Runs config.pipeline in order; writes WORKDIR/summary.json with wall-clock per stage."""
  ctx = Context(config, workdir, train_source)
  summary_path = os.path.join(workdir, "summary.json")
  summary = {}
  if epath.Path(summary_path).exists():
    summary = writers.read_json(summary_path)
  for name in config.pipeline:
    start = time.time()
    STAGES[name](ctx)
    summary.setdefault("wall_clock_seconds", {})[name] = summary.get("wall_clock_seconds", {}).get(name, 0.0) + (
        time.time() - start)
    if ctx.is_main_process:  # renamed into place: a kill never leaves half a file
      writers.atomic_write_json(summary_path, summary, indent=1)
  return summary


# --- sampling and evaluation helpers ----------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "parameterization", "logsnr_fn", "null_label", "clip",
                                             "sampler"))
def guided_ddim(params, z, labels, w, *, model, parameterization: str, logsnr_fn, num_steps, null_label: int,
                clip: bool, sampler: str = "ddim"):
  """CFG teacher samples: z [B,H,W,C], labels [B], w [B] → x [B,H,W,C] (2·num_steps evaluations).
  sampler: 'ddim' or 'ddpm' (ancestral, noise from a fixed key). num_steps is traced: one compilation
  serves every step count."""
  model_fn = models.x_prediction_fn(model, params, parameterization)
  den = samplers.guided_denoiser(model_fn, labels, w, null_label)
  if sampler == "ddpm":
    return samplers.ddpm_sample(den, z, logsnr_fn, num_steps, jax.random.PRNGKey(17), clip=clip).x
  return samplers.ddim_sample(den, z, logsnr_fn, num_steps, clip=clip).x


def sample_in_chunks(fn, z, labels, w, chunk: int):
  """fn over rows in chunks of exactly `chunk` rows (the last one padded), so every call of a jitted
  sampler has one shape and compiles once. With several devices each chunk (rounded up to a multiple of
  the device count) is split over them (`parallel.batch_sharding`). z [B, ...], labels [B], w [B] → [B, ...]
  numpy."""
  sharding = None
  if jax.device_count() > 1 and jax.process_count() == 1:
    chunk = -(-chunk // jax.device_count()) * jax.device_count()
    sharding = parallel.batch_sharding(parallel.make_mesh())
  outs = []
  for i in range(0, len(z), chunk):
    pad = max(0, i + chunk - len(z))
    part = [jnp.concatenate([a[i:i + chunk], jnp.repeat(a[-1:], pad, axis=0)]) for a in (z, labels, w)]
    if sharding is not None:
      part = [jax.device_put(a, sharding) for a in part]
    outs.append(np.asarray(fn(*part))[:chunk - pad])
  return np.concatenate(outs)


def write_guided_grid(ctx: Context, fn, path: str, seed: int = 1):
  """Sample grid PNG: rows = classes, columns = guidance w (per_cell samples each; the same noise
  across w within a row, so columns show the effect of w alone)."""
  c = ctx.config
  k = min(c.data.num_classes, c.sample.max_grid_classes)
  ws = np.asarray(c.sample.w_values, np.float32)
  per = c.sample.per_cell
  noise = jax.random.normal(jax.random.PRNGKey(seed), (k, 1, per) + ctx.image_shape)
  z = jnp.broadcast_to(noise, (k, len(ws), per) + ctx.image_shape).reshape((-1,) + ctx.image_shape)
  labels = jnp.repeat(jnp.arange(k), len(ws) * per)
  w = jnp.tile(jnp.repeat(jnp.asarray(ws), per), k)
  x = sample_in_chunks(fn, z, labels, w, c.sample.batch_size)
  writers.save_image_grid(path, x, ncols=len(ws) * per, upscale=max(1, 128 // ctx.image_shape[0]))
  return x


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


def _guided_student_sampler(ctx: Context, params, meta, num_steps: int, sampler: str | None = None):
  """The built-in samplers of guided-PD students ('ddim', 'stochastic'): one evaluation per step (two for a
  two-student pair)."""
  rng = jax.random.PRNGKey(ctx.config.seed + 7)
  pair = meta["kind"] == "two_student"
  x_fn = x_fn_of(ctx, student_model(ctx, meta["w_conditioned"]))
  fn = lambda z, labels, w: sample_student(
      params, z, labels, w, rng, x_fn=x_fn, logsnr_fn=ctx.logsnr_fn, num_steps=int(num_steps),
      sampler=sampler or meta["sampler"], pair=pair, null_label=ctx.null_label, clip=ctx.config.sample.clip)
  return fn, (2 if pair else 1) * int(num_steps)


def _cfg_sampler(ctx: Context, params, meta, num_steps: int):
  """'cfg_ddim': a model of the CFG teacher's architecture (no w input) guided at sampling, 2 evaluations per step."""
  c = ctx.config
  model = models.unet_from_config(c.model, c.data)
  fn = functools.partial(guided_ddim, params, model=model, parameterization=c.model.parameterization,
                         logsnr_fn=ctx.logsnr_fn, null_label=ctx.null_label, clip=c.sample.clip,
                         num_steps=int(num_steps))
  return fn, 2 * int(num_steps)


# meta['sampler'] of a student checkpoint -> fn(ctx, params, meta, num_steps) -> (sample_fn(z, labels, w) -> x,
# network evaluations per sample). z: [B, H, W, C] VP noise N(0, I) (every method maps the same noise),
# labels [B] int32, w [B] float32; x in [-1, 1]. 'encoder' checkpoints are not sampled.
STUDENT_SAMPLERS = {
    "ddim": functools.partial(_guided_student_sampler, sampler="ddim"),
    "stochastic": functools.partial(_guided_student_sampler, sampler="stochastic"),
    "cfg_ddim": _cfg_sampler,
    "sfd": _lazy("distill.stages.sfd", "sample_fn"),
}


def student_sampler(ctx: Context, params, meta, num_steps=None, sampler=None):
  """(fn(z, labels, w) -> x, evaluations per sample) for the student a checkpoint's meta describes, at its own
  step count and sampler unless given (a guided-PD student can be sampled 'ddim' or 'stochastic')."""
  num_steps = int(num_steps or meta["num_sampling_steps"])
  sampler = sampler or meta["sampler"]
  if sampler not in STUDENT_SAMPLERS:
    raise ValueError(f"sampler {sampler!r} of this checkpoint is not one of {sorted(STUDENT_SAMPLERS)}")
  if sampler != meta["sampler"] and meta["sampler"] not in ("ddim", "stochastic"):
    raise ValueError(f"a {meta['sampler']!r} checkpoint samples with {meta['sampler']!r} only, not {sampler!r}")
  return STUDENT_SAMPLERS[sampler](ctx, params, meta, num_steps)


def student_sample_fn(ctx: Context, model, params, meta, num_steps=None, sampler=None):
  """fn(z, labels, w) sampling the student a checkpoint's meta describes (its own steps and sampler by default).
  `model` is rebuilt from the meta; the argument stays for callers that already hold it."""
  del model
  return student_sampler(ctx, params, meta, num_steps, sampler)[0]


def _student_grid(ctx: Context, name: str, model, params, meta, seed: int = 1):
  """Sample grid PNG of a student: rows = distill.grid_w, columns = classes (the same noise down a column)."""
  if not ctx.is_main_process:
    return
  c = ctx.config
  k = min(c.data.num_classes, c.sample.max_grid_classes)
  ws = np.asarray(c.distill.grid_w, np.float32)
  noise = jax.random.normal(jax.random.PRNGKey(seed), (1, k) + ctx.image_shape)
  z = jnp.broadcast_to(noise, (len(ws), k) + ctx.image_shape).reshape((-1,) + ctx.image_shape)
  labels = jnp.tile(jnp.arange(k), len(ws))
  w = jnp.repeat(jnp.asarray(ws), k)
  x = sample_in_chunks(student_sample_fn(ctx, model, params, meta), z, labels, w, c.sample.batch_size)
  writers.save_image_grid(os.path.join(ctx.stage_dir(name), "samples.png"), x, ncols=k,
                          upscale=max(1, 128 // ctx.image_shape[0]))


def get_classifier(ctx: Context):
  """The feature classifier of an embedded data set, trained once and cached in WORKDIR/classifier."""
  c = ctx.config
  path = os.path.join(ctx.workdir, "classifier", f"{c.data.name}.npz")
  if epath.Path(path).exists():
    return classifier_lib.load_classifier(path)
  test_source = data_lib.make_source(c.data, "test")
  tr = ctx.train_source.get_batch(np.arange(len(ctx.train_source)))
  te = test_source.get_batch(np.arange(len(test_source)))
  start = time.time()
  params, acc = classifier_lib.train_classifier(tr["image"], tr["label"], te["image"], te["label"],
                                                num_classes=c.data.num_classes, seed=c.seed,
                                                steps=c.eval.classifier_steps)
  meta = {"test_accuracy": float(acc), "num_train": len(tr["label"]), "num_test": len(te["label"]),
          "data": c.data.name, "train_seconds": time.time() - start}
  classifier_lib.save_classifier(path, params, meta)  # atomically, creating the directory
  print(f"[classifier] {c.data.name}: test accuracy {acc:.4f} ({meta['train_seconds']:.0f}s)")
  return params, meta


def teacher_class_agreement(ctx: Context, fn) -> dict:
  """Fraction of balanced class-conditional teacher samples the classifier assigns to their class."""
  c = ctx.config
  params, meta = get_classifier(ctx)
  k = c.data.num_classes
  labels = jnp.repeat(jnp.arange(k), c.eval.agreement_per_class)
  agreement = {}
  for w in c.eval.agreement_w:
    z = jax.random.normal(jax.random.PRNGKey(1000 + c.seed), (len(labels),) + ctx.image_shape)
    x = sample_in_chunks(fn, z, labels, jnp.full((len(labels),), w, jnp.float32), c.sample.batch_size)
    agreement[str(float(w))] = classifier_lib.class_agreement(params, x, np.asarray(labels), k)
  return {"agreement": agreement, "sampler": "ddim", "steps": c.eval.agreement_steps,
          "nfe": 2 * c.eval.agreement_steps, "samples": int(len(labels)),
          "classifier_test_accuracy": meta["test_accuracy"]}
