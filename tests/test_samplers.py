"""Samplers against the exact Gaussian-mixture teacher, a float64 numpy loop and CFG closed forms."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from distill import diffusion, samplers, schedules
from distill.testing import GaussianMixture

LOGSNR = schedules.cosine_logsnr
GMM = GaussianMixture.random(0, num_classes=3, shape=(2, 2, 1), mean_scale=1.5, std=0.3)


def np_gmm_denoise(gmm, z, logsnr, labels):
  """Float64 numpy E[x | z_t, class], written independently of distill.testing."""
  z = np.asarray(z, np.float64).reshape(len(z), -1)
  mu = gmm.means.reshape(len(gmm.means), -1).astype(np.float64)
  out = np.empty_like(z)
  for i in range(len(z)):
    a2 = 1 / (1 + np.exp(-float(logsnr[i])))
    a, s2 = np.sqrt(a2), 1 - a2
    var = a2 * gmm.stds.astype(np.float64) ** 2 + s2
    logp = np.log(gmm.weights) - 0.5 * ((z[i] - a * mu) ** 2).sum(1) / var - 0.5 * z.shape[1] * np.log(var)
    if labels[i] != gmm.num_classes:
      logp = np.where(gmm.classes == labels[i], logp, -np.inf)
    r = np.exp(logp - logsumexp(logp))
    post = mu + (a * gmm.stds**2 / var)[:, None] * (z[i] - a * mu)
    out[i] = r @ post
  return out.reshape((len(z),) + gmm.shape)


def np_ddim(gmm, z, labels, w, n, half_step_shift=False):
  """Slow obvious DDIM with CFG in float64: z_s = α_s x̂ + σ_s (z_t − α_t x̂)/σ_t on t_i = 1 − i/n."""
  z = np.asarray(z, np.float64)
  null = np.full_like(labels, gmm.num_classes)
  for i in range(n):
    t, s = 1 - i / n, 1 - (i + 1) / n
    t_eval = t - 0.5 / n if half_step_shift else t
    lt = np.full(len(z), float(LOGSNR(t_eval)))
    ls = float(LOGSNR(s))
    x_hat = (1 + w) * np_gmm_denoise(gmm, z, lt, labels) - w * np_gmm_denoise(gmm, z, lt, null)
    a_t, s_t = np.sqrt(1 / (1 + np.exp(-lt[0]))), np.sqrt(1 / (1 + np.exp(lt[0])))
    a_s, s_s = np.sqrt(1 / (1 + np.exp(-ls))), np.sqrt(1 / (1 + np.exp(ls)))
    z = a_s * x_hat + s_s * (z - a_t * x_hat) / s_t
  return x_hat


def test_exact_denoiser_matches_numpy_reference():
  rng = np.random.default_rng(0)
  z = rng.standard_normal((8, 2, 2, 1)).astype(np.float32)
  lam = rng.uniform(-10, 10, 8).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
  np.testing.assert_allclose(GMM.denoise(z, lam, labels), np_gmm_denoise(GMM, z, lam, labels), atol=1e-5)


@functools.partial(jax.jit, static_argnames=("n",))
def _guided_ddim(z, labels, w, n):
  return samplers.ddim_sample(samplers.guided_denoiser(GMM.model_fn, labels, w, GMM.num_classes), z, LOGSNR, n).x


def test_ddim_matches_slow_numpy_loop_and_catches_half_step_shift():
  rng = np.random.default_rng(1)
  z = rng.standard_normal((6, 2, 2, 1)).astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 2])
  got = np.asarray(_guided_ddim(z, labels, 1.5, n=8))
  np.testing.assert_allclose(got, np_ddim(GMM, z, labels, 1.5, 8), atol=2e-4)
  shifted = np_ddim(GMM, z, labels, 1.5, 8, half_step_shift=True)
  assert np.max(np.abs(got - shifted)) > 1e-2  # a half-step shift is far outside the tolerance


def _class_moment_errors(x, labels, gmm):
  """Max over classes of |mean − μ_c| / (s/√n) and of |var − s²| / s² (one component per class)."""
  mean_z, var_err = 0.0, 0.0
  for c in range(gmm.num_classes):
    xc = np.asarray(x)[labels == c].reshape(-1, int(np.prod(gmm.shape)))
    s = gmm.stds[c]
    mean_z = max(mean_z, np.max(np.abs(xc.mean(0) - gmm.means[c].ravel())) / (s / np.sqrt(len(xc))))
    var_err = max(var_err, np.max(np.abs(xc.var(0) - s**2)) / s**2)
  return mean_z, var_err


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_many_step_samplers_reproduce_the_mixture(sampler):
  n_per = 1500
  labels = np.repeat(np.arange(3), n_per)
  z = jax.random.normal(jax.random.PRNGKey(2), (len(labels), 2, 2, 1))
  den = samplers.conditional_denoiser(GMM.model_fn, jnp.asarray(labels))
  if sampler == "ddim":
    out = jax.jit(lambda z: samplers.ddim_sample(den, z, LOGSNR, 256))(z)
  else:
    out = jax.jit(lambda z: samplers.ddpm_sample(den, z, LOGSNR, 256, jax.random.PRNGKey(3)))(z)
  assert out.nfe == 256
  mean_z, var_err = _class_moment_errors(out.x, labels, GMM)
  assert mean_z < 4.5, mean_z    # within sampling error of the true means
  assert var_err < 0.15, var_err  # 4 dims × 3 classes, var s.e. ≈ √(2/1500) ≈ 0.037


def _linear_cfg_teacher(mu, s, big_s, num_classes=1):
  """Conditional N(μ, s²I), unconditional N(μ, S²I): a CFG teacher whose guided ODE has a closed form."""
  cond = GaussianMixture(mu[None], np.array([s], np.float32), np.ones(1, np.float32), np.zeros(1, int), 1)
  uncond = GaussianMixture(mu[None], np.array([big_s], np.float32), np.ones(1, np.float32), np.zeros(1, int), 1)

  def model_fn(z, logsnr, labels, w=None):
    return jnp.where((labels == num_classes)[:, None, None, None],
                     uncond.denoise(z, logsnr, jnp.zeros_like(labels)),
                     cond.denoise(z, logsnr, jnp.zeros_like(labels)))
  return model_fn


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_cfg_sharpens_as_closed_form_predicts(w):
  # For Gaussians, the guided probability-flow ODE is linear; integrating dx/dlnσ = x − D_w(x)
  # gives x_0 − μ = (x_T − μ)·Φ(σ_min)/Φ(σ_max), Φ(σ) = (s²+σ²)^{(1+w)/2}(S²+σ²)^{−w/2}:
  # samples keep mean μ and their std shrinks to s·(s/S)^w.
  mu = np.array([0.5, -0.3, 0.2, 0.0], np.float32).reshape(2, 2, 1)
  s, big_s = 0.5, 1.0
  model_fn = _linear_cfg_teacher(mu, s, big_s)
  labels = jnp.zeros(4000, jnp.int32)
  z = jax.random.normal(jax.random.PRNGKey(4), (4000, 2, 2, 1))
  den = samplers.guided_denoiser(model_fn, labels, w, null_label=1)
  out = jax.jit(lambda z: samplers.ddim_sample(den, z, LOGSNR, 512))(z)
  assert out.nfe == 1024  # CFG costs two evaluations per step
  x = np.asarray(out.x).reshape(4000, -1)
  expected_std = s * (s / big_s) ** w
  np.testing.assert_allclose(x.std(0), expected_std, rtol=0.06)
  np.testing.assert_allclose(x.mean(0), mu.ravel(), atol=4 * expected_std / np.sqrt(4000))


def _class_log_posterior(gmm, x, labels):
  """log p(c | x) under the true mixture (one component per class)."""
  d = x.reshape(len(x), -1)
  mu = gmm.means.reshape(len(gmm.means), -1)
  logp = -0.5 * ((d[:, None] - mu[None]) ** 2).sum(-1) / gmm.stds**2 - d.shape[1] * np.log(gmm.stds)
  return logp[np.arange(len(x)), labels] - logsumexp(logp, axis=1)


def test_guidance_makes_mixture_samples_more_class_specific():
  # In a mixture CFG extrapolates away from the other classes (it can overshoot the class mean),
  # so what must grow with w is the true class posterior of the samples.
  gmm = GaussianMixture.random(7, num_classes=3, shape=(2, 2, 1), mean_scale=0.4, std=0.4)  # overlapping
  labels = np.repeat(np.arange(3), 400)
  z = jax.random.normal(jax.random.PRNGKey(5), (1200, 2, 2, 1))
  post = {}
  for w in (0.0, 2.0):
    den = samplers.guided_denoiser(gmm.model_fn, jnp.asarray(labels), w, gmm.num_classes)
    x = samplers.ddim_sample(den, z, LOGSNR, 64).x
    post[w] = _class_log_posterior(gmm, np.asarray(x), labels).mean()
  assert post[0.0] < -0.2 and post[2.0] > 0.5 * post[0.0], post


def test_encode_then_decode_returns_the_input():
  labels = jnp.asarray(np.repeat(np.arange(3), 20))
  x = GMM.sample(np.random.default_rng(6), np.asarray(labels))
  den = samplers.conditional_denoiser(GMM.model_fn, labels)

  @jax.jit
  def round_trip(x):
    z1 = samplers.ddim_encode(den, x, LOGSNR, 1024).x
    return z1, samplers.ddim_sample(den, z1, LOGSNR, 1024).x

  z1, x_rec = round_trip(jnp.asarray(x))
  assert np.std(np.asarray(z1)) > 0.5  # actually encoded to noise
  np.testing.assert_allclose(x_rec, x, atol=2e-2)


def test_guided_denoiser_is_one_batched_call_of_two_evaluations():
  calls = []

  def model_fn(z, logsnr, labels, w=None):
    calls.append(z.shape[0])
    return GMM.denoise(z, logsnr, labels)

  labels = jnp.array([0, 1, 2])
  den = samplers.guided_denoiser(model_fn, labels, 2.0, GMM.num_classes)
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 1))
  lam = jnp.full((3,), 1.0)
  x = den(z, lam)
  # Both branches of the w = 0 shortcut are traced: the guided one is a single call of 2B rows.
  assert sorted(calls) == [3, 6] and den.evals_per_call == 2
  ref = 3.0 * GMM.denoise(z, lam, labels) - 2.0 * GMM.denoise(z, lam, jnp.full((3,), 3))
  np.testing.assert_allclose(x, ref, atol=1e-5)


def test_guided_denoiser_skips_the_unconditional_pass_only_when_every_w_is_zero():
  """An unconditional pass that returns NaN poisons the mix wherever it is used (0·NaN = NaN): at w = 0 for
  every row the output is the conditional prediction itself; with one row at w ≠ 0 both passes run."""
  def model_fn(z, logsnr, labels, w=None):
    x = GMM.denoise(z, logsnr, labels)
    return jnp.where((labels == GMM.num_classes)[:, None, None, None], jnp.nan, x)

  labels = jnp.array([0, 1, 2])
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 1))
  lam = jnp.full((3,), 1.0)
  for w in (0.0, jnp.zeros(3)):
    x = jax.jit(lambda z, lam: samplers.guided_denoiser(model_fn, labels, w, GMM.num_classes)(z, lam))(z, lam)
    np.testing.assert_allclose(x, GMM.denoise(z, lam, labels), atol=1e-6)
  x = samplers.guided_denoiser(model_fn, labels, jnp.array([0.0, 0.0, 0.5]), GMM.num_classes)(z, lam)
  assert np.all(np.isnan(np.asarray(x)))
  # Through a whole sampler the shortcut is the two-pass mix (the real GMM's unconditional pass).
  fast = samplers.ddim_sample(samplers.guided_denoiser(GMM.model_fn, labels, 0.0, GMM.num_classes), z, LOGSNR, 8).x
  mix = lambda z, lam: diffusion.cfg_mix(GMM.denoise(z, lam, labels), GMM.denoise(z, lam, jnp.full((3,), 3)), 0.0)
  slow = samplers.ddim_sample(samplers.Denoiser(mix, 2), z, LOGSNR, 8).x
  np.testing.assert_allclose(fast, slow, atol=1e-6)


def test_clipping_bounds_samples():
  den = samplers.conditional_denoiser(lambda z, l, y, w: 3.0 * z, jnp.zeros(4, jnp.int32))
  z = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 1))
  assert np.max(np.abs(samplers.ddim_sample(den, z, LOGSNR, 4, clip=True).x)) <= 1.0
  assert np.max(np.abs(samplers.ddim_sample(den, z, LOGSNR, 4, clip=False).x)) > 1.0


def test_stochastic_rows_do_not_depend_on_the_batch_they_are_sampled_in():
  """Evaluation pads a request and splits it into chunks (250 rows; 256 with 8 devices, `sample_in_chunks`),
  so a row's stochastic sample must be a function of its own z and the key alone: equal over chunk sizes and
  equal sampled alone."""
  from distill import context
  rows = 600
  z = jax.random.normal(jax.random.PRNGKey(4), (rows, 2, 2, 1))
  labels, w = jnp.arange(rows) % 3, jnp.linspace(0.0, 4.0, rows)

  def sampler(rng):
    return jax.jit(lambda z, labels, w: samplers.stochastic_sample(
        samplers.guided_denoiser(GMM.model_fn, labels, w, GMM.num_classes), z, LOGSNR, 4, rng).x)

  sample = sampler(jax.random.PRNGKey(0))
  by_250 = context.sample_in_chunks(sample, z, labels, w, 250)
  by_256 = context.sample_in_chunks(sample, z, labels, w, 256)
  np.testing.assert_allclose(by_250, by_256, atol=1e-5)
  alone = np.concatenate([sample(z[i:i + 1], labels[i:i + 1], w[i:i + 1]) for i in (0, 255, 300, 599)])
  np.testing.assert_allclose(by_250[[0, 255, 300, 599]], alone, atol=1e-5)
  # The sampler is stochastic (another key moves every row) ...
  other = context.sample_in_chunks(sampler(jax.random.PRNGKey(1)), z, labels, w, 250)
  assert np.min(np.max(np.abs(other - by_250).reshape(rows, -1), axis=1)) > 1e-3
  # ... and a z given twice in one batch is sampled alike wherever it sits.
  twice = np.asarray(sample(jnp.concatenate([z[:2], z[:2]]), jnp.zeros(4, jnp.int32), jnp.zeros(4)))
  np.testing.assert_allclose(twice[:2], twice[2:], atol=1e-6)


def test_chunks_sampled_from_threads_equal_the_serial_result_in_order(monkeypatch):
  """On one CPU device `sample_in_chunks` runs chunks from several threads: the rows come back in their order
  and equal to one thread's (each chunk is the same computation whichever thread runs it)."""
  from distill import context
  if jax.device_count() > 1:
    pytest.skip("several devices shard each chunk instead")
  z = jax.random.normal(jax.random.PRNGKey(5), (70, 2, 2, 1))
  labels, w = jnp.arange(70) % 3, jnp.linspace(0.0, 2.0, 70)
  sample = jax.jit(lambda z, labels, w: samplers.ddim_sample(
      samplers.guided_denoiser(GMM.model_fn, labels, w, GMM.num_classes), z, LOGSNR, 4).x)
  monkeypatch.setattr(context, "cpu_workers", lambda: 1)
  serial = context.sample_in_chunks(sample, z, labels, w, 16)
  monkeypatch.setattr(context, "cpu_workers", lambda: 3)
  threaded = context.sample_in_chunks(sample, z, labels, w, 16)
  # Equal to rounding (one executable, the same inputs; rows out of order would differ by O(1)).
  np.testing.assert_allclose(threaded, serial, rtol=0, atol=1e-6)
  np.testing.assert_allclose(serial[37:38], sample(z[37:38], labels[37:38], w[37:38]), atol=1e-5)
