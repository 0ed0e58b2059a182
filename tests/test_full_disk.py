"""A real full disk (issue 18, item 2): a size-limited tmpfs that fills while a checkpoint's data, final/,
config.json, a grid, an eval file, summary.json, or the evaluate stage's rows and results.json is written. Each
ends as one line naming what could not be written (a `CheckpointWriteError` / `StageFailed`, which
`distill.main` prints as `error: …` with exit code 1), leaves the last good checkpoint (or the previous file)
intact and no half-written file, and a rerun after space is freed resumes bit-identically.

Mounting needs root (CI runs as root); elsewhere the tests are skipped with the reason. Unlike
tests/test_resilience.py, which raises ENOSPC at Orbax's final rename with space left, nothing here is
simulated: the writes fail because the filesystem is full.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest

from distill import configuration, pipeline, train, writers

from test_resilience import _stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISK_KB = 4096


@pytest.fixture
def disk(tmp_path):
  """A DISK_KB tmpfs mounted at tmp_path/disk for one test (skipped where mounting is not allowed)."""
  path = tmp_path / "disk"
  path.mkdir()
  if os.geteuid() != 0:
    pytest.skip("mounting a size-limited tmpfs needs root")
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_KB}k", "tmpfs", str(path)], capture_output=True,
                        text=True)
  if proc.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
  yield path
  subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk, leave: int = 0) -> str:
  """Takes every free byte of `disk` but `leave` into one file (its path returned: remove it to free space)."""
  filler = os.path.join(disk, f"filler-{uuid.uuid4().hex[:6]}")
  st = os.statvfs(disk)
  free = st.f_bavail * st.f_frsize - leave
  with open(filler, "wb") as f:
    try:
      f.write(b"\0" * max(free, 0))
      f.flush()
    except OSError:  # tmpfs rounds to pages: the last one may not fit
      pass
  return filler


def _hashes(path) -> dict:
  out = {}
  for dirpath, _, files in os.walk(path):
    for f in files:
      with open(os.path.join(dirpath, f), "rb") as fh:
        out[os.path.relpath(os.path.join(dirpath, f), path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _half_written(root) -> list[str]:
  return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if ".tmp-" in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  params, _ = train.run_stage(_stage(), str(tmp_path_factory.mktemp("ref") / "toy"))
  return np.asarray(params["w"])


@pytest.mark.parametrize("leave", [0, 16 << 10], ids=["no_space", "16k_left"])
def test_disk_full_while_a_checkpoints_data_is_written(disk, reference, leave, capsys, caplog):
  """The known bug: the metric writer's close (a flush on the full disk) raised its own ENOSPC traceback over
  the one-line 'could not save …'."""
  stage_dir = str(disk / "toy")
  kept, filler = {}, []

  def fill_before_step_4(step):
    if step == 3:  # the checkpoint of step 2 is complete; step 4's is the next write
      kept.update(_hashes(os.path.join(stage_dir, "checkpoints", "2")))
      filler.append(fill(disk, leave))

  with pytest.raises(train.CheckpointWriteError) as error:
    train.run_stage(_stage(on_batch=fill_before_step_4), stage_dir)
  message = str(error.value)
  for needle in ("[toy] could not save the checkpoint of step 4/8", "the disk is full",
                 "the checkpoint of step 2 is intact", "run the same command again"):
    assert needle in message, message
  assert "\n" not in message
  assert not capsys.readouterr().err and not [r for r in caplog.records if r.levelname == "ERROR"]
  assert kept and _hashes(os.path.join(stage_dir, "checkpoints", "2")) == kept

  os.remove(filler[0])  # space freed: the rerun resumes from step 2 and ends as if never stopped
  resumed, _ = train.run_stage(_stage(), stage_dir)
  assert "[toy] resuming at step 2/8" in capsys.readouterr().out
  np.testing.assert_array_equal(np.asarray(resumed["w"]), reference)


def test_disk_full_while_final_is_written(disk, reference, capsys):
  stage_dir = str(disk / "toy")
  filler = []
  with pytest.raises(train.CheckpointWriteError) as error:
    # 8 KB left: the metrics' last lines still fit (two pages), final/'s files do not
    train.run_stage(_stage(on_batch=lambda s: s == 7 and filler.append(fill(disk, leave=8 << 10))), stage_dir)
  message = str(error.value)
  assert "could not write" in message and "/final after step 8" in message and "the disk is full" in message
  assert "the checkpoint of step 6 is intact" in message and "\n" not in message
  assert not os.path.exists(os.path.join(stage_dir, "final"))
  os.remove(filler[0])
  resumed, _ = train.run_stage(_stage(), stage_dir)
  assert "[toy] resuming at step 6/8" in capsys.readouterr().out
  np.testing.assert_array_equal(np.asarray(resumed["w"]), reference)
  np.testing.assert_array_equal(train.load_final_params(stage_dir)[0]["w"], reference)


def test_disk_full_before_config_json_is_one_line_exit_1_and_nothing_written(disk):
  fill(disk)
  workdir = disk / "wd"
  env = dict(os.environ, DISTILL_JAX_CACHE="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "distill.main", "--config=configs/digits.py", f"--workdir={workdir}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: the disk is full"), proc.stderr[-2000:]
  assert "config.json" in lines[0] and "nothing was written" in lines[0], lines[0]
  assert not os.path.exists(workdir / "config.json") and not _half_written(disk)


def _pipeline_config():
  c = configuration.base_config()
  c.pipeline = ("teacher",)
  return c


@pytest.mark.parametrize("what", ["samples.png", "eval.json"])
def test_disk_full_while_a_stage_writes_a_grid_or_an_eval_file(disk, monkeypatch, what):
  """A stage's grid or eval file (written atomically through `writers`, as every stage does) on a full disk:
  one line naming the stage and the file; the previous file is intact; the rerun writes it."""
  workdir = str(disk / "wd")
  target = os.path.join(workdir, "teacher", what)

  def write(ctx):
    if what == "samples.png":
      noise = np.random.default_rng(0).uniform(-1, 1, (16, 64, 64, 1))  # ~64 KB of PNG that does not compress
      writers.save_image_grid(target, noise, ncols=4)
    else:
      writers.atomic_write_json(target, {"agreement": [0.5] * 20000})

  monkeypatch.setattr(pipeline, "stage_runner", lambda name: write)
  pipeline.run(_pipeline_config(), workdir)
  before = _hashes(os.path.join(workdir, "teacher"))
  filler = fill(disk, leave=4 << 10)  # less than the file needs
  with pytest.raises(train.StageFailed) as error:
    pipeline.run(_pipeline_config(), workdir)
  message = str(error.value)
  assert message.startswith("[teacher] the disk is full: ") and what in message and "\n" not in message, message
  assert _hashes(os.path.join(workdir, "teacher")) == before and not _half_written(disk)
  os.remove(filler)
  pipeline.run(_pipeline_config(), workdir)
  assert _hashes(os.path.join(workdir, "teacher")) == before  # the same content, written whole


def test_disk_full_while_summary_json_is_written(disk, monkeypatch):
  workdir = str(disk / "wd")
  filler = []
  monkeypatch.setattr(pipeline, "stage_runner", lambda name: lambda ctx: None)
  pipeline.run(_pipeline_config(), workdir)
  summary = open(os.path.join(workdir, "summary.json")).read()
  monkeypatch.setattr(pipeline, "stage_runner", lambda name: lambda ctx: filler.append(fill(disk)))
  with pytest.raises(train.StageFailed) as error:
    pipeline.run(_pipeline_config(), workdir)
  message = str(error.value)
  assert message.startswith("[teacher] finished, but the disk is full: ") and "summary.json" in message, message
  assert open(os.path.join(workdir, "summary.json")).read() == summary and not _half_written(disk)
  os.remove(filler[0])
  monkeypatch.setattr(pipeline, "stage_runner", lambda name: lambda ctx: None)
  pipeline.run(_pipeline_config(), workdir)
  assert set(json.loads(open(os.path.join(workdir, "summary.json")).read())["wall_clock_seconds"]) == {"teacher"}


PROCESS = r"""
import sys
sys.path.insert(0, {tests!r})
from absl import logging
logging.set_verbosity(logging.WARNING)  # as distill.main sets it
from test_full_disk import fill
from test_resilience import _stage
from distill import train
train.quiet_closed_event_loops()  # as distill.main does at its start
try:
  train.run_stage(_stage(on_batch=lambda s: s == 3 and fill({disk!r}, 16 << 10)), {disk!r} + "/toy")
except train.TrainingError as e:  # what distill.main does with it
  print(f"error: {{e}}", file=sys.stderr)
  sys.exit(1)
"""


def test_a_process_whose_checkpoint_fills_the_disk_prints_only_the_one_line(disk):
  """What the user sees: no traceback from the metric writer, no Orbax log, no 'Event loop is closed' at exit."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", PROCESS.format(tests=os.path.join(ROOT, "tests"), disk=str(disk))],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("error: [toy] could not save the checkpoint of step 4/8") and "the disk is full" in lines[0]


def test_a_workdir_on_a_read_only_filesystem_is_bad_input(tmp_path):
  """--workdir under a read-only mount: one line naming the workdir and why, exit 2, nothing written."""
  path = tmp_path / "ro"
  path.mkdir()
  if os.geteuid() != 0:
    pytest.skip("mounting a read-only tmpfs needs root")
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True,
                        text=True)
  if proc.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
  try:
    env = dict(os.environ, DISTILL_JAX_CACHE="", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "distill.main", "--config=configs/digits.py",
                          f"--workdir={path}/wd"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [l for l in run.stderr.splitlines() if l.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stderr[-2000:]
    assert lines[0].startswith(f"error: --workdir={path}/wd: cannot be written") and "Read-only file system" in lines[0]
    assert os.listdir(path) == []
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


# --- the evaluate stage of a real (tiny) run --------------------------------------------------------------------

# distill.main in a process whose disk fills at a chosen write of the evaluate stage: after its `rows`-th row is
# cached (leaving `leave` bytes: room for a row's scores, not for its grid), or as results.json is written.
EVALUATE = r"""
import sys
sys.path.insert(0, {tests!r})
from test_full_disk import fill
from distill import evaluate, main, writers
cached, real_json, real_outputs = [], writers.atomic_write_json, evaluate.write_outputs

def atomic_write_json(path, *args, **kwargs):
  real_json(path, *args, **kwargs)
  if "/eval_cache/" in str(path):
    cached.append(path)
    if len(cached) == {rows}:
      fill({disk!r}, {leave})

def write_outputs(*args, **kwargs):
  if {rows} == 0:
    fill({disk!r})
  return real_outputs(*args, **kwargs)

writers.atomic_write_json, evaluate.write_outputs = atomic_write_json, write_outputs
sys.argv = ["distill.main", *{argv!r}]
main.run()
"""


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
  """A tiny digits run whose teacher is trained (on the normal disk), and the results.json and eval_grids/ its
  evaluate stage writes there, unconstrained (scoring 4 rows: DDIM and DDPM at w = 0 and 1)."""
  from test_bad_input_stages import train_tiny
  root = tmp_path_factory.mktemp("tiny_teacher")
  train_tiny(root / "run", ("teacher",))
  shutil.copytree(root / "run", root / "free")
  proc = subprocess.run([sys.executable, "-m", "distill.main", *_evaluate_args(root / "free")], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root / "run", json.loads((root / "free" / "results.json").read_text()), _hashes(root / "free" / "eval_grids")


def _env():
  return dict(os.environ, DISTILL_JAX_CACHE="", JAX_PLATFORMS="cpu",
              PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))


def _evaluate_args(workdir, w_values="(0.0,1.0)"):
  from test_bad_input_stages import tiny_args
  return tiny_args(workdir, ("evaluate",), f"--config.eval.w_values={w_values}", "--allow_config_change")


def _evaluate_filling(disk, workdir, rows, leave=0, w_values="(0.0,1.0)"):
  script = EVALUATE.format(tests=os.path.join(ROOT, "tests"), disk=str(disk), rows=rows, leave=leave,
                           argv=_evaluate_args(workdir, w_values))
  return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=600)


def _same_rows(got, want):
  assert [(r["method"], r["w"], r["steps"]) for r in got] == [(r["method"], r["w"], r["steps"]) for r in want]
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    for key in a:
      if isinstance(a[key], float):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["method"], key)
      else:
        assert a[key] == b[key], (a["method"], key)


@pytest.mark.slow  # ~60 s on 2 cores: a teacher trained and evaluated through distill.main, then evaluated 3 times
def test_disk_full_while_the_evaluate_stage_writes_its_rows_and_results(disk, tiny_teacher):
  """The evaluate stage of a real run on a full disk: after 2 of its 4 rows are cached the disk fills (one page
  left: room for a row's scores, not its grid). One line naming the grid that could not be written, exit 1, no
  results.json and no half-written file; once space is freed the rerun samples only the other 2 rows (the cached
  ones are read, unchanged) and its results.json and grids are the unconstrained run's. Then results.json itself
  meets a full disk: the previous one is kept whole."""
  run, want, want_grids = tiny_teacher
  workdir = disk / "run"
  shutil.copytree(run, workdir)
  proc = _evaluate_filling(disk, workdir, rows=2, leave=4 << 10)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("error: [evaluate] the disk is full: ") and "/eval_grids/" in lines[0], lines[0]
  assert "run the same command again" in lines[0], lines[0]
  assert not (workdir / "results.json").exists() and not _half_written(disk)
  cached = _hashes(workdir / "eval_cache")
  assert len(cached) == 2, sorted(cached)
  stamps = {f: os.stat(workdir / "eval_cache" / f).st_mtime_ns for f in cached}

  for filler in disk.glob("filler-*"):
    filler.unlink()
  rerun = subprocess.run([sys.executable, "-m", "distill.main", *_evaluate_args(workdir)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "[evaluate] 2 of 4 row scorings are cached" in rerun.stdout, rerun.stdout[-2000:]
  assert {f: os.stat(workdir / "eval_cache" / f).st_mtime_ns for f in cached} == stamps
  assert {f: h for f, h in _hashes(workdir / "eval_cache").items() if f in cached} == cached
  results = json.loads((workdir / "results.json").read_text())
  _same_rows(results["rows"], want["rows"])
  assert _hashes(workdir / "eval_grids") == want_grids

  # results.json on a full disk (every row cached, other w values: a new results.json to write).
  before = (workdir / "results.json").read_bytes()
  proc = _evaluate_filling(disk, workdir, rows=0, w_values="(0.0,)")
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("error: [evaluate] the disk is full: ") and "results.json" in lines[0], lines[0]
  assert (workdir / "results.json").read_bytes() == before and not _half_written(disk)
