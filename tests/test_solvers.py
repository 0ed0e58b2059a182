"""ODE solvers against the exact Gaussian-mixture denoiser: convergence orders, a float64 loop, DDIM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from distill import samplers, schedules, solvers
from distill.testing import GaussianMixture

# Three classes, one component each, in 2-D; label 3 is the unconditional mixture.
GMM = GaussianMixture.random(0, num_classes=3, shape=(2,), mean_scale=1.0, std=0.3)
B = 64
LABELS = jnp.asarray(np.arange(B) % 4)
DEN = samplers.conditional_denoiser(GMM.model_fn, LABELS)
X_INIT = 80.0 * jax.random.normal(jax.random.PRNGKey(0), (B, 2))


def edm(n, sigma_min=0.002):
  return solvers.edm_grid(n, sigma_min, 80.0)


_FINALS = {}


def final(name: str, n: int, sigma_min: float = 0.002, also=()) -> np.ndarray:
  """The solver's result from X_INIT on the EDM grid of n steps. Step counts in `also` are solved in the same
  jit (one compilation costs about as much as the solves), and all are cached."""
  missing = [m for m in (n, *also) if (name, m, sigma_min) not in _FINALS]
  if missing:
    solver = solvers.get_solver(name)
    outs = jax.jit(lambda x: [solvers.solve(solver, DEN, x, edm(m, sigma_min)).x for m in missing])(X_INIT)
    _FINALS.update({(name, m, sigma_min): np.asarray(o, np.float64) for m, o in zip(missing, outs)})
  return _FINALS[(name, n, sigma_min)]


def rms(a, b):
  return float(np.sqrt(np.mean((a - b) ** 2)))


# --- independent float64 reference: the VE denoiser in closed form and plain loops ---------------------------


def np_ve_denoise(x, sigma, labels):
  """E[data | x = data + σε, class] for GMM in float64, written in the VE view directly."""
  mu, s2 = GMM.means.astype(np.float64), GMM.stds.astype(np.float64) ** 2
  var = s2 + sigma**2                                                   # [K]
  logp = np.log(GMM.weights)[None] - 0.5 * ((x[:, None] - mu[None]) ** 2).sum(-1) / var - np.log(var)  # d = 2
  logp = np.where((GMM.classes[None] == labels[:, None]) | (labels[:, None] == GMM.num_classes), logp, -np.inf)
  r = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
  post = mu[None] + (s2 / var)[None, :, None] * (x[:, None] - mu[None])
  return np.einsum("bk,bkd->bd", r, post)


def np_solve(name, x, sigmas, labels):
  """The solvers as obvious float64 loops (EDM Alg. 1, DPM-Solver-2, DPM-Solver++ multistep)."""
  x = np.asarray(x, np.float64)
  D = lambda x, s: np_ve_denoise(x, s, labels)
  n, hist = len(sigmas) - 1, []
  for i in range(n):
    s, t = sigmas[i], sigmas[i + 1]
    d0 = D(x, s)
    if t == 0:
      x = d0
    elif name == "euler":
      x = x + (t - s) * (x - d0) / s
    elif name == "heun":
      d = (x - d0) / s
      xe = x + (t - s) * d
      x = x + (t - s) * 0.5 * (d + (xe - D(xe, t)) / t)
    elif name == "dpm_solver_2s":
      m = np.sqrt(s * t)
      xm = x + (m - s) * (x - d0) / s
      x = x + (t - s) * (xm - D(xm, m)) / m
    else:
      top = 2 if name == "dpmpp_2m" else 3
      order = i + 1 if i + 1 < top else min(top, n - i)
      lam = lambda v: -np.log(v)
      h = lam(t) - lam(s)
      p1 = np.expm1(-h)
      p2 = p1 / h + 1
      p3 = p2 / h - 0.5
      new = (t / s) * x - p1 * d0
      if order >= 2:
        (s1, dm1) = hist[-1]
        r0 = (lam(s) - lam(s1)) / h
        d10 = (d0 - dm1) / r0
        new = new - 0.5 * p1 * d10
      if order == 3:
        (s2, dm2) = hist[-2]
        r1 = (lam(s1) - lam(s2)) / h
        d11 = (dm1 - dm2) / r1
        d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
        d2 = (2.0 if name == "dpmpp_3m_taylor" else 1.0) * (d10 - d11) / (r0 + r1)
        new = (t / s) * x - p1 * d0 + p2 * d1 - p3 * d2
      x = new
    hist.append((s, d0))
  return x


@pytest.mark.parametrize("name", sorted(solvers.SOLVERS))
def test_solvers_match_a_float64_loop(name):
  got = final(name, 10, 0.006, also=(1024,) if name == "dpmpp_3m_taylor" else ())
  want = np_solve(name, np.asarray(X_INIT), edm(10, 0.006), np.asarray(LABELS))
  assert rms(got, want) < 2e-5, rms(got, want)


@pytest.mark.parametrize("name", sorted(solvers.SOLVERS))
def test_a_traced_grid_matches_the_float64_loop_with_one_compilation(name):
  """Alg. 3's sub-grids (4 steps between two points of a 5-step grid), as traced values through one jit."""
  solver, traces = solvers.SOLVERS[name], []
  den = solvers.ve_denoiser(samplers.conditional_denoiser(GMM.model_fn, LABELS))

  @jax.jit
  def run(x, sub):
    traces.append(1)
    return solvers.integrate_traced(solver, den, x, sub)[0]

  coarse = edm(5, 0.006)
  for i in (0, 2, 4):
    sub = np.asarray(solvers.edm_grid(4, coarse[i + 1], coarse[i]))  # 4 steps from coarse[i] to coarse[i+1]
    x = np.asarray(X_INIT) * coarse[i] / 80.0
    got = run(jnp.asarray(x, jnp.float32), jnp.asarray(sub, jnp.float32))
    want = np_solve(name, x, sub, np.asarray(LABELS))
    assert rms(np.asarray(got, np.float64), want) < 2e-5 * max(1.0, coarse[i]), (i, rms(got, want))
  assert len(traces) == 1
  assert solvers.integrate_traced(solver, den, X_INIT, edm(3))[1] == 3 * solver.evals_per_step


@pytest.mark.parametrize("name", ["heun", "dpm_solver_2s", "dpmpp_3m"])
def test_a_step_to_zero_returns_the_last_x_hat_with_one_evaluation(name):
  grid = np.append(edm(6, 0.01), 0.0)  # 7 steps, the last to σ = 0
  solver = solvers.SOLVERS[name]
  out = jax.jit(lambda x: solvers.solve(solver, DEN, x, grid))(X_INIT)
  assert out.nfe == (13 if solver.evals_per_step == 2 else 7)
  np.testing.assert_allclose(out.x, np_solve(name, np.asarray(X_INIT), grid, np.asarray(LABELS)), atol=2e-5)


def test_nfe_counts_calls_of_the_denoiser():
  guided = samplers.guided_denoiser(GMM.model_fn, LABELS % 3, 1.0, GMM.num_classes)

  def count(solver, den, afs=False):  # nfe is known at trace time: trace, do not run
    box = []
    jax.eval_shape(lambda x: box.append(solvers.solve(solver, den, x, edm(3), afs=afs).nfe) or x, X_INIT)
    return box[0]

  assert count(solvers.HEUN, guided) == 12                # CFG: 2 per call, 2 calls per step
  assert count(solvers.DPMPP_3M, guided) == 6
  assert count(solvers.EULER, DEN, afs=True) == 2         # AFS replaces the first call
  assert count(solvers.DPM_SOLVER_2S, DEN, afs=True) == 5


def test_euler_on_the_vp_grid_is_ddim_sample():
  z = jax.random.normal(jax.random.PRNGKey(1), (B, 2))
  n = 12
  grid = solvers.vp_sigmas(n, schedules.cosine_logsnr)  # σ_VE(t = 1 − i/N), then exactly 0
  assert grid[-1] == 0.0 and abs(grid[0] - np.exp(10.0)) < 1.0
  x_init = solvers.vp_to_ve(z, schedules.cosine_logsnr(1.0))
  got = jax.jit(lambda x: solvers.solve(solvers.EULER, DEN, x, grid))(x_init)
  want = jax.jit(lambda z: samplers.ddim_sample(DEN, z, schedules.cosine_logsnr, n))(z)
  assert got.nfe == want.nfe == n
  np.testing.assert_allclose(got.x, want.x, atol=1e-4)


# --- convergence ---------------------------------------------------------------------------------------------

# dpmpp_3m is the reference codes' update, second order asymptotically (see distill.solvers); on this mixture its
# second- and third-order error terms nearly cancel up to N ≈ 64, so its slope is fitted further out.
EXPECTED_ORDER = {"euler": 1, "heun": 2, "dpm_solver_2s": 2, "dpmpp_2m": 2, "dpmpp_3m": 2, "dpmpp_3m_taylor": 3}
STEPS = {name: (32, 64, 128) for name in EXPECTED_ORDER} | {"dpmpp_3m": (96, 128, 192)}


def reference():
  return final("dpmpp_3m_taylor", 1024, also=STEPS["dpmpp_3m_taylor"])


def test_reference_solution_is_converged():
  # Heun at 1024 steps is within its own error (≈ 5e-6, extrapolating its fit below) of the reference, whose
  # error (≈ 5e-8 by its fit) is far below float32 round-off (~1e-6) and the smallest error fitted (> 1e-5).
  assert rms(reference(), final("heun", 1024, also=STEPS["heun"])) < 1e-5


@pytest.mark.parametrize("name", sorted(EXPECTED_ORDER))
def test_error_shrinks_at_the_solvers_order(name):
  steps = STEPS[name]
  errs = [rms(final(name, n, also=steps), reference()) for n in steps]
  slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
  print(f"{name}: rms errors {['%.2e' % e for e in errs]} at N={steps}, slope {slope:.2f}")
  assert min(errs) > 1e-5  # ten times float32 round-off, so the slope is the solver's
  assert abs(slope - EXPECTED_ORDER[name]) < 0.35, (name, slope, errs)


def test_third_order_update_is_exact_for_a_quadratic_x_hat_only_with_the_taylor_d2():
  # x̂(λ) = λ², λ = −log σ, independent of x: the VE ODE x' = (σ'/σ)x + σ' ∫ e^λ λ² dλ has a closed form.
  sig = [3.0, 2.0, 1.2, 0.7]
  lam = [-np.log(s) for s in sig]
  x = jnp.full((1, 1), 0.5)
  hist = solvers.History(tuple(sig[:2]), tuple(jnp.full((1, 1), l**2) for l in lam[:2]))
  antiderivative = lambda l: np.exp(l) * (l**2 - 2 * l + 2)
  exact = sig[3] / sig[2] * 0.5 + sig[3] * (antiderivative(lam[3]) - antiderivative(lam[2]))
  x_hat = jnp.full((1, 1), lam[2] ** 2)
  taylor = solvers.dpmpp_taylor_step(None, x, x_hat, sig[2], sig[3], hist, 3)
  ref = solvers.dpmpp_step(None, x, x_hat, sig[2], sig[3], hist, 3)
  assert abs(float(taylor[0, 0]) - exact) < 1e-5
  assert abs(float(ref[0, 0]) - exact) > 1e-2  # the reference update misses half the x̂'' term


def test_dpmpp_3m_beats_ddim_at_ten_evaluations():
  ref = final("dpmpp_3m_taylor", 1024, 0.006, also=(10,))
  err = {name: rms(final(name, 10, 0.006), ref) for name in ("euler", "dpmpp_2m", "dpmpp_3m", "dpmpp_3m_taylor")}
  print({k: f"{v:.2e}" for k, v in err.items()})
  assert err["dpmpp_3m"] < 0.85 * err["euler"], err
  assert err["dpmpp_2m"] < 0.5 * err["euler"], err  # on a mixture, 2M is the best of them at 10 steps


# --- the single-step interface ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["heun", "dpmpp_3m"])
def test_public_step_functions_compose_to_the_solver(name):
  # The scan-based driver equals a hand loop over the exposed step functions with an explicit history.
  solver, grid = solvers.SOLVERS[name], edm(9)
  D = solvers.ve_denoiser(DEN)

  def by_hand(x):
    hist = solvers.NO_HISTORY
    for i in range(len(grid) - 1):
      x_hat = D(x, grid[i])
      x_new = solver.step(D, x, x_hat, grid[i], grid[i + 1], hist, solver.order_at(i, len(grid) - 1))
      hist = solvers.History((hist.sigmas + (grid[i],))[-2:], (hist.denoised + (x_hat,))[-2:])
      x = x_new
    return x

  hand, traj = jax.jit(lambda x: (by_hand(x), solvers.solve_trajectory(solver, DEN, x, grid)[0]))(X_INIT)
  assert traj.shape == (10, B, 2)
  np.testing.assert_allclose(traj[0], X_INIT)
  np.testing.assert_allclose(traj[-1], hand, atol=1e-5)


def test_multistep_order_schedule_follows_the_reference_scheme():
  assert [solvers.DPMPP_3M.order_at(i, 8) for i in range(8)] == [1, 2, 3, 3, 3, 3, 2, 1]
  assert [solvers.DPMPP_2M.order_at(i, 5) for i in range(5)] == [1, 2, 2, 2, 1]
  assert [solvers.DPMPP_3M.order_at(i, 2) for i in range(2)] == [1, 2]
  no_lof = solvers.get_solver("dpmpp_3m", lower_order_final=False)
  assert [no_lof.order_at(i, 5) for i in range(5)] == [1, 2, 3, 3, 3]


def test_grids_are_checked():
  with pytest.raises(ValueError, match="decreasing"):
    solvers.solve(solvers.EULER, DEN, X_INIT, [1.0, 2.0])
  with pytest.raises(ValueError, match="concrete"):
    jax.jit(lambda s: solvers.solve(solvers.EULER, DEN, X_INIT, s).x)(jnp.array([2.0, 1.0]))
  with pytest.raises(ValueError, match="unknown"):
    solvers.get_solver("rk4")


def test_dynamic_threshold_against_the_definition():
  """s = max(quantile_p |x̂|, 1) per example (numpy's linear-interpolation quantile, as torch.quantile); x̂
  clipped to ±s then divided by s. An example already inside [−1, 1] is returned as it is."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 4, 2)).astype(np.float32) * np.array([0.2, 1.5, 4.0], np.float32)[:, None, None, None]
  got = np.asarray(solvers.dynamic_threshold(jnp.asarray(x), 0.995))
  for i in range(3):
    s = max(float(np.quantile(np.abs(x[i]).ravel(), 0.995)), 1.0)
    np.testing.assert_allclose(got[i], np.clip(x[i], -s, s) / s, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got[0], x[0])  # |x| < 1 everywhere: s = 1, nothing changes
  assert np.abs(got).max() <= 1.0 + 1e-6
  D = solvers.thresholded(lambda x, sigma: 3.0 * x, 0.5)
  np.testing.assert_allclose(np.asarray(D(jnp.asarray(x), 1.0)), np.asarray(solvers.dynamic_threshold(3.0 * x, 0.5)))
