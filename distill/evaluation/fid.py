"""Fréchet distance between Gaussian fits of two feature sets (FID when the features are Inception's;
"classifier-FID" when they come from a data set's own small classifier)."""
from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [F] and unbiased covariance [F, F] of features [N, F], in float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or len(f) < 2:
    raise ValueError(f"features must be [N >= 2, F], got shape {f.shape}")
  return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
  vals, vecs = np.linalg.eigh((a + a.T) / 2)
  return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2(Σ1^½ Σ2 Σ1^½)^½).

  tr((Σ1 Σ2)^½) is computed as tr((Σ1^½ Σ2 Σ1^½)^½), a symmetric PSD square root by eigendecomposition, so
  nearly singular covariances need no regularising offset and no complex parts appear.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  root1 = _psd_sqrt(s1)
  middle = root1 @ s2 @ root1
  vals = np.linalg.eigvalsh((middle + middle.T) / 2)
  tr_covmean = np.sum(np.sqrt(np.clip(vals, 0.0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def feature_fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
  return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))
