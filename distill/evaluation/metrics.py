"""Inception score and improved precision/recall (FID lives in `fid.py`).

Both work on whatever network the features or predictions come from: Inception's for the
paper's numbers, the data set's own small classifier (`classifier.py`) for tiny image sets.
All arithmetic is float64 numpy.
"""
from __future__ import annotations

import numpy as np


def _log_probs(logits_or_probs: np.ndarray, from_logits: bool | None) -> np.ndarray:
  """log p(y|x) [N, C] from logits or probabilities [N, C]; -inf where a probability is 0."""
  x = np.asarray(logits_or_probs, np.float64)
  if x.ndim != 2 or len(x) == 0:
    raise ValueError(f"predictions must be [N >= 1, C], got shape {x.shape}")
  if from_logits is None:
    # Rows on the simplex are probabilities; anything else (negative, or not summing to 1) is logits.
    from_logits = not (np.all(x >= 0) and np.allclose(x.sum(1), 1.0, atol=1e-4))
  if from_logits:
    shifted = x - x.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  with np.errstate(divide="ignore"):
    return np.log(x / x.sum(1, keepdims=True))


def _split_score(log_p: np.ndarray) -> float:
  """exp(mean_i KL(p(y|x_i) ‖ p(y))) for one split, log_p: [n, C]."""
  n = len(log_p)
  top = log_p.max(0)  # log of the marginal p(y) = mean_i p(y|x_i), by a stable log-mean-exp
  finite_top = np.where(np.isfinite(top), top, 0.0)
  p = np.exp(log_p)
  with np.errstate(divide="ignore", invalid="ignore"):
    log_marginal = finite_top + np.log(np.exp(log_p - finite_top).sum(0) / n)
    # p log p = 0 at p = 0; masking keeps 0 · (−inf) and −inf − (−inf) out of the sum.
    terms = np.where(p > 0, p * (log_p - log_marginal), 0.0)
  return float(np.exp(terms.sum(1).mean()))


def inception_score(logits_or_probs: np.ndarray, splits: int = 10, *,
                    from_logits: bool | None = None) -> tuple[float, float]:
  """Inception score: mean and std over `splits` of exp(mean_i KL(p(y|x_i) ‖ p(y))).

  Args:
    logits_or_probs: [N, C] logits, or class probabilities (rows on the simplex).
    splits: number of contiguous chunks, rows [i·N // splits, (i+1)·N // splits), as in the
      original protocol (Salimans et al. 2016); p(y) is the marginal within each chunk.
    from_logits: True / False to say what the input is; None guesses: rows that are
      non-negative and sum to 1 are probabilities, anything else is logits.

  Returns:
    (mean, std) over the splits, std with ddof = 0 as in the original code. In [1, C].
  """
  log_p = _log_probs(logits_or_probs, from_logits)
  n = len(log_p)
  if not 1 <= splits <= n:
    raise ValueError(f"splits must be in [1, N = {n}], got {splits}")
  scores = [_split_score(log_p[i * n // splits:(i + 1) * n // splits]) for i in range(splits)]
  return float(np.mean(scores)), float(np.std(scores))


def resampled_inception_scores(logits: np.ndarray, draws: np.ndarray, splits: int = 10) -> np.ndarray:
  """The Inception score's mean over splits [B] of B resamplings: row b is
  `inception_score(logits[draws[b]], splits, from_logits=True)[0]`, computed for blocks of resamplings at once
  (at most 2²⁴ gathered log-probabilities each). logits [N, C]; draws int [B, M] (indices into the rows,
  M >= splits). The log-probabilities are computed once: a per-row operation, so the same arithmetic as
  computing them on each resampling."""
  log_p = _log_probs(logits, True)
  draws = np.asarray(draws)
  if draws.ndim != 2 or not 1 <= splits <= draws.shape[1]:
    raise ValueError(f"draws must be [B, M >= splits = {splits}], got shape {draws.shape}")
  m = draws.shape[1]
  block = max(1, (1 << 24) // (m * log_p.shape[1]))
  out = []
  for start in range(0, len(draws), block):
    lp = log_p[draws[start:start + block]]                                  # [b, M, C]
    scores = []
    for s in range(splits):
      part = lp[:, s * m // splits:(s + 1) * m // splits]                  # [b, n, C]
      top = part.max(1)
      finite_top = np.where(np.isfinite(top), top, 0.0)
      p = np.exp(part)
      with np.errstate(divide="ignore", invalid="ignore"):  # as `_split_score`
        log_marginal = finite_top + np.log(np.exp(part - finite_top[:, None]).sum(1) / part.shape[1])
        terms = np.where(p > 0, p * (part - log_marginal[:, None]), 0.0)
      scores.append(np.exp(terms.sum(2).mean(1)))
    out.append(np.mean(scores, axis=0))
  return np.concatenate(out)


def _features(x, name: str) -> np.ndarray:
  f = np.asarray(x, np.float64)
  if f.ndim != 2:
    raise ValueError(f"{name} must be [N, F], got shape {f.shape}")
  return f


def _sq_distances(a: np.ndarray, b: np.ndarray, b_sq_norms: np.ndarray) -> np.ndarray:
  """Squared Euclidean distances [len(a), len(b)], clipped at 0 against rounding."""
  d = a @ b.T
  d *= -2.0  # in place: one [len(a), len(b)] buffer per block
  d += np.sum(a * a, 1)[:, None]
  d += b_sq_norms[None, :]
  return np.maximum(d, 0.0, out=d)


def knn_sq_radii(features: np.ndarray, k: int = 3, batch_size: int = 512) -> np.ndarray:
  """Squared distance [N] from each row of features [N, F] to its k-th nearest other row.

  The point itself is excluded by index (not by distance), so duplicates of a point count as
  its neighbours at distance 0. Memory is O(batch_size · N).
  """
  f = _features(features, "features")
  n = len(f)
  if not 1 <= k < n:
    raise ValueError(f"k must be in [1, N - 1 = {n - 1}], got {k}")
  sq_norms = np.sum(f * f, 1)
  radii = np.empty(n)
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    d = _sq_distances(f[start:stop], f, sq_norms)
    d[np.arange(stop - start), np.arange(start, stop)] = np.inf
    radii[start:stop] = np.partition(d, k - 1, axis=1)[:, k - 1]
  return radii


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                     batch_size: int = 512) -> tuple[float, float]:
  """(precision, recall): the means of `precision_recall_indicators`; see there."""
  fake_covered, real_covered = precision_recall_indicators(real_features, fake_features, k, batch_size)
  return float(fake_covered.mean()), float(real_covered.mean())


def precision_recall_indicators(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                                batch_size: int = 512, real_radii: np.ndarray | None = None
                                ) -> tuple[np.ndarray, np.ndarray]:
  """Improved precision and recall (Kynkäänniemi et al. 2019).

  Each set's manifold is the union of balls around its points, of radius the distance to the
  point's k-th nearest neighbour in the same set (itself excluded). Precision is the fraction
  of fake samples inside the real manifold; recall the fraction of real samples inside the fake
  one. A point on a ball's boundary counts as inside.

  Args:
    real_features: [N, F], N > k.
    fake_features: [M, F], M > k.
    k: neighbourhood size (3 in the paper).
    batch_size: rows per block of the pairwise distance matrices; memory is
      O(batch_size · max(N, M)) float64: about 0.5 GB at 50k × 50k with the default.
    real_radii: `knn_sq_radii(real_features, k)` when the caller has it (the reference's, computed once for
      every row scored against it: at N = 50k it costs ~N² distances).

  Returns:
    (fake_covered [M] bool: inside the real manifold; real_covered [N] bool: inside the fake one); precision
    and recall are their means.
  """
  real = _features(real_features, "real_features")
  fake = _features(fake_features, "fake_features")
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"feature widths differ: {real.shape[1]} vs {fake.shape[1]}")
  real_radii = knn_sq_radii(real, k, batch_size) if real_radii is None else np.asarray(real_radii, np.float64)
  fake_radii = knn_sq_radii(fake, k, batch_size)
  fake_sq_norms = np.sum(fake * fake, 1)
  fake_covered = np.zeros(len(fake), bool)
  real_covered = np.zeros(len(real), bool)
  # One pass over real row blocks: the same block of distances answers both questions.
  for start in range(0, len(real), batch_size):
    stop = min(start + batch_size, len(real))
    d = _sq_distances(real[start:stop], fake, fake_sq_norms)  # [block, M]
    fake_covered |= np.any(d <= real_radii[start:stop, None], axis=0)
    real_covered[start:stop] = np.any(d <= fake_radii[None, :], axis=1)
  return fake_covered, real_covered


def density_coverage(real_features: np.ndarray, fake_features: np.ndarray, k: int = 5,
                     batch_size: int = 512) -> tuple[float, float]:
  """(density, coverage) from `density_coverage_indicators`; see there."""
  holds, covered = density_coverage_indicators(real_features, fake_features, k, batch_size)
  return float(holds.sum() / (k * len(holds))), float(covered.mean())


def density_coverage_indicators(real_features: np.ndarray, fake_features: np.ndarray, k: int = 5,
                                batch_size: int = 512, real_radii: np.ndarray | None = None
                                ) -> tuple[np.ndarray, np.ndarray]:
  """Density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative
  Models"; the SFD paper's Table 10 reports them).

  Around each real point a ball of radius its k-th nearest real neighbour (itself excluded), as in
  `precision_recall`. Density = (1 / kM) · Σ_fake (number of real balls holding it): 1 on average when the
  fakes follow the real distribution, above 1 where they crowd dense regions. Coverage = fraction of real
  balls holding at least one fake, in [0, 1]. A point on a ball's boundary counts as inside.

  Args:
    real_features: [N, F], N > k. fake_features: [M, F]. k: 5 in the paper. batch_size, real_radii: as in
      `precision_recall_indicators`.

  Returns:
    (holds [M] int: real balls holding each fake; covered [N] bool: real balls holding a fake). Density is
    holds.sum() / (k·M), coverage covered.mean().
  """
  real = _features(real_features, "real_features")
  fake = _features(fake_features, "fake_features")
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"feature widths differ: {real.shape[1]} vs {fake.shape[1]}")
  real_radii = knn_sq_radii(real, k, batch_size) if real_radii is None else np.asarray(real_radii, np.float64)
  fake_sq_norms = np.sum(fake * fake, 1)
  holds = np.zeros(len(fake), np.int64)   # real balls holding each fake
  covered = np.zeros(len(real), bool)
  for start in range(0, len(real), batch_size):
    stop = min(start + batch_size, len(real))
    inside = _sq_distances(real[start:stop], fake, fake_sq_norms) <= real_radii[start:stop, None]  # [block, M]
    holds += inside.sum(axis=0)
    covered[start:stop] = inside.any(axis=1)
  return holds, covered


def normal_interval(estimate: float, replicates, z: float = 1.959964) -> list[float]:
  """[lo, hi] = estimate ± z·(standard deviation of the bootstrap replicates), 95 % for the default z (NaN
  replicates dropped). Not the percentile interval: resampling with replacement repeats samples, which biases
  FID upwards (fewer distinct samples), so the replicates' percentiles can all lie above the estimate."""
  v = np.asarray(replicates, np.float64)
  v = v[np.isfinite(v)]
  if len(v) < 2:
    return [float("nan"), float("nan")]
  half = z * float(np.std(v, ddof=1))
  return [float(estimate) - half, float(estimate) + half]
