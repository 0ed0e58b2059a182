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
