"""What the trainer writes for people: TensorBoard scalars/images, metrics.jsonl, PNG grids,
and a console progress line.

TensorBoard event files are written with the `tensorboard` package alone (its record framing and protos);
TensorFlow is not needed.

Every file goes through `etils.epath`, so a workdir may be local or an object store (gs://bucket/run; GCS needs
`gcsfs`, or TensorFlow, installed for epath). Whole files that a rerun reads back are written atomically
(`atomic_write`: a temporary file in the same directory, renamed into place), so a killed run leaves the old
file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import socket
import time
import uuid
from typing import IO, Any, Callable, Mapping

import numpy as np
from etils import epath
from PIL import Image

from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.record_writer import RecordWriter


# --- files, local or in an object store ----------------------------------------------------------------------


def is_url(path) -> bool:
  """Whether `path` names an object-store location (gs://bucket/x, s3://…) rather than a local file."""
  return "://" in os.fspath(path)


def abspath(path: str) -> str:
  """os.path.abspath for a local path; a URL as it is (abspath would make 'gs://b/x' a local '<cwd>/gs:/b/x')."""
  return path if is_url(path) else os.path.abspath(path)


def os_error_line(e: BaseException, path: str | None = None) -> str:
  """A failed file operation in one line naming the file: 'the disk is full' first for ENOSPC (which Orbax and
  tensorstore bury in long messages), then the file and the system's words."""
  import errno as errno_lib
  text = str(e)
  where = getattr(e, "filename", None) or path
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  what = (getattr(e, "strerror", None) or (lines[0][:200] if lines else type(e).__name__))
  full = (getattr(e, "errno", None) == errno_lib.ENOSPC or "No space left on device" in text
          or "os_error_code='28'" in text)
  return f"{'the disk is full: ' if full else ''}{where or 'a file'}: {type(e).__name__}: {what}"


def atomic_write(path: str, write_fn: Callable[[IO], Any], mode: str = "wb") -> None:
  """Writes `path` whole or not at all: write_fn(f) fills a temporary file next to it (opened with `mode`,
  'wb' or 'w'), which is then renamed over `path`. If write_fn raises, the temporary file is removed, the
  previous `path` (if any) is left as it was, and the error propagates. Creates the parent directory."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    with tmp.open(mode) as f:
      write_fn(f)
    tmp.replace(target)
  except BaseException as e:
    with contextlib.suppress(Exception):
      tmp.unlink(missing_ok=True)
    if isinstance(e, OSError) and not e.filename and e.errno:  # a failed write or flush names no file: this one
      raise OSError(e.errno, e.strerror, os.fspath(path)) from e
    raise


def atomic_write_bytes(path: str, data: bytes) -> None:
  """`data` to `path`, atomically (`atomic_write`)."""
  atomic_write(path, lambda f: f.write(data), "wb")


def atomic_write_text(path: str, text: str) -> None:
  """`text` (UTF-8) to `path`, atomically (`atomic_write`)."""
  atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_json(path: str, value: Any, **dump_kwargs) -> None:
  """json.dump(value, **dump_kwargs) to `path`, atomically: a value that fails to serialise part-way leaves
  the previous file."""
  atomic_write(path, lambda f: json.dump(value, f, **dump_kwargs), "w")


def npz_bytes(**arrays) -> bytes:
  """np.savez(**arrays) as bytes (serialised in memory, so a failure writes nothing)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


@contextlib.contextmanager
def read_npz(path: str, max_bytes: int | None = None):
  """`with read_npz(path) as data:` the arrays of an .npz file at a local path or a URL (`data.files`, `data[k]`),
  read as untrusted input by `npz_arrays.read_npz_arrays`: no pickles, sizes checked against the file and
  `max_bytes` before anything is allocated; ValueError (one line) for a file that is not such an .npz."""
  from distill import npz_arrays
  with epath.Path(path).open("rb") as f:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    data = npz_arrays.read_npz_arrays(f, size, max_bytes)
  yield data


def read_json(path: str) -> Any:
  return json.loads(epath.Path(path).read_text())


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


_EVENT_FILE_IDS = itertools.count()


class EventFile:
  """One TensorBoard event file in `logdir` (local or URL), written through epath: what tensorboard's
  EventFileWriter writes (the same name pattern, version event and record framing), synchronously, flushed
  every `flush_secs` and on flush()/close(). (EventFileWriter opens files with tensorboard's own gfile, which
  reaches object stores only through TensorFlow or fsspec, and would bypass epath.) In an object store the
  events become visible when the file is flushed or closed, as the store's client allows."""

  def __init__(self, logdir: str, flush_secs: float = 120.0):
    name = "events.out.tfevents.%010d.%s.%s.%s" % (time.time(), socket.gethostname(), os.getpid(),
                                                  next(_EVENT_FILE_IDS))
    self.path = os.path.join(os.fspath(logdir), name)
    self._stack = contextlib.ExitStack()  # epath's TensorFlow backend opens files as context managers
    self._file = self._stack.enter_context(epath.Path(self.path).open("wb"))
    self._records = RecordWriter(self._file)
    self._flush_secs = flush_secs
    self._last_flush = time.monotonic()
    self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2",
                                   source_metadata=event_pb2.SourceMetadata(writer="distill.writers")))
    self.flush()

  def add_event(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())
    if time.monotonic() - self._last_flush >= self._flush_secs:
      self.flush()

  def flush(self) -> None:
    self._file.flush()
    self._last_flush = time.monotonic()

  def close(self) -> None:
    self._stack.close()


def _open_for_append(path: str):
  """(file opened to append text, ExitStack closing it). Object stores cannot append: there the file is
  rewritten, its old content first (it becomes visible when closed)."""
  stack = contextlib.ExitStack()
  p = epath.Path(path)
  if not is_url(path):
    return stack.enter_context(p.open("a")), stack
  previous = p.read_text() if p.exists() else ""
  f = stack.enter_context(p.open("w"))
  f.write(previous)
  return f, stack


class MetricWriter:
  """TensorBoard scalars plus a JSON-lines copy (`metrics.jsonl`) in `logdir` (a local path or a URL).

    Only one process should write (pass `enabled=jax.process_index() == 0`); a disabled
    writer accepts every call and creates no files.
    """

  def __init__(self, logdir: str, enabled: bool = True):
    self.logdir = os.fspath(logdir)
    self.enabled = enabled
    self._events = None
    self._jsonl = None
    if enabled:
      epath.Path(self.logdir).mkdir(parents=True, exist_ok=True)
      self._events = EventFile(self.logdir)
      self._jsonl, self._jsonl_stack = _open_for_append(os.path.join(self.logdir, "metrics.jsonl"))

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
    atomic_write_json(os.path.join(self.logdir, "hparams.json"), flat, indent=2, sort_keys=True)
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
    self._jsonl_stack.close()
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


def save_image_grid(path: str, images: np.ndarray, ncols: int, upscale: int | None = 1, *,
                    row_labels=None, col_labels=None, title: str | None = None) -> np.ndarray:
  """Writes `image_grid(images, ncols)` as a PNG; returns the (upscaled) uint8 grid, captions included.

    upscale: integer nearest-neighbour factor; None picks the smallest factor that makes
    the picture at least 256 px wide (8x8 digits are unreadable at 1x).
    row_labels / col_labels: a caption per grid row / column (`label_grid`); title: a line above it all.
    """
  grid = image_grid(images, ncols)
  if upscale is None:
    upscale = max(1, math.ceil(256 / grid.shape[1]))
  if upscale > 1:
    grid = np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)
  if row_labels is not None or col_labels is not None or title:
    n = len(images)
    cols = max(1, min(ncols, n)) if n else max(1, ncols)
    grid = label_grid(grid, math.ceil(n / cols) if n else 1, cols, row_labels, col_labels, title)
  atomic_write_bytes(os.fspath(path), _png_bytes(grid))  # creates the directory
  return grid


def label_grid(grid: np.ndarray, nrows: int, ncols: int, row_labels=None, col_labels=None,
               title: str | None = None) -> np.ndarray:
  """`grid` [H, W, C] uint8 (an `image_grid` of nrows × ncols tiles, any upscale) with a caption left of each
  row, above each column, and a title line, black on white -> [H', W', 3] uint8 (captions need colour-free RGB
  only so that grey grids stay readable). ValueError when a label list does not match the tiles."""
  from PIL import Image, ImageDraw, ImageFont
  for name, labels, n in (("row_labels", row_labels, nrows), ("col_labels", col_labels, ncols)):
    if labels is not None and len(labels) != n:
      raise ValueError(f"{name} has {len(labels)} entries for {n} grid {name[:3]}s")
  font = ImageFont.load_default(size=11)
  pad = 4
  def width(text):
    return int(math.ceil(font.getlength(str(text))))
  left = (max(width(t) for t in row_labels) + 2 * pad) if row_labels is not None else 0
  line = 14
  top = (line + pad if col_labels is not None else 0) + (line + pad if title else 0)
  rgb = grid if grid.shape[-1] == 3 else np.repeat(grid[..., :1], 3, axis=-1)
  canvas = Image.new("RGB", (rgb.shape[1] + left, rgb.shape[0] + top), "white")
  canvas.paste(Image.fromarray(rgb), (left, top))
  draw = ImageDraw.Draw(canvas)
  tile_h, tile_w = rgb.shape[0] / nrows, rgb.shape[1] / ncols
  if title:
    draw.text((pad, pad // 2), str(title), fill="black", font=font)
  if col_labels is not None:
    y = top - line - pad // 2
    for j, text in enumerate(col_labels):
      draw.text((left + (j + 0.5) * tile_w - width(text) / 2, y), str(text), fill="black", font=font)
  if row_labels is not None:
    for i, text in enumerate(row_labels):
      draw.text((pad, top + (i + 0.5) * tile_h - line / 2), str(text), fill="black", font=font)
  return np.asarray(canvas)


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
    if step >= self.total_steps:  # done, even when this is the first update (a stage that logs only at its end)
      parts.append("ETA 0s")
    elif rate is not None:
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
