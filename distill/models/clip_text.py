"""CLIP's text transformer (Radford et al. 2021, §2.4), the text encoder of Stable Diffusion: SD 1.x reads OpenAI's
ViT-L/14 text tower (12 layers, width 768, quick_gelu), SD 2.x OpenCLIP ViT-H/14's without its last layer (23
layers, width 1024, gelu). Parameter names are those of transformers' FlaxCLIPTextModel (≤ 4.57,
`models/clip/modeling_flax_clip.py`), so its parameter tree applies unchanged:

  text_model/embeddings/{token_embedding, position_embedding}/embedding        [vocab, D], [max_positions, D]
  text_model/encoder/layers/{i}/layer_norm1 → self_attn/{q_proj, k_proj, v_proj, out_proj} (+ residual)
                               layer_norm2 → mlp/fc1 → act → mlp/fc2 (+ residual)   (pre-LN; i = '0', '1', …)
  text_model/final_layer_norm

Attention is causal (a token sees itself and those before it), optionally also masked by `attention_mask`
[B, L] (1 keep, 0 padding). Outputs: last_hidden_state [B, L, D] (after final_layer_norm: what SD's U-Net
cross-attends to) and the pooled output [B, D], the last hidden state at the end-of-text token: the position of
the largest token id when `eos_token_id` == 2 (transformers' legacy rule for configs from before it stored the
real id; CLIP's EOS is its vocabulary's last id), else the first position holding `eos_token_id`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill.models.clip_encoder import ACTIVATIONS, Encoder, LayerSpec

# Published text encoders (transformers' text_encoder/config.json of each).
SD1_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "eos_token_id": 2}
SD2_TEXT = {**SD1_TEXT, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
            "num_attention_heads": 16, "hidden_act": "gelu"}


class _Embeddings(nn.Module):
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, position_ids):
    tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
    positions = nn.Embed(self.max_position_embeddings, self.hidden_size, dtype=self.dtype,
                         name="position_embedding")(position_ids)
    return tokens + positions


class _TextTransformer(nn.Module):
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  spec: LayerSpec

  @nn.compact
  def __call__(self, input_ids, attention_mask, position_ids):
    x = _Embeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings, self.spec.dtype,
                    name="embeddings")(input_ids, position_ids)
    x = Encoder(self.spec, name="encoder")(x, attention_bias(input_ids.shape[1], attention_mask))
    return nn.LayerNorm(epsilon=self.spec.eps, dtype=self.spec.dtype, name="final_layer_norm")(x)


def attention_bias(length: int, attention_mask: jax.Array | None = None) -> jax.Array:
  """The additive attention bias [B or 1, 1, L, L]: 0 where query q may see key k (k ≤ q, and attention_mask
  [B, L] nonzero at k), float32's lowest value elsewhere (as transformers masks)."""
  keep = jnp.tril(jnp.ones((length, length), bool))[None, None]
  if attention_mask is not None:
    keep = keep & (jnp.asarray(attention_mask)[:, None, None, :] > 0)
  return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def pooled_index(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """[B] int: where each row's end-of-text token is (the module docstring's rule)."""
  if eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextModel(nn.Module):
  """__call__(input_ids [B, L] int, attention_mask [B, L] | None, position_ids [B, L] | None) →
  (last_hidden_state [B, L, hidden_size], pooled [B, hidden_size]), float32. L ≤ max_position_embeddings;
  position ids default to 0 … L − 1."""
  vocab_size: int = SD1_TEXT["vocab_size"]
  hidden_size: int = SD1_TEXT["hidden_size"]
  intermediate_size: int = SD1_TEXT["intermediate_size"]
  num_hidden_layers: int = SD1_TEXT["num_hidden_layers"]
  num_attention_heads: int = SD1_TEXT["num_attention_heads"]
  max_position_embeddings: int = SD1_TEXT["max_position_embeddings"]
  hidden_act: str = SD1_TEXT["hidden_act"]
  layer_norm_eps: float = SD1_TEXT["layer_norm_eps"]
  eos_token_id: int = SD1_TEXT["eos_token_id"]
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32

  def check(self) -> None:
    """ValueError (one line) when the fields do not describe a text transformer."""
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                       f"{self.num_attention_heads}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r}: allowed {', '.join(map(repr, ACTIVATIONS))}")

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, position_ids=None):
    self.check()
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.shape[-1] > self.max_position_embeddings:
      raise ValueError(f"{input_ids.shape[-1]} tokens, more than max_position_embeddings="
                       f"{self.max_position_embeddings}")
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    spec = LayerSpec(self.num_attention_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps,
                     self.num_hidden_layers, self.dtype)
    hidden = _TextTransformer(self.vocab_size, self.hidden_size, self.max_position_embeddings, spec,
                              name="text_model")(input_ids, attention_mask, position_ids).astype(jnp.float32)
    pooled = hidden[jnp.arange(hidden.shape[0]), pooled_index(input_ids, self.eos_token_id)]
    return hidden, pooled


_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id")


def clip_text_from_config(config: dict, **overrides) -> CLIPTextModel:
  """The CLIPTextModel a transformers `text_encoder/config.json` (as a dict) describes (a CLIPConfig's
  'text_config' is read when present); `overrides` set fields (dtype). ValueError (one line) otherwise."""
  config = config.get("text_config", config)
  architectures = config.get("architectures") or ["CLIPTextModel"]
  if architectures[0] not in ("CLIPTextModel", "FlaxCLIPTextModel", "CLIPModel"):
    raise ValueError(f"architectures {architectures!r}: not a CLIPTextModel (a projection head, as SDXL's second "
                     "text encoder has, is not part of this model)")
  model = CLIPTextModel(**{**{f: config[f] for f in _CONFIG_FIELDS if f in config}, **overrides})
  model.check()
  return model
