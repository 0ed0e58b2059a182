"""A latent run below the methods: the Context serves latents to the stages and decodes their samples; checked with
an exact, invertible 'autoencoder' (space-to-depth), so every number has a closed form."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from distill import configuration, context, latent
from distill.methods import teacher as teacher_lib


def space_to_depth(x):
  """[B, 8, 8, 1] -> [B, 4, 4, 4]: each 2×2 block into channels (invertible, no learning)."""
  b, h, w, c = x.shape
  return jnp.asarray(x).reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)


def depth_to_space(z):
  b, h, w, c4 = z.shape
  return jnp.asarray(z).reshape(b, h, w, 2, 2, c4 // 4).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c4 // 4)


def tiny_latent_ctx(tmp_path):
  c = configuration.base_config()
  c.data.name, c.data.image_size, c.data.channels, c.data.num_classes, c.data.num_examples = "mixture", 8, 1, 3, 64
  c.latent.enabled, c.sample.clip = True, False
  m = c.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.head_dim, m.num_groups = 8, (1,), 1, (), 8, 4
  t = c.teacher
  t.num_steps, t.batch_size, t.log_every, t.ckpt_every, t.warmup_steps = 4, 16, 2, 4, 1
  c.eval.class_agreement = False
  c.sample.batch_size, c.sample.num_steps, c.sample.w_values, c.sample.per_cell = 16, 4, (0.0, 1.0), 1
  configuration.validate(c)
  pixels = context.Context(c, str(tmp_path))  # only for its pixel sources
  def latents(split):
    batch = pixels.pixel_source(split).get_batch(np.arange(len(pixels.pixel_source(split))))
    return np.asarray(space_to_depth(batch["image"])), batch["label"]
  space = latent.LatentSpace(encode=lambda x, key=None: space_to_depth(x), decode=depth_to_space, latents=latents,
                             latent_shape=(4, 4, 4), scale_factor=1.0, where="test")
  return context.Context(c, str(tmp_path), latent_space=space)


def test_the_context_serves_latents_and_decodes_samples(tmp_path):
  ctx = tiny_latent_ctx(tmp_path)
  assert ctx.is_latent and ctx.image_shape == (4, 4, 4) and ctx.pixel_shape == (8, 8, 1)
  pixels = ctx.pixel_source("train").get_batch(np.arange(5))["image"]
  served = ctx.train_source.get_batch(np.arange(5))
  np.testing.assert_array_equal(served["image"], np.asarray(space_to_depth(pixels)))
  np.testing.assert_array_equal(ctx.decode(served["image"]), pixels)  # space-to-depth is exact
  # A sampler's output (latents) comes back as pictures, chunked by sample.batch_size (16 < 40 rows).
  z = np.random.default_rng(0).normal(size=(40, 4, 4, 4)).astype(np.float32)
  images = context.sample_images(ctx, lambda z_, y, w: z_ * 0.5, z, np.zeros(40, np.int32), np.zeros(40))
  np.testing.assert_allclose(images, np.asarray(depth_to_space(z * 0.5)), rtol=0, atol=1e-6)
  assert context.autoencoder_dir(ctx) == os.path.join(str(tmp_path), "autoencoder")


def test_a_method_trains_on_latents_and_draws_decoded_grids(tmp_path):
  ctx = tiny_latent_ctx(tmp_path)
  teacher_lib.run_teacher(ctx)
  from distill import train
  params, meta = train.load_final_params(ctx.stage_dir("teacher"))
  # The network sees latents: its input convolution has 4 channels, and it predicts all 4 (a one-channel output
  # would broadcast against the 4-channel z without an error).
  assert params["conv_in"]["kernel"].shape[2] == 4
  assert params["conv_out"]["kernel"].shape[3] == 4
  with Image.open(os.path.join(ctx.stage_dir("teacher"), "samples.png")) as grid:
    width, height = grid.size
  # 3 class rows of 8×8 pictures (not 4×4 latents), upscaled 16×, plus the caption margins.
  assert height > 3 * 8 * 16 and width > 2 * 8 * 16


def test_latent_runs_refuse_clipping():
  c = configuration.base_config()
  c.latent.enabled = True
  with pytest.raises(configuration.ConfigError, match="sample.clip=True: must be False in a latent run"):
    configuration.validate(c)
