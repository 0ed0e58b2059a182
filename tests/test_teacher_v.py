"""ε → v fine-tuning (the 'teacher_v' stage) and the discrete Stable Diffusion schedule it is used with."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import configuration, context, models, schedules, testing, train, validation
from distill.methods import teacher as teacher_lib


def test_scaled_linear_schedule_against_stable_diffusions_discrete_formulas():
  """SD: β_k = (√0.00085 + k/999·(√0.012 − √0.00085))², ᾱ_k = Π_{j≤k}(1 − β_j), k = 0..999; our t = (k + 1)/1000
  is SD's timestep k, with λ = log(ᾱ/(1 − ᾱ))."""
  abar, ref = 1.0, []
  for k in range(1000):
    beta = (math.sqrt(0.00085) + k / 999 * (math.sqrt(0.012) - math.sqrt(0.00085))) ** 2
    abar *= 1 - beta
    ref.append(abar)
  assert ref[0] == pytest.approx(1 - 0.00085, abs=1e-12)
  assert ref[-1] == pytest.approx(0.0047, abs=2e-4)  # SD's alphas_cumprod[-1]
  fn = schedules.get_logsnr_fn("scaled_linear_beta")
  ks = np.array([0, 1, 250, 499, 998, 999])
  lam = np.asarray(fn(jnp.asarray((ks + 1) / 1000.0, jnp.float32)), np.float64)
  abar_ours = 1 / (1 + np.exp(-lam))  # ᾱ = sigmoid(λ)
  np.testing.assert_allclose(abar_ours, np.asarray(ref)[ks], rtol=1e-5)
  # Off by one timestep would be visible: neighbouring ᾱ differ by more than the tolerance.
  assert abs(ref[500] - ref[499]) / ref[499] > 1e-4
  # t = 0 is the clean end the discrete grid lacks.
  assert float(fn(jnp.zeros(()))) == pytest.approx(schedules.LOGSNR_MAX)


def tiny_config(tmp_path, **teacher):
  c = configuration.base_config()
  c.data.name, c.data.image_size, c.data.channels, c.data.num_classes = "mixture", 4, 1, 3
  m = c.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.head_dim, m.num_groups = 8, (1,), 1, (), 8, 4
  t = c.teacher
  t.num_steps, t.batch_size, t.log_every, t.ckpt_every, t.warmup_steps = 60, 32, 30, 60, 10
  t.parameterization, t.weighting, t.v_steps, t.v_lr = "eps", "snr", 120, 2e-3
  c.eval.class_agreement = False
  c.sample.batch_size, c.sample.num_steps = 32, 8
  c.pipeline = ("teacher", "teacher_v")
  for k, v in teacher.items():
    t[k] = v
  configuration.validate(c)
  return c


def test_teacher_v_turns_an_eps_teacher_into_a_v_teacher_that_computes_the_same_denoiser(tmp_path):
  c = tiny_config(tmp_path)
  ctx = context.Context(c, str(tmp_path))
  teacher_lib.run_teacher(ctx)
  eps_params, eps_meta = train.load_final_params(ctx.stage_dir("teacher"))
  assert eps_meta["parameterization"] == "eps"
  # Before fine-tuning, only 'teacher' exists and it predicts ε: the students (v) must not read it.
  with pytest.raises(train.TrainingError, match="predicts 'eps' but model.parameterization is 'v'.*teacher_v"):
    context.teacher_params(ctx)
  teacher_lib.run_teacher_v(ctx)
  v_params, v_meta = train.load_final_params(ctx.stage_dir("teacher_v"))
  assert v_meta["parameterization"] == "v" and v_meta["kind"] == "cfg_teacher"
  assert v_meta["cost_parents"] == ["teacher"]
  assert context.teacher_dir(context.Context(c, str(tmp_path))) == ctx.stage_dir("teacher_v")

  model = context.teacher_model(ctx)
  rng = np.random.default_rng(0)
  x = jnp.asarray(ctx.train_source.get_batch(np.arange(64))["image"])
  labels = jnp.asarray(rng.integers(0, 3, 64))
  logsnr = jnp.asarray(rng.uniform(-3.0, 3.0, 64), jnp.float32)
  from distill import diffusion
  z = diffusion.q_sample(x, jnp.asarray(rng.standard_normal(x.shape), jnp.float32), logsnr)
  x_eps = models.x_function(model, "eps")(eps_params, z, logsnr, labels, None)
  x_v = models.x_function(model, "v")(v_params, z, logsnr, labels, None)
  x_start = models.x_function(model, "v")(eps_params, z, logsnr, labels, None)  # the ε net read as v, unfine-tuned
  src = ctx.train_source
  exact = testing.GaussianMixture(src.means, np.full((3,), src.std, np.float32), np.full((3,), 1 / 3, np.float32),
                                  np.arange(3), 3).denoise(z, logsnr, labels)
  err = lambda x_hat: float(jnp.mean((x_hat - exact) ** 2))
  # Against the mixture's exact denoiser: the fine-tuned v-teacher is a far better denoiser than the ε network
  # read as v (where it starts), and better than the ε teacher at these noise levels (x̂ = (z − σε̂)/α
  # multiplies ε's error by σ/α; measured 0.29 vs 0.62 and 0.98).
  assert err(x_v) < 0.6 * err(x_start), (err(x_v), err(x_start))
  assert err(x_v) < err(x_eps), (err(x_v), err(x_eps))


def test_teacher_v_needs_a_finished_teacher(tmp_path):
  c = tiny_config(tmp_path)
  ctx = context.Context(c, str(tmp_path))
  with pytest.raises(train.TrainingError, match="put 'teacher' before it"):
    teacher_lib.run_teacher_v(ctx)


@pytest.mark.parametrize("field, value, message", [
    ("model.parameterization", "eps", "must be 'v' when the pipeline fine-tunes"),
    ("pipeline", ("teacher", "stage_one"), "trains a 'eps' teacher but the students predict.*add 'teacher_v'"),
    ("teacher.weighting", "snr_plus_one", "must be 'snr' \\(plain ε-MSE\\)"),
    ("teacher.parameterization", "noise", "allowed"),
    ("teacher.v_steps", 0, "teacher.v_steps"),
])
def test_teacher_v_config_is_checked(tmp_path, field, value, message):
  c = tiny_config(tmp_path)
  if field == "pipeline":
    c.pipeline = value
  else:
    section, name = field.split(".")
    c[section][name] = value
  with pytest.raises(validation.ConfigError, match=message):
    configuration.validate(c)
