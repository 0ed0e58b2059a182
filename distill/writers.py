"""What the trainer writes for people: TensorBoard scalars/images, metrics.jsonl, PNG grids,
and a console progress line.

TensorBoard event files are written with the `tensorboard` package alone
(`EventFileWriter` and its protos); TensorFlow is not needed.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def flatten_dict(tree: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}. Objects with `to_dict()` (ml_collections) are expanded."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{sep}{key}" if prefix else str(key)
    if hasattr(value, "to_dict"):
      value = value.to_dict()
    if isinstance(value, Mapping):
      flat.update(flatten_dict(value, name, sep))
    else:
      flat[name] = value
  return flat


def _json_value(value: Any) -> Any:
  """A JSON-serialisable stand-in: numbers and strings as is, arrays as lists, else repr."""
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  if isinstance(value, np.generic) or (hasattr(value, "shape") and np.ndim(value) == 0):
    return np.asarray(value).item()
  if isinstance(value, (list, tuple)):
    return [_json_value(v) for v in value]
  if hasattr(value, "tolist"):
    return value.tolist()
  return repr(value)


def _png_bytes(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  _to_pil(image).save(buffer, format="PNG")
  return buffer.getvalue()


def _to_pil(image: np.ndarray) -> Image.Image:
  """image: [H, W, C] uint8 with C in {1, 3, 4}."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got {image.dtype}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return Image.fromarray(image)


class MetricWriter:
  """TensorBoard scalars plus a JSON-lines copy (`metrics.jsonl`) in `logdir`.

    Only one process should write (pass `enabled=jax.process_index() == 0`); a disabled
    writer accepts every call and creates no files.
    """

  def __init__(self, logdir: str, enabled: bool = True):
    self.logdir = os.fspath(logdir)
    self.enabled = enabled
    self._events = None
    self._jsonl = None
    if enabled:
      os.makedirs(self.logdir, exist_ok=True)
      self._events = EventFileWriter(self.logdir)
      self._jsonl = open(os.path.join(self.logdir, "metrics.jsonl"), "a")

  def _add_summary(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
    self._events.add_event(event)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """scalars: name -> number (python, numpy or jax scalar)."""
    if not self.enabled:
      return
    scalars = {name: float(value) for name, value in scalars.items()}
    self._add_summary(step,
                      [summary_pb2.Summary.Value(tag=name, simple_value=value) for name, value in scalars.items()])
    # NaN/inf are written as JSON's NaN/Infinity; Python's json reads them back.
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Writes the flattened config to `hparams.json` and as a text summary at step 0."""
    if not self.enabled:
      return
    flat = {key: _json_value(value) for key, value in flatten_dict(hparams).items()}
    with open(os.path.join(self.logdir, "hparams.json"), "w") as f:
      json.dump(flat, f, indent=2, sort_keys=True)
    table = "| name | value |\n| --- | --- |\n" + "".join(
        f"| {key} | {json.dumps(value)} |\n" for key, value in sorted(flat.items()))
    # A text-plugin summary built from protos, since text.summary.pb imports TensorFlow.
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING,
                                    string_val=[table.encode("utf-8")],
                                    tensor_shape=tensor_shape_pb2.TensorShapeProto())
    metadata = text_metadata.create_summary_metadata(display_name="hparams", description="flattened config")
    self._add_summary(0, [summary_pb2.Summary.Value(tag="hparams/text_summary", metadata=metadata, tensor=tensor)])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: name -> [H, W, C] uint8 (C in {1, 3, 4}), e.g. from `image_grid`."""
    if not self.enabled:
      return
    values = []
    for name, image in images.items():
      image = np.asarray(image)
      if image.ndim == 2:
        image = image[..., None]
      height, width, channels = image.shape
      values.append(
          summary_pb2.Summary.Value(tag=name,
                                    image=summary_pb2.Summary.Image(height=height,
                                                                    width=width,
                                                                    colorspace=channels,
                                                                    encoded_image_string=_png_bytes(image))))
    self._add_summary(step, values)

  def flush(self) -> None:
    if not self.enabled:
      return
    self._events.flush()
    self._jsonl.flush()

  def close(self) -> None:
    if not self.enabled or self._events is None:
      return
    self._events.close()
    self._jsonl.close()
    self._events = None
    self.enabled = False

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def image_grid(images: np.ndarray, ncols: int, pad_value: int = 255) -> np.ndarray:
  """Tiles images into one picture.

    images: [N, H, W, C] float in [-1, 1] (clipped). Returns uint8
    [rows * (H + 1) + 1, ncols * (W + 1) + 1, C] with rows = ceil(N / ncols), 1-px
    `pad_value` borders around every tile; missing tiles at the end are `pad_value`.
    Tile i sits at row i // ncols, column i % ncols. C = 1 stays one channel.
    """
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got {images.shape}")
  n, h, w, c = images.shape
  ncols = max(1, min(ncols, n)) if n else max(1, ncols)
  nrows = max(1, math.ceil(n / ncols))
  pixels = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  grid = np.full((nrows * (h + 1) + 1, ncols * (w + 1) + 1, c), pad_value, np.uint8)
  for i in range(n):
    row, col = divmod(i, ncols)
    top, left = 1 + row * (h + 1), 1 + col * (w + 1)
    grid[top:top + h, left:left + w] = pixels[i]
  return grid


def save_image_grid(path: str, images: np.ndarray, ncols: int, upscale: int | None = 1) -> np.ndarray:
  """Writes `image_grid(images, ncols)` as a PNG; returns the (upscaled) uint8 grid.

    upscale: integer nearest-neighbour factor; None picks the smallest factor that makes
    the picture at least 256 px wide (8x8 digits are unreadable at 1x).
    """
  grid = image_grid(images, ncols)
  if upscale is None:
    upscale = max(1, math.ceil(256 / grid.shape[1]))
  if upscale > 1:
    grid = np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  _to_pil(grid).save(path, format="PNG")
  return grid


def format_duration(seconds: float) -> str:
  """62 -> '1m02s', 3725 -> '1h02m05s', 9 -> '9s'."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(max(0.0, seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def _format_metric(value: Any) -> str:
  value = float(value)
  if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
    return f"{value:.3e}"
  return f"{value:.4f}"


class ProgressReporter:
  """Console progress line, e.g.

        distill round 2 step 150/1000 (15.0%) | loss 0.0123 | 480 img/s | elapsed 1m02s | ETA 3m10s

    Call `update(step, metrics)` after every step (step counts completed steps, 1..N);
    a line is printed when `every_seconds` have passed since the last one, every
    `every_steps` steps if given, and at the last step. Throughput and ETA are measured
    from the first `update` on, so the first, compile-heavy step does not skew them.

    Args:
      total_steps: N.
      prefix: what is running, e.g. 'distill round 2'.
      batch_size: examples per step; gives img/s (otherwise steps/s).
      every_seconds, every_steps: print cadence (either may be None).
      clock: returns seconds; injectable for tests.
      print_fn: where lines go.
    """

  def __init__(self,
               total_steps: int,
               *,
               prefix: str = "",
               batch_size: int | None = None,
               every_seconds: float | None = 10.0,
               every_steps: int | None = None,
               clock: Callable[[], float] = time.monotonic,
               print_fn: Callable[[str], Any] = print):
    self.total_steps = int(total_steps)
    self.prefix = prefix
    self.batch_size = batch_size
    self.every_seconds = every_seconds
    self.every_steps = every_steps
    self._clock = clock
    self._print = print_fn
    self._start_time = clock()
    self._first_step = None  # (step, time) of the first update: the throughput origin
    self._last_print_time = None

  def rate(self, step: int, now: float) -> float | None:
    """Steps per second since the first update, or None before there is an interval."""
    if self._first_step is None:
      return None
    first_step, first_time = self._first_step
    if step <= first_step or now <= first_time:
      return None
    return (step - first_step) / (now - first_time)

  def format_line(self, step: int, metrics: Mapping[str, Any] | None, now: float) -> str:
    percent = 100.0 * step / self.total_steps if self.total_steps else 100.0
    head = f"{self.prefix} " if self.prefix else ""
    parts = [f"{head}step {step}/{self.total_steps} ({percent:.1f}%)"]
    for name, value in (metrics or {}).items():
      parts.append(f"{name} {_format_metric(value)}")
    rate = self.rate(step, now)
    if rate is not None:
      if self.batch_size:
        parts.append(f"{rate * self.batch_size:.0f} img/s")
      else:
        parts.append(f"{rate:.2f} steps/s")
    parts.append(f"elapsed {format_duration(now - self._start_time)}")
    if rate is not None:
      parts.append(f"ETA {format_duration((self.total_steps - step) / rate)}")
    else:
      parts.append("ETA ?")
    return " | ".join(parts)

  def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> str | None:
    """Records that `step` steps are done; returns the printed line, or None."""
    now = self._clock()
    if self._first_step is None:
      self._first_step = (step, now)
    due = step >= self.total_steps or self._last_print_time is None
    if self.every_steps and step % self.every_steps == 0:
      due = True
    if (self.every_seconds is not None and self._last_print_time is not None and
        now - self._last_print_time >= self.every_seconds):
      due = True
    if not due:
      return None
    self._last_print_time = now
    line = self.format_line(step, metrics, now)
    self._print(line)
    return line
