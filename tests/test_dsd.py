"""Direct self-distillation (DSD paper): Alg. 2 against a float64 hand loop and the exact mixture,
two-step consistency, stop-gradients, the N schedules, training DSD (Eq. 1) and the lr schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import diffusion, losses, optimizers, schedules
from distill.methods.dsd import core as dsd
from distill.testing import GaussianMixture

LOGSNR = schedules.cosine_logsnr
GMM = GaussianMixture.random(0, num_classes=3, shape=(2, 2, 1), mean_scale=1.5, std=0.3)
NULL = GMM.num_classes
# One point mass per class: the exact conditional denoiser is μ_c for every z_t, constant along any trajectory.
POINTS = GaussianMixture(GMM.means, np.zeros_like(GMM.stds), GMM.weights, GMM.classes, GMM.num_classes)
PARAMS = {"gain": jnp.float32(1.0)}


def pair_x(params, z, logsnr, labels, w, *, train=False, rng=None, mixture=GMM):
  """A CFG model (conditional or unconditional by label) as an x-function: the exact mixture; ignores w."""
  del w, train, rng
  return params["gain"] * mixture.denoise(z, logsnr, labels)


GUIDED_X = losses.cfg_x_fn(pair_x, NULL)  # the guided "model" (1 + w)·x̂_c − w·x̂_∅ of Alg. 2


def points_x(params, z, logsnr, labels, w, *, train=False, rng=None):
  """The point-mass mixture's conditional denoiser as a (w-ignoring) model."""
  return pair_x(params, z, logsnr, labels, w, mixture=POINTS)


def _rows(n_rows=6, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((n_rows,) + GMM.shape), jnp.float32),
          jnp.asarray(np.arange(n_rows) % 3, jnp.int32), jnp.asarray(np.linspace(1.0, 3.0, n_rows), jnp.float32))


def _batch(noise, labels, w, num_steps, position):
  b = noise.shape[0]
  return {"noise": noise, "label": labels, "w": w, "num_steps": jnp.broadcast_to(jnp.int32(num_steps), (b,)),
          "position": jnp.broadcast_to(jnp.asarray(position, jnp.int32), (b,))}


# --- Alg. 2 against a literal float64 hand loop ------------------------------------------------------------


def np_alpha_sigma(lam):
  lam = np.asarray(lam, np.float64)
  return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


def lam(t):
  return float(LOGSNR(jnp.float32(t)))


_guided = jax.jit(lambda z, logsnr, labels, w: GUIDED_X(PARAMS, z, logsnr, labels, w))


def np_guided(z, t, labels, w):
  b = len(labels)
  return np.asarray(_guided(jnp.asarray(z, jnp.float32), jnp.full((b,), lam(t), jnp.float32), labels, w), np.float64)


def hand_alg2(noise, labels, w, n):
  """Algorithm 2 as printed, in float64, for one trajectory batch with fixed θ: for t ∈ N, N−2, …, 2 take two
  DDIM steps, x′ and x″ by the printed formulas, L = max(e^λ_t, 1)·mean‖x′ − x″‖², continue from z_t''.
  Returns per position (loss, z_t''), and the printed x″ at the last position (t'' = 0)."""
  z = np.asarray(noise, np.float64)
  out, last_printed = [], None
  for k in range(n, 0, -2):
    t, t1, t2 = k / n, (k - 1) / n, (k - 2) / n
    (a, s), (a1, s1), (a2, s2) = np_alpha_sigma(lam(t)), np_alpha_sigma(lam(t1)), np_alpha_sigma(lam(t2))
    x0 = np_guided(z, t, labels, w)
    z1 = a1 * x0 + s1 / s * (z - a * x0)
    x1 = np_guided(z1, t1, labels, w)
    z2 = a2 * x1 + s2 / s1 * (z1 - a1 * x1)
    x_prime = (z1 - s1 / s * z) / (a1 - s1 / s * a)
    x_second = (z2 - s2 / s * z) / (a2 - s2 / s * a)
    if k == 2:  # t'' = 0: the repo's last-step rule (docs/design.md §6) takes x̂(z_t'), where the printed form tends
      last_printed, x_second = x_second, x1
    loss = max(np.exp(lam(t)), 1.0) * np.mean(np.mean((x_prime - x_second) ** 2, axis=(1, 2, 3)))
    out.append((loss, z2))
    z = z2
  return out, last_printed, x1


def test_fine_tuning_loss_is_algorithm_2_at_every_position():
  n = 8
  noise, labels, w = _rows()
  hand, last_printed, last_x1 = hand_alg2(noise, labels, w, n)
  loss_fn = jax.jit(dsd.fine_tuning_loss(GUIDED_X, logsnr_fn=LOGSNR))
  step = jax.jit(lambda z, j: dsd.position_loss(GUIDED_X, PARAMS, z, jnp.full((6,), j), jnp.full((6,), n), labels,
                                                w, logsnr_fn=LOGSNR)[::2])
  z = noise
  for j, (ref_loss, ref_z2) in enumerate(hand):
    got, metrics = loss_fn(PARAMS, None, _batch(noise, labels, w, n, j), jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(got), ref_loss, rtol=2e-4, atol=1e-7)
    assert metrics["x_mse"] > 0
    # position_loss, carried along the trajectory as Alg. 2 does, agrees with the replay and returns z_t''.
    carried, z = step(z, j)
    np.testing.assert_allclose(float(carried), float(got), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(z, np.float64), ref_z2, atol=1e-4)
  # The printed closed form at t'' = 0 is where the last-step rule's x̂(z_t') is (λ clipped at 20).
  assert np.max(np.abs(last_printed - last_x1)) < 1e-3
  # Mutant check: steps of 1/(2N) (PD's t − 0.5/N, t − 1/N) are not Alg. 2's and the same comparison fails.
  half = hand_alg2(noise, labels, w, 2 * n)[0][0][0]
  assert abs(half - hand[0][0]) > 1e-2 * hand[0][0]


def test_replay_mixes_positions_and_step_counts_per_row():
  noise, labels, w = _rows()
  num_steps = jnp.asarray([8, 8, 8, 4, 4, 16], jnp.int32)
  position = jnp.asarray([0, 1, 3, 1, 0, 5], jnp.int32)
  got = np.asarray(jax.jit(lambda: dsd.replay_trajectory(GUIDED_X, PARAMS, noise, position, num_steps, labels, w,
                                                         LOGSNR))())
  for r in range(6):
    n, j = int(num_steps[r]), int(position[r])
    z = noise[r:r + 1]
    for k in range(n, n - 2 * j, -1):  # 2j DDIM steps of length 1/N
      lt, ls = jnp.full((1,), lam(k / n)), jnp.full((1,), lam((k - 1) / n))
      z = diffusion.ddim_step(z, _guided(z, lt, labels[r:r + 1], w[r:r + 1]), lt, ls)
    np.testing.assert_allclose(got[r], np.asarray(z)[0], atol=1e-5)


# --- two-step consistency ------------------------------------------------------------------------------


def _losses(model_x, noise, labels, w, cases, logsnr_fn=LOGSNR):
  loss_fn = jax.jit(dsd.fine_tuning_loss(model_x, logsnr_fn=logsnr_fn))
  return [float(loss_fn(PARAMS, None, _batch(noise, labels, w, n, j), jax.random.PRNGKey(0))[0]) for n, j in cases]


CASES = [(8, 0), (8, 1), (8, 3), (4, 1), (2, 0)]  # (N, position): first, middle and last positions


def test_loss_is_zero_for_a_two_step_consistent_model_and_positive_otherwise():
  """x″ = x′ exactly when x̂ is constant along the model's own DDIM path between grid points (then two DDIM
  steps land where one does): the exact denoiser of one point mass per class is such a model."""
  noise, labels, w = _rows()
  consistent = _losses(points_x, noise, labels, w, CASES)
  assert max(consistent) < 1e-10, consistent
  # The exact denoiser of the s = 0.3 mixture is not consistent at finite N: its x̂ moves along the path.
  inconsistent = _losses(GUIDED_X, noise, labels, w, CASES)
  assert min(inconsistent) > 1e-4, inconsistent


def _affine_pair(offset_in_range: float):
  """A CFG pair x̂ = P·(z/α) + b_label with P the projection on the first two pixels, b_label ∈ ker P: its
  guided mix is P·(z/α) + b with b ∈ ker P for every w, which DDIM keeps constant (P z_s/α_s = P z_t/α_t),
  so it is two-step consistent. offset_in_range > 0 puts part of b in range P, which breaks that."""
  p = jnp.asarray([1.0, 1.0, 0.0, 0.0]).reshape(2, 2, 1)
  b = jnp.asarray(np.random.default_rng(3).normal(size=(NULL + 1, 2, 2, 1)), jnp.float32)
  b = b * (1 - p) + offset_in_range * b * p

  def x_fn(params, z, logsnr, labels, w, *, train=False, rng=None):
    del w, train, rng
    alpha, _ = schedules.alpha_sigma(logsnr)
    return params["gain"] * (p * z / alpha[:, None, None, None] + b[labels])
  return losses.cfg_x_fn(x_fn, NULL)


def test_guided_self_distillation_is_zero_at_consistency_for_any_w():
  noise, labels, w = _rows()
  # λ_min = −6 keeps z/α moderate (α(1) ≈ 0.05), so float32 rounding stays far below the threshold.
  mild = lambda t: schedules.cosine_logsnr(t, -6.0, 20.0)
  consistent = _losses(_affine_pair(0.0), noise, labels, w, CASES, mild)
  broken = _losses(_affine_pair(1.0), noise, labels, w, CASES, mild)
  assert max(consistent) < 1e-9, consistent
  assert min(broken) > 1e-4, broken


def test_teacher_student_loss_is_zero_for_the_student_outputting_the_teachers_target():
  """TSD: the trajectory and the targets come from frozen['teacher']; a student that outputs the teacher's
  two-step target has zero loss; the teacher itself as student (one step where two are wanted) does not."""
  def student_x(params, z, logsnr, labels, w, *, train=False, rng=None):
    assert train  # the one evaluation with gradient runs in training mode
    n = 8
    k = jnp.round(schedules.cosine_time(logsnr) * n)
    position = ((n - k) // 2).astype(jnp.int32)
    x_hat = GUIDED_X(PARAMS, z, logsnr, labels, w)
    oracle, _ = dsd.two_step_target(GUIDED_X, PARAMS, z, x_hat, position, jnp.full_like(position, n), labels, w,
                                    LOGSNR)
    return params["oracle"] * oracle + (1 - params["oracle"]) * x_hat

  loss_fn = jax.jit(dsd.teacher_student_loss(student_x, GUIDED_X, logsnr_fn=LOGSNR))
  noise, labels, w = _rows()
  frozen = {"teacher": PARAMS}
  for j in range(4):
    batch = _batch(noise, labels, w, 8, j)
    exact, _ = loss_fn({"oracle": jnp.float32(1.0)}, frozen, batch, jax.random.PRNGKey(0))
    wrong, _ = loss_fn({"oracle": jnp.float32(0.0)}, frozen, batch, jax.random.PRNGKey(0))
    assert float(exact) < 1e-10 and float(wrong) > 1e-4, (j, float(exact), float(wrong))
  # With the teacher as student, TSD is DSD of the teacher: the same loss as fine_tuning_loss.
  dsd_loss = jax.jit(dsd.fine_tuning_loss(GUIDED_X, logsnr_fn=LOGSNR))(PARAMS, None, batch, jax.random.PRNGKey(0))[0]
  np.testing.assert_allclose(float(wrong), float(dsd_loss), rtol=1e-5)


# --- stop-gradients ------------------------------------------------------------------------------------


def parity_x(params, z, logsnr, labels, w, *, train=False, rng=None):
  """The guided mixture scaled by (1 + a) at even grid points k of N = 8 and by (1 + b) at odd ones. Alg. 2
  evaluates x′ at even k (k = N − 2j) and the target's second step at odd k (k − 1): 'b' enters the loss only
  through the stop-gradient branch (and the replayed prefix, also stop-gradient)."""
  k = jnp.round(schedules.cosine_time(logsnr) * 8).astype(jnp.int32)
  scale = jnp.where(k % 2 == 0, 1 + params["a"], 1 + params["b"])[:, None, None, None]
  return scale * GUIDED_X(PARAMS, z, logsnr, labels, w)


def test_gradients_reach_only_the_one_step_branch():
  noise, labels, w = _rows()
  loss_fn = dsd.fine_tuning_loss(parity_x, logsnr_fn=LOGSNR)
  value_and_grad = jax.jit(jax.value_and_grad(lambda p, batch: loss_fn(p, None, batch, jax.random.PRNGKey(0))[0]))
  params = {"a": jnp.float32(0.05), "b": jnp.float32(0.05)}

  @jax.jit
  def one_step_only_grad(params, batch):
    """The gradient with z_t and x″ computed outside as constants: only x′ = x̂_θ(z_t) depends on θ."""
    n, j = batch["num_steps"], batch["position"]
    z_t = dsd.replay_trajectory(parity_x, params, noise, j, n, labels, w, LOGSNR)
    logsnr_t = LOGSNR(dsd.position_times(j, n)[0])
    target, _ = dsd.two_step_target(parity_x, params, z_t, parity_x(params, z_t, logsnr_t, labels, w), j, n,
                                    labels, w, LOGSNR)
    return jax.grad(lambda p: losses.weighted_regression(parity_x(p, z_t, logsnr_t, labels, w), target, logsnr_t,
                                                         "truncated_snr")[0])(params)

  for j in range(4):
    batch = _batch(noise, labels, w, 8, j)
    loss, grads = value_and_grad(params, batch)
    assert float(grads["b"]) == 0.0 and abs(float(grads["a"])) > 1e-4, (j, grads)
    np.testing.assert_allclose(float(grads["a"]), float(one_step_only_grad(params, batch)["a"]), rtol=1e-5)
    # ... yet 'b' is used: it moves the target, hence the loss.
    other, _ = value_and_grad({"a": params["a"], "b": jnp.float32(0.2)}, batch)
    assert abs(float(other) - float(loss)) > 1e-6 * float(loss), (j, float(loss), float(other))


# --- schedules (§4.1.1, Appendix J) -----------------------------------------------------------------------

# Hand derivations, U rounded half up:
# DSDI 64 → 2, P = 4000: N = 64, 32, 16, 8, 4, 2, |N| = 6, U_i = 4000/(6·N_i) = 10.42, 20.83, 41.67, 83.33,
#   166.67, 333.33 → 10, 21, 42, 83, 167, 333; updates U·N/2 = 320, 336, 336, 332, 334, 333 (≈ P/(2|N|) = 333).
# DSDI 16 → 2, P = 640: |N| = 4, U = 160/N = 10, 20, 40, 80; 80 updates each.
# DSDI 64 → 8, P = 4000: |N| = 4, U = 1000/N = 15.625, 31.25, 62.5, 125 → 16, 31, 63, 125.
# DSDGL 8 → 2, P = 480: N = 8, 6, 4, 2, |N| = 4, U = 120/N = 15, 20, 30, 60; 60 updates each.
# DSDGL 64 → 2, P = 4000: 32 depths, U = 4000/(32·N) = 125/N: 64: 1.95→2, 62: 2.02→2, 60: 2.08, 58: 2.16,
#   56: 2.23, 54: 2.31, 52: 2.40 → 2; 50: 2.5→3, 48: 2.60, 46: 2.72, 44: 2.84, 42: 2.98, 40: 3.125, 38: 3.29,
#   36: 3.47 → 3; 34: 3.68, 32: 3.91, 30: 4.17, 28: 4.46 → 4; 26: 4.81, 24: 5.21 → 5; 22: 5.68, 20: 6.25 → 6;
#   18: 6.94 → 7; 16: 7.81 → 8; 14: 8.93 → 9; 12: 10.42 → 10; 10: 12.5 → 13; 8: 15.625 → 16; 6: 20.83 → 21;
#   4: 31.25 → 31; 2: 62.5 → 63.
# DSDN 64, P = 4000: U = 4000/64 = 62.5 → 63; P = 5000: 78.125 → 78.
# DSDGEXP 8 → 2, P = 1000: n = 4, S = 1, 2, 4, 6; depths N = 8, 6, 4, 2 get e^{1/6}, e^{1/4}, e^{1/2}, e^{1}
#   = 1.18136, 1.28403, 1.64872, 2.71828 (Σ 6.83239), shares P_i = 172.91, 187.93, 241.31, 397.85,
#   U = P_i/N_i = 21.61, 31.32, 60.33, 198.93 → 22, 31, 60, 199; updates 88, 93, 120, 199 (rising as N falls).
GL_64 = [2] * 7 + [3] * 8 + [4] * 4 + [5] * 2 + [6] * 2 + [7, 8, 9, 10, 13, 16, 21, 31, 63]
SCHEDULE_TABLE = [
    ("DSDI", 64, 4000, None, [(64, 10), (32, 21), (16, 42), (8, 83), (4, 167), (2, 333)]),
    ("DSDI", 16, 640, None, [(16, 10), (8, 20), (4, 40), (2, 80)]),
    ("DSDI", 64, 4000, 8, [(64, 16), (32, 31), (16, 63), (8, 125)]),
    ("DSDGL", 8, 480, None, [(8, 15), (6, 20), (4, 30), (2, 60)]),
    ("DSDGL", 64, 4000, None, list(zip(range(64, 0, -2), GL_64))),
    ("DSDN", 64, 4000, None, [(64, 63)]),
    ("DSDN", 64, 5000, 64, [(64, 78)]),
    ("DSDGEXP", 8, 1000, None, [(8, 22), (6, 31), (4, 60), (2, 199)]),
]


@pytest.mark.parametrize("kind, start, total, end, plan", SCHEDULE_TABLE)
def test_depth_schedule_table(kind, start, total, end, plan):
  assert dsd.depth_schedule(kind, start, total, end) == plan


def test_updates_per_depth():
  assert dsd.updates_per_depth(dsd.depth_schedule("DSDI", 64, 4000)) == [320, 336, 336, 332, 334, 333]
  assert dsd.updates_per_depth(dsd.depth_schedule("DSDGL", 8, 480)) == [60] * 4
  assert dsd.updates_per_depth(dsd.depth_schedule("DSDGEXP", 8, 1000)) == [88, 93, 120, 199]
  # At paper size the exponential plan still puts more updates at fewer steps, ending with most at N = 2.
  exp = dsd.updates_per_depth(dsd.depth_schedule("DSDGEXP", 64, 4000))
  assert exp[-1] == max(exp) and exp[-1] > 2 * exp[0]
  # The printed formulas make ≈ P/2 updates in all (see depth_schedule); 2P gives ≈ P.
  assert abs(sum(dsd.updates_per_depth(dsd.depth_schedule("DSDI", 64, 8000))) - 4000) < 20


@pytest.mark.parametrize("kind, start, total, end", [
    ("DSDX", 64, 4000, None), ("DSDI", 48, 4000, None), ("DSDI", 64, 4000, 6), ("DSDGL", 63, 4000, None),
    ("DSDGL", 8, 4000, 16), ("DSDN", 64, 4000, 8), ("DSDGL", 64, 0, None), ("DSDI", 64.0, 4000, None),
    ("DSDGL", 8, 4000, 0),
])
def test_depth_schedule_rejects(kind, start, total, end):
  with pytest.raises(ValueError, match="depth_schedule"):
    dsd.depth_schedule(kind, start, total, end)


def test_updates_walk_depths_trajectories_and_positions_in_order():
  plan = [(8, 2), (4, 3)]  # 2·4 + 3·2 = 14 updates
  got = [dsd.update_position(plan, u) for u in range(14)]
  assert got == ([(8, 0, j) for j in range(4)] + [(8, 1, j) for j in range(4)]
                 + [(4, t, j) for t in (2, 3, 4) for j in range(2)])
  with pytest.raises(ValueError):
    dsd.update_position(plan, 14)
  kwargs = dict(batch_size=5, shape=(2, 2, 1), num_classes=3, w_min=1.0, w_max=3.0, seed=7)
  first, third, next_traj = (dsd.trajectory_batch(plan, u, **kwargs) for u in (0, 2, 4))
  for key in ("noise", "label", "w"):  # one trajectory's rows stay the same across its positions
    np.testing.assert_array_equal(first[key], third[key])
  assert not np.array_equal(first["noise"], next_traj["noise"])
  assert third["position"].tolist() == [2] * 5 and third["num_steps"].tolist() == [8] * 5
  assert first["w"].min() >= 1.0 and first["w"].max() <= 3.0 and first["noise"].dtype == np.float32
  np.testing.assert_array_equal(dsd.trajectory_batch(plan, 2, **kwargs)["noise"], third["noise"])  # pure in u


# --- training DSD (§4.2, Eq. 1) -------------------------------------------------------------------------


def _v_model():
  """A tiny linear v-model with one parameter 'b' that only the eval-mode (stop-gradient) pass uses."""
  calls = []

  def v_fn(params, z, logsnr, labels, *, train=False, rng=None):
    calls.append(train)
    out = params["W"] * z + params["c"] * logsnr[:, None, None, None] / 20 + 0.1 * labels[:, None, None, None]
    return out if train else out + params["b"] * z
  params = {"W": jnp.float32(0.3), "c": jnp.float32(0.2), "b": jnp.float32(0.1)}
  return v_fn, params, calls


def test_training_loss_at_alpha_one_beta_zero_is_the_v_loss():
  v_fn, params, calls = _v_model()
  rng_np = np.random.default_rng(0)
  labels = np.arange(64) % 3
  batch = {"image": jnp.asarray(GMM.sample(rng_np, labels)), "label": jnp.asarray(labels, jnp.int32)}
  loss = lambda alpha, beta: dsd.training_loss(v_fn, logsnr_fn=LOGSNR, distill_steps=16, alpha=alpha, beta=beta)

  @jax.jit
  def run(params, batch, rng):  # one compilation for every quantity below
    mixed = loss(0.85, 0.15)(params, None, batch, rng)
    plain = loss(1.0, 0.0)(params, None, batch, rng)
    # The plain v-loss, drawn as teacher.teacher_loss draws t and ε.
    k_t, k_eps, _, _ = jax.random.split(rng, 4)
    t = jax.random.uniform(k_t, (64,))
    eps = jax.random.normal(k_eps, batch["image"].shape)
    lam_t = LOGSNR(t)
    z = diffusion.q_sample(batch["image"], eps, lam_t)
    ref = jnp.mean((v_fn(params, z, lam_t, batch["label"], train=True)
                    - diffusion.v_from_x_eps(batch["image"], eps, lam_t)) ** 2)
    grads = jax.grad(lambda p: loss(0.0, 1.0)(p, None, batch, rng)[0])(params)
    return mixed, plain, ref, grads

  (mixed, m), (plain, metrics), ref, grads = run(params, batch, jax.random.PRNGKey(4))
  np.testing.assert_allclose(float(plain), float(ref), rtol=1e-6)
  assert float(metrics["distill"]) > 0  # computed (and logged) even when β = 0
  # Default α, β = 0.85, 0.15 weigh the same two terms; one forward pass with gradient, one without.
  assert calls[:2] == [True, False]
  np.testing.assert_allclose(float(mixed), 0.85 * float(m["v_mse"]) + 0.15 * float(m["distill"]), rtol=1e-6)
  np.testing.assert_allclose(float(m["v_mse"]), float(ref), rtol=1e-6)
  # Gradients: 'b' (only in the stop-gradient pass) gets none; the distillation term does reach W and c.
  assert float(grads["b"]) == 0.0 and abs(float(grads["W"])) > 0 and abs(float(grads["c"])) > 0, grads


# --- optimisation -------------------------------------------------------------------------------------------


def test_learning_rate_is_cosine_annealed_to_ten_percent():
  schedule = optimizers.cosine_schedule(1e-6, 4000)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 2000, 4000, 5000)], [1e-6, 0.55e-6, 1e-7, 1e-7],
                             rtol=1e-5)
  warm = optimizers.cosine_schedule(1e-6, 4000, warmup_steps=100)
  assert float(warm(0)) == 0.0 and abs(float(warm(100)) - 1e-6) < 1e-12 and abs(float(warm(4000)) - 1e-7) < 1e-12
  optimizer, paper = dsd.paper_optimizer("imagenet256")
  np.testing.assert_allclose([float(paper(0)), float(paper(5000))], [1e-7, 1e-8], rtol=1e-5)
  assert dsd.PAPER_HYPERPARAMETERS["imagenet256"]["ema_decay"] == 0.9995
  assert dsd.PAPER_HYPERPARAMETERS["celeba_hq256"]["ema_decay"] == 0.995
  state = optimizer.init(PARAMS)
  updates, _ = optimizer.update({"gain": jnp.float32(10.0)}, state, PARAMS)
  assert 0 < -float(updates["gain"]) <= 1.1e-7  # clipped, Adam-normalised step of size ≈ lr
