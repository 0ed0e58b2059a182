"""CLIP's text transformer (distill/models/clip_text.py): its parameter tree, causal masking, the pooled
end-of-text rule, configs from transformers' config.json, and — with the optional reference extra — the same
outputs as transformers 4.57's FlaxCLIPTextModel under the same parameters, also after those parameters went
through a text_encoder/ folder on disk (read by our loader and by transformers' own)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import sd_reference
from distill.models import clip_encoder, clip_keys, clip_text, sd_weights
from distill.testing import assert_trees_equal

# transformers' CLIPTextConfig fields of tiny text encoders like SD 1.x's (quick_gelu, the legacy eos id 2: pool
# at the largest id) and SD 2.x's (gelu, the real eos id).
TINY = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 16, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "eos_token_id": 2, "bos_token_id": 0, "pad_token_id": 1}
CONFIGS = {"sd1": TINY, "sd2": {**TINY, "hidden_act": "gelu", "eos_token_id": 97, "num_hidden_layers": 3}}


def shapes_of(model):
  return {"/".join(path): shape for path, shape in clip_keys.param_shapes(model).items()}


def test_parameter_tree():
  shapes = shapes_of(clip_text.clip_text_from_config(TINY))
  assert shapes["text_model/embeddings/token_embedding/embedding"] == (99, 32)
  assert shapes["text_model/embeddings/position_embedding/embedding"] == (16, 32)
  assert shapes["text_model/encoder/layers/1/self_attn/q_proj/kernel"] == (32, 32)
  assert shapes["text_model/encoder/layers/1/self_attn/out_proj/bias"] == (32,)
  assert shapes["text_model/encoder/layers/0/mlp/fc1/kernel"] == (32, 37)
  assert shapes["text_model/encoder/layers/0/mlp/fc2/kernel"] == (37, 32)
  assert shapes["text_model/encoder/layers/0/layer_norm2/scale"] == (32,)
  assert shapes["text_model/final_layer_norm/bias"] == (32,)
  assert len(shapes) == 2 + 2 * 16 + 2


def test_sd_text_encoder_parameter_counts():
  """SD 1.x's text encoder (CLIP ViT-L/14's text tower) holds 123,060,480 parameters; SD 2.x's (OpenCLIP
  ViT-H/14's without its last layer) 340,387,840."""
  for fields, count in ((clip_text.SD1_TEXT, 123_060_480), (clip_text.SD2_TEXT, 340_387_840)):
    shapes = clip_keys.param_shapes(clip_text.CLIPTextModel(**fields))
    assert sum(math.prod(s) for s in shapes.values()) == count


def random_params(model, seed=0, scale=0.3):
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict({p: (scale * rng.standard_normal(s)).astype(np.float32)
                                       for p, s in clip_keys.param_shapes(model).items()})


def token_rows(eos=2, vocab=99, length=9, seed=1):
  """Two rows: BOS (0), words, EOS, padding (1) after it; the first row's words hold the largest id (98) only
  when eos is 98, so the legacy rule and the eos-id rule point at different places otherwise."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab - 3, (2, length)).astype(np.int32)
  ids[:, 0] = 0
  ids[0, 5], ids[0, 6:] = eos, 1
  ids[1, 8] = eos
  return ids


def test_causal_attention_and_the_pooled_token():
  model = clip_text.clip_text_from_config(TINY)
  params = random_params(model)
  ids = token_rows(eos=98)  # eos 98 is also the largest id: the legacy rule finds it
  hidden, pooled = model.apply({"params": params}, ids)
  assert hidden.shape == (2, 9, 32) and pooled.shape == (2, 32)
  np.testing.assert_array_equal(pooled, hidden[np.arange(2), [5, 8]])
  later = ids.copy()
  later[:, 7] = 50
  hidden2, _ = model.apply({"params": params}, later)
  np.testing.assert_array_equal(hidden2[:, :7], hidden[:, :7])  # a token does not see those after it
  assert not np.allclose(hidden2[:, 7:], hidden[:, 7:])
  real_eos = model.clone(eos_token_id=97)
  ids = token_rows(eos=97)
  ids[0, 2] = 98  # the largest id elsewhere: only the eos-id rule finds position 5
  np.testing.assert_array_equal(clip_text.pooled_index(jnp.asarray(ids), 97), [5, 8])
  np.testing.assert_array_equal(clip_text.pooled_index(jnp.asarray(ids), 2), [2, 8])
  _, pooled = real_eos.apply({"params": params}, ids)
  hidden, _ = real_eos.apply({"params": params}, ids)
  np.testing.assert_array_equal(pooled, hidden[np.arange(2), [5, 8]])


def test_attention_bias_and_activations():
  bias = np.asarray(clip_text.attention_bias(3, np.array([[1, 1, 0]])))
  low = np.finfo(np.float32).min
  np.testing.assert_array_equal(bias[0, 0], [[0, low, low], [0, 0, low], [0, 0, low]])
  x = np.linspace(-4, 4, 9).astype(np.float32)
  np.testing.assert_allclose(clip_encoder.activation("quick_gelu", x), x / (1 + np.exp(-1.702 * x)), rtol=1e-6)
  exact = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
  np.testing.assert_allclose(clip_encoder.activation("gelu", x), exact, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="hidden_act='relu'"):
    clip_text.clip_text_from_config({**TINY, "hidden_act": "relu"})
  with pytest.raises(ValueError, match="not a CLIPTextModel"):
    clip_text.clip_text_from_config({**TINY, "architectures": ["CLIPTextModelWithProjection"]})
  model = clip_text.clip_text_from_config({"text_config": TINY, "architectures": ["CLIPModel"]})
  assert model.hidden_size == 32
  with pytest.raises(ValueError, match="17 tokens, more than max_position_embeddings=16"):
    model.init(jax.random.PRNGKey(0), np.zeros((1, 17), np.int32))


def reference_run(config):
  """(transformers' FlaxCLIPTextModel, its params with noise in every leaf, its outputs without and with a
  padding mask), or a skip."""
  transformers = sd_reference.transformers()
  ref = transformers.FlaxCLIPTextModel(transformers.CLIPTextConfig(**config), seed=0)
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda x: (np.asarray(x) + 0.3 * rng.standard_normal(np.shape(x))).astype(np.float32),
                        jax.device_get(ref.params))
  ids = token_rows(eos=config["eos_token_id"])
  mask = (np.arange(9)[None] <= np.array([[5], [8]])).astype(np.int32)
  outs = [ref(ids, attention_mask=m, params=params) for m in (None, mask)]
  return ref, params, ids, mask, [(np.asarray(o.last_hidden_state), np.asarray(o.pooler_output)) for o in outs]


@pytest.fixture(scope="module", params=list(CONFIGS))
def reference(request):
  config = CONFIGS[request.param]
  return (config, *reference_run(config))


def test_same_parameter_tree_as_transformers_flax(reference):
  config, _, params, *_ = reference
  theirs = {p: tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(params).items()}
  assert clip_keys.param_shapes(clip_text.clip_text_from_config(config)) == theirs


def test_same_outputs_as_transformers_flax(reference):
  config, _, params, ids, mask, outs = reference
  model = clip_text.clip_text_from_config(config)
  for m, (hidden_ref, pooled_ref) in zip((None, mask), outs):
    hidden, pooled = model.apply({"params": params}, ids, m)
    np.testing.assert_allclose(hidden, hidden_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled, pooled_ref, rtol=1e-5, atol=1e-5)


def test_transformers_reads_our_torch_layout(reference, tmp_path):
  """Our writer's state dict, through transformers' own PyTorch → Flax conversion, is exactly the parameters it
  was written from; a text_encoder/ folder of it (config.json, model.safetensors) loads, through our loader and
  through transformers' from_pretrained(from_pt=True), to the reference outputs."""
  from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
  from distill import weights
  config, ref, params, ids, mask, outs = reference
  state = clip_keys.text_encoder_state_dict(params)
  assert_trees_equal(jax.device_get(convert_pytorch_state_dict_to_flax(dict(state), ref)), params)
  folder = tmp_path / "pipe" / "text_encoder"
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps({**json.loads(ref.config.to_json_string()),
                                                  "architectures": ["CLIPTextModel"]}))
  position_ids = np.arange(config["max_position_embeddings"], dtype=np.int64)[None]
  # torch's safetensors files say {"format": "pt"} (transformers refuses a file without it)
  weights.write_safetensors(folder / "model.safetensors", {**state, clip_keys.POSITION_IDS: position_ids},
                            metadata={"format": "pt"})
  model, loaded, info = sd_weights.load_text_encoder(tmp_path / "pipe")
  assert info["ignored"] == 1 and info["file"].endswith("text_encoder/model.safetensors")
  assert_trees_equal(loaded, params)
  hidden, pooled = model.apply({"params": loaded}, ids, mask)
  np.testing.assert_allclose(hidden, outs[1][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled, outs[1][1], rtol=1e-5, atol=1e-5)
  import transformers
  theirs = transformers.FlaxCLIPTextModel.from_pretrained(str(folder), from_pt=True)
  assert_trees_equal(jax.device_get(theirs.params), params)
