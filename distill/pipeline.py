"""The config's pipeline of stages, run in order in one workdir.

    WORKDIR/config.json            the resolved config
    WORKDIR/teacher/               checkpoints/, final/, tb/, samples.png, eval.json
    WORKDIR/classifier/            the cached feature classifier of embedded data sets
    WORKDIR/summary.json           wall-clock per stage

Stages are found by name in the method registry (`distill.registry`); the pipeline names no method. Each
stage resumes from its last checkpoint or is skipped when finished, so re-running the same
command after an interruption continues where it stopped. WORKDIR may be local or a URL (gs://bucket/run):
files go through etils.epath, checkpoints through Orbax.
"""
from __future__ import annotations

import os
import time

from etils import epath

from distill import evaluate, registry, train, writers
from distill.context import Context


def stage_runner(name: str):
  """fn(ctx) of a pipeline stage: a registered method's, or the framework's own 'evaluate'."""
  return evaluate.run_stage if name == registry.EVALUATE else registry.stage_runner(name)


def run(config, workdir: str, train_source=None):
  """Runs config.pipeline in order; writes WORKDIR/summary.json with wall-clock per stage."""
  ctx = Context(config, workdir, train_source)
  async_checkpoints = config.train.async_checkpoints if "train" in config else None
  keep_checkpoints = bool(config.train.get("keep_checkpoints", False)) if "train" in config else False
  summary_path = os.path.join(workdir, "summary.json")
  summary = {}
  if epath.Path(summary_path).exists():
    summary = writers.read_json(summary_path)
  for name in config.pipeline:
    start = time.time()
    try:
      with train.checkpoint_mode(async_checkpoints, keep_checkpoints):
        stage_runner(name)(ctx)
    except (train.TrainingError, train.Stopped):
      raise
    except OSError as e:  # a grid, eval or cache file that could not be written (a full disk) or read
      raise train.StageFailed(f"[{name}] {writers.os_error_line(e)}; what was complete before is kept: free "
                              "space (or fix the cause) and run the same command again") from e
    except Exception as e:  # noqa: BLE001 — anything else: one line naming the stage (main can show the traceback)
      raise train.StageFailed(f"[{name}] {train.one_line(e)}") from e
    summary.setdefault("wall_clock_seconds", {})[name] = summary.get("wall_clock_seconds", {}).get(name, 0.0) + (
        time.time() - start)
    if ctx.is_main_process:  # renamed into place: a kill never leaves half a file
      try:
        writers.atomic_write_json(summary_path, summary, indent=1)
      except OSError as e:
        raise train.StageFailed(f"[{name}] finished, but {writers.os_error_line(e, summary_path)}; its results are "
                                "kept: free space and run the same command again") from e
  return summary
