"""Image sources behind one interface, and deterministic per-host batches.

`make_source(config.data, split)` returns a finite, random-access `Source`
whose examples are `{'image': float32 [H, W, C] in [-1, 1], 'label': int32}`
(the 'mixture' source alone is unclipped). `Batches` turns a source into an
endless stream of fixed-shape batches in which batch k depends only on
(seed, k), so a run resumed at step k sees exactly what an uninterrupted run
would have, and each host reads only its own rows. TFDS sources are read
through grain, ahead of the trainer (`ReadAhead`: background threads, or
worker processes with data.num_workers > 0); in-memory sources are read in the
calling thread. Either way batch k is the same.

Sources:
  digits      scikit-learn's bundled 8x8 digits (offline, tiny: for smoke tests).
  cifar10     TFDS 'cifar10', read with `tfds.data_source` (array_record).
  imagenet64  TFDS 'imagenet_resized/64x64', likewise; test split = 'validation'.
  imagenet2012  TFDS 'imagenet2012' (full-size images; test split = 'validation'), each image center-cropped
              and resized to data.image_size as ADM prepares ImageNet 256 (`center_crop_resize`).
  fashion_mnist  Fashion-MNIST (60,000 train + 10,000 test, 28x28x1, 10 classes) from
              the four standard IDX files (`*-ubyte.gz`) in data.data_dir (default: the
              Debian package dataset-fashion-mnist's /usr/share/datasets/fashion-mnist),
              or TFDS 'fashion_mnist' prepared under data.data_dir when the IDX files are
              not there. At image_size 32 the 28x28 images are padded with the
              background (-1) by 2 pixels a side, not resized.
  npz         a user file with `images` uint8 [N, H, W, C] and `labels` int [N].
  image_text  a user directory of captioned images (data.path): one class, each row's caption read through
              the source's `captions(indices)`; center-cropped and resized when read (distill/image_text.py).
  mixture     a Gaussian mixture with known means, so the exact denoiser is
              available to tests.

Images whose native size differs from `image_size` are resized bilinearly
(antialiased when shrinking): digits once at load, the others per batch, so
large uint8 sets stay compact in memory.

TFDS datasets are never downloaded or built here: preparing them needs
TensorFlow (TFDS encodes images with it), and several hosts building into one
data_dir would race. An unprepared dataset is a `DataError` that says what to run.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import operator
import os
import sys
import threading
import weakref

import numpy as np

NAMES = ("digits", "cifar10", "imagenet64", "imagenet2012", "npz", "mixture", "fashion_mnist", "image_text")
SPLITS = ("train", "test")

# Digits: a fixed permutation of the 1797 examples; its last 297 (~1/6) are 'test'.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_SIZE = 297
# npz without test arrays: the last 10% of a fixed permutation (seed 0) is 'test';
# permuting first keeps the split representative when the file is sorted by class.
NPZ_SPLIT_SEED = 0
NPZ_TEST_FRACTION = 0.1

# name -> (TFDS builder, TFDS split served as 'test', native [H, W, C], classes).
_TFDS = {
    "cifar10": ("cifar10", "test", (32, 32, 3), 10),
    "imagenet64": ("imagenet_resized/64x64", "validation", (64, 64, 3), 1000),
    "imagenet2012": ("imagenet2012", "validation", (None, None, 3), 1000),  # any size: center_crop_resize
    "fashion_mnist": ("fashion_mnist", "test", (28, 28, 1), 10),
}

# Fashion-MNIST: where Debian's `dataset-fashion-mnist` installs it, and its IDX files per split
# (images, labels), each read as NAME.gz or, uncompressed, NAME.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_SIZE = 28
_IMAGENET64_FILES = (
    "Imagenet64_train_part1_npz.zip",
    "Imagenet64_train_part2_npz.zip",
    "Imagenet64_val_npz.zip",
)


class DataError(ValueError):
  """A data config or file problem, described in one line the user can act on."""


# ----------------------------------------------------------------------------
# Pure array helpers.


def uint8_to_unit_range(images: np.ndarray) -> np.ndarray:
  """images: uint8 [..., C] in 0..255 -> float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
  """images: float32 [B, H, W, C] -> float32 [B, size, size, C], bilinear.

    Runs on the CPU device: this is input-pipeline work and must not queue
    behind (or allocate on) the accelerator the model is training on.
    Non-square inputs are stretched to square.
    """
  b, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  import jax  # Deferred: only resizing sources pay for it.

  with jax.default_device(jax.devices("cpu")[0]):
    out = jax.image.resize(
        jax.numpy.asarray(images, jax.numpy.float32),
        (b, size, size, c),
        method="bilinear",
        antialias=True,
    )
  # Bilinear weights are convex, so only float rounding can leave [-1, 1].
  return np.clip(np.asarray(out), -1.0, 1.0)


# ----------------------------------------------------------------------------
# Sources.


@dataclasses.dataclass(frozen=True)
class ReadAhead:
  """How `Batches` reads a source ahead of the trainer, through grain.

    num_workers: worker processes, each reading whole host batches (steps
      w, w + num_workers, ... for worker w); 0 reads in this process, in
      background threads.
    prefetch: host batches read ahead (per worker with num_workers > 0);
      0 with num_workers = 0 reads each batch when it is asked for.
    """

  num_workers: int = 0
  prefetch: int = 2


class Source:
  """Finite random-access source of {'image': [H, W, C] float32, 'label': int32}.

    Subclasses set `image_shape` (H, W, C), `num_classes` and `_length`, and
    implement `get_batch`; single items go through the same path so the two
    can never disagree. `read_ahead` None (in-memory sources): `Batches`
    reads in the calling thread; a `ReadAhead`: through grain.
    """

  image_shape: tuple[int, int, int]
  num_classes: int
  _length: int
  read_ahead: ReadAhead | None = None

  def __len__(self) -> int:
    return self._length

  def get_batch(self, indices: np.ndarray) -> dict:
    """indices: int [B] in [0, len) -> {'image': float32 [B, H, W, C], 'label': int32 [B]}."""
    raise NotImplementedError

  def __getitem__(self, i: int) -> dict:
    i = operator.index(i)
    n = len(self)
    if not -n <= i < n:
      # IndexError (not DataError) keeps the sequence protocol working.
      raise IndexError(f"index {i} out of range for a source of {n} examples")
    batch = self.get_batch(np.asarray([i % n], np.int64))
    return {"image": batch["image"][0], "label": batch["label"][0]}


class ArraySource(Source):
  """In-memory source.

    images: [N, h, w, C], uint8 in 0..255 (scaled on read, so large sets stay
      1 byte/pixel) or float32 already in model range.
    labels: int [N] in [0, num_classes).
    image_size: output H = W; other native sizes are resized per batch.
    """

  def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, image_size: int):
    self._images = images
    self._labels = np.asarray(labels, np.int32)
    self._length = len(images)
    self._image_size = image_size
    self.image_shape = (image_size, image_size, images.shape[-1])
    self.num_classes = num_classes

  def get_batch(self, indices: np.ndarray) -> dict:
    indices = np.asarray(indices, np.int64)
    images = self._images[indices]
    if images.dtype == np.uint8:
      images = uint8_to_unit_range(images)
    return {
        "image": resize_images(images.astype(np.float32, copy=False), self._image_size),
        "label": self._labels[indices],
    }


class MixtureSource(ArraySource):
  """Samples of a Gaussian mixture, one isotropic component per class.

    means: float32 [K, H, W, C]; std: the per-component standard deviation.
    With these a test can write the exact denoiser E[x | z_t] in closed form.
    """

  def __init__(self, images, labels, means: np.ndarray, std: float):
    super().__init__(images, labels, num_classes=len(means), image_size=images.shape[1])
    self.means = means
    self.std = std


class TfdsSource(Source):
  """A TFDS random-access data source; records are decoded one at a time.

    records: a sequence of {'image': uint8 [h, w, C], 'label': int} as returned
      by `tfds.data_source` (picklable, so worker processes can read it).
    read_ahead: how `Batches` reads it (data.num_workers, data.prefetch).
    center_crop: records of varying sizes (ImageNet): each is `center_crop_resize`d; else all share one shape and
      are resized together (bilinear, stretched to square).
    """

  def __init__(self, records, num_classes: int, image_size: int, channels: int,
               read_ahead: ReadAhead = ReadAhead(), center_crop: bool = False):
    self.center_crop = center_crop
    self._records = records
    self._length = len(records)
    self._image_size = image_size
    self.image_shape = (image_size, image_size, channels)
    self.num_classes = num_classes
    self.read_ahead = read_ahead

  def get_batch(self, indices: np.ndarray) -> dict:
    # Item by item rather than `__getitems__`: the latter is broken under
    # `tfds.testing.mock_data` (4.9.10), and decoding dominates anyway.
    records = [self._records[int(i)] for i in np.asarray(indices)]
    labels = np.asarray([r["label"] for r in records], np.int32)
    if self.center_crop:  # images of any size: each cropped and resized on its own before they are stacked
      images = np.stack([center_crop_resize(r["image"], self._image_size) for r in records])
      return {"image": uint8_to_unit_range(images), "label": labels}
    images = uint8_to_unit_range(np.stack([r["image"] for r in records]))
    return {"image": resize_images(images, self._image_size), "label": labels}


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [h, w, C] → uint8 [size, size, C]: the ImageNet preprocessing of ADM (Dhariwal & Nichol 2021,
  `center_crop_arr`), whose reference batches ImageNet FIDs are computed against and which LDM follows: halve with
  a box filter while the short side is at least 2·size, scale the short side to `size` (bicubic), then take the
  central size×size square."""
  from PIL import Image
  squeeze = image.ndim == 3 and image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  while min(pil.size) >= 2 * size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = size / min(pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  arr = np.asarray(pil)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  arr = arr[top:top + size, left:left + size]
  return arr[..., None] if squeeze else arr


# ----------------------------------------------------------------------------
# Config -> source.


def _field(config, name: str, why: str):
  """Returns config.<name>, or raises a DataError naming it and who needs it."""
  if name not in config:
    raise DataError(f"data.{name} is missing; it is required for {why}")
  return config[name]


def _positive_int(config, name: str, why: str) -> int:
  value = _field(config, name, why)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise DataError(f"data.{name}={value!r} must be a positive integer")
  return int(value)


def _non_negative_int(config, name: str, default: int) -> int:
  value = config.get(name, default)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise DataError(f"data.{name}={value!r} must be an integer >= 0")
  return int(value)


def _expect(config_value, native, field: str, source: str):
  if config_value != native:
    raise DataError(f"data.{field}={config_value} but {source} has {field}={native}; set data.{field}={native}")


def make_source(config, split: str = "train") -> Source:
  """Builds the source named by `config.name` (the config's `data` section).

    split: 'train' | 'test' (TFDS ImageNet serves 'validation' as 'test').
    """
  name = _field(config, "name", "every source")
  if name not in NAMES:
    raise DataError(f"data.name={name!r} is not one of {', '.join(map(repr, NAMES))}")
  if split not in SPLITS:
    raise DataError(f"split={split!r} is not one of {', '.join(map(repr, SPLITS))}")
  why = f"name={name!r}"
  image_size = _positive_int(config, "image_size", why)
  channels = _positive_int(config, "channels", why)
  num_classes = _positive_int(config, "num_classes", why)

  if name == "digits":
    _expect(channels, 1, "channels", "digits")
    _expect(num_classes, 10, "num_classes", "digits")
    images, labels = load_digits(split, image_size)
    return ArraySource(images, labels, num_classes, image_size)
  if name == "mixture":
    return make_mixture(
        image_shape=(image_size, image_size, channels),
        num_classes=num_classes,
        num_examples=_positive_int(config, "num_examples", why),
        seed=_field(config, "seed", why),
        scale=_field(config, "mixture_scale", why),
        std=_field(config, "mixture_std", why),
        split=split,
    )
  if name == "npz":
    path = _field(config, "path", why)
    images, labels = load_npz(path, split, channels, num_classes)
    return ArraySource(images, labels, num_classes, image_size)
  if name == "image_text":
    from distill import image_text
    return image_text.make_image_text_source(config, split)
  if name == "fashion_mnist":
    _expect(channels, 1, "channels", name)
    _expect(num_classes, 10, "num_classes", name)
    images, labels = load_fashion_mnist(split, config.get("data_dir", "") or "")
    return ArraySource(pad_to(images, image_size), labels, num_classes, image_size)
  tfds_name, test_split, (_, _, native_channels), native_classes = _TFDS[name]
  _expect(channels, native_channels, "channels", name)
  _expect(num_classes, native_classes, "num_classes", name)
  read_ahead = ReadAhead(_non_negative_int(config, "num_workers", 0), _non_negative_int(config, "prefetch", 2))
  data_dir = config.get("data_dir", "") or ""
  records = open_tfds(name, "train" if split == "train" else test_split, data_dir)
  return TfdsSource(records, num_classes, image_size, channels, read_ahead,
                    center_crop=_TFDS[name][2][0] is None)


def load_digits(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """-> images float32 [N, image_size, image_size, 1] in [-1, 1], labels int32 [N].

    N is 1500 for 'train' and 297 for 'test'; the split is fixed forever.
    """
  from sklearn.datasets import load_digits as sklearn_digits

  digits = sklearn_digits()
  order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(digits.target))
  rows = order[:-DIGITS_TEST_SIZE] if split == "train" else order[-DIGITS_TEST_SIZE:]
  images = digits.images[rows, :, :, None].astype(np.float32) / 8.0 - 1.0  # 0..16 -> [-1, 1]
  return resize_images(images, image_size), digits.target[rows].astype(np.int32)


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
  """images: [N, h, w, C] uint8 -> [N, size, size, C], padded evenly with 0 (background; -1 once scaled) when
  size exceeds h and w by an even margin; returned unchanged otherwise (ArraySource resizes them on read)."""
  _, h, w, _ = images.shape
  dh, dw = size - h, size - w
  if dh <= 0 or dw <= 0 or dh % 2 or dw % 2:
    return images
  return np.pad(images, ((0, 0), (dh // 2, dh // 2), (dw // 2, dw // 2), (0, 0)))


# IDX element types (the third byte of the magic number) -> numpy big-endian dtype.
_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (LeCun's MNIST format; gzip-compressed when `path` ends in .gz) -> array of its dims.

    Header: bytes 0-1 zero, byte 2 the element type (0x08 uint8, …), byte 3 the number of dims d, then d
    big-endian uint32 sizes, then the elements row-major. Raises DataError (one line naming the file) for a
    bad magic number, a truncated or corrupt file, or a size that does not match the header.
    """
  import gzip
  import zlib
  try:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:  # a truncated gzip is EOFError, a corrupt one BadGzipFile/zlib.error
    raise DataError(f"{path}: not a readable IDX file ({type(e).__name__}: {e})") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
    raise DataError(f"{path}: bad IDX magic number {raw[:4].hex() or '(empty file)'}; "
                    f"expected 0000TTDD (TT: element type in {sorted(f'{t:02x}' for t in _IDX_TYPES)}, DD: dims)")
  dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes; {ndim} dims need {header})")
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  if len(raw) != expected:
    raise DataError(f"{path}: {len(raw)} bytes but its IDX header (dims {dims}, {dtype}) needs {expected}"
                    f"{' (truncated)' if len(raw) < expected else ''}")
  return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(directory: str, name: str) -> str | None:
  for candidate in (name + ".gz", name):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def load_fashion_mnist(split: str, data_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
  """-> images uint8 [N, 28, 28, 1] in 0..255, labels int32 [N] in [0, 10); N = 60,000 train, 10,000 test.

    data_dir: '' = FASHION_MNIST_DIR (Debian's `dataset-fashion-mnist`). Reads the split's two IDX files
    there; when they are absent and TFDS 'fashion_mnist' is prepared under data_dir, reads that instead.
    A missing directory or missing files is a DataError saying what to install.
    """
  directory = data_dir or FASHION_MNIST_DIR
  field = f"data.data_dir={data_dir!r}" if data_dir else f"{FASHION_MNIST_DIR} (data.data_dir='')"
  install = f"install it with `apt-get install {FASHION_MNIST_PACKAGE}` (it puts the IDX files in {FASHION_MNIST_DIR})"
  if not os.path.isdir(directory):
    raise DataError(f"fashion_mnist: {field} does not exist; {install}, or set data.data_dir to a directory "
                    f"with {', '.join(n + '.gz' for n in FASHION_MNIST_FILES['train'])} and the t10k files")
  image_name, label_name = FASHION_MNIST_FILES[split]
  image_path, label_path = _find_idx(directory, image_name), _find_idx(directory, label_name)
  if image_path is None or label_path is None:
    if os.path.isdir(os.path.join(directory, "fashion_mnist")):  # TFDS data_dir/<builder>/<version>/
      return _fashion_mnist_from_tfds(split, directory)
    missing = [n + ".gz" for n, p in ((image_name, image_path), (label_name, label_path)) if p is None]
    raise DataError(f"fashion_mnist: {field} has no {' or '.join(missing)} (nor TFDS fashion_mnist); {install}")
  return _cached_idx_pair(image_path, label_path, *_stamp(image_path), *_stamp(label_path))


def _stamp(path: str) -> tuple[int, float]:
  st = os.stat(path)
  return st.st_size, st.st_mtime


@functools.lru_cache(maxsize=4)
def _cached_idx_pair(image_path: str, label_path: str, *stamps) -> tuple[np.ndarray, np.ndarray]:
  # Keyed on size and mtime too, so a file replaced in place is read again. Callers get read-only arrays.
  del stamps
  images, labels = read_idx(image_path), read_idx(label_path)
  if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (FASHION_MNIST_SIZE,) * 2:
    raise DataError(f"{image_path}: IDX images of dims {images.shape} ({images.dtype}); "
                    f"expected uint8 [N, {FASHION_MNIST_SIZE}, {FASHION_MNIST_SIZE}]")
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{label_path}: IDX labels of dims {labels.shape} ({labels.dtype}); expected integers [N]")
  if len(labels) != len(images):
    raise DataError(f"{label_path}: {len(labels)} labels but {image_path} has {len(images)} images")
  if len(labels) and (labels.min() < 0 or labels.max() > 9):
    raise DataError(f"{label_path}: labels range [{labels.min()}, {labels.max()}]; expected classes 0..9")
  images = images[..., None]
  labels = labels.astype(np.int32)
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def _fashion_mnist_from_tfds(split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  records = open_tfds("fashion_mnist", split, data_dir)
  items = [records[i] for i in range(len(records))]
  images = np.stack([np.asarray(r["image"], np.uint8).reshape(FASHION_MNIST_SIZE, FASHION_MNIST_SIZE, 1)
                     for r in items]) if items else np.zeros((0, 28, 28, 1), np.uint8)
  return images, np.asarray([r["label"] for r in items], np.int32)


def _is_real(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and np.isfinite(value)


def make_mixture(image_shape, num_classes: int, num_examples: int, seed, scale, std, split: str) -> MixtureSource:
  """Samples x = means[y] + std * noise, y balanced over classes (y_i = i mod K).

    Means ~ N(0, scale^2 I) come from rng(seed) and are shared by both splits;
    the samples of each split come from their own stream. Values are not
    clipped to [-1, 1]: the point is a distribution with a known denoiser.
    """
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise DataError(f"data.seed={seed!r} must be a non-negative integer")
  if not _is_real(scale) or scale < 0:
    raise DataError(f"data.mixture_scale={scale!r} must be a number >= 0 (std of the component means)")
  if not _is_real(std) or std <= 0:
    raise DataError(f"data.mixture_std={std!r} must be a number > 0 (std within each component)")
  means = (scale * np.random.default_rng(seed).standard_normal((num_classes, *image_shape))).astype(np.float32)
  rng = np.random.default_rng((seed, SPLITS.index(split) + 1))
  labels = np.arange(num_examples, dtype=np.int32) % num_classes
  images = means[labels] + np.float32(std) * rng.standard_normal((num_examples, *image_shape), np.float32)
  return MixtureSource(images, labels, means, float(std))


def load_npz(path: str, split: str, channels: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Reads and validates a user .npz -> images uint8 [N, H, W, C], labels int32 [N].

    The file holds `images` uint8 [N, H, W, C] and `labels` int [N]; optional
    `test_images`/`test_labels` are the test split, otherwise the test split is
    the last 10% of a fixed permutation of the file. H and W may differ from
    data.image_size (images are resized on read); C must equal data.channels.
    """
  if not path:
    raise DataError(
        "data.path is empty; set data.path to an .npz file with 'images' uint8 [N, H, W, C] and 'labels' int [N]")
  from etils import epath  # local paths and URLs (gs://…) alike
  try:
    found = epath.Path(path).is_file()
  except Exception as e:  # noqa: BLE001 — a URL whose client is missing or cannot reach it
    raise DataError(f"data.path={path!r} cannot be read ({type(e).__name__}: {e})") from e
  if not found:
    raise DataError(f"data.path={path!r} does not exist or is not a file")
  from distill import npz_arrays
  try:  # bounded: each array's header is checked against the file's size and a cap before it is allocated
    with epath.Path(path).open("rb") as f:
      size = f.seek(0, os.SEEK_END)
      f.seek(0)
      arrays = dict(npz_arrays.read_npz_arrays(f, size))
  except Exception as e:  # zip, pickle, format or size errors all mean "not a usable npz".
    raise DataError(f"data.path={path!r} is not a readable .npz file ({type(e).__name__}: {e})") from e

  has_test = "test_images" in arrays or "test_labels" in arrays
  image_key, label_key = ("test_images", "test_labels") if split == "test" and has_test else ("images", "labels")
  for key in ("images", "labels") + (("test_images", "test_labels") if has_test else ()):
    if key not in arrays:
      raise DataError(
          f"data.path={path!r} has no array {key!r} (found {sorted(arrays)}); expected 'images' uint8 [N, H, W, C] and 'labels' int [N], optionally 'test_images'/'test_labels'"
      )
  images = _check_npz_images(arrays[image_key], image_key, path, channels)
  labels = _check_npz_labels(arrays[label_key], label_key, len(images), path, num_classes)

  if not has_test:
    order = np.random.default_rng(NPZ_SPLIT_SEED).permutation(len(images))
    num_test = int(len(images) * NPZ_TEST_FRACTION)
    rows = order[len(images) - num_test:] if split == "test" else order[:len(images) - num_test]
    images, labels = images[rows], labels[rows]
  if len(images) == 0:
    raise DataError(
        f"data.path={path!r} gives an empty {split!r} split ({len(arrays['images'])} examples in 'images'; the test split is the last {NPZ_TEST_FRACTION:.0%} unless 'test_images' is given)"
    )
  return images, labels


def _check_npz_images(images: np.ndarray, key: str, path: str, channels: int) -> np.ndarray:
  if images.dtype != np.uint8:
    raise DataError(f"data.path={path!r}: {key!r} has dtype {images.dtype}; expected uint8 (0..255)")
  if images.ndim != 4:
    raise DataError(f"data.path={path!r}: {key!r} has shape {images.shape}; expected 4-D [N, H, W, C]")
  if 0 in images.shape[1:3]:
    raise DataError(f"data.path={path!r}: {key!r} has shape {images.shape}; images must be at least 1x1 pixels")
  if images.shape[-1] != channels:
    raise DataError(
        f"data.path={path!r}: {key!r} has {images.shape[-1]} channels (shape {images.shape}) but data.channels={channels}"
    )
  return images


def _check_npz_labels(labels: np.ndarray, key: str, n: int, path: str, num_classes: int) -> np.ndarray:
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"data.path={path!r}: {key!r} has dtype {labels.dtype}; expected an integer dtype")
  if labels.shape != (n,):
    raise DataError(f"data.path={path!r}: {key!r} has shape {labels.shape}; expected ({n},), one label per image")
  if n and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(
        f"data.path={path!r}: {key!r} range [{labels.min()}, {labels.max()}] is outside [0, data.num_classes={num_classes})"
    )
  return labels.astype(np.int32)


def open_tfds(name: str, tfds_split: str, data_dir: str):
  """Opens an already prepared TFDS dataset for random access (never downloads).

    name: a key of _TFDS ('cifar10', 'imagenet64', 'imagenet2012', 'fashion_mnist'); tfds_split: a TFDS split name.
    Raises DataError saying how to prepare the data when it is not there.
    """
  import tensorflow_datasets as tfds  # Deferred: 0.5 s, only TFDS sources need it.

  tfds_name = _TFDS[name][0]
  try:
    return tfds.data_source(tfds_name, split=tfds_split, data_dir=data_dir or None, download=False)
  except Exception as e:  # TFDS reports a missing dataset as a file-format error; diagnose ourselves.
    raise DataError(_tfds_missing_message(name, data_dir, e)) from e


def _tfds_missing_message(name: str, data_dir: str, error: Exception) -> str:
  import tensorflow_datasets as tfds

  tfds_name = _TFDS[name][0]
  root = data_dir or tfds.core.constants.get_default_data_dir()
  where = f"data.data_dir={data_dir!r}" if data_dir else f"the default data_dir {root!r} (data.data_dir='')"
  build = f"`tfds build {tfds_name} --data_dir={root} --file_format=array_record`"
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir or None)
    prepared, version_dir, file_format = builder.is_prepared(), builder.data_dir, builder.info.file_format
  except Exception:  # Unusual: report what we know rather than a second traceback.
    prepared, version_dir, file_format = False, os.path.join(root, tfds_name), None
  first_line = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
  if prepared and getattr(file_format, "value", file_format) != "array_record":
    return (f"{name}: {tfds_name} at {version_dir} is stored as {getattr(file_format, 'value', file_format)}, "
            f"but reading without TensorFlow needs array_record: rebuild it with {build} on a machine with TensorFlow, "
            f"or point data.data_dir at an array_record copy")
  if prepared:
    return f"{name}: {tfds_name} at {version_dir} is prepared but could not be opened ({first_line}); check the files or rebuild with {build}"
  if name == "imagenet64":
    return (
        f"imagenet64: {tfds_name} is not prepared under {where}. TFDS cannot fetch it (image-net.org needs a login): "
        f"download {', '.join(_IMAGENET64_FILES)} from https://image-net.org/download-images "
        f"into {os.path.join(root, 'downloads', 'manual')}/, then on a machine with TensorFlow run {build} "
        f"(or set data.data_dir to a directory that already holds {tfds_name} in array_record format)")
  if name == "imagenet2012":
    return (
        f"imagenet2012: {tfds_name} is not prepared under {where}. TFDS cannot fetch it (image-net.org needs a login): "
        "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org/download-images "
        f"into {os.path.join(root, 'downloads', 'manual')}/, then on a machine with TensorFlow run {build} "
        f"(or set data.data_dir to a directory that already holds {tfds_name} in array_record format)")
  return (
      f"{name}: {tfds_name} is not prepared under {where}; run once, on a machine with TensorFlow and network access, "
      f"`pip install tensorflow` then {build} (or set data.data_dir to a directory that already holds {tfds_name} in array_record format)"
  )


# ----------------------------------------------------------------------------
# Batches.


class HostRows:
  """Which source examples host `process_index` reads at each step: the index arithmetic of `Batches`.

    A small picklable object (grain's worker processes receive it), safe to call from several threads.
    """

  def __init__(self, num_examples: int, global_batch_size: int, seed: int, process_index: int,
               process_count: int, drop_remainder: bool):
    self.num_examples = num_examples
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = seed
    self.process_index = process_index
    self.drop_remainder = drop_remainder
    self._permutations: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_permutations")}

  def __setstate__(self, state):
    self.__dict__.update(state, _permutations={}, _lock=threading.Lock())

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._permutations:
        # Two epochs cover a straddling batch (a few more with read-ahead threads).
        if len(self._permutations) >= 4:
          del self._permutations[min(self._permutations)]
        self._permutations[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)
      return self._permutations[epoch]

  def __call__(self, step: int) -> np.ndarray:
    """-> int64 [local_batch_size]: source indices of this host's rows of batch `step`."""
    n = self.num_examples
    rows = self.process_index * self.local_batch_size + np.arange(self.local_batch_size, dtype=np.int64)
    if self.drop_remainder:
      steps_per_epoch = n // self.global_batch_size
      epoch, step_in_epoch = divmod(step, steps_per_epoch)
      return self._permutation(epoch)[step_in_epoch * self.global_batch_size + rows]
    epochs, positions = np.divmod(step * self.global_batch_size + rows, n)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
      in_epoch = epochs == epoch
      indices[in_epoch] = self._permutation(int(epoch))[positions[in_epoch]]
    return indices


class _ReadStep:
  """step -> this host's batch of that step, read from the source (grain's map function; picklable)."""

  def __init__(self, source: Source, rows: HostRows):
    self.source, self.rows = source, rows

  def __call__(self, step: int) -> dict:
    return self.source.get_batch(self.rows(int(step)))


# Steps a stream covers: effectively endless (grain's range needs an end and a length that fits a C ssize_t).
_STREAM_END = 2**62


def grain_stream(source: Source, rows: HostRows, start_step: int, read_ahead: ReadAhead):
  """A grain iterator over this host's batches of steps start_step, start_step + 1, ...

    The batches are `source.get_batch(rows(step))` in step order, read ahead in threads or worker
    processes; its position is `start_step` plus the batches taken from it. Close it when done
    (worker processes and threads stop then)."""
  import grain  # Deferred: only sources read ahead need it.

  dataset = grain.MapDataset.range(start_step, _STREAM_END).map(_ReadStep(source, rows))
  if read_ahead.num_workers == 0:
    threads = read_ahead.prefetch  # each thread reads one whole batch
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)))
  from absl import flags
  if not flags.FLAGS.is_parsed():
    # grain 0.2.18 reads one of its absl flags from a thread when it starts workers, which fails unless the
    # flags were parsed (distill.main parses them; a library caller or a test may not have).
    flags.FLAGS.mark_as_parsed()
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  options = grain.MultiprocessingOptions(num_workers=read_ahead.num_workers,
                                         per_worker_buffer_size=max(read_ahead.prefetch, 1))
  return iter(iter_dataset.mp_prefetch(options, worker_init_fn=_init_worker))


def _init_worker(worker_index: int, worker_count: int):  # noqa: ARG001 — grain's signature
  """Runs first in each grain worker process.

    JAX there (resizing) uses the CPU: a worker that initialised the TPU or GPU backend would contend with
    the trainer for the accelerator. SIGINT and SIGTERM are ignored: a Ctrl-C or a preemption's SIGTERM
    reaches the whole process group, and the trainer, which finishes its step and checkpoints first, may
    still need a batch; it stops the workers itself (grain's close: a stop event, then SIGKILL)."""
  import signal
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_platforms", "cpu")


# Batches whose stream may be open: closed at exit, before the interpreter tears down the modules that grain's
# own cleanup (run when a stream is garbage-collected) needs. Registered with the first stream, after grain and
# multiprocessing registered theirs, so that it runs before them (atexit runs last-registered first).
_OPEN: "weakref.WeakSet[Batches]" = weakref.WeakSet()


def _close_open_streams():
  for batches in list(_OPEN):
    batches.close()


class Batches:
  """Deterministic batches: batch k depends only on (seed, k), so resuming at step k reproduces an uninterrupted run.

    Each epoch visits the source in the order np.random.default_rng((seed, epoch))
    .permutation(len(source)). Batches never have a partial shape:
      drop_remainder=True: an epoch is len // global_batch_size steps and its
        last len % global_batch_size examples are skipped (epoch = step // steps_per_epoch).
      drop_remainder=False: epochs are concatenated into one stream, so a batch
        may straddle two epochs and every example is seen once per epoch
        (epoch of a row = (step * global_batch_size + row) // len).
    Host p of process_count gets rows [p*b, (p+1)*b) of the global batch,
    b = global_batch_size // process_count, and reads only those.

    Reading: a source with `read_ahead` (TFDS) is read through a grain stream (`grain_stream`) that
    starts at the first step asked for and reads the following steps ahead, in threads or worker
    processes. Asking for the step the stream is at takes its next batch; asking for any other step
    (a resume, a jump) restarts the stream there. Other sources are read in the calling thread. The
    batch of a step is the same either way, as the stream maps the same pure function over the steps.

    `step` is the whole resume state (and the stream's: it holds nothing else): iteration yields
    batch_at(step), step += 1.
    """

  def __init__(
      self,
      source: Source,
      global_batch_size: int,
      seed: int,
      process_index: int = 0,
      process_count: int = 1,
      start_step: int = 0,
      drop_remainder: bool = True,
  ):
    n = len(source)
    if global_batch_size <= 0:
      raise DataError(f"global_batch_size={global_batch_size} must be positive")
    if process_count <= 0 or not 0 <= process_index < process_count:
      raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch_size % process_count:
      raise DataError(f"global_batch_size={global_batch_size} must be divisible by process_count={process_count}")
    if seed < 0:
      raise DataError(f"seed={seed} must be non-negative")
    if start_step < 0:
      raise DataError(f"start_step={start_step} must be non-negative")
    if n == 0 or (drop_remainder and n < global_batch_size):
      raise DataError(
          f"global_batch_size={global_batch_size} exceeds the {n} examples of the source; lower it or use drop_remainder=False"
      )
    self.source = source
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.drop_remainder = drop_remainder
    self.step = start_step
    self.rows = HostRows(n, global_batch_size, seed, process_index, process_count, drop_remainder)
    self._stream = None
    self._stream_step = None  # the step the stream's next batch is of

  def indices_at(self, step: int) -> np.ndarray:
    """-> int64 [local_batch_size]: source indices of this host's rows of batch `step`."""
    if step < 0:
      raise DataError(f"step={step} must be non-negative")
    return self.rows(step)

  def batch_at(self, step: int) -> dict:
    """-> {'image': float32 [local_batch_size, H, W, C], 'label': int32 [local_batch_size]}."""
    if self.source.read_ahead is None:
      return self.source.get_batch(self.indices_at(step))
    if step < 0:
      raise DataError(f"step={step} must be non-negative")
    if self._stream is None or self._stream_step != step:
      self.close()
      self._stream = grain_stream(self.source, self.rows, step, self.source.read_ahead)
      self._stream_step = step
      if not _OPEN:
        atexit.unregister(_close_open_streams)
        atexit.register(_close_open_streams)
      _OPEN.add(self)
    batch = next(self._stream)
    self._stream_step += 1
    if self.source.read_ahead.num_workers:
      # Worker batches arrive in shared memory, freed when their array is; a plain copy frees it now rather
      # than whenever the trainer drops the batch (or at exit, where grain's cleanup fails noisily).
      batch = {key: np.array(value) for key, value in batch.items()}
    return batch

  def close(self):
    """Stops the read-ahead stream (its threads or worker processes), if one runs; the next batch_at starts
    another. Also done when the Batches is garbage-collected."""
    stream, self._stream, self._stream_step = self._stream, None, None
    if stream is not None:
      stream.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 — at interpreter exit grain's modules may already be gone
      pass

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch


# Captions for sample grids; a data set without an entry is captioned by class number.
CLASS_NAMES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "fashion_mnist": ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "boot"),
}


def class_names(name: str) -> tuple[str, ...]:
  """The class names of data set `name` (index = label), or () when it has none (digits: the number is the name)."""
  return CLASS_NAMES.get(name, ())
