"""Stable Diffusion's and LDM's published autoencoder weights ↔ `AutoencoderKL`'s parameters.

Three torch layouts (convs [O, I, kh, kw], linears [out, in]; L = len(block_out_channels) levels):

  'diffusers'         diffusers' PyTorch AutoencoderKL (a `vae/` folder): {encoder,decoder}.{conv_in, conv_norm_out,
                      conv_out}; encoder.down_blocks.{i}.resnets.{j}.{norm1, conv1, norm2, conv2, conv_shortcut},
                      encoder.down_blocks.{i}.downsamplers.0.conv; {encoder,decoder}.mid_block.{resnets.0,
                      attentions.0, resnets.1}, the attention's {group_norm, to_q, to_k, to_v, to_out.0} (Linear);
                      decoder.up_blocks.{i}.{resnets.{j}, upsamplers.0.conv}; quant_conv, post_quant_conv.
  'diffusers_legacy'  the same, attention as {group_norm, query, key, value, proj_attn} (files of diffusers < 0.14).
  'ldm'               LDM's and SD's single files (ldm/modules/diffusionmodules/model.py): encoder.down.{i}.block.{j}.
                      {norm1, conv1, norm2, conv2, nin_shortcut}, encoder.down.{i}.downsample.conv;
                      {encoder,decoder}.mid.{block_1, attn_1, block_2}, attn_1.{norm, q, k, v, proj_out} (1×1 convs,
                      [C, C, 1, 1]); {encoder,decoder}.{conv_in, norm_out, conv_out}; decoder.up.{L−1−i}.{block.{j},
                      upsample.conv} for our up_blocks_{i} (LDM numbers the decoder's levels by resolution, as the
                      encoder's; diffusers by the order they run); quant_conv, post_quant_conv.

Our parameters follow diffusers' Flax names (`autoencoder.py`): kernels [kh, kw, I, O] and [in, out], GroupNorm
scale/bias. Any layout may sit under 'first_stage_model.' (SD's single-file checkpoints; the file's other parts
— U-Net, text encoder, EMA — are not read). LDM's autoencoder training checkpoints also hold 'loss.*' (LPIPS and
the discriminator): ignored. The architecture (channels, widths, resnets per level, latent channels) is read from
the shapes; the GroupNorm group count cannot be and is the model's (SD: 32). Every other disagreement — an unknown
key, a missing one, a shape or dtype that does not fit — is one ValueError line naming the key, raised before
anything is returned.
"""
from __future__ import annotations

import functools
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from distill.models.autoencoder import AutoencoderKL

LAYOUTS = ("ldm", "diffusers", "diffusers_legacy")
SD_PREFIX = "first_stage_model."
IGNORED = ("loss.",)  # LDM autoencoder checkpoints: training-only modules
ARCHITECTURE_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels")

_NUMBERED = re.compile(r"(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers)_(\d+)$")
_TO_Q = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_NAMES = {"conv_shortcut": "nin_shortcut", "conv_norm_out": "norm_out", "mid_block": "mid", "group_norm": "norm",
              "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out", "downsamplers_0": "downsample",
              "upsamplers_0": "upsample", "attentions_0": "attn_1"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# Where each layout keeps the first resnet's conv1 of level i and its j-th resnet (the architecture's witness).
_LEVEL_CONV = {"ldm": "encoder.down.{i}.block.{j}.conv1.weight",
               "diffusers": "encoder.down_blocks.{i}.resnets.{j}.conv1.weight"}


class ArchitectureMismatch(ValueError):
  """The file's network (`what`: autoencoder, U-Net, text encoder) is another architecture than the model's:
  `field` (of ARCHITECTURE_FIELDS, or the U-Net's and text encoder's own), the file's value `found` and the
  model's `expected`."""

  def __init__(self, field: str, found, expected, what: str = "autoencoder"):
    super().__init__(f"the file's {what} has {field}={found} where the model has {expected}")
    self.field, self.found, self.expected = field, found, expected


def torch_key(path: tuple[str, ...], layout: str, levels: int) -> str:
  """Our parameter path ('encoder', 'down_blocks_0', 'resnets_0', 'conv1', 'kernel') -> the layout's torch name
  ('encoder.down.0.block.0.conv1.weight' in 'ldm'); levels: L, which LDM's decoder numbering needs."""
  *modules, leaf = path
  out = []
  for k, m in enumerate(modules):
    match = _NUMBERED.match(m)
    kind, n = (match[1], int(match[2])) if match else (m, -1)
    if layout != "ldm":
      attention = k > 0 and modules[k - 1] == "attentions_0" and layout == "diffusers"
      out.append(f"{kind}.{n}" if match else (_TO_Q.get(m, m) if attention else m))
    elif kind == "down_blocks":
      out += ["down", str(n)]
    elif kind == "up_blocks":
      out += ["up", str(levels - 1 - n)]
    elif kind == "resnets":
      out += [f"block_{n + 1}"] if modules[k - 1] == "mid_block" else ["block", str(n)]
    else:
      out.append(_LDM_NAMES.get(m, m))
  return ".".join(out + [_LEAF[leaf]])


def param_shapes(model: AutoencoderKL) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path: shape} of every parameter of `model` (traced once per model, nothing computed)."""
  return dict(_param_shapes(model))


@functools.lru_cache(maxsize=8)
def _param_shapes(model: AutoencoderKL) -> tuple:
  side = model.downsampling
  tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, side, side, model.in_channels)))["params"]
  return tuple((path, tuple(leaf.shape)) for path, leaf in traverse_util.flatten_dict(tree).items())


def select_autoencoder(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
  """(the autoencoder's tensors with the prefix taken off, the prefix): those under 'first_stage_model.' when
  the file has any (SD's single files), else all of them."""
  if any(k.startswith(SD_PREFIX) for k in state):
    return {k[len(SD_PREFIX):]: v for k, v in state.items() if k.startswith(SD_PREFIX)}, SD_PREFIX
  return dict(state), ""


def is_autoencoder_key(name: str) -> bool:
  """Whether a weight file's tensor can belong to the autoencoder (a filter for reading only those)."""
  bare = name[len(SD_PREFIX):] if name.startswith(SD_PREFIX) else name
  return bare.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", *IGNORED))


def find_layout(state: Mapping[str, np.ndarray]) -> str:
  """Which of LAYOUTS an (unprefixed) autoencoder state dict is in; ValueError (one line) when none."""
  if _LEVEL_CONV["ldm"].format(i=0, j=0) in state:
    return "ldm"
  if _LEVEL_CONV["diffusers"].format(i=0, j=0) in state:
    legacy = any(".attentions.0.query." in k for k in state)
    return "diffusers_legacy" if legacy else "diffusers"
  first = next(iter(state), None)
  if first is None:
    raise ValueError("holds no autoencoder tensors (encoder.*, decoder.*, quant_conv.*, post_quant_conv.*, "
                     f"optionally under {SD_PREFIX})")
  raise ValueError(f"neither LDM's autoencoder layout ({_LEVEL_CONV['ldm'].format(i=0, j=0)}) nor diffusers' "
                   f"({_LEVEL_CONV['diffusers'].format(i=0, j=0)}); its first key is {first!r}")


def _conv_weight(state, key: str) -> tuple[int, ...]:
  if key not in state:
    raise ValueError(f"missing key {key!r}")
  shape = tuple(np.shape(state[key]))
  if len(shape) != 4:
    raise ValueError(f"key {key!r} has shape {shape}, expected a conv weight [O, I, kh, kw]")
  return shape


def infer_architecture(state: Mapping[str, np.ndarray], layout: str) -> dict:
  """{in_channels, out_channels, block_out_channels (tuple), layers_per_block, latent_channels} read from the
  shapes of an (unprefixed) state dict in `layout`; ValueError (one line) when a witness key is missing."""
  level = _LEVEL_CONV["ldm" if layout == "ldm" else "diffusers"]
  levels = 0
  while level.format(i=levels, j=0) in state:
    levels += 1
  layers = 0
  while level.format(i=0, j=layers) in state:
    layers += 1
  if not levels:
    raise ValueError(f"missing key {level.format(i=0, j=0)!r}")
  return {"in_channels": _conv_weight(state, "encoder.conv_in.weight")[1],
          "out_channels": _conv_weight(state, "decoder.conv_out.weight")[0],
          "block_out_channels": tuple(_conv_weight(state, level.format(i=i, j=0))[0] for i in range(levels)),
          "layers_per_block": layers,
          "latent_channels": _conv_weight(state, "post_quant_conv.weight")[0]}


def model_architecture(model: AutoencoderKL) -> dict:
  """`infer_architecture`'s fields of our model (its decoder writes as many channels as the encoder reads)."""
  return {"in_channels": model.in_channels, "out_channels": model.in_channels,
          "block_out_channels": tuple(model.block_out_channels), "layers_per_block": model.layers_per_block,
          "latent_channels": model.latent_channels}


def torch_to_flax(value: np.ndarray, shape: tuple[int, ...], key: str) -> np.ndarray:
  """A torch tensor -> our leaf of `shape`: conv [O, I, kh, kw] -> [kh, kw, I, O]; linear [out, in] or 1×1 conv
  [out, in, 1, 1] -> Dense [in, out]; vectors unchanged. float32."""
  value = np.asarray(value)
  if value.dtype.kind != "f":
    raise ValueError(f"key {key!r} has dtype {value.dtype}, expected floating point")
  if len(shape) == 4:
    want = (shape[3], shape[2], shape[0], shape[1])
    converted = value.transpose(2, 3, 1, 0) if value.shape == want else None
  elif len(shape) == 2:
    want = (shape[1], shape[0])
    squeezed = value[:, :, 0, 0] if value.shape == want + (1, 1) else value
    converted = squeezed.T if squeezed.shape == want else None
  else:
    want = shape
    converted = value if value.shape == want else None
  if converted is None:
    raise ValueError(f"key {key!r} has shape {value.shape}, expected {want}"
                     + (" (or a 1x1 conv's [out, in, 1, 1])" if len(shape) == 2 else ""))
  return np.ascontiguousarray(converted, np.float32)


def autoencoder_params(state: Mapping[str, np.ndarray], model: AutoencoderKL) -> tuple[dict, dict]:
  """A published autoencoder's state dict (any of LAYOUTS, prefixed or not) -> (params, info): params our
  `model`'s parameter tree (numpy float32), info {'layout', 'prefix', 'ignored': keys not read (loss.*)}.

  Checks, in order, each one ValueError line naming the key: the layout; the architecture the shapes show
  against the model's (`ArchitectureMismatch`); every parameter present with its shape and a float dtype;
  no key left over. Nothing is returned unless all of it holds."""
  state, prefix = select_autoencoder(state)
  layout = find_layout(state)
  try:
    found = infer_architecture(state, layout)
  except ValueError as e:
    raise ValueError(f"{e} (layout {layout!r}{', under ' + prefix if prefix else ''})") from None
  for field, expected in model_architecture(model).items():
    if found[field] != expected:
      raise ArchitectureMismatch(field, found[field], expected)
  levels = len(model.block_out_channels)
  flat, used = {}, set()
  for path, shape in param_shapes(model).items():
    key = torch_key(path, layout, levels)
    if key not in state:
      raise ValueError(f"missing key {prefix + key!r} (layout {layout!r})")
    flat[path] = torch_to_flax(state[key], shape, prefix + key)
    used.add(key)
  ignored = [k for k in state if k not in used and layout == "ldm" and k.startswith(IGNORED)]
  unknown = [k for k in state if k not in used and k not in ignored]
  if unknown:
    inside = re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", unknown[0])
    why = (": attention inside the levels (LDM's attn_resolutions) is not part of this autoencoder" if inside else
           f" for an AutoencoderKL of {found}")
    more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
    raise ValueError(f"unknown key {prefix + unknown[0]!r}{more}{why}")
  info = {"layout": layout, "prefix": prefix, "ignored": len(ignored)}
  return traverse_util.unflatten_dict(flat), info


def state_dict_of(params, layout: str = "ldm", prefix: str = "") -> dict[str, np.ndarray]:
  """Our parameters -> a torch state dict in `layout` (float32 numpy, C order; LDM's attention as 1×1 convs),
  each name under `prefix` ('first_stage_model.' writes SD's single-file layout): what `autoencoder_params`
  reads back exactly. For exporting to torch code."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: allowed {', '.join(map(repr, LAYOUTS))}")
  flat = traverse_util.flatten_dict(jax.device_get(params))
  levels = len({path[1] for path in flat if path[0] == "encoder" and path[1].startswith("down_blocks_")})
  out = {}
  for path, value in flat.items():
    value = np.asarray(value, np.float32)
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:
      value = value.T[:, :, None, None] if layout == "ldm" else value.T
    out[prefix + torch_key(path, layout, levels)] = np.ascontiguousarray(value)
  return out
