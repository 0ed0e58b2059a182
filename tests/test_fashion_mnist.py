"""Fashion-MNIST as a data source (distill/data.py): the real IDX files Debian's dataset-fashion-mnist installs,
tiny IDX files written here (header checks, corrupt and truncated files), the TFDS fallback and the message for
a missing directory."""
import gzip
import os
import struct
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from distill import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fmnist_config(**overrides) -> ml_collections.ConfigDict:
  fields = dict(name="fashion_mnist", image_size=32, channels=1, num_classes=10, data_dir="")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
  header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(">u1" if type_code == 0x08 else ">i4").tobytes()


def write_idx_set(directory, n_train=12, n_test=6, compress=True, seed=0):
  """Tiny Fashion-MNIST-shaped IDX files: images whose border rows are 0 (as the real ones mostly are)."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  out = {}
  for split, n in (("train", n_train), ("test", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for name, array in zip(data.FASHION_MNIST_FILES[split], (images, labels)):
      raw = idx_bytes(array)
      path = os.path.join(directory, name + (".gz" if compress else ""))
      with (gzip.open if compress else open)(path, "wb") as f:
        f.write(raw)
    out[split] = (images, labels)
  return out


def assert_one_line(error_info, *needles):
  message = str(error_info.value)
  assert "\n" not in message, message
  for needle in needles:
    assert needle in message, (needle, message)


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DIR),
                    reason=f"{data.FASHION_MNIST_DIR} absent: `apt-get install {data.FASHION_MNIST_PACKAGE}`")
def test_real_files():
  train = data.make_source(fmnist_config(), "train")
  test = data.make_source(fmnist_config(), "test")
  assert (len(train), len(test)) == (60000, 10000)
  assert train.image_shape == test.image_shape == (32, 32, 1) and train.num_classes == 10
  batch = train.get_batch(np.arange(0, 60000, 97))
  assert batch["image"].shape == (len(batch["label"]), 32, 32, 1) and batch["image"].dtype == np.float32
  assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0  # exact: 0 and 255 scale exactly
  # The 2-pixel frame added around the 28x28 images is background.
  frame = np.ones((32, 32), bool)
  frame[2:30, 2:30] = False
  assert np.all(batch["image"][:, frame, 0] == -1.0)
  # The standard files: the first training labels, 6,000 / 1,000 images of every class.
  assert list(train.get_batch(np.arange(5))["label"]) == [9, 0, 0, 3, 0]
  images, labels = data.load_fashion_mnist("train")
  assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
  assert np.all(np.bincount(labels) == 6000)
  assert np.all(np.bincount(data.load_fashion_mnist("test")[1]) == 1000)


def test_tiny_idx_round_trip_pad_and_resize(tmp_path):
  written = write_idx_set(tmp_path)
  config = fmnist_config(data_dir=str(tmp_path))
  train, test = data.make_source(config, "train"), data.make_source(config, "test")
  assert (len(train), len(test)) == (12, 6)
  batch = train.get_batch(np.arange(12))
  images, labels = written["train"]
  np.testing.assert_array_equal(batch["label"], labels)
  np.testing.assert_allclose(batch["image"][:, 2:30, 2:30, 0], images / 127.5 - 1.0, atol=1e-6)
  assert np.all(batch["image"][:, :2] == -1.0) and np.all(batch["image"][:, :, 30:] == -1.0)
  native = data.make_source(fmnist_config(data_dir=str(tmp_path), image_size=28), "test").get_batch(np.arange(6))
  np.testing.assert_allclose(native["image"][..., 0], written["test"][0] / 127.5 - 1.0, atol=1e-6)
  small = data.make_source(fmnist_config(data_dir=str(tmp_path), image_size=16), "test")
  assert small.get_batch(np.arange(2))["image"].shape == (2, 16, 16, 1)


def test_uncompressed_idx_files_are_read(tmp_path):
  written = write_idx_set(tmp_path, compress=False)
  images, labels = data.load_fashion_mnist("test", str(tmp_path))
  np.testing.assert_array_equal(images[..., 0], written["test"][0])
  np.testing.assert_array_equal(labels, written["test"][1])


def test_read_idx_header(tmp_path):
  path = str(tmp_path / "x.idx")
  array = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
  with open(path, "wb") as f:
    f.write(idx_bytes(array, 0x0C))
  out = data.read_idx(path)
  assert out.shape == (2, 3, 4) and out.dtype == np.int32
  np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("mutate, needles", [
    (lambda raw: b"\x01" + raw[1:], ["bad IDX magic number 01000803"]),
    (lambda raw: raw[:2] + b"\x07" + raw[3:], ["bad IDX magic number 00000703"]),
    (lambda raw: b"", ["bad IDX magic number (empty file)"]),
    (lambda raw: raw[:10], ["truncated IDX header"]),
    (lambda raw: raw[:-5], ["bytes but its IDX header", "(truncated)"]),
    (lambda raw: raw + b"\x00", ["bytes but its IDX header"]),
])
def test_bad_idx_files(tmp_path, mutate, needles):
  write_idx_set(tmp_path)
  path = os.path.join(tmp_path, "train-images-idx3-ubyte.gz")
  with gzip.open(path, "rb") as f:
    raw = f.read()
  with gzip.open(path, "wb") as f:
    f.write(mutate(raw))
  with pytest.raises(data.DataError) as error:
    data.make_source(fmnist_config(data_dir=str(tmp_path)), "train")
  assert_one_line(error, path, *needles)


@pytest.mark.parametrize("damage, needle", [
    (lambda raw: raw[:len(raw) // 2], "EOFError"),          # a truncated download
    (lambda raw: raw[:20] + b"\xff" * 40 + raw[60:], "not a readable IDX file"),  # corrupt deflate stream
    (lambda raw: b"not gzip at all", "BadGzipFile"),
])
def test_truncated_or_corrupt_gzip(tmp_path, damage, needle):
  write_idx_set(tmp_path)
  path = os.path.join(tmp_path, "t10k-images-idx3-ubyte.gz")
  with open(path, "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(damage(raw))
  with pytest.raises(data.DataError) as error:
    data.load_fashion_mnist("test", str(tmp_path))
  assert_one_line(error, path, needle)


def test_wrong_dims_and_mismatched_labels(tmp_path):
  write_idx_set(tmp_path)
  path = os.path.join(tmp_path, "train-images-idx3-ubyte.gz")
  with gzip.open(path, "wb") as f:
    f.write(idx_bytes(np.zeros((12, 32, 32), np.uint8)))
  with pytest.raises(data.DataError) as error:
    data.load_fashion_mnist("train", str(tmp_path))
  assert_one_line(error, path, "(12, 32, 32)", "expected uint8 [N, 28, 28]")
  with gzip.open(path, "wb") as f:
    f.write(idx_bytes(np.zeros((11, 28, 28), np.uint8)))
  with pytest.raises(data.DataError) as error:
    data.load_fashion_mnist("train", str(tmp_path))
  assert_one_line(error, "12 labels but", "has 11 images")
  labels = os.path.join(tmp_path, "t10k-labels-idx1-ubyte.gz")
  with gzip.open(labels, "wb") as f:
    f.write(idx_bytes(np.full((6,), 10, np.uint8)))
  with pytest.raises(data.DataError) as error:
    data.load_fashion_mnist("test", str(tmp_path))
  assert_one_line(error, labels, "classes 0..9")


def test_missing_directory_and_files_say_what_to_install(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(data.DataError) as error:
    data.make_source(fmnist_config(data_dir=missing), "train")
  assert_one_line(error, f"data.data_dir={missing!r} does not exist", "apt-get install dataset-fashion-mnist")
  with pytest.raises(data.DataError) as error:
    data.make_source(fmnist_config(data_dir=str(tmp_path)), "test")
  assert_one_line(error, "has no t10k-images-idx3-ubyte.gz or t10k-labels-idx1-ubyte.gz",
                  "apt-get install dataset-fashion-mnist")
  with pytest.raises(data.DataError) as error:
    data.make_source(fmnist_config(data_dir=str(tmp_path), channels=3), "test")
  assert_one_line(error, "data.channels=3", "channels=1")


def test_tfds_fallback_when_idx_files_are_absent(tmp_path):
  (tmp_path / "fashion_mnist").mkdir()  # where a prepared TFDS fashion_mnist lives under data_dir
  with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
    source = data.make_source(fmnist_config(data_dir=str(tmp_path)), "test")
    assert len(source) == 7 and source.image_shape == (32, 32, 1)
    batch = source.get_batch(np.arange(7))
  assert np.all(batch["image"][:, :2] == -1.0) and batch["label"].min() >= 0 and batch["label"].max() < 10


def test_cli_missing_directory_exits_2_with_one_line(tmp_path):
  env = dict(os.environ, DISTILL_JAX_CACHE="", JAX_PLATFORMS="cpu")
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "distill.main", "--config=configs/digits.py", "--config.data.name=fashion_mnist",
       "--config.data.image_size=32", "--config.model.attn_resolutions=(16,)",
       f"--config.data.data_dir={tmp_path / 'nowhere'}", f"--workdir={workdir}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "apt-get install dataset-fashion-mnist" in lines[0], result.stderr
  assert not workdir.exists()
