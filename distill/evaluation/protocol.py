"""The evaluation protocol: which network gives features, the reference statistics of the training split,
and the metrics of one set of samples.

Two feature networks, never mixed in one report:

* ``inception``: the FID InceptionV3 (pytorch-fid's port of the 2015-12-05 TF graph, `inception.py`);
  pool3 features [2048] for FID and precision/recall, the 1008-way softmax for IS.
* ``classifier``: for data sets without an Inception protocol (digits, small `.npz`), the data set's own
  small classifier (`classifier.py`): penultimate features for "classifier-FID" and classifier-precision/
  recall, its softmax for "classifier-IS".

Protocol, both networks: samples in [−1, 1] are first quantised to 8-bit levels, round((x + 1)·127.5), and
mapped back to [−1, 1] — as if saved to PNG, which is how the reference images reach the network. The
reference is the training split (all of it, or its first `max_reference` images in the data set's order).
FID: Fréchet distance of Gaussian fits (`fid.py`); IS: `splits` contiguous splits of a fixed random
permutation of the samples (`metrics.py`);
precision/recall: Kynkäänniemi et al. with k = 3 against up to `max_reference` reference features.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import jax
import numpy as np

from distill import batching
from distill.evaluation import classifier as classifier_lib
from distill.evaluation import fid, inception, metrics

METRICS = ("classifier", "inception")
EMBEDDED = ("digits", "npz", "mixture", "fashion_mnist")  # data sets without an Inception protocol


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """outputs: images [N, H, W, C] in [−1, 1] → (features [N, F], logits [N, K]), numpy."""
  metric: str
  outputs: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  description: str


def quantize(images) -> np.ndarray:
  """[−1, 1] floats → the nearest of the 256 levels an 8-bit image can hold, still in [−1, 1]."""
  levels = np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255)
  return levels / 127.5 - 1.0


def classifier_net(params, num_classes: int, test_accuracy: float | None = None) -> FeatureNet:
  def outputs(images):
    images = quantize(images)
    return (classifier_lib.features(params, images, num_classes),
            classifier_lib.logits(params, images, num_classes))
  acc = "" if test_accuracy is None else f", test accuracy {test_accuracy:.4f}"
  return FeatureNet("classifier", outputs, f"the data set's own classifier{acc}")


_inception_apply = jax.jit(inception.inception_outputs)


def inception_net(params, batch_size: int = 100) -> FeatureNet:
  params = jax.device_put(params)  # once, not per batch

  def outputs(images):  # (features, logits); one shape for every row count: one compilation
    return batching.in_batches(lambda x: _inception_apply(params, x), quantize(images), batch_size, full=True)

  return FeatureNet("inception", outputs, f"FID InceptionV3 ({inception.WEIGHTS_FILE})")


@dataclasses.dataclass(frozen=True)
class Reference:
  mu: np.ndarray        # [F]
  sigma: np.ndarray     # [F, F]
  features: np.ndarray  # [M, F]: for precision/recall
  num_images: int
  stats_source: str = ""  # where mu/sigma come from, when not from `features` (eval.reference_stats)
  radii: dict = dataclasses.field(default_factory=dict, compare=False)  # k -> knn_sq_radii(features, k), memoised

  def knn_radii(self, k: int) -> np.ndarray:
    """Squared distance [M] from each reference feature to its k-th nearest other one, computed once per
    reference (every row's precision/recall and density/coverage use the same ones)."""
    if k not in self.radii:
      self.radii[k] = metrics.knn_sq_radii(self.features, k)
    return self.radii[k]


def reference_stats(net: FeatureNet, batches: Callable[[], Iterable[np.ndarray]], cache_path: str) -> Reference:
  """Statistics of the reference images (computed once, cached at `cache_path` as .npz).

  batches: () → iterable of [b, H, W, C] in [−1, 1], called only when the cache is absent."""
  from etils import epath
  from distill import writers  # deferred: it imports TensorBoard's protos
  if epath.Path(cache_path).exists():
    with writers.read_npz(cache_path) as d:
      if str(d["metric"]) == net.metric:
        return Reference(d["mu"], d["sigma"], d["features"], int(d["num_images"]))
  feats = np.concatenate([net.outputs(b)[0] for b in batches()])
  mu, sigma = fid.gaussian_stats(feats)
  # Renamed into place, creating the directory (local or a URL).
  writers.atomic_write_bytes(cache_path, writers.npz_bytes(mu=mu, sigma=sigma, features=feats.astype(np.float32),
                                                           num_images=len(feats), metric=net.metric))
  return Reference(mu, sigma, feats, len(feats))


def load_reference_stats(path: str, width: int) -> tuple[np.ndarray, np.ndarray]:
  """(mu [F], sigma [F, F]) of a published reference-statistics file: the `.npz` with arrays 'mu' and 'sigma'
  that pytorch-fid (`fid_statistics_*.npz`) and EDM (`fid-refs/*.npz`) distribute, read without pickles.
  ValueError (one line) for a missing file, missing arrays, shapes that do not fit `width` features, or
  values that are not finite or a covariance that is not symmetric."""
  from etils import epath
  from distill import writers
  if not epath.Path(path).is_file():
    raise ValueError(f"{path!r}: no such file")
  try:
    with writers.read_npz(path) as d:
      missing = sorted({"mu", "sigma"} - set(d.files))
      if missing:
        raise ValueError(f"{path!r}: no {' or '.join(missing)} array (has {sorted(d.files)})")
      mu, sigma = np.asarray(d["mu"], np.float64), np.asarray(d["sigma"], np.float64)
  except (OSError, ValueError) as e:
    if str(e).startswith(repr(path)):
      raise
    raise ValueError(f"{path!r}: not a readable .npz ({type(e).__name__}: {e})") from e
  if mu.shape != (width,) or sigma.shape != (width, width):
    raise ValueError(f"{path!r}: mu {mu.shape} and sigma {sigma.shape} do not fit this metric's {width} features")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))) or not np.allclose(sigma, sigma.T, atol=1e-6):
    raise ValueError(f"{path!r}: mu/sigma must be finite and sigma symmetric")
  return mu, sigma


def resolve_metric(config) -> str:
  """eval.metric, with 'auto' = classifier features for embedded data sets, Inception's otherwise."""
  metric = config.eval.get("metric", "auto")
  if metric != "auto":
    return metric
  return "classifier" if config.data.name in EMBEDDED else "inception"


def score(net: FeatureNet, ref: Reference, images, *, is_splits: int = 10, pr_k: int = 3, dc_k: int = 5,
          bootstrap: int = 0, seed: int = 0) -> dict:
  """FID, IS (mean and std over splits), precision and recall (k = pr_k), density and coverage (k = dc_k) of
  `images` [N, H, W, C] in [−1, 1]; with bootstrap = B > 0 a 95 % interval of each (`<key>_ci`): the estimate ±
  1.96 standard deviations of B resamplings of the samples (`bootstrap_replicates`), clipped to the metric's
  range (`clip_intervals`)."""
  feats, logits = net.outputs(images)
  mu, sigma = fid.gaussian_stats(feats)
  # IS splits are contiguous chunks; samples come class by class, so split a fixed random permutation (a
  # split holding one class would score ≈ 1 however good the samples are).
  order = np.random.default_rng(0).permutation(len(logits))
  is_mean, is_std = metrics.inception_score(logits[order], splits=min(is_splits, len(images)), from_logits=True)
  fake_in, real_in = metrics.precision_recall_indicators(ref.features, feats, k=pr_k, real_radii=ref.knn_radii(pr_k))
  # Density/coverage need more than k reference points (tiny test references have fewer): left out then.
  dc = (metrics.density_coverage_indicators(ref.features, feats, k=dc_k, real_radii=ref.knn_radii(dc_k))
        if len(ref.features) > dc_k else None)
  out = {"fid": fid.frechet_distance(mu, sigma, ref.mu, ref.sigma), "is": float(is_mean), "is_std": float(is_std),
         "precision": float(fake_in.mean()), "recall": float(real_in.mean()),
         "density": float(dc[0].sum() / (dc_k * len(feats))) if dc else None,
         "coverage": float(dc[1].mean()) if dc else None, "num_samples": int(len(images)), "metric": net.metric}
  if bootstrap:
    reps = bootstrap_replicates(feats, logits[order], ref, fake_in, real_in, dc, dc_k=dc_k,
                                is_splits=min(is_splits, len(images)), num=bootstrap, seed=seed)
    out.update({f"{k}_ci": metrics.normal_interval(out[k], v) for k, v in reps.items()})
  return clip_intervals(out)


# Where each metric can lie: an interval is clipped to it (an estimate ± 1.96 SD near 0 would reach below an
# FID's 0). IS lies in [1, classes]; its upper end is left open here.
METRIC_RANGES = {"fid": (0.0, None), "is": (1.0, None), "precision": (0.0, 1.0), "recall": (0.0, 1.0),
                 "density": (0.0, None), "coverage": (0.0, 1.0), "class_agreement": (0.0, 1.0),
                 "text_score": (0.0, 100.0), "clip_score": (0.0, 100.0)}


def clip_intervals(scores: dict) -> dict:
  """scores with every `<metric>_ci` clipped to the metric's range (METRIC_RANGES); other keys as they are."""
  out = dict(scores)
  for k, (lo, hi) in METRIC_RANGES.items():
    ci = out.get(f"{k}_ci")
    if ci and all(v is not None and np.isfinite(v) for v in ci):
      out[f"{k}_ci"] = [max(ci[0], lo) if lo is not None else ci[0], min(ci[1], hi) if hi is not None else ci[1]]
  return out


SEED_METRICS = ("fid", "is", "precision", "recall", "density", "coverage", "class_agreement", "text_score",
                "clip_score")


def combine_seeds(per_seed: list[dict]) -> dict:
  """One row's scores from S >= 2 noise seeds (each a `score` dict): every metric in SEED_METRICS is the mean
  over seeds, `<key>_seeds` the per-seed values and `<key>_ci` the 95 % Student-t interval of that mean,
  mean ± t(0.975, S − 1)·s/√S with s the seeds' standard deviation. A seed's own bootstrap interval is
  conditional on its noise; the spread over seeds includes the noise, so with seeds it is the interval reported.
  Other keys come from the first seed; `seeds` = S, `interval` = 'seeds'."""
  from scipy import stats
  if len(per_seed) < 2:
    raise ValueError(f"combine_seeds needs at least 2 seeds, got {len(per_seed)}")
  out = {k: v for k, v in per_seed[0].items() if not k.endswith("_ci")}
  t = float(stats.t.ppf(0.975, len(per_seed) - 1))
  for k in SEED_METRICS:
    values = [s.get(k) for s in per_seed]
    if any(v is None for v in values):
      continue
    v = np.asarray(values, np.float64)
    mean, half = float(v.mean()), t * float(v.std(ddof=1)) / np.sqrt(len(v))
    out.update({k: mean, f"{k}_seeds": [float(x) for x in v], f"{k}_ci": [mean - half, mean + half]})
  out.update(seeds=len(per_seed), interval="seeds")
  return clip_intervals(out)


def bootstrap_replicates(feats, logits, ref: Reference, fake_in, real_in, dc, *, dc_k: int, is_splits: int,
                         num: int, seed: int = 0) -> dict:
  """{metric: [num] replicates} of `num` bootstrap resamplings (with replacement, a fixed seed); `score` turns
  their spread into 95 % intervals (`metrics.normal_interval`).

  FID and IS recompute on resampled samples (features [M, F], logits [M, C]) against the fixed reference. The
  nearest-neighbour metrics resample the per-point indicators of the side they average over: precision and
  density the samples' (the real manifold held fixed), recall and coverage the reference points' (the
  samples' manifold held fixed), so their intervals are conditional on the other set."""
  rng = np.random.default_rng(seed)
  m, n = len(feats), len(real_in)
  reps = {k: [] for k in ("fid", "is", "precision", "recall", "density", "coverage")}
  draws = []
  for _ in range(num):
    i = rng.integers(0, m, m)
    j = rng.integers(0, n, n)
    draws.append(i)
    reps["precision"].append(fake_in[i].mean())
    reps["recall"].append(real_in[j].mean())
    if dc is not None:
      reps["density"].append(dc[0][i].sum() / (dc_k * m))
      reps["coverage"].append(dc[1][j].mean())
  if draws:  # every resampling's FID and IS at once (the same numbers as one resampling at a time)
    counts = np.stack([np.bincount(i, minlength=m) for i in draws])
    reps["fid"] = list(fid.resampled_distances(feats, counts, ref.mu, ref.sigma))
    reps["is"] = list(metrics.resampled_inception_scores(logits, np.stack(draws), is_splits))
  return {k: v for k, v in reps.items() if v}
