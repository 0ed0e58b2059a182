"""Fréchet distance against scipy's sqrtm reference and closed forms."""
import numpy as np
import pytest
from scipy import linalg

from distill.evaluation import fid


def scipy_frechet(mu1, s1, mu2, s2):
  covmean = linalg.sqrtm(s1 @ s2)
  covmean = np.real(covmean)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("dim,rank", [(8, 8), (16, 16), (16, 5)])
def test_matches_scipy_reference(dim, rank):
  rng = np.random.default_rng(dim + rank)
  a = rng.standard_normal((dim, rank))
  b = rng.standard_normal((dim, dim))
  s1 = a @ a.T + (1e-9 if rank < dim else 0.1) * np.eye(dim)  # nearly singular when rank < dim
  s2 = b @ b.T / dim
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), scipy_frechet(mu1, s1, mu2, s2),
                             rtol=1e-6, atol=1e-6)


def test_closed_forms():
  # Isotropic Gaussians: d = ‖Δμ‖² + F·(s1 − s2)².
  f = 6
  assert fid.frechet_distance(np.zeros(f), 4 * np.eye(f), np.ones(f), np.eye(f)) == pytest.approx(f + f * 1.0)
  assert fid.frechet_distance(np.zeros(f), np.eye(f), np.zeros(f), np.eye(f)) == pytest.approx(0.0, abs=1e-12)


def test_feature_fid_is_small_for_same_distribution_and_grows_with_shift():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((4000, 4)), rng.standard_normal((4000, 4))
  same = fid.feature_fid(a, b)
  shifted = fid.feature_fid(a, b + 0.5)
  assert same < 0.02 and shifted == pytest.approx(4 * 0.25 + same, abs=0.03)
  with pytest.raises(ValueError, match="features"):
    fid.gaussian_stats(np.zeros((1, 3)))


def scipy_trace_sqrt(s1, s2):
  """tr((Σ1 Σ2)^½) by scipy's general (Schur) sqrtm, which knows nothing of symmetry."""
  return float(np.trace(np.real(linalg.sqrtm(s1 @ s2))))


@pytest.mark.parametrize("n,dim", [(10, 32), (5, 16), (40, 24)])
def test_sample_covariances_match_scipy_including_rank_deficient(n, dim):
  # n < dim: both sample covariances are exactly singular (rank n − 1), no ridge added.
  rng = np.random.default_rng(n * dim)
  a = rng.standard_normal((n, dim))
  b = 0.7 * rng.standard_normal((n + 3, dim)) @ rng.standard_normal((dim, dim)) / np.sqrt(dim) + 0.3
  mu1, s1 = fid.gaussian_stats(a)
  mu2, s2 = fid.gaussian_stats(b)
  expected = scipy_frechet(mu1, s1, mu2, s2)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert fid.feature_fid(a, b) == pytest.approx(got, rel=1e-12)
  # The tolerance is far tighter than a factor-2 or sign slip in the cross term would move it.
  cross = scipy_trace_sqrt(s1, s2)
  assert cross > 1e3 * 1e-6 * abs(expected)
  for wrong in (expected + cross, expected - 2 * cross, expected + 4 * cross):
    assert abs(got - wrong) > 1e3 * 1e-6 * abs(expected)


@pytest.mark.parametrize("rank", [12, 4, 1])
def test_psd_sqrt_squares_back_and_matches_scipy(rank):
  rng = np.random.default_rng(rank)
  a = rng.standard_normal((12, rank))
  s = a @ a.T  # PSD, singular when rank < 12
  root = fid._psd_sqrt(s)
  np.testing.assert_allclose(root, root.T, atol=1e-12)
  assert np.linalg.eigvalsh(root).min() > -1e-7
  np.testing.assert_allclose(root @ root, s, atol=1e-9 * np.abs(s).max())
  if rank == 12:  # the principal root is unique only where s is invertible
    np.testing.assert_allclose(root, np.real(linalg.sqrtm(s)), rtol=1e-8, atol=1e-9)


def test_identical_rank_deficient_sets_have_zero_distance_and_symmetry():
  rng = np.random.default_rng(7)
  a = 3.0 * rng.standard_normal((9, 40))  # covariance of rank 8 in 40 dimensions
  b = rng.standard_normal((30, 40)) + 1.0
  assert fid.feature_fid(a, a) == pytest.approx(0.0, abs=1e-6 * np.trace(np.cov(a, rowvar=False)))
  assert fid.feature_fid(a, b) == pytest.approx(fid.feature_fid(b, a), rel=1e-7)
  assert fid.feature_fid(a, b) > 0


def test_scaled_covariance_closed_form():
  # Σ2 = c² Σ1 with equal means: d = tr(Σ1)·(1 − c)², for any Σ1, singular or not.
  rng = np.random.default_rng(3)
  a = rng.standard_normal((10, 3))
  s1 = a @ a.T  # rank 3 in 10 dimensions
  for c in (0.5, 2.0, 3.0):
    mu = rng.standard_normal(10)
    assert fid.frechet_distance(mu, s1, mu, c * c * s1) == pytest.approx(np.trace(s1) * (1 - c) ** 2, rel=1e-7)


@pytest.mark.parametrize("rank", [12, 4])
def test_resampled_distances_match_one_resampling_at_a_time(rank):
  """The bootstrap's batched FIDs against the obvious loop: draw indices, fit the Gaussian, one distance each
  (scipy's sqrtm as the reference); also with a reference covariance of low rank."""
  rng = np.random.default_rng(rank)
  feats = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12)) + 5.0  # far from 0: centring matters
  ref = rng.standard_normal((400, rank)) @ rng.standard_normal((rank, 12))
  mu2, s2 = fid.gaussian_stats(ref)
  draws = [rng.integers(0, len(feats), len(feats)) for _ in range(7)]
  counts = np.stack([np.bincount(i, minlength=len(feats)) for i in draws])
  got = fid.resampled_distances(feats, counts, mu2, s2)
  want = [fid.frechet_distance(*fid.gaussian_stats(feats[i]), mu2, s2) for i in draws]
  np.testing.assert_allclose(got, want, rtol=1e-8)
  if rank == 12:
    np.testing.assert_allclose(got, [scipy_frechet(*fid.gaussian_stats(feats[i]), mu2, s2) for i in draws], rtol=1e-6)
  assert np.ptp(got) > 1e-3 * np.mean(got)  # the resamplings differ by far more than the tolerance
  with pytest.raises(ValueError, match="counts"):
    fid.resampled_distances(feats, counts[:, :-1], mu2, s2)
