"""`batching.in_batches`: the rows come back in order, equal to one call on all of them, whatever N is against the
batch; every batch has one shape (min(batch, N), or `batch` with full=True), so the function compiles once."""
import jax.numpy as jnp
import numpy as np
import pytest

from distill import batching


@pytest.mark.parametrize("n", [1, 5, 7, 8, 9, 23, 24])
@pytest.mark.parametrize("full", [False, True])
def test_rows_in_order_and_one_shape(n, full):
  rows = np.random.default_rng(n).standard_normal((n, 3)).astype(np.float32)
  shapes = []

  def fn(x):
    shapes.append(x.shape)
    return {"sum": jnp.sum(x, axis=1), "scaled": (2.0 * x, x[:, :1])}  # any pytree of [B, ...] arrays

  got = batching.in_batches(fn, rows, 8, full=full)
  np.testing.assert_allclose(got["sum"], rows.sum(axis=1), rtol=1e-6)
  np.testing.assert_allclose(got["scaled"][0], 2.0 * rows, rtol=1e-6)
  np.testing.assert_array_equal(got["scaled"][1], rows[:, :1])
  assert isinstance(got["sum"], np.ndarray) and got["sum"].shape == (n,)
  size = 8 if full else min(8, n)
  assert set(shapes) == {(size, 3)} and len(shapes) == -(-n // size)


def test_no_rows_is_refused():
  with pytest.raises(ValueError, match="no rows"):
    batching.in_batches(lambda x: x, np.zeros((0, 2)), 4)
