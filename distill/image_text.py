"""A user's image-text data set (data.name='image_text', data.path=DIR): the captioned images a text-to-image run
trains on (the guided-distillation paper trains on LAION-5B, App. C.2; any captioned set laid out as below works).

  DIR/**/NAME.{png,jpg,jpeg,webp}   images (any size and mode; read with PIL, converted to RGB, or L when
                                    data.channels=1), searched recursively, in sorted path order
  captions, either
    DIR/captions.jsonl              one JSON object a line, {"file": PATH relative to DIR, "caption": TEXT}
    DIR/**/NAME.txt                 beside each image (UTF-8; surrounding whitespace dropped)
  splits, either
    DIR/train/ and DIR/test/        each a data set as above (captions.jsonl inside each)
    DIR alone                       the last 10 % of a fixed permutation (seed 0) is 'test'

Each image is center-cropped and resized to data.image_size as ADM and LDM prepare ImageNet
(`data.center_crop_resize`: box-filter halving, bicubic, central square), when its batch is read: nothing is
decoded up front, so a set of millions of images opens in the time its listing takes. Rows are
{'image': float32 [S, S, C] in [−1, 1], 'label': 0}: one class, whose null label (1 = data.num_classes) marks the
unconditional rows of classifier-free guidance; `captions(indices)` gives the rows' texts, which the text encoder
turns into each row's condition.

Every problem is one `data.DataError` line naming the file: a missing directory, no images, an image without a
caption, a caption without an image, a malformed captions.jsonl line, an unreadable image or caption. Nothing is
unpickled.
"""
from __future__ import annotations

import json
import os

import numpy as np

from distill import data as data_lib

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CAPTIONS_FILE = "captions.jsonl"
SPLIT_SEED = 0
TEST_FRACTION = 0.1
_MAX_CAPTION_BYTES = 1 << 16


def list_images(directory: str) -> list[str]:
  """Paths relative to `directory` of its images (EXTENSIONS, any case), recursively, sorted."""
  found = []
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in files:
      if name.lower().endswith(EXTENSIONS):
        found.append(os.path.relpath(os.path.join(root, name), directory))
  return sorted(found)


def _read_caption_file(path: str) -> str:
  try:
    with open(path, "rb") as f:
      raw = f.read(_MAX_CAPTION_BYTES + 1)
  except OSError as e:
    raise data_lib.DataError(f"{path}: unreadable caption ({type(e).__name__}: {e})") from None
  if len(raw) > _MAX_CAPTION_BYTES:
    raise data_lib.DataError(f"{path}: a caption longer than {_MAX_CAPTION_BYTES} bytes")
  try:
    return raw.decode("utf-8").strip()
  except UnicodeDecodeError:
    raise data_lib.DataError(f"{path}: caption is not UTF-8 text") from None


def _read_jsonl(path: str, directory: str) -> dict[str, str]:
  """{normalised relative path: caption} of a captions.jsonl."""
  captions = {}
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise data_lib.DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise data_lib.DataError(f"{path}:{number}: not JSON ({e.msg})") from None
    if (not isinstance(row, dict) or not isinstance(row.get("file"), str) or not isinstance(row.get("caption"), str)):
      raise data_lib.DataError(f'{path}:{number}: expected {{"file": "...", "caption": "..."}} with string values')
    file = os.path.normpath(row["file"])
    if os.path.isabs(file) or file.startswith(".."):
      raise data_lib.DataError(f"{path}:{number}: file {row['file']!r} is not inside {directory}")
    if file in captions:
      raise data_lib.DataError(f"{path}:{number}: file {row['file']!r} is captioned twice")
    captions[file] = row["caption"].strip()
  return captions


def read_captioned_images(directory: str) -> tuple[list[str], list[str]]:
  """(image paths relative to `directory`, their captions) of one split's directory (the module docstring)."""
  if not os.path.isdir(directory):
    raise data_lib.DataError(f"data.path={directory!r}: not a directory of captioned images")
  files = list_images(directory)
  jsonl = os.path.join(directory, CAPTIONS_FILE)
  if os.path.isfile(jsonl):
    table = _read_jsonl(jsonl, directory)
    present = set(files)
    for file in files:
      if file not in table:
        raise data_lib.DataError(f"{os.path.join(directory, file)}: image without a caption in {jsonl}")
    for file in table:
      if file not in present:
        raise data_lib.DataError(f"{jsonl}: captions {file!r}, which is not an image in {directory}")
    captions = [table[f] for f in files]
  else:
    captions = []
    for file in files:
      txt = os.path.join(directory, os.path.splitext(file)[0] + ".txt")
      if not os.path.isfile(txt):
        raise data_lib.DataError(f"{os.path.join(directory, file)}: image without a caption (no "
                                 f"{os.path.basename(txt)} beside it, and no {CAPTIONS_FILE} in {directory})")
      captions.append(_read_caption_file(txt))
  if not files:
    raise data_lib.DataError(f"data.path={directory!r}: no images ({', '.join(EXTENSIONS)}) in it")
  return files, captions


def read_image(path: str, size: int, channels: int) -> np.ndarray:
  """uint8 [size, size, channels] of the image file at `path`, center-cropped and resized; DataError (one line
  naming the file) when PIL cannot read it."""
  from PIL import Image
  try:
    with Image.open(path) as image:
      image = image.convert("RGB" if channels == 3 else "L")
      array = np.asarray(image, np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise data_lib.DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
  if array.ndim == 2:
    array = array[..., None]
  return data_lib.center_crop_resize(array, size)


class ImageTextSource(data_lib.Source):
  """The rows of one split (the module docstring): get_batch(indices) → {'image' float32 [B, S, S, C], 'label'
  int32 [B] zeros}; captions(indices) → list of B texts. `files` are absolute paths."""

  def __init__(self, files: list[str], captions: list[str], image_size: int, channels: int,
               read_ahead: data_lib.ReadAhead = data_lib.ReadAhead()):
    if channels not in (1, 3):
      raise data_lib.DataError(f"data.channels={channels}: an image-text data set is read as RGB (3) or grey (1)")
    self.files, self._captions = list(files), list(captions)
    self._length, self._image_size, self._channels = len(self.files), int(image_size), int(channels)
    self.image_shape = (self._image_size, self._image_size, self._channels)
    self.num_classes = 1
    self.read_ahead = read_ahead

  def get_batch(self, indices: np.ndarray) -> dict:
    indices = np.asarray(indices, np.int64)
    images = np.stack([read_image(self.files[int(i)], self._image_size, self._channels) for i in indices]) \
        if len(indices) else np.zeros((0, *self.image_shape), np.uint8)
    return {"image": data_lib.uint8_to_unit_range(images), "label": np.zeros(len(indices), np.int32)}

  def captions(self, indices) -> list[str]:
    return [self._captions[int(i)] for i in np.asarray(indices, np.int64).reshape(-1)]


def split_rows(n: int, split: str) -> np.ndarray:
  """The rows of `split` among n of one directory: a fixed permutation's last 10 % (at least one, none of one
  image) is 'test', the rest 'train', each in ascending order."""
  order = np.random.default_rng(SPLIT_SEED).permutation(n)
  test = int(np.ceil(TEST_FRACTION * n)) if n > 1 else 0
  rows = order[n - test:] if split == "test" else order[:n - test]
  return np.sort(rows)


def make_image_text_source(config, split: str = "train") -> ImageTextSource:
  """The image-text source of config.data (name 'image_text', path, image_size, channels, num_classes = 1)."""
  path = str(config.get("path", "") or "")
  if not path:
    raise data_lib.DataError("data.path is empty; data.name='image_text' reads a directory of captioned images")
  if not os.path.isdir(path):
    raise data_lib.DataError(f"data.path={path!r}: not a directory of captioned images")
  if split not in data_lib.SPLITS:
    raise data_lib.DataError(f"split={split!r} is not one of {', '.join(map(repr, data_lib.SPLITS))}")
  if int(config.get("num_classes", 1)) != 1:
    raise data_lib.DataError(f"data.num_classes={config.get('num_classes')} but an image-text data set has one "
                             "class (captions condition it); set data.num_classes=1")
  image_size, channels = int(config.image_size), int(config.channels)
  read_ahead = data_lib.ReadAhead(int(config.get("num_workers", 0) or 0), int(config.get("prefetch", 2)))
  own = os.path.join(path, split)
  if os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "test")):
    files, captions = read_captioned_images(own)
    return ImageTextSource([os.path.join(own, f) for f in files], captions, image_size, channels, read_ahead)
  files, captions = read_captioned_images(path)
  rows = split_rows(len(files), split)
  if not len(rows):
    raise data_lib.DataError(f"data.path={path!r}: {len(files)} image(s) leave the {split!r} split empty; add "
                             "images or give train/ and test/ subdirectories")
  return ImageTextSource([os.path.join(path, files[i]) for i in rows], [captions[i] for i in rows], image_size,
                         channels, read_ahead)
