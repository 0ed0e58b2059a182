"""Stable Diffusion's published text encoder weights ↔ `CLIPTextModel`'s parameters.

One torch layout, transformers' CLIPTextModel (linears [out, in], embeddings [N, D]):
text_model.embeddings.{token_embedding, position_embedding}.weight; text_model.encoder.layers.{i}.{layer_norm1,
self_attn.{q_proj, k_proj, v_proj, out_proj}, layer_norm2, mlp.fc1, mlp.fc2}.{weight, bias};
text_model.final_layer_norm.{weight, bias}. It is a diffusers pipeline's `text_encoder/` folder (model.safetensors)
as it is, and SD 1.x's single files under 'cond_stage_model.transformer.'. The position-ids buffer some files
hold (text_model.embeddings.position_ids, integers) is skipped and counted. SD 2.x's single files hold OpenCLIP's
own layout (cond_stage_model.model.*), which is not read: use a diffusers copy's text_encoder/.

Read from the shapes and compared with the model's (`ArchitectureMismatch`): vocab_size, hidden_size,
max_position_embeddings, num_hidden_layers, intermediate_size. Heads, activation and LayerNorm ε cannot be read
from shapes and are the model's (SD 1.x: 12 heads, quick_gelu; SD 2.x: 16 heads, gelu). Every other
disagreement is one ValueError line naming the key, raised before anything is returned.
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from distill.models.clip_text import CLIPTextModel
from distill.models.sd_keys import ArchitectureMismatch, torch_to_flax

SD_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
POSITION_IDS = "text_model.embeddings.position_ids"
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "max_position_embeddings", "num_hidden_layers",
                       "intermediate_size")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_TOKENS = "text_model.embeddings.token_embedding.weight"
_POSITIONS = "text_model.embeddings.position_embedding.weight"


def torch_key(path: tuple[str, ...]) -> str:
  """Our parameter path ('text_model', 'encoder', 'layers', '0', 'self_attn', 'q_proj', 'kernel') → transformers'
  torch name ('text_model.encoder.layers.0.self_attn.q_proj.weight')."""
  *modules, leaf = path
  return ".".join([*modules, _LEAF[leaf]])


def param_shapes(model: CLIPTextModel) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path: shape} of every parameter of `model` (traced once per model, nothing computed)."""
  return dict(_param_shapes(model))


@functools.lru_cache(maxsize=8)
def _param_shapes(model: CLIPTextModel) -> tuple:
  tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
  return tuple((path, tuple(leaf.shape)) for path, leaf in traverse_util.flatten_dict(tree).items())


def is_text_encoder_key(name: str) -> bool:
  """Whether a weight file's tensor can belong to the text encoder (a filter for reading: an SD single file's
  U-Net, its EMA copy and the autoencoder are skipped)."""
  return not name.startswith(("model.diffusion_model.", "model_ema.", "first_stage_model."))


def select_text_encoder(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
  """(the text encoder's tensors with the prefix taken off, the prefix): those under
  'cond_stage_model.transformer.' when the file has any (SD 1.x single files), else all of them. ValueError (one
  line) for OpenCLIP's layout."""
  if any(k.startswith(OPEN_CLIP_PREFIX) for k in state):
    raise ValueError(f"the text encoder is in OpenCLIP's layout ({OPEN_CLIP_PREFIX}*, SD 2.x single files), which "
                     "is not read: use the text_encoder/ folder of a diffusers copy")
  if any(k.startswith(SD_PREFIX) for k in state):
    return {k[len(SD_PREFIX):]: v for k, v in state.items() if k.startswith(SD_PREFIX)}, SD_PREFIX
  return dict(state), ""


def _shape(state, key: str, ndim: int) -> tuple[int, ...]:
  if key not in state:
    raise ValueError(f"missing key {key!r}")
  shape = tuple(np.shape(state[key]))
  if len(shape) != ndim:
    raise ValueError(f"key {key!r} has shape {shape}, expected {ndim} dimensions")
  return shape


def infer_architecture(state: Mapping[str, np.ndarray]) -> dict:
  """ARCHITECTURE_FIELDS read from the shapes of an (unprefixed) state dict; ValueError (one line) when a witness
  key is missing."""
  layers = 0
  while f"text_model.encoder.layers.{layers}.layer_norm1.weight" in state:
    layers += 1
  vocab, width = _shape(state, _TOKENS, 2)
  return {"vocab_size": vocab, "hidden_size": width, "max_position_embeddings": _shape(state, _POSITIONS, 2)[0],
          "num_hidden_layers": layers,
          "intermediate_size": _shape(state, "text_model.encoder.layers.0.mlp.fc1.weight", 2)[0] if layers else None}


def model_architecture(model: CLIPTextModel) -> dict:
  return {f: getattr(model, f) for f in ARCHITECTURE_FIELDS}


def text_encoder_params(state: Mapping[str, np.ndarray], model: CLIPTextModel) -> tuple[dict, dict]:
  """A published CLIP text encoder's state dict (transformers' names, bare or under
  'cond_stage_model.transformer.') → (params, info): params our `model`'s parameter tree (numpy float32), info
  {'prefix', 'ignored': keys not read (the position-ids buffer)}. Checks as `sd_unet_keys.unet_params`: each
  failure one ValueError line naming the key; nothing is returned unless all of it holds."""
  state, prefix = select_text_encoder(state)
  if not state:
    raise ValueError("holds no text encoder tensors (text_model.*, optionally under "
                     f"{SD_PREFIX})")
  try:
    found = infer_architecture(state)
  except ValueError as e:
    raise ValueError(f"{e}{' (under ' + prefix + ')' if prefix else ''}") from None
  for field, expected in model_architecture(model).items():
    if found[field] is not None and found[field] != expected:
      raise ArchitectureMismatch(field, found[field], expected, what="text encoder")
  flat, used = {}, set()
  for path, shape in param_shapes(model).items():
    key = torch_key(path)
    if key not in state:
      raise ValueError(f"missing key {prefix + key!r}")
    value = state[key]
    if path[-1] == "embedding":  # [N, D] in both frameworks
      if np.asarray(value).dtype.kind != "f" or tuple(np.shape(value)) != shape:
        raise ValueError(f"key {prefix + key!r} has shape {tuple(np.shape(value))} and dtype "
                         f"{np.asarray(value).dtype}, expected {shape} floating point")
      flat[path] = np.ascontiguousarray(value, np.float32)
    else:
      flat[path] = torch_to_flax(value, shape, prefix + key)
    used.add(key)
  ignored = [k for k in state if k not in used and k == POSITION_IDS and np.asarray(state[k]).dtype.kind in "iu"]
  unknown = [k for k in state if k not in used and k not in ignored]
  if unknown:
    more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
    raise ValueError(f"unknown key {prefix + unknown[0]!r}{more} for a CLIP text encoder of {found}")
  return traverse_util.unflatten_dict(flat), {"prefix": prefix, "ignored": len(ignored)}


def text_encoder_state_dict(params, prefix: str = "") -> dict[str, np.ndarray]:
  """Our parameters → transformers' CLIPTextModel state dict (float32 numpy, C order), each name under `prefix`
  ('cond_stage_model.transformer.' writes SD 1.x's single-file layout): what `text_encoder_params` reads back
  exactly."""
  out = {}
  for path, value in traverse_util.flatten_dict(jax.device_get(params)).items():
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel":
      value = value.T
    out[prefix + torch_key(path)] = np.ascontiguousarray(value)
  return out
