r"""Sampling throughput: a distilled student (1 network evaluation per step) against the CFG teacher (2 per step).

Both sample the same noise, labels and w at the same step count and batch, through the functions the
pipeline samples with: the teacher with `context.cfg_sample` (conditional and unconditional passes batched
as one call of 2B rows) and the w-conditioned student with `methods.guided.stages.sample_student` (DDIM, or the stochastic
sampler with --sampler=stochastic). Both take the step count as a traced argument, so each compiles once for
every step count. Teacher and student calls alternate (T S T S …), and the ratio is taken pair by pair, so a
drift in the machine's speed moves both sides of each ratio.

  images/s            batch / median seconds per sampling call
  student / teacher   the ratio of images/s (expected ≈ 2: half the evaluations at equal steps)
  per-evaluation      (teacher seconds / 2N) / (student seconds / N): ≈ 1 when the cost is the network's

Parameters are a fresh initialisation of the config's architectures (the student has the w-embedding a
distilled student has): sampling time depends on shapes, not on the weights' values.

The figures in bench/README.md come from bench/run_all.sh:
  python bench/sampling_throughput.py --config=configs/digits.py --json=bench/results/sampling_digits.json
  python bench/sampling_throughput.py --config=configs/imagenet64.py --config.model.ch=32 \
      --config.model.num_res_blocks=1 --config.model.emb_ch=128 --batch=8 --repeats=3 \
      --json=bench/results/sampling_imagenet64_small.json
Quick check (< 60 s on 2 idle cores):
  python bench/sampling_throughput.py --quick
"""
from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):  # run as `python bench/sampling_throughput.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from bench import common


def samplers_of(config, batch: int, w: float = 1.0, sampler: str = "ddim"):
  """(teacher_fn, student_fn, meta): fn(num_steps) -> samples [batch, H, W, C] of the CFG teacher and of the
  w-conditioned student on the same noise, labels and w."""
  from distill import context, models, schedules
  from distill.methods.guided import stages
  c = config
  shape = common.image_shape(c)
  logsnr_fn = schedules.get_logsnr_fn(c.model.schedule, c.model.logsnr_min, c.model.logsnr_max)
  teacher, student = common.teacher_model(c), common.student_model(c)
  t_params = models.init_params(teacher, shape, c.seed)
  s_params = models.init_params(student, shape, c.seed)
  z = jax.random.normal(jax.random.PRNGKey(c.seed + 1), (batch,) + shape)
  labels = jnp.arange(batch, dtype=jnp.int32) % c.data.num_classes
  ws = jnp.full((batch,), w, jnp.float32)
  rng = jax.random.PRNGKey(c.seed + 7)
  student_x = models.x_function(student, c.model.parameterization)
  null_label = c.data.num_classes

  def teacher_fn(num_steps):
    return context.cfg_sample(t_params, z, labels, ws, model=teacher, parameterization=c.model.parameterization,
                                logsnr_fn=logsnr_fn, num_steps=jnp.int32(num_steps), null_label=null_label,
                                clip=c.sample.clip)

  def student_fn(num_steps):
    return stages.sample_student(s_params, z, labels, ws, rng, x_fn=student_x, logsnr_fn=logsnr_fn,
                                   num_steps=jnp.int32(num_steps), sampler=sampler, pair=False,
                                   null_label=null_label, clip=c.sample.clip)

  meta = {"teacher_params": sum(x.size for x in jax.tree.leaves(t_params)),
          "student_params": sum(x.size for x in jax.tree.leaves(s_params))}
  return teacher_fn, student_fn, meta


def run(config, *, batch: int, steps=(1, 4, 16), repeats: int = 5, w: float = 1.0, sampler: str = "ddim",
        label: str = "", fns=None) -> dict:
  """Times teacher and student at each step count; fns: `samplers_of`'s result for these arguments, if built."""
  teacher_fn, student_fn, meta = fns or samplers_of(config, batch, w, sampler)
  compile_seconds = {}
  for name, fn in (("teacher", teacher_fn), ("student", student_fn)):
    start = time.perf_counter()
    jax.block_until_ready(fn(steps[0]))  # compiles: the step count is traced, so once for all of them
    compile_seconds[name] = time.perf_counter() - start
  rows = []
  for n in steps:
    jax.block_until_ready(teacher_fn(n))  # warm-up at this step count
    jax.block_until_ready(student_fn(n))
    t_times, s_times = [], []
    for _ in range(repeats):  # alternating, so each pair shares the machine's state
      t_times += common.time_calls(lambda: teacher_fn(n), warmup=0, repeats=1)
      s_times += common.time_calls(lambda: student_fn(n), warmup=0, repeats=1)
    ratios = [t / s for t, s in zip(t_times, s_times)]
    t_sec, s_sec = common.median(t_times), common.median(s_times)
    rows.append({"config": label, "steps": n, "batch": batch, "teacher_nfe": 2 * n, "student_nfe": n,
                 "teacher_seconds": t_sec, "student_seconds": s_sec,
                 "teacher_images_per_sec": batch / t_sec, "student_images_per_sec": batch / s_sec,
                 "speedup": common.median(ratios), "pair_ratios": ratios,
                 "per_evaluation_ratio": (t_sec / (2 * n)) / (s_sec / n),
                 "teacher_times": t_times, "student_times": s_times})
  return {"machine": common.machine(), "config": label, "sampler": sampler, "w": w, "batch": batch,
          "compile_seconds": compile_seconds, **meta, "rows": rows}


COLUMNS = [("config", "config", ""), ("steps", "steps", "d"), ("batch", "batch", "d"),
           ("teacher_nfe", "teacher NFE", "d"), ("student_nfe", "student NFE", "d"),
           ("teacher_images_per_sec", "teacher images/s", ".4g"), ("student_images_per_sec", "student images/s", ".4g"),
           ("speedup", "student / teacher", ".2f"), ("per_evaluation_ratio", "per-evaluation time T/S", ".2f")]


def print_report(report: dict):
  m = report["machine"]
  print(f"\n## sampling throughput ({m['date']}, {m['device_count']} × {m['device_kind']}, {m['cpu_count']} CPUs, "
        f"jax {m['jax']}; student sampler {report['sampler']}, w = {report['w']:g})\n")
  common.print_table(report["rows"], COLUMNS)
  print(f"\nparameters: teacher {report['teacher_params']:,}, student {report['student_params']:,} (+ w-embedding); "
        f"compile s: teacher {report['compile_seconds']['teacher']:.1f}, "
        f"student {report['compile_seconds']['student']:.1f}")


def main():
  from absl import app, flags
  from ml_collections import config_flags
  config_flag = config_flags.DEFINE_config_file("config", os.path.join(common.ROOT, "configs/digits.py"),
                                                "Config file (with :variant) and --config.x=y overrides.")
  batch = flags.DEFINE_integer("batch", None, "Images per sampling call (default: config.sample.batch_size).")
  steps = flags.DEFINE_list("steps", ["1", "4", "16"], "Step counts (equal for teacher and student).")
  repeats = flags.DEFINE_integer("repeats", 5, "Timed teacher/student pairs per step count (medians reported).")
  w = flags.DEFINE_float("w", 1.0, "Guidance strength.")
  sampler = flags.DEFINE_enum("sampler", "ddim", ["ddim", "stochastic"], "The student's sampler.")
  quick = flags.DEFINE_bool("quick", False, "Smoke mode (< 60 s on 2 cores): one res block per level, batch 32, "
                            "steps 1 and 4, 2 repeats.")
  json_path = flags.DEFINE_string("json", None, "Also write the report here.")

  def _main(argv):
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    from distill import configuration
    config = config_flag.value
    label = common.config_label(sys.argv[1:])
    try:
      step_counts = tuple(int(s) for s in steps.value)
    except ValueError:
      raise app.UsageError(f"--steps={','.join(steps.value)}: step counts must be integers")
    if any(n < 1 for n in step_counts):
      raise app.UsageError(f"--steps={','.join(steps.value)}: step counts must be >= 1")
    b, n_repeats = batch.value or config.sample.batch_size, repeats.value
    if quick.value:
      config.model.num_res_blocks = 1
      label += " (quick: num_res_blocks=1)"
      b, step_counts, n_repeats = batch.value or 32, (1, 4), 2
    configuration.validate(config)
    report = run(config, batch=b, steps=step_counts, repeats=n_repeats, w=w.value, sampler=sampler.value,
                 label=label)
    print_report(report)
    common.write_json(json_path.value, report)

  app.run(_main)


if __name__ == "__main__":
  main()
