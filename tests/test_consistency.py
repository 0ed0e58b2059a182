"""Guided consistency distillation against float64 hand computations, the exact Gaussian-mixture teacher and a
guided Gaussian teacher whose probability-flow ODE, hence consistency function, is known in closed form."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill import diffusion, samplers, schedules
from distill.methods import consistency as cd
from distill import testing
from distill.testing import GaussianMixture

LOGSNR = schedules.cosine_logsnr
GMM = GaussianMixture.random(0, num_classes=3, shape=(2, 2, 1), mean_scale=1.5, std=0.3)
NULL = GMM.num_classes
TEACHER = {"gain": jnp.float32(1.0)}  # teacher params, read through frozen['teacher']
N = 8
TOL = 1e-5  # x-space; float32 against float64


def pair_teacher_x(params, z, logsnr, labels, w, *, train=False, rng=None):
  """The CFG teacher network (conditional or unconditional by label) as an x-function; ignores w."""
  del w, train, rng
  return params["gain"] * GMM.denoise(z, logsnr, labels)


def guided_student_x(params, z, logsnr, labels, w, *, train=False, rng=None):
  """A w-conditioned 'student': params['gain'] times the exact guided mixture x̂^w (two calls written out)."""
  del train, rng
  b = lambda a: a[:, None, None, None]
  cond = GMM.denoise(z, logsnr, labels)
  uncond = GMM.denoise(z, logsnr, jnp.full_like(labels, NULL))
  return params["gain"] * ((1 + b(w)) * cond - b(w) * uncond)


# --- float64 references ----------------------------------------------------------------------------------


def np_alpha_sigma(lam):
  lam = np.asarray(lam, np.float64)
  return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


def lam(t, logsnr_fn=LOGSNR):
  """λ(t) of the schedule, as float64 (the schedule itself is float32 code, tested elsewhere)."""
  return np.asarray(logsnr_fn(jnp.asarray(t, jnp.float32)), np.float64)


def _b(a):
  return np.asarray(a, np.float64).reshape(-1, 1, 1, 1)


def np_denoise(z, lam_t, labels):
  """E[x | z_t, class] of GMM in float64 numpy, written independently of `GaussianMixture.denoise`."""
  b, d = z.shape[0], int(np.prod(GMM.shape))
  zf = z.reshape(b, d)
  mu = GMM.means.reshape(-1, d).astype(np.float64)
  s2 = GMM.stds.astype(np.float64) ** 2
  a, s = np_alpha_sigma(lam_t)
  out = np.empty_like(zf)
  for r in range(b):
    var = a[r] ** 2 * s2 + s[r] ** 2                        # [K]
    resid = zf[r] - a[r] * mu                                # [K, D]
    logp = np.log(GMM.weights) - 0.5 * np.sum(resid**2, 1) / var - 0.5 * d * np.log(var)
    if labels[r] != NULL:
      logp = np.where(GMM.classes == labels[r], logp, -np.inf)
    p = np.exp(logp - logp.max())
    p /= p.sum()
    out[r] = p @ (mu + (a[r] * s2 / var)[:, None] * resid)
  return out.reshape(z.shape)


def np_guided(z, lam_t, labels, w):
  return (1 + _b(w)) * np_denoise(z, lam_t, labels) - _b(w) * np_denoise(z, lam_t, np.full_like(labels, NULL))


def np_ddim(z, x_hat, lam_t, lam_s):
  a_t, s_t = np_alpha_sigma(lam_t)
  a_s, s_s = np_alpha_sigma(lam_s)
  return _b(a_s) * x_hat + _b(s_s / s_t) * (z - _b(a_t) * x_hat)


def np_f(z, lam_t, x_hat):
  """f = c_skip z + c_out x̂ with c_skip = σ_0/σ_t, c_out = α_0 − c_skip α_t (λ_0 = λ(0))."""
  a_0, s_0 = np_alpha_sigma(lam(0.0))
  a_t, s_t = np_alpha_sigma(lam_t)
  c_skip = s_0 / s_t
  return _b(c_skip) * z + _b(a_0 - c_skip * a_t) * x_hat


def np_target(z_next, n, labels, w, gain, *, shift=0, teacher_w_sign=1.0, teacher_step=True):
  """The CD target by hand: the guided teacher's DDIM step t_{n+1} → t_n, then the target net f_θ⁻ at t_n.
  Mutants: shift (the grid indices moved by `shift`), teacher_w_sign (−1: the guidance sign flipped),
  teacher_step=False (the target net read at z_{t_{n+1}}, no teacher step)."""
  n = np.asarray(n) + shift
  lam_next, lam_n = lam(np.clip((n + 1) / N, 0, 1)), lam(np.clip(n / N, 0, 1))
  if teacher_step:
    z_n = np_ddim(z_next, np_guided(z_next, lam_next, labels, teacher_w_sign * w), lam_next, lam_n)
  else:
    z_n, lam_n = z_next, lam_next
  return np_f(z_n, lam_n, gain * np_guided(z_n, lam_n, labels, w))


def _rows(indices, seed=0):
  """Two rows per index n: z_{t_{n+1}} = α x + σ ε in float64, labels 0..2, w spread over [0, 4]."""
  n = np.repeat(np.asarray(indices), 2)
  rng = np.random.default_rng(seed)
  labels = (np.arange(len(n)) % 3).astype(np.int32)
  w = np.linspace(0.0, 4.0, len(n))
  a, s = np_alpha_sigma(lam((n + 1) / N))
  z = _b(a) * GMM.sample(rng, labels) + _b(s) * rng.standard_normal((len(n),) + GMM.shape)
  return n, z.astype(np.float32), labels, w.astype(np.float32)


# --- 1. the parameterisation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear_beta"])
def test_boundary_condition_holds_for_any_network_output(schedule):
  logsnr_fn = schedules.get_logsnr_fn(schedule)
  z = jax.random.normal(jax.random.PRNGKey(0), (6, 2, 2, 1))

  def wild_x(params, z, logsnr, labels, w, *, train=False, rng=None):
    return 1e3 * jax.random.normal(jax.random.PRNGKey(1), z.shape) + params

  lam_0 = logsnr_fn(jnp.zeros(6))
  f = cd.consistency_fn(wild_x, 5.0, z, lam_0, jnp.zeros(6, jnp.int32), jnp.linspace(0, 4, 6),
                        logsnr_data=cd.data_logsnr(logsnr_fn))
  np.testing.assert_allclose(f, z, atol=1e-6, rtol=0)
  # One grid step away the output is the network's almost entirely (f ≈ x̂, as in LCM).
  lam_1 = logsnr_fn(jnp.full(6, 1 / 50))
  f1 = cd.consistency_fn(wild_x, 5.0, z, lam_1, jnp.zeros(6, jnp.int32), jnp.zeros(6),
                         logsnr_data=cd.data_logsnr(logsnr_fn))
  assert float(jnp.max(jnp.abs(f1 - z))) > 100


@pytest.mark.parametrize("schedule", ["cosine", "linear_beta"])
def test_boundary_coefficients_against_the_hand_formula(schedule):
  logsnr_fn = schedules.get_logsnr_fn(schedule)
  t = np.array([0.0, 0.001, 0.02, 0.3, 0.7, 1.0])
  c_skip, c_out = cd.boundary_coefficients(logsnr_fn(jnp.asarray(t, jnp.float32)), cd.data_logsnr(logsnr_fn))
  assert c_skip.shape == c_out.shape == (6,) and c_skip.dtype == jnp.float32
  a_0, s_0 = np_alpha_sigma(lam(0.0, logsnr_fn))
  a_t, s_t = np_alpha_sigma(lam(t, logsnr_fn))
  np.testing.assert_allclose(c_skip, s_0 / s_t, rtol=1e-5)
  np.testing.assert_allclose(c_out, a_0 - s_0 / s_t * a_t, rtol=1e-5, atol=1e-7)
  assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
  # Shapes follow λ: a [2, 3] grid of λ gives [2, 3] coefficients.
  grid = cd.boundary_coefficients(jnp.zeros((2, 3)), 20.0)
  assert grid[0].shape == grid[1].shape == (2, 3)


# --- 2. the target -----------------------------------------------------------------------------------------


def test_target_is_one_guided_teacher_step_then_the_target_net():
  n, z, labels, w = _rows([0, 1, 4, N - 1])
  gain = 0.9  # target params differ from the teacher's, so a swap of the two would show
  calls = []

  def spy_teacher(params, z, logsnr, labels, w, *, train=False, rng=None):
    calls.append((z.shape[0], np.asarray(labels)))
    return pair_teacher_x(params, z, logsnr, labels, w)

  got = cd.consistency_target(guided_student_x, {"gain": jnp.float32(gain)}, spy_teacher, TEACHER, jnp.asarray(z),
                              jnp.asarray(n, jnp.int32), jnp.asarray(labels), jnp.asarray(w), logsnr_fn=LOGSNR,
                              num_intervals=N, null_label=NULL)
  got = np.asarray(got, np.float64)
  z64 = z.astype(np.float64)
  err = np.max(np.abs(got - np_target(z64, n, labels, w, gain)))
  assert err < TOL, err
  # One teacher call of 2B rows: the conditional rows, then the same rows with the null label.
  assert len(calls) == 1 and calls[0][0] == 2 * len(n)
  np.testing.assert_array_equal(calls[0][1], np.concatenate([labels, np.full_like(labels, NULL)]))
  # The same criterion fails for the targets of common mistakes:
  for mutant in ({"shift": 1}, {"teacher_w_sign": -1.0}, {"teacher_step": False}):
    wrong = np.max(np.abs(got - np_target(z64, n, labels, w, gain, **mutant)))
    assert wrong > 100 * TOL, (mutant, wrong)
  # At n = 0 the target is the teacher's landing point ẑ_{t_0} itself (the boundary condition).
  lam_1, lam_0 = lam(np.full(2, 1 / N)), lam(np.zeros(2))
  landing = np_ddim(z64[:2], np_guided(z64[:2], lam_1, labels[:2], w[:2]), lam_1, lam_0)
  np.testing.assert_allclose(got[:2], landing, atol=TOL)


def test_skip_k_steps_the_teacher_over_k_intervals():
  n, z, labels, w = _rows([0, 3])
  # z is drawn at t_{n+1}; read it as the state at t_{n+2} of a grid of 2N intervals with skip 2: the same times.
  got = cd.consistency_target(guided_student_x, TEACHER, pair_teacher_x, TEACHER, jnp.asarray(z),
                              jnp.asarray(2 * n, jnp.int32), jnp.asarray(labels), jnp.asarray(w), logsnr_fn=LOGSNR,
                              num_intervals=2 * N, null_label=NULL, skip=2)
  err = np.max(np.abs(np.asarray(got, np.float64) - np_target(z.astype(np.float64), n, labels, w, 1.0)))
  assert err < TOL, err


@pytest.mark.parametrize("metric", ["l2", "pseudo_huber"])
def test_distance(metric):
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((2, 3, 4, 4, 3))
  d = np.asarray(cd.distance(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), metric), np.float64)
  sq = np.sum((a - b).reshape(3, -1) ** 2, 1)
  c = 0.00054 * np.sqrt(48)
  ref = sq / 48 if metric == "l2" else np.sqrt(sq + c**2) - c
  np.testing.assert_allclose(d, ref, rtol=1e-5)
  assert float(jnp.max(cd.distance(jnp.asarray(a), jnp.asarray(a), metric))) == 0.0
  with pytest.raises(ValueError, match="allowed"):
    cd.distance(jnp.asarray(a), jnp.asarray(b), "l3")


def test_interval_weights():
  lam_n, lam_next = jnp.asarray([20.0, 2.0, -4.0]), jnp.asarray([6.0, 0.0, -10.0])
  np.testing.assert_array_equal(cd.interval_weight(lam_n, lam_next, "constant"), np.ones(3))
  sigma = lambda l: np.exp(-0.5 * np.asarray(l, np.float64))  # σ_VE
  np.testing.assert_allclose(cd.interval_weight(lam_n, lam_next, "ict"), 1 / (sigma(lam_next) - sigma(lam_n)),
                             rtol=1e-5)


# --- 3. a perfect student: the exact consistency function of a guided Gaussian teacher ------------------------
# Conditional classes 0, 1 and the unconditional model (label 2) are Gaussians N(μ, s²I) with one shared s.
# The guided score (1 + w)∇log p_c − w∇log p_∅ is then that of N(μ_w, s²I) diffused, μ_w = (1 + w)μ_c − wμ_∅,
# whose probability-flow ODE is z_t = α_t μ_w + √(α_t² s² + σ_t²)·ξ: the consistency function is
# f*(z_t, t) = α_0 μ_w + √(v_0 / v_t)·(z_t − α_t μ_w), v = α² s² + σ².

GAUSS = GaussianMixture(means=np.array([[-1.0, 0.5, 1.0, 0.0], [1.0, -0.5, 0.0, 1.5], [0.0, 0.0, 0.5, 0.75]],
                                       np.float32).reshape(3, 2, 2, 1),
                        stds=np.full(3, 0.5, np.float32), weights=np.full(3, 1 / 3, np.float32),
                        classes=np.arange(3), num_classes=3)
GAUSS_NULL = 2  # the 'unconditional' Gaussian is class 2 (not the mixture's own null label)


def gauss_teacher_x(params, z, logsnr, labels, w, *, train=False, rng=None):
  del params, w, train, rng
  return GAUSS.denoise(z, logsnr, labels)


def exact_f(z, logsnr, labels, w):
  """f*(z_t, t) of the guided Gaussian ODE above. z: [B, 2, 2, 1]; logsnr, w: [B]."""
  mu = jnp.asarray(GAUSS.means)
  mu_w = (1 + w)[:, None, None, None] * mu[labels] - w[:, None, None, None] * mu[GAUSS_NULL]
  s2 = float(GAUSS.stds[0]) ** 2
  a_t, s_t = schedules.alpha_sigma(logsnr)
  a_0, s_0 = schedules.alpha_sigma(cd.data_logsnr(LOGSNR))
  scale = jnp.sqrt((a_0**2 * s2 + s_0**2) / (a_t**2 * s2 + s_t**2))[:, None, None, None]
  return a_0 * mu_w + scale * (z - a_t[:, None, None, None] * mu_w)


def perfect_student_x(params, z, logsnr, labels, w, *, train=False, rng=None):
  """The x̂ for which f = c_skip z + c_out x̂ is f*, blended by params['p'] with the teacher's x̂_c (p = 0: the
  teacher's one-step DDIM, ignoring guidance, a plausible but wrong consistency function)."""
  del train, rng
  c_skip, c_out = cd.boundary_coefficients(logsnr, cd.data_logsnr(LOGSNR))
  safe = jnp.where(c_out == 0, 1.0, c_out)[:, None, None, None]  # at t_0 x̂ is multiplied by c_out = 0
  x_perfect = (exact_f(z, logsnr, labels, w) - c_skip[:, None, None, None] * z) / safe
  return params["p"] * x_perfect + (1 - params["p"]) * GAUSS.denoise(z, logsnr, labels)


def _gauss_batch(n=256, seed=0):
  labels = np.arange(n) % 2
  return {"image": jnp.asarray(GAUSS.sample(np.random.default_rng(seed), labels)), "label": jnp.asarray(labels)}


@pytest.mark.parametrize("metric", ["l2", "pseudo_huber"])
def test_the_exact_consistency_function_has_vanishing_loss(metric):
  def loss_at(num_intervals, p):
    loss_fn = cd.loss(perfect_student_x, gauss_teacher_x, logsnr_fn=LOGSNR, null_label=GAUSS_NULL, w_min=0.0,
                      w_max=3.0, num_intervals=num_intervals, metric=metric)
    params = cd.init_params({"p": jnp.float32(p)})
    return float(jax.jit(loss_fn)(params, {"teacher": None}, _gauss_batch(), jax.random.PRNGKey(0))[0])

  coarse, fine, wrong = loss_at(64, 1.0), loss_at(512, 1.0), loss_at(512, 0.0)
  # The only error left is the teacher's DDIM step, O(h²) locally: f*'s squared error falls as h⁴ (8⁴ = 4096
  # from N = 64 to 512; a first-order error would give 8² = 64). Pseudo-Huber is quadratic below c ≈ 1e-3.
  assert fine < coarse / (1000 if metric == "l2" else 100), (coarse, fine)
  # Any smooth f has a consistency loss falling as h², so 'wrong' is small too, but far above f*'s.
  assert wrong > 1e3 * fine, (fine, wrong)
  assert (fine < 1e-8 if metric == "l2" else fine < 1e-4), fine


# --- 4. the EMA target network ------------------------------------------------------------------------------


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"a": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), "b": jnp.asarray(rng.standard_normal(4),
                                                                                      jnp.float32)}


@pytest.mark.parametrize("mu", [0.9, 0.0])
def test_ema_target_optimizer_is_an_exact_ema(mu):
  lr, steps = 0.1, 4
  opt = cd.ema_target_optimizer(optax.sgd(lr), mu)
  params = {"online": _tree(0), "target": _tree(1)}  # θ⁻ ≠ θ at the start, so the EMA's memory shows
  state = opt.init(params)
  online = {k: np.asarray(v, np.float64) for k, v in params["online"].items()}
  target = {k: np.asarray(v, np.float64) for k, v in params["target"].items()}
  for step in range(steps):
    grads = {"online": _tree(10 + step), "target": _tree(20 + step)}  # target grads must be ignored
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for k in online:
      online[k] = online[k] - lr * np.asarray(grads["online"][k], np.float64)
      target[k] = mu * target[k] + (1 - mu) * online[k]
      np.testing.assert_allclose(params["online"][k], online[k], rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(params["target"][k], target[k], rtol=1e-6, atol=1e-6)
      if mu == 0.0:  # θ⁻ is θ after every step (to the last bit of θ⁻ + (θ − θ⁻))
        np.testing.assert_allclose(params["target"][k], params["online"][k], rtol=0, atol=1e-6)


def test_ema_target_optimizer_leaves_the_inner_optimizer_alone():
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
  opt = cd.ema_target_optimizer(inner, 0.95)
  params = cd.init_params(_tree(0))
  state, ref_state, ref = opt.init(params), inner.init(params["online"]), params["online"]
  for step in range(3):
    g = _tree(30 + step)
    updates, state = opt.update({"online": g, "target": jax.tree.map(jnp.zeros_like, g)}, state, params)
    params = optax.apply_updates(params, updates)
    ref_updates, ref_state = inner.update(g, ref_state, ref)
    ref = optax.apply_updates(ref, ref_updates)
    for k in ref:
      np.testing.assert_array_equal(params["online"][k], ref[k])
  with pytest.raises(ValueError, match="needs params"):
    opt.update({"online": g, "target": g}, state)
  with pytest.raises(ValueError, match="mu"):
    cd.ema_target_optimizer(inner, 1.5)


def test_gradients_reach_the_online_student_only():
  loss_fn = cd.loss(guided_student_x, pair_teacher_x, logsnr_fn=LOGSNR, null_label=NULL, w_min=0.0, w_max=4.0,
                    num_intervals=N)
  labels = np.arange(48) % 3
  batch = {"image": jnp.asarray(GMM.sample(np.random.default_rng(0), labels)), "label": jnp.asarray(labels)}
  params = {"online": {"gain": jnp.float32(1.3)}, "target": {"gain": jnp.float32(0.8)}}
  grads = jax.jit(jax.grad(lambda p, f: loss_fn(p, f, batch, jax.random.PRNGKey(0))[0], argnums=(0, 1)))(
      params, {"teacher": TEACHER})
  assert float(grads[0]["target"]["gain"]) == 0.0
  assert float(grads[1]["teacher"]["gain"]) == 0.0
  assert float(grads[0]["online"]["gain"]) != 0.0


def test_loss_draws_every_interval_and_runs_the_student_in_train_mode():
  seen = {"online": set(), "target": set()}

  def spy_student(params, z, logsnr, labels, w, *, train=False, rng=None):
    seen["online" if float(params["id"]) == 0 else "target"].add((train, rng is not None))
    return z

  def spy_teacher(params, z, logsnr, labels, w, *, train=False, rng=None):
    seen["lam"] = np.asarray(logsnr)[: z.shape[0] // 2]
    return z

  params = {"online": {"id": jnp.float32(0)}, "target": {"id": jnp.float32(1)}}
  loss_fn = cd.loss(spy_student, spy_teacher, logsnr_fn=LOGSNR, null_label=NULL, w_min=0.0, w_max=1.0,
                    num_intervals=4, skip=2)
  labels = np.zeros(300, np.int32)
  loss_fn(params, {"teacher": None}, {"image": jnp.zeros((300, 2, 2, 1)), "label": jnp.asarray(labels)},
          jax.random.PRNGKey(0))  # eagerly: the drawn times are concrete
  assert seen["online"] == {(True, True)} and seen["target"] == {(False, False)}
  # The teacher starts from t_{n+k}, n ∈ {0, 1, 2}, k = 2: t ∈ {1/2, 3/4, 1}.
  np.testing.assert_allclose(np.unique(seen["lam"]), np.sort(lam([0.5, 0.75, 1.0])), atol=1e-5)
  for bad in ({"metric": "l1"}, {"weighting": "snr"}, {"num_intervals": 0}, {"skip": 5}):
    kwargs = dict(logsnr_fn=LOGSNR, null_label=NULL, w_min=0.0, w_max=1.0, num_intervals=4) | bad
    with pytest.raises(ValueError):
      cd.loss(spy_student, spy_teacher, **kwargs)


# --- 5. sampling --------------------------------------------------------------------------------------------


def _sample(x_fn, z, labels, w, num_steps, seed=0):
  return cd.sample(x_fn, TEACHER, z, labels, w, logsnr_fn=LOGSNR, num_steps=num_steps, rng=jax.random.PRNGKey(seed))


def test_one_step_sample_is_f_at_the_noise_end():
  z = jax.random.normal(jax.random.PRNGKey(0), (6, 2, 2, 1))
  labels, w = jnp.arange(6) % 3, jnp.linspace(0.0, 4.0, 6)
  out = _sample(guided_student_x, z, labels, w, 1)
  ref = cd.consistency_fn(guided_student_x, TEACHER, z, LOGSNR(jnp.ones(6)), labels, w,
                          logsnr_data=cd.data_logsnr(LOGSNR))
  np.testing.assert_allclose(out.x, ref, atol=1e-6)
  assert out.nfe == 1
  # clip=True clips every step's x to [−1, 1] (the mixture's means reach beyond it at w = 4).
  clipped = cd.sample(guided_student_x, TEACHER, z, labels, w, logsnr_fn=LOGSNR, num_steps=1,
                      rng=jax.random.PRNGKey(0), clip=True)
  assert float(jnp.max(jnp.abs(ref))) > 1.0
  np.testing.assert_allclose(clipped.x, jnp.clip(ref, -1.0, 1.0), atol=1e-6)


def test_two_step_sample_renoises_at_the_midpoint():
  z = jax.random.normal(jax.random.PRNGKey(0), (6, 2, 2, 1))
  labels, w, rng = jnp.arange(6) % 3, jnp.full(6, 1.5), jax.random.PRNGKey(3)
  out = cd.sample(guided_student_x, TEACHER, z, labels, 1.5, logsnr_fn=LOGSNR, num_steps=2, rng=rng)
  f = lambda z, t: cd.consistency_fn(guided_student_x, TEACHER, z, LOGSNR(jnp.full(6, t)), labels, w,
                                     logsnr_data=cd.data_logsnr(LOGSNR))
  x1 = f(z, 1.0)
  z2 = diffusion.q_sample(x1, cd.row_noise(jax.random.fold_in(rng, 1), z.shape), LOGSNR(jnp.full(6, 0.5)))
  np.testing.assert_allclose(out.x, f(z2, 0.5), atol=1e-5)
  assert float(jnp.max(jnp.abs(out.x - x1))) > 1e-2  # the second step did something


def test_sample_rows_do_not_depend_on_the_batch():
  z = jax.random.normal(jax.random.PRNGKey(0), (8, 2, 2, 1))
  labels, w = jnp.arange(8) % 3, jnp.linspace(0.0, 4.0, 8)
  run = jax.jit(lambda z, labels, w: _sample(guided_student_x, z, labels, w, 4).x)
  np.testing.assert_allclose(run(z[:5], labels[:5], w[:5]), run(z, labels, w)[:5], atol=1e-6)
  noise = cd.row_noise(jax.random.PRNGKey(1), (8, 3))
  np.testing.assert_array_equal(cd.row_noise(jax.random.PRNGKey(1), (5, 3)), noise[:5])


def test_sampler_evaluates_once_per_step_and_compiles_once():
  seen, traces = [], []

  def spy_x(params, z, logsnr, labels, w, *, train=False, rng=None):
    traces.append(1)
    jax.debug.callback(lambda l: seen.append(float(l[0])), logsnr, ordered=True)
    return guided_student_x(params, z, logsnr, labels, w)

  z = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 1))
  run = jax.jit(lambda k: _sample(spy_x, z, jnp.zeros(4, jnp.int32), 1.0, k))
  for k in (1, 2, 4):
    seen.clear()
    out = run(jnp.int32(k))
    out.x.block_until_ready()
    jax.effects_barrier()
    assert int(out.nfe) == k and len(seen) == k
    np.testing.assert_allclose(seen, lam(1.0 - np.arange(k) / k), atol=1e-4)  # τ = 1, 1 − 1/K, …, 1/K
  assert len(traces) == 1


# --- 6. learning -------------------------------------------------------------------------------------------


def TinyStudent():  # the shared test MLP (distill.testing), over this file's labels
  return testing.TinyStudent(NULL + 1)


mlp_student_x = testing.tiny_student_x(NULL + 1)


def test_training_a_tiny_student_lowers_the_loss_and_approaches_the_teacher():
  w_min, w_max, steps = 0.0, 2.0, 200
  loss_fn = cd.loss(mlp_student_x, pair_teacher_x, logsnr_fn=LOGSNR, null_label=NULL, w_min=w_min, w_max=w_max,
                    num_intervals=N)
  labels = np.tile(np.arange(3), 1366)[:4096].astype(np.int32)
  pool_x, pool_labels = jnp.asarray(GMM.sample(np.random.default_rng(0), labels)), jnp.asarray(labels)
  student = TinyStudent().init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 1)), jnp.zeros(1), jnp.zeros(1, jnp.int32),
                               jnp.zeros(1))["params"]
  opt = cd.ema_target_optimizer(optax.adam(3e-3), 0.9)
  frozen = {"teacher": TEACHER}

  def step(carry, key):
    params, opt_state = carry
    k_batch, k_loss = jax.random.split(key)
    idx = jax.random.randint(k_batch, (256,), 0, pool_x.shape[0])
    grads, _ = jax.grad(loss_fn, has_aux=True)(params, frozen, {"image": pool_x[idx], "label": pool_labels[idx]},
                                                k_loss)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  params = cd.init_params(student)
  fit = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), jax.random.split(jax.random.PRNGKey(1), steps))[0][0])
  eval_batch = {"image": pool_x[:768], "label": pool_labels[:768]}
  eval_loss = jax.jit(lambda p: loss_fn(p, frozen, eval_batch, jax.random.PRNGKey(2))[0])

  ev_labels = jnp.asarray(np.tile(np.arange(3), 200), jnp.int32)
  ev_w = jax.random.uniform(jax.random.PRNGKey(7), (600,), minval=w_min, maxval=w_max)
  ev_z = jax.random.normal(jax.random.PRNGKey(8), (600, 2, 2, 1))
  teacher = samplers.ddim_sample(samplers.guided_denoiser(GMM.model_fn, ev_labels, ev_w, NULL), ev_z, LOGSNR, 64).x
  one_step = jax.jit(lambda p: cd.sample(mlp_student_x, p, ev_z, ev_labels, ev_w, logsnr_fn=LOGSNR, num_steps=1,
                                         rng=jax.random.PRNGKey(9)).x)
  dist = lambda p: float(jnp.mean(jnp.sum((one_step(p) - teacher) ** 2, axis=(1, 2, 3))))

  before, dist_before = float(eval_loss(params)), dist(params["target"])
  params = fit(params)
  after, dist_after = float(eval_loss(params)), dist(params["target"])
  # Measured: the loss falls ~30x, the distance ~80x (5.6 → 0.07).
  assert after < before / 4, (before, after)
  assert dist_after < dist_before / 10, (dist_before, dist_after)
  # One student step lands closer to the teacher's ODE endpoints than two of the teacher's own DDIM steps (0.23).
  two_step = samplers.ddim_sample(samplers.guided_denoiser(GMM.model_fn, ev_labels, ev_w, NULL), ev_z, LOGSNR, 2).x
  assert dist_after < float(jnp.mean(jnp.sum((two_step - teacher) ** 2, axis=(1, 2, 3)))), dist_after
