"""Preemption and faults (issue 5): what a preempted, killed or full machine does to a run.

- SIGTERM: the stage finishes the step in flight, checkpoints it, and stops (`train.Stopped`; `distill.main`
  exits 0 with one line); the rerun ends bit-identical to an uninterrupted run.
- A full disk while a checkpoint or `final/` is written (Orbax's commit raising ENOSPC part-way): the previous
  checkpoint is intact and restorable, the error names stage and step, and the rerun resumes.
- A partial or unreadable latest checkpoint: the previous one is restored, with a message.
- Slow: `distill.main` on a multi-round digits run, killed (SIGKILL) at seeded random points, once inside a
  checkpoint save, once out of disk, once SIGTERM'd, restarted each time: every stage's final parameters are
  bit-identical to an uninterrupted run. Two `distill.main` processes over jax.distributed on localhost agree
  on the step a SIGTERM to one of them stops both at.
"""
import errno
import glob
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.path import atomicity

from distill import main as main_lib
from distill import testing, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- a toy stage (seconds) ---------------------------------------------------------------------------------


def _stage(num_steps=8, on_batch=None, ckpt_every=2):
  """Adam + EMA on a 2x3 regression; batches and the step's RNG depend only on the step. on_batch(step) runs
  when a batch is made (to signal the process from inside the loop)."""
  target = jnp.arange(6.0).reshape(2, 3)

  def loss_fn(params, frozen, batch, rng):
    noise = 0.01 * jax.random.normal(rng, target.shape)
    return jnp.mean((params["w"] * batch["x"][0] - target - noise) ** 2), {}

  def batch_fn(step):
    if on_batch is not None:
      on_batch(step)
    return {"x": np.random.default_rng(step).uniform(0.5, 1.5, (4,)).astype(np.float32)}

  return train.Stage(name="toy", loss_fn=loss_fn, init_params={"w": jnp.ones((2, 3))}, optimizer=optax.adam(0.1),
                     num_steps=num_steps, batch_fn=batch_fn, seed=3, ema_decay=0.9, log_every=2,
                     ckpt_every=ckpt_every)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted toy run's final parameters."""
  params, _ = train.run_stage(_stage(), str(tmp_path_factory.mktemp("ref") / "toy"))
  return np.asarray(params["w"])


@pytest.fixture
def stop_handlers():
  """install_stop_handlers for one test; the previous handlers and a clear request afterwards."""
  previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  train.clear_stop_request()
  assert train.install_stop_handlers() == [signal.SIGTERM, signal.SIGINT]
  yield
  for s, handler in previous.items():
    signal.signal(s, handler)
  train.clear_stop_request()


def _steps(stage_dir):
  return sorted(int(d) for d in os.listdir(os.path.join(stage_dir, "checkpoints")) if d.isdigit())


def _tree_hash(path) -> dict:
  out = {}
  for dirpath, _, files in os.walk(path):
    for f in files:
      with open(os.path.join(dirpath, f), "rb") as fh:
        out[os.path.relpath(os.path.join(dirpath, f), path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


# --- SIGTERM --------------------------------------------------------------------------------------------


def test_sigterm_finishes_the_step_in_flight_checkpoints_it_and_resumes_bit_identically(tmp_path, stop_handlers,
                                                                                      reference):
  stage_dir = str(tmp_path / "toy")

  def sigterm_at_5(step):
    if step == 5:  # while batch 5 is made: step 5 still runs, so the stop comes after 6 updates
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(train.Stopped) as stopped:
    train.run_stage(_stage(on_batch=sigterm_at_5), stage_dir)
  e = stopped.value
  assert (e.stage, e.step, e.num_steps) == ("toy", 6, 8), e.message
  assert "SIGTERM" in e.message and "step 6/8" in e.message and e.checkpoint == os.path.join(
      stage_dir, "checkpoints", "6")
  assert _steps(stage_dir) == [4, 6]  # 6 is off the ckpt_every grid: saved because of the stop
  assert not os.path.exists(os.path.join(stage_dir, "final"))
  train.clear_stop_request()
  resumed, _ = train.run_stage(_stage(), stage_dir)
  np.testing.assert_array_equal(np.asarray(resumed["w"]), reference)


def test_sigterm_in_the_last_step_writes_final_then_stops(tmp_path, stop_handlers, reference):
  stage_dir = str(tmp_path / "toy")
  with pytest.raises(train.Stopped, match="after finishing the stage") as stopped:
    train.run_stage(_stage(on_batch=lambda s: s == 7 and os.kill(os.getpid(), signal.SIGTERM)), stage_dir)
  assert stopped.value.step == 8
  params, _ = train.load_final_params(stage_dir)
  np.testing.assert_array_equal(params["w"], reference)


def test_a_stop_requested_between_stages_stops_the_next_before_it_trains(tmp_path, stop_handlers):
  os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(train.Stopped, match="at step 0/8; no checkpoint yet") as stopped:
    train.run_stage(_stage(on_batch=lambda s: pytest.fail("trained after the stop")), str(tmp_path / "toy"))
  assert stopped.value.step == 0 and stopped.value.checkpoint is None


def test_a_second_ctrl_c_interrupts_at_once(stop_handlers):
  os.kill(os.getpid(), signal.SIGINT)
  assert train.stop_requested()  # the first only asks
  with pytest.raises(KeyboardInterrupt):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1)  # the handler runs at the next bytecode; the sleep is never finished


# --- full disk, partial checkpoints ------------------------------------------------------------------------


@pytest.fixture
def full_disk(monkeypatch):
  """full_disk(n, where): Orbax's commit (the rename of a written temporary directory) raises ENOSPC at its
  n-th call whose directory name contains `where`; a checkpoint commits 3 directories (meta, state, step)."""
  original = atomicity.AtomicRenameTemporaryPath.finalize

  def arm(n, where=""):
    calls = []

    async def finalize(self, *args, **kwargs):
      if where in str(self.get()):
        calls.append(str(self.get()))
        if len(calls) == n:
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))
      return await original(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
    return calls

  yield arm
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", original)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_the_rerun_resumes(tmp_path, full_disk,
                                                                                    reference, capsys):
  stage_dir = str(tmp_path / "toy")
  calls = full_disk(2, "state.orbax")  # step 4's state: its meta is already written, nothing committed
  kept = {}

  def remember_step_2(step):
    if step == 3:
      kept.update(_tree_hash(os.path.join(stage_dir, "checkpoints", "2")))

  with pytest.raises(train.CheckpointWriteError) as error:
    train.run_stage(_stage(on_batch=remember_step_2), stage_dir)
  message = str(error.value)
  assert len(calls) == 2 and "/4.orbax-checkpoint-tmp/" in calls[-1]
  for needle in ("[toy]", "step 4/8", "No space left on device", "step 2 is intact", "run the same command"):
    assert needle in message, message
  assert "\n" not in message
  assert _steps(stage_dir) == [2] and kept and _tree_hash(os.path.join(stage_dir, "checkpoints", "2")) == kept
  full_disk(0)  # space freed
  resumed, _ = train.run_stage(_stage(), stage_dir)
  assert "[toy] resuming at step 2/8" in capsys.readouterr().out
  np.testing.assert_array_equal(np.asarray(resumed["w"]), reference)


def test_full_disk_while_writing_final_keeps_the_last_checkpoint(tmp_path, full_disk, reference, capsys):
  stage_dir = str(tmp_path / "toy")
  full_disk(1, "final.tmp")
  with pytest.raises(train.CheckpointWriteError, match=r"could not write .*/final after step 8 .*No space left "
                     r"on device.*checkpoint of step 6 is intact"):
    train.run_stage(_stage(), stage_dir)
  assert not os.path.exists(os.path.join(stage_dir, "final")) and _steps(stage_dir) == [4, 6]
  full_disk(0)
  resumed, _ = train.run_stage(_stage(), stage_dir)
  assert "[toy] resuming at step 6/8" in capsys.readouterr().out
  assert not os.path.exists(os.path.join(stage_dir, "final.tmp"))
  np.testing.assert_array_equal(np.asarray(resumed["w"]), reference)
  np.testing.assert_array_equal(train.load_final_params(stage_dir)[0]["w"], reference)


def test_orbax_error_logs_of_a_failed_save_give_way_to_the_one_line(caplog):
  """A real full disk (a 7 MB tmpfs) made Orbax's writer threads log ~110 lines of tracebacks before the save
  raised; the trainer reports the error itself, so those are dropped, and kept when a save succeeds."""
  from absl import logging as absl_logging
  with pytest.raises(OSError):
    with train._orbax_errors_held():
      absl_logging.error("writer thread: RESOURCE_EXHAUSTED (dropped)")
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  with train._orbax_errors_held():
    absl_logging.error("writer thread: something odd (kept)")
  assert "(dropped)" not in caplog.text and "(kept)" in caplog.text
  e = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/x/ocdbt.process_0/": '
                 + "x" * 300 + " No space left on device [os_error_code='28']")
  assert train._write_error(e).startswith("the disk is full (ValueError: RESOURCE_EXHAUSTED")


def _crash_at(crash_step):
  def on_batch(step):
    if step == crash_step:
      raise KeyboardInterrupt("simulated kill")
  return on_batch


def test_a_latest_checkpoint_missing_its_state_falls_back_to_the_previous(tmp_path, reference, capsys):
  """test_train truncates every file of the latest checkpoint; here its state is gone altogether (a copy
  that stopped part-way), and the same fallback applies."""
  stage_dir = str(tmp_path / "toy")
  with pytest.raises(KeyboardInterrupt):
    train.run_stage(_stage(on_batch=_crash_at(5)), stage_dir)
  import shutil
  shutil.rmtree(os.path.join(stage_dir, "checkpoints", "4", "state"))
  resumed, _ = train.run_stage(_stage(), stage_dir)
  out = capsys.readouterr().out
  assert "restored step 2 after unreadable later checkpoint(s): step 4" in out and "resuming at step 2/8" in out
  assert glob.glob(os.path.join(stage_dir, "checkpoints", "4.unreadable-*"))  # set aside, not deleted
  np.testing.assert_array_equal(np.asarray(resumed["w"]), reference)


def test_no_readable_checkpoint_is_an_error_naming_the_directory(tmp_path):
  stage_dir = str(tmp_path / "toy")
  with pytest.raises(KeyboardInterrupt):
    train.run_stage(_stage(on_batch=_crash_at(5)), stage_dir)
  for step in ("2", "4"):
    for root, _, files in os.walk(os.path.join(stage_dir, "checkpoints", step)):
      for f in files:
        open(os.path.join(root, f), "w").close()
  with pytest.raises(train.TrainingError, match=r"no readable checkpoint in .*checkpoints: step 4: .*; step 2: "):
    train.run_stage(_stage(), stage_dir)


# --- async saves (forced on: by default only accelerators save asynchronously) -----------------------------


@pytest.fixture
def async_saves(monkeypatch):
  """Every save of the test async, and a record of the steps whose save returned before it was written."""
  assert not train.uses_async_checkpoints(_stage())  # the CPU default
  returned_early = []
  original = train.save_checkpoint

  def spy(manager, state, meta, wait=True):
    original(manager, state, meta, wait=wait)
    if not wait:
      returned_early.append(int(state["step"]))

  monkeypatch.setattr(train, "save_checkpoint", spy)
  with train.checkpoint_mode(True):
    assert train.uses_async_checkpoints(_stage())
    yield returned_early


@pytest.fixture
def slow_commit(monkeypatch):
  """slow_commit(step): Orbax's commit of that step's checkpoint takes 0.5 s, so its save is still in flight
  when training goes on. Returns the events in order: ('committed', path) and ('final', None) when the trainer
  starts writing final/."""
  import asyncio
  original = atomicity.AtomicRenameTemporaryPath.finalize
  original_final = train._save_final
  events = []

  def arm(step):
    async def finalize(self, *args, **kwargs):
      if f"/{step}.orbax-checkpoint-tmp" in str(self.get()):
        await asyncio.sleep(0.5)
      result = await original(self, *args, **kwargs)
      events.append(("committed", str(self.get())))
      return result

    def save_final(*args, **kwargs):
      events.append(("final", None))
      return original_final(*args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
    monkeypatch.setattr(train, "_save_final", save_final)
    return events

  yield arm


def test_async_saves_resume_bit_identically(tmp_path, async_saves, reference, slow_commit):
  stage_dir = str(tmp_path / "toy")
  slow_commit(4)
  with pytest.raises(KeyboardInterrupt):
    train.run_stage(_stage(on_batch=_crash_at(5)), stage_dir)
  assert async_saves == [2, 4]  # written in the background
  assert _steps(stage_dir) == [2, 4]  # step 4's save, in flight at the crash, was completed on the way out
  resumed, _ = train.run_stage(_stage(), stage_dir)
  np.testing.assert_array_equal(np.asarray(resumed["w"]), reference)


def test_async_final_waits_for_the_save_in_flight(tmp_path, async_saves, reference, slow_commit):
  stage_dir = str(tmp_path / "toy")
  events = slow_commit(6)
  params, _ = train.run_stage(_stage(), stage_dir)
  np.testing.assert_array_equal(np.asarray(params["w"]), reference)
  assert async_saves == [2, 4, 6] and _steps(stage_dir) == [4, 6]
  final_at = events.index(("final", None))
  assert any("/6.orbax-checkpoint-tmp" in path for _, path in events[:final_at] if path), events  # 6, then final
  assert not glob.glob(os.path.join(stage_dir, "checkpoints", "*tmp*"))
  np.testing.assert_array_equal(train.load_final_params(stage_dir)[0]["w"], reference)


def test_async_sigterm_save_is_complete_before_stopped(tmp_path, stop_handlers, async_saves, reference):
  stage_dir = str(tmp_path / "toy")
  with pytest.raises(train.Stopped) as stopped:
    train.run_stage(_stage(on_batch=lambda s: s == 5 and os.kill(os.getpid(), signal.SIGTERM)), stage_dir)
  assert stopped.value.step == 6 and "checkpoint" in stopped.value.message
  assert async_saves == [2, 4]  # the stop's own save (6) was waited for
  assert _steps(stage_dir) == [4, 6] and not glob.glob(os.path.join(stage_dir, "checkpoints", "*tmp*"))
  train.clear_stop_request()
  resumed, _ = train.run_stage(_stage(), stage_dir)
  np.testing.assert_array_equal(np.asarray(resumed["w"]), reference)


def test_async_full_disk_names_the_failed_step_and_keeps_the_last_complete_one(tmp_path, async_saves, full_disk,
                                                                               reference, capsys):
  stage_dir = str(tmp_path / "toy")
  full_disk(2, "state.orbax")  # step 4's state
  with pytest.raises(train.CheckpointWriteError) as error:
    train.run_stage(_stage(), stage_dir)
  message = str(error.value)
  for needle in ("[toy]", "step 4/8", "No space left on device", "step 2 is intact", "run the same command"):
    assert needle in message, message
  assert "\n" not in message
  assert _steps(stage_dir) == [2] and not os.path.exists(os.path.join(stage_dir, "final"))
  full_disk(0)
  resumed, _ = train.run_stage(_stage(), stage_dir)
  assert "[toy] resuming at step 2/8" in capsys.readouterr().out
  np.testing.assert_array_equal(np.asarray(resumed["w"]), reference)


def test_async_full_disk_in_the_last_save_stops_before_final(tmp_path, async_saves, full_disk, reference):
  stage_dir = str(tmp_path / "toy")
  full_disk(3, "state.orbax")  # step 6's state: found out before final/ is written
  with pytest.raises(train.CheckpointWriteError, match=r"checkpoint of step 6/8 .*checkpoint of step 4 is intact"):
    train.run_stage(_stage(), stage_dir)
  assert _steps(stage_dir) == [2, 4] and not os.path.exists(os.path.join(stage_dir, "final"))
  full_disk(0)
  resumed, _ = train.run_stage(_stage(), stage_dir)
  np.testing.assert_array_equal(np.asarray(resumed["w"]), reference)


def test_async_default_and_overrides():
  stage = _stage()
  assert train.default_async_checkpoints() == (jax.default_backend() != "cpu")
  with train.checkpoint_mode(None):
    assert train.uses_async_checkpoints(stage) == train.default_async_checkpoints()
  with train.checkpoint_mode(True):
    assert train.uses_async_checkpoints(stage)
    stage.async_checkpoints = False  # a stage's own choice wins
    assert not train.uses_async_checkpoints(stage)


# --- a real SIGKILL of a training process -------------------------------------------------------------------

# The toy stage in a process of its own, killed with SIGKILL (no cleanup runs, unlike the KeyboardInterrupt
# above): KILL_AT_COMMIT=N at Orbax's N-th commit (a checkpoint commits meta, state, then the step), KILL_WRITING=NAME
# once writers.atomic_write has filled NAME's temporary file, before the rename. After the stage it writes
# samples.png atomically, as the pipeline does.
KILL_WORKER = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from orbax.checkpoint._src.path import atomicity
from distill import train, writers
import test_resilience

def die(what):
  print(f"[fault] SIGKILL {what}", flush=True)
  os.kill(os.getpid(), signal.SIGKILL)

kill_at, calls = int(os.environ.get("KILL_AT_COMMIT", "0")), [0]
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def killing_finalize(self, *args, **kwargs):
  calls[0] += 1
  if calls[0] == kill_at:
    die(f"while committing {self.get()}")
  return await finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize

atomic_write = writers.atomic_write
def killing_atomic_write(path, write_fn, mode="wb"):
  if os.path.basename(path) != os.environ.get("KILL_WRITING"):
    return atomic_write(path, write_fn, mode)
  def fill_then_die(f):
    write_fn(f)
    f.flush()
    die(f"while writing {path}")
  return atomic_write(path, fill_then_die, mode)
writers.atomic_write = killing_atomic_write

train.run_stage(test_resilience._stage(), sys.argv[1])
writers.atomic_write_bytes(os.path.join(sys.argv[1], "samples.png"), b"a grid")
print("[worker] done", flush=True)
"""


def _killed_run(stage_dir, **env):
  return subprocess.run([sys.executable, "-c", KILL_WORKER, stage_dir, os.path.dirname(os.path.abspath(__file__))],
                        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", **env), capture_output=True, text=True,
                        timeout=300)


def _leftovers(stage_dir) -> list[str]:
  """Every kind of leftover a killed run can leave: Orbax temporary directories, final.tmp/, atomic-write
  temporary files."""
  found = []
  for dirpath, dirnames, filenames in os.walk(stage_dir):
    for name in dirnames + filenames:
      if ".orbax-checkpoint-tmp" in name or name == "final.tmp" or re.fullmatch(r".+\.tmp-\d+-[0-9a-f]{8}", name):
        found.append(os.path.relpath(os.path.join(dirpath, name), stage_dir))
  return sorted(found)


def test_sigkilled_mid_save_mid_final_and_mid_write_leftovers_are_swept_and_the_rerun_resumes(tmp_path, reference):
  stage_dir = str(tmp_path / "toy")
  # 1. Killed while committing step 4's checkpoint (its meta item): 4.orbax-checkpoint-tmp stays behind.
  run = _killed_run(stage_dir, KILL_AT_COMMIT="4")
  assert run.returncode == -signal.SIGKILL and "[fault] SIGKILL while committing" in run.stdout, run.stdout + run.stderr
  assert _leftovers(stage_dir)[0] == "checkpoints/4.orbax-checkpoint-tmp" and _steps(stage_dir) == [2]
  # 2. The rerun sweeps that first, resumes at step 2, and is killed while final/'s meta.json is written.
  run = _killed_run(stage_dir, KILL_WRITING="meta.json")
  assert run.returncode == -signal.SIGKILL and "[fault] SIGKILL while writing" in run.stdout, run.stdout + run.stderr
  assert "[toy] removed what an interrupted run left: checkpoints/4.orbax-checkpoint-tmp" in run.stdout, run.stdout
  assert "[toy] resuming at step 2/8" in run.stdout
  left = _leftovers(stage_dir)
  assert "final.tmp" in left and any(re.fullmatch(r"final\.tmp/meta\.json\.tmp-\d+-[0-9a-f]{8}", p) for p in left), left
  assert not os.path.exists(os.path.join(stage_dir, "final")) and _steps(stage_dir) == [4, 6]
  # 3. Swept again; the stage finishes from step 6, and the process is killed writing samples.png after it.
  run = _killed_run(stage_dir, KILL_WRITING="samples.png")
  assert run.returncode == -signal.SIGKILL and "[toy] removed what an interrupted run left: final.tmp" in run.stdout, (
      run.stdout + run.stderr)
  assert "[toy] resuming at step 6/8" in run.stdout and train.has_final(stage_dir)
  [left] = _leftovers(stage_dir)
  assert re.fullmatch(r"samples\.png\.tmp-\d+-[0-9a-f]{8}", left), left
  # 4. A finished stage is swept too; nothing of any kind is left, and the result is the uninterrupted run's.
  run = _killed_run(stage_dir)
  assert run.returncode == 0 and "[worker] done" in run.stdout, run.stdout + run.stderr
  assert f"[toy] removed what an interrupted run left: {left}" in run.stdout and "[toy] already finished" in run.stdout
  assert _leftovers(stage_dir) == [] and open(os.path.join(stage_dir, "samples.png"), "rb").read() == b"a grid"
  testing.assert_trees_equal(train.load_final_params(stage_dir)[0], {"w": reference})


def test_sweep_leftovers_removes_only_leftovers(tmp_path):
  stage_dir = tmp_path / "stage"
  keep = ["checkpoints/2/state/d/x", "checkpoints/4.unreadable-1700000000/x", "tb/metrics.jsonl", "samples.png",
          "final/meta.json", "notes.tmp-1", "x.tmp-12-nothex00"]
  drop = ["checkpoints/6.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/x", "checkpoints/8.orbax-checkpoint-tmp-17/x",
          "final.tmp/params/x", "tb/hparams.json.tmp-4242-0123abcd", "eval.json.tmp-1-deadbeef"]
  for path in keep + drop:
    (stage_dir / path).parent.mkdir(parents=True, exist_ok=True)
    (stage_dir / path).write_text("x")
  removed = train.sweep_leftovers(str(stage_dir))
  assert removed == sorted(["checkpoints/6.orbax-checkpoint-tmp", "checkpoints/8.orbax-checkpoint-tmp-17", "final.tmp",
                            "tb/hparams.json.tmp-4242-0123abcd", "eval.json.tmp-1-deadbeef"])
  assert all((stage_dir / path).exists() for path in keep) and _leftovers(str(stage_dir)) == []
  assert train.sweep_leftovers(str(stage_dir)) == [] and train.sweep_leftovers(str(tmp_path / "absent")) == []


# --- distributed flags ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS=10.0.0.1:1234"),
    ({"SLURM_NTASKS": "16"}, "SLURM_NTASKS=16"),
    ({"SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "1"}, None),  # the batch script, not an srun step
    ({"SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "8"}, "SLURM_STEP_NUM_TASKS=8"),
    ({"SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "OMPI_COMM_WORLD_SIZE=4"),
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"}, "TPU_WORKER_HOSTNAMES lists 4 hosts"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
])
def test_auto_detects_a_multi_process_environment(monkeypatch, env, expected):
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE",
              "MEGASCALE_NUM_SLICES", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert main_lib._multi_process_environment() == expected


# --- distill.main end to end (slow) ---------------------------------------------------------------------------

# distill.main, with faults injected through Orbax's commit (the rename of a fully written temporary
# directory; a checkpoint commits its meta, its state, then the step): FAULT_AT_COMMIT=N SIGKILLs the
# process at its N-th commit, FULL_DISK_AT_COMMIT=N raises ENOSPC there.
WRAPPER = r"""
import errno, os, signal, sys
from orbax.checkpoint._src.path import atomicity
kill_at = int(os.environ.get("FAULT_AT_COMMIT", "0"))
full_at = int(os.environ.get("FULL_DISK_AT_COMMIT", "0"))
original = atomicity.AtomicRenameTemporaryPath.finalize
calls = [0]
async def finalize(self, *args, **kwargs):
  calls[0] += 1
  if calls[0] == kill_at:
    print(f"[fault] SIGKILL while committing {self.get()}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
  if calls[0] == full_at:
    print(f"[fault] ENOSPC while committing {self.get()}", flush=True)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))
  return await original(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
from distill import main
main.run()
"""

# teacher (120 steps) -> stage one (40) -> halving rounds 4 -> 2 -> 1 (20 each), at batch 16 on a ch-16 U-Net.
KILL_RUN = ["--config=configs/digits.py:quick", "--config.pipeline=('teacher','stage_one','distill_deterministic')",
            "--config.model.ch=16", "--config.model.num_groups=8", "--config.eval.class_agreement=False",
            "--config.teacher.num_steps=120", "--config.teacher.batch_size=16", "--config.teacher.log_every=5",
            "--config.teacher.ckpt_every=30", "--config.sample.w_values=(0.0,1.0)", "--config.sample.per_cell=1",
            "--config.distill.batch_size=16", "--config.distill.stage_one_steps=40",
            "--config.distill.final_round_steps=20", "--config.distill.log_every=5", "--config.distill.ckpt_every=10",
            "--config.distill.grid_w=(0.0,1.0)"]
STAGES = ("teacher", "stage_one", "distill_deterministic/N0002", "distill_deterministic/N0001")


def _env(cache, devices=None, **extra):
  # XLA's lowest CPU backend optimisation compiles ~2x faster, and compiling dominates these short runs; every
  # run compared uses the same flags.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
  if devices:
    flags += f" --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, JAX_PLATFORMS="cpu", DISTILL_JAX_CACHE=str(cache), XLA_FLAGS=flags.strip(), **extra)


class Run:
  """One `distill.main` process (through WRAPPER). `wait(when, sig, delay)` reads its stdout line by line and
  sends `sig` `delay` seconds after the first line for which when(line) holds; then waits for the exit."""

  def __init__(self, args, env, timeout=600):
    self.err = tempfile.TemporaryFile("w+")
    self.proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=self.err, text=True)
    self.lines, self.sent = [], None
    self.watchdog = threading.Timer(timeout, self.proc.kill)
    self.watchdog.start()

  def wait(self, when=None, sig=None, delay=0.0, on_line=None):
    for line in self.proc.stdout:
      self.lines.append(line.rstrip("\n"))
      if on_line is not None:
        on_line(line)
      if when is not None and self.sent is None and when(line):
        time.sleep(delay)
        self.proc.send_signal(sig)
        self.sent = (line.strip(), time.time())
    self.proc.wait()
    self.watchdog.cancel()
    self.exited = time.time()
    self.err.seek(0)
    self.stderr = self.err.read()
    return self

  @property
  def out(self):
    return "\n".join(self.lines)

  def report(self):
    return f"exit {self.proc.returncode}\n--- stdout (tail)\n{self.out[-3000:]}\n--- stderr (tail)\n{self.stderr[-3000:]}"


def _final_params(workdir):
  return {name: train.load_final_params(os.path.join(workdir, name))[0] for name in STAGES}


def _assert_bit_identical(got, ref):
  testing.assert_trees_equal(got, ref)  # {stage: params}: every stage, every leaf, by name


def _at_step(stage, at_least):
  """A `Run.wait` trigger: the first progress line of `stage` at or past step `at_least` (a run may resume past
  the step chosen)."""
  def when(line):
    m = re.match(rf"\[{re.escape(stage)}\] step (\d+)/", line)
    return m is not None and int(m.group(1)) >= at_least
  return when


def _resumed_at(run, stage) -> int:
  m = re.search(rf"\[{re.escape(stage)}\] resuming at step (\d+)/", run.out)
  assert m, f"{stage} did not resume\n{run.report()}"
  return int(m.group(1))


@pytest.mark.slow
def test_killed_at_random_points_a_multi_round_run_ends_bit_identical(tmp_path):
  cache = tmp_path / "jax_cache"  # shared, so restarts reuse compilations as a rerun on one machine does
  start = time.time()
  ref = Run([*KILL_RUN, f"--workdir={tmp_path / 'ref'}"], _env(cache)).wait()
  assert ref.proc.returncode == 0, ref.report()
  times = {"uninterrupted": time.time() - start}
  rng = np.random.default_rng(0)
  wd = tmp_path / "faults"
  args = [*KILL_RUN, f"--workdir={wd}"]

  # 1. SIGKILL in the middle of the teacher, at a seeded step and delay (mid-step, mid-log or mid-save).
  step = int(rng.integers(7, 21)) * 5
  run = Run(args, _env(cache)).wait(_at_step("teacher", step), signal.SIGKILL, float(rng.uniform(0, 0.3)))
  assert run.proc.returncode == -signal.SIGKILL, run.report()

  # 2. SIGKILL inside a checkpoint save: at a seeded commit, so the temporary directory is fully written
  # and not renamed (an item of it may be).
  n = int(rng.integers(1, 7))
  run = Run(args, _env(cache, FAULT_AT_COMMIT=str(n))).wait()
  assert run.proc.returncode == -signal.SIGKILL and "[fault] SIGKILL while committing" in run.out, run.report()
  assert _resumed_at(run, "teacher") > 0

  # 3. The disk is full at a seeded commit: exit 1, one line naming stage and step; the checkpoint it says is
  # intact is where the next run resumes.
  n = int(rng.integers(1, 5))
  run = Run(args, _env(cache, FULL_DISK_AT_COMMIT=str(n))).wait()
  errors = [l for l in run.stderr.splitlines() if l.startswith("error: ")]
  assert run.proc.returncode == 1 and len(errors) == 1, run.report()
  assert run.stderr.strip().splitlines()[-1] == errors[0], run.report()
  m = re.search(r"error: \[(\S+)\] could not (?:save the checkpoint of step \d+/\d+|write \S+/final after step \d+) "
                r".*No space left on device.*; (?:the checkpoint of step (\d+) is intact|there is no earlier checkpoint)",
                errors[0])
  assert m, errors[0]
  full_stage, intact = m.group(1), int(m.group(2) or 0)

  # 4. SIGTERM in stage one: the step in flight finishes and is checkpointed, exit 0, one line saying where.
  step = int(rng.integers(3, 8)) * 5
  run = Run(args, _env(cache)).wait(_at_step("stage_one", step), signal.SIGTERM)
  if intact:
    assert _resumed_at(run, full_stage) == intact
  else:  # its first checkpoint failed: the stage starts over
    assert f"[{full_stage}] step 5/" in run.out and f"[{full_stage}] resuming" not in run.out, run.report()
  assert run.proc.returncode == 0, run.report()
  times["sigterm latency (s)"] = run.exited - run.sent[1]
  stops = [l for l in run.lines if l.startswith("stopped: ")]
  assert len(stops) == 1 and "To resume, run the same command again: python -m distill.main" in stops[0], run.report()
  stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+)/40", stops[0]).group(1))
  assert int(re.search(r"step (\d+)/", run.sent[0]).group(1)) <= stopped_at < 40 and os.path.isdir(wd / "stage_one" / "checkpoints" / str(stopped_at)), stops[0]

  # 5. SIGKILL in the first halving round; 6. SIGKILL at a seeded moment after the last round starts (in a
  # step, a save, the final write or the sample grid).
  step = int(rng.integers(1, 4)) * 5
  run = Run(args, _env(cache)).wait(_at_step("distill_deterministic/N0002", step), signal.SIGKILL,
                                    float(rng.uniform(0, 0.3)))
  assert _resumed_at(run, "stage_one") == stopped_at
  assert run.proc.returncode == -signal.SIGKILL, run.report()
  run = Run(args, _env(cache)).wait(_at_step("distill_deterministic/N0001", 5), signal.SIGKILL,
                                    float(rng.uniform(0, 1.5)))
  assert run.proc.returncode in (0, -signal.SIGKILL), run.report()
  if run.proc.returncode == 0:
    times["note"] = "the last kill came after the run had finished"

  # 7. To the end.
  run = Run(args, _env(cache)).wait()
  assert run.proc.returncode == 0 and "done: wall-clock per stage" in run.out, run.report()
  times["total"] = time.time() - start
  print(f"\nkill test: {times}")
  _assert_bit_identical(_final_params(wd), _final_params(tmp_path / "ref"))
  assert not glob.glob(str(wd / "**" / "final.tmp"), recursive=True)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# --- two processes over jax.distributed on localhost -----------------------------------------------------------


def _two_process_stage(pid, num_steps=250):
  """The toy regression as one run of two processes of one device each: each process feeds 2 of the 4 rows,
  and a batch takes 10 ms to make, so that a signal lands mid-stage."""
  target = jnp.arange(6.0).reshape(2, 3)

  def loss_fn(params, frozen, batch, rng):
    noise = 0.01 * jax.random.normal(rng, target.shape)
    return jnp.mean((params["w"] * batch["x"][:, None, None] - target - noise) ** 2), {}

  def batch_fn(step):
    time.sleep(0.01)
    return {"x": np.random.default_rng(step).uniform(0.5, 1.5, (4,)).astype(np.float32)[2 * pid:2 * pid + 2]}

  return train.Stage(name="toy2", loss_fn=loss_fn, init_params={"w": jnp.ones((2, 3))}, optimizer=optax.adam(0.1),
                     num_steps=num_steps, batch_fn=batch_fn, seed=3, ema_decay=0.9, log_every=10, ckpt_every=100)


def _two_process_worker(stage_dir, pid, port):
  """Runs in each of the two processes (`python tests/test_resilience.py STAGE_DIR PID PORT`): trains, and prints
  one JSON line: where it stopped, or a digest of the final parameters."""
  import json
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  assert train.install_stop_handlers() == []  # JAX's preemption service has SIGTERM
  try:
    params, _ = train.run_stage(_two_process_stage(pid), stage_dir, is_main_process=pid == 0)
  except train.Stopped as e:
    print(json.dumps({"stopped": e.step, "message": e.message}), flush=True)
    return
  digest = hashlib.sha256(np.ascontiguousarray(params["w"]).tobytes()).hexdigest()
  print(json.dumps({"final": digest, "numpy": isinstance(params["w"], np.ndarray)}), flush=True)


def _run_two_workers(stage_dir, sigterm_process_1_at=None):
  import json
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(stage_dir), str(i), str(port)], cwd=ROOT,
                            env=_env(""), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  sent = None
  try:
    out0 = []
    for line in procs[0].stdout:  # process 0 prints the progress
      out0.append(line)
      if sigterm_process_1_at and sent is None and f"[toy2] step {sigterm_process_1_at}/" in line:
        procs[1].send_signal(signal.SIGTERM)
        sent = time.time()
    results = [json.loads(out0[-1]), json.loads(procs[1].communicate(timeout=120)[0].strip().splitlines()[-1])]
    for p in procs:
      p.wait(timeout=60)
      assert p.returncode == 0, p.stderr.read()[-3000:]
  finally:
    for p in procs:  # one that failed leaves the other waiting for it
      p.kill()
  return results, (time.time() - sent if sent else None)


def test_a_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resume_is_bit_identical(tmp_path):
  ref, _ = _run_two_workers(tmp_path / "ref")
  assert ref[0] == ref[1] and ref[0]["numpy"], ref  # both hold the same parameters, as numpy
  stopped, latency = _run_two_workers(tmp_path / "b", sigterm_process_1_at=20)
  assert stopped[0]["stopped"] == stopped[1]["stopped"], stopped  # agreed, though only process 1 was signalled
  step = stopped[0]["stopped"]
  assert 20 < step < 250 and "stopped by preemption notice (SIGTERM)" in stopped[0]["message"], stopped
  saved = _steps(str(tmp_path / "b"))
  assert saved[-1] == step and all(s % 100 == 0 for s in saved[:-1]), saved  # the stop step, saved by the stop
  resumed, _ = _run_two_workers(tmp_path / "b")
  assert resumed == ref, (resumed, ref)
  print(f"\ntwo processes: SIGTERM to process 1 at step 20; both stopped at step {step}, exited {latency:.1f}s after "
        "the signal")


# teacher (20 steps) of the digits run above: two processes of one device each, and one process of two devices.
TWO_PROCESS_RUN = ["--config=configs/digits.py:quick", "--config.pipeline=('teacher',)", "--config.model.ch=16",
                   "--config.model.num_groups=8", "--config.eval.class_agreement=False",
                   "--config.teacher.num_steps=20", "--config.teacher.batch_size=16", "--config.teacher.log_every=10",
                   "--config.teacher.ckpt_every=10", "--config.sample.w_values=(0.0,)", "--config.sample.per_cell=1"]


@pytest.mark.slow
def test_two_main_processes_write_final_once_equal_to_one_process_of_two_devices(tmp_path):
  start = time.time()
  port = _free_port()
  runs = [Run([*TWO_PROCESS_RUN, f"--workdir={tmp_path / 'two'}", f"--coordinator_address=127.0.0.1:{port}",
               "--num_processes=2", f"--process_id={i}"], _env(""), timeout=900) for i in range(2)]
  waiter = threading.Thread(target=runs[1].wait)
  waiter.start()
  try:
    runs[0].wait()
    waiter.join(timeout=120)
  finally:
    for r in runs:
      r.proc.kill()
  for r in runs:
    assert r.proc.returncode == 0, r.report()
  two_processes = time.time() - start
  # Process 0 prints and writes; process 1 prints nothing of its own (Gloo's connection note aside).
  assert "distributed: 2 processes, 2 devices (1 here; from flags)" in runs[0].out, runs[0].out
  assert "[teacher] step 20/20" in runs[0].out and "done: wall-clock per stage" in runs[0].out
  assert not [l for l in runs[1].lines if l.strip() and not l.startswith("[Gloo]")], runs[1].out
  assert not glob.glob(str(tmp_path / "two" / "**" / "*.tmp*"), recursive=True)
  assert (tmp_path / "two" / "teacher" / "samples.png").exists()  # process 0 sampled alone, with host params
  one = Run([*TWO_PROCESS_RUN, f"--workdir={tmp_path / 'one'}"], _env("", devices=2)).wait()
  assert one.proc.returncode == 0, one.report()
  got, _ = train.load_final_params(str(tmp_path / "two" / "teacher"))
  want, _ = train.load_final_params(str(tmp_path / "one" / "teacher"))
  testing.assert_trees_equal(got, want)
  print(f"\ntwo main processes: {two_processes:.0f}s; one process of two devices: {time.time() - start - two_processes:.0f}s")


if __name__ == "__main__":
  _two_process_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))


# --- restore: transient read errors are not corruption; finished stages keep only final/ -------------------


@pytest.fixture
def flaky_reads(monkeypatch):
  """flaky_reads(n): the checkpoint manager's restore raises OSError(EIO) on its first n calls (n < 0: always);
  returns the steps asked for. No backoff wait."""
  original = train._CheckpointManager.restore
  monkeypatch.setattr(train, "RESTORE_BACKOFF_S", 0.0)

  def arm(n):
    calls = []

    def restore(self, step, *args, **kwargs):
      calls.append(step)
      if n < 0 or len(calls) <= n:
        raise OSError(errno.EIO, os.strerror(errno.EIO), os.path.join(str(self.directory), str(step), "state"))
      return original(self, step, *args, **kwargs)

    monkeypatch.setattr(train._CheckpointManager, "restore", restore)
    return calls

  return arm


def test_a_transient_read_error_is_retried_and_the_newest_checkpoint_restored(tmp_path, flaky_reads, reference,
                                                                            capsys):
  stage_dir = str(tmp_path / "toy")
  with pytest.raises(KeyboardInterrupt):
    train.run_stage(_stage(on_batch=_crash_at(5)), stage_dir)
  calls = flaky_reads(1)
  resumed, _ = train.run_stage(_stage(), stage_dir)
  out = capsys.readouterr().out
  assert calls == [4, 4], calls  # the same (newest) step read again, not the previous one
  assert "reading step 4: OSError: [Errno 5]" in out and "trying again (2/4)" in out, out
  assert "resuming at step 4/8" in out and "unreadable" not in out, out
  assert not glob.glob(os.path.join(stage_dir, "checkpoints", "*.unreadable-*"))
  np.testing.assert_array_equal(np.asarray(resumed["w"]), reference)


def test_a_read_error_that_persists_fails_in_one_line_and_sets_nothing_aside(tmp_path, flaky_reads):
  stage_dir = str(tmp_path / "toy")
  with pytest.raises(KeyboardInterrupt):
    train.run_stage(_stage(on_batch=_crash_at(5)), stage_dir)
  newest = _tree_hash(os.path.join(stage_dir, "checkpoints", "4"))
  calls = flaky_reads(-1)
  with pytest.raises(train.TrainingError) as error:
    train.run_stage(_stage(), stage_dir)
  message = str(error.value)
  assert calls == [4] * train.RESTORE_TRIES, calls  # never fell back to step 2
  for needle in ("checkpoint of step 4", "Input/output error", f"({train.RESTORE_TRIES} tries)", "nothing was set aside",
                 "run the same command again"):
    assert needle in message, message
  assert "\n" not in message
  assert _steps(stage_dir) == [2, 4] and not glob.glob(os.path.join(stage_dir, "checkpoints", "*.unreadable-*"))
  assert _tree_hash(os.path.join(stage_dir, "checkpoints", "4")) == newest


def test_transient_errors_are_told_from_corruption():
  eio = OSError(errno.EIO, os.strerror(errno.EIO))
  wrapped = ValueError("restore failed")
  wrapped.__cause__ = eio
  assert train.transient_io_error(eio) is eio and train.transient_io_error(wrapped) is eio
  assert train.transient_io_error(ValueError("UNKNOWN: Error reading \"d/0\": [os_error_code='5']")).errno == errno.EIO
  for corrupt in (FileNotFoundError(errno.ENOENT, "gone"), ValueError("not a valid checkpoint"),
                  ValueError("DATA_LOSS: Error reading: [os_error_code='28']")):
    assert train.transient_io_error(corrupt) is None


@pytest.mark.parametrize("keep", [False, True])
def test_a_finished_stage_keeps_only_final_unless_asked(tmp_path, reference, keep, capsys):
  stage_dir = str(tmp_path / "toy")
  with train.checkpoint_mode(None, keep_checkpoints=keep):
    params, _ = train.run_stage(_stage(), stage_dir)
  np.testing.assert_array_equal(np.asarray(params["w"]), reference)
  assert train.has_final(stage_dir)
  assert os.path.isdir(os.path.join(stage_dir, "checkpoints")) == keep
  assert ("keep_checkpoints=True keeps them" in capsys.readouterr().out) == (not keep)
  if keep:  # a rerun without keep_checkpoints (the pipeline's default) removes them from the finished stage
    with train.checkpoint_mode(None, keep_checkpoints=False):
      again, _ = train.run_stage(_stage(), stage_dir)
    assert not os.path.exists(os.path.join(stage_dir, "checkpoints"))
    np.testing.assert_array_equal(np.asarray(again["w"]), reference)


def test_keep_checkpoints_is_a_config_field_defaulting_to_false_and_result_neutral():
  from distill import configuration
  c = configuration.base_config()
  assert c.train.keep_checkpoints is False
  assert "train.keep_checkpoints" in main_lib.RESULT_NEUTRAL_FIELDS  # a rerun may change it freely


def test_a_checkpoint_of_another_model_is_named_and_not_set_aside(tmp_path):
  """Resuming with another model config (--allow_config_change): one line naming the parameter, not the
  corrupt-checkpoint fallback that would set every checkpoint aside and restart."""
  stage_dir = str(tmp_path / "toy")
  with pytest.raises(KeyboardInterrupt):
    train.run_stage(_stage(on_batch=_crash_at(5)), stage_dir)
  wider = _stage()
  wider.init_params = {"w": jnp.ones((3, 3))}
  with pytest.raises(train.TrainingError) as error:
    train.run_stage(wider, stage_dir)
  message = str(error.value)
  assert "checkpoint of step 4" in message and "another model config" in message, message
  assert "parameter w has shape (2, 3) in the checkpoint, (3, 3) in the model" in message, message
  assert "\n" not in message
  assert _steps(stage_dir) == [2, 4] and not glob.glob(os.path.join(stage_dir, "checkpoints", "*.unreadable-*"))
