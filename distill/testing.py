"""An exact classifier-free-guided teacher for tests: the ideal denoiser of a Gaussian mixture (docs/design.md §4).

Component k has mean μ_k, covariance s_k² I, weight π_k and class c(k). Given z_t = α x + σ ε:
  E[x | z_t, k] = μ_k + α s_k² / (α² s_k² + σ²) · (z_t − α μ_k),
mixed by responsibilities ∝ π_k N(z_t; α μ_k, (α² s_k² + σ²) I). Conditioning on class c restricts k
to c(k) = c; the null label (= num_classes) uses every component.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill import diffusion
from distill.schedules import alpha_sigma


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  means: np.ndarray    # [K, *shape]
  stds: np.ndarray     # [K]
  weights: np.ndarray  # [K], sums to 1
  classes: np.ndarray  # [K] int in [0, num_classes)
  num_classes: int

  @property
  def shape(self):
    return tuple(self.means.shape[1:])

  @classmethod
  def random(cls, key_seed: int, num_classes: int, shape=(2,), components_per_class: int = 1,
             mean_scale: float = 1.0, std: float = 0.3):
    rng = np.random.default_rng(key_seed)
    k = num_classes * components_per_class
    means = rng.normal(0.0, mean_scale, (k,) + tuple(shape)).astype(np.float32)
    stds = np.full((k,), std, np.float32) * rng.uniform(0.7, 1.3, k).astype(np.float32)
    return cls(means, stds, np.full((k,), 1.0 / k, np.float32),
               np.repeat(np.arange(num_classes), components_per_class), num_classes)

  def sample(self, rng, labels):
    """Draws x | class for labels [B] (int in [0, num_classes)). Returns [B, *shape]."""
    labels = np.asarray(labels)
    out = np.empty((len(labels),) + self.shape, np.float32)
    for c in np.unique(labels):
      comps = np.flatnonzero(self.classes == c)
      p = self.weights[comps] / self.weights[comps].sum()
      rows = np.flatnonzero(labels == c)
      k = rng.choice(comps, size=len(rows), p=p)
      out[rows] = self.means[k] + self.stds[k].reshape((-1,) + (1,) * len(self.shape)) * rng.standard_normal(
          (len(rows),) + self.shape)
    return out

  def denoise(self, z, logsnr, labels):
    """Exact E[x | z_t, class]. z: [B, *shape]; logsnr: [B]; labels: [B] int, num_classes = unconditional."""
    b = z.shape[0]
    d = int(np.prod(self.shape))
    zf = z.reshape(b, d)
    mu = jnp.asarray(self.means.reshape(-1, d))                 # [K, D]
    s2 = jnp.asarray(self.stds, jnp.float32) ** 2               # [K]
    alpha, sigma = alpha_sigma(logsnr)                          # [B]
    var = alpha[:, None] ** 2 * s2[None] + sigma[:, None] ** 2  # [B, K]
    resid = zf[:, None, :] - alpha[:, None, None] * mu[None]    # [B, K, D]
    logp = (jnp.log(jnp.asarray(self.weights))[None] - 0.5 * jnp.sum(resid**2, -1) / var
            - 0.5 * d * jnp.log(var))
    in_class = (jnp.asarray(self.classes)[None] == labels[:, None]) | (labels[:, None] == self.num_classes)
    resp = jax.nn.softmax(jnp.where(in_class, logp, -jnp.inf), axis=-1)  # [B, K]
    post = mu[None] + (alpha[:, None] * s2[None] / var)[..., None] * resid
    return jnp.einsum("bk,bkd->bd", resp, post).reshape(z.shape)

  def model_fn(self, z, logsnr, labels, w=None):
    """The `samplers.ModelFn` signature; w is ignored (the mixture is a plain CFG teacher)."""
    del w
    return self.denoise(z, logsnr, labels)


class TinyStudent(nn.Module):
  """A small MLP v-prediction student for training tests: the flattened image, Fourier features of λ/20 and
  w/4, and a one-hot of the label (num_labels classes, the null one included)."""
  num_labels: int
  hidden: int = 64

  @nn.compact
  def __call__(self, z, logsnr, labels, w):
    freqs = jnp.array([1.0, 2.0, 4.0, 8.0]) * jnp.pi / 2

    def fourier(v):
      return jnp.concatenate([jnp.sin(v[:, None] * freqs), jnp.cos(v[:, None] * freqs)], -1)

    h = jnp.concatenate([z.reshape(z.shape[0], -1), fourier(logsnr / 20.0), fourier(w / 4.0),
                         jax.nn.one_hot(labels, self.num_labels)], -1)
    h = nn.swish(nn.Dense(self.hidden)(h))
    h = nn.swish(nn.Dense(self.hidden)(h))
    return nn.Dense(int(np.prod(z.shape[1:])))(h).reshape(z.shape)


def tiny_student_x(num_labels: int):
  """The x-function of `TinyStudent(num_labels)` (no dropout: train and rng are ignored)."""
  def x_fn(params, z, logsnr, labels, w, *, train=False, rng=None):
    del train, rng
    out = TinyStudent(num_labels).apply({"params": params}, z, logsnr, labels, w)
    return diffusion.x_from_output(out, z, logsnr, "v")
  return x_fn


def write_tfds_array_record(tfds_name: str, data_dir: str, splits: dict) -> str:
  """Writes a TFDS data set in array_record format without TensorFlow, as `tfds build --file_format=array_record`
  lays it out, so `tfds.data_source` (and `distill.data.make_source`) read it like a prepared one.

  tfds_name: a registered image-classification builder ('cifar10', 'imagenet_resized/64x64'); its features
    must be {'image', 'label'} plus optional text fields ('id'), which are written empty.
  splits: {TFDS split name: (images uint8 [N, H, W, C], labels int [N])}; images are PNG-encoded (PIL).
  Returns the builder's version directory."""
  import io
  import os

  import PIL.Image
  import tensorflow_datasets as tfds
  from array_record.python import array_record_module
  from tensorflow_datasets.core import splits as splits_lib

  builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
  features = builder.info.features
  os.makedirs(builder.data_dir, exist_ok=True)
  split_infos = []
  for split, (images, labels) in splits.items():
    name = tfds_name.split("/")[0]
    path = os.path.join(builder.data_dir, f"{name}-{split}.array_record-00000-of-00001")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for i, (image, label) in enumerate(zip(images, labels)):
      buffer = io.BytesIO()
      PIL.Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format="PNG")
      example = {key: "" for key in features.keys()}
      example.update(image=buffer.getvalue(), label=int(label))
      if "id" in example:
        example["id"] = f"{split}_{i}"
      writer.write(features.serialize_example(example))
    writer.close()
    split_infos.append(splits_lib.SplitInfo(name=split, shard_lengths=[len(images)], num_bytes=0,
                                            filename_template=None))
  builder.info.set_splits(splits_lib.SplitDict(split_infos))
  builder.info.write_to_directory(builder.data_dir)
  return builder.data_dir


# --- comparing parameter trees --------------------------------------------------------------------------------


def tree_leaf_pairs(got, want) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """[(path, got leaf, want leaf)] of two pytrees that hold the same leaves under the same paths, as numpy.

  AssertionError when either tree is empty or their paths (names and count) differ, so that comparing the
  pairs cannot pass vacuously: zip() over two trees' leaves stops at the shorter and pairs leaves by position
  only. Container types are not compared (a restored checkpoint may hold a dict where a FrozenDict was saved)."""
  flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
  flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
  paths_got = [jax.tree_util.keystr(path) for path, _ in flat_got]
  paths_want = [jax.tree_util.keystr(path) for path, _ in flat_want]
  assert paths_want, "the expected tree has no leaves: a comparison would pass vacuously"
  if paths_got != paths_want:
    missing, extra = sorted(set(paths_want) - set(paths_got)), sorted(set(paths_got) - set(paths_want))
    raise AssertionError(f"trees differ in structure: {len(paths_got)} leaves vs {len(paths_want)} expected; "
                         f"missing {missing[:5]}, unexpected {extra[:5]}" +
                         ("" if missing or extra else "; same paths in another order"))
  return [(path, np.asarray(a), np.asarray(b)) for path, (_, a), (_, b) in zip(paths_got, flat_got, flat_want)]


def assert_trees_equal(got, want):
  """Bit-identical pytrees: the same paths (`tree_leaf_pairs`), and per leaf the same shape, dtype and values."""
  for path, a, b in tree_leaf_pairs(got, want):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    assert np.array_equal(a, b), f"{path} differs (max |diff| {np.max(np.abs(a.astype(np.float64) - b)):.3g})"
