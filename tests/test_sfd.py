"""SFD's pure pieces against the exact Gaussian-mixture teacher: grids, teacher trajectories, AFS, losses."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def global_batch(step_index, teacher=None):
  batch = {"noise": NOISE, "label": LABELS, "step_index": jnp.int32(step_index)}
  if teacher is not None:
    batch["teacher"] = teacher
  return batch


# --- grids and the teacher ------------------------------------------------------------------------------------


def test_student_grid_is_the_edm_grid_and_refinement_gives_the_teachers_grid():
  np.testing.assert_allclose(sfd.student_grid(3), [80.0, 10.93, 0.67, 0.006], rtol=3e-3)  # Table 9, ρ = 7
  np.testing.assert_allclose(sfd.student_grid(3), schedules.edm_sigmas(4, 0.006, 80.0), rtol=1e-6)
  fine = sfd.refine_grid(sfd.student_grid(3), 4)
  assert fine.shape == (13,)
  np.testing.assert_array_equal(fine[::4], sfd.student_grid(3))
  np.testing.assert_allclose(fine, sfd.student_grid(12), rtol=1e-6)  # the ρ-grid of N·K steps (SFD code)


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


def test_student_sampler_takes_n_minus_one_evaluations_with_afs():
  grid = sfd.student_grid(3)
  out = sfd.sample(teacher_denoiser(), 80.0 * NOISE, grid, afs=True)
  assert out.nfe == 2
  den = solvers.ve_denoiser(teacher_denoiser())
  x = sfd.analytical_first_step(80.0 * NOISE, grid[0], grid[1])
  for i in (1, 2):
    x = sfd.student_step(den(x, grid[i]), x, grid[i], grid[i + 1])
  np.testing.assert_allclose(out.x, x, atol=1e-5)
  assert sfd.sample(teacher_denoiser(), 80.0 * NOISE, grid, afs=False).nfe == 3


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
    sfd.global_loss(x_fn, x_fn, num_steps=3, metric="l3")


# --- losses ---------------------------------------------------------------------------------------------------


def test_a_student_equal_to_the_teacher_with_k1_has_zero_loss():
  frozen = {"teacher": TEACHER_PARAMS}
  common = dict(num_steps=3, solver="euler", k=1)
  local = jax.jit(sfd.local_loss(x_fn, x_fn, **common))
  glob = jax.jit(sfd.global_loss(x_fn, x_fn, afs=False, **common))
  whole = jax.jit(sfd.trajectory_loss(x_fn, x_fn, afs=False, **common))
  x0 = jnp.asarray(GMM.sample(np.random.default_rng(1), np.asarray(LABELS)))
  for seed in range(3):  # draws different student steps
    loss, _ = local(TEACHER_PARAMS, frozen, {"image": x0, "label": LABELS}, jax.random.PRNGKey(seed))
    assert float(loss) < 1e-6, float(loss)
  for k in range(3):
    loss, metrics = glob(TEACHER_PARAMS, frozen, global_batch(k), jax.random.PRNGKey(0))
    assert float(loss) < 1e-5 and int(metrics["student_step"]) == k, (k, float(loss))
  assert float(whole(TEACHER_PARAMS, frozen, global_batch(0), jax.random.PRNGKey(0))[0]) < 1e-5
  # With AFS the student's first step is analytic: a gap opens that the later steps are trained to close.
  glob_afs = jax.jit(sfd.global_loss(x_fn, x_fn, afs=True, **common))
  assert float(glob_afs(TEACHER_PARAMS, frozen, global_batch(1), jax.random.PRNGKey(0))[0]) > 1e-3


STUDENT_PARAMS = {"scale": jnp.asarray(1.1), "shift": jnp.asarray([0.05, -0.02])}


def test_gradients_flow_only_through_the_students_prediction():
  n, k = 3, 2
  loss_fn = sfd.global_loss(x_fn, x_fn, num_steps=n, metric="l2", afs=True)
  frozen = {"teacher": TEACHER_PARAMS}
  batch = global_batch(k)
  grads, teacher_grads = jax.jit(jax.grad(lambda p, f: loss_fn(p, f, batch, jax.random.PRNGKey(0))[0],
                                          argnums=(0, 1)))(STUDENT_PARAMS, frozen)

  # The same gradient by hand, the student's state x_k a constant: x' = (1 − r)·(scale·G + shift) + r·x_k.
  grid = sfd.student_grid(n)
  student = solvers.ve_denoiser(teacher_denoiser(STUDENT_PARAMS))
  x = sfd.analytical_first_step(80.0 * NOISE, grid[0], grid[1])
  x = sfd.student_step(student(x, grid[1]), x, grid[1], grid[2])  # x_2, the student's own rollout
  target = sfd.teacher_trajectory(solvers.DPMPP_3M, teacher_denoiser(), 80.0 * NOISE, grid, 4)[0][k + 1]
  g = solvers.ve_denoiser(teacher_denoiser())(x, grid[k])  # the mixture's x̂ at (x_k, σ_k)
  r = grid[k + 1] / grid[k]
  resid = (1 - r) * (STUDENT_PARAMS["scale"] * g + STUDENT_PARAMS["shift"]) + r * x - target
  d = resid.shape[1]
  np.testing.assert_allclose(grads["shift"], np.mean(2 / d * resid * (1 - r), axis=0), rtol=2e-3, atol=1e-7)
  np.testing.assert_allclose(grads["scale"], np.mean(np.sum(2 / d * resid * (1 - r) * g, axis=1)), rtol=2e-3)
  assert all(float(jnp.max(jnp.abs(v))) == 0.0 for v in jax.tree.leaves(teacher_grads))


def test_trajectory_loss_gradient_is_the_mean_of_the_per_step_gradients():
  n = 3
  frozen = {"teacher": TEACHER_PARAMS}
  grid = sfd.student_grid(n)
  teacher = jax.jit(lambda x: sfd.teacher_trajectory(solvers.DPMPP_3M, teacher_denoiser(), x, grid, 4)[0])(
      80.0 * NOISE)
  per_step = sfd.global_loss(x_fn, x_fn, afs=True)  # N read from batch['teacher']
  whole = sfd.trajectory_loss(x_fn, x_fn, afs=True)
  grad = lambda fn, batch: jax.grad(lambda p: fn(p, frozen, batch, jax.random.PRNGKey(0))[0])(STUDENT_PARAMS)
  step_grads = [jax.jit(lambda b: grad(per_step, b))(global_batch(k, teacher)) for k in (1, 2)]
  whole_grad = jax.jit(lambda b: grad(whole, b))(global_batch(0, teacher))
  for key in STUDENT_PARAMS:
    np.testing.assert_allclose(whole_grad[key], (step_grads[0][key] + step_grads[1][key]) / 2, rtol=1e-4, atol=1e-8)
  # A batch without the teacher trajectory recomputes it: the same loss.
  recomputed = sfd.global_loss(x_fn, x_fn, num_steps=n, afs=True)
  a = jax.jit(lambda b: per_step(STUDENT_PARAMS, frozen, b, jax.random.PRNGKey(0))[0])(global_batch(2, teacher))
  b = jax.jit(lambda b: recomputed(STUDENT_PARAMS, frozen, b, jax.random.PRNGKey(0))[0])(global_batch(2))
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_sfd_v_student_receives_its_step_count():
  seen = []

  def x_fn_steps(params, z, logsnr, labels, w, *, train=False, rng=None, steps=None):
    seen.append(steps)
    return x_fn(params, z, logsnr, labels, w)

  loss_fn = sfd.trajectory_loss(x_fn_steps, x_fn, step_condition=True, afs=True)
  grid = sfd.student_grid(4)
  teacher = sfd.teacher_trajectory(solvers.DPMPP_3M, teacher_denoiser(), 80.0 * NOISE, grid, 4)[0]
  jax.eval_shape(lambda p: loss_fn(p, {"teacher": TEACHER_PARAMS}, global_batch(0, teacher), jax.random.PRNGKey(0)),
                 STUDENT_PARAMS)
  assert seen and all(s.shape == (B,) and s.dtype == jnp.int32 for s in seen)
  with pytest.raises(ValueError, match="no step to train"):
    jax.eval_shape(lambda p: loss_fn(p, {"teacher": TEACHER_PARAMS}, global_batch(0, teacher[:2]),
                                     jax.random.PRNGKey(0)), STUDENT_PARAMS)


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
