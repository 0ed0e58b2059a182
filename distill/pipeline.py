"""The config's pipeline of stages, run in order in one workdir.

    WORKDIR/config.json            the resolved config
    WORKDIR/teacher/               checkpoints/, final/, tb/, samples.png, eval.json
    WORKDIR/classifier/            the cached feature classifier of embedded data sets
    WORKDIR/summary.json           wall-clock per stage

Each stage resumes from its last checkpoint or is skipped when finished, so re-running the same
command after an interruption continues where it stopped.
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from distill import data as data_lib
from distill import models, samplers, schedules, train, writers
from distill.evaluation import classifier as classifier_lib
from distill.methods import teacher as teacher_lib

EMBEDDED = ("digits", "npz", "mixture")


class Context:
  """What every stage shares: config, workdir, data and the model family."""

  def __init__(self, config, workdir: str, train_source=None):
    self.config = config
    self.workdir = workdir
    self.train_source = train_source or data_lib.make_source(config.data, "train")
    self.logsnr_fn = schedules.get_logsnr_fn(config.model.schedule, config.model.logsnr_min, config.model.logsnr_max)
    self.image_shape = tuple(self.train_source.image_shape)
    self.null_label = config.data.num_classes
    self.is_main_process = jax.process_index() == 0

  def stage_dir(self, name: str) -> str:
    return os.path.join(self.workdir, name)


def batch_fn(source, batch_size: int, seed: int):
  batches = data_lib.Batches(source, batch_size, seed, jax.process_index(), jax.process_count())
  return batches.batch_at


def init_params(model, image_shape, seed: int, **kwargs):
  b = 1
  z = jnp.zeros((b,) + tuple(image_shape))
  variables = jax.jit(lambda key: model.init(key, z, jnp.zeros((b,)), jnp.zeros((b,), jnp.int32),
                                             train=False, **kwargs))(jax.random.PRNGKey(seed))
  return variables["params"]


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
      meta={"kind": "cfg_teacher", "sampler": "ddim", "num_sampling_steps": c.sample.num_steps,
            "parameterization": c.model.parameterization})
  stage_dir = ctx.stage_dir("teacher")
  params, meta = train.run_stage(stage, stage_dir, is_main_process=ctx.is_main_process)
  sample_fn = functools.partial(guided_ddim, params, model=model, parameterization=c.model.parameterization,
                                logsnr_fn=ctx.logsnr_fn, null_label=ctx.null_label, clip=c.sample.clip)
  if ctx.is_main_process:
    write_guided_grid(ctx, functools.partial(sample_fn, num_steps=c.sample.num_steps),
                      os.path.join(stage_dir, "samples.png"))
    if c.eval.class_agreement and c.data.name in EMBEDDED:
      report = teacher_class_agreement(ctx, functools.partial(sample_fn, num_steps=c.eval.agreement_steps))
      report["teacher_train_seconds"] = meta.get("train_seconds")
      with open(os.path.join(stage_dir, "eval.json"), "w") as f:
        json.dump(report, f, indent=1)
      print(f"[teacher] class agreement: {report['agreement']} (classifier test accuracy "
            f"{report['classifier_test_accuracy']:.4f})")


STAGES = {"teacher": run_teacher}


def run(config, workdir: str, train_source=None):
  """Runs config.pipeline in order; writes WORKDIR/summary.json with wall-clock per stage."""
  ctx = Context(config, workdir, train_source)
  summary_path = os.path.join(workdir, "summary.json")
  summary = {}
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
  for name in config.pipeline:
    start = time.time()
    STAGES[name](ctx)
    summary.setdefault("wall_clock_seconds", {})[name] = summary.get("wall_clock_seconds", {}).get(name, 0.0) + (
        time.time() - start)
    if ctx.is_main_process:
      with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
  return summary


# --- sampling and evaluation helpers ----------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "parameterization", "logsnr_fn", "num_steps", "null_label",
                                             "clip"))
def guided_ddim(params, z, labels, w, *, model, parameterization: str, logsnr_fn, num_steps: int, null_label: int,
                clip: bool):
  """CFG teacher samples: z [B,H,W,C], labels [B], w [B] → x [B,H,W,C] (2·num_steps evaluations)."""
  model_fn = models.x_prediction_fn(model, params, parameterization)
  den = samplers.guided_denoiser(model_fn, labels, w, null_label)
  return samplers.ddim_sample(den, z, logsnr_fn, num_steps, clip=clip).x


def sample_in_chunks(fn, z, labels, w, chunk: int = 512):
  outs = [np.asarray(fn(z[i:i + chunk], labels[i:i + chunk], w[i:i + chunk])) for i in range(0, len(z), chunk)]
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
  x = sample_in_chunks(fn, z, labels, w)
  writers.save_image_grid(path, x, ncols=len(ws) * per, upscale=max(1, 128 // ctx.image_shape[0]))
  return x


def get_classifier(ctx: Context):
  """The feature classifier of an embedded data set, trained once and cached in WORKDIR/classifier."""
  c = ctx.config
  path = os.path.join(ctx.workdir, "classifier", f"{c.data.name}.npz")
  if os.path.exists(path):
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
  os.makedirs(os.path.dirname(path), exist_ok=True)
  classifier_lib.save_classifier(path, params, meta)
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
    x = sample_in_chunks(fn, z, labels, jnp.full((len(labels),), w, jnp.float32))
    agreement[str(float(w))] = classifier_lib.class_agreement(params, x, np.asarray(labels), k)
  return {"agreement": agreement, "sampler": "ddim", "steps": c.eval.agreement_steps,
          "nfe": 2 * c.eval.agreement_steps, "samples": int(len(labels)),
          "classifier_test_accuracy": meta["test_accuracy"]}
