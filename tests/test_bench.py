"""The benchmarks' measuring tools and their outputs, on a tiny U-Net (bench/*.py).

FLOP counts are checked against closed forms (2·n³ for a matmul; a scan of k matmuls is k of them) and against
an independent count: a train step's FLOPs in units of one separately lowered network evaluation must be ~3
for the teacher step (forward + backward) and ~5 for a halving round (two teacher evaluations on top).
The --quick runs of the scripts themselves are marked slow.
"""
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import common, input_pipeline, sampling_throughput, scaling, train_throughput  # noqa: E402

TINY = dict(common.TINY_MODEL, **{"teacher.batch_size": 8, "distill.batch_size": 8})
TINY_ARGS = ["--config=configs/digits.py"] + common.override_flags(TINY)


def finite_positive(x):
  return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_config():
  return common.load_config("configs/digits.py", TINY)


def test_matmul_count_is_the_closed_form_and_rate_is_measured():
  m = common.matmul_flops_per_sec(128, repeats=3)
  assert m["xla_flops"] == m["flops"] == 2 * 128**3
  assert finite_positive(m["flops_per_sec"]) and len(m["times"]) == 3


def test_unrolled_scans_count_every_iteration():
  a = jnp.ones((32, 32))

  def f(x):  # a fresh function per trace, as unrolled_scans asks
    return jax.lax.scan(lambda c, _: (c @ a, None), x, None, length=3)[0]

  x = jnp.ones((32, 32))
  once = common.xla_flops(jax.jit(lambda x: f(x)).lower(x))
  with common.unrolled_scans():
    lowered = jax.jit(lambda x: f(x)).lower(x)
  assert common.xla_flops(lowered) == 3 * 2 * 32**3
  assert once < 1.01 * 2 * 32**3  # what cost analysis says of the loop as written: one body
  assert common.loops_left(lowered) == []
  assert common.xla_flops(jax.jit(lambda x: f(x)).lower(x)) == once  # jax.lax.scan restored on exit


def test_train_throughput_round_step(tiny_config):
  report = train_throughput.run(tiny_config, kinds=("round",), steps=1, repeats=2, matmul_n=128)
  (row,) = report["steps"]
  for key in ("images_per_sec", "flops", "flops_per_sec", "matmul_flops_per_sec", "flops_ratio"):
    assert finite_positive(float(row[key])), (key, row[key])
  assert row["batch"] == 8 and row["loops_left"] == []
  # Two teacher evaluations + the student's forward and backward (~2 forwards): ~5 forwards per image.
  assert 4.6 < row["forward_equivalents"] < 5.4, row["forward_equivalents"]
  # As written, the scan's second teacher step is not counted: one forward short.
  missing = (row["flops"] - row["flops_loops_once"]) / (row["forward_flops_per_image"] * row["batch"])
  assert 0.9 < missing < 1.1, missing
  assert math.isclose(row["flops_ratio"], row["flops_per_sec"] / row["matmul_flops_per_sec"])


def test_full_model_count_is_linear_in_batch_and_counts_forwards(tiny_config):
  (row,) = train_throughput.full_model_flops(tiny_config, kinds=("teacher",))
  assert abs(row["fit_error"]) < 1e-3 and row["loops_left"] == []
  # Forward and backward: ~3 forwards per image (the round's ~5 is checked above, on the compiled step).
  assert 2.6 < row["forward_equivalents"] < 3.4, row
  assert finite_positive(float(row["fixed_flops_per_step"]))  # Adam and the EMA: per step, not per image


def test_sampling_throughput(tiny_config):
  fns = sampling_throughput.samplers_of(tiny_config, batch=4, w=0.0)
  # What is timed samples: finite images, and a fresh student (zero-initialised w-embedding) equals the
  # conditional teacher, i.e. the CFG teacher at w = 0.
  t, s = np.asarray(fns[0](2)), np.asarray(fns[1](2))
  assert t.shape == s.shape == (4, 8, 8, 1) and np.all(np.isfinite(t))
  np.testing.assert_allclose(s, t, atol=1e-5)
  report = sampling_throughput.run(tiny_config, batch=4, steps=(1, 2), repeats=2, w=0.0, fns=fns)
  assert [r["steps"] for r in report["rows"]] == [1, 2]
  for r in report["rows"]:
    assert r["teacher_nfe"] == 2 * r["student_nfe"] == 2 * r["steps"]
    for key in ("teacher_images_per_sec", "student_images_per_sec", "speedup", "per_evaluation_ratio"):
      assert finite_positive(float(r[key])), (key, r[key])
  assert report["student_params"] > report["teacher_params"]  # the w-embedding


def test_scaling_compare_catches_a_difference():
  rng = np.random.default_rng(0)
  init = {"a": rng.normal(size=(4, 4)).astype(np.float32), "b": np.zeros(3, np.float32)}
  ref = {"a": init["a"] + 1e-3, "b": np.full(3, 1e-3, np.float32)}
  assert scaling.compare(ref, ref, init)["max_rel_diff"] == 0.0
  off = dict(ref, b=ref["b"] + np.float32(1e-6))  # a zero-init leaf off by 0.1 % of the update
  r = scaling.compare(off, ref, init)
  assert r["max_rel_diff"] > scaling.TOLERANCE and math.isclose(r["diff_vs_update"], 1e-3, rel_tol=0.05)


def test_scaling_sharded_equals_one_device(tmp_path):
  report = scaling.run(TINY_ARGS, devices=(1, 2), num_steps=2, batch_size=8, workdir=str(tmp_path), concurrent=True)
  one, two = report["rows"]
  assert one["devices"] == 1 and two["devices"] == 2 and two["rows_per_device"] == 4
  assert report["all_equal"] and two["max_rel_diff"] <= scaling.TOLERANCE, two
  assert two["update_max"] > 1e-5  # the steps moved the parameters: the equality is not vacuous
  assert finite_positive(float(two["throughput_ratio"]))


def test_input_pipeline_against_the_train_step(monkeypatch):
  """The input side runs for real; the train step's measurement (tested above) is stubbed: compiling even the
  tiny U-Net at 64×64 takes ~20 s."""
  config = common.load_config("configs/imagenet64.py", common.TINY_MODEL)
  measured = []

  def measure_step(config, spec, *, steps, repeats):
    measured.append((spec.kind, spec.batch_size, steps, repeats))
    return {"kind": spec.kind, "batch": spec.batch_size, "params": spec.num_params, "images_per_sec": 2.0,
            "step_seconds": spec.batch_size / 2.0, "flops_per_image": 1e9, "compile_seconds": 1.0, "devices": 1}

  monkeypatch.setattr(train_throughput, "measure_step", measure_step)
  report = input_pipeline.run(config, workers=(0,), prefetch=2, host_batch=16, batches=2, repeats=1,
                              num_examples=64, train_batch=2, kind="teacher", train_steps=1, train_repeats=1)
  assert report["data"]["tfds_name"] == "imagenet_resized/64x64" and report["data"]["examples"] == 64
  assert 2e3 < report["data"]["bytes_per_example"] < 12.3e3  # compresses, unlike noise (64·64·3 = 12.3 kB)
  sync, threads = report["rows"]
  assert (sync["num_workers"], sync["prefetch"], threads["prefetch"]) == (0, 0, 2)
  assert report["per_core_images_per_sec"] == sync["images_per_sec"]
  for row in report["rows"]:
    assert len(row["before"]["rates"]) == len(row["after"]["rates"]) == 1  # measured on both sides of the step
    for key in ("images_per_sec", "train_images_per_sec", "ratio"):
      assert finite_positive(float(row[key])), (key, row[key])
    assert math.isclose(row["ratio"], row["images_per_sec"] / row["train_images_per_sec"])
  assert measured == [("teacher", 2, 1, 1)] and report["train"]["images_per_sec"] == 2.0


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_throughput.py", "sampling_throughput.py", "scaling.py", "input_pipeline.py"])
def test_quick_mode(script, tmp_path):
  out = tmp_path / "report.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--quick", f"--json={out}"],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| ---" in proc.stdout and out.exists()
