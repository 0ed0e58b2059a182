"""A jitted function over many rows in batches of one shape: the loop every network that embeds, classifies,
encodes or decodes a data set runs (Inception, the data set's classifier, CLIP's towers, the text encoders, the
autoencoder's decoder).

The last batch is padded by repeating its last row, so every batch has the same shape and the function compiles
once for any row count; the padded rows' outputs are dropped.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def in_batches(fn: Callable[[Any], Any], rows, batch: int, *, full: bool = False):
  """fn over rows [N, ...] (numpy) in batches of `batch` rows → fn's output (an array or a pytree of arrays, each
  [N, ...]) as numpy. Every batch has min(batch, N) rows, or `batch` rows when `full` (a caller whose row counts
  vary below one batch compiles one shape for all of them). Rows reach fn as jnp arrays."""
  rows = np.asarray(rows)
  n = len(rows)
  if n == 0:
    raise ValueError("in_batches: no rows")
  size = int(batch) if full else min(int(batch), n)
  outs = []
  for start in range(0, n, size):
    part = rows[start:start + size]
    valid = len(part)
    if valid < size:
      part = np.concatenate([part, np.repeat(part[-1:], size - valid, axis=0)])
    outs.append(jax.tree.map(lambda o: np.asarray(o)[:valid], fn(jnp.asarray(part))))
  return jax.tree.map(lambda *o: np.concatenate(o), *outs)
