"""Stable Diffusion's U-Net in the framework's model interface (`models.text_unet.TextUNet`): the time it is
given, the null rows' context, the w embedding starting at zero, inpainting's channels, and the config."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import conditions, configuration, models, schedules, validation


def text_config():
  c = configuration.base_config()
  c.model.kind, c.model.schedule = "sd_unet", "scaled_linear_beta"
  c.model.sd.block_out_channels, c.model.sd.norm_num_groups, c.model.sd.num_attention_heads = (16, 32), 8, 2
  return c


@pytest.mark.parametrize("name", ["cosine", "linear_beta", "scaled_linear_beta"])
def test_time_fn_inverts_the_schedule(name):
  t = jnp.linspace(0.0, 1.0, 1001)
  lam = schedules.get_logsnr_fn(name)(t)
  np.testing.assert_allclose(schedules.get_time_fn(name)(lam), t, atol=2e-4)


def test_a_discrete_schedules_step_i_is_sd_timestep_i_minus_1():
  """diffusers' alphas_cumprod[k] is ᾱ of step k + 1 of `linear_beta_logsnrs`, which sits at t = (k + 1)/T."""
  c = text_config()
  model = models.unet_from_config(c.model, c.data, channels=4, text=(6, 8))
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
  alphas_cumprod = np.cumprod(1 - betas)  # as diffusers' scheduler computes it
  k = np.array([0, 1, 499, 998, 999])
  lam = np.log(alphas_cumprod[k]) - np.log1p(-alphas_cumprod[k])
  np.testing.assert_allclose(model.timesteps(jnp.asarray(lam, jnp.float32)), k, atol=0.02)


def test_the_text_unet_is_sds_unet_at_its_timestep_and_null_rows_see_null_context():
  c = text_config()
  model = models.unet_from_config(c.model, c.data, channels=4, text=(6, 8))
  params = models.init_params(model, (8, 8, 4), 0)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: np.asarray(a) + 0.05 * rng.standard_normal(a.shape).astype(np.float32), params)
  z = jnp.asarray(rng.standard_normal((3, 8, 8, 4)), jnp.float32)
  lam = jnp.asarray([-3.0, 0.0, 4.0])
  context = jnp.asarray(rng.standard_normal((3, 6, 8)), jnp.float32)
  labels = jnp.asarray([1, 10, 2])  # row 1 is unconditional (num_classes = 10)
  got = model.apply({"params": params}, z, lam, {"label": labels, "context": context}, train=False)
  t = schedules.get_time_fn("scaled_linear_beta")(lam) * 1000 - 1
  expected_context = context.at[1].set(params["null_context"])
  want = model.unet.apply({"params": params["unet"]}, z, t, expected_context)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert got.shape == (3, 8, 8, 4)
  with pytest.raises(ValueError, match="text condition"):
    model.apply({"params": params}, z, lam, labels, train=False)


def test_a_students_w_embedding_starts_at_zero_and_inpainting_extends_conv_in():
  c = text_config()
  teacher = models.unet_from_config(c.model, c.data, channels=4, text=(6, 8))
  student = models.unet_from_config(c.model, c.data, channels=4, text=(6, 8), w_embedding=True)
  t_params = models.init_params(teacher, (8, 8, 4), 0)
  s_params = models.merge_params(models.init_params(student, (8, 8, 4), 1), t_params)
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
  cond = {"label": jnp.asarray([0, 3]), "context": jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)}
  want = teacher.apply({"params": t_params}, z, jnp.zeros(2), cond, train=False)
  got = student.apply({"params": s_params}, z, jnp.zeros(2), cond, jnp.asarray([0.0, 3.0]), train=False)
  np.testing.assert_allclose(got, want, atol=1e-5)
  inpainter = models.unet_from_config(c.model, c.data, channels=4, text=(6, 8), inpaint=True)
  extended = models.extend_input_channels(models.init_params(inpainter, (8, 8, 4), 0), t_params)
  full = conditions.inpaint(jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32), cond, jnp.ones((2, 8, 8, 1)))
  assert set(full) == {"label", "context", "mask", "masked"}
  np.testing.assert_allclose(inpainter.apply({"params": extended}, z, jnp.zeros(2), full, train=False), want, atol=1e-5)
  np.testing.assert_array_equal(conditions.without_image(full)["context"], cond["context"])


def test_config_checks():
  c = text_config()
  configuration.validate(c)
  c.model.sd.down_block_types = ("CrossAttnDownBlock2D",)
  with pytest.raises(validation.ConfigError, match="model.sd.down_block_types"):
    configuration.validate(c)
  c = text_config()
  c.model.sd.block_out_channels = (12, 32)  # 12 channels in 8 groups
  with pytest.raises(validation.ConfigError, match="config.model.sd="):
    configuration.validate(c)
  c = text_config()
  c.model.kind = "dit"
  with pytest.raises(validation.ConfigError, match="model.kind"):
    configuration.validate(c)
