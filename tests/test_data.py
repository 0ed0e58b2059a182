"""Tests for distill/data.py: sources, validation messages, deterministic batches."""

import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from distill import data


def data_config(**overrides) -> ml_collections.ConfigDict:
  fields = dict(
      name="digits",
      image_size=8,
      channels=1,
      num_classes=10,
      path="",
      data_dir="",
      num_examples=60,
      seed=3,
      mixture_scale=1.0,
      mixture_std=0.1,
  )
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def assert_one_line(error_info, *needles):
  message = str(error_info.value)
  assert "\n" not in message
  for needle in needles:
    assert needle in message, (needle, message)


def check_source(source, image_shape, num_classes):
  assert source.image_shape == image_shape
  assert source.num_classes == num_classes
  item = source[0]
  assert item["image"].shape == image_shape and item["image"].dtype == np.float32
  assert item["label"].dtype == np.int32 and item["label"].shape == ()
  batch = source.get_batch(np.arange(min(len(source), 5)))
  assert batch["image"].shape == (min(len(source), 5), *image_shape)
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  # A resize in a batch and alone may take different SIMD paths: equal to float rounding, not bit for bit.
  np.testing.assert_allclose(batch["image"][0], item["image"], rtol=0, atol=1e-6)
  assert np.all((batch["label"] >= 0) & (batch["label"] < num_classes))
  return batch


# ----------------------------------------------------------------------------
# Sources.


def test_digits_shapes_and_range():
  source = data.make_source(data_config())
  batch = check_source(source, (8, 8, 1), 10)
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  everything = source.get_batch(np.arange(len(source)))["image"]
  assert everything.min() == -1 and everything.max() == 1


def test_digits_split_sizes_and_disjoint():
  train = data.make_source(data_config(), "train")
  test = data.make_source(data_config(), "test")
  assert (len(train), len(test)) == (1500, 297)
  train_rows = {x.tobytes() for x in train.get_batch(np.arange(len(train)))["image"]}
  test_rows = [x.tobytes() for x in test.get_batch(np.arange(len(test)))["image"]]
  # The 1797 digit images are pairwise distinct, so equal pixels mean a shared example.
  assert not any(row in train_rows for row in test_rows)
  again = data.make_source(data_config(), "test")
  np.testing.assert_array_equal(again.get_batch(np.arange(10))["image"], test.get_batch(np.arange(10))["image"])


def test_digits_resized():
  source = data.make_source(data_config(image_size=16))
  batch = check_source(source, (16, 16, 1), 10)
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_source_index_bounds():
  source = data.make_source(data_config(), "test")
  np.testing.assert_array_equal(source[-1]["image"], source[len(source) - 1]["image"])
  with pytest.raises(IndexError):
    source[len(source)]


def test_mixture_statistics_and_determinism():
  config = data_config(name="mixture", image_size=4, channels=2, num_classes=3, num_examples=3000, mixture_std=0.2)
  source = data.make_source(config)
  check_source(source, (4, 4, 2), 3)
  assert source.means.shape == (3, 4, 4, 2) and source.std == pytest.approx(0.2)
  batch = source.get_batch(np.arange(len(source)))
  assert np.bincount(batch["label"]).tolist() == [1000, 1000, 1000]
  for k in range(3):
    residual = batch["image"][batch["label"] == k] - source.means[k]
    assert abs(residual.mean()) < 0.01 and residual.std() == pytest.approx(0.2, rel=0.02)
  test = data.make_source(config, "test")
  np.testing.assert_array_equal(test.means, source.means)
  assert not np.array_equal(test[0]["image"], source[0]["image"])
  np.testing.assert_array_equal(data.make_source(config)[7]["image"], source[7]["image"])


def write_npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def test_npz_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (50, 6, 6, 3), dtype=np.uint8)
  labels = rng.integers(0, 4, 50)
  path = write_npz(tmp_path / "set.npz", images=images, labels=labels)
  config = data_config(name="npz", path=path, image_size=6, channels=3, num_classes=4)
  train, test = data.make_source(config, "train"), data.make_source(config, "test")
  assert (len(train), len(test)) == (45, 5)
  check_source(train, (6, 6, 3), 4)
  # Every file row lands in exactly one split, pixels scaled x / 127.5 - 1.
  got = np.concatenate([s.get_batch(np.arange(len(s)))["image"] for s in (train, test)])
  want = images.astype(np.float32) / 127.5 - 1
  got_rows = sorted(np.round(got, 5).reshape(50, -1).tolist())
  assert got_rows == sorted(np.round(want, 5).reshape(50, -1).tolist())
  resized = data.make_source(data_config(name="npz", path=path, image_size=3, channels=3, num_classes=4))
  check_source(resized, (3, 3, 3), 4)


def test_npz_explicit_test_arrays(tmp_path):
  images = np.zeros((8, 4, 4, 1), np.uint8)
  path = write_npz(tmp_path / "s.npz",
                   images=images,
                   labels=np.zeros(8, int),
                   test_images=np.full((3, 4, 4, 1), 255, np.uint8),
                   test_labels=np.ones(3, int))
  config = data_config(name="npz", path=path, image_size=4, channels=1, num_classes=2)
  assert len(data.make_source(config, "train")) == 8
  test = data.make_source(config, "test")
  assert len(test) == 3 and test[0]["image"].min() == 1 and test[0]["label"] == 1


GOOD = dict(images=np.zeros((20, 4, 4, 1), np.uint8), labels=np.zeros(20, np.int64))


def test_npz_is_read_as_untrusted_input(tmp_path):
  """Through the bounded reader (`npz_arrays`): a compressed file reads back; arrays that would inflate past the
  cap, or that need a pickle, are one-line DataErrors before anything of their size is allocated."""
  rng = np.random.default_rng(0)
  images, labels = rng.integers(0, 256, (30, 4, 4, 1), dtype=np.uint8), np.arange(30) % 10
  np.savez_compressed(tmp_path / "small.npz", images=images, labels=labels)
  config = data_config(name="npz", path=str(tmp_path / "small.npz"), image_size=4, num_classes=10)
  source = data.make_source(config, "train")
  assert len(source) == 27 and source.get_batch(np.arange(27))["image"].shape == (27, 4, 4, 1)
  np.savez_compressed(tmp_path / "bomb.npz", images=np.zeros((1 << 20, 8, 8, 1), np.uint8), labels=np.zeros(1 << 20))
  with pytest.raises(data.DataError) as error:
    data.make_source(data_config(name="npz", path=str(tmp_path / "bomb.npz")))
  assert_one_line(error, "data.path=", "bomb.npz", "not a readable .npz", "its arrays need more than")
  np.savez(tmp_path / "objects.npz", images=np.array([None] * 4, dtype=object), labels=np.zeros(4))
  with pytest.raises(data.DataError) as error:
    data.make_source(data_config(name="npz", path=str(tmp_path / "objects.npz")))
  assert_one_line(error, "data.path=", "Python objects")


@pytest.mark.parametrize(
    "arrays, needles",
    [
        (dict(labels=GOOD["labels"]), ["'images'", "found ['labels']"]),
        (dict(images=GOOD["images"]), ["'labels'"]),
        (dict(GOOD, images=GOOD["images"].astype(np.float32)), ["'images'", "float32", "uint8"]),
        (dict(GOOD, images=np.zeros((20, 4, 4), np.uint8)), ["(20, 4, 4)", "4-D"]),
        (dict(GOOD, images=np.zeros((20, 4, 4, 3), np.uint8)), ["3 channels", "data.channels=1"]),
        (dict(GOOD, labels=np.zeros(19, np.int64)), ["(19,)", "(20,)"]),
        (dict(GOOD, labels=np.full(20, 0.5)), ["'labels'", "float64", "integer"]),
        (dict(GOOD, labels=np.arange(20) - 1), ["[-1, 18]", "data.num_classes=10"]),
        (dict(GOOD, test_images=GOOD["images"]), ["'test_labels'"]),
    ],
)
def test_npz_malformed(tmp_path, arrays, needles):
  path = write_npz(tmp_path / "bad.npz", **arrays)
  with pytest.raises(data.DataError) as error:
    data.make_source(data_config(name="npz", path=path, image_size=4))
  assert_one_line(error, "data.path=", *needles)


def test_npz_missing_and_unreadable(tmp_path):
  with pytest.raises(data.DataError) as error:
    data.make_source(data_config(name="npz", path=""))
  assert_one_line(error, "data.path is empty")
  with pytest.raises(data.DataError) as error:
    data.make_source(data_config(name="npz", path=str(tmp_path / "nope.npz")))
  assert_one_line(error, "does not exist")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(data.DataError) as error:
    data.make_source(data_config(name="npz", path=str(tmp_path / "junk.npz")))
  assert_one_line(error, "not a readable .npz")
  path = write_npz(tmp_path / "tiny.npz", images=GOOD["images"][:5], labels=GOOD["labels"][:5])
  with pytest.raises(data.DataError) as error:
    data.make_source(data_config(name="npz", path=path, image_size=4), "test")
  assert_one_line(error, "empty 'test' split")


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (dict(name="mnist"), ["data.name='mnist'", "'digits'", "'mixture'"]),
        (dict(image_size=0), ["data.image_size=0", "positive integer"]),
        (dict(image_size=8.0), ["data.image_size=8.0"]),
        (dict(channels=3), ["data.channels=3", "digits has channels=1"]),
        (dict(num_classes=100), ["data.num_classes=100", "num_classes=10"]),
        (dict(name="cifar10", channels=1), ["data.channels=1", "cifar10 has channels=3"]),
        (dict(name="imagenet64", channels=3, num_classes=10), ["num_classes=1000"]),
        (dict(name="mixture", mixture_std=0.0), ["data.mixture_std=0.0", "> 0"]),
        (dict(name="mixture", mixture_scale=-1.0), ["data.mixture_scale=-1.0"]),
        (dict(name="mixture", seed=-2), ["data.seed=-2"]),
    ],
)
def test_config_validation(overrides, needles):
  with pytest.raises(data.DataError) as error:
    data.make_source(data_config(**overrides))
  assert_one_line(error, *needles)


def test_missing_field_and_bad_split():
  config = data_config(name="mixture")
  del config["mixture_std"]
  with pytest.raises(data.DataError) as error:
    data.make_source(config)
  assert_one_line(error, "data.mixture_std is missing", "name='mixture'")
  with pytest.raises(data.DataError) as error:
    data.make_source(data_config(), "validation")
  assert_one_line(error, "split='validation'", "'test'")


def test_cifar10_through_tfds_mock():
  # USE_CODE works offline with tfds.data_source: it generates records from
  # the builder's features, no files involved.
  config = data_config(name="cifar10", image_size=32, channels=3, num_classes=10)
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    train = data.make_source(config, "train")
    test = data.make_source(config, "test")
    assert len(train) == len(test) == 12
    batch = check_source(train, (32, 32, 3), 10)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    small = data_config(name="cifar10", image_size=16, channels=3, num_classes=10)
    check_source(data.make_source(small, "train"), (16, 16, 3), 10)
    batches = data.Batches(train, global_batch_size=4, seed=0)
    assert next(batches)["image"].shape == (4, 32, 32, 3)


def test_imagenet64_absent_says_what_to_do(tmp_path):
  config = data_config(name="imagenet64", image_size=64, channels=3, num_classes=1000, data_dir=str(tmp_path))
  with pytest.raises(data.DataError) as error:
    data.make_source(config)
  assert_one_line(
      error,
      "imagenet_resized/64x64",
      "Imagenet64_train_part1_npz.zip",
      "Imagenet64_val_npz.zip",
      f"{tmp_path}/downloads/manual",
      f"tfds build imagenet_resized/64x64 --data_dir={tmp_path} --file_format=array_record",
  )
  assert list(tmp_path.iterdir()) == []  # Nothing was downloaded or created.


def test_imagenet2012_absent_says_what_to_do(tmp_path):
  config = data_config(name="imagenet2012", image_size=256, channels=3, num_classes=1000, data_dir=str(tmp_path))
  with pytest.raises(data.DataError) as error:
    data.make_source(config)
  assert_one_line(error, "imagenet2012", "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                  f"{tmp_path}/downloads/manual", f"tfds build imagenet2012 --data_dir={tmp_path}")
  assert list(tmp_path.iterdir()) == []


def test_cifar10_absent_says_what_to_do(tmp_path):
  config = data_config(name="cifar10", image_size=32, channels=3, num_classes=10, data_dir=str(tmp_path))
  with pytest.raises(data.DataError) as error:
    data.make_source(config, "test")
  assert_one_line(error, f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record", "TensorFlow")


def test_tfds_prepared_as_tfrecord_says_rebuild(tmp_path):
  # A data_dir prepared the default TFDS way (tfrecord) cannot be read without TensorFlow.
  builder = tfds.builder("cifar10", data_dir=str(tmp_path))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)
  config = data_config(name="cifar10", image_size=32, channels=3, num_classes=10, data_dir=str(tmp_path))
  with pytest.raises(data.DataError) as error:
    data.make_source(config)
  assert_one_line(error, "stored as tfrecord", "--file_format=array_record")


# ----------------------------------------------------------------------------
# Batches.


@pytest.fixture(scope="module")
def digits():
  return data.make_source(data_config(), "test")  # 297 examples: epochs do not divide batches.


def test_batches_deterministic_and_random_access(digits):
  a = data.Batches(digits, global_batch_size=32, seed=5)
  b = data.Batches(digits, global_batch_size=32, seed=5)
  streamed = [next(a) for _ in range(12)]  # Crosses the epoch boundary at step 9.
  assert a.step == 12
  for k, batch in enumerate(streamed):
    assert batch["image"].shape == (32, 8, 8, 1)
    np.testing.assert_array_equal(batch["image"], b.batch_at(k)["image"])
    np.testing.assert_array_equal(batch["label"], b.batch_at(k)["label"])
  other_seed = data.Batches(digits, global_batch_size=32, seed=6)
  assert not np.array_equal(other_seed.batch_at(0)["label"], streamed[0]["label"])


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_resume_equals_uninterrupted(digits, drop_remainder):
  whole = data.Batches(digits, 40, seed=1, drop_remainder=drop_remainder)
  uninterrupted = [next(whole)["label"] for _ in range(20)]
  resumed = data.Batches(digits, 40, seed=1, start_step=13, drop_remainder=drop_remainder)
  for k in range(13, 20):
    np.testing.assert_array_equal(next(resumed)["label"], uninterrupted[k])


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_hosts_concatenate_to_global_batch(digits, drop_remainder):
  single = data.Batches(digits, 48, seed=2, drop_remainder=drop_remainder)
  hosts = [
      data.Batches(digits, 48, seed=2, process_index=p, process_count=3, drop_remainder=drop_remainder)
      for p in range(3)
  ]
  for step in (0, 5, 6, 17):
    parts = [host.batch_at(step) for host in hosts]
    assert all(part["image"].shape == (16, 8, 8, 1) for part in parts)
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), single.batch_at(step)[key])


def test_epochs_cover_every_example_once(digits):
  n = len(digits)  # 297 = 27 * 11.
  exact = data.Batches(digits, 27, seed=4)
  for epoch in range(2):
    seen = np.concatenate([exact.indices_at(epoch * 11 + k) for k in range(11)])
    assert sorted(seen) == list(range(n))
  dropped = data.Batches(digits, 40, seed=4)  # 7 steps/epoch, 17 examples skipped per epoch.
  seen = np.concatenate([dropped.indices_at(k) for k in range(7)])
  assert len(set(seen)) == len(seen) == 280
  assert not np.array_equal(np.sort(seen), np.sort(np.concatenate([dropped.indices_at(k) for k in range(7, 14)])))
  stream = data.Batches(digits, 40, seed=4, drop_remainder=False)
  seen = np.concatenate([stream.indices_at(k) for k in range(0, 3 * n // 40 + 1)])[:3 * n]
  for epoch in range(3):
    assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(global_batch_size=30, process_count=4), "divisible by process_count=4"),
        (dict(global_batch_size=32, process_index=2, process_count=2), "process_index=2"),
        (dict(global_batch_size=0), "global_batch_size=0"),
        (dict(global_batch_size=400), "exceeds the 297 examples"),
        (dict(global_batch_size=32, start_step=-1), "start_step=-1"),
    ],
)
def test_batches_validation(digits, kwargs, needle):
  with pytest.raises(data.DataError) as error:
    data.Batches(digits, seed=0, **kwargs)
  assert_one_line(error, needle)


def test_batch_larger_than_source_without_drop(digits):
  batches = data.Batches(digits, 400, seed=0, drop_remainder=False)
  assert np.bincount(batches.indices_at(0), minlength=297).min() >= 1


# ----------------------------------------------------------------------------
# TFDS sources read through grain.


@pytest.fixture(scope="module")
def tfds_cifar(tmp_path_factory):
  """A TFDS 'cifar10' in array_record format (37 train, 5 test), written without TensorFlow, and its arrays."""
  from distill import testing
  data_dir = tmp_path_factory.mktemp("tfds")
  rng = np.random.default_rng(7)
  images = rng.integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 37)
  testing.write_tfds_array_record("cifar10", str(data_dir), {"train": (images, labels),
                                                             "test": (images[:5], labels[:5])})
  return str(data_dir), images, labels


def cifar_config(data_dir, **overrides):
  return data_config(**dict(dict(name="cifar10", image_size=32, channels=3, num_classes=10, data_dir=data_dir),
                            **overrides))


def assert_same_batches(got, want):
  assert got["image"].dtype == want["image"].dtype == np.float32
  # uint8 / 127.5 - 1 on both paths: equal by construction.
  np.testing.assert_array_equal(got["image"], want["image"])
  np.testing.assert_array_equal(got["label"], want["label"])


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_tfds_through_grain_gives_the_in_memory_batches(tfds_cifar, drop_remainder):
  data_dir, images, labels = tfds_cifar
  source = data.make_source(cifar_config(data_dir), "train")
  assert isinstance(source, data.TfdsSource) and source.read_ahead == data.ReadAhead(num_workers=0, prefetch=2)
  assert len(source) == 37
  in_memory = data.Batches(data.ArraySource(images, labels, 10, 32), 8, seed=3, drop_remainder=drop_remainder)
  streamed = data.Batches(source, 8, seed=3, drop_remainder=drop_remainder)
  for step in range(11):  # 4 steps per epoch (drop_remainder): crosses two epoch boundaries
    assert_same_batches(next(streamed), in_memory.batch_at(step))
  assert streamed._stream is not None and streamed._stream_step == 11  # one stream, read ahead
  streamed.close()


def test_tfds_resume_and_random_access_restart_the_stream(tfds_cifar):
  data_dir, _, _ = tfds_cifar
  source = data.make_source(cifar_config(data_dir), "train")
  whole = data.Batches(source, 8, seed=1)
  uninterrupted = [next(whole) for _ in range(9)]
  whole.close()
  resumed = data.Batches(source, 8, seed=1, start_step=5)
  for step in range(5, 9):
    assert_same_batches(next(resumed), uninterrupted[step])
  assert_same_batches(resumed.batch_at(2), uninterrupted[2])  # a jump back: a fresh stream at step 2
  assert_same_batches(resumed.batch_at(3), uninterrupted[3])
  assert resumed._stream_step == 4
  resumed.close()
  assert resumed._stream is None
  assert_same_batches(resumed.batch_at(7), uninterrupted[7])  # closed: the next call opens another
  resumed.close()


def test_tfds_hosts_read_disjoint_rows_of_the_global_batch(tfds_cifar):
  data_dir, _, _ = tfds_cifar
  source = data.make_source(cifar_config(data_dir), "train")
  single = data.Batches(source, 12, seed=2)
  hosts = [data.Batches(source, 12, seed=2, process_index=p, process_count=3) for p in range(3)]
  for step in range(5):
    rows = [host.indices_at(step) for host in hosts]
    assert len(set(np.concatenate(rows))) == 12  # disjoint
    parts = [next(host) for host in hosts]
    assert all(part["image"].shape == (4, 32, 32, 3) for part in parts)
    whole = single.batch_at(step)
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])
  for b in hosts + [single]:
    b.close()


def test_tfds_worker_processes_give_the_same_batches(tfds_cifar):
  data_dir, images, labels = tfds_cifar
  source = data.make_source(cifar_config(data_dir, num_workers=2, prefetch=1), "train")
  assert source.read_ahead == data.ReadAhead(num_workers=2, prefetch=1)
  in_memory = data.Batches(data.ArraySource(images, labels, 10, 32), 8, seed=4)
  streamed = data.Batches(source, 8, seed=4, start_step=3)
  try:
    for step in range(3, 10):  # steps alternate between the two workers
      assert_same_batches(next(streamed), in_memory.batch_at(step))
  finally:
    streamed.close()


def test_tfds_workers_outlive_a_signal_to_the_process_group(tfds_cifar):
  """A Ctrl-C or a preemption's SIGTERM reaches the workers too; the trainer, which stops after its step, may
  still ask for a batch, so they must go on until it closes them."""
  import multiprocessing
  import signal
  data_dir, images, labels = tfds_cifar
  source = data.make_source(cifar_config(data_dir, num_workers=1, prefetch=1), "train")
  in_memory = data.Batches(data.ArraySource(images, labels, 10, 32), 8, seed=5)
  streamed = data.Batches(source, 8, seed=5)
  try:
    assert_same_batches(next(streamed), in_memory.batch_at(0))
    (worker,) = multiprocessing.active_children()
    for sig in (signal.SIGINT, signal.SIGTERM):
      os.kill(worker.pid, sig)
    for step in range(1, 5):
      assert_same_batches(next(streamed), in_memory.batch_at(step))
    assert worker.is_alive()
  finally:
    streamed.close()
  assert not worker.is_alive() and multiprocessing.active_children() == []


def test_tfds_without_read_ahead_and_resized(tfds_cifar):
  data_dir, images, labels = tfds_cifar
  direct = data.make_source(cifar_config(data_dir, image_size=16, prefetch=0), "train")
  threaded = data.make_source(cifar_config(data_dir, image_size=16), "train")
  a, b = data.Batches(direct, 8, seed=0), data.Batches(threaded, 8, seed=0)
  for step in range(3):
    got, want = next(b), a.batch_at(step)
    assert got["image"].shape == (8, 16, 16, 3)
    np.testing.assert_allclose(got["image"], want["image"], rtol=0, atol=1e-6)  # resized in another thread
    np.testing.assert_array_equal(got["label"], want["label"])
  a.close(), b.close()


@pytest.mark.parametrize("overrides, needle", [
    (dict(num_workers=-1), "data.num_workers=-1 must be an integer >= 0"),
    (dict(num_workers=1.5), "data.num_workers=1.5"),
    (dict(prefetch=-2), "data.prefetch=-2 must be an integer >= 0"),
])
def test_read_ahead_validation(tfds_cifar, overrides, needle):
  with pytest.raises(data.DataError) as error:
    data.make_source(cifar_config(tfds_cifar[0], **overrides))
  assert_one_line(error, needle)


def test_center_crop_resize_keeps_the_central_square_as_adm_prepares_imagenet():
  """ADM's center_crop_arr: a 3:1 image of three coloured thirds keeps the middle third; a constant image stays
  constant through the box halvings and the bicubic resize; the result is [size, size, C] uint8; 1 channel too."""
  wide = np.zeros((100, 300, 3), np.uint8)
  wide[:, :100, 0], wide[:, 100:200, 1], wide[:, 200:, 2] = 255, 255, 255
  out = data.center_crop_resize(wide, 32)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  assert out[2:-2, 2:-2, 1].min() == 255 and out[2:-2, 2:-2, [0, 2]].max() == 0  # the green middle alone
  tall = np.full((700, 260, 3), 77, np.uint8)  # halved once by the box filter (260 >= 2·64), then bicubic
  np.testing.assert_array_equal(data.center_crop_resize(tall, 64), np.full((64, 64, 3), 77, np.uint8))
  gray = np.arange(40 * 50, dtype=np.uint8).reshape(40, 50, 1)
  assert data.center_crop_resize(gray, 20).shape == (20, 20, 1)


def test_imagenet2012_records_of_any_size_are_cropped_and_resized():
  """TFDS 'imagenet2012' offline through tfds.testing.mock_data (random records of the builder's features,
  images of varying sizes): batches have the configured shape in [-1, 1]."""
  import tensorflow_datasets as tfds
  config = data_config(name="imagenet2012", image_size=16, channels=3, num_classes=1000)
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source = data.make_source(config, "train")
    batch = source.get_batch(np.arange(6))
    assert batch["image"].shape == (6, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert len(data.make_source(config, "test")) == 6
