"""Published U-Net layouts ↔ our SDUNet (distill/models/sd_unet_keys.py): LDM names spelled out by hand, round
trips through both layouts (bare, under model.diffusion_model., as an EMA copy, through an SD single file on
disk) that are exact, SD 1.x / 2.x key shapes, and wrong files as one line naming the key. With the reference
extra, diffusers' own single-file converter maps our LDM layout onto our diffusers layout."""
import numpy as np
import pytest
from flax import traverse_util

import sd_reference
from distill import weights
from distill.models import sd_unet, sd_unet_keys, sd_weights
from distill.models.sd_keys import ArchitectureMismatch
from distill.testing import assert_trees_equal

CA_DOWN, DOWN, CA_UP, UP = (sd_unet.CROSS_ATTN_DOWN, sd_unet.DOWN, sd_unet.CROSS_ATTN_UP, sd_unet.UP)
# Three levels of different widths, two resnets per level (three per up block), a level without attention at
# the bottom (SD's layout), two transformer layers at the middle level.
MODEL = sd_unet.SDUNet(in_channels=4, out_channels=4, block_out_channels=(8, 16, 24), layers_per_block=2,
                       down_block_types=(CA_DOWN, CA_DOWN, DOWN), up_block_types=(UP, CA_UP, CA_UP),
                       num_attention_heads=2, cross_attention_dim=12, transformer_layers_per_block=(1, 2, 1),
                       norm_num_groups=4)
LDM = "model.diffusion_model."


@pytest.fixture(scope="module")
def params():
  rng = np.random.default_rng(0)
  return traverse_util.unflatten_dict({path: rng.standard_normal(shape).astype(np.float32)
                                       for path, shape in sd_unet_keys.param_shapes(MODEL).items()})


# Our path → LDM's name (openaimodel.UNetModel), by hand: n + 1 = 3 input blocks per level after input_blocks.0.
HAND_LDM = {
    "conv_in/kernel": "input_blocks.0.0.weight",
    "time_embedding/linear_1/kernel": "time_embed.0.weight", "time_embedding/linear_2/bias": "time_embed.2.bias",
    "down_blocks_0/resnets_0/norm1/scale": "input_blocks.1.0.in_layers.0.weight",
    "down_blocks_0/resnets_0/time_emb_proj/kernel": "input_blocks.1.0.emb_layers.1.weight",
    "down_blocks_0/resnets_1/conv2/kernel": "input_blocks.2.0.out_layers.3.weight",
    "down_blocks_0/attentions_1/proj_in/kernel": "input_blocks.2.1.proj_in.weight",
    "down_blocks_0/downsamplers_0/conv/kernel": "input_blocks.3.0.op.weight",
    "down_blocks_1/resnets_0/conv_shortcut/kernel": "input_blocks.4.0.skip_connection.weight",
    "down_blocks_1/attentions_1/transformer_blocks_1/attn2/to_out_0/bias":
        "input_blocks.5.1.transformer_blocks.1.attn2.to_out.0.bias",
    "down_blocks_1/downsamplers_0/conv/bias": "input_blocks.6.0.op.bias",
    "down_blocks_2/resnets_1/norm2/bias": "input_blocks.8.0.out_layers.0.bias",
    "mid_block/resnets_0/conv1/kernel": "middle_block.0.in_layers.2.weight",
    "mid_block/attentions_0/transformer_blocks_0/attn1/to_q/kernel":
        "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
    "mid_block/resnets_1/conv2/bias": "middle_block.2.out_layers.3.bias",
    "up_blocks_0/resnets_2/conv1/kernel": "output_blocks.2.0.in_layers.2.weight",
    "up_blocks_0/upsamplers_0/conv/kernel": "output_blocks.2.1.conv.weight",  # no attention: the upsampler is .1
    "up_blocks_1/attentions_0/norm/scale": "output_blocks.3.1.norm.weight",
    "up_blocks_1/attentions_2/transformer_blocks_1/norm3/bias": "output_blocks.5.1.transformer_blocks.1.norm3.bias",
    "up_blocks_1/upsamplers_0/conv/kernel": "output_blocks.5.2.conv.weight",  # after an attention: .2
    "up_blocks_2/resnets_2/conv_shortcut/bias": "output_blocks.8.0.skip_connection.bias",
    "up_blocks_2/attentions_2/transformer_blocks_0/ff/net_0/proj/kernel":
        "output_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight",
    "up_blocks_2/attentions_2/transformer_blocks_0/ff/net_2/kernel":
        "output_blocks.8.1.transformer_blocks.0.ff.net.2.weight",
    "conv_norm_out/scale": "out.0.weight", "conv_out/bias": "out.2.bias"}


def flat(params):
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def torch_of(value):
  value = np.asarray(value)
  return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2 else value


def test_hand_spelled_ldm_names(params):
  state = sd_unet_keys.unet_state_dict(params, MODEL, "ldm")
  ours = flat(params)
  for path, name in HAND_LDM.items():
    assert np.array_equal(state[LDM + name], torch_of(ours[path])), path
  assert len(state) == len(ours) and all(k.startswith(LDM) for k in state)
  assert "model.diffusion_model.output_blocks.2.2.conv.weight" not in state


@pytest.mark.parametrize("layout, prefix, ema", [("ldm", LDM, False), ("ldm", "", False), ("ldm", LDM, True),
                                                 ("diffusers", "", False)])
def test_round_trip_is_exact(params, layout, prefix, ema):
  state = sd_unet_keys.unet_state_dict(params, MODEL, layout, prefix, ema=ema)
  if ema:  # an SD training checkpoint: the EMA copy beside the (here zeroed) live weights
    live = sd_unet_keys.unet_state_dict(params, MODEL, layout, prefix)
    assert all(k.startswith("model_ema.diffusion_model") and "." not in k[len("model_ema."):] for k in state)
    state = {**{k: np.zeros_like(v) for k, v in live.items()}, **state, "model_ema.decay": np.float32(0.9999)}
  loaded, info = sd_unet_keys.unet_params(state, MODEL, ema=ema)
  assert (info["layout"], info["prefix"], info["ema"]) == (layout, prefix, ema)
  assert info["ignored"] == (len(state) // 2 + 1 if ema else 0)
  assert_trees_equal(loaded, params)


def test_the_model_computes_the_same_through_an_sd_single_file(params, tmp_path):
  """An SD single file (.safetensors) with the U-Net in LDM's layout beside the parts the U-Net loader skips."""
  state = {**sd_unet_keys.unet_state_dict(params, MODEL, "ldm"),
           "first_stage_model.decoder.conv_in.weight": np.ones((4, 4, 3, 3), np.float32),
           "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(8, np.float32),
           "alphas_cumprod": np.linspace(1, 0, 10).astype(np.float32),
           "model_ema.decay": np.array(0.9999, np.float32)}
  half = {k: v.astype(np.float16) if k.endswith("out.2.weight") else v for k, v in state.items()}
  weights.write_safetensors(tmp_path / "sd.safetensors", half)
  model, loaded, info = sd_weights.load_unet(tmp_path / "sd.safetensors", MODEL)
  assert model is MODEL and info["layout"] == "ldm" and info["ignored"] == 2  # alphas_cumprod, model_ema.decay
  np.testing.assert_array_equal(loaded["conv_out"]["kernel"],
                                np.asarray(params["conv_out"]["kernel"]).astype(np.float16).astype(np.float32))
  rng = np.random.default_rng(1)
  x, t, c = rng.standard_normal((2, 8, 8, 4)), np.array([1, 500]), rng.standard_normal((2, 3, 12))
  same = {**loaded, "conv_out": params["conv_out"]}
  np.testing.assert_array_equal(MODEL.apply({"params": same}, x, t, c), MODEL.apply({"params": params}, x, t, c))
  with pytest.raises(ValueError, match="holds no U-Net config; pass model="):
    sd_weights.load_unet(tmp_path / "sd.safetensors")


def test_stable_diffusion_key_shapes():
  """A few of SD 1.x's and 2.x's published model.diffusion_model.* names and shapes (686 tensors each)."""
  def ldm_shapes(model):
    shapes = sd_unet_keys.param_shapes(model)
    up_attends = tuple(t == CA_UP for t in model.up_block_types)
    out = {}
    for path, shape in shapes.items():
      torch_shape = {4: lambda s: (s[3], s[2], s[0], s[1]), 2: lambda s: (s[1], s[0])}.get(len(shape), tuple)(shape)
      out[sd_unet_keys.ldm_key(sd_unet_keys.diffusers_key(path), model.layers_per_block, up_attends)] = torch_shape
    return out
  sd1, sd2 = ldm_shapes(sd_unet.SDUNet(**sd_unet.SD1)), ldm_shapes(sd_unet.SDUNet(**sd_unet.SD2))
  assert len(sd1) == len(sd2) == 686
  assert sd1["input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1) and sd2["input_blocks.1.1.proj_in.weight"] == (
      320, 320)
  assert sd1["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
  assert sd2["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
  assert sd1["input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"] == (2560, 320)
  assert sd1["time_embed.0.weight"] == (1280, 320) and sd1["input_blocks.0.0.weight"] == (320, 4, 3, 3)
  assert sd1["input_blocks.3.0.op.weight"] == (320, 320, 3, 3) and "input_blocks.12.0.op.weight" not in sd1
  assert sd1["input_blocks.4.0.skip_connection.weight"] == (640, 320, 1, 1)
  assert sd1["input_blocks.11.0.in_layers.2.weight"] == (1280, 1280, 3, 3) and "input_blocks.10.1.norm.weight" \
      not in sd1
  assert sd1["middle_block.1.proj_out.weight"] == (1280, 1280, 1, 1)
  assert sd1["output_blocks.0.0.skip_connection.weight"] == (1280, 2560, 1, 1)
  assert sd1["output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
  assert sd1["output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
  assert sd1["output_blocks.8.2.conv.weight"] == (640, 640, 3, 3) and "output_blocks.11.2.conv.weight" not in sd1
  assert sd1["output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
  assert sd1["out.2.weight"] == (4, 320, 3, 3)


def test_diffusers_single_file_converter_agrees(params):
  """diffusers' convert_ldm_unet_checkpoint, given our LDM layout, writes our diffusers layout: every name and
  every array."""
  convert = sd_reference.diffusers_ldm_unet_converter()
  ldm = sd_unet_keys.unet_state_dict(params, MODEL, "ldm")
  theirs = convert(ldm, {"layers_per_block": MODEL.layers_per_block})
  ours = sd_unet_keys.unet_state_dict(params, MODEL, "diffusers")
  assert sorted(theirs) == sorted(ours)
  for key, value in ours.items():
    assert np.array_equal(np.asarray(theirs[key]), value), key


def _without(state, key):
  return {k: v for k, v in state.items() if k != key}


def _replace(state, key, value):
  return {**state, key: value}


BAD = {
    "unknown_ldm_key": (lambda s: _replace(s, LDM + "input_blocks.1.0.extra.weight", np.zeros(3, np.float32)),
                        "unknown key 'model.diffusion_model.input_blocks.1.0.extra.weight': not a tensor of LDM's"),
    "class_embedding": (lambda s: _replace(s, LDM + "label_emb.0.0.weight", np.zeros((32, 8), np.float32)),
                        "unknown key 'model.diffusion_model.label_emb.0.0.weight'"),
    "one_more_transformer_layer": (lambda s: {**s, **{k.replace("transformer_blocks.0", "transformer_blocks.1"): v
                                                     for k, v in s.items() if ".1.1.transformer_blocks.0." in k}},
                                   "unknown key 'model.diffusion_model.input_blocks.1.1.transformer_blocks.1."),
    "missing_key": (lambda s: _without(s, LDM + "output_blocks.5.2.conv.bias"),
                    "missing key 'model.diffusion_model.output_blocks.5.2.conv.bias' (layout 'ldm')"),
    "upsampler_twice": (lambda s: _replace(s, LDM + "output_blocks.2.2.conv.weight",
                                           s[LDM + "output_blocks.2.1.conv.weight"]),
                        "keys 'model.diffusion_model.output_blocks.2.1.conv.weight' and "
                        "'model.diffusion_model.output_blocks.2.2.conv.weight' are the same tensor"),
    "transposed_conv": (lambda s: _replace(s, LDM + "output_blocks.4.0.in_layers.2.weight",
                                           s[LDM + "output_blocks.4.0.in_layers.2.weight"].transpose(1, 0, 2, 3)),
                        "key 'model.diffusion_model.output_blocks.4.0.in_layers.2.weight' has shape (32, 16, 3, 3), "
                        "expected (16, 32, 3, 3)"),
    "integer_tensor": (lambda s: _replace(s, LDM + "out.2.bias", np.zeros(4, np.int64)),
                       "key 'model.diffusion_model.out.2.bias' has dtype int64"),
    "no_unet": (lambda s: {"first_stage_model.encoder.conv_in.weight": np.zeros((8, 3, 3, 3), np.float32)},
                "neither an SD single file"),
    "empty": (lambda s: {}, "holds no tensors"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_wrong_files_are_one_line_naming_the_key(params, case):
  make, needle = BAD[case]
  with pytest.raises(ValueError) as error:
    sd_unet_keys.unet_params(make(sd_unet_keys.unet_state_dict(params, MODEL, "ldm")), MODEL)
  message = str(error.value)
  assert "\n" not in message and needle in message, message


def test_diffusers_layout_names_its_keys(params):
  state = sd_unet_keys.unet_state_dict(params, MODEL, "diffusers")
  for make, needle in [
      (lambda s: _without(s, "up_blocks.1.attentions.2.proj_out.bias"),
       "missing key 'up_blocks.1.attentions.2.proj_out.bias' (layout 'diffusers')"),
      (lambda s: _replace(s, "add_embedding.linear_1.weight", np.zeros((32, 8), np.float32)),
       "unknown key 'add_embedding.linear_1.weight'"),
      (lambda s: _replace(s, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.bias",
                          np.zeros(8, np.float32)),
       "unknown key 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.bias'")]:
    with pytest.raises(ValueError) as error:
      sd_unet_keys.unet_params(make(state), MODEL)
    assert "\n" not in str(error.value) and needle in str(error.value), str(error.value)
  with pytest.raises(ValueError, match="ema=True reads an SD single file's EMA weights"):
    sd_unet_keys.unet_params(state, MODEL, ema=True)
  with pytest.raises(ValueError, match=r"missing key 'model_ema\.diffusion_model\w+' \(the EMA copy of "
                                       r"'model\.diffusion_model\."):
    sd_unet_keys.unet_params(sd_unet_keys.unet_state_dict(params, MODEL, "ldm"), MODEL, ema=True)


def test_another_architecture_is_named_by_its_field(params):
  state = sd_unet_keys.unet_state_dict(params, MODEL, "ldm")
  for change, field, found, expected in [
      ({"cross_attention_dim": 16}, "cross_attention_dim", 12, 16),
      ({"use_linear_projection": True}, "use_linear_projection", False, True),
      ({"in_channels": 9}, "in_channels", 4, 9),
      ({"out_channels": 8}, "out_channels", 4, 8),
      ({"block_out_channels": (8, 16, 32)}, "block_out_channels", (8, 16, 24), (8, 16, 32)),
      ({"layers_per_block": 1}, "layers_per_block", 2, 1),
      ({"down_block_types": (CA_DOWN,) * 3, "up_block_types": (CA_UP,) * 3}, "down_block_types",
       (CA_DOWN, CA_DOWN, DOWN), (CA_DOWN,) * 3)]:
    with pytest.raises(ArchitectureMismatch) as error:
      sd_unet_keys.unet_params(state, MODEL.clone(**change))
    assert (error.value.field, error.value.found, error.value.expected) == (field, found, expected)
    assert str(error.value).startswith(f"the file's U-Net has {field}=") and "\n" not in str(error.value)
