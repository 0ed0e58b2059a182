"""What the benchmarks share: timing, the machine's own matmul FLOP/s, XLA FLOP counts, models, tables.

Timing: every figure is a median over repeats, after a warm-up call that compiles, with
`jax.block_until_ready` closing each timed region (JAX dispatches asynchronously, so an unblocked timer
measures the dispatch, not the work).

FLOPs: XLA's own cost analysis (`Lowered.cost_analysis()` / `Compiled.cost_analysis()['flops']`), which
counts a multiply-add as 2 FLOPs and a convolution only over the taps that fall inside the image (a 3×3
'SAME' conv on 16×16 counts 46²/(16²·9) = 92 % of the naive 2·H·W·9·Cin·Cout). It counts a loop body
once whatever its trip count, so FLOPs are counted on a trace with every `lax.scan` unrolled
(`unrolled_scans`); the program that is timed keeps its loops.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- configs and models ------------------------------------------------------------------------------


def load_config(spec: str, overrides: dict | None = None):
  """A config from 'configs/x.py[:variant]' (relative to the repository root or absolute), with
  {'model.ch': 32, ...} overrides applied and validated (configuration.ConfigError on a bad value)."""
  from distill import configuration
  path, _, variant = spec.partition(":")
  if not os.path.isabs(path):
    path = os.path.join(ROOT, path)
  module_spec = importlib.util.spec_from_file_location(f"bench_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant or None)
  for field, value in (overrides or {}).items():
    node = config
    *parents, leaf = field.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  configuration.validate(config)
  return config


# A U-Net with every kind of layer but attention, one level, 8 channels: compiles in seconds. The scaling
# benchmark's --quick mode (three processes, each compiling) and the tests use it.
TINY_MODEL = {"model.ch": 8, "model.ch_mult": (1,), "model.num_res_blocks": 1, "model.attn_resolutions": (),
              "model.head_dim": 8, "model.emb_ch": 16}


def config_label(argv) -> str:
  """The config file and its --config.x=y overrides as given on the command line: the report's 'config' column."""
  return " ".join(a.split("=", 1)[1] if a.startswith("--config=") else a for a in argv
                  if a.startswith("--config")) or "configs/digits.py"


def override_flags(overrides: dict) -> list[str]:
  """{'model.ch': 8, 'model.ch_mult': (1,)} -> ['--config.model.ch=8', '--config.model.ch_mult=(1,)']."""
  return [f"--config.{k}={v!r}".replace(" ", "") for k, v in overrides.items()]


def image_shape(config) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, config.data.channels)


def teacher_model(config):
  """The CFG teacher the config describes (no w input)."""
  from distill import models
  return models.unet_from_config(config.model, config.data)


def student_model(config):
  """The w-conditioned student of stage one and the halving rounds (distill dropout), as the pipeline
  builds it (`context.student_model`)."""
  from distill import models
  model_cfg = config.model.copy_and_resolve_references()
  model_cfg.dropout = config.distill.dropout
  return models.unet_from_config(model_cfg, config.data, w_embedding=True)


def synthetic_batch(batch_size: int, shape, num_classes: int, seed: int = 0) -> dict:
  """{'image': float32 [B, H, W, C] in [−1, 1], 'label': int32 [B]}: the shapes and dtypes of a data batch.
  Step time depends on shapes only, so the benchmarks need no data set."""
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (batch_size,) + tuple(shape)).astype(np.float32),
          "label": rng.integers(0, num_classes, batch_size).astype(np.int32)}


# --- timing -------------------------------------------------------------------------------------------


def median(xs):
  return float(statistics.median(xs))


def time_calls(fn, *, warmup: int = 1, repeats: int = 5) -> list[float]:
  """Seconds of `repeats` calls of fn() (each blocked until its result is ready), after `warmup` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def matmul_flops_per_sec(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> dict:
  """The machine's own dense-matmul rate: a jitted [n, n] @ [n, n] in `dtype`, warmed up, median of `repeats`.

  FLOPs are the closed form 2·n³; XLA's count of the same program is returned beside it (they agree, which
  the tests check), so 'model FLOP/s / matmul FLOP/s' compares two figures of one counting convention."""
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  compiled = jax.jit(jnp.dot).lower(a, b).compile()
  times = time_calls(lambda: compiled(a, b), warmup=2, repeats=repeats)
  flops = 2.0 * n**3
  return {"n": n, "dtype": jnp.dtype(dtype).name, "flops": flops, "xla_flops": xla_flops(compiled),
          "seconds": median(times), "flops_per_sec": flops / median(times), "times": times}


# --- FLOP counting -------------------------------------------------------------------------------------


def xla_flops(compiled_or_lowered) -> float:
  """XLA's FLOP count of a compiled or lowered program (a dict in current JAX, a list of one in older)."""
  analysis = compiled_or_lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


@contextlib.contextmanager
def unrolled_scans():
  """Inside this block every `jax.lax.scan` traced unrolls fully.

  XLA's cost analysis counts a while loop's body once (its trip count is not in general known), so a halving
  round's two teacher steps, which `losses.two_ddim_steps` runs as a scan of length 2, would count as
  one. Counting FLOPs on a trace made inside this block counts both. Only tracing is affected: trace a fresh
  function (not one already traced, whose jaxpr JAX would reuse)."""
  original = jax.lax.scan

  def scan(*args, **kwargs):
    kwargs["unroll"] = True
    return original(*args, **kwargs)

  jax.lax.scan = scan
  try:
    yield
  finally:
    jax.lax.scan = original


def loops_left(lowered) -> list[str]:
  """Names of the functions of a lowered program that still hold a while loop, besides the PRNG's
  `threefry2x32` (its rounds are integer ops, not FLOPs). Empty: the FLOP count covers every iteration."""
  names = []
  for chunk in lowered.as_text().split("func.func")[1:]:
    match = re.match(r"\s*(?:private|public)?\s*@([\w.$-]+)", chunk)
    name = match.group(1) if match else "?"
    if "stablehlo.while" in chunk and not name.startswith("threefry"):
      names.append(name)
  return names


# --- output --------------------------------------------------------------------------------------------


def machine() -> dict:
  devices = jax.devices()
  return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "platform": devices[0].platform, "device_kind": devices[0].device_kind, "device_count": len(devices),
          "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
          "jax": jax.__version__}


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]):
  """A markdown table: columns are (key, header, format spec); a missing key prints '-'."""
  def cell(row, key, spec):
    value = row.get(key)
    if value is None:
      return "-"
    return format(value, spec) if spec else str(value)

  print("| " + " | ".join(h for _, h, _ in columns) + " |")
  print("| " + " | ".join("---" for _ in columns) + " |")
  for row in rows:
    print("| " + " | ".join(cell(row, k, s) for k, _, s in columns) + " |")


def write_json(path: str | None, report: dict):
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(report, f, indent=1, default=float)
    print(f"wrote {path}")

