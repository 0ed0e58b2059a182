"""CLIP's transformer encoder, shared by its text tower (`clip_text`, causal) and image tower (`clip_vision`,
unmasked): pre-LN layers under transformers' Flax names, so its parameter trees apply unchanged:

  encoder/layers/{i}/layer_norm1 → self_attn/{q_proj, k_proj, v_proj, out_proj} (+ residual)
                     layer_norm2 → mlp/fc1 → act → mlp/fc2 (+ residual)            (i = '0', '1', …)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")


def activation(name: str, x: jax.Array) -> jax.Array:
  """quick_gelu: x · σ(1.702 x) (OpenAI CLIP); gelu: the exact (erf) GELU (OpenCLIP); gelu_new and
  gelu_pytorch_tanh: its tanh approximation (transformers' names for it)."""
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return jax.nn.gelu(x, approximate=True)
  raise ValueError(f"hidden_act={name!r}: allowed {', '.join(map(repr, ACTIVATIONS))}")


class SelfAttention(nn.Module):
  """x [B, L, D], bias [B or 1, 1, L, L] (0 or a large negative) → [B, L, D]."""
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias):
    b, length, d = x.shape
    head = d // self.heads
    q, k, v = (nn.Dense(d, dtype=self.dtype, name=name)(x).reshape(b, length, self.heads, head)
               for name in ("q_proj", "k_proj", "v_proj"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head ** -0.5 + bias
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, d)
    return nn.Dense(d, dtype=self.dtype, name="out_proj")(out)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """What every encoder layer shares: heads, MLP width, activation, LayerNorm ε, the compute dtype; and how many
  layers there are."""
  heads: int
  intermediate_size: int
  hidden_act: str
  eps: float
  layers: int
  dtype: Any = jnp.float32


class EncoderLayer(nn.Module):
  """x [B, L, D], bias → [B, L, D]: x += self_attn(layer_norm1(x)); x += mlp(layer_norm2(x))."""
  spec: LayerSpec

  @nn.compact
  def __call__(self, x, bias):
    s = self.spec
    h = nn.LayerNorm(epsilon=s.eps, dtype=s.dtype, name="layer_norm1")(x)
    x = x + SelfAttention(s.heads, s.dtype, name="self_attn")(h, bias)
    h = nn.LayerNorm(epsilon=s.eps, dtype=s.dtype, name="layer_norm2")(x)
    return x + MLP(s.intermediate_size, s.hidden_act, s.dtype, name="mlp")(h)


class MLP(nn.Module):
  intermediate_size: int
  hidden_act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = activation(self.hidden_act, nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x))
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class Layers(nn.Module):
  spec: LayerSpec

  @nn.compact
  def __call__(self, x, bias):
    for i in range(self.spec.layers):
      x = EncoderLayer(self.spec, name=str(i))(x, bias)
    return x


class Encoder(nn.Module):  # transformers nests the layers one module deeper: encoder/layers/{i}
  spec: LayerSpec

  @nn.compact
  def __call__(self, x, bias):
    return Layers(self.spec, name="layers")(x, bias)
