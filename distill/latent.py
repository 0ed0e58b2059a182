"""Latent space: what a run in an autoencoder's latent space needs below the methods.

A latent run diffuses scaled latents z = scale_factor · E(x) instead of pixels: the methods see latents as their
"images" (`Context.train_source`, `Context.image_shape`) and never know it; every picture or score is made from
`Context.decode`d samples. A `LatentSpace` is read from a finished 'autoencoder' stage (`open_space`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class LatentSpace:
  """encode(x [B, H, W, C] in [−1, 1], key=None) -> z [B, h, w, c] (scaled; the posterior mean, or a sample with a
  PRNG key); decode(z) -> x [B, H, W, C] in [−1, 1]; latents(split) -> (z [N, h, w, c] float32, labels [N] int32),
  the data set encoded once. latent_shape: (h, w, c); where: the autoencoder's stage directory."""
  encode: Callable
  decode: Callable
  latents: Callable
  latent_shape: tuple
  scale_factor: float
  where: str


def in_chunks(fn: Callable, x, batch: int) -> np.ndarray:
  """fn over x [N, ...] in chunks of `batch` rows, as one numpy array (decoding thousands of samples at once
  would hold every activation of the decoder)."""
  x = np.asarray(x)
  if len(x) == 0:
    return x
  return np.concatenate([np.asarray(fn(x[i:i + batch])) for i in range(0, len(x), batch)])
