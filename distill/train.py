"""The one training loop: jit step, optax, EMA, Orbax checkpoints, metrics, progress.

A method hands the trainer a `Stage` — a loss function, initial parameters, an optimizer, a step count
and a batch function — and gets back the trained parameters. Methods never own a loop.

Determinism: the step's RNG is `fold_in(key, step)` and batches are a pure function of the step, so a
run resumed from a checkpoint at step k continues exactly as if it had not stopped.

Devices: the stage trains on a `parallel.make_mesh(stage.fsdp)` mesh over every device. The state is placed
once with its shardings (replicated, or FSDP-sharded with fsdp > 1), each host batch becomes one global array
split over the batch axes, and the jitted step's out_shardings pin the state's layout, so the state
never moves between steps. On one device this is today's single-device step; on more, the same
computation up to the order of float reductions (random draws do not depend on the layout).

Stopping and faults (what a preempted or full machine does to a run):
  - SIGTERM / SIGINT (`install_stop_handlers`): the handler only records the request. The running stage
    finishes the step it is in, saves a checkpoint at that step and raises `Stopped`; `distill.main` prints
    where it stopped and exits 0, and the same command resumes there. With jax.distributed, JAX's
    preemption service owns SIGTERM: a notice on any process makes every process agree on one step
    (`multihost_utils.reached_preemption_sync_point`, a local flag read per step, no collective).
  - SIGKILL at any moment: checkpoints and `final/` are committed by an atomic rename, so the next run
    resumes from the last complete one, and the result is bit-identical to an uninterrupted run.
  - A checkpoint that cannot be written (full disk, …): `CheckpointWriteError` naming stage, step and
    error; the previous checkpoint is untouched (Orbax writes into a temporary directory first).
  - Async saves (`Stage.async_checkpoints`; by default on accelerators, not on the CPU): training goes on
    while a periodic checkpoint is written. The trainer waits for it before the next save, before `final/`,
    on a stop (whose own save is waited for before `Stopped` is raised) and when the stage ends by an
    error; a failed async save is reported then, naming its own step, and never replaces the last complete
    checkpoint (Orbax removes old steps only after the new one is committed).
  - An unreadable latest checkpoint: the previous one is restored, with a message (`restore_checkpoint`).

Where: a stage directory is a local path or a URL (gs://bucket/run/teacher). Orbax is handed the path as it is
(`orbax_path`) and writes checkpoints itself; everything else goes through etils.epath. An object store cannot
rename a directory atomically, so there `final/` is written in place and its meta.json, written last, marks
it complete (`has_final`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import re
import signal
import sys
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from distill import losses, parallel, writers

PyTree = Any
# loss_fn(params, frozen, batch, rng) -> (scalar loss, dict of scalar metrics); `frozen` is an argument of the
# jitted step, not a baked-in constant.
LossFn = losses.LossFn


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, a checkpoint that does not fit)."""


class CheckpointWriteError(TrainingError):
  """A checkpoint or `final/` that could not be written (e.g. a full disk); the previous one is intact."""


class StageFailed(TrainingError):
  """A pipeline stage that ended by an error other than the trainer's own (a grid or eval file that could not
  be written, an unexpected exception): one line naming the stage; the cause is chained."""


class Stopped(Exception):
  """A stage stopped early on request (SIGTERM, SIGINT, a preemption notice) after saving its checkpoint.

  Not an error: rerunning the same command resumes at `step`. `message` is the one line to print."""

  def __init__(self, message: str, stage: str, step: int, num_steps: int, checkpoint: str | None):
    super().__init__(message)
    self.message, self.stage, self.step, self.num_steps, self.checkpoint = message, stage, step, num_steps, checkpoint


def _one_line(e: BaseException, limit: int = 300) -> str:
  """'Type: first line of the message' (cut at `limit`): an error from deep in Orbax, in a line."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return f"{type(e).__name__}: {lines[0][:limit] if lines else ''}"


one_line = _one_line


def _write_error(e: BaseException) -> str:
  """A failed checkpoint write in a line; a full disk said first, as Orbax buries it deep in a long message."""
  text = str(e)
  if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in text or (
      "os_error_code='28'" in text):
    return f"the disk is full ({_one_line(e, 200)})"
  return _one_line(e)


def _closed_loop(e) -> bool:
  return isinstance(e, RuntimeError) and str(e) == "Event loop is closed"


def quiet_closed_event_loops() -> None:
  """Drops Python's reports of `RuntimeError: Event loop is closed`, and only those: after a failed Orbax save (a
  full disk) or at exit, tensorstore's callbacks may still reach Orbax's closed asyncio loop, and each prints a
  traceback (through sys.unraisablehook or, from a C++ thread, sys.excepthook) around the one-line error.
  Idempotent."""
  if getattr(sys.unraisablehook, "distill_quiet", False):
    return
  unraisable_hook, except_hook = sys.unraisablehook, sys.excepthook

  def on_unraisable(unraisable):
    if not _closed_loop(unraisable.exc_value):
      unraisable_hook(unraisable)

  def on_exception(kind, value, tb):
    if not _closed_loop(value):
      except_hook(kind, value, tb)

  on_unraisable.distill_quiet = True
  sys.unraisablehook, sys.excepthook = on_unraisable, on_exception


class _OrbaxThreadErrors(logging.Filter):
  """Installed once a save has failed, whose error the trainer reports in one line: drops what Orbax's writer
  threads and its abandoned asyncio futures go on logging about that same error after the save raised (absl
  ERROR records of threads other than the main one; asyncio's 'Future/Task exception was never retrieved')."""

  def filter(self, record):
    if record.name == "asyncio":
      return "exception was never retrieved" not in str(record.msg)
    return not (record.levelno >= logging.ERROR and record.threadName != "MainThread")


_ORBAX_THREAD_ERRORS = _OrbaxThreadErrors()


@contextlib.contextmanager
def _orbax_errors_held():
  """Orbax's writer threads log a failed write with its traceback (a hundred lines for a full disk) before the
  save raises it. Held here: dropped when the save raises (the trainer reports the error in one line), passed
  on when it does not."""
  absl_logger = logging.getLogger("absl")
  held = []

  class Hold(logging.Filter):
    def filter(self, record):
      if record.levelno >= logging.ERROR:
        held.append(record)
        return False
      return True

  hold = Hold()
  absl_logger.addFilter(hold)
  try:
    yield
  except BaseException:
    absl_logger.removeFilter(hold)
    absl_logger.addFilter(_ORBAX_THREAD_ERRORS)  # the same object each time: added once
    logging.getLogger("asyncio").addFilter(_ORBAX_THREAD_ERRORS)
    # The failed save's write coroutines that never ran are collected at exit, each as a RuntimeWarning.
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    quiet_closed_event_loops()
    raise
  absl_logger.removeFilter(hold)
  for record in held:
    absl_logger.handle(record)


# --- stopping on request ---------------------------------------------------------------------------------

# The signal a handler recorded (None: none). The handler does nothing else: run_stage reads it after each
# step, where stopping is safe.
_STOP = {"signal": None}
# Stop checks made by this process. Every process makes the same sequence of checks (stages and steps run in
# the same order everywhere), so the count is a step id the processes share across stages, as JAX's
# preemption sync point needs (a stage's own step restarts at 0 and could miss the agreed id).
_STOP_CHECKS = [0]


def _record_stop(signum, frame):  # noqa: ARG001 — the signal handler's signature
  if signum == signal.SIGINT and _STOP["signal"] is not None:
    raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
  _STOP["signal"] = signum


def install_stop_handlers() -> list[int]:
  """SIGTERM and SIGINT stop the running stage after its current step, with a checkpoint (see `Stopped`).
  Call from the main thread. Returns the signals taken.

  With jax.distributed initialised, JAX's preemption service has SIGTERM (a Python handler would take it
  away and the processes could not agree on a step), and SIGINT keeps its KeyboardInterrupt: a Ctrl-C on one
  process of several cannot be agreed on either. Several processes without jax.distributed (a TPU pod slice
  run with --distributed=off) have no way to agree, so both signals keep their defaults there (a SIGTERM
  kills; the next run resumes from the last periodic checkpoint)."""
  if jax.distributed.is_initialized() or jax.process_count() > 1:
    return []
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _record_stop)
  return [signal.SIGTERM, signal.SIGINT]


def stop_requested() -> bool:
  """Whether this process was asked to stop (for loops outside run_stage that can end early; one process's
  answer, not an agreement across processes)."""
  return _STOP["signal"] is not None


def clear_stop_request():
  """Forgets a recorded request (tests, or a caller that has acted on it)."""
  _STOP["signal"] = None


def agreed_stop() -> str | None:
  """Whether to stop here, the same answer on every process: the reason (e.g. 'SIGTERM'), or None.

  Every process must call it at the same points (run_stage calls it once per step and once at its start).
  One process: the recorded signal. Several: JAX's preemption sync point, which turns a SIGTERM on any
  process into one agreed call on all of them (sub-microsecond per call; the agreement runs in the
  background only once a notice arrives)."""
  _STOP_CHECKS[0] += 1
  if jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service:
    from jax.experimental import multihost_utils
    if multihost_utils.reached_preemption_sync_point(_STOP_CHECKS[0]):
      return "preemption notice (SIGTERM)"
  if jax.process_count() > 1:
    return None  # a signal recorded by one process alone cannot be agreed on
  sig = _STOP["signal"]
  return None if sig is None else signal.Signals(sig).name


@dataclasses.dataclass
class Stage:
  """Everything one stage or round of training needs; built by a method, run by `run_stage`."""
  name: str                          # directory name under the workdir, e.g. 'teacher', 'pd_08'
  loss_fn: LossFn
  init_params: PyTree
  optimizer: optax.GradientTransformation
  num_steps: int
  batch_fn: Callable[[int], dict]    # step -> host batch (numpy); a pure function of the step
  seed: int = 0
  ema_decay: float | None = None     # None: no EMA (the returned params are the raw ones)
  frozen: PyTree = None              # passed to loss_fn unchanged; never saved with the stage
  meta: dict = dataclasses.field(default_factory=dict)  # recorded with every checkpoint
  log_every: int = 100
  ckpt_every: int = 1000
  keep_checkpoints: int = 2          # periodic checkpoints kept while the stage trains
  keep_after_final: bool | None = None  # keep checkpoints/ once final/ is written; None: `checkpoint_mode`
  async_checkpoints: bool | None = None  # periodic saves written while training goes on; None: `checkpoint_mode`
  skip_nonfinite: bool = False       # skip updates whose loss/gradient is not finite instead of stopping
  images_per_step: int = 0           # for the throughput metric
  lr_schedule: Callable[[int], float] | None = None  # logged as 'lr'
  fsdp: int = 1                      # size of the mesh's 'fsdp' axis (parallel.py); 1: data parallel only
  fsdp_min_size: int = parallel.DEFAULT_FSDP_MIN_SIZE  # with fsdp > 1, leaves this large are sharded


def ema_decay_at(step, decay):
  """EMA decay with warm-up, min(decay, (1 + step)/(10 + step)): short runs do not keep the init."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def init_state(params, optimizer, with_ema: bool) -> dict:
  """A fresh train state in new buffers (the train step donates it, so it must not alias `params`).
  Built eagerly: a jitted init would be one more compilation per stage."""
  params = jax.tree.map(jnp.array, params)  # copies
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "ema_params": jax.tree.map(jnp.array, params) if with_ema else {},
      "opt_state": jax.tree.map(jnp.array, optimizer.init(params)),
      "nonfinite": jnp.zeros((), jnp.int32),
  }


def make_train_step(loss_fn: LossFn, optimizer, ema_decay, skip_nonfinite: bool, seed: int):
  """One update: (state, batch) -> (state, metrics). Pure; jit it."""
  base_key = jax.random.PRNGKey(seed)

  def train_step(state, frozen, batch):
    rng = jax.random.fold_in(base_key, state["step"])
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], frozen, batch, rng)
    grad_norm = optax.tree_utils.tree_norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
           "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32)}
    if ema_decay is not None:
      d = ema_decay_at(state["step"], ema_decay)
      new["ema_params"] = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema_params"], params)
    else:
      new["ema_params"] = state["ema_params"]
    if skip_nonfinite:
      # Keep everything but the counters as it was: the update is dropped, not patched.
      new = {k: (v if k in ("step", "nonfinite") else jax.tree.map(
          lambda a, b: jnp.where(finite, a, b), v, state[k])) for k, v in new.items()}
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm)
    return new, metrics

  return train_step


def jitted_train_step(loss_fn, optimizer, ema_decay, skip_nonfinite: bool, seed: int, state_shardings):
  """One jitted step per (loss, optimizer, …, state layout): rounds that share them reuse the compiled step,
  since the round's step count and teacher travel as `frozen` arguments rather than as constants.

  state_shardings: a tree of NamedShardings matching the state; the step returns the state with exactly
  these (so it never moves between steps) and its metrics replicated."""
  # A tree of shardings is not hashable; its structure and leaves are.
  layout = (jax.tree.structure(state_shardings), tuple(jax.tree.leaves(state_shardings)))
  return _jitted_train_step(loss_fn, optimizer, ema_decay, skip_nonfinite, seed, layout)


@functools.lru_cache(maxsize=16)
def _jitted_train_step(loss_fn, optimizer, ema_decay, skip_nonfinite, seed, layout):
  treedef, leaves = layout
  out_shardings = (jax.tree.unflatten(treedef, leaves), parallel.replicated(leaves[0].mesh))
  return jax.jit(make_train_step(loss_fn, optimizer, ema_decay, skip_nonfinite, seed), out_shardings=out_shardings,
                 donate_argnums=(0,))


class _CheckpointManager(ocp.CheckpointManager):
  """Orbax's manager, minus its own look at JAX's preemption sync point: it would pass the stage's step as
  the sync id, and the sync manager keeps the last id it was given, so the process-wide ids of
  `agreed_stop` could then never meet the agreed one. The trainer decides when to save."""

  def reached_preemption(self, step: int) -> bool:  # noqa: ARG002
    return False


def orbax_path(path: str) -> str:
  """The path Orbax is handed for a checkpoint directory: absolute if local, a URL as it is (Orbax and
  tensorstore write gs:// themselves). Every Orbax save and restore of the trainer goes through here."""
  return writers.abspath(path)


# The run's defaults for stages that leave Stage.async_checkpoints / Stage.keep_after_final at None
# (config.train.async_checkpoints and keep_checkpoints, set by `checkpoint_mode`); async None: on accelerators.
# Outside a pipeline (a method's tests, a notebook) a finished stage keeps its checkpoints.
_ASYNC_DEFAULT = {"async": None, "keep": True}


@contextlib.contextmanager
def checkpoint_mode(async_checkpoints: bool | None, keep_checkpoints: bool = True):
  """Within this block, stages whose Stage.async_checkpoints is None save asynchronously or not as given
  (None: `default_async_checkpoints`), and stages whose Stage.keep_after_final is None keep their checkpoints/
  once final/ is written, or remove them. The pipeline sets both from config.train."""
  previous = dict(_ASYNC_DEFAULT)
  _ASYNC_DEFAULT.update({"async": async_checkpoints, "keep": keep_checkpoints})
  try:
    yield
  finally:
    _ASYNC_DEFAULT.update(previous)


def default_async_checkpoints() -> bool:
  """Async saves on accelerators, where the host is otherwise idle during a step; synchronous on the CPU,
  where the writer threads would take cores from the step itself."""
  return jax.default_backend() != "cpu"


def uses_async_checkpoints(stage: Stage) -> bool:
  for choice in (stage.async_checkpoints, _ASYNC_DEFAULT["async"]):
    if choice is not None:
      return bool(choice)
  return default_async_checkpoints()


def _manager(directory: str, keep: int, async_checkpoints: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_checkpoints)
  return _CheckpointManager(orbax_path(directory), options=options, item_names=("state", "meta"))


def save_checkpoint(manager: ocp.CheckpointManager, state: dict, meta: dict, wait: bool = True):
  """Saves `state` at its step with `meta`. wait=False with an async manager returns once the arrays are
  copied off the devices, while the files are still being written (`manager.wait_until_finished`)."""
  step = int(state["step"])
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)), force=True)
  if wait:
    manager.wait_until_finished()


# errno values of a read that may succeed when tried again (a flaky disk, a network filesystem or bucket
# that timed out): the checkpoint is not corrupt, so it is never set aside for them.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.EBUSY, errno.EINTR,
                              errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ENETUNREACH,
                              errno.EHOSTUNREACH, errno.ENETDOWN, errno.ESTALE})
RESTORE_TRIES = 4           # reads of one checkpoint before a transient error is reported
RESTORE_BACKOFF_S = 0.5     # seconds before the 2nd read, doubled before each later one


def transient_io_error(e: BaseException) -> OSError | None:
  """The OSError with a transient errno (`TRANSIENT_ERRNOS`) in `e` or its causes, or None (corruption, a
  missing file, anything else)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
      return e
    # tensorstore (Orbax's array reads) reports the system's error inside a ValueError's text
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code and int(code.group(1)) in TRANSIENT_ERRNOS:
      return OSError(int(code.group(1)), os.strerror(int(code.group(1))), _one_line(e, 200))
    e = e.__cause__ or e.__context__
  return None


def _other_model(directory, step: int, abstract_state: dict) -> str | None:
  """How the parameters saved at `step` differ from `abstract_state`'s (a checkpoint of another model config, not
  a corrupt one), from Orbax's metadata; None when they fit or the metadata cannot be read (then the restore
  itself decides)."""
  from distill import models
  try:
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns about metadata files older checkpoints lack
    try:
      metadata = ocp.StandardCheckpointer().metadata(os.path.join(os.fspath(directory), str(step), "state"))
    finally:
      absl_logger.setLevel(level)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    found = models.param_shapes(tree["params"]) if isinstance(tree, dict) and "params" in tree else {}
  except Exception:  # noqa: BLE001 — unreadable metadata: not evidence of another model
    return None
  if not found:
    return None
  expected = models.param_shapes(abstract_state["params"])
  extra = sorted(set(found) - set(expected))
  if extra:
    return f"parameter {extra[0]} {found[extra[0]]} of the checkpoint is not in the model"
  return models.params_mismatch(expected, found)


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state: dict, step: int | None = None):
  """Restores (state, meta) at `step` (default: the latest).

  A checkpoint that cannot be read because it is corrupt or incomplete is set aside (renamed N.unreadable-T,
  so the resumed run can write that step again) and the previous one is tried, with a line saying which step
  is restored and why. A transient I/O error (`transient_io_error`: EIO, a timeout, …) is not corruption: that
  read is retried RESTORE_TRIES times with a doubling backoff, then TrainingError (one line) is raised, and
  nothing is set aside. A checkpoint whose parameters have other names or shapes than `abstract_state`'s
  (trained with another model config) is not corruption either: TrainingError (one line) naming the parameter.
  """
  steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
  errors = []
  for s in steps:
    if why := _other_model(manager.directory, s, abstract_state):
      raise TrainingError(f"the checkpoint of step {s} in {manager.directory} was trained with another model config "
                          f"({why}); nothing was set aside: run with that config, or delete "
                          f"{manager.directory} to train this stage anew")
    for attempt in range(RESTORE_TRIES):
      try:
        restored = manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                              meta=ocp.args.JsonRestore()))
        break
      except Exception as e:  # noqa: BLE001 — sorted below: transient (retry) or unreadable (the previous step)
        transient = transient_io_error(e)
        if transient is None:
          errors.append(f"step {s}: {_one_line(e, 200)}")
          restored = None
          break
        if attempt + 1 == RESTORE_TRIES:
          raise TrainingError(
              f"could not read the checkpoint of step {s} in {manager.directory}: {_one_line(transient, 200)} "
              f"({RESTORE_TRIES} tries); a transient I/O error, so nothing was set aside: run the same command "
              "again when the storage answers") from e
        if jax.process_index() == 0:
          print(f"[checkpoint] reading step {s}: {_one_line(transient, 200)}; trying again "
                f"({attempt + 2}/{RESTORE_TRIES})")
        time.sleep(RESTORE_BACKOFF_S * 2**attempt)
    if restored is None:
      continue
    if errors:
      if jax.process_index() == 0:
        bad_steps = steps[:steps.index(s)]
        print(f"[checkpoint] restored step {s} after unreadable later checkpoint(s): {'; '.join(errors)}; set aside "
              f"as {', '.join(f'{b}.unreadable-*' for b in bad_steps)}")
        for bad in bad_steps:  # set aside, so the resumed run can write those steps again
          bad_dir = epath.Path(manager.directory) / str(bad)
          bad_dir.rename(bad_dir.parent / f"{bad}.unreadable-{int(time.time())}")
      parallel.sync_processes("checkpoint: unreadable steps set aside")
      manager.reload()
    return restored["state"], restored["meta"]
  raise TrainingError(f"no readable checkpoint in {manager.directory}: {'; '.join(errors)}")


def fingerprint(params) -> str:
  """A short hash of a parameter tree's names, shapes and bytes: recorded in a round's meta so anyone can
  check which parameters were its teacher."""
  import hashlib
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode() + str(a.shape).encode() + a.tobytes())
  return h.hexdigest()[:16]


def has_final(stage_dir: str) -> bool:
  """Whether a stage finished, i.e. its complete `final/` exists. Locally final/ is renamed into place whole,
  so its existence says so; in an object store (a URL) it is written in place and meta.json, written last,
  says so."""
  final = epath.Path(stage_dir, "final")
  return (final / "meta.json").exists() if writers.is_url(stage_dir) else final.is_dir()


def load_final_params(stage_dir: str) -> tuple[PyTree, dict]:
  """The parameters a finished stage hands on (EMA if it had EMA) and its meta, read-only. TrainingError (one
  line, naming the file) for an unreadable meta.json or parameters."""
  path = os.path.join(stage_dir, "final")
  if not has_final(stage_dir):
    raise TrainingError(f"{stage_dir}: no final parameters (the stage has not finished)")
  meta_path = os.path.join(path, "meta.json")
  try:
    meta = json.loads(epath.Path(meta_path).read_text())
  except (OSError, ValueError) as e:
    raise TrainingError(f"{meta_path}: unreadable ({type(e).__name__}: {e})") from e
  try:
    params = ocp.StandardCheckpointer().restore(orbax_path(os.path.join(path, "params")))
  except Exception as e:  # noqa: BLE001 — Orbax, tensorstore and OS errors alike: named here, as they may not
    raise TrainingError(f"{os.path.join(path, 'params')}: unreadable checkpoint ({_one_line(e)})") from e
  return params, meta


def load_final_meta(stage_dir: str) -> dict:
  """A finished stage's final/meta.json (local or a URL)."""
  return json.loads(epath.Path(stage_dir, "final", "meta.json").read_text())


def final_param_shapes(stage_dir: str) -> dict[str, tuple]:
  """{'a/b/kernel': shape} of a finished stage's final parameters, from Orbax's metadata (no array is read).
  ValueError when there is none: Orbax reads an unreadable _METADATA as no parameters (with a warning), which
  would otherwise pass for a checkpoint of another model."""
  from distill import models
  path = os.path.join(stage_dir, "final", "params")
  metadata = ocp.StandardCheckpointer().metadata(orbax_path(path))
  tree = getattr(metadata, "item_metadata", metadata)
  shapes = {} if tree is None else models.param_shapes(getattr(tree, "tree", tree))
  if not shapes:
    raise ValueError(f"{path}/_METADATA: missing or unreadable (Orbax finds no parameters in it)")
  return shapes


def _save_final(stage_dir: str, params, meta: dict, is_main_process: bool = True):
  """Writes `final/` (params: numpy, so any device layout can load them). With several processes every one
  calls it, as Orbax's save is collective; the main process alone prepares, writes meta and renames.

  Locally: into final.tmp/, renamed to final/ at the end (atomic: 'final' exists only complete). In an
  object store, where renaming a directory copies it object by object: into final/ itself, clearing what a
  killed earlier attempt left there, with meta.json written last (`has_final`)."""
  path = os.path.join(stage_dir, "final")
  in_place = writers.is_url(stage_dir)
  tmp = path if in_place else path + ".tmp"
  if is_main_process:
    if epath.Path(tmp).exists():
      epath.Path(tmp).rmtree()
    epath.Path(tmp).mkdir(parents=True)
  parallel.sync_processes("final: tmp ready")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(orbax_path(os.path.join(tmp, "params")), params)
  ckptr.wait_until_finished()
  if is_main_process:
    writers.atomic_write_json(os.path.join(tmp, "meta.json"), meta, indent=1, sort_keys=True)
    if not in_place:
      epath.Path(tmp).rename(path)  # atomic: 'final' exists only complete
  parallel.sync_processes("final: written")


_ATOMIC_TMP = re.compile(r".+\.tmp-[0-9]+-[0-9a-f]{8}")  # writers.atomic_write's temporary files
_ORBAX_TMP = ".orbax-checkpoint-tmp"  # Orbax writes a checkpoint (and each item) under NAME.orbax-checkpoint-tmp*


def sweep_leftovers(stage_dir: str) -> list[str]:
  """Removes what a killed run (SIGKILL, power loss: no cleanup ran) left in `stage_dir`; returns the paths
  removed, relative to it. Called at the start of `run_stage` (a finished stage's too: a grid or eval file may
  have been killed mid-write after its final/), when nothing of this stage is being written:
    - checkpoints/N.orbax-checkpoint-tmp*: a checkpoint killed before Orbax renamed it into place (a later save
      of the same step would replace it, but a stop-save off the checkpoint grid is never repeated);
    - final.tmp/: a final/ killed before its rename (locally; in an object store final/ is written in place);
    - *.tmp-PID-XXXXXXXX anywhere below (in an object store: in the stage directory, tb/ and final/):
      `writers.atomic_write` killed before its rename.
  Set-aside unreadable checkpoints (N.unreadable-T) are kept. Nothing outside `stage_dir` is touched."""
  root = epath.Path(stage_dir)
  if not root.is_dir():
    return []
  removed = []
  checkpoints = root / "checkpoints"
  candidates = list(checkpoints.iterdir()) if checkpoints.is_dir() else []
  candidates = [p for p in candidates if _ORBAX_TMP in p.name]
  if not writers.is_url(stage_dir) and (root / "final.tmp").exists():
    candidates.append(root / "final.tmp")
  for path in candidates:
    if path.is_dir():
      path.rmtree()
    else:
      path.unlink()
    removed.append(os.path.relpath(os.fspath(path), os.fspath(root)))
  if writers.is_url(stage_dir):  # where the run writes files atomically; epath lists gs:// one level at a time
    tmp_files = [p for d in (root, root / "tb", root / "final") if d.is_dir() for p in d.glob("*.tmp-*")
                 if _ATOMIC_TMP.fullmatch(p.name)]
  else:
    tmp_files = [epath.Path(dirpath, name) for dirpath, _, names in os.walk(stage_dir) for name in names
                 if _ATOMIC_TMP.fullmatch(name)]
  for path in tmp_files:
    path.unlink(missing_ok=True)
    removed.append(os.path.relpath(os.fspath(path), os.fspath(root)))
  return sorted(removed)


def keeps_checkpoints(stage: Stage) -> bool:
  """Whether a finished stage keeps checkpoints/ beside final/ (Stage.keep_after_final, else `checkpoint_mode`)."""
  return stage.keep_after_final if stage.keep_after_final is not None else bool(_ASYNC_DEFAULT["keep"])


def _drop_checkpoints_after_final(stage: Stage, stage_dir: str, say) -> None:
  """Removes a finished stage's checkpoints/ (final/ is what later stages and a rerun read; the checkpoints hold
  the optimizer state too, several times final/'s size) unless it keeps them. Called only once final/ is
  complete (`has_final`)."""
  ckpt_dir = epath.Path(stage_dir, "checkpoints")
  if keeps_checkpoints(stage) or not has_final(stage_dir) or not ckpt_dir.exists():
    return
  ckpt_dir.rmtree()
  say(f"[{stage.name}] removed {ckpt_dir} (final/ is written; config.train.keep_checkpoints=True keeps them)")


def place_state(state: dict, mesh, fsdp_min_size: int) -> tuple[dict, PyTree]:
  """(state as global arrays on `mesh`, its shardings): the parallel.param_shardings rule over the whole
  state, so params, Adam's moments and the EMA share a layout and scalars are replicated."""
  shardings = parallel.param_shardings(mesh, state, fsdp_min_size)
  return parallel.place(state, shardings), shardings


def run_stage(stage: Stage, stage_dir: str, *, is_main_process: bool = True,
              devices=None) -> tuple[PyTree, dict]:
  """Trains `stage`, resuming from its latest checkpoint; returns (final params, meta).

  A stage whose `final/` exists is skipped (its parameters are loaded). Final params are the EMA
  params when the stage has EMA. With one process they keep their training layout; with several they are
  numpy on every process (as a skipped stage's are), so that one process alone can sample with them.
  devices: the mesh's devices (default: all; stage.fsdp sets its 'fsdp' axis).

  Raises TrainingError on a non-finite loss (without saving), CheckpointWriteError when a checkpoint or
  final/ cannot be written, and Stopped when asked to stop (`agreed_stop`): then the step in flight
  finishes and is checkpointed first. Only the main process prints.
  """
  say = print if is_main_process else (lambda *args, **kwargs: None)
  if is_main_process and (removed := sweep_leftovers(stage_dir)):
    say(f"[{stage.name}] removed what an interrupted run left: {', '.join(removed[:5])}"
        + (f" and {len(removed) - 5} more" if len(removed) > 5 else ""))
  parallel.sync_processes(f"{stage.name}: leftovers swept")
  if has_final(stage_dir):
    say(f"[{stage.name}] already finished; loading {stage_dir}/final")
    if is_main_process:
      _drop_checkpoints_after_final(stage, stage_dir, say)  # a run killed between final/ and the removal
    return load_final_params(stage_dir)

  with_ema = stage.ema_decay is not None
  mesh = parallel.make_mesh(stage.fsdp, devices)
  parallel.check_partitionable_rng(mesh)
  # Parameters placed before the optimizer state is built from them, so its moments are born sharded.
  init_params = parallel.place(stage.init_params, parallel.param_shardings(mesh, stage.init_params,
                                                                           stage.fsdp_min_size))
  state, state_shardings = place_state(init_state(init_params, stage.optimizer, with_ema), mesh,
                                       stage.fsdp_min_size)
  frozen = parallel.place(stage.frozen, parallel.replicated_shardings(mesh, stage.frozen))
  ckpt_dir = os.path.join(stage_dir, "checkpoints")
  use_async = uses_async_checkpoints(stage)
  manager = _manager(ckpt_dir, stage.keep_checkpoints, use_async)
  meta = dict(stage.meta, stage=stage.name, num_steps=stage.num_steps)
  saved_meta = {}
  if manager.latest_step() is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)  # carries the target shardings
    state, saved_meta = restore_checkpoint(manager, abstract)
    if saved_meta.get("stage") != stage.name:
      raise TrainingError(f"{stage_dir}: checkpoint belongs to stage {saved_meta.get('stage')!r}, not {stage.name!r}")
    say(f"[{stage.name}] resuming at step {int(state['step'])}/{stage.num_steps}")
  start = int(state["step"])
  # The last complete checkpoint, and the step of an async save still being written (None: none).
  saves = {"complete": manager.latest_step(), "pending": None}
  where = f"stage {stage.meta.get('stage_kind', stage.name)}, round {stage.meta.get('round', '-')}"

  def stopped(reason, step, saved):
    if step >= stage.num_steps:
      return Stopped(f"[{stage.name}] stopped by {reason} after finishing the stage ({stage_dir}/final written)",
                     stage.name, step, stage.num_steps, None)
    checkpoint = os.path.join(ckpt_dir, str(step)) if saved or manager.latest_step() == step else None
    kept = f"checkpoint {checkpoint} saved" if saved else (
        f"resumes from checkpoint {checkpoint}" if checkpoint else "no checkpoint yet: the stage restarts at step 0")
    return Stopped(f"[{stage.name}] stopped by {reason} at step {step}/{stage.num_steps}; {kept}",
                   stage.name, step, stage.num_steps, checkpoint)

  if reason := agreed_stop():  # asked before this stage started: stop before compiling anything
    raise stopped(reason, start, saved=False)

  train_step = jitted_train_step(stage.loss_fn, stage.optimizer, stage.ema_decay, stage.skip_nonfinite, stage.seed,
                                 state_shardings)
  try:
    writer = writers.MetricWriter(os.path.join(stage_dir, "tb"), enabled=is_main_process)
  except OSError as e:
    raise CheckpointWriteError(f"[{stage.name}] could not open its metrics in {stage_dir}/tb: "
                               f"{writers.os_error_line(e)}; free space (or fix the cause) and run the same command "
                               "again to resume") from e
  progress = writers.ProgressReporter(total_steps=stage.num_steps, prefix=f"[{stage.name}]",
                                      batch_size=stage.images_per_step or None, every_seconds=None,
                                      every_steps=stage.log_every, print_fn=say)
  lr_fn = stage.lr_schedule
  session_start = time.time()
  prior_seconds = float(saved_meta.get("train_seconds", 0.0)) if start else 0.0
  last_t, last_step = session_start, start
  checked_nonfinite = int(state["nonfinite"])

  def check_finite(step):
    nonlocal checked_nonfinite
    n = int(state["nonfinite"])
    if n > checked_nonfinite and not stage.skip_nonfinite:
      raise TrainingError(f"[{stage.name}] non-finite loss or gradient before step {step} ({where}); "
                          "the last good checkpoint is kept. Lower the learning rate or set skip_nonfinite.")
    checked_nonfinite = n

  def save_failed(step, e):
    previous = saves["complete"]
    kept = f"the checkpoint of step {previous} is intact" if previous is not None else "there is no earlier checkpoint"
    return CheckpointWriteError(f"[{stage.name}] could not save the checkpoint of step {step}/{stage.num_steps} "
                                f"({where}) in {ckpt_dir}: {_write_error(e)}; {kept}; free space (or fix the cause) "
                                "and run the same command again to resume")

  def metrics_failed(e, step=None):
    previous = saves["complete"]
    kept = f"the checkpoint of step {previous} is intact" if previous is not None else "there is no checkpoint yet"
    at = f" at step {step}/{stage.num_steps}" if step is not None else ""
    return CheckpointWriteError(f"[{stage.name}] could not write its metrics{at} ({where}) in {stage_dir}/tb: "
                                f"{_write_error(e)}; {kept}; free space (or fix the cause) and run the same "
                                "command again to resume")

  def finish_pending():
    """Waits for an async save still being written; its failure is a CheckpointWriteError of its own step."""
    step, saves["pending"] = saves["pending"], None
    if step is None:
      return
    try:
      with _orbax_errors_held():
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 — as in save
      raise save_failed(step, e) from e
    saves["complete"] = step

  def save(step, wait=False):
    finish_pending()
    meta["train_seconds"] = prior_seconds + time.time() - session_start
    wait = wait or not use_async
    try:
      with _orbax_errors_held():
        save_checkpoint(manager, state, dict(meta), wait=wait)  # a copy: `meta` changes while an async save runs
    except Exception as e:  # noqa: BLE001 — a full disk reads ValueError('RESOURCE_EXHAUSTED …') from Orbax
      raise save_failed(step, e) from e
    saves["complete" if wait else "pending"] = step

  reason = None
  leaving_by_error = True
  try:
    for step in range(start, stage.num_steps):
      batch = parallel.global_batch(stage.batch_fn(step), mesh)
      state, metrics = train_step(state, frozen, batch)
      done = step + 1
      if done % stage.log_every == 0 or done == stage.num_steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(done)
        now = time.time()
        if stage.images_per_step:
          metrics["images_per_sec"] = stage.images_per_step * (done - last_step) / max(now - last_t, 1e-9)
        if lr_fn is not None:
          metrics["lr"] = float(lr_fn(step))
        if skipped := int(state["nonfinite"]):
          metrics["skipped_updates"] = float(skipped)
        last_t, last_step = now, done
        try:
          writer.write_scalars(done, metrics)
        except OSError as e:
          raise metrics_failed(e, done) from e
        progress.update(done, {k: metrics[k] for k in ("loss", "grad_norm", "lr") if k in metrics})
      reason = agreed_stop()
      if done != stage.num_steps and (done % stage.ckpt_every == 0 or reason):
        check_finite(done)
        save(done, wait=bool(reason))  # a stop's save is complete before Stopped is raised
      if reason and done != stage.num_steps:
        raise stopped(reason, done, saved=True)
    finish_pending()  # before final/: a failed last save is reported, and nothing is written behind final/
    leaving_by_error = False
  finally:
    try:
      writer.close()  # flushes: on a full disk this fails too, and must not hide the error that is leaving
    except OSError as e:
      if not leaving_by_error:
        raise metrics_failed(e) from e
    if saves["pending"] is not None:  # leaving by an error: let the save in flight complete (errors: the first one wins)
      with contextlib.suppress(Exception), _orbax_errors_held():
        manager.wait_until_finished()
  check_finite(stage.num_steps)
  meta["train_seconds"] = prior_seconds + time.time() - session_start
  # No last checkpoint: `final/` (written atomically below) is what a finished stage is resumed as.
  final = state["ema_params"] if with_ema else state["params"]
  if is_main_process or jax.process_count() > 1:  # with several processes, every one takes part in the save
    host = parallel.to_host(final)
    try:
      with _orbax_errors_held():
        _save_final(stage_dir, host, meta, is_main_process)
    except Exception as e:  # noqa: BLE001 — as for checkpoints
      previous = saves["complete"]
      kept = (f"the checkpoint of step {previous} is intact" if previous is not None else
              "there is no checkpoint: the stage would restart")
      raise CheckpointWriteError(f"[{stage.name}] could not write {stage_dir}/final after step {stage.num_steps} "
                                 f"({where}): {_write_error(e)}; {kept}; free space (or fix the cause) and run the "
                                 "same command again to resume") from e
    if jax.process_count() > 1:
      final = host
  if is_main_process:
    _drop_checkpoints_after_final(stage, stage_dir, say)
  if reason:
    raise stopped(reason, stage.num_steps, saved=False)
  return final, meta
