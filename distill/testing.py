"""An exact classifier-free-guided teacher for tests: the ideal denoiser of a Gaussian mixture (DESIGN §4).

Component k has mean μ_k, covariance s_k² I, weight π_k and class c(k). Given z_t = α x + σ ε:
  E[x | z_t, k] = μ_k + α s_k² / (α² s_k² + σ²) · (z_t − α μ_k),
mixed by responsibilities ∝ π_k N(z_t; α μ_k, (α² s_k² + σ²) I). Conditioning on class c restricts k
to c(k) = c; the null label (= num_classes) uses every component.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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
