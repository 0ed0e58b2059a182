r"""Training throughput of the real train step, and its FLOP/s against the machine's own matmul FLOP/s.

For each kind of step — the CFG teacher loss ('teacher'), stage one ('stage_one', Alg. 1) and a deterministic
halving round ('round', Alg. 2) — the step is built as the pipeline builds it (`train.make_train_step` of the
method's loss, its optimizer and EMA, through `train.jitted_train_step` with the state placed on a
`parallel.make_mesh` mesh), then run on a synthetic batch of the config's shapes:

  images/s          batch / median step time (repeats of `steps` chained steps, each repeat blocked at its end)
  FLOPs/step        XLA's cost analysis of the same step, every scan unrolled so the round's two teacher steps
                    both count (bench/common.py); GFLOP/image = FLOPs/step / batch
  achieved FLOP/s   FLOPs/step / median step time
  matmul FLOP/s     a warmed-up float32 [n, n] @ [n, n] timed in the same run, before and after the steps
  ratio             achieved / matmul FLOP/s: a model-FLOPs utilisation against the measured peak of this
                    machine, not a datasheet's
  forward equiv.    FLOPs/step over the FLOPs of one evaluation of the network on the batch (lowered on its
                    own): ~3 for the teacher step (forward + backward), ~5 for stage one and a round (two
                    teacher evaluations on top), a check of the count

With --full_model it also counts (lowering only, nothing runs; ~3 min on 2 cores) the FLOPs of the full
ImageNet 64 model's steps at batch 1 and 2: per image = f(2) − f(1), fixed per step (optimizer, EMA) =
f(1) − per image, checked against f(4). docs/projection.md uses these.

The figures in bench/README.md come from bench/run_all.sh:
  python bench/train_throughput.py --config=configs/digits.py --kinds=teacher,stage_one,round \
      --json=bench/results/train_digits.json            # also counts configs/imagenet64.py (the default)
  python bench/train_throughput.py --config=configs/imagenet64.py --config.model.ch=32 \
      --config.model.num_res_blocks=1 --config.model.emb_ch=128 --config.teacher.batch_size=8 \
      --config.distill.batch_size=8 --steps=3 --repeats=3 --full_model= \
      --json=bench/results/train_imagenet64_small.json
The ImageNet 64 count alone:
  python bench/train_throughput.py --kinds= --full_model=configs/imagenet64.py
Quick check (< 60 s on 2 idle cores):
  python bench/train_throughput.py --quick
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as `python bench/train_throughput.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench import common

KINDS = ("teacher", "stage_one", "round")


@dataclasses.dataclass
class StepSpec:
  """One kind of train step as the pipeline builds it."""
  kind: str
  loss_fn: Any
  params: Any            # arrays, or ShapeDtypeStructs for counting only
  frozen: Any            # the teacher's parameters (and a round's N), or None
  optimizer: Any
  ema_decay: float | None
  batch_size: int
  teacher_evals: int     # teacher network evaluations per example inside the loss
  model: Any = None      # the network trained (its forward FLOPs are the unit of `forward_equivalents`)
  num_params: int = 0


def _params(model, shape, seed: int, abstract: bool):
  from distill import models
  from distill.models.unet import example_inputs
  if abstract:
    inputs = example_inputs(model, shape)
    init = lambda key, inputs: model.init(key, **inputs, train=False)
    return jax.eval_shape(init, jax.random.PRNGKey(seed), inputs)["params"]
  return models.init_params(model, shape, seed)


def step_spec(config, kind: str, abstract: bool = False, adam_eps: float | None = None) -> StepSpec:
  """The loss, initial parameters, frozen teacher, optimizer and EMA of a `kind` step, as `methods.teacher.run_teacher`,
  `run_stage_one_into` and `run_rounds` build them. abstract: parameters as shapes (for counting FLOPs of a
  model too large to hold). adam_eps: None, the optimizer as built; else the same clipping, schedule and Adam
  with this eps (bench/scaling.py says why)."""
  import optax
  from distill import models, optimizers, schedules
  from distill.methods.guided import progressive
  from distill.methods.guided import stage_one as guided
  from distill.methods import teacher as teacher_lib
  c, d, tc = config, config.distill, config.teacher
  logsnr_fn = schedules.get_logsnr_fn(c.model.schedule, c.model.logsnr_min, c.model.logsnr_max)
  null_label = c.data.num_classes
  shape = common.image_shape(c)
  if kind == "teacher":
    model = common.teacher_model(c)
    params = _params(model, shape, c.seed, abstract)
    loss_fn = teacher_lib.teacher_loss(model, c.model.parameterization, tc.weighting, tc.p_uncond, logsnr_fn,
                                       null_label)
    optimizer, schedule = optimizers.adam_with_warmup(tc.lr, tc.warmup_steps, tc.grad_clip)
    clip = tc.grad_clip
    spec = StepSpec(kind, loss_fn, params, None, optimizer, tc.ema_decay, tc.batch_size, 0, model)
  elif kind == "stage_one":
    teacher, student = common.teacher_model(c), common.student_model(c)
    params = _params(student, shape, c.seed, abstract)
    loss_fn = guided.stage_one_loss(models.x_function(student, c.model.parameterization),
                                    models.x_function(teacher, c.model.parameterization), logsnr_fn=logsnr_fn,
                                    null_label=null_label, w_min=d.w_min, w_max=d.w_max,
                                    weighting=d.stage_one_weighting)
    optimizer, schedule = optimizers.adam_with_warmup(d.stage_one_lr, d.stage_one_warmup, d.grad_clip)
    clip = d.grad_clip
    frozen = {"teacher": _params(teacher, shape, c.seed, abstract)}
    # The conditional and unconditional teacher passes: one call of 2B rows.
    spec = StepSpec(kind, loss_fn, params, frozen, optimizer, d.stage_one_ema, d.batch_size, 2, student)
  elif kind == "round":
    student = common.student_model(c)
    student_x = models.x_function(student, c.model.parameterization)
    params = _params(student, shape, c.seed, abstract)
    loss_fn = progressive.deterministic_round_loss(student_x, student_x, logsnr_fn=logsnr_fn, w_min=d.w_min,
                                                   w_max=d.w_max, weighting=d.weighting)
    optimizer, schedule = optimizers.annealed_adam(d.lr, d.round_steps, d.grad_clip)
    clip = d.grad_clip
    # As in methods.guided.stages.run_rounds: the student starts as its teacher; N of the first round.
    frozen = {"teacher": params, "num_steps": jnp.int32(d.start_steps // 2)}
    spec = StepSpec(kind, loss_fn, params, frozen, optimizer, None, d.batch_size, 2, student)  # two DDIM steps
  else:
    raise ValueError(f"kind={kind!r}; allowed: {', '.join(KINDS)}")
  if adam_eps is not None:
    spec.optimizer = optax.chain(optax.clip_by_global_norm(clip), optax.adam(schedule, eps=adam_eps))
  spec.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec.params))
  return spec


def count_step_flops(spec: StepSpec, seed: int, state, frozen, batch, as_written: bool = True) -> dict:
  """XLA's FLOP count of one train step (arrays or ShapeDtypeStructs), from the lowered program: with every
  scan unrolled ('flops'; 'loops_left' names functions still holding a loop) and, with as_written, as the step
  is written ('flops_loops_once': its loop bodies counted once, what cost analysis of the timed step says)."""
  from distill import train

  def lower():
    step = jax.jit(train.make_train_step(spec.loss_fn, spec.optimizer, spec.ema_decay, False, seed))
    return step.lower(state, frozen, batch)

  with common.unrolled_scans():
    unrolled = lower()
  out = {"flops": common.xla_flops(unrolled), "loops_left": common.loops_left(unrolled)}
  if as_written:
    out["flops_loops_once"] = common.xla_flops(lower())
  return out


def forward_flops(config, spec: StepSpec, batch_size: int) -> float:
  """XLA's FLOP count of one evaluation of the trained network (eval mode) on `batch_size` rows."""
  from distill import models
  x_fn = models.x_function(spec.model, config.model.parameterization)
  sds = jax.ShapeDtypeStruct
  args = (jax.eval_shape(lambda p: p, spec.params), sds((batch_size,) + common.image_shape(config), jnp.float32),
          sds((batch_size,), jnp.float32), sds((batch_size,), jnp.int32), sds((batch_size,), jnp.float32))
  return common.xla_flops(jax.jit(x_fn).lower(*args))


def abstract_step_args(spec: StepSpec, config, batch_size: int):
  """ShapeDtypeStructs of (state, frozen, batch) for a step of `spec` at `batch_size`."""
  from distill import train
  state = jax.eval_shape(lambda p: train.init_state(p, spec.optimizer, spec.ema_decay is not None), spec.params)
  frozen = jax.eval_shape(lambda f: f, spec.frozen) if spec.frozen is not None else None
  batch = {"image": jax.ShapeDtypeStruct((batch_size,) + common.image_shape(config), jnp.float32),
           "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  return state, frozen, batch


def full_model_flops(config, kinds=("round", "stage_one", "teacher"), batches=(1, 2),
                     check_batch: int | None = 4) -> list[dict]:
  """FLOPs of each kind of step of `config`, from cost analysis of the lowered step at batch sizes `batches`
  (nothing is compiled or run; a 296M-parameter model lowers in ~20 s on 2 cores). Fitted as
  fixed + per_image·B from the two batches; the first kind is also counted at `check_batch` to check the fit."""
  rows = []
  for i, kind in enumerate(kinds):
    spec = step_spec(config, kind, abstract=True)
    counts = {}
    for b in batches + ((check_batch,) if check_batch and i == 0 else ()):
      state, frozen, batch = abstract_step_args(spec, config, b)
      counts[b] = count_step_flops(spec, config.seed, state, frozen, batch, as_written=False)
    b0, b1 = batches
    per_image = (counts[b1]["flops"] - counts[b0]["flops"]) / (b1 - b0)
    fixed = counts[b0]["flops"] - per_image * b0
    forward = [forward_flops(config, spec, b) for b in batches]
    forward_per_image = (forward[1] - forward[0]) / (b1 - b0)
    row = {"kind": kind, "params": spec.num_params, "teacher_evals": spec.teacher_evals,
           "flops_per_image": per_image, "fixed_flops_per_step": fixed, "forward_flops_per_image": forward_per_image,
           "forward_equivalents": per_image / forward_per_image,
           "counts": {str(b): v["flops"] for b, v in counts.items()},
           "loops_left": sorted({n for v in counts.values() for n in v["loops_left"]})}
    if check_batch in counts:
      row["fit_error"] = (fixed + per_image * check_batch) / counts[check_batch]["flops"] - 1
    rows.append(row)
  return rows


def measure_step(config, spec: StepSpec, *, steps: int, repeats: int) -> dict:
  """Compiles and times the real jitted train step of `spec` on the config's mesh (all devices,
  config.mesh.fsdp); returns images/s, step seconds, FLOPs and the compile time."""
  from distill import parallel, train
  mesh = parallel.make_mesh(config.mesh.fsdp)
  min_size = config.mesh.fsdp_min_size
  params = parallel.place(spec.params, parallel.param_shardings(mesh, spec.params, min_size))
  state, shardings = train.place_state(train.init_state(params, spec.optimizer, spec.ema_decay is not None), mesh,
                                       min_size)
  frozen = parallel.place(spec.frozen, parallel.replicated_shardings(mesh, spec.frozen))
  batch = parallel.global_batch(common.synthetic_batch(spec.batch_size, common.image_shape(config),
                                                       config.data.num_classes, config.seed), mesh)
  step = train.jitted_train_step(spec.loss_fn, spec.optimizer, spec.ema_decay, False, config.seed, shardings)
  start = time.perf_counter()
  compiled = step.lower(state, frozen, batch).compile()
  compile_seconds = time.perf_counter() - start
  counted = count_step_flops(spec, config.seed, state, frozen, batch)
  counted["xla_flops_compiled"] = common.xla_flops(compiled)  # the optimised program, loop bodies once
  forward = forward_flops(config, spec, spec.batch_size)

  state, metrics = compiled(state, frozen, batch)  # warm-up
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(state)
    times.append((time.perf_counter() - start) / steps)
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    raise RuntimeError(f"{spec.kind}: non-finite loss {loss} in the benchmark run")
  seconds = common.median(times)
  return dict(counted, kind=spec.kind, batch=spec.batch_size, params=spec.num_params, devices=mesh.size,
              teacher_evals=spec.teacher_evals, step_seconds=seconds, step_times=times,
              images_per_sec=spec.batch_size / seconds, flops_per_image=counted["flops"] / spec.batch_size,
              forward_flops_per_image=forward / spec.batch_size, forward_equivalents=counted["flops"] / forward,
              flops_per_sec=counted["flops"] / seconds, compile_seconds=compile_seconds, loss=loss)


def run(config, *, kinds=("teacher", "round"), steps: int = 5, repeats: int = 5, matmul_n: int = 2048,
        full_model: str | None = None, label: str = "") -> dict:
  """Measures every kind of step of `config` between two matmul measurements; returns the report."""
  before = common.matmul_flops_per_sec(matmul_n, repeats=repeats)
  rows = [measure_step(config, step_spec(config, kind), steps=steps, repeats=repeats) for kind in kinds]
  after = common.matmul_flops_per_sec(matmul_n, repeats=repeats)
  # Pooled: the machine's matmul rate over the whole run, so a drift during the run moves both sides.
  matmul = common.median(
      [before["flops"] / t for t in before["times"]] + [after["flops"] / t for t in after["times"]])
  for row in rows:
    row["matmul_flops_per_sec"] = matmul
    row["flops_ratio"] = row["flops_per_sec"] / matmul
    row["config"] = label
  report = {"machine": common.machine(), "config": label, "matmul": {"before": before, "after": after,
                                                                      "flops_per_sec": matmul},
            "steps": rows}
  if len(rows) > 1:
    base = rows[0]
    for row in rows[1:]:
      row[f"time_vs_{base['kind']}"] = (row["step_seconds"] / row["batch"]) / (base["step_seconds"] / base["batch"])
      row[f"flops_vs_{base['kind']}"] = row["flops_per_image"] / base["flops_per_image"]
  if full_model:
    report["full_model"] = {"config": full_model, "rows": full_model_flops(common.load_config(full_model))}
  return report


COLUMNS = [("config", "config", ""), ("kind", "step", ""), ("batch", "batch", "d"), ("params", "params", ",d"),
           ("images_per_sec", "images/s", ".4g"), ("step_ms", "ms/step", ".1f"), ("gflop_image", "GFLOP/image", ".4g"),
           ("gflops", "achieved GFLOP/s", ".1f"), ("matmul_gflops", "matmul GFLOP/s", ".1f"),
           ("forward_equivalents", "forward equiv.", ".2f"), ("flops_ratio", "model / matmul FLOP/s", ".3f"),
           ("compile_seconds", "compile s", ".1f")]


def print_report(report: dict):
  m = report["machine"]
  print(f"\n## train throughput ({m['date']}, {m['device_count']} × {m['device_kind']}, {m['cpu_count']} CPUs, "
        f"jax {m['jax']})\n")
  rows = [dict(r, step_ms=1e3 * r["step_seconds"], gflop_image=r["flops_per_image"] / 1e9,
               gflops=r["flops_per_sec"] / 1e9, matmul_gflops=r["matmul_flops_per_sec"] / 1e9)
          for r in report["steps"]]
  if rows:
    common.print_table(rows, COLUMNS)
  mm = report["matmul"]
  print(f"\nmatmul: float32 {mm['before']['n']}² @ {mm['before']['n']}², median "
        f"{mm['before']['flops_per_sec'] / 1e9:.1f} GFLOP/s before the steps and {mm['after']['flops_per_sec'] / 1e9:.1f}"
        f" after (XLA counts {mm['before']['xla_flops']:.4g} FLOPs for the closed form's {mm['before']['flops']:.4g})")
  for r in report["steps"][1:]:
    base = report["steps"][0]["kind"]
    print(f"{r['kind']} vs {base}, per image: time × {r[f'time_vs_{base}']:.2f}, FLOPs × {r[f'flops_vs_{base}']:.2f}"
          f" ({r['teacher_evals']} teacher evaluations per example; loop bodies once: "
          f"{r['flops_loops_once'] / r['batch'] / 1e9:.3f} GFLOP/image)")
  if "full_model" in report:
    print(f"\n### FLOPs of {report['full_model']['config']} from cost analysis (lowered, not run; B = batch)\n")
    rows = [dict(r, gflop_image=r["flops_per_image"] / 1e9, fixed_gflop=r["fixed_flops_per_step"] / 1e9,
                 tflop_2048=(r["fixed_flops_per_step"] + 2048 * r["flops_per_image"]) / 1e12,
                 fit_pct=100 * r["fit_error"] if "fit_error" in r else None) for r in report["full_model"]["rows"]]
    common.print_table(rows, [("kind", "step", ""), ("params", "params", ",d"),
                              ("teacher_evals", "teacher evals/example", "d"), ("gflop_image", "GFLOP/image", ".2f"),
                              ("forward_equivalents", "forward equiv.", ".3f"),
                              ("fixed_gflop", "fixed GFLOP/step", ".2f"), ("tflop_2048", "TFLOP/step at 2048", ".1f"),
                              ("fit_pct", "fit error at B=4 (%)", ".3f")])


def main():
  from absl import app, flags
  from ml_collections import config_flags
  config_flag = config_flags.DEFINE_config_file("config", os.path.join(common.ROOT, "configs/digits.py"),
                                                "Config file (with :variant) and --config.x=y overrides.")
  kinds = flags.DEFINE_list("kinds", ["teacher", "round"], f"Steps to measure, among {', '.join(KINDS)}; empty "
                            "(--kinds=) runs none and only counts --full_model.")
  steps = flags.DEFINE_integer("steps", 5, "Chained steps per timed repeat.")
  repeats = flags.DEFINE_integer("repeats", 5, "Timed repeats (the median is reported).")
  matmul_n = flags.DEFINE_integer("matmul_n", 2048, "Side of the float32 matmul that measures the machine.")
  full_model = flags.DEFINE_string("full_model", "configs/imagenet64.py",
                                   "Also count (not run) this config's step FLOPs at batch 1, 2, 4; '' skips.")
  quick = flags.DEFINE_bool("quick", False, "Smoke mode (< 60 s on 2 idle cores): the tiny U-Net of "
                            "common.TINY_MODEL, batch 32, 2 steps × 2 repeats, matmul 1024, no full-model count "
                            "unless --full_model is given.")
  json_path = flags.DEFINE_string("json", None, "Also write the report here.")

  def _main(argv):
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    from distill import configuration
    config = config_flag.value
    label = common.config_label(sys.argv[1:])
    for kind in kinds.value:
      if kind not in KINDS:
        raise app.UsageError(f"--kinds: {kind!r} is not one of {', '.join(KINDS)}")
    if quick.value:
      # Compiling dominates on CPU: a shallower network and a smaller batch keep the path, not the figures.
      for field, value in common.TINY_MODEL.items():
        config.model[field.split(".", 1)[1]] = value
      config.teacher.batch_size = config.distill.batch_size = 32
      label += " (quick: tiny U-Net, batch 32)"
      n_steps, n_repeats, n = 2, 2, 1024
      full = full_model.value if flags.FLAGS["full_model"].present else None
    else:
      n_steps, n_repeats, n, full = steps.value, repeats.value, matmul_n.value, full_model.value
    configuration.validate(config)
    report = run(config, kinds=tuple(kinds.value), steps=n_steps, repeats=n_repeats, matmul_n=n,
                 full_model=full or None, label=label)
    print_report(report)
    common.write_json(json_path.value, report)

  app.run(_main)


if __name__ == "__main__":
  main()
