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


def resampled_distances(features: np.ndarray, counts: np.ndarray, mu2, sigma2) -> np.ndarray:
  """Fréchet distances [B] of B resamplings of features [M, F] against one Gaussian (mu2 [F], sigma2 [F, F]):
  resampling b takes row k counts[b, k] times (counts int [B, M], each row summing to M), as
  `frechet_distance(*gaussian_stats(features[i_b]), mu2, sigma2)` with i_b its drawn indices, but without the
  resampled copies and with Σ2^½ computed once:

    μ_b = c_b·x / M,   Σ_b = (xᵀ diag(c_b) x − M μ_b μ_bᵀ) / (M − 1),
    tr((Σ_b Σ2)^½) = tr((Σ2^½ Σ_b Σ2^½)^½)   (the same eigenvalues),

  the eigenvalues of a block of resamplings at once (blocks of at most 2²⁵ covariance entries: 8 at
  Inception's 2,048 features). Features are centred on their mean first (a shift moves every μ_b and mu2 alike
  and no covariance)."""
  f = np.asarray(features, np.float64)
  c = np.asarray(counts, np.float64)
  m = len(f)
  if f.ndim != 2 or m < 2 or c.ndim != 2 or c.shape[1] != m:
    raise ValueError(f"features [M >= 2, F] and counts [B, M] expected, got {f.shape} and {c.shape}")
  center = f.mean(0)
  f = f - center
  mu2 = np.asarray(mu2, np.float64) - center
  s2 = np.asarray(sigma2, np.float64)
  root2, width = _psd_sqrt(s2), f.shape[1]
  block = max(1, (1 << 25) // (width * width))
  out = []
  for start in range(0, len(c), block):
    cb = c[start:start + block]
    means = cb @ f / m                                                       # [b, F]
    second = np.stack([f.T @ (weights[:, None] * f) for weights in cb])      # [b, F, F]
    sigmas = (second - m * means[:, :, None] * means[:, None, :]) / (m - 1)
    middle = root2 @ sigmas @ root2
    vals = np.linalg.eigvalsh((middle + np.swapaxes(middle, 1, 2)) / 2)    # [b, F]
    tr_covmean = np.sqrt(np.clip(vals, 0.0, None)).sum(1)
    out.append(np.sum((means - mu2) ** 2, 1) + np.trace(sigmas, axis1=1, axis2=2) + np.trace(s2) - 2.0 * tr_covmean)
  return np.concatenate(out)


def feature_fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
  return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))
