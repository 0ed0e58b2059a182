"""SD's cross-attention U-Net (distill/models/sd_unet.py): its parameter tree and shapes, the timestep features
against their formula, configs read from diffusers' config.json, and — with the optional reference extra —
the same outputs as diffusers 0.39's FlaxUNet2DConditionModel under the same parameters, also after those
parameters went through a diffusers-format folder on disk."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import sd_reference
from distill.models import sd_unet, sd_unet_keys, sd_weights
from distill.testing import assert_trees_equal

# diffusers' config.json of two tiny U-Nets shaped like SD 1.x (1×1 projections, a DownBlock2D level, one head
# count) and SD 2.x inpainting (9 inputs, linear projections, per-level heads, two transformer layers, the other
# timestep-feature settings). diffusers' Flax port fixes GroupNorm at 32 groups, hence widths of 32 and 64.
SD1_TINY = {"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
            "block_out_channels": [32, 64], "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 2,
            "cross_attention_dim": 24, "use_linear_projection": False, "flip_sin_to_cos": True, "freq_shift": 0,
            "norm_num_groups": 32, "norm_eps": 1e-5, "mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu"}
SD2_INPAINT_TINY = {**SD1_TINY, "in_channels": 9, "layers_per_block": 2,
                    "down_block_types": ["CrossAttnDownBlock2D"] * 2, "up_block_types": ["CrossAttnUpBlock2D"] * 2,
                    "attention_head_dim": [2, 4], "cross_attention_dim": 16, "use_linear_projection": True,
                    "flip_sin_to_cos": False, "freq_shift": 1, "transformer_layers_per_block": 2}
CONFIGS = {"sd1": SD1_TINY, "sd2_inpaint": SD2_INPAINT_TINY}


def shapes_of(model):
  return {"/".join(path): shape for path, shape in sd_unet_keys.param_shapes(model).items()}


def test_parameter_tree_of_an_sd1_shaped_unet():
  shapes = shapes_of(sd_unet.sd_unet_from_diffusers_config(SD1_TINY))
  expected = {
      "conv_in/kernel": (3, 3, 4, 32), "time_embedding/linear_1/kernel": (32, 128),
      "time_embedding/linear_2/kernel": (128, 128),
      "down_blocks_0/resnets_0/time_emb_proj/kernel": (128, 32),
      "down_blocks_0/attentions_0/norm/scale": (32,), "down_blocks_0/attentions_0/proj_in/kernel": (1, 1, 32, 32),
      "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel": (32, 32),
      "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel": (24, 32),
      "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_out_0/bias": (32,),
      "down_blocks_0/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel": (32, 256),
      "down_blocks_0/attentions_0/transformer_blocks_0/ff/net_2/kernel": (128, 32),
      "down_blocks_0/attentions_0/transformer_blocks_0/norm3/scale": (32,),
      "down_blocks_0/downsamplers_0/conv/kernel": (3, 3, 32, 32),
      "down_blocks_1/resnets_0/conv_shortcut/kernel": (1, 1, 32, 64),
      "mid_block/resnets_1/conv2/kernel": (3, 3, 64, 64),
      "mid_block/attentions_0/transformer_blocks_0/attn2/to_v/kernel": (24, 64),
      # up block 0 (64 wide): skips of 64 (down_blocks_1's resnet), 32 (down_blocks_0's downsampler)
      "up_blocks_0/resnets_0/conv1/kernel": (3, 3, 128, 64), "up_blocks_0/resnets_1/conv1/kernel": (3, 3, 96, 64),
      "up_blocks_0/upsamplers_0/conv/kernel": (3, 3, 64, 64),
      # up block 1 (32 wide): skips of 32 (down_blocks_0's resnet) and 32 (conv_in)
      "up_blocks_1/resnets_0/conv1/kernel": (3, 3, 96, 32), "up_blocks_1/resnets_1/conv_shortcut/kernel":
          (1, 1, 64, 32),
      "up_blocks_1/attentions_1/proj_out/kernel": (1, 1, 32, 32),
      "conv_norm_out/scale": (32,), "conv_out/kernel": (3, 3, 32, 4)}
  for name, shape in expected.items():
    assert shapes.get(name) == shape, name
  assert not any(k.startswith(("down_blocks_1/attentions", "up_blocks_0/attentions", "up_blocks_1/upsamplers",
                               "down_blocks_1/downsamplers")) for k in shapes)
  assert not any("to_q/bias" in k or "to_k/bias" in k or "to_v/bias" in k for k in shapes)
  assert len(shapes) == 208  # 10 outside the blocks, 38 + 12 down, 46 mid, 26 + 76 up


def test_sd_parameter_counts():
  """SD 1.x's U-Net holds 859,520,964 parameters and SD 2.x's 865,910,724 (their diffusers unet/ folders)."""
  for fields, count in ((sd_unet.SD1, 859_520_964), (sd_unet.SD2, 865_910_724)):
    shapes = sd_unet_keys.param_shapes(sd_unet.SDUNet(**fields))
    assert sum(math.prod(s) for s in shapes.values()) == count
  inpaint = sd_unet_keys.param_shapes(sd_unet.SDUNet(**sd_unet.SD1, in_channels=9))
  assert inpaint[("conv_in", "kernel")] == (3, 3, 9, 320)


@pytest.mark.parametrize("flip, shift", [(True, 0), (False, 1)])
def test_timestep_features_formula(flip, shift):
  t = np.array([0.0, 1.0, 17.0, 999.0], np.float32)
  dim, half = 12, 6
  freqs = np.exp(-math.log(10_000) * np.arange(half) / (half - shift))
  sin, cos = np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)
  want = np.concatenate([cos, sin] if flip else [sin, cos], axis=1)
  got = sd_unet.timestep_features(jnp.asarray(t), dim, flip, shift)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-4)  # float32 arguments up to 999 rad


def random_params(model, seed=0, scale=0.1):
  """Random values in every leaf (a fresh init's zero biases and unit norms would hide swaps)."""
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict({p: (scale * rng.standard_normal(s)).astype(np.float32)
                                       for p, s in sd_unet_keys.param_shapes(model).items()})


def inputs(config, batch=2, side=8, tokens=5, seed=1):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((batch, side, side, config["in_channels"])).astype(np.float32)
  context = rng.standard_normal((batch, tokens, config["cross_attention_dim"])).astype(np.float32)
  return sample, np.array([3, 917][:batch], np.int32), context


def test_shapes_dtype_and_a_scalar_timestep():
  model = sd_unet.sd_unet_from_diffusers_config(SD2_INPAINT_TINY)
  params = random_params(model)
  sample, t, context = inputs(SD2_INPAINT_TINY)
  apply = jax.jit(model.apply)
  out = apply({"params": params}, sample, t, context)
  assert out.shape == (2, 8, 8, 4) and out.dtype == jnp.float32 and np.all(np.isfinite(out))
  same_t = apply({"params": params}, sample, 3, context)  # t[0] == 3 for every row
  np.testing.assert_allclose(same_t[0], out[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(same_t[1], out[1])
  half = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({"params": params}, sample, t, context)
  assert half.dtype == jnp.float32 and float(jnp.max(jnp.abs(half - out))) < 0.1 * float(jnp.max(jnp.abs(out)))


def test_config_reading():
  model = sd_unet.sd_unet_from_diffusers_config(SD2_INPAINT_TINY, gelu_approximate=True)
  assert model.num_attention_heads == (2, 4) and model.in_channels == 9 and model.use_linear_projection
  assert model.transformer_layers_per_block == 2 and model.freq_shift == 1 and model.gelu_approximate
  heads = sd_unet.sd_unet_from_diffusers_config({**SD1_TINY, "num_attention_heads": 4, "attention_head_dim": 2})
  assert heads.num_attention_heads == 4
  bad = {"addition_embed_type": ({**SD1_TINY, "addition_embed_type": "text_time"}, "addition_embed_type='text_time'"),
         "class": ({**SD1_TINY, "_class_name": "UNet2DModel"}, "not a UNet2DConditionModel"),
         "block": ({**SD1_TINY, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]},
                   "block type 'SimpleCrossAttnDownBlock2D'"),
         "levels": ({**SD1_TINY, "attention_head_dim": [2, 2, 2]}, "3 entries for 2 levels"),
         "heads": ({**SD1_TINY, "attention_head_dim": 3}, "not divisible by its 3 attention heads")}
  for name, (config, needle) in bad.items():
    with pytest.raises(ValueError) as error:
      sd_unet.sd_unet_from_diffusers_config(config)
    assert needle in str(error.value) and "\n" not in str(error.value), name


def reference_unet(config):
  """diffusers' FlaxUNet2DConditionModel of `config` (a torch config.json's fields), or a skip."""
  diffusers = sd_reference.diffusers()
  fields = ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
            "block_out_channels", "layers_per_block", "attention_head_dim", "cross_attention_dim",
            "use_linear_projection", "flip_sin_to_cos", "freq_shift", "transformer_layers_per_block")
  kwargs = {f: tuple(v) if isinstance(v, list) else v for f, v in config.items() if f in fields}
  return diffusers.FlaxUNet2DConditionModel(**kwargs)


def reference_run(config):
  """(reference model, its params perturbed so every leaf is random, its output [B, H, W, C] on `inputs`)."""
  ref = reference_unet(config)
  init = jax.device_get(jax.jit(ref.init_weights)(jax.random.PRNGKey(0)))
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda x: (np.asarray(x) + 0.05 * rng.standard_normal(np.shape(x))).astype(np.float32), init)
  sample, t, context = inputs(config)
  out = jax.jit(ref.apply)({"params": params}, jnp.asarray(sample.transpose(0, 3, 1, 2)), jnp.asarray(t),
                          jnp.asarray(context)).sample
  return ref, params, np.asarray(out).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=list(CONFIGS))
def reference(request):
  config = CONFIGS[request.param]
  return (config, *reference_run(config))


def test_same_parameter_tree_as_diffusers_flax(reference):
  config, _, ref_params, _ = reference
  ours = sd_unet_keys.param_shapes(sd_unet.sd_unet_from_diffusers_config(config))
  theirs = {p: tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(ref_params).items()}
  assert ours == theirs


def test_same_outputs_as_diffusers_flax(reference):
  config, _, ref_params, ref_out = reference
  model = sd_unet.sd_unet_from_diffusers_config(config, **sd_unet.FLAX_REFERENCE)
  out = jax.jit(model.apply)({"params": ref_params}, *inputs(config))
  assert float(np.max(np.abs(ref_out))) > 0.1  # a comparison of near-zero outputs would prove little
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  # torch's numerics (the defaults) differ from the Flax port's by a little, not by a bug's worth.
  torch_numerics = sd_unet.sd_unet_from_diffusers_config(config).apply({"params": ref_params}, *inputs(config))
  diff = float(np.max(np.abs(torch_numerics - ref_out)))
  assert 0 < diff < 0.02 * float(np.max(np.abs(ref_out))), diff


def test_diffusers_converter_reads_our_torch_layout(reference):
  """Our diffusers-layout writer's state dict, through diffusers' own PyTorch → Flax conversion, is exactly
  the parameters it was written from: names and transposes agree with diffusers'."""
  _, ref, ref_params, _ = reference
  model = sd_unet.sd_unet_from_diffusers_config(reference[0])
  state = sd_unet_keys.unet_state_dict(ref_params, model, "diffusers")
  assert_trees_equal(sd_reference.diffusers_pytorch_to_flax(state, ref), ref_params)


def test_a_diffusers_folder_gives_the_reference_outputs(reference, tmp_path):
  """A pipeline folder (unet/config.json + unet/diffusion_pytorch_model.safetensors) holding the reference's
  parameters in torch's layout: the model and parameters `load_unet` makes compute the reference's outputs."""
  from distill import weights
  config, _, ref_params, ref_out = reference
  unet = tmp_path / "pipe" / "unet"
  unet.mkdir(parents=True)
  (unet / "config.json").write_text(json.dumps(config))
  state = sd_unet_keys.unet_state_dict(ref_params, sd_unet.sd_unet_from_diffusers_config(config), "diffusers")
  weights.write_safetensors(unet / "diffusion_pytorch_model.safetensors", state)
  model, params, info = sd_weights.load_unet(tmp_path / "pipe", **sd_unet.FLAX_REFERENCE)
  assert info["layout"] == "diffusers" and info["file"].endswith("unet/diffusion_pytorch_model.safetensors")
  assert_trees_equal(params, jax.device_get(ref_params))
  np.testing.assert_allclose(model.apply({"params": params}, *inputs(config)), ref_out, rtol=1e-5, atol=1e-5)
