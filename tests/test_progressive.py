"""Stage two (Algorithms 2–5) against the exact Gaussian-mixture teacher and float64 hand loops."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill import diffusion, losses, samplers, schedules
from distill.methods.guided import progressive
from distill.methods.guided import stage_one as guided
from distill import testing
from distill.testing import GaussianMixture

LOGSNR = schedules.cosine_logsnr
GMM = GaussianMixture.random(0, num_classes=3, shape=(2, 2, 1), mean_scale=1.5, std=0.3)
NULL = GMM.num_classes
TEACHER = {"gain": jnp.float32(1.0)}  # teacher params, read through frozen['teacher']
N = 8
TOL = 1e-5  # x-space; float32 targets land within ~5e-7 of the float64 hand loop


def pair_teacher_x(params, z, logsnr, labels, w, *, train=False, rng=None):
  """The CFG teacher network (conditional or unconditional by label) as an x-function; ignores w."""
  del w, train, rng
  return params["gain"] * GMM.denoise(z, logsnr, labels)


def guided_teacher_x(params, z, logsnr, labels, w, *, train=False, rng=None):
  """The w-conditioned teacher of a stage-two round: the exact guided mixture x̂^w (one 2B-row call)."""
  del train, rng
  return diffusion.cfg_mix(*losses.cond_uncond(pair_teacher_x, params, z, logsnr, labels, w, NULL), w)


# --- float64 references ----------------------------------------------------------------------------


def np_alpha_sigma(lam):
  lam = np.asarray(lam, np.float64)
  return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


def lam(t):
  """λ(t) from the schedule under test elsewhere, as float64 [B]."""
  return np.asarray(LOGSNR(jnp.asarray(t, jnp.float32)), np.float64)


def _b(a):
  return np.asarray(a, np.float64)[:, None, None, None]


def np_ddim(z, x_hat, lam_t, lam_s):
  """z_s = α_s x̂ + (σ_s/σ_t)(z_t − α_t x̂), in float64."""
  a_t, s_t = np_alpha_sigma(lam_t)
  a_s, s_s = np_alpha_sigma(lam_s)
  return _b(a_s) * x_hat + _b(s_s / s_t) * (z - _b(a_t) * x_hat)


def np_x(x_fn, z, t, labels, w):
  return np.asarray(x_fn(TEACHER, jnp.asarray(z, jnp.float32), jnp.asarray(lam(t), jnp.float32),
                         jnp.asarray(labels), jnp.asarray(w, jnp.float32)), np.float64)


def hand_two_steps(z_t, times, labels, w, second_x=guided_teacher_x, second_labels=None):
  """The teacher's two DDIM steps t → t' → t'' in float64 (times: three [B] arrays). Returns (z_t'', x̂(z_t),
  x̂(z_t')). The second step may use another model (Alg. 5's conditional or unconditional head)."""
  t, t1, t2 = times
  x0 = np_x(guided_teacher_x, z_t, t, labels, w)
  z1 = np_ddim(z_t, x0, lam(t), lam(t1))
  x1 = np_x(second_x, z1, t1, labels if second_labels is None else second_labels, w)
  return np_ddim(z1, x1, lam(t1), lam(t2)), x0, x1


def _rows(indices, seed=0):
  """A batch with two rows per step index i: z_t = α_t x + σ_t ε drawn in float64, labels, w ∈ [0, 4]."""
  i = np.repeat(np.asarray(indices), 2)
  rng = np.random.default_rng(seed)
  labels = (np.arange(len(i)) % 3).astype(np.int32)
  w = np.linspace(0.0, 4.0, len(i)).astype(np.float32)
  a, s = np_alpha_sigma(lam(i / N))
  z_t = (_b(a) * GMM.sample(rng, labels) + _b(s) * rng.standard_normal((len(i),) + GMM.shape)).astype(np.float32)
  return i, z_t, labels, w


def _landing_error(x_tilde, z_t, t, t2, z2):
  """Where the student's single DDIM step t → t'' with x̃ lands, minus the teacher's z_t'', per row, in x-space:
  divided by ∂z_t''/∂x̃ = α_t'' − (σ_t''/σ_t)·α_t. That slope is ~1 except at t = 0 (encoder, i = 0), where
  it is σ_t''/σ_0 ~ 1e4 and float32 rounding of z_0 is amplified as much in z-space."""
  a_t, s_t = np_alpha_sigma(lam(t))
  a_2, s_2 = np_alpha_sigma(lam(t2))
  landed = np_ddim(z_t.astype(np.float64), np.asarray(x_tilde, np.float64), lam(t), lam(t2))
  return np.max(np.abs(landed - z2), axis=(1, 2, 3)) / np.abs(a_2 - s_2 / s_t * a_t)


# kind: (target function, offsets of t' and t'' in units of 1/N, step indices to test)
TARGETS = {
    "deterministic": (progressive.deterministic_target, (-0.5, -1.0), [N, 5, 1]),
    "stochastic": (progressive.stochastic_target, (-1.0, -2.0), [N, 5, 2, 1]),
    "encoder": (progressive.encoder_target, (0.5, 1.0), [0, 3, N - 1]),
}


def _target_errors(kind, logsnr_fn=LOGSNR):
  """Per-row error of a round's target against the hand loop (x-space):
  - the student's one-step landing on the teacher's two steps, wherever the closed form applies;
  - the last-step rule where t'' = 0 (deterministic i = 1, stochastic i = 2): x̃ = teacher x̂(z_t');
  - the stochastic round's single step at i = 1: x̃ = teacher x̂(z_t)."""
  target_fn, (o1, o2), indices = TARGETS[kind]
  i, z_t, labels, w = _rows(indices)
  got = np.asarray(target_fn(guided_teacher_x, TEACHER, jnp.asarray(z_t), jnp.asarray(i, jnp.int32), N,
                             jnp.asarray(labels), jnp.asarray(w), logsnr_fn), np.float64)
  t = i / N
  t1, t2 = np.clip(t + o1 / N, 0, 1), np.clip(t + o2 / N, 0, 1)
  z2, x0, x1 = hand_two_steps(z_t.astype(np.float64), (t, t1, t2), labels, w)
  last = (kind == "deterministic") & (i == 1) | (kind == "stochastic") & (i == 2)
  single = (kind == "stochastic") & (i == 1)
  err = _landing_error(got, z_t, t, t2, z2)
  err = np.where(last, np.max(np.abs(got - x1), axis=(1, 2, 3)), err)
  return np.where(single, np.max(np.abs(got - x0), axis=(1, 2, 3)), err)


def _ddim_step_wrong_sign(z_t, x_hat, logsnr_t, logsnr_s):
  """Mutant: the ε term of the DDIM step enters with the wrong sign."""
  alpha_t, _ = schedules.alpha_sigma(logsnr_t)
  alpha_s, _ = schedules.alpha_sigma(logsnr_s)
  r = schedules.sigma_ratio(logsnr_s, logsnr_t)
  b = lambda a: a.reshape(a.shape + (1,) * (z_t.ndim - a.ndim))
  return b(alpha_s) * x_hat - b(r) * (z_t - b(alpha_t) * x_hat)


@pytest.mark.parametrize("kind", list(TARGETS))
def test_one_student_step_lands_on_two_teacher_steps(kind, monkeypatch):
  err = _target_errors(kind)
  assert np.max(err) < TOL, err
  # The same criterion fails for deliberately mutated targets:
  # (1) the whole grid shifted by half a step,
  shifted = _target_errors(kind, lambda t: LOGSNR(jnp.clip(t - 0.5 / N, 0.0, 1.0)))
  assert np.max(shifted) > 100 * TOL, shifted
  # (2) the teacher's midpoint t' moved half a step towards t'',
  times = progressive.round_times
  with monkeypatch.context() as m:
    m.setattr(progressive, "round_times",
              lambda i, n, offs: times(i, n, (offs[0] + np.sign(offs[1]) * 0.5,) + offs[1:]))
    midpoint = _target_errors(kind)
  assert np.max(midpoint) > 100 * TOL, midpoint
  # (3) a sign error in the teacher's DDIM steps.
  with monkeypatch.context() as m:
    m.setattr(diffusion, "ddim_step", _ddim_step_wrong_sign)
    sign = _target_errors(kind)
  assert np.max(sign) > 100 * TOL, sign


# --- losses ----------------------------------------------------------------------------------------


def _batch(seed=0, n=96):
  rng = np.random.default_rng(seed)
  labels = np.tile(np.arange(3), n // 3).astype(np.int32)
  return {"image": jnp.asarray(GMM.sample(rng, labels)), "label": jnp.asarray(labels)}


def _frozen(num_steps):
  return {"teacher": TEACHER, "num_steps": jnp.int32(num_steps)}


def _oracle_or_teacher(target_fn, num_steps):
  """A student x-function: params['oracle'] = 1 outputs exactly the round's target (recovering i from λ),
  0 is the teacher itself (one teacher step where two are wanted). One compiled loss serves both."""
  def student_x(params, z, logsnr, labels, w, *, train=False, rng=None):
    assert train and rng is not None  # the student runs in training mode with a dropout rng
    i = jnp.round(schedules.cosine_time(logsnr) * num_steps).astype(jnp.int32)
    oracle = target_fn(guided_teacher_x, TEACHER, z, i, num_steps, labels, w, LOGSNR)
    teacher = guided_teacher_x(TEACHER, z, logsnr, labels, w)
    return params["oracle"] * oracle + (1 - params["oracle"]) * teacher
  return student_x


LOSSES = {
    "deterministic": progressive.deterministic_round_loss,
    "stochastic": progressive.stochastic_round_loss,
    "encoder": progressive.encoder_round_loss,
}


@pytest.mark.parametrize("kind", list(LOSSES))
def test_loss_is_zero_for_a_student_outputting_the_target(kind):
  student_x = _oracle_or_teacher(TARGETS[kind][0], N)
  loss_fn = jax.jit(LOSSES[kind](student_x, guided_teacher_x, logsnr_fn=LOGSNR, w_min=0.0, w_max=4.0))
  batch, rng = _batch(), jax.random.PRNGKey(1)
  exact, _ = loss_fn({"oracle": jnp.float32(1.0)}, _frozen(N), batch, rng)
  wrong, metrics = loss_fn({"oracle": jnp.float32(0.0)}, _frozen(N), batch, rng)
  assert float(exact) < 1e-6, float(exact)
  assert float(wrong) > 1e-3 and float(metrics["x_mse"]) > 1e-4, (float(wrong), metrics)
  # N comes from frozen['num_steps']: the oracle for N is wrong for a round at N/2.
  halved, _ = loss_fn({"oracle": jnp.float32(1.0)}, _frozen(N // 2), batch, rng)
  assert float(halved) > 1e-3, float(halved)


def test_one_compiled_loss_serves_every_round():
  traces = []

  def student_x(params, z, logsnr, labels, w, *, train=False, rng=None):
    traces.append(1)  # runs once per trace, i.e. per compilation
    return guided_teacher_x(TEACHER, z, logsnr, labels, w)

  loss_fn = jax.jit(progressive.deterministic_round_loss(student_x, guided_teacher_x, logsnr_fn=LOGSNR, w_min=0.0,
                                                         w_max=4.0))
  losses = [float(loss_fn(None, _frozen(n), _batch(n=24), jax.random.PRNGKey(0))[0]) for n in (1, 2, 4, 8)]
  assert len(traces) == 1
  assert all(np.isfinite(losses)) and losses[0] > losses[-1]  # one step from t = 1 is the hardest move


def test_round_indices_cover_each_algorithms_range():
  seen = {}
  for kind, make_loss in LOSSES.items():
    def student_x(params, z, logsnr, labels, w, *, train=False, rng=None, kind=kind):
      # The student sees λ_t of t = i/N: recover i (concrete: the loss runs eagerly, no jit).
      seen[kind] = set(np.round(np.asarray(schedules.cosine_time(logsnr)) * 4).astype(int).tolist())
      return z
    make_loss(student_x, guided_teacher_x, logsnr_fn=LOGSNR, w_min=0.0, w_max=1.0, weighting="constant")(
        None, _frozen(4), _batch(n=300), jax.random.PRNGKey(0))
  assert seen == {"deterministic": {1, 2, 3, 4}, "stochastic": {1, 2, 3, 4}, "encoder": {0, 1, 2, 3}}


# --- two-student baseline (Alg. 5) ---------------------------------------------------------------------


def test_two_student_targets():
  i, z_t, labels, w = _rows([N, 5, 1])
  args = (jnp.asarray(z_t), jnp.asarray(i, jnp.int32), N, jnp.asarray(labels), jnp.asarray(w), LOGSNR)
  cond, uncond = (np.asarray(a, np.float64) for a in progressive.two_student_target(pair_teacher_x, TEACHER,
                                                                                    *args, NULL))
  # Mixed with w, the pair's targets are Alg. 2's target for the guided teacher: the second steps are affine in x̂.
  det = np.asarray(progressive.deterministic_target(guided_teacher_x, TEACHER, *args), np.float64)
  np.testing.assert_allclose(diffusion.cfg_mix(cond, uncond, w), det, atol=1e-4)
  # Each head lands where the guided first step followed by that head's own second step lands.
  t = i / N
  times = (t, t - 0.5 / N, t - 1.0 / N)
  last = i == 1
  for got, head_labels in ((cond, labels), (uncond, np.full_like(labels, NULL))):
    z2, _, x1 = hand_two_steps(z_t.astype(np.float64), times, labels, w, pair_teacher_x, head_labels)
    err = np.where(last, np.max(np.abs(got - x1), axis=(1, 2, 3)), _landing_error(got, z_t, t, times[2], z2))
    assert np.max(err) < TOL, err
  assert np.max(np.abs(cond - uncond)) > 0.1  # the heads differ: a swapped pair would be caught


def test_two_student_loss_is_zero_for_the_exact_pair_targets():
  def pair_student(params, z, logsnr, labels, w, *, train=False, rng=None):
    # One call of 2B rows: the class rows, then the same rows with the null label.
    b = z.shape[0] // 2
    i = jnp.round(schedules.cosine_time(logsnr[:b]) * N).astype(jnp.int32)
    cond, uncond = progressive.two_student_target(pair_teacher_x, TEACHER, z[:b], i, N, labels[:b], w[:b], LOGSNR,
                                                  NULL)
    oracle = jnp.concatenate([cond, uncond])
    return params["oracle"] * oracle + (1 - params["oracle"]) * pair_teacher_x(TEACHER, z, logsnr, labels, w)

  loss_fn = jax.jit(progressive.two_student_round_loss(pair_student, pair_teacher_x, logsnr_fn=LOGSNR,
                                                       null_label=NULL, w_min=0.0, w_max=4.0))
  batch, rng = _batch(), jax.random.PRNGKey(2)
  exact, _ = loss_fn({"oracle": jnp.float32(1.0)}, _frozen(N), batch, rng)
  wrong, _ = loss_fn({"oracle": jnp.float32(0.0)}, _frozen(N), batch, rng)
  assert float(exact) < 1e-6 and float(wrong) > 1e-3, (float(exact), float(wrong))


def test_denoisers_cost_what_they_evaluate():
  calls = []

  def pair_x(params, z, logsnr, labels, w, *, train=False, rng=None):
    calls.append((z.shape[0], np.asarray(labels).tolist(), np.asarray(w).tolist()))
    return pair_teacher_x(TEACHER, z, logsnr, labels, w)

  labels = jnp.asarray([0, 1, 2])
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 1))
  two = progressive.two_student_denoiser(pair_x, TEACHER, labels, 1.5, NULL)
  x_two = two(z, jnp.full((3,), 0.5))
  assert two.evals_per_call == 2 and calls == [(6, [0, 1, 2, NULL, NULL, NULL], [1.5] * 6)]
  ref = samplers.guided_denoiser(GMM.model_fn, labels, 1.5, NULL)(z, jnp.full((3,), 0.5))
  np.testing.assert_allclose(x_two, ref, atol=1e-5)

  calls.clear()
  one = progressive.student_denoiser(pair_x, TEACHER, labels, 2.0)
  one(z, jnp.full((3,), 0.5))
  assert one.evals_per_call == 1 and calls == [(3, [0, 1, 2], [2.0] * 3)]


# --- round plan ------------------------------------------------------------------------------------


@pytest.mark.parametrize("start, end, plan", [
    (64, 1, [32, 16, 8, 4, 2, 1]),
    (1024, 1, [512, 256, 128, 64, 32, 16, 8, 4, 2, 1]),
    (2, 1, [1]),
    (16, 4, [8, 4]),
    (8, 4, [4]),
])
def test_round_plan(start, end, plan):
  assert progressive.round_plan(start, end) == plan


@pytest.mark.parametrize("start, end", [(48, 1), (64, 3), (4, 4), (4, 8), (8, 0), (0, 0), (8.0, 1), (True, 1)])
def test_round_plan_rejects(start, end):
  with pytest.raises(ValueError, match=f"start_steps={start!r}, end_steps={end!r}"):
    progressive.round_plan(start, end)


# --- the stochastic sampler these rounds train for -------------------------------------------------------


def _class_moment_errors(x, labels):
  """Max over classes of |mean − μ_c| / (s/√n) and of |var − s²| / s² (one component per class)."""
  mean_z, var_err = 0.0, 0.0
  for c in range(GMM.num_classes):
    xc = np.asarray(x)[labels == c].reshape(-1, int(np.prod(GMM.shape)))
    s = GMM.stds[c]
    mean_z = max(mean_z, np.max(np.abs(xc.mean(0) - GMM.means[c].ravel())) / (s / np.sqrt(len(xc))))
    var_err = max(var_err, np.max(np.abs(xc.var(0) - s**2)) / s**2)
  return mean_z, var_err


def test_stochastic_sampler_reproduces_the_class_distributions():
  labels = np.repeat(np.arange(3), 1500)
  den = samplers.conditional_denoiser(GMM.model_fn, jnp.asarray(labels))
  z = jax.random.normal(jax.random.PRNGKey(10), (len(labels), 2, 2, 1))
  sample = jax.jit(lambda z, n: samplers.stochastic_sample(den, z, LOGSNR, n, jax.random.PRNGKey(0)).x,
                   static_argnums=1)
  # N = 16: the class means within sampling error. Variances are not: the exact denoiser (not a student
  # distilled for 2/N steps) taking N − 1 DDIM steps of length 2/N under-disperses like 8-step DDIM does
  # (~50% low at s = 0.3); they converge as N grows (first order), as DDPM's do.
  mean_z, var_err = _class_moment_errors(sample(z, 16), labels)
  assert mean_z < 4.5, mean_z
  assert var_err < 0.7, var_err
  mean_z, var_err_256 = _class_moment_errors(sample(z, 256), labels)
  assert mean_z < 4.5, mean_z
  assert var_err_256 < 0.15 and var_err_256 < var_err / 4, (var_err_256, var_err)


def test_stochastic_sampler_evaluates_n_times_on_the_grid():
  n, seen = 16, []

  def fn(z, logsnr):
    jax.debug.callback(lambda l: seen.append(float(l[0])), logsnr, ordered=True)
    return GMM.denoise(z, logsnr, jnp.zeros(z.shape[0], jnp.int32))

  z = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 1))
  out = jax.jit(lambda z: samplers.stochastic_sample(samplers.Denoiser(fn), z, LOGSNR, n, jax.random.PRNGKey(1)))(z)
  out.x.block_until_ready()
  jax.effects_barrier()
  assert out.nfe == n and len(seen) == n
  np.testing.assert_allclose(seen, lam(1.0 - np.arange(n) / n), atol=1e-4)  # t = 1, 1 − 1/N, …, 1/N


# --- learning ------------------------------------------------------------------------------------------


def TinyStudent():  # the shared test MLP (distill.testing), over this file's labels
  return testing.TinyStudent(NULL + 1)


mlp_student_x = testing.tiny_student_x(NULL + 1)


def _fit(loss_fn, params, frozen, steps, seed, pool_x, pool_labels, lr=3e-3, batch=256):
  """`steps` Adam updates on batches drawn from a fixed pool, as one scanned jit."""
  opt = optax.adam(lr)

  def step(carry, key):
    params, opt_state = carry
    k_batch, k_loss = jax.random.split(key)
    idx = jax.random.randint(k_batch, (batch,), 0, pool_x.shape[0])
    grads, _ = jax.grad(loss_fn, has_aux=True)(params, frozen, {"image": pool_x[idx], "label": pool_labels[idx]},
                                                k_loss)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  run = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), jax.random.split(jax.random.PRNGKey(seed), steps))[0])
  return run(params)[0]


def test_deterministic_round_distills_two_teacher_steps_into_one():
  w_min, w_max, n = 0.0, 2.0, 2
  labels = np.tile(np.arange(3), 2731)[:8192].astype(np.int32)
  pool = jnp.asarray(GMM.sample(np.random.default_rng(0), labels)), jnp.asarray(labels)
  params = TinyStudent().init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 1)), jnp.zeros(1), jnp.zeros(1, jnp.int32),
                              jnp.zeros(1))["params"]
  # Pre-fit to the guided teacher's x̂ (stage one), so what the round changes is the step, not denoising.
  stage_one = guided.stage_one_loss(mlp_student_x, pair_teacher_x, logsnr_fn=LOGSNR, null_label=NULL, w_min=w_min,
                                    w_max=w_max, weighting="snr_plus_one")
  params = _fit(stage_one, params, {"teacher": TEACHER}, 300, 1, *pool)

  ev_labels = jnp.asarray(np.tile(np.arange(3), 200), jnp.int32)
  ev_w = jax.random.uniform(jax.random.PRNGKey(7), (600,), minval=w_min, maxval=w_max)
  ev_z = jax.random.normal(jax.random.PRNGKey(8), (600, 2, 2, 1))
  student_samples = jax.jit(lambda p: samplers.ddim_sample(
      progressive.student_denoiser(mlp_student_x, p, ev_labels, ev_w), ev_z, LOGSNR, n).x)
  teacher = samplers.guided_denoiser(GMM.model_fn, ev_labels, ev_w, NULL)
  teacher_2n = samplers.ddim_sample(teacher, ev_z, LOGSNR, 2 * n).x
  teacher_n = samplers.ddim_sample(teacher, ev_z, LOGSNR, n).x
  dist = lambda a: float(jnp.mean(jnp.sum((a - teacher_2n) ** 2, axis=(1, 2, 3))))

  before = dist(student_samples(params))
  round_loss = progressive.deterministic_round_loss(mlp_student_x, guided_teacher_x, logsnr_fn=LOGSNR, w_min=w_min,
                                                    w_max=w_max)
  params = _fit(round_loss, params, _frozen(n), 300, 2, *pool)
  after = dist(student_samples(params))
  assert after < before / 2, (before, after)
  # Closer to the teacher's 2N-step samples than the teacher's own N-step DDIM: it learned the two-step move.
  assert after < dist(teacher_n) / 2, (after, dist(teacher_n))
