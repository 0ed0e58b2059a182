"""The classifier-free-guided teacher: one network trained conditional and unconditional jointly, the model every
method distils. Registers the 'teacher' stage, the 'cfg_ddim' / 'cfg_ddpm' samplers (any model of the teacher's
architecture, guided at sampling: 2 evaluations per step) and the config section 'teacher'.

Each example's label is replaced by the null class with probability p_uncond (0.1 in the guidance
literature); the loss is the x-space ω(λ)·‖x̂ − x‖² with t ~ U[0, 1] (docs/design.md §3).

The 'teacher_v' stage is the guided-distillation paper's ε → v fine-tuning (§4.2, App. C): a teacher trained to
predict ε (`teacher.parameterization='eps'`, as Stable Diffusion and the LDMs are) is trained on, from its own
weights, with the same loss but its output read as v, for `teacher.v_steps` updates (a teacher that already
predicts v is simply trained on). The distilling stages then
read WORKDIR/teacher_v (`context.teacher_dir`).

The 'teacher_inpaint' stage (inpaint.enabled; §4.2.4) makes an inpainting teacher the way Stable Diffusion
Inpainting was made from Stable Diffusion: the finished teacher (teacher_v, else teacher) gains input channels
for the mask and the masked image, zero-initialised so that it starts out computing exactly what it computed,
and is fine-tuned for `teacher.inpaint_steps` on (label, mask, masked image) conditions (`distill.conditions`).
Every later stage of the run distils it.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax.numpy as jnp
import ml_collections
import optax
from etils import epath

from distill import conditions, contract, diffusion, models, optimizers, train, validation, writers
from distill.context import (EMBEDDED, Context, cfg_sample, init_params, run_stage, teacher_class_agreement,
                             teacher_model, write_cfg_grid)
from distill.losses import LossFn, noised_batch
from distill.schedules import LogSNRFn

TEACHER, TEACHER_V, TEACHER_INPAINT = "teacher", "teacher_v", "teacher_inpaint"


def teacher_loss(model, parameterization: str, weighting: str, p_uncond: float, logsnr_fn: LogSNRFn,
                 null_label: int) -> LossFn:
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


# --- the stage ---------------------------------------------------------------------------------------


def trained_parameterization(config) -> str:
  """What the 'teacher' stage trains its network to predict: teacher.parameterization, '' = model's."""
  return config.teacher.parameterization or config.model.parameterization


def stage_meta(config, name: str = TEACHER) -> contract.StageMeta:
  """A teacher's record: CFG-sampled at any w >= 0. 'teacher' is trained from data (no teacher evaluations);
  'teacher_v' fine-tunes it into v-prediction and 'teacher_inpaint' into an inpainting model (their costs build
  on the teachers they start from)."""
  fine_tuned_v = TEACHER_V in config.pipeline
  parents = {TEACHER: (), TEACHER_V: (TEACHER,),
             TEACHER_INPAINT: (TEACHER_V, TEACHER) if fine_tuned_v else (TEACHER,)}[name]
  predicts = "v" if name == TEACHER_V or (name == TEACHER_INPAINT and fine_tuned_v) else trained_parameterization(config)
  extra = {"parameterization": predicts}
  if name == TEACHER_INPAINT:
    extra["inpaint"] = True
  return contract.StageMeta(
      kind="cfg_teacher", method="teacher", sampler="cfg_ddim", num_sampling_steps=int(config.sample.num_steps),
      w_range=(0.0, float("inf")), batch_size=int(config.teacher.batch_size), teacher_evals_per_update=0.0,
      student_evals_per_update=1.0, evals_per_step=2, scored=False, cost_parents=parents, extra=extra)


def _train(ctx: Context, name: str, parameterization: str, num_steps: int, lr: float, weighting: str, start=None):
  """Trains the CFG loss under WORKDIR/<name> (from `start`'s parameters, else fresh; 'teacher_inpaint' from a
  plain teacher's, extended) and writes its grid and class agreement. Returns the parameters."""
  c = ctx.config
  tc = c.teacher
  plain = name != TEACHER_INPAINT
  model = teacher_model(ctx, plain=plain)
  if plain:
    init = init_params(ctx, model, start)
  else:
    try:
      init = models.extend_input_channels(models.init_params(model, ctx.image_shape, c.seed), start)
    except ValueError as e:
      raise train.TrainingError(f"teacher_inpaint: {e}") from e
  optimizer, schedule = optimizers.adam_with_warmup(lr, tc.warmup_steps, tc.grad_clip, tc.weight_decay)
  stage = train.Stage(
      name=name,
      loss_fn=teacher_loss(model, parameterization, weighting, tc.p_uncond, ctx.logsnr_fn, ctx.null_label),
      init_params=init, optimizer=optimizer, num_steps=num_steps,
      batch_fn=ctx.train_batches(tc.batch_size, plain=plain),
      seed=c.seed, ema_decay=tc.ema_decay, log_every=tc.log_every, ckpt_every=tc.ckpt_every,
      skip_nonfinite=tc.skip_nonfinite, images_per_step=tc.batch_size, lr_schedule=schedule,
      fsdp=c.mesh.fsdp, fsdp_min_size=c.mesh.fsdp_min_size)
  stage_dir = ctx.stage_dir(name)
  params, meta = run_stage(ctx, stage, stage_meta(c, name))
  guided = functools.partial(cfg_sample, params, model=model, parameterization=parameterization,
                             logsnr_fn=ctx.logsnr_fn, null_label=ctx.null_label, clip=c.sample.clip)
  # A plain teacher of an inpainting run is sampled at the labels of the run's conditions.
  sample_fn = guided if not plain or not ctx.inpaint else (
      lambda z, cond, w, **kw: guided(z, conditions.without_image(cond), w, **kw))
  if ctx.is_main_process and not epath.Path(stage_dir, "samples.png").exists():
    write_cfg_grid(ctx, functools.partial(sample_fn, num_steps=c.sample.num_steps), os.path.join(stage_dir, "samples.png"))
  if (ctx.is_main_process and c.eval.class_agreement and c.data.name in EMBEDDED
      and not epath.Path(stage_dir, "eval.json").exists()):
    report = teacher_class_agreement(ctx, functools.partial(sample_fn, num_steps=c.eval.agreement_steps))
    report["teacher_train_seconds"] = train.load_final_params(stage_dir)[1].get("train_seconds")
    writers.atomic_write_json(os.path.join(stage_dir, "eval.json"), report, indent=1)
    print(f"[{name}] class agreement: {report['agreement']} (classifier test accuracy "
          f"{report['classifier_test_accuracy']:.4f})")
  return params


def run_teacher(ctx: Context):
  c = ctx.config
  if c.model.get("kind") == "sd_unet" and c.model.sd.get("weights"):
    return import_sd_teacher(ctx)
  _train(ctx, TEACHER, trained_parameterization(c), c.teacher.num_steps, c.teacher.lr, c.teacher.weighting)


def import_sd_teacher(ctx: Context):
  """'teacher' from a Stable Diffusion folder (model.sd.weights): its U-Net, with the empty prompt's hidden states as
  the null context (`sd_import.teacher_from_sd`), becomes final/ through the trainer with 0 updates; the folder is
  read once (a finished stage is not read again)."""
  from distill import sd_import
  c = ctx.config
  folder = c.model.sd.weights
  model = teacher_model(ctx, plain=True)
  init, extra = None, {}
  if not train.has_final(ctx.stage_dir(TEACHER)):
    encoder = ctx.text_encoder if isinstance(ctx.text_encoder, sd_import.SDTextEncoder) else None
    try:
      init, extra = sd_import.teacher_from_sd(folder, model, ctx.image_shape, text_encoder=encoder)
    except (OSError, ValueError) as e:
      raise train.TrainingError(f"model.sd.weights: {e}") from e
    if extra["parameterization"] != trained_parameterization(c):
      raise train.TrainingError(f"model.sd.weights={folder!r} predicts {extra['parameterization']!r} but "
                                f"teacher.parameterization is {trained_parameterization(c)!r}; set it to match")
  meta = stage_meta(c, TEACHER)
  meta = dataclasses.replace(meta, extra={**meta.extra, **extra})
  stage = train.Stage(
      name=TEACHER, loss_fn=teacher_loss(model, trained_parameterization(c), c.teacher.weighting, 0.0, ctx.logsnr_fn,
                                         ctx.null_label),
      init_params=init, optimizer=optax.identity(), num_steps=0, batch_fn=lambda step: {}, seed=c.seed,
      fsdp=c.mesh.fsdp, fsdp_min_size=c.mesh.fsdp_min_size)
  params, _ = run_stage(ctx, stage, meta)
  return params


def run_teacher_v(ctx: Context):
  """ε → v: the finished ε-prediction teacher trained on as a v-predictor (§4.2)."""
  c = ctx.config
  stage_dir = ctx.stage_dir(TEACHER)
  if not train.has_final(stage_dir):
    raise train.TrainingError(f"teacher_v fine-tunes the finished teacher {stage_dir}; put 'teacher' before it "
                              "in config.pipeline")
  params, meta = train.load_final_params(stage_dir)
  if meta.get("parameterization") != "eps":  # a v (or x) teacher: the same loss, so this trains it on
    print(f"[teacher_v] {stage_dir} predicts {meta.get('parameterization')!r}, not ε: fine-tuning continues its "
          "training as a v-predictor")
  _train(ctx, TEACHER_V, "v", c.teacher.v_steps, c.teacher.v_lr, c.teacher.v_weighting, start=params)


def run_teacher_inpaint(ctx: Context):
  """The finished teacher (teacher_v, else teacher) extended to SD Inpainting's input and fine-tuned on
  inpainting conditions (§4.2.4)."""
  c = ctx.config
  if not ctx.inpaint:
    raise train.TrainingError("teacher_inpaint needs inpaint.enabled=True (the later stages then distil it)")
  start_dir = next((ctx.stage_dir(n) for n in (TEACHER_V, TEACHER) if train.has_final(ctx.stage_dir(n))), None)
  if start_dir is None:
    raise train.TrainingError(f"teacher_inpaint fine-tunes the finished teacher {ctx.stage_dir(TEACHER)} (or "
                              f"{TEACHER_V}); put 'teacher' before it in config.pipeline")
  params, meta = train.load_final_params(start_dir)
  predicts = meta.get("parameterization", "v")
  weighting = c.teacher.weighting if predicts == "eps" else c.teacher.v_weighting
  _train(ctx, TEACHER_INPAINT, predicts, c.teacher.inpaint_steps, c.teacher.inpaint_lr, weighting, start=params)


def cfg_sampler(ctx: Context, params, meta: contract.StageMeta, num_steps: int, sampler: str):
  """'cfg_ddim' / 'cfg_ddpm': a model of the CFG teacher's architecture (no w input) guided at sampling, 2
  evaluations per step (DDPM's noise from a fixed key)."""
  c = ctx.config
  parameterization = meta.extra.get("parameterization", c.model.parameterization)
  fn = functools.partial(cfg_sample, params, model=teacher_model(ctx), parameterization=parameterization,
                         logsnr_fn=ctx.logsnr_fn, null_label=ctx.null_label, clip=c.sample.clip,
                         num_steps=int(num_steps), sampler=sampler.removeprefix("cfg_"))
  return fn, 2 * int(num_steps)


# --- config -----------------------------------------------------------------------------------------


def config_sections():
  return {"teacher": ml_collections.ConfigDict(dict(
      num_steps=2000, batch_size=128, lr=2e-3, warmup_steps=200, grad_clip=1.0,
      weight_decay=0.0,                 # > 0: AdamW's decoupled decay
      ema_decay=0.999, p_uncond=0.1, weighting="snr_plus_one",  # v-MSE
      log_every=100, ckpt_every=500, skip_nonfinite=False,
      parameterization="",              # what 'teacher' trains to predict: '' = model.parameterization; 'eps' for ε→v
      v_steps=1000, v_lr=2e-4,          # 'teacher_v': ε → v fine-tuning updates and learning rate,
      v_weighting="snr_plus_one",       # and its loss weighting (v-MSE)
      inpaint_steps=1000, inpaint_lr=1e-3,  # 'teacher_inpaint': fine-tuning updates and learning rate
  ))}


def validate(c) -> None:
  for f in ("num_steps", "batch_size", "log_every", "ckpt_every"):
    validation.positive_int(c, f"teacher.{f}")
  if not isinstance(c.teacher.warmup_steps, int) or c.teacher.warmup_steps < 0:
    validation.fail("teacher.warmup_steps", c.teacher.warmup_steps, "must be a non-negative integer")
  validation.number(c, "teacher.lr", 0.0, 1.0, lo_open=True)
  validation.number(c, "teacher.grad_clip", 0.0, lo_open=True)
  validation.number(c, "teacher.weight_decay", 0.0, 1.0)
  validation.number(c, "teacher.ema_decay", 0.0, 1.0, hi_open=True)
  validation.number(c, "teacher.p_uncond", 0.0, 1.0, hi_open=True)
  validation.choice(c, "teacher.weighting", diffusion.WEIGHTINGS)
  if c.teacher.parameterization:
    validation.choice(c, "teacher.parameterization", diffusion.PARAMETERIZATIONS)
  validation.positive_int(c, "teacher.v_steps")
  validation.positive_int(c, "teacher.inpaint_steps")
  validation.number(c, "teacher.inpaint_lr", 0.0, 1.0, lo_open=True)
  if TEACHER_INPAINT in c.pipeline:
    if not c.inpaint.enabled:
      validation.fail("inpaint.enabled", c.inpaint.enabled, "must be True when the pipeline runs 'teacher_inpaint'")
    pipe = list(c.pipeline)
    if any(n in pipe and pipe.index(n) > pipe.index(TEACHER_INPAINT) for n in (TEACHER, TEACHER_V)):
      validation.fail("pipeline", tuple(c.pipeline), "must run 'teacher_inpaint' after 'teacher' and 'teacher_v'")
  validation.choice(c, "teacher.v_weighting", diffusion.WEIGHTINGS)
  if trained_parameterization(c) == "eps" and c.teacher.weighting != "snr":
    # x̂ = (z − σε̂)/α: any weight that stays >= 1 as α → 0 multiplies the ε error by σ²/α² (e^20 at λ = −20).
    validation.fail("teacher.weighting", c.teacher.weighting, "must be 'snr' (plain ε-MSE) for an ε-prediction "
                    "teacher (teacher.parameterization or model.parameterization 'eps')")
  validation.number(c, "teacher.v_lr", 0.0, 1.0, lo_open=True)
  if TEACHER_V in c.pipeline:
    if c.model.parameterization != "v":
      validation.fail("model.parameterization", c.model.parameterization,
                      "must be 'v' when the pipeline fine-tunes the teacher into v-prediction ('teacher_v')")
  elif (TEACHER in c.pipeline and trained_parameterization(c) != c.model.parameterization
        and set(c.pipeline) - {TEACHER, "autoencoder"} and not c.distill.teacher_dir):
    validation.fail("teacher.parameterization", c.teacher.parameterization,
                    f"trains a {trained_parameterization(c)!r} teacher but the students predict "
                    f"model.parameterization={c.model.parameterization!r}: add 'teacher_v' after 'teacher' in "
                    "config.pipeline (ε → v fine-tuning) or train the teacher as the students predict")


def quick(c) -> None:
  c.teacher.num_steps, c.teacher.batch_size, c.teacher.log_every, c.teacher.ckpt_every = 150, 64, 50, 75
  c.teacher.v_steps = c.teacher.inpaint_steps = 50


def upgrade_meta(name: str, meta: dict, run_config: dict):
  """A teacher written before the contract (its meta: kind 'cfg_teacher', sampler 'ddim')."""
  if meta.get("kind") != "cfg_teacher":
    return None
  return contract.StageMeta(
      kind="cfg_teacher", method="teacher", sampler="cfg_ddim", num_sampling_steps=int(meta["num_sampling_steps"]),
      w_range=(0.0, float("inf")), batch_size=int(run_config["teacher"]["batch_size"]), teacher_evals_per_update=0.0,
      evals_per_step=2, scored=False,
      extra={"parameterization": meta.get("parameterization", "v")})


METHOD = contract.Method(
    name="teacher", order=0, stages={TEACHER: run_teacher, TEACHER_V: run_teacher_v,
                                     TEACHER_INPAINT: run_teacher_inpaint},
    samplers={"cfg_ddim": cfg_sampler, "cfg_ddpm": cfg_sampler}, schedule_samplers=("cfg_ddim", "cfg_ddpm"),
    config=config_sections, validate=validate, quick=quick, data_batches=("teacher.batch_size",),
    plan=lambda config, stage: [(stage, stage_meta(config, stage))], upgrade_meta=upgrade_meta,
    opt_in_stages=(TEACHER_INPAINT,),
    # Guidance trades diversity for fidelity: IS rises with w, for the teacher and every student of it.
    claims=(contract.Claim("IS rises with w (most steps)", contract.Side("*", steps="most", w="highest"),
                           contract.Side("*", w="lowest"), quantity="is", relation="better",
                           source="Ho & Salimans 2022; Meng et al. Table 1"),))
