"""SmallClassifier on sklearn digits: accuracy, determinism, save/load, agreement, features."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from distill import testing
from distill.evaluation import classifier

NUM_TEST = 297


@pytest.fixture(scope="module")
def digits():
  """Digits as [N, 8, 8, 1] in [-1, 1], split by a fixed permutation (last 297 held out)."""
  data = load_digits()
  images = (data.images / 8.0 - 1.0).astype(np.float32)[..., None]
  labels = data.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(images))
  train, test = order[:-NUM_TEST], order[-NUM_TEST:]
  return images[train], labels[train], images[test], labels[test]


@pytest.fixture(scope="module")
def trained(digits):
  train_x, train_y, test_x, test_y = digits
  start = time.perf_counter()
  params, accuracy = classifier.train_classifier(train_x, train_y, test_x, test_y, num_classes=10, seed=0)
  seconds = time.perf_counter() - start
  print(f"\ndigits classifier: accuracy {accuracy:.4f}, trained in {seconds:.1f}s")
  return params, accuracy


def test_accuracy_on_held_out_digits(trained):
  _, accuracy = trained
  assert accuracy >= 0.97


def test_training_is_deterministic_given_seed(digits):
  train_x, train_y, test_x, test_y = digits
  runs = [
      classifier.train_classifier(train_x, train_y, test_x, test_y, num_classes=10, seed=3, steps=20) for _ in range(2)
  ]
  testing.assert_trees_equal(runs[0][0], runs[1][0])
  other, _ = classifier.train_classifier(train_x, train_y, test_x, test_y, num_classes=10, seed=4, steps=20)
  assert not np.array_equal(other["logits"]["kernel"], runs[0][0]["logits"]["kernel"])


def test_save_load_round_trip(trained, digits, tmp_path):
  params, accuracy = trained
  _, _, test_x, _ = digits
  path = tmp_path / "sub" / "digits_classifier.npz"
  meta = {"num_classes": 10, "image_shape": [8, 8, 1], "accuracy": accuracy}
  classifier.save_classifier(str(path), params, meta)
  loaded, loaded_meta = classifier.load_classifier(str(path))
  assert loaded_meta == meta
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  np.testing.assert_array_equal(classifier.predict(loaded, test_x, 10), classifier.predict(params, test_x, 10))
  np.testing.assert_array_equal(classifier.features(loaded, test_x, 10), classifier.features(params, test_x, 10))


def test_class_agreement(trained, digits):
  params, accuracy = trained
  _, _, test_x, test_y = digits
  assert classifier.class_agreement(params, test_x, test_y, 10) == pytest.approx(accuracy)
  shuffled = np.random.default_rng(1).permutation(test_y)
  assert abs(classifier.class_agreement(params, test_x, shuffled, 10) - 0.1) < 0.06


def test_batched_prediction_matches_single_batch(trained, digits):
  params, _ = trained
  _, _, test_x, _ = digits
  # 297 images in batches of 64: the padded last batch must not change results.
  np.testing.assert_array_equal(classifier.predict(params, test_x, 10, batch_size=64),
                                classifier.predict(params, test_x, 10))


def test_features_shape_and_dtype(trained, digits):
  params, _ = trained
  _, _, test_x, _ = digits
  feats = classifier.features(params, test_x[:50], 10)
  assert feats.shape == (50, 64) and feats.dtype == np.float32
  assert np.all(np.isfinite(feats)) and feats.std() > 0


def test_predict_rejects_wrong_num_classes(trained, digits):
  params, _ = trained
  with pytest.raises(ValueError):
    classifier.predict(params, digits[2][:4], 7)


@pytest.mark.parametrize("shape", [(16, 16, 1), (32, 32, 3)])
def test_other_image_sizes(shape):
  model = classifier.SmallClassifier(num_classes=5, features=32)
  x = jnp.zeros((2,) + shape)
  # Shapes only (eval_shape): compiling real convolutions at 32x32 costs seconds.
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  logits = jax.eval_shape(lambda p: model.apply({"params": p}, x), params)
  feats = jax.eval_shape(lambda p: model.apply({"params": p}, x, return_features=True), params)
  assert logits.shape == (2, 5) and feats.shape == (2, 32)


def test_random_shift_moves_by_at_most_one_pixel():
  image = -np.ones((1, 8, 8, 1), np.float32)
  image[0, 4, 4, 0] = 1.0
  shifted = np.asarray(classifier.random_shift(jax.random.PRNGKey(0), np.repeat(image, 64, 0)))
  rows, cols = np.nonzero(shifted[..., 0] > 0)[1:]
  assert len(rows) == 64
  assert set(rows) == {3, 4, 5} and set(cols) == {3, 4, 5}
