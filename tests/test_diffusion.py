"""Schedules and diffusion arithmetic against closed forms and float64 numpy references."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from distill import diffusion, schedules


def _np_alpha_sigma(logsnr):
  logsnr = np.asarray(logsnr, np.float64)
  return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


def _data(seed=0, b=6, shape=(4, 4, 3)):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (b,) + shape).astype(np.float32)
  eps = rng.standard_normal((b,) + shape).astype(np.float32)
  logsnr = rng.uniform(-8, 8, b).astype(np.float32)
  return x, eps, logsnr


# --- schedules ----------------------------------------------------------------------------------


def test_cosine_logsnr_endpoints_monotone_and_inverse():
  t = jnp.linspace(0, 1, 101)
  lam = schedules.cosine_logsnr(t)
  np.testing.assert_allclose(lam[0], 20.0, atol=1e-3)
  np.testing.assert_allclose(lam[-1], -20.0, atol=1e-3)
  assert np.all(np.diff(np.asarray(lam)) < 0)
  np.testing.assert_allclose(schedules.cosine_time(lam), t, atol=1e-5)


def test_cosine_logsnr_is_the_cosine_schedule_without_clipping():
  # With (almost) no clipping, α_t² = cos²(πt/2): the defining property of the cosine schedule.
  t = np.linspace(0.05, 0.95, 19)
  lam = schedules.cosine_logsnr(t, logsnr_min=-60.0, logsnr_max=60.0)
  alpha, sigma = schedules.alpha_sigma(lam)
  np.testing.assert_allclose(alpha, np.cos(np.pi * t / 2), atol=1e-5)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)


def test_sigma_ratio_matches_direct_ratio():
  a, b = np.array([-15.0, -3.0, 0.5, 12.0]), np.array([-14.0, 2.0, 0.0, 19.0])
  _, s_a = _np_alpha_sigma(a)
  _, s_b = _np_alpha_sigma(b)
  np.testing.assert_allclose(schedules.sigma_ratio(a, b), s_a / s_b, rtol=1e-5)


def test_edm_sigmas_match_formula():
  n, smin, smax, rho = 7, 0.006, 80.0, 7.0
  ref = [(smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(n)]
  np.testing.assert_allclose(schedules.edm_sigmas(n, smin, smax, rho), ref, rtol=1e-5)


def test_ve_view_is_z_over_alpha():
  x, eps, logsnr = _data()
  z = diffusion.q_sample(x, eps, logsnr)
  alpha, _ = _np_alpha_sigma(logsnr)
  # x_σ = z/α = x + σ_VE·ε
  sig = np.asarray(schedules.ve_sigma(logsnr))
  np.testing.assert_allclose(np.asarray(z) / alpha[:, None, None, None], x + sig[:, None, None, None] * eps,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(schedules.logsnr_from_ve_sigma(sig), logsnr, atol=1e-4)


def test_linear_beta_logsnrs_against_product_loop():
  betas = np.linspace(1e-4, 0.02, 1000)
  abar, ref = 1.0, []
  for beta in betas:
    abar *= 1 - beta
    ref.append(math.log(abar / (1 - abar)))
  np.testing.assert_allclose(schedules.linear_beta_logsnrs(1000), ref, rtol=1e-9)
  fn = schedules.linear_beta_logsnr_fn(1000)
  np.testing.assert_allclose(fn(jnp.array([1.0, 0.5, 0.001])), [ref[-1], ref[499], ref[0]], rtol=1e-5)


def test_get_logsnr_fn_rejects_unknown_name():
  with pytest.raises(ValueError, match="allowed"):
    schedules.get_logsnr_fn("quadratic")


# --- parameterisations ---------------------------------------------------------------------------


def test_conversions_round_trip():
  x, eps, logsnr = _data()
  z = diffusion.q_sample(x, eps, logsnr)
  v = diffusion.v_from_x_eps(x, eps, logsnr)
  alpha, sigma = _np_alpha_sigma(logsnr)
  b = lambda a: a[:, None, None, None]
  np.testing.assert_allclose(z, b(alpha) * x + b(sigma) * eps, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v, b(alpha) * eps - b(sigma) * x, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(diffusion.x_from_v(z, v, logsnr), x, atol=1e-5)
  np.testing.assert_allclose(diffusion.eps_from_v(z, v, logsnr), eps, atol=1e-5)
  np.testing.assert_allclose(diffusion.v_from_x(z, x, logsnr), v, atol=2e-3, rtol=1e-3)
  np.testing.assert_allclose(diffusion.x_from_eps(z, eps, logsnr), x, atol=2e-3)
  np.testing.assert_allclose(diffusion.eps_from_x(z, x, logsnr), eps, atol=2e-3)


@pytest.mark.parametrize("param", ["x", "eps", "v", "both"])
def test_x_from_output_recovers_x_from_exact_outputs(param):
  x, eps, logsnr = _data(1)
  z = diffusion.q_sample(x, eps, logsnr)
  out = {"x": x, "eps": eps, "v": diffusion.v_from_x_eps(x, eps, logsnr),
         "both": jnp.concatenate([x, eps], -1)}[param]
  np.testing.assert_allclose(diffusion.x_from_output(out, z, logsnr, param), x, atol=2e-3)


def test_both_parameterization_weights_heads_by_sigma_squared():
  x, eps, logsnr = _data(2)
  z = diffusion.q_sample(x, eps, logsnr)
  x_head = x + 0.5  # deliberately wrong x head; the ε head is exact
  got = diffusion.x_from_output(jnp.concatenate([x_head, eps], -1), z, logsnr, "both")
  _, sigma = _np_alpha_sigma(logsnr)
  np.testing.assert_allclose(got, x + 0.5 * sigma[:, None, None, None] ** 2, atol=2e-3)


def test_output_channels():
  assert diffusion.output_channels("both", 3) == 6
  assert diffusion.output_channels("v", 3) == 3


def test_snr_plus_one_weighting_is_v_mse():
  x, eps, logsnr = _data(3)
  z = diffusion.q_sample(x, eps, logsnr)
  x_hat = x + 0.1 * np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
  v = diffusion.v_from_x_eps(x, eps, logsnr)
  v_hat = diffusion.v_from_x(z, x_hat, logsnr)
  v_mse = jnp.sum((v_hat - v) ** 2, axis=(1, 2, 3))
  x_mse = jnp.sum((x_hat - x) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(v_mse, diffusion.loss_weight(logsnr, "snr_plus_one") * x_mse, rtol=2e-3)


def test_loss_weights_closed_forms():
  lam = np.array([-3.0, 0.0, 2.0])
  np.testing.assert_allclose(diffusion.loss_weight(lam, "constant"), [1, 1, 1])
  np.testing.assert_allclose(diffusion.loss_weight(lam, "snr"), np.exp(lam), rtol=1e-6)
  np.testing.assert_allclose(diffusion.loss_weight(lam, "truncated_snr"), [1, 1, np.exp(2.0)], rtol=1e-6)
  with pytest.raises(ValueError, match="allowed"):
    diffusion.loss_weight(lam, "snr2")


def test_cfg_mix():
  c, u = np.full((2, 3), 2.0), np.full((2, 3), 0.5)
  np.testing.assert_allclose(diffusion.cfg_mix(c, u, 0.0), c)
  np.testing.assert_allclose(diffusion.cfg_mix(c, u, np.array([1.0, 3.0])),
                             [[3.5] * 3, [6.5] * 3])  # (1+w)·2 − w·0.5


# --- DDIM step and the distillation target -------------------------------------------------------


def ddim_step_wrong_sign(z_t, x_hat, logsnr_t, logsnr_s):
  """Mutant: the ε term enters with the wrong sign."""
  b = lambda a: jnp.asarray(a)[:, None, None, None]
  a_t, _ = schedules.alpha_sigma(logsnr_t)
  a_s, _ = schedules.alpha_sigma(logsnr_s)
  r = schedules.sigma_ratio(logsnr_s, logsnr_t)
  return b(a_s) * x_hat - b(r) * (z_t - b(a_t) * x_hat)


def _ddim_exactness_error(step_fn, forward: bool):
  """DDIM with the true x keeps ε: from z_t = α_t x + σ_t ε it must land on α_s x + σ_s ε."""
  x, eps, logsnr_t = _data(4)
  logsnr_s = logsnr_t + (3.0 if forward else -3.0)
  z_s = step_fn(diffusion.q_sample(x, eps, logsnr_t), x, logsnr_t, logsnr_s)
  a_s, s_s = _np_alpha_sigma(logsnr_s)
  ref = a_s[:, None, None, None] * x + s_s[:, None, None, None] * eps
  return float(np.max(np.abs(np.asarray(z_s) - ref)))


@pytest.mark.parametrize("forward", [True, False])
def test_ddim_step_keeps_the_noise_of_the_true_x(forward):
  assert _ddim_exactness_error(diffusion.ddim_step, forward) < 1e-5
  assert _ddim_exactness_error(ddim_step_wrong_sign, forward) > 0.1  # the check catches a sign error


def test_distillation_target_lands_on_two_step_result():
  x, eps, logsnr_t = _data(5)
  rng = np.random.default_rng(5)
  z_t = diffusion.q_sample(x, eps, logsnr_t)
  # An arbitrary teacher: two DDIM steps with unrelated x̂ predictions.
  l1, l2 = logsnr_t + 1.0, logsnr_t + 2.5
  z1 = diffusion.ddim_step(z_t, rng.uniform(-1, 1, x.shape), logsnr_t, l1)
  z2 = diffusion.ddim_step(z1, rng.uniform(-1, 1, x.shape), l1, l2)
  x_tilde = diffusion.distillation_target(z_t, z2, logsnr_t, l2)
  np.testing.assert_allclose(diffusion.ddim_step(z_t, x_tilde, logsnr_t, l2), z2, atol=1e-5)
  # Independent float64 closed form of x̃.
  a_t, s_t = _np_alpha_sigma(logsnr_t)
  a2, s2 = _np_alpha_sigma(l2)
  b = lambda a: a[:, None, None, None]
  ref = (np.asarray(z2, np.float64) - b(s2 / s_t) * np.asarray(z_t)) / b(a2 - s2 / s_t * a_t)
  np.testing.assert_allclose(x_tilde, ref, rtol=1e-3, atol=1e-3)


def test_last_step_rule_uses_teacher_x_hat():
  x, eps, logsnr_t = _data(6, b=2)
  z_t = diffusion.q_sample(x, eps, logsnr_t)
  x_last = np.full_like(x, 0.25)
  z2 = z_t * 0.5
  got = diffusion.distillation_target_with_last_step(z_t, z2, x_last, logsnr_t, logsnr_t + 1, np.array([True, False]))
  np.testing.assert_allclose(got[0], x_last[0])
  np.testing.assert_allclose(got[1], diffusion.distillation_target(z_t, z2, logsnr_t, logsnr_t + 1)[1])


def test_guidance_scale_of_latent_diffusion_is_our_w_plus_one():
  """LDM / Stable Diffusion guide as uncond + s·(cond − uncond); cfg_mix at w = s − 1 is the same mix, and the
  DSD defaults are §5's s ∈ [1, 3] converted."""
  from distill.configuration import base_config
  rng = np.random.default_rng(0)
  cond, uncond = rng.normal(size=(2, 3, 4)).astype(np.float32), rng.normal(size=(2, 3, 4)).astype(np.float32)
  for s in (1.0, 2.0, 7.5):  # float32: equal to rounding (a w off by one would be off by |cond − uncond| ~ 1)
    np.testing.assert_allclose(diffusion.cfg_mix(cond, uncond, diffusion.w_from_guidance_scale(s)),
                               uncond + s * (cond - uncond), rtol=0, atol=1e-5)
  c = base_config()
  assert (c.dsd.w_min, c.dsd.w_max) == (diffusion.w_from_guidance_scale(1.0), diffusion.w_from_guidance_scale(3.0))
  assert c.dsd.training_weighting == "constant"  # Eq. 1's distillation term is unweighted


def test_x_from_output_refuses_an_output_that_would_broadcast():
  z = jnp.zeros((2, 4, 4, 4))
  with pytest.raises(ValueError, match="must output \\(2, 4, 4, 4\\)"):
    diffusion.x_from_output(jnp.zeros((2, 4, 4, 1)), z, jnp.zeros((2,)), "v")
  with pytest.raises(ValueError, match="must output \\(2, 4, 4, 8\\)"):
    diffusion.x_from_output(jnp.zeros((2, 4, 4, 4)), z, jnp.zeros((2,)), "both")
