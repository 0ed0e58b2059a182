"""The shared two-DDIM-step block (`losses.two_ddim_steps`, `losses.two_step_distillation_target`) against a
slow float64 numpy hand computation, in both directions (sampling and encoding)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import losses, schedules

LOGSNR = schedules.cosine_logsnr
SHAPE = (6, 3, 3, 2)
PARAMS = {"a": jnp.asarray([0.7, -1.1, 1.4, 0.3], jnp.float32), "c": jnp.float32(0.8)}
TOL = 2e-5  # float32 against float64; every mutant below differs by more than 100 × TOL


def x_fn(params, z, logsnr, labels, w, *, train=False, rng=None):
  """A small nonlinear x-function (elementwise in z, so the numpy twin below is exact): reads λ, labels and w."""
  b = lambda v: v.reshape((-1,) + (1,) * (z.ndim - 1))
  return 1.2 * jnp.tanh(b(params["a"][labels]) * z + params["c"] * b(logsnr) / 10 + 0.1 * b(w))


def np_x(z, lam, labels, w):
  b = lambda v: np.asarray(v, np.float64).reshape((-1,) + (1,) * (z.ndim - 1))
  a = np.asarray(PARAMS["a"], np.float64)[labels]
  return 1.2 * np.tanh(b(a) * z + float(PARAMS["c"]) * b(lam) / 10 + 0.1 * b(w))


def np_alpha_sigma(lam):
  lam = np.asarray(lam, np.float64)[:, None, None, None]
  return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


def np_ddim(z_t, x_hat, lam_t, lam_s, sign=1.0):
  """z_s = α_s x̂ + σ_s (z_t − α_t x̂)/σ_t (sign = −1: the mutant with the ε term's sign flipped)."""
  a_t, s_t = np_alpha_sigma(lam_t)
  a_s, s_s = np_alpha_sigma(lam_s)
  return a_s * x_hat + sign * s_s * (z_t - a_t * x_hat) / s_t


def np_two_steps(z_t, lams, labels, w, sign=1.0):
  lam_t, lam_1, lam_2 = lams
  x0 = np_x(z_t, lam_t, labels, w)
  z1 = np_ddim(z_t, x0, lam_t, lam_1, sign)
  x1 = np_x(z1, lam_1, labels, w)
  return np_ddim(z1, x1, lam_1, lam_2, sign), x0, x1


def np_target(z_t, z_2, lam_t, lam_2):
  """x̃ = (z_t'' − (σ_t''/σ_t) z_t) / (α_t'' − (σ_t''/σ_t) α_t)."""
  a_t, s_t = np_alpha_sigma(lam_t)
  a_2, s_2 = np_alpha_sigma(lam_2)
  r = s_2 / s_t
  return (z_2 - r * z_t) / (a_2 - r * a_t)


def _inputs(direction, seed=0):
  """Rows at varied t with steps of 0.1 (sampling: t' = t − 0.1, t'' = t − 0.2; encoding: +0.1, +0.2).
  Returns z_t [B, H, W, C] float32, (λ_t, λ_t', λ_t'') float32 [B] each, labels, w."""
  rng = np.random.default_rng(seed)
  t = np.linspace(0.35, 0.75, SHAPE[0])
  ts = (t, t + 0.1 * direction, t + 0.2 * direction)
  lams = tuple(LOGSNR(jnp.asarray(s, jnp.float32)) for s in ts)
  a, s = np_alpha_sigma(lams[0])
  z_t = jnp.asarray(a * rng.standard_normal(SHAPE) + s * rng.standard_normal(SHAPE), jnp.float32)
  labels = jnp.asarray(np.arange(SHAPE[0]) % 4, jnp.int32)
  w = jnp.asarray(np.linspace(0.0, 4.0, SHAPE[0]), jnp.float32)
  return z_t, lams, labels, w


def _np(*arrays):
  return tuple(np.asarray(a, np.float64) for a in arrays)


@pytest.mark.parametrize("direction", [-1, 1], ids=["sampling", "encoding"])
def test_two_ddim_steps_match_the_hand_loop(direction):
  z_t, lams, labels, w = _inputs(direction)
  z64, lams64 = np.asarray(z_t, np.float64), _np(*lams)
  want = np_two_steps(z64, lams64, labels, w)
  got = _np(*jax.jit(lambda z: losses.two_ddim_steps(x_fn, PARAMS, z, lams, labels, w))(z_t))
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, atol=TOL, rtol=0)
  # The tolerance catches t' and t'' swapped, and a sign error in the steps.
  swapped = np_two_steps(z64, (lams64[0], lams64[2], lams64[1]), labels, w)
  assert np.max(np.abs(swapped[0] - want[0])) > 100 * TOL
  flipped = np_two_steps(z64, lams64, labels, w, sign=-1.0)
  assert np.max(np.abs(flipped[0] - want[0])) > 100 * TOL
  # Given x̂(z_t), the block evaluates only z_t' and lands on the same z_t''.
  given = _np(*losses.two_ddim_steps(x_fn, PARAMS, z_t, lams, labels, w, x_hat_t=x_fn(PARAMS, z_t, lams[0], labels,
                                                                                       w)))
  for g, h in zip(given, got):
    np.testing.assert_allclose(g, h, atol=1e-6, rtol=0)


@pytest.mark.parametrize("direction", [-1, 1], ids=["sampling", "encoding"])
def test_distillation_target_matches_the_closed_form(direction):
  z_t, lams, labels, w = _inputs(direction)
  z64, lams64 = np.asarray(z_t, np.float64), _np(*lams)
  z2, x0, x1 = np_two_steps(z64, lams64, labels, w)
  want = np_target(z64, z2, lams64[0], lams64[2])
  target, steps = losses.two_step_distillation_target(x_fn, PARAMS, z_t, lams, labels, w)
  (target,) = _np(target)
  # x̃ is in x-space, divided by α_t'' − (σ_t''/σ_t) α_t; scale the tolerance by that slope's inverse.
  a_t, s_t = np_alpha_sigma(lams64[0])
  a_2, s_2 = np_alpha_sigma(lams64[2])
  tol = TOL / np.min(np.abs(a_2 - s_2 / s_t * a_t))
  np.testing.assert_allclose(target, want, atol=tol, rtol=0)
  for g, r in zip(_np(*steps), (z2, x0, x1)):
    np.testing.assert_allclose(g, r, atol=TOL, rtol=0)
  # One DDIM step t → t'' with x̃ lands on the two steps' z_t''.
  np.testing.assert_allclose(np_ddim(z64, target, lams64[0], lams64[2]), z2, atol=TOL, rtol=0)
  # Mutants: t' and t'' swapped; the target's ratio inverted (σ_t/σ_t''), or its sign flipped.
  zs = np_two_steps(z64, (lams64[0], lams64[2], lams64[1]), labels, w)[0]
  assert np.max(np.abs(np_target(z64, zs, lams64[0], lams64[1]) - want)) > 100 * tol
  r_bad = s_t / s_2
  assert np.max(np.abs((z2 - r_bad * z64) / (a_2 - r_bad * a_t) - want)) > 100 * tol
  assert np.max(np.abs((z2 + s_2 / s_t * z64) / (a_2 + s_2 / s_t * a_t) - want)) > 100 * tol

  # Passing x̂(z_t) gives the same target as computing it.
  x_hat_t = x_fn(PARAMS, z_t, lams[0], labels, w)
  given, given_steps = losses.two_step_distillation_target(x_fn, PARAMS, z_t, lams, labels, w, x_hat_t=x_hat_t)
  np.testing.assert_allclose(*_np(given, target), atol=1e-6, rtol=0)
  for g, h in zip(_np(*given_steps), _np(*steps)):
    np.testing.assert_allclose(g, h, atol=1e-6, rtol=0)


def test_last_step_rows_take_the_second_evaluation():
  z_t, lams, labels, w = _inputs(-1)
  is_last = jnp.asarray(np.arange(SHAPE[0]) % 2 == 0)
  plain, (_, _, x_hat_1) = losses.two_step_distillation_target(x_fn, PARAMS, z_t, lams, labels, w)
  got, _ = losses.two_step_distillation_target(x_fn, PARAMS, z_t, lams, labels, w, is_last=is_last)
  got, plain, x_hat_1 = _np(got, plain, x_hat_1)
  last = np.asarray(is_last)
  np.testing.assert_array_equal(got[last], x_hat_1[last])
  np.testing.assert_array_equal(got[~last], plain[~last])
  # is_last all False is the plain closed form.
  none_last, _ = losses.two_step_distillation_target(x_fn, PARAMS, z_t, lams, labels, w,
                                                     is_last=jnp.zeros(SHAPE[0], bool))
  np.testing.assert_array_equal(np.asarray(none_last, np.float64), plain)


def test_target_is_detached():
  z_t, lams, labels, w = _inputs(-1)

  def total(params, z, x_hat_t):
    target, (z_2, x0, x1) = losses.two_step_distillation_target(x_fn, params, z, lams, labels, w, is_last=None,
                                                                 x_hat_t=x_hat_t)
    return jnp.sum(target) + jnp.sum(z_2) + jnp.sum(x0) + jnp.sum(x1)

  x_hat_t = x_fn(PARAMS, z_t, lams[0], labels, w)
  grads = jax.grad(total, argnums=(0, 1, 2))(PARAMS, z_t, x_hat_t)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
  # The steps alone are differentiable (the block is what detaches).
  g = jax.grad(lambda p: jnp.sum(losses.two_ddim_steps(x_fn, p, z_t, lams, labels, w)[0]))(PARAMS)
  assert float(jnp.max(jnp.abs(g["a"]))) > 0
