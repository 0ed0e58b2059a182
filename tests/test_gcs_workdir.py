"""A gs:// workdir (issue 5): the run's own files go through etils.epath, checkpoints through Orbax.

There is no GCS here: `etils.epath.testing.mock_epath` maps every epath call on gs://test-bucket/... onto a
tmp directory (and an object store's walk is imitated by naming directories without the scheme, as fsspec
does), and `train.orbax_path`, where the trainer hands every checkpoint directory to Orbax (which writes
gs:// through tensorstore, not epath), is patched the same way, recording what Orbax was handed. Anything
that still went through os/open with the URL would make a local directory named 'gs:'; none may appear.
"""
import json
import os
import signal
import sys

import numpy as np
import pytest
from absl import flags
from etils.epath import testing as epath_testing
from tensorboard.backend.event_processing import event_accumulator

from distill import evaluate, train, writers
from distill.evaluation import classifier, protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "gs://test-bucket"


class FakeBucket:
  """gs://test-bucket/<p> <-> <root>/<p>; records the gs:// paths epath was asked about."""

  def __init__(self, root):
    self.root = str(root)
    self.seen = []

  def local(self, path):
    path = os.fspath(path)
    if path == BUCKET or path.startswith(BUCKET + "/"):
      self.seen.append(path)
      return self.root + path[len(BUCKET):]
    assert "://" not in path, f"an unexpected URL reached epath: {path}"
    return path

  def walked(self, path):
    """A local path under the bucket as fsspec's walk names it: 'test-bucket/…', without the scheme."""
    path = os.fspath(path)
    return "test-bucket" + path[len(self.root):] if path.startswith(self.root) else path

  def mocks(self):
    one = lambda original, path, *args, **kwargs: original(self.local(path), *args, **kwargs)
    two = lambda original, path, dst, *args, **kwargs: original(self.local(path), self.local(dst), *args, **kwargs)

    def glob(original, pattern):  # matches named as the pattern was (Orbax globs its local paths)
      found = original(self.local(pattern))
      return [BUCKET + p[len(self.root):] for p in found] if os.fspath(pattern).startswith(BUCKET) else found

    def walk(original, top, **kwargs):
      for root, dirs, files in original(self.local(top), **kwargs):
        yield self.walked(root) if os.fspath(top).startswith(BUCKET) else root, dirs, files

    return dict(open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one, rmtree=one,
                stat=one, rename=two, replace=two, copy=two, glob=glob, walk=walk)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """A FakeBucket under tmp_path/bucket with epath mocked and Orbax's paths translated; cwd is tmp_path/cwd.
  Yields the bucket; `bucket.orbax` lists the paths Orbax was handed."""
  fake = FakeBucket(tmp_path / "bucket")
  os.makedirs(fake.root)
  os.makedirs(tmp_path / "cwd")
  monkeypatch.chdir(tmp_path / "cwd")
  fake.orbax = []
  original = train.orbax_path

  def orbax_path(path):
    handed = original(path)
    fake.orbax.append(handed)
    return fake.local(handed)

  monkeypatch.setattr(train, "orbax_path", orbax_path)
  with epath_testing.mock_epath(**fake.mocks()):
    yield fake
  stray = [os.path.join(d, "gs:") for d, dirs, _ in os.walk(tmp_path) if "gs:" in dirs]
  stray += [os.path.join(ROOT, "gs:")] if os.path.exists(os.path.join(ROOT, "gs:")) else []
  assert not stray, f"local directories named after the URL: {stray}"


def test_atomic_write_keeps_the_previous_file_when_the_write_fails(tmp_path, bucket):
  for path in (str(tmp_path / "local" / "eval.json"), f"{BUCKET}/run/eval.json"):
    writers.atomic_write_json(path, {"agreement": 0.5}, indent=1)
    with pytest.raises(TypeError):  # json.dump has written part of the file when it meets the object
      writers.atomic_write_json(path, {"agreement": 0.9, "bad": object()}, indent=1)
    assert writers.read_json(path) == {"agreement": 0.5}

    def half_then_fail(f):
      f.write(b"PK\x03\x04 half an npz")
      raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
      writers.atomic_write(path, half_then_fail)
    assert writers.read_json(path) == {"agreement": 0.5}
    directory = os.path.dirname(bucket.local(path))
    assert os.listdir(directory) == ["eval.json"], "a temporary file was left behind"
  # npz, PNG: serialised in memory first, renamed into place.
  grid = writers.save_image_grid(f"{BUCKET}/run/grids/samples.png", np.zeros((4, 8, 8, 1)), ncols=2)
  assert open(bucket.local(f"{BUCKET}/run/grids/samples.png"), "rb").read(4) == b"\x89PNG" and grid.ndim == 3
  writers.atomic_write_bytes(f"{BUCKET}/run/c.npz", writers.npz_bytes(a=np.arange(3)))
  with writers.read_npz(f"{BUCKET}/run/c.npz") as d:
    np.testing.assert_array_equal(d["a"], np.arange(3))


def test_metric_writer_appends_to_metrics_jsonl_in_a_bucket(bucket):
  logdir = f"{BUCKET}/run/teacher/tb"
  for step in (1, 2):  # two sessions, as a resumed stage has: the object is rewritten, old lines first
    with writers.MetricWriter(logdir) as writer:
      writer.write_scalars(step, {"loss": 1.0 / step})
  lines = [json.loads(l) for l in open(os.path.join(bucket.local(logdir), "metrics.jsonl"))]
  assert lines == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
  acc = event_accumulator.EventAccumulator(bucket.local(logdir))
  acc.Reload()
  # Two sessions write two event files; TensorBoard reads them in file-name order, which two files opened within
  # one second do not fix, so the steps are compared as a set of points.
  assert sorted((e.step, e.value) for e in acc.Scalars("loss")) == [(1, 1.0), (2, 0.5)]


def test_final_in_a_bucket_is_written_in_place_and_marked_by_meta(bucket):
  stage_dir = f"{BUCKET}/run/stage_one"
  leftover = os.path.join(bucket.local(stage_dir), "final", "params", "junk")  # a killed earlier attempt
  os.makedirs(leftover)
  assert not train.has_final(stage_dir)
  train._save_final(stage_dir, {"w": np.arange(3, dtype=np.float32)}, {"kind": "w_student"})
  assert train.has_final(stage_dir) and not os.path.exists(leftover)
  assert not os.path.exists(bucket.local(stage_dir) + "/final.tmp")
  params, meta = train.load_final_params(stage_dir)
  np.testing.assert_array_equal(params["w"], np.arange(3))
  assert meta == {"kind": "w_student"}
  assert bucket.orbax == [f"{stage_dir}/final/params"] * 2  # saved, restored: the URL as it is

  # The evaluate stage finds it (and a round below another stage) through an object store's walk.
  round_dir = os.path.join(bucket.local(BUCKET), "run", "distill_deterministic", "N0002", "final")
  os.makedirs(round_dir)
  open(os.path.join(round_dir, "meta.json"), "w").write("{}")
  os.makedirs(os.path.join(bucket.local(BUCKET), "run", "distill_deterministic", "N0001", "checkpoints"))
  assert evaluate.finished_students(f"{BUCKET}/run") == [
      ("stage_one", f"{BUCKET}/run/stage_one"),
      ("distill_deterministic/N0002", f"{BUCKET}/run/distill_deterministic/N0002")]


def test_evaluation_files_in_a_bucket(bucket):
  """The classifier cache, reference statistics, results.json, report.md and the plots, in a bucket."""
  run = f"{BUCKET}/run"
  params = {"Dense_0": {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)}}
  classifier.save_classifier(f"{run}/classifier/digits.npz", params, {"test_accuracy": 0.9})
  loaded, meta = classifier.load_classifier(f"{run}/classifier/digits.npz")
  np.testing.assert_array_equal(loaded["Dense_0"]["kernel"], params["Dense_0"]["kernel"])
  assert meta == {"test_accuracy": 0.9}

  net = protocol.FeatureNet("classifier", lambda x: (x.reshape(len(x), -1), x.reshape(len(x), -1)), "stub")
  batches = lambda: iter([np.linspace(-1, 1, 24).reshape(6, 2, 2, 1)])
  cache = f"{run}/eval_reference/digits_8_classifier_6.npz"
  ref = protocol.reference_stats(net, batches, cache)
  again = protocol.reference_stats(net, lambda: pytest.fail("the cached statistics were not used"), cache)
  np.testing.assert_array_equal(again.mu, ref.mu)
  assert again.num_images == ref.num_images == 6

  rows = [{"method": m, "sampler": "ddim", "w": w, "steps": n, "nfe": 2 * n, "fid": 10.0 / n + w, "is": 1.0 + n + w,
           "num_samples": 6, "metric": "classifier"} for m in ("teacher DDIM", "guided PD") for n in (1, 2)
          for w in (0.0, 1.0)]  # two w: the trade-off plot draws curves over w
  evaluate.write_outputs(run, rows, net, ref)
  local = bucket.local(run)
  assert json.load(open(os.path.join(local, "results.json")))["rows"] == rows
  assert "guided PD" in open(os.path.join(local, "report.md")).read()
  for png in ("fid_vs_nfe.png", "fid_vs_is.png"):
    assert open(os.path.join(local, png), "rb").read(4) == b"\x89PNG", png
  assert sorted(os.listdir(local)) == ["classifier", "eval_reference", "fid_vs_is.png", "fid_vs_nfe.png",
                                       "report.md", "results.json"]  # no temporary files left


def _run_main(args):
  """distill.main in this process with `args`, its absl flags parsed afresh (the output goes to capsys)."""
  from distill import main as main_lib
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # overrides a previous parse defined
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  argv = ["distill.main", *args]
  previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  saved_argv, sys.argv = sys.argv, argv  # config_flags reads its --config.* overrides from sys.argv
  try:
    main_lib._flags_parser(argv)
    main_lib.main(["distill.main"])
  finally:
    sys.argv = saved_argv
    for s, handler in previous.items():
      signal.signal(s, handler)
    train.clear_stop_request()
    flags.FLAGS.unparse_flags()


# The teacher stage of a tiny model, 4 steps, a checkpoint at step 2 (class agreement and the evaluate stage
# cost half a minute of compiling; their files are covered above).
TINY = [f"--config={ROOT}/configs/digits.py:quick", "--config.pipeline=('teacher',)",
        "--config.model.ch=8", "--config.model.ch_mult=(1,)", "--config.model.num_res_blocks=1",
        "--config.model.attn_resolutions=()", "--config.model.num_groups=4", "--config.teacher.batch_size=8",
        "--config.teacher.num_steps=4", "--config.teacher.log_every=2", "--config.teacher.ckpt_every=2",
        "--config.sample.num_steps=2", "--config.sample.w_values=(0.0,)", "--config.sample.per_cell=1",
        "--config.eval.class_agreement=False"]


def test_a_run_with_a_gs_workdir_writes_there_and_resumes(bucket, monkeypatch, capsys):
  monkeypatch.setenv("DISTILL_JAX_CACHE", "")
  workdir = f"{BUCKET}/run"
  _run_main([*TINY, f"--workdir={workdir}"])
  out = capsys.readouterr().out
  assert f"workdir: {workdir}" in out and "done: wall-clock per stage" in out, out
  local = bucket.local(workdir)
  for f in ("config.json", "summary.json", "teacher/samples.png", "teacher/final/meta.json",
            "teacher/tb/metrics.jsonl"):
    assert os.path.isfile(os.path.join(local, f)), f
  assert json.load(open(os.path.join(local, "config.json")))["teacher"]["num_steps"] == 4
  assert set(json.load(open(os.path.join(local, "summary.json")))["wall_clock_seconds"]) == {"teacher"}
  assert [json.loads(l)["step"] for l in open(os.path.join(local, "teacher", "tb", "metrics.jsonl"))] == [2, 4]
  acc = event_accumulator.EventAccumulator(os.path.join(local, "teacher", "tb"))
  acc.Reload()
  assert [e.step for e in acc.Scalars("loss")] == [2, 4]
  # Orbax was handed the URLs themselves: the checkpoint manager's directory and the final parameters.
  assert f"{workdir}/teacher/checkpoints" in bucket.orbax and f"{workdir}/teacher/final/params" in bucket.orbax
  assert all(p.startswith(f"{workdir}/teacher/") for p in bucket.orbax), bucket.orbax
  # The last step is final/, not a checkpoint; once final/ is written checkpoints/ goes (train.keep_checkpoints).
  assert not os.path.exists(os.path.join(local, "teacher", "checkpoints"))
  assert not os.path.exists(os.path.join(local, "teacher", "final.tmp"))  # written in place in a bucket
  assert any(p.startswith(f"{workdir}/teacher/final") for p in bucket.seen)

  # The same command again: the finished stage is loaded from the bucket, its grid is not redrawn.
  png = os.path.join(local, "teacher", "samples.png")
  stamp = os.stat(png).st_mtime_ns
  _run_main([*TINY, f"--workdir={workdir}"])
  out = capsys.readouterr().out
  assert f"[teacher] already finished; loading {workdir}/teacher/final" in out, out
  assert os.stat(png).st_mtime_ns == stamp


def test_leftovers_of_a_killed_run_are_swept_in_a_bucket(bucket):
  """train.sweep_leftovers through epath on a gs:// stage directory (globbed one level at a time: epath refuses
  `**` on GCS): the atomic writes' temporary files of the stage directory, tb/ and final/, and Orbax's
  temporary checkpoint directories."""
  stage_dir = f"{BUCKET}/run/teacher"
  planted = ["samples.png.tmp-11-0123abcd", "tb/hparams.json.tmp-12-0123abcd", "final/meta.json.tmp-13-0123abcd",
             "checkpoints/4.orbax-checkpoint-tmp/x"]
  kept = ["samples.png", "tb/metrics.jsonl", "final/params/x", "checkpoints/2/x"]
  for path in planted + kept:
    local = bucket.local(f"{stage_dir}/{path}")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    open(local, "w").close()
  assert train.sweep_leftovers(stage_dir) == sorted(planted[:3] + ["checkpoints/4.orbax-checkpoint-tmp"])
  assert [os.path.exists(bucket.local(f"{stage_dir}/{p}")) for p in planted + kept] == [False] * 4 + [True] * 4
