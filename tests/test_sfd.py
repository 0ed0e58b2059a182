"""SFD's pure pieces against the exact Gaussian-mixture teacher: grids, teacher trajectories, AFS, the sampler and
the losses, checked against float64 loops written here."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from distill import samplers, schedules, solvers
from distill.methods.sfd import core as sfd
from distill.testing import GaussianMixture

GMM = GaussianMixture.random(0, num_classes=3, shape=(2,), mean_scale=1.0, std=0.3)
B = 16
LABELS = jnp.asarray(np.arange(B) % 3)
NOISE = jax.random.normal(jax.random.PRNGKey(0), (B, 2))
TEACHER_PARAMS = {"scale": jnp.ones(()), "shift": jnp.zeros((2,))}


def x_fn(params, z, logsnr, labels, w, *, train=False, rng=None, steps=None):
  """A toy x-function: an affine map of the exact denoiser; TEACHER_PARAMS make it the mixture's own x̂."""
  del w, train, rng, steps
  return params["scale"] * GMM.denoise(z, logsnr, labels) + params["shift"]


def teacher_denoiser(params=TEACHER_PARAMS):
  return samplers.conditional_denoiser(lambda z, l, y, w: x_fn(params, z, l, y, w), LABELS)


def global_batch(step_index, teacher):
  """A global-loss batch; teacher: [B, N+1, ...] (batch-major), N read from its shape."""
  return {"noise": NOISE, "label": LABELS, "step_index": jnp.int32(step_index),
          "num_steps": jnp.int32(teacher.shape[1] - 1), "teacher": teacher}


def teacher_states(n, solver=solvers.DPMPP_3M, k=4):
  """The teacher's states at the student grid points of N = n, batch-major [B, n+1, ...]."""
  run = jax.jit(lambda x: sfd.teacher_trajectory(solver, teacher_denoiser(), x, sfd.student_grid(n), k)[0])
  return jnp.moveaxis(run(80.0 * NOISE), 0, 1)


# --- independent float64 references -----------------------------------------------------------------------------


def np_ve_denoise(x, sigma, labels):
  """E[data | x = data + σε, class] for GMM in float64, written in the VE view directly (the mixture's x̂)."""
  x = np.asarray(x, np.float64)
  mu, s2 = GMM.means.astype(np.float64), GMM.stds.astype(np.float64) ** 2
  var = s2 + sigma**2                                                   # [K]
  logp = np.log(GMM.weights)[None] - 0.5 * ((x[:, None] - mu[None]) ** 2).sum(-1) / var - np.log(var)  # d = 2
  logp = np.where(GMM.classes[None] == np.asarray(labels)[:, None], logp, -np.inf)
  r = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
  post = mu[None] + (s2 / var)[None, :, None] * (x[:, None] - mu[None])
  return np.einsum("bk,bkd->bd", r, post)


def np_euler(x_hat_fn, x, sigmas, afs):
  """Alg. 8 as a float64 loop: ε̂ = x/√(1 + σ²) for the first step under AFS, else ε̂ = (x − x̂(x, σ))/σ;
  x ← x + (σ' − σ)·ε̂."""
  x = np.asarray(x, np.float64)
  for i in range(len(sigmas) - 1):
    s, t = float(sigmas[i]), float(sigmas[i + 1])
    eps = x / np.sqrt(1.0 + s * s) if afs and i == 0 else (x - x_hat_fn(x, s)) / s
    x = x + (t - s) * eps
  return x


# --- grids and the teacher ------------------------------------------------------------------------------------


def test_student_grid_is_the_edm_grid_and_refinement_gives_the_teachers_grid():
  np.testing.assert_allclose(sfd.student_grid(3), [80.0, 10.93, 0.67, 0.006], rtol=3e-3)  # Table 9, ρ = 7
  np.testing.assert_allclose(sfd.student_grid(3), schedules.edm_sigmas(4, 0.006, 80.0), rtol=1e-6)
  fine = sfd.refine_grid(sfd.student_grid(3), 4)
  assert fine.shape == (13,)
  np.testing.assert_array_equal(fine[::4], sfd.student_grid(3))
  np.testing.assert_allclose(fine, sfd.student_grid(12), rtol=1e-6)  # the ρ-grid of N·K steps (SFD code)
  # A traced interval (Alg. 3's teacher at a sampled grid point) is refined by the same formula, in float32.
  grid = sfd.student_grid(3)
  traced = jax.jit(lambda a, b: sfd.refine_grid((a, b), 4))(jnp.float32(grid[1]), jnp.float32(grid[2]))
  np.testing.assert_allclose(traced, fine[4:9], rtol=1e-6)
  np.testing.assert_array_equal(traced[::4], np.float32(grid[1:3]))


def test_teacher_trajectory_is_the_solver_on_the_refined_grid():
  grid, x_init = sfd.student_grid(3), 80.0 * NOISE
  fine = sfd.refine_grid(grid, 4)

  @jax.jit
  def run(x):
    den = teacher_denoiser()
    states, nfe = sfd.teacher_trajectory(solvers.DPMPP_3M, den, x, grid, 4)
    assert nfe == 12  # K = 4 sub-steps of one evaluation for each of N = 3 student steps
    full, _ = solvers.solve_trajectory(solvers.DPMPP_3M, den, x, fine)
    chained = [x]  # Alg. 3's local teacher: K fresh steps from each student grid point
    for i in range(3):
      chained.append(sfd.local_teacher_target(solvers.DPMPP_3M, den, chained[-1], grid[i], grid[i + 1], 4))
    heun_states, _ = sfd.teacher_trajectory(solvers.HEUN, den, x, grid, 4)
    heun_chained = [x]
    for i in range(3):
      heun_chained.append(sfd.local_teacher_target(solvers.HEUN, den, heun_chained[-1], grid[i], grid[i + 1], 4))
    return states, full, jnp.stack(chained), heun_states, jnp.stack(heun_chained)

  states, full, chained, heun_states, heun_chained = run(x_init)
  assert states.shape == (4, B, 2)
  np.testing.assert_allclose(states, full[::4], atol=1e-6)
  # A one-step solver needs no history: the global teacher is the local one chained.
  np.testing.assert_allclose(heun_states, heun_chained, atol=1e-5)
  # A multistep teacher is not: its history runs across student steps (the paper's reason to go global).
  assert np.max(np.abs(np.asarray(states[1:]) - np.asarray(chained[1:]))) > 1e-3


# --- AFS and distances ----------------------------------------------------------------------------------------


def test_analytical_first_step_by_hand():
  x = jnp.array([[3.0, -1.0]])
  # ε̂ = x/√(1 + 80²) = x/80.00625, x' = x + (10 − 80)·ε̂ = x·(1 − 70/80.00625) = 0.1250684·x
  by_hand = [[3.0 * (1 - 70 / math.sqrt(6401)), -1.0 * (1 - 70 / math.sqrt(6401))]]
  np.testing.assert_allclose(sfd.analytical_first_step(x, 80.0, 10.0), by_hand, rtol=1e-6)
  np.testing.assert_allclose(by_hand, [[0.3752051, -0.1250684]], rtol=1e-6)
  # ε̂ is the VP state z = α x: the noise is its own estimate.
  z, _ = solvers.ve_to_vp(x, 80.0)
  np.testing.assert_allclose(x - solvers.afs_denoised(x, 80.0), 80.0 * z, rtol=1e-6)


def test_student_sampler_is_the_float64_euler_loop_and_takes_n_minus_one_evaluations_with_afs():
  den, calls = solvers.ve_denoiser(teacher_denoiser()), []

  def counted(x, sigma):
    jax.debug.callback(lambda: calls.append(1))
    return den(x, sigma)

  table = sfd.grid_table(5)  # N traced: the grid a row of the table, one compilation for every N
  run = jax.jit(lambda x, n, stop, afs: sfd.sample(counted, x, jnp.asarray(table)[n], stop, afs),
                static_argnames="afs")
  for afs in (True, False):
    for n in (3, 5):
      calls.clear()
      got = run(80.0 * NOISE, n, n, afs)
      jax.effects_barrier()
      assert len(calls) == (n - 1 if afs else n)
      want = np_euler(lambda x, s: np_ve_denoise(x, s, LABELS), 80.0 * NOISE, sfd.student_grid(n), afs)
      np.testing.assert_allclose(got, want, atol=1e-5)
    # Stopped one step early it is another state (the global loss's rollout to x_{N−1}): the check can fail.
    assert np.max(np.abs(np.asarray(run(80.0 * NOISE, 5, 4, afs)) - want)) > 1e-2


def test_distances_match_their_closed_forms():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(3, 2, 2)).astype(np.float32), rng.normal(size=(3, 2, 2)).astype(np.float32)
  diff = (a - b).reshape(3, 4)
  np.testing.assert_allclose(sfd.distance(a, b, "l1"), np.abs(diff).mean(1), rtol=1e-6)
  np.testing.assert_allclose(sfd.distance(a, b, "l2"), (diff**2).mean(1), rtol=1e-6)
  c = 0.00054 * 2.0  # 0.00054·√d, d = 4
  np.testing.assert_allclose(sfd.distance(a, b, "pseudo_huber"), np.sqrt((diff**2).sum(1) + c**2) - c, rtol=1e-6)
  np.testing.assert_allclose(sfd.distance(a, b, "pseudo_huber", huber_c=1.0),
                             np.sqrt((diff**2).sum(1) + 1.0) - 1.0, rtol=1e-6)
  tiny = 1e-5 * np.ones((1, 4), np.float32)  # Pseudo-Huber is quadratic near 0: ‖δ‖²/(2c)
  np.testing.assert_allclose(sfd.distance(tiny, 0 * tiny, "pseudo_huber", huber_c=1.0), [2e-10], rtol=1e-2)
  with pytest.raises(ValueError, match="unknown metric"):
    sfd.distance(a, b, "lpips")
  with pytest.raises(ValueError, match="unknown metric"):
    sfd.global_loss(x_fn, max_steps=3, metric="l3")


# --- losses ---------------------------------------------------------------------------------------------------


def test_a_student_equal_to_the_teacher_with_k1_has_zero_loss():
  n, grid, den = 3, sfd.student_grid(3), teacher_denoiser()
  local = jax.jit(sfd.local_loss(x_fn, max_steps=n))
  glob = jax.jit(sfd.global_loss(x_fn, max_steps=n, afs=False))
  whole = jax.jit(sfd.trajectory_loss(x_fn, afs=False))
  x0 = jnp.asarray(GMM.sample(np.random.default_rng(1), np.asarray(LABELS)))
  euler_target = jax.jit(lambda x, s, t: sfd.local_teacher_target(solvers.EULER, den, x, s, t, 1))
  for k in range(n):  # every student step, from data noised to σ_k
    x = x0 + jnp.float32(grid[k]) * jax.random.normal(jax.random.PRNGKey(k), x0.shape)
    batch = {"state": x, "label": LABELS, "step_index": jnp.int32(k), "num_steps": jnp.int32(n),
             "target": euler_target(x, jnp.float32(grid[k]), jnp.float32(grid[k + 1]))}
    loss, _ = local(TEACHER_PARAMS, {}, batch, jax.random.PRNGKey(0))
    assert float(loss) < 1e-6, float(loss)
  teacher = teacher_states(n, solvers.EULER, 1)
  for k in range(n):
    loss, metrics = glob(TEACHER_PARAMS, {}, global_batch(k, teacher), jax.random.PRNGKey(0))
    assert float(loss) < 1e-5 and int(metrics["student_step"]) == k, (k, float(loss))
  assert float(whole(TEACHER_PARAMS, {}, global_batch(0, teacher), jax.random.PRNGKey(0))[0]) < 1e-5
  # With AFS the student's first step is analytic: a gap opens that the later steps are trained to close.
  glob_afs = jax.jit(sfd.global_loss(x_fn, max_steps=n, afs=True))
  assert float(glob_afs(TEACHER_PARAMS, {}, global_batch(1, teacher), jax.random.PRNGKey(0))[0]) > 1e-3


STUDENT_PARAMS = {"scale": jnp.asarray(1.1), "shift": jnp.asarray([0.05, -0.02])}


def test_gradients_flow_only_through_the_students_prediction():
  n, k = 3, 2
  loss_fn = sfd.global_loss(x_fn, max_steps=n, metric="l2", afs=True)
  teacher = teacher_states(n)
  batch = global_batch(k, teacher)
  grads, noise_grad, teacher_grad = jax.jit(jax.grad(
      lambda p, noise, t: loss_fn(p, {}, dict(batch, noise=noise, teacher=t), jax.random.PRNGKey(0))[0],
      argnums=(0, 1, 2)))(STUDENT_PARAMS, NOISE, teacher)

  # The same gradient by hand in float64, the student's state x_k a constant:
  # x' = (1 − r)·(scale·G + shift) + r·x_k.
  grid = sfd.student_grid(n)
  scale, shift = float(STUDENT_PARAMS["scale"]), np.asarray(STUDENT_PARAMS["shift"], np.float64)
  student = lambda x, s: scale * np_ve_denoise(x, s, LABELS) + shift
  x = np_euler(student, 80.0 * np.asarray(NOISE, np.float64), grid[:k + 1], afs=True)  # x_2, its own rollout
  target = np.asarray(teacher, np.float64)[:, k + 1]
  g = np_ve_denoise(x, grid[k], LABELS)  # the mixture's x̂ at (x_k, σ_k)
  r = grid[k + 1] / grid[k]
  resid = (1 - r) * (scale * g + shift) + r * x - target
  d = resid.shape[1]
  np.testing.assert_allclose(grads["shift"], np.mean(2 / d * resid * (1 - r), axis=0), rtol=2e-3, atol=1e-7)
  np.testing.assert_allclose(grads["scale"], np.mean(np.sum(2 / d * resid * (1 - r) * g, axis=1)), rtol=2e-3)
  # Neither the noise (through the student's detached rollout) nor the teacher's states carry a gradient.
  assert float(jnp.max(jnp.abs(noise_grad))) == 0.0 and float(jnp.max(jnp.abs(teacher_grad))) == 0.0


def test_trajectory_loss_gradient_is_the_mean_of_the_per_step_gradients():
  n = 3
  teacher = teacher_states(n)
  per_step = sfd.global_loss(x_fn, max_steps=n, afs=True)
  whole = sfd.trajectory_loss(x_fn, afs=True)  # N read from batch['teacher']
  grad = lambda fn, batch: jax.grad(lambda p: fn(p, {}, batch, jax.random.PRNGKey(0))[0])(STUDENT_PARAMS)
  step_grads = [jax.jit(lambda b: grad(per_step, b))(global_batch(k, teacher)) for k in (1, 2)]
  whole_grad = jax.jit(lambda b: grad(whole, b))(global_batch(0, teacher))
  for key in STUDENT_PARAMS:
    np.testing.assert_allclose(whole_grad[key], (step_grads[0][key] + step_grads[1][key]) / 2, rtol=1e-4, atol=1e-8)


def test_sfd_v_student_receives_its_step_count():
  seen = []

  def x_fn_steps(params, z, logsnr, labels, w, *, train=False, rng=None, steps=None):
    seen.append(steps)
    return x_fn(params, z, logsnr, labels, w)

  loss_fn = sfd.trajectory_loss(x_fn_steps, step_condition=True, afs=True)
  teacher = teacher_states(4)
  jax.eval_shape(lambda p: loss_fn(p, {}, global_batch(0, teacher), jax.random.PRNGKey(0)), STUDENT_PARAMS)
  assert seen and all(s.shape == (B,) and s.dtype == jnp.int32 for s in seen)
  with pytest.raises(ValueError, match="no step to train"):
    jax.eval_shape(lambda p: loss_fn(p, {}, global_batch(0, teacher[:, :2]), jax.random.PRNGKey(0)), STUDENT_PARAMS)


def test_trajectory_plan_walks_each_trajectory_step_by_step():
  plan = sfd.trajectory_plan(7, [3], afs=True)
  assert plan["step_index"].tolist() == [1, 2, 1, 2, 1, 2, 1]
  assert plan["trajectory"].tolist() == [0, 0, 1, 1, 2, 2, 3]
  assert sfd.trajectory_plan(4, [2], afs=False)["step_index"].tolist() == [0, 1, 0, 1]
  plan = sfd.trajectory_plan(2000, [2, 3, 4, 5], afs=True, seed=3)  # SFD-v, the paper's NFE 1..4 list
  again = sfd.trajectory_plan(2000, [2, 3, 4, 5], afs=True, seed=3)
  assert all(np.array_equal(plan[key], again[key]) for key in plan)
  starts = np.flatnonzero(np.diff(plan["trajectory"], prepend=-1))
  for s, e in zip(starts[:-1], starts[1:]):
    n = plan["num_steps"][s]
    assert plan["step_index"][s:e].tolist() == list(range(1, n)) and set(plan["num_steps"][s:e]) == {n}
  counts = np.bincount(plan["num_steps"][starts], minlength=6)[2:]
  assert counts.min() > 0.7 * counts.mean()  # N ~ U(L) per trajectory
  with pytest.raises(ValueError, match="must be >= 2"):
    sfd.trajectory_plan(10, [1, 2], afs=True)
