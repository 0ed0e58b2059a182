"""The KL autoencoder (distill/models/autoencoder.py): shapes, the posterior against closed forms, the parameter
tree's names (diffusers' Flax AutoencoderKL layout) and a few training steps."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from distill.models import autoencoder as ae

TINY = ae.AutoencoderKL(in_channels=1, block_out_channels=(8, 16), layers_per_block=1, latent_channels=2,
                        norm_num_groups=4)


@pytest.fixture(scope="module")
def tiny_params():
  return ae.init_params(TINY, (8, 8, 1), 0)


def _resnet(path, shortcut=False):
  leaves = [f"{path}/{m}/{p}" for m in ("norm1", "norm2") for p in ("scale", "bias")]
  leaves += [f"{path}/{m}/{p}" for m in ("conv1", "conv2") + (("conv_shortcut",) if shortcut else ())
             for p in ("kernel", "bias")]
  return leaves


def _attention(path):
  return [f"{path}/group_norm/scale", f"{path}/group_norm/bias"] + [
      f"{path}/{m}/{p}" for m in ("query", "key", "value", "proj_attn") for p in ("kernel", "bias")]


def _conv(path):
  return [f"{path}/kernel", f"{path}/bias"]


def _norm(path):
  return [f"{path}/scale", f"{path}/bias"]


# diffusers ≤ 0.39 `models/vae_flax.py`, FlaxAutoencoderKL(block_out_channels=(8, 16), layers_per_block=1): the
# decoder's up blocks hold layers_per_block + 1 resnets; a resnet changing width has conv_shortcut.
EXPECTED = sorted(
    _conv("encoder/conv_in")
    + _resnet("encoder/down_blocks_0/resnets_0") + _conv("encoder/down_blocks_0/downsamplers_0/conv")
    + _resnet("encoder/down_blocks_1/resnets_0", shortcut=True)
    + _resnet("encoder/mid_block/resnets_0") + _attention("encoder/mid_block/attentions_0")
    + _resnet("encoder/mid_block/resnets_1")
    + _norm("encoder/conv_norm_out") + _conv("encoder/conv_out")
    + _conv("quant_conv") + _conv("post_quant_conv")
    + _conv("decoder/conv_in")
    + _resnet("decoder/mid_block/resnets_0") + _attention("decoder/mid_block/attentions_0")
    + _resnet("decoder/mid_block/resnets_1")
    + _resnet("decoder/up_blocks_0/resnets_0") + _resnet("decoder/up_blocks_0/resnets_1")
    + _conv("decoder/up_blocks_0/upsamplers_0/conv")
    + _resnet("decoder/up_blocks_1/resnets_0", shortcut=True) + _resnet("decoder/up_blocks_1/resnets_1")
    + _norm("decoder/conv_norm_out") + _conv("decoder/conv_out"))


def test_parameter_names_are_diffusers_flax_autoencoder_kl(tiny_params):
  flat = traverse_util.flatten_dict(tiny_params, sep="/")
  assert sorted(flat) == EXPECTED
  shapes = {k: v.shape for k, v in flat.items()}
  assert shapes["encoder/conv_out/kernel"] == (3, 3, 16, 4)  # 2 · latent_channels: mean and logvar
  assert shapes["quant_conv/kernel"] == (1, 1, 4, 4) and shapes["post_quant_conv/kernel"] == (1, 1, 2, 2)
  assert shapes["decoder/conv_in/kernel"] == (3, 3, 2, 16)
  assert shapes["decoder/up_blocks_1/resnets_0/conv_shortcut/kernel"] == (1, 1, 16, 8)
  assert shapes["encoder/mid_block/attentions_0/query/kernel"] == (16, 16)
  assert shapes["decoder/conv_out/kernel"] == (3, 3, 8, 1)


def test_shapes(tiny_params):
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 8, 8, 1), minval=-1, maxval=1)
  mean, logvar = ae.encode(TINY, tiny_params, x)
  assert mean.shape == logvar.shape == (3, 4, 4, 2) == (3,) + TINY.latent_shape((8, 8, 1))
  assert ae.decode(TINY, tiny_params, mean).shape == (3, 8, 8, 1)
  three_levels = ae.AutoencoderKL(in_channels=3, block_out_channels=(8, 8, 16), layers_per_block=2,
                                  latent_channels=4, norm_num_groups=4)
  out = jax.eval_shape(lambda: three_levels.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3))))
  moments = jax.eval_shape(lambda p: three_levels.apply(p, jnp.zeros((2, 32, 32, 3)),
                                                        method=ae.AutoencoderKL.encode_moments), out)
  assert moments.shape == (2, 8, 8, 8) and three_levels.downsampling == 4
  assert "resnets_2" in out["params"]["decoder"]["up_blocks_0"]  # layers_per_block + 1 in the decoder


def test_posterior_against_closed_forms():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(4, 3, 3, 2))
  logvar = rng.uniform(-3, 2, size=(4, 3, 3, 2))
  logvar[0, 0, 0, 0], logvar[1, 0, 0, 0] = -40.0, 25.0  # outside SD's clip
  moments = jnp.asarray(np.concatenate([mean, logvar], -1), jnp.float32)
  post = ae.DiagonalGaussian.from_moments(moments)
  clipped = np.clip(logvar, -30.0, 20.0)
  np.testing.assert_allclose(post.logvar, clipped, rtol=1e-6)
  np.testing.assert_allclose(post.mode(), mean, rtol=1e-6)
  np.testing.assert_allclose(post.std, np.exp(0.5 * clipped), rtol=1e-5)
  # KL(N(m, v) ‖ N(0, 1)) = ½ (m² + v − 1 − log v), summed per example: float64 reference.
  ref = 0.5 * np.sum(mean**2 + np.exp(clipped) - 1 - clipped, axis=(1, 2, 3))
  np.testing.assert_allclose(post.kl(), ref, rtol=1e-5)
  z = rng.normal(size=mean.shape)
  nll_ref = 0.5 * np.sum(np.log(2 * np.pi) + clipped + (z - mean) ** 2 / np.exp(clipped), axis=(1, 2, 3))
  np.testing.assert_allclose(post.nll(jnp.asarray(z, jnp.float32)), nll_ref, rtol=1e-4)
  # Samples are mean + std · ε with ε ~ N(0, I): standardised, they have mean 0 and std 1.
  small = ae.DiagonalGaussian(jnp.asarray(mean[2:3], jnp.float32), jnp.asarray(logvar[2:3], jnp.float32))
  draws = jax.vmap(small.sample)(jax.random.split(jax.random.PRNGKey(0), 4000))
  eps = (np.asarray(draws) - mean[2:3]) / np.exp(0.5 * logvar[2:3])
  assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1) < 0.02
  # KL of the standard normal is zero.
  zero = ae.DiagonalGaussian(jnp.zeros((2, 2, 2, 1)), jnp.zeros((2, 2, 2, 1)))
  np.testing.assert_allclose(zero.kl(), 0.0, atol=1e-7)


def test_a_few_training_steps_lower_the_loss(tiny_params):
  x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (16, 8, 8, 1)), jnp.float32)
  loss_fn = ae.reconstruction_loss_fn(TINY, kl_weight=1e-3, loss="l2")
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, state, rng):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, None, {"image": x}, rng)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, metrics

  params, state = tiny_params, opt.init(tiny_params)
  losses = []
  for i in range(30):
    params, state, loss, metrics = step(params, state, jax.random.PRNGKey(i))
    losses.append(float(loss))
  assert all(math.isfinite(l) for l in losses)
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
  assert set(metrics) == {"l1", "l2", "kl"}


def test_loss_rejects_unknown_reconstruction_loss():
  with pytest.raises(ValueError, match="'huber'"):
    ae.reconstruction_loss_fn(TINY, kl_weight=1e-6, loss="huber")
