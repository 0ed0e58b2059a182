r"""Data-parallel scaling on forced host devices: the sharded path, timed and checked against one device.

The script runs itself once per device count N in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N (the count is fixed when JAX starts). Each worker builds the
real train step of the config (`train.jitted_train_step` of a guided-PD round loss by default, on a
`parallel.make_mesh` mesh of N devices with the state placed as `train.run_stage` places it), runs k steps on
the same global batches (a pure function of the step, split over the N devices), and writes its parameters.
The parent compares each run's parameters with the 1-device run's:

  max rel diff     max over parameter leaves of ‖p_N − p_1‖∞ / max(‖p_1‖∞, u), u = max |p_1 − p_0| the largest
                   move of the k steps (tests/test_sharding.py's measure, with leaves smaller than u — zero-init
                   or rounding noise — measured against u); checked ≤ 1e-5
  diff / update    max |p_N − p_1| / u: the difference against how far the k steps moved
  images/s ratio   images/s with N devices / with 1

On a CPU the N 'devices' share the same cores, so the ratio does not rise with N (it falls a little, from the
all-reduce and the per-device overhead): this benchmark proves that the sharded path computes the same update,
not that it is faster. On a pod each device is a chip of its own and the same program scales.

The figures in bench/README.md come from bench/run_all.sh:
  python bench/scaling.py --config=configs/digits.py --json=bench/results/scaling_digits.json
  python bench/scaling.py --config=configs/digits.py --adam_eps=0 \
      --json=bench/results/scaling_digits_adam_eps_1e-8.json        # the configs' Adam: misses 1e-5, see ADAM_EPS
Quick check (< 60 s on 2 idle cores):
  python bench/scaling.py --quick
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as `python bench/scaling.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from bench import common

TOLERANCE = 1e-5  # the bar for a sharded step against the single-device one
# Adam's first updates are lr·g/(|g| + eps) ≈ lr·sign(g): with the configs' eps = 1e-8, a gradient entry that
# cancels to ~1e-9 over the batch turns the float reduction-order noise any change of device count brings into
# an O(lr) difference (measured on digits, 4 steps at batch 64: 1.2e-5–1.5e-5 relative, 3e-5 of the update;
# bench/README.md). As in tests/test_sharding.py, the check runs with a larger eps, so that what it compares is
# the update the sharded step computes; --adam_eps=0 keeps the config's optimizer and shows the amplified figure.
ADAM_EPS = 1e-4


def worker(config, *, kind: str, num_steps: int, batch_size: int, adam_eps: float | None, out: str):
  """Runs in a subprocess with N forced devices: k real train steps over all of them; writes OUT.npz (params
  and initial params, by path) and OUT.json (step times, mesh, loss)."""
  import jax
  from distill import parallel, train
  from bench import train_throughput
  spec = train_throughput.step_spec(config, kind, adam_eps=adam_eps)
  mesh = parallel.make_mesh(config.mesh.fsdp)
  parallel.check_partitionable_rng(mesh)
  min_size = config.mesh.fsdp_min_size
  params = parallel.place(spec.params, parallel.param_shardings(mesh, spec.params, min_size))
  state, shardings = train.place_state(train.init_state(params, spec.optimizer, spec.ema_decay is not None), mesh,
                                       min_size)
  frozen = parallel.place(spec.frozen, parallel.replicated_shardings(mesh, spec.frozen))
  shape = common.image_shape(config)

  def host_batch(step):  # the same global batch for every device count: a pure function of the step
    return common.synthetic_batch(batch_size, shape, config.data.num_classes, seed=1000 + step)

  step_fn = train.jitted_train_step(spec.loss_fn, spec.optimizer, spec.ema_decay, False, config.seed, shardings)
  start = time.perf_counter()
  compiled = step_fn.lower(state, frozen, parallel.global_batch(host_batch(0), mesh)).compile()
  compile_seconds = time.perf_counter() - start
  times = []
  for step in range(num_steps):
    start = time.perf_counter()  # as the trainer's loop: the batch is placed, then the step runs
    state, metrics = compiled(state, frozen, parallel.global_batch(host_batch(step), mesh))
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  final = parallel.to_host(state["params"])
  flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  np.savez(out + ".npz", **{"final" + k: v for k, v in flat(final).items()},
           **{"init" + k: v for k, v in flat(parallel.to_host(spec.params)).items()})
  batch_sharding = parallel.batch_sharding(mesh)
  with open(out + ".json", "w") as f:
    json.dump({"devices": jax.device_count(), "mesh": dict(mesh.shape), "kind": kind, "batch": batch_size,
               "rows_per_device": batch_size // mesh.size, "batch_spec": str(batch_sharding.spec),
               "step_times": times, "compile_seconds": compile_seconds, "loss": float(metrics["loss"])}, f)


def _split(npz_path: str) -> tuple[dict, dict]:
  with np.load(npz_path) as z:
    final = {k[len("final"):]: z[k] for k in z.files if k.startswith("final")}
    init = {k[len("init"):]: z[k] for k in z.files if k.startswith("init")}
  return final, init


def compare(params: dict, reference: dict, init: dict) -> dict:
  """params against reference (the 1-device run), both {path: array}; init: the parameters before the steps.

  max_rel_diff: max over leaves of ‖a − b‖∞ / max(‖b‖∞, u), u = max |b − init| over all entries, the largest
  move the k steps made. A leaf is measured against its own size, or against u when it is smaller: leaves
  that start at zero (the zero-initialised output convs) are then compared with how far training moved, and
  leaves whose exact gradient is zero (a key bias under softmax, a conv bias under GroupNorm), which hold only
  rounding noise (~1e-11), do not divide noise by noise. diff_vs_update: max |a − b| / u."""
  update = max(float(np.max(np.abs(reference[k].astype(np.float64) - init[k]))) for k in reference)
  rel, diff = 0.0, 0.0
  for k, b in reference.items():
    d = float(np.max(np.abs(params[k].astype(np.float64) - b)))
    rel = max(rel, d / max(float(np.max(np.abs(b))), update, 1e-30))
    diff = max(diff, d)
  return {"max_rel_diff": rel, "diff_vs_update": diff / max(update, 1e-30), "update_max": update}


def run(config_args: list[str], *, devices=(1, 2, 4, 8), kind: str = "round", num_steps: int = 4,
        batch_size: int = 64, adam_eps: float | None = ADAM_EPS, workdir: str | None = None, label: str = "",
        concurrent: bool = False) -> dict:
  """Runs the worker once per device count and compares each with the first (1 device). config_args: the
  --config flags, as on this script's command line. The workers run one at a time, so their timings do not
  overlap; concurrent=True starts them together (faster; the timings then mean nothing, the check still holds)."""
  if devices[0] != 1:
    raise ValueError(f"devices={devices}: the first run is the 1-device reference")
  if any(batch_size % n for n in devices):
    raise ValueError(f"batch {batch_size} does not split over {devices} devices")
  if workdir is None:  # the workers' parameter files are only needed for the comparison
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
      return run(config_args, devices=devices, kind=kind, num_steps=num_steps, batch_size=batch_size,
                 adam_eps=adam_eps, workdir=tmp, label=label, concurrent=concurrent)
  flags_ = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))

  def start(n):
    env = dict(os.environ, XLA_FLAGS=f"{flags_} --xla_force_host_platform_device_count={n}".strip(),
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker_out={os.path.join(workdir, f'devices{n}')}",
           f"--worker_devices={n}", f"--kind={kind}", f"--steps={num_steps}", f"--batch={batch_size}",
           f"--adam_eps={adam_eps or 0}", *config_args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=common.ROOT)

  def finish(n, proc):
    _, stderr = proc.communicate()
    if proc.returncode:
      raise RuntimeError(f"worker with {n} devices failed ({proc.returncode}):\n{stderr[-3000:]}")

  if concurrent:
    procs = [(n, start(n)) for n in devices]
    for n, proc in procs:
      finish(n, proc)
  else:
    for n in devices:
      finish(n, start(n))
  rows = []
  for n in devices:
    with open(os.path.join(workdir, f"devices{n}.json")) as f:
      row = json.load(f)
    # The first step also pays for first-touch allocations: the median of the others.
    row["step_seconds"] = common.median(row["step_times"][1:] or row["step_times"])
    row["images_per_sec"] = batch_size / row["step_seconds"]
    rows.append(row)
  reference, init = _split(os.path.join(workdir, "devices1.npz"))
  for n, row in zip(devices, rows):
    params, _ = _split(os.path.join(workdir, f"devices{n}.npz"))
    row.update(compare(params, reference, init))
    row["throughput_ratio"] = row["images_per_sec"] / rows[0]["images_per_sec"]
    row["ok"] = row["max_rel_diff"] <= TOLERANCE
    row["config"] = label
  return {"machine": common.machine(), "config": label, "kind": kind, "steps": num_steps, "batch": batch_size,
          "adam_eps": adam_eps,
          "tolerance": TOLERANCE, "all_equal": all(r["ok"] for r in rows), "rows": rows}


COLUMNS = [("config", "config", ""), ("devices", "devices", "d"), ("rows_per_device", "rows/device", "d"),
           ("images_per_sec", "images/s", ".1f"), ("step_ms", "ms/step", ".1f"),
           ("throughput_ratio", "images/s vs 1 device", ".2f"), ("max_rel_diff", "max rel diff", ".2e"),
           ("diff_vs_update", "diff / update", ".2e"), ("ok", f"≤ {TOLERANCE:g}", "")]


def print_report(report: dict):
  m = report["machine"]
  eps = f"Adam eps {report['adam_eps']:g}" if report["adam_eps"] else "the config's optimizer"
  print(f"\n## data-parallel scaling on forced host devices ({m['date']}, {m['cpu_count']} CPUs, jax {m['jax']}; "
        f"{report['kind']} step, global batch {report['batch']}, {report['steps']} steps, {eps})\n")
  common.print_table([dict(r, step_ms=1e3 * r["step_seconds"]) for r in report["rows"]], COLUMNS)
  print(f"\nparameters after {report['steps']} steps equal the 1-device run's to ≤ {TOLERANCE:g} relative: "
        f"{'yes' if report['all_equal'] else 'NO'}. The devices share {m['cpu_count']} CPU cores, so images/s "
        "does not rise with N here: this proves the sharded path, not a speed-up.")


def main():
  from absl import app, flags
  from ml_collections import config_flags
  config_flag = config_flags.DEFINE_config_file("config", os.path.join(common.ROOT, "configs/digits.py"),
                                                "Config file (with :variant) and --config.x=y overrides.")
  devices = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts (the first must be 1).")
  kind = flags.DEFINE_enum("kind", "round", ["teacher", "stage_one", "round"], "The train step.")
  steps = flags.DEFINE_integer("steps", 4, "Steps k per run (parameters compared after k).")
  batch = flags.DEFINE_integer("batch", 64, "Global batch, the same for every device count.")
  adam_eps = flags.DEFINE_float("adam_eps", ADAM_EPS, "Adam's eps for the check (0: the config's optimizer, eps "
                                 "1e-8, whose sign-like first updates amplify reduction-order noise).")
  quick = flags.DEFINE_bool("quick", False, "Smoke mode (< 60 s on 2 idle cores): the tiny U-Net of "
                            "common.TINY_MODEL, devices 1, 2, 8, batch 16, 3 steps.")
  json_path = flags.DEFINE_string("json", None, "Also write the report here.")
  worker_out = flags.DEFINE_string("worker_out", None, "Internal: run as the worker, writing OUT.npz/OUT.json.")
  worker_devices = flags.DEFINE_integer("worker_devices", None, "Internal: the device count the worker expects.")

  def _main(argv):
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    from distill import configuration
    config = config_flag.value
    config_args = [a for a in sys.argv[1:] if a.startswith("--config")]
    if quick.value and not worker_out.value:
      config_args += common.override_flags(common.TINY_MODEL)
    configuration.validate(config)
    if worker_out.value:
      import jax
      if jax.device_count() != worker_devices.value:
        raise RuntimeError(f"worker expected {worker_devices.value} devices, JAX sees {jax.device_count()}")
      worker(config, kind=kind.value, num_steps=steps.value, batch_size=batch.value, adam_eps=adam_eps.value or None,
             out=worker_out.value)
      return
    given = [a for a in sys.argv[1:] if a.startswith("--config")]
    label = " ".join(a.split("=", 1)[1] if a.startswith("--config=") else a for a in given)
    if not any(a.startswith("--config=") for a in given):
      label = f"configs/digits.py {label}".strip()
    if quick.value:
      label += " (quick: tiny U-Net)"
    counts = tuple(int(n) for n in devices.value)
    b, k = batch.value, steps.value
    if quick.value:
      counts, b, k = (1, 2, 8), 16, 3
    report = run(config_args, devices=counts, kind=kind.value, num_steps=k, batch_size=b,
                 adam_eps=adam_eps.value or None, label=label)
    print_report(report)
    common.write_json(json_path.value, report)
    if not report["all_equal"]:
      sys.exit(1)

  app.run(_main)


if __name__ == "__main__":
  main()
