"""Published autoencoder layouts -> our AutoencoderKL (distill/models/sd_keys.py): state dicts whose LDM / SD and
diffusers names are spelled out by hand below load to our parameters exactly (and the model computes the same);
our writer's LDM layout is the hand-spelled one and reads back exactly; wrong files are one line naming the key."""
import jax
import numpy as np
import pytest
from flax import traverse_util

from distill import weights
from distill.models import autoencoder as ae
from distill.models import sd_keys

# Three levels of different widths (the decoder's reversed numbering is visible), two resnets per level (three in
# the decoder's), a width change at every level (nin_shortcut / conv_shortcut).
MODEL = ae.AutoencoderKL(in_channels=3, block_out_channels=(8, 16, 24), layers_per_block=2, latent_channels=4,
                         norm_num_groups=4)
WIDTHS, LAYERS = (8, 16, 24), 2


@pytest.fixture(scope="module")
def params():
  # Random values in every leaf (a fresh init has zero biases and unit norms, which would hide swaps), in the
  # model's own tree (traced, not compiled).
  rng = np.random.default_rng(0)
  return traverse_util.unflatten_dict({path: rng.standard_normal(shape).astype(np.float32)
                                       for path, shape in sd_keys.param_shapes(MODEL).items()})


def conv(p):  # our [kh, kw, I, O] -> torch [O, I, kh, kw]
  return np.transpose(np.asarray(p["kernel"]), (3, 2, 0, 1))


def put_conv(out, name, p):
  out[f"{name}.weight"], out[f"{name}.bias"] = conv(p), np.asarray(p["bias"])


def put_norm(out, name, p):
  out[f"{name}.weight"], out[f"{name}.bias"] = np.asarray(p["scale"]), np.asarray(p["bias"])


def put_linear(out, name, p, as_conv):
  w = np.asarray(p["kernel"]).T  # [in, out] -> torch Linear [out, in]
  out[f"{name}.weight"], out[f"{name}.bias"] = (w[:, :, None, None] if as_conv else w), np.asarray(p["bias"])


def put_resnet(out, name, p, shortcut_name):
  put_norm(out, f"{name}.norm1", p["norm1"])
  put_conv(out, f"{name}.conv1", p["conv1"])
  put_norm(out, f"{name}.norm2", p["norm2"])
  put_conv(out, f"{name}.conv2", p["conv2"])
  if "conv_shortcut" in p:
    put_conv(out, f"{name}.{shortcut_name}", p["conv_shortcut"])


def ldm_state_dict(params, prefix=""):
  """LDM's / SD's names (ldm/modules/diffusionmodules/model.py), written out by hand."""
  out = {}
  e, d = params["encoder"], params["decoder"]
  put_conv(out, "encoder.conv_in", e["conv_in"])
  for i in range(3):
    for j in range(LAYERS):
      put_resnet(out, f"encoder.down.{i}.block.{j}", e[f"down_blocks_{i}"][f"resnets_{j}"], "nin_shortcut")
    if i < 2:
      put_conv(out, f"encoder.down.{i}.downsample.conv", e[f"down_blocks_{i}"]["downsamplers_0"]["conv"])
  for part, p in (("encoder", e), ("decoder", d)):
    mid = p["mid_block"]
    put_resnet(out, f"{part}.mid.block_1", mid["resnets_0"], "nin_shortcut")
    attn = mid["attentions_0"]
    put_norm(out, f"{part}.mid.attn_1.norm", attn["group_norm"])
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out")):
      put_linear(out, f"{part}.mid.attn_1.{theirs}", attn[ours], as_conv=True)
    put_resnet(out, f"{part}.mid.block_2", mid["resnets_1"], "nin_shortcut")
    put_norm(out, f"{part}.norm_out", p["conv_norm_out"])
    put_conv(out, f"{part}.conv_out", p["conv_out"])
  put_conv(out, "quant_conv", params["quant_conv"])
  put_conv(out, "post_quant_conv", params["post_quant_conv"])
  put_conv(out, "decoder.conv_in", d["conv_in"])
  # LDM numbers the decoder's levels by resolution: our up_blocks_0 (run first, lowest resolution) is up.2.
  for i, level in enumerate((2, 1, 0)):
    for j in range(LAYERS + 1):
      put_resnet(out, f"decoder.up.{level}.block.{j}", d[f"up_blocks_{i}"][f"resnets_{j}"], "nin_shortcut")
    if level > 0:
      put_conv(out, f"decoder.up.{level}.upsample.conv", d[f"up_blocks_{i}"]["upsamplers_0"]["conv"])
  return {prefix + k: v for k, v in out.items()}


def diffusers_state_dict(params, legacy=False):
  """diffusers' PyTorch AutoencoderKL names, written out by hand (legacy: attention as query/key/value/proj_attn)."""
  out = {}
  e, d = params["encoder"], params["decoder"]
  put_conv(out, "encoder.conv_in", e["conv_in"])
  put_conv(out, "decoder.conv_in", d["conv_in"])
  for i in range(3):
    for j in range(LAYERS):
      put_resnet(out, f"encoder.down_blocks.{i}.resnets.{j}", e[f"down_blocks_{i}"][f"resnets_{j}"], "conv_shortcut")
    for j in range(LAYERS + 1):
      put_resnet(out, f"decoder.up_blocks.{i}.resnets.{j}", d[f"up_blocks_{i}"][f"resnets_{j}"], "conv_shortcut")
    if i < 2:
      put_conv(out, f"encoder.down_blocks.{i}.downsamplers.0.conv", e[f"down_blocks_{i}"]["downsamplers_0"]["conv"])
      put_conv(out, f"decoder.up_blocks.{i}.upsamplers.0.conv", d[f"up_blocks_{i}"]["upsamplers_0"]["conv"])
  names = {"query": "query", "key": "key", "value": "value", "proj_attn": "proj_attn"} if legacy else {
      "query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
  for part, p in (("encoder", e), ("decoder", d)):
    mid = p["mid_block"]
    put_resnet(out, f"{part}.mid_block.resnets.0", mid["resnets_0"], "conv_shortcut")
    put_resnet(out, f"{part}.mid_block.resnets.1", mid["resnets_1"], "conv_shortcut")
    put_norm(out, f"{part}.mid_block.attentions.0.group_norm", mid["attentions_0"]["group_norm"])
    for ours, theirs in names.items():
      put_linear(out, f"{part}.mid_block.attentions.0.{theirs}", mid["attentions_0"][ours], as_conv=False)
    put_norm(out, f"{part}.conv_norm_out", p["conv_norm_out"])
    put_conv(out, f"{part}.conv_out", p["conv_out"])
  put_conv(out, "quant_conv", params["quant_conv"])
  put_conv(out, "post_quant_conv", params["post_quant_conv"])
  return out


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y))


def one_line(error) -> str:
  message = str(error.value)
  assert "\n" not in message, message
  return message


LAYOUT_CASES = {
    "ldm": (lambda p: ldm_state_dict(p), "ldm", ""),
    # SD's single file: the autoencoder under first_stage_model., beside parts that are not read.
    "sd_single_file": (lambda p: {**ldm_state_dict(p, "first_stage_model."),
                                  "model.diffusion_model.input_blocks.0.0.weight": np.zeros((4, 4, 3, 3), np.float32),
                                  "cond_stage_model.transformer.x": np.zeros(3, np.float32),
                                  "model_ema.decay": np.array(0.9999, np.float32)}, "ldm", "first_stage_model."),
    # LDM's autoencoder training checkpoint: its loss (LPIPS, discriminator) beside the model.
    "ldm_with_loss": (lambda p: {**ldm_state_dict(p), "loss.logvar": np.zeros((), np.float32),
                                 "loss.discriminator.main.0.weight": np.zeros((64, 3, 4, 4), np.float32)}, "ldm", ""),
    "diffusers": (lambda p: diffusers_state_dict(p), "diffusers", ""),
    "diffusers_legacy": (lambda p: diffusers_state_dict(p, legacy=True), "diffusers_legacy", ""),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_hand_spelled_layouts_load_exactly(params, case):
  make, layout, prefix = LAYOUT_CASES[case]
  state = make(params)
  loaded, info = sd_keys.autoencoder_params(state, MODEL)
  assert info["layout"] == layout and info["prefix"] == prefix
  assert info["ignored"] == (2 if case == "ldm_with_loss" else 0)
  assert_trees_equal(loaded, params)


def test_the_model_computes_the_same_with_loaded_params(params):
  x = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  mean, logvar = ae.encode(MODEL, params, x)
  recon = ae.decode(MODEL, params, mean)
  for case in ("sd_single_file", "diffusers"):
    loaded, _ = sd_keys.autoencoder_params(LAYOUT_CASES[case][0](params), MODEL)
    mean2, logvar2 = ae.encode(MODEL, loaded, x)
    np.testing.assert_array_equal(mean2, mean)
    np.testing.assert_array_equal(logvar2, logvar)
    np.testing.assert_array_equal(ae.decode(MODEL, loaded, mean2), recon)


@pytest.mark.parametrize("layout", sd_keys.LAYOUTS)
def test_writer_round_trip_is_exact(params, layout):
  state = sd_keys.state_dict_of(params, layout, prefix="first_stage_model.")
  loaded, info = sd_keys.autoencoder_params(state, MODEL)
  assert info == {"layout": layout, "prefix": "first_stage_model.", "ignored": 0}
  assert_trees_equal(loaded, params)
  hand = {"ldm": ldm_state_dict(params, "first_stage_model."),
          "diffusers": {f"first_stage_model.{k}": v for k, v in diffusers_state_dict(params).items()},
          "diffusers_legacy": {f"first_stage_model.{k}": v for k, v in diffusers_state_dict(params, True).items()}
          }[layout]
  assert set(state) == set(hand)
  for key in hand:
    assert state[key].shape == hand[key].shape and np.array_equal(state[key], hand[key]), key


def test_through_a_safetensors_file_reading_only_the_autoencoder(params, tmp_path):
  state = {**sd_keys.state_dict_of(params, "ldm", "first_stage_model."),
           "model.diffusion_model.out.2.weight": np.ones((4, 320, 3, 3), np.float16)}
  half = {k: v.astype(np.float16) if k.endswith("conv_in.weight") else v for k, v in state.items()}
  weights.write_safetensors(tmp_path / "sd.safetensors", half)
  read = weights.read_state_dict(tmp_path / "sd.safetensors", select=sd_keys.is_autoencoder_key)
  assert not any(k.startswith("model.") for k in read) and read[
      "first_stage_model.encoder.conv_in.weight"].dtype == np.float16
  loaded, _ = sd_keys.autoencoder_params(read, MODEL)
  halved = np.asarray(params["encoder"]["conv_in"]["kernel"]).astype(np.float16).astype(np.float32)
  np.testing.assert_array_equal(loaded["encoder"]["conv_in"]["kernel"], halved)
  np.testing.assert_array_equal(loaded["decoder"]["conv_out"]["kernel"], params["decoder"]["conv_out"]["kernel"])


def test_stable_diffusions_vae_layout():
  """SD's published VAE (first_stage_model.* of v1 checkpoints): 248 tensors; a few of its shapes."""
  sd = ae.AutoencoderKL(in_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        latent_channels=4, norm_num_groups=32)
  shapes = {}
  for path, shape in sd_keys.param_shapes(sd).items():
    torch_shape = {4: lambda s: (s[3], s[2], s[0], s[1]), 2: lambda s: (s[1], s[0], 1, 1)}.get(len(shape), tuple)
    shapes[sd_keys.torch_key(path, "ldm", 4)] = torch_shape(shape)
  assert len(shapes) == 248
  assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
  assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
  assert shapes["decoder.up.3.block.2.conv2.weight"] == (512, 512, 3, 3)
  assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3) and "decoder.up.0.upsample.conv.weight" \
      not in shapes
  assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
  assert shapes["encoder.conv_out.weight"] == (8, 512, 3, 3) and shapes["quant_conv.weight"] == (8, 8, 1, 1)
  assert shapes["post_quant_conv.weight"] == (4, 4, 1, 1) and shapes["decoder.conv_in.weight"] == (512, 4, 3, 3)


def _without(state, key):
  return {k: v for k, v in state.items() if k != key}


BAD = {
    "unknown_key": (lambda s: {**s, "encoder.down.0.block.0.extra.weight": np.zeros(3, np.float32)},
                    "unknown key 'encoder.down.0.block.0.extra.weight'"),
    "two_unknown_keys": (lambda s: {**s, "foo.a": np.zeros(1, np.float32), "foo.b": np.zeros(1, np.float32)},
                         "unknown key 'foo.a' and 1 more"),
    "attention_inside_a_level": (lambda s: {**s, "encoder.down.2.attn.0.q.weight": np.zeros((24, 24, 1, 1))},
                                 "attention inside the levels"),
    "missing_key": (lambda s: _without(s, "decoder.up.2.upsample.conv.bias"),
                    "missing key 'decoder.up.2.upsample.conv.bias'"),
    "missing_witness": (lambda s: _without(s, "post_quant_conv.weight"), "missing key 'post_quant_conv.weight'"),
    "transposed_conv": (lambda s: {**s, "decoder.up.1.block.0.conv1.weight":
                                   s["decoder.up.1.block.0.conv1.weight"].transpose(1, 0, 2, 3)},
                        "key 'decoder.up.1.block.0.conv1.weight' has shape (24, 16, 3, 3), expected (16, 24, 3, 3)"),
    "attention_of_another_width": (lambda s: {**s, "encoder.mid.attn_1.k.weight": np.zeros((24, 12, 1, 1))},
                                   "key 'encoder.mid.attn_1.k.weight' has shape (24, 12, 1, 1), expected (24, 24)"),
    "integer_tensor": (lambda s: {**s, "quant_conv.bias": np.zeros(8, np.int64)},
                       "key 'quant_conv.bias' has dtype int64"),
    "no_autoencoder": (lambda s: {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((4, 4, 3, 3))},
                       "neither LDM's autoencoder layout"),
    "empty": (lambda s: {}, "holds no autoencoder tensors"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_wrong_files_are_one_line_naming_the_key(params, case):
  make, needle = BAD[case]
  with pytest.raises(ValueError) as error:
    sd_keys.autoencoder_params(make(ldm_state_dict(params)), MODEL)
  assert needle in one_line(error), str(error.value)


def test_another_architecture_is_named_by_its_field(params):
  state = ldm_state_dict(params)
  for model, field, found, expected in [
      (ae.AutoencoderKL(3, (8, 16, 32), 2, 4, 4), "block_out_channels", (8, 16, 24), (8, 16, 32)),
      (ae.AutoencoderKL(3, (8, 16), 2, 4, 4), "block_out_channels", (8, 16, 24), (8, 16)),
      (ae.AutoencoderKL(3, (8, 16, 24), 1, 4, 4), "layers_per_block", 2, 1),
      (ae.AutoencoderKL(3, (8, 16, 24), 2, 8, 4), "latent_channels", 4, 8),
      (ae.AutoencoderKL(1, (8, 16, 24), 2, 4, 4), "in_channels", 3, 1)]:
    with pytest.raises(sd_keys.ArchitectureMismatch) as error:
      sd_keys.autoencoder_params(state, model)
    assert (error.value.field, error.value.found, error.value.expected) == (field, found, expected)
    assert f"{field}={found}" in one_line(error)


def test_against_diffusers_conversion(params):
  pytest.importorskip("diffusers", reason="diffusers is not installed here (not a dependency); the hand-spelled "
                      "layouts above stand in for its conversion")
  from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
  from diffusers import FlaxAutoencoderKL
  model = FlaxAutoencoderKL(in_channels=3, out_channels=3, block_out_channels=WIDTHS, layers_per_block=LAYERS,
                            latent_channels=4, norm_num_groups=4,
                            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
  class Tensor:  # the one method of a torch tensor the conversion calls (torch is not installed)
    def __init__(self, array):
      self.array = array

    def numpy(self):
      return self.array

  state = {k: Tensor(v) for k, v in diffusers_state_dict(params, legacy=True).items()}
  theirs = convert_pytorch_state_dict_to_flax(state, model)
  assert_trees_equal(theirs, jax.device_get(params))
