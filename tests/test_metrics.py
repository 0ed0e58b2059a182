"""Inception score and improved precision/recall against slow loops and closed forms."""
import math

import numpy as np
import pytest

from distill.evaluation import metrics


def slow_inception_score(probs, splits):
  """The textbook IS: a Python loop over contiguous splits and over the samples of each."""
  n = len(probs)
  scores = []
  for s in range(splits):
    part = probs[s * n // splits:(s + 1) * n // splits]
    marginal = np.mean(part, axis=0)
    kls = []
    for p in part:
      kls.append(sum(p[y] * (math.log(p[y]) - math.log(marginal[y])) for y in range(len(p)) if p[y] > 0))
    scores.append(math.exp(sum(kls) / len(kls)))
  return float(np.mean(scores)), float(np.std(scores))


def softmax(logits):
  e = np.exp(logits - logits.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("n,classes,splits", [(103, 7, 10), (50, 10, 1), (64, 3, 4)])
def test_inception_score_matches_slow_loop(n, classes, splits):
  rng = np.random.default_rng(n + classes)
  logits = 3.0 * rng.standard_normal((n, classes))
  expected = slow_inception_score(softmax(logits), splits)
  np.testing.assert_allclose(metrics.inception_score(logits, splits), expected, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(metrics.inception_score(softmax(logits), splits), expected, rtol=1e-10, atol=1e-12)
  assert expected[0] > 1.2  # far from the trivial value, so a wrong KL direction or log base would show


def test_inception_score_from_extreme_logits_is_stable():
  rng = np.random.default_rng(0)
  logits = 40.0 * rng.standard_normal((60, 5))
  expected = slow_inception_score(softmax(logits), 3)
  np.testing.assert_allclose(metrics.inception_score(logits + 1e4, 3), expected, rtol=1e-9)
  # float32 logits are read in float64.
  np.testing.assert_allclose(metrics.inception_score(logits.astype(np.float32), 3),
                             slow_inception_score(softmax(logits.astype(np.float32).astype(np.float64)), 3),
                             rtol=1e-9)


def test_inception_score_closed_forms():
  classes, per_class = 8, 5
  uniform = np.full((40, classes), 1.0 / classes)
  assert metrics.inception_score(uniform, 4) == pytest.approx((1.0, 0.0), abs=1e-12)
  assert metrics.inception_score(np.zeros((40, classes)), 4) == pytest.approx((1.0, 0.0), abs=1e-12)
  # Confident predictions spread evenly over the classes (every split sees each class once): IS = C.
  labels = np.tile(np.arange(classes), per_class)
  one_hot = np.eye(classes)[labels]
  assert metrics.inception_score(one_hot, per_class) == pytest.approx((classes, 0.0), abs=1e-12)
  assert metrics.inception_score(one_hot, 1) == pytest.approx((classes, 0.0), abs=1e-12)
  assert metrics.inception_score(60.0 * one_hot, per_class, from_logits=True)[0] == pytest.approx(classes, rel=1e-9)
  # All samples the same confident class: no diversity, IS = 1.
  assert metrics.inception_score(np.eye(classes)[np.zeros(40, int)], 4)[0] == pytest.approx(1.0, abs=1e-12)


def test_inception_score_rejects_bad_input():
  with pytest.raises(ValueError, match="splits"):
    metrics.inception_score(np.zeros((5, 3)), splits=6)
  with pytest.raises(ValueError, match="predictions"):
    metrics.inception_score(np.zeros(5))


def slow_radii(x, k):
  radii = []
  for i in range(len(x)):
    others = sorted(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)
    radii.append(others[k - 1])
  return np.array(radii)


def slow_precision_recall(real, fake, k):
  """The definition, one pair at a time: O(N·M) norms."""
  real_radii, fake_radii = slow_radii(real, k), slow_radii(fake, k)
  precision = np.mean([any(np.linalg.norm(f - r) <= rr for r, rr in zip(real, real_radii)) for f in fake])
  recall = np.mean([any(np.linalg.norm(r - f) <= fr for f, fr in zip(fake, fake_radii)) for r in real])
  return float(precision), float(recall)


@pytest.fixture(scope="module")
def overlapping_sets():
  rng = np.random.default_rng(1)
  real = rng.standard_normal((60, 4))
  fake = 0.5 * rng.standard_normal((45, 4)) + np.array([1.0, 0.0, 0.0, 0.0])  # narrower and shifted
  return real, fake


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_slow_loop(overlapping_sets, k):
  real, fake = overlapping_sets
  np.testing.assert_allclose(np.sqrt(metrics.knn_sq_radii(real, k)), slow_radii(real, k), rtol=1e-9)
  precision, recall = metrics.precision_recall(real, fake, k=k)
  assert (precision, recall) == slow_precision_recall(real, fake, k)
  if k == 3:  # a narrow fake set: high precision, low recall, neither trivial
    assert 0.5 < precision < 1 and 0 < recall < precision


@pytest.mark.parametrize("batch_size", [1, 7, 45, 1000])
def test_precision_recall_does_not_depend_on_block_size(overlapping_sets, batch_size):
  real, fake = overlapping_sets
  assert metrics.precision_recall(real, fake, batch_size=batch_size) == metrics.precision_recall(real, fake)
  # Matrix products of other shapes may round differently in the last bit; nothing more.
  np.testing.assert_allclose(metrics.knn_sq_radii(fake, 3, batch_size=batch_size), metrics.knn_sq_radii(fake, 3),
                             rtol=1e-12)


def test_precision_recall_closed_cases():
  rng = np.random.default_rng(2)
  x = 10.0 * rng.standard_normal((50, 8))
  assert metrics.precision_recall(x, x.copy()) == (1.0, 1.0)
  assert metrics.precision_recall(x, x[::-1] + 1e-9) == (1.0, 1.0)
  assert metrics.precision_recall(x, x + 1e4) == (0.0, 0.0)
  # A fake set that is one real point repeated: inside the real manifold, but covering one real point.
  collapsed = np.repeat(x[:1], 10, axis=0)
  precision, recall = metrics.precision_recall(x, collapsed)
  assert precision == 1.0 and recall == pytest.approx(1 / 50)


def test_points_on_a_ball_boundary_count_as_inside():
  # Points on a line, distances exact in floating point; k = 1.
  real = np.arange(10.0)[:, None]  # every real radius is 1
  fake = np.array([[0.5], [1.5], [10.0], [12.0]])  # radii 1, 1, 2, 2
  # 10 lies on the ball of real 9; real 8 on the ball of fake 10.
  assert metrics.precision_recall(real, fake, k=1) == (3 / 4, 5 / 10)
  assert slow_precision_recall(real, fake, 1) == (3 / 4, 5 / 10)


def test_precision_recall_rejects_bad_input():
  with pytest.raises(ValueError, match="widths"):
    metrics.precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
  with pytest.raises(ValueError, match="k must"):
    metrics.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


def _slow_density_coverage(real, fake, k):
  """Naeem et al. 2020, Eq. (5)-(6), by nested loops."""
  radii = []
  for i, x in enumerate(real):
    d = sorted(float(np.sum((x - y) ** 2)) for j, y in enumerate(real) if j != i)
    radii.append(d[k - 1])
  holds, covered = 0, 0
  for i, x in enumerate(real):
    inside = [float(np.sum((x - y) ** 2)) <= radii[i] for y in fake]
    holds += sum(inside)
    covered += any(inside)
  return holds / (k * len(fake)), covered / len(real)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("batch_size", [7, 512])
def test_density_coverage_matches_slow_loop(overlapping_sets, k, batch_size):
  real, fake = overlapping_sets
  got = metrics.density_coverage(real, fake, k=k, batch_size=batch_size)
  want = _slow_density_coverage(real, fake, k)
  assert got[0] == pytest.approx(want[0], abs=1e-12) and got[1] == pytest.approx(want[1], abs=1e-12)


def test_density_coverage_closed_cases():
  rng = np.random.default_rng(3)
  real = rng.normal(size=(400, 4))
  # Fakes far away: no real ball holds any (density 0, coverage 0).
  assert metrics.density_coverage(real, real[:50] + 100.0, k=5) == (0.0, 0.0)
  # The real points themselves as fakes: each real point lies in its own ball and in k others' on average
  # (every point is the j-th neighbour of others k times in all), so density = (N + N·k) / (k·N) = 1 + 1/k.
  density, coverage = metrics.density_coverage(real, real, k=5)
  assert coverage == 1.0 and density == pytest.approx(1.0 + 1.0 / 5, abs=1e-12)
  # Samples of the same distribution: density near 1 (the metric's calibration), coverage near 1 − 2^−k.
  density, coverage = metrics.density_coverage(real, rng.normal(size=(4000, 4)), k=5)
  assert 0.85 < density < 1.15 and 0.93 < coverage <= 1.0
  with pytest.raises(ValueError, match="widths"):
    metrics.density_coverage(real, real[:, :3])


def test_published_reference_statistics_load_and_are_checked(tmp_path):
  from distill.evaluation import protocol
  rng = np.random.default_rng(0)
  a = rng.normal(size=(6, 6))
  good = tmp_path / "stats.npz"
  np.savez(good, mu=np.arange(6.0), sigma=a @ a.T)
  mu, sigma = protocol.load_reference_stats(str(good), 6)
  np.testing.assert_array_equal(mu, np.arange(6.0))
  np.savez(tmp_path / "nomu.npz", sigma=a @ a.T)
  np.savez(tmp_path / "asym.npz", mu=np.zeros(6), sigma=a)
  np.save(tmp_path / "pickled.npy", np.array([{"mu": 1}], dtype=object))
  for path, width, needle in ((good, 2048, "do not fit this metric's 2048"), (tmp_path / "nomu.npz", 6, "no mu"),
                              (tmp_path / "asym.npz", 6, "symmetric"), (tmp_path / "nope.npz", 6, "no such file"),
                              (tmp_path / "pickled.npy", 6, "not a readable .npz")):
    with pytest.raises(ValueError, match=needle):
      protocol.load_reference_stats(str(path), width)


def test_bootstrap_intervals_cover_the_estimates_and_shrink_with_samples():
  """protocol.score's 95 % intervals: every number has one, centred on the estimate, precision's matches
  the binomial standard error of its indicators, FID's narrows with 10x the samples, and a fixed seed repeats."""
  from distill.evaluation import fid, protocol
  rng = np.random.default_rng(0)
  real = rng.normal(size=(1500, 4))
  proj = rng.normal(size=(4, 3))
  net = protocol.FeatureNet("classifier", lambda x: (x.reshape(len(x), -1), x.reshape(len(x), -1) @ proj),
                            "identity")
  mu, sigma = fid.gaussian_stats(real)
  ref = protocol.Reference(mu, sigma, real, len(real))

  def scored(m, seed=0):
    fake = (1.2 * rng.normal(size=(m, 4)) + 0.2).reshape(m, 2, 2, 1)
    return protocol.score(net, ref, fake, is_splits=5, bootstrap=200, seed=seed), fake

  small, fake = scored(300)
  for key in ("fid", "is", "precision", "recall", "density", "coverage"):
    lo, hi = small[f"{key}_ci"]
    assert lo < small[key] < hi and small[key] - lo == pytest.approx(hi - small[key]), key
  p = small["precision"]
  half = (small["precision_ci"][1] - small["precision_ci"][0]) / 2
  assert half == pytest.approx(1.96 * np.sqrt(p * (1 - p) / 300), rel=0.3)
  large, _ = scored(3000)
  width = lambda s: s["fid_ci"][1] - s["fid_ci"][0]
  assert width(large) < 0.6 * width(small)
  again = protocol.score(net, ref, fake, is_splits=5, bootstrap=200, seed=0)
  assert again["fid_ci"] == small["fid_ci"]


def test_indicators_with_the_reference_radii_given_equal_those_computing_them():
  rng = np.random.default_rng(3)
  real, fake = rng.normal(size=(300, 6)), rng.normal(0.3, 1.0, size=(80, 6))
  for k, fn in ((3, metrics.precision_recall_indicators), (5, metrics.density_coverage_indicators)):
    plain = fn(real, fake, k=k)
    given = fn(real, fake, k=k, real_radii=metrics.knn_sq_radii(real, k))
    for a, b in zip(plain, given, strict=True):
      np.testing.assert_array_equal(a, b)
    wrong = fn(real, fake, k=k, real_radii=np.zeros(len(real)))  # the radii are used, not recomputed
    assert not all(np.array_equal(a, b) for a, b in zip(plain, wrong, strict=True))


def test_intervals_are_clipped_to_each_metrics_range():
  """An FID near 0 with a wide bootstrap spread would reach below 0, a precision near 1 above 1: the reported
  intervals stop at the range's ends; values inside it, and keys without a range, are left alone."""
  from distill.evaluation import protocol
  scores = {"fid": 0.05, "fid_ci": [-0.04, 0.14], "precision": 0.99, "precision_ci": [0.97, 1.01],
            "recall": 0.5, "recall_ci": [0.4, 0.6], "is": 1.02, "is_ci": [0.98, 1.06], "other_ci": [-1.0, 1.0],
            "density": None, "density_ci": [float("nan"), float("nan")]}
  out = protocol.clip_intervals(scores)
  assert out["fid_ci"] == [0.0, 0.14] and out["precision_ci"] == [0.97, 1.0] and out["is_ci"] == [1.0, 1.06]
  assert out["recall_ci"] == [0.4, 0.6] and out["other_ci"] == [-1.0, 1.0] and np.isnan(out["density_ci"][0])
  assert scores["fid_ci"] == [-0.04, 0.14]  # the input is not changed


@pytest.mark.parametrize("n, splits, classes", [(500, 10, 10), (103, 7, 10), (50, 5, 100_000)])
def test_resampled_inception_scores_match_one_resampling_at_a_time(n, splits, classes):
  """The bootstrap's batched IS against `inception_score` on each resampled copy, including splits of unequal
  size and blocks smaller than the number of resamplings."""
  rng = np.random.default_rng(n)
  logits = 3 * rng.standard_normal((n, classes))  # 100,000 classes: blocks of 3 resamplings
  draws = rng.integers(0, n, (12, n))
  want = [metrics.inception_score(logits[i], splits=splits, from_logits=True)[0] for i in draws]
  np.testing.assert_allclose(metrics.resampled_inception_scores(logits, draws, splits), want, rtol=1e-12)
  assert np.ptp(want) > 1e-3
