"""Published text encoder layout ↔ our CLIPTextModel (distill/models/clip_keys.py): transformers' names spelled
out by hand, exact round trips (a text_encoder/ file, SD 1.x's single file under cond_stage_model.transformer.),
and wrong files as one line naming the key."""
import numpy as np
import pytest
from flax import traverse_util

from distill import weights
from distill.models import clip_keys, clip_text, sd_weights
from distill.models.sd_keys import ArchitectureMismatch
from distill.testing import assert_trees_equal

MODEL = clip_text.CLIPTextModel(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                num_attention_heads=2, max_position_embeddings=12)
SD = "cond_stage_model.transformer."


@pytest.fixture(scope="module")
def params():
  rng = np.random.default_rng(0)
  return traverse_util.unflatten_dict({path: rng.standard_normal(shape).astype(np.float32)
                                       for path, shape in clip_keys.param_shapes(MODEL).items()})


def hand_state_dict(params, prefix=""):
  """transformers' CLIPTextModel names, written out by hand: linears [out, in], embeddings as they are."""
  t = params["text_model"]
  out = {"text_model.embeddings.token_embedding.weight": t["embeddings"]["token_embedding"]["embedding"],
         "text_model.embeddings.position_embedding.weight": t["embeddings"]["position_embedding"]["embedding"],
         "text_model.final_layer_norm.weight": t["final_layer_norm"]["scale"],
         "text_model.final_layer_norm.bias": t["final_layer_norm"]["bias"]}
  for i in range(2):
    layer = t["encoder"]["layers"][str(i)]
    base = f"text_model.encoder.layers.{i}"
    for norm in ("layer_norm1", "layer_norm2"):
      out[f"{base}.{norm}.weight"], out[f"{base}.{norm}.bias"] = layer[norm]["scale"], layer[norm]["bias"]
    for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")), ("mlp", ("fc1", "fc2"))):
      for name in names:
        out[f"{base}.{part}.{name}.weight"] = np.asarray(layer[part][name]["kernel"]).T
        out[f"{base}.{part}.{name}.bias"] = layer[part][name]["bias"]
  return {prefix + k: np.ascontiguousarray(v) for k, v in out.items()}


def test_writer_is_the_hand_spelled_layout(params):
  for prefix in ("", SD):
    ours, hand = clip_keys.text_encoder_state_dict(params, prefix), hand_state_dict(params, prefix)
    assert sorted(ours) == sorted(hand)
    for key in hand:
      assert ours[key].shape == hand[key].shape and np.array_equal(ours[key], hand[key]), key


@pytest.mark.parametrize("prefix", ["", SD])
def test_round_trip_is_exact(params, prefix):
  state = {**hand_state_dict(params, prefix), prefix + clip_keys.POSITION_IDS: np.arange(12)[None]}
  loaded, info = clip_keys.text_encoder_params(state, MODEL)
  assert info == {"prefix": prefix, "ignored": 1}
  assert_trees_equal(loaded, params)


def test_an_sd1_single_file_on_disk(params, tmp_path):
  state = {**hand_state_dict(params, SD), "model.diffusion_model.out.2.weight": np.ones((4, 8, 3, 3), np.float32),
           "first_stage_model.decoder.conv_in.weight": np.ones((4, 4, 3, 3), np.float32)}
  weights.write_safetensors(tmp_path / "sd.safetensors", state)
  model, loaded, info = sd_weights.load_text_encoder(tmp_path / "sd.safetensors", MODEL)
  assert model is MODEL and info["prefix"] == SD
  assert_trees_equal(loaded, params)
  with pytest.raises(ValueError) as error:  # the default model is SD 1.x's, 768 wide
    sd_weights.load_text_encoder(tmp_path / "sd.safetensors")
  assert "the file's text encoder has vocab_size=50 where the model has 49408" in str(error.value)


def _without(state, key):
  return {k: v for k, v in state.items() if k != key}


BAD = {
    "unknown_key": (lambda s: {**s, "text_projection.weight": np.zeros((16, 16), np.float32)},
                    "unknown key 'text_projection.weight'"),
    "missing_key": (lambda s: _without(s, "text_model.encoder.layers.1.mlp.fc2.bias"),
                    "missing key 'text_model.encoder.layers.1.mlp.fc2.bias'"),
    "transposed_linear": (lambda s: {**s, "text_model.encoder.layers.1.mlp.fc1.weight":
                                     s["text_model.encoder.layers.1.mlp.fc1.weight"].T},
                          "key 'text_model.encoder.layers.1.mlp.fc1.weight' has shape (16, 24), expected (24, 16)"),
    "integer_embedding": (lambda s: {**s, "text_model.embeddings.position_embedding.weight": np.zeros((12, 16), int)},
                          "key 'text_model.embeddings.position_embedding.weight' has shape (12, 16) and dtype int64"),
    "float_position_ids": (lambda s: {**s, clip_keys.POSITION_IDS: np.zeros((1, 12), np.float32)},
                           "unknown key 'text_model.embeddings.position_ids'"),
    "open_clip": (lambda s: {"cond_stage_model.model.token_embedding.weight": np.zeros((50, 16), np.float32)},
                  "OpenCLIP's layout (cond_stage_model.model.*, SD 2.x single files), which is not read"),
    "no_tokens": (lambda s: _without(s, "text_model.embeddings.token_embedding.weight"),
                  "missing key 'text_model.embeddings.token_embedding.weight'"),
    "empty": (lambda s: {}, "holds no text encoder tensors"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_wrong_files_are_one_line_naming_the_key(params, case):
  make, needle = BAD[case]
  with pytest.raises(ValueError) as error:
    clip_keys.text_encoder_params(make(hand_state_dict(params)), MODEL)
  message = str(error.value)
  assert "\n" not in message and needle in message, message


def test_another_architecture_is_named_by_its_field(params):
  state = hand_state_dict(params, SD)
  for change, field, found, expected in [({"vocab_size": 49408}, "vocab_size", 50, 49408),
                                         ({"hidden_size": 32}, "hidden_size", 16, 32),
                                         ({"max_position_embeddings": 77}, "max_position_embeddings", 12, 77),
                                         ({"num_hidden_layers": 3}, "num_hidden_layers", 2, 3),
                                         ({"intermediate_size": 64}, "intermediate_size", 24, 64)]:
    with pytest.raises(ArchitectureMismatch) as error:
      clip_keys.text_encoder_params(state, MODEL.clone(**change))
    assert (error.value.field, error.value.found, error.value.expected) == (field, found, expected)
    assert str(error.value).startswith("the file's text encoder has") and "\n" not in str(error.value)
