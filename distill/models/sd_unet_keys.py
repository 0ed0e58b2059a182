"""Stable Diffusion's published U-Net weights ↔ `SDUNet`'s parameters.

Two torch layouts (convs [O, I, kh, kw], linears [out, in]; n = layers_per_block, L levels):

  'diffusers'  diffusers' UNet2DConditionModel (a `unet/` folder): conv_in; time_embedding.{linear_1, linear_2};
               down_blocks.{i}.resnets.{j}.{norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut};
               down_blocks.{i}.attentions.{j}.{norm, proj_in, transformer_blocks.{k}.{norm1, attn1, norm2, attn2,
               norm3, ff.net.0.proj, ff.net.2}, proj_out}, each attention's {to_q, to_k, to_v, to_out.0};
               down_blocks.{i}.downsamplers.0.conv; mid_block.{resnets.0, attentions.0, resnets.1};
               up_blocks.{i}.{resnets.{j}, attentions.{j}, upsamplers.0.conv}; conv_norm_out; conv_out.
  'ldm'        LDM's openaimodel.UNetModel (SD's single files, under 'model.diffusion_model.'): input_blocks.0.0
               (conv_in); time_embed.{0, 2}; input_blocks.{1 + i(n+1) + j}.0 for down resnet j of level i, with
               {in_layers.0, in_layers.2, emb_layers.1, out_layers.0, out_layers.3, skip_connection} for {norm1,
               conv1, time_emb_proj, norm2, conv2, conv_shortcut}; input_blocks.{1 + i(n+1) + j}.1 its attention
               (named as diffusers names it inside); input_blocks.{(i+1)(n+1)}.0.op the downsampler;
               middle_block.{0, 1, 2}; output_blocks.{i(n+1) + j}.{0, 1} up resnet and attention j of up block i,
               output_blocks.{i(n+1) + n}.{2 or 1}.conv its upsampler (2 after an attention); out.{0, 2}.

SD 1.x's proj_in / proj_out are 1×1 convs [C, C, 1, 1] in both layouts, SD 2.x's linears [C, C]. Our parameters
follow diffusers' Flax names (`sd_unet.py`): kernels [kh, kw, I, O] and [in, out], GroupNorm and LayerNorm
scale/bias. An SD single file's other parts (autoencoder, text encoder, schedule buffers) are not read; its EMA
copy (`model_ema.` + the key without dots, in SD's training checkpoints) is read instead with ema=True.

Read from the shapes and compared with the model's (`ArchitectureMismatch`, one line naming the field):
in_channels, out_channels, block_out_channels, layers_per_block, which levels attend (down_block_types,
up_block_types), cross_attention_dim, use_linear_projection. Heads and GroupNorm groups cannot be read from
shapes and are the model's (SD 1.x: 8 heads; SD 2.x: (5, 10, 20, 20); groups 32). Every other disagreement — an
unknown key, a missing one, a shape or dtype that does not fit — is one ValueError line naming the key as the
file spells it, raised before anything is returned.
"""
from __future__ import annotations

import functools
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from distill.models.sd_keys import ArchitectureMismatch, torch_to_flax
from distill.models.sd_unet import CROSS_ATTN_DOWN, CROSS_ATTN_UP, DOWN, UP, SDUNet

LAYOUTS = ("ldm", "diffusers")
SD_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
ARCHITECTURE_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                       "up_block_types", "cross_attention_dim", "use_linear_projection")

_NUMBERED = re.compile(r"(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|transformer_blocks|"
                       r"to_out|net)_(\d+)$")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_DIFFUSERS = {v: k for k, v in _RESNET_LDM.items()}
_TOP_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_TOP_DIFFUSERS = {v: k for k, v in _TOP_LDM.items()}


def diffusers_key(path: tuple[str, ...]) -> str:
  """Our parameter path ('down_blocks_0', 'attentions_0', 'transformer_blocks_0', 'attn1', 'to_out_0', 'kernel')
  → diffusers' torch name ('down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight')."""
  *modules, leaf = path
  return ".".join([_NUMBERED.sub(r"\1.\2", m) for m in modules] + [_LEAF[leaf]])


def ldm_key(key: str, layers_per_block: int, up_attends: tuple[bool, ...]) -> str:
  """A diffusers U-Net name → LDM's (unprefixed), for a U-Net of n = layers_per_block whose up block i attends
  when up_attends[i] (where its upsampler sits). ValueError (one line) for a name outside the layout."""
  n1 = layers_per_block + 1
  for ours, theirs in _TOP_LDM.items():
    if key.startswith(ours + "."):
      return theirs + key[len(ours):]
  m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
  if m:
    part, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    down = part == "down_blocks"
    if kind == "downsamplers" and rest.startswith("conv."):
      return f"input_blocks.{(i + 1) * n1}.0.op.{rest[len('conv.'):]}"
    if kind == "upsamplers" and rest.startswith("conv."):
      return f"output_blocks.{i * n1 + layers_per_block}.{2 if up_attends[i] else 1}.{rest}"
    index = 1 + i * n1 + j if down else i * n1 + j
    blocks = "input_blocks" if down else "output_blocks"
    if kind == "resnets":
      return f"{blocks}.{index}.0.{_ldm_resnet(rest, key)}"
    if kind == "attentions":
      return f"{blocks}.{index}.1.{rest}"
  m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", key)
  if m:
    if m[1] == "attentions":
      return f"middle_block.1.{m[3]}"
    return f"middle_block.{2 * int(m[2])}.{_ldm_resnet(m[3], key)}"
  raise ValueError(f"key {key!r} has no place in LDM's U-Net layout")


def _ldm_resnet(rest: str, key: str) -> str:
  name, _, leaf = rest.partition(".")
  if name not in _RESNET_LDM:
    raise ValueError(f"key {key!r} has no place in LDM's U-Net layout")
  return f"{_RESNET_LDM[name]}.{leaf}"


def ldm_layers_per_block(keys) -> int:
  """n of an (unprefixed) LDM U-Net from its keys: the first downsampler sits at input_blocks.{n+1}.0.op; a
  U-Net of one level has none, and input_blocks 1 … n."""
  ops = [int(m[1]) for k in keys if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.weight", k))]
  if ops:
    return min(ops) - 1
  blocks = [int(m[1]) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))]
  return max(blocks, default=0)


def diffusers_key_of_ldm(key: str, layers_per_block: int) -> str | None:
  """An (unprefixed) LDM U-Net name → diffusers', or None for a name outside the layout."""
  n1 = layers_per_block + 1
  for theirs, ours in _TOP_DIFFUSERS.items():
    if key.startswith(theirs + "."):
      return ours + key[len(theirs):]
  m = re.fullmatch(r"(input_blocks|output_blocks|middle_block)\.(\d+)\.(\d)\.(.+)", key)
  if not m:
    m = re.fullmatch(r"(middle_block)\.(\d)\.(.+)", key)
    if not m:
      return None
    k, rest = int(m[2]), m[3]
    if k == 1:
      return f"mid_block.attentions.0.{rest}"
    return _diffusers_resnet(f"mid_block.resnets.{k // 2}", rest) if k in (0, 2) else None
  blocks, k, sub, rest = m[1], int(m[2]), int(m[3]), m[4]
  if blocks == "middle_block":
    return None
  if blocks == "input_blocks":
    if k == 0:
      return None
    if k % n1 == 0:  # a downsampler: input_blocks.{(i+1)(n+1)}.0.op
      return f"down_blocks.{k // n1 - 1}.downsamplers.0.conv.{rest[3:]}" if sub == 0 and rest.startswith(
          "op.") else None
    i, j = (k - 1) // n1, (k - 1) % n1
    if sub == 0:
      return _diffusers_resnet(f"down_blocks.{i}.resnets.{j}", rest)
    return f"down_blocks.{i}.attentions.{j}.{rest}" if sub == 1 else None
  i, j = k // n1, k % n1
  if sub == 0:
    return _diffusers_resnet(f"up_blocks.{i}.resnets.{j}", rest)
  if rest.startswith("conv.") and j == n1 - 1 and sub in (1, 2):
    return f"up_blocks.{i}.upsamplers.0.{rest}"
  return f"up_blocks.{i}.attentions.{j}.{rest}" if sub == 1 else None


def _diffusers_resnet(base: str, rest: str) -> str | None:
  for theirs, ours in _RESNET_DIFFUSERS.items():
    if rest.startswith(theirs + "."):
      return f"{base}.{ours}{rest[len(theirs):]}"
  return None


def param_shapes(model: SDUNet) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path: shape} of every parameter of `model` (traced once per model, nothing computed)."""
  return dict(_param_shapes(model))


@functools.lru_cache(maxsize=8)
def _param_shapes(model: SDUNet) -> tuple:
  side = model.downsampling
  tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, side, side, model.in_channels)),
                        jnp.zeros((1,)), jnp.zeros((1, 1, model.cross_attention_dim)))["params"]
  return tuple((path, tuple(leaf.shape)) for path, leaf in traverse_util.flatten_dict(tree).items())


def is_unet_key(name: str) -> bool:
  """Whether a weight file's tensor can belong to the U-Net or its EMA copy (a filter for reading: an SD single
  file's autoencoder and text encoder are skipped)."""
  return not name.startswith(("first_stage_model.", "cond_stage_model."))


def find_layout(state: Mapping[str, np.ndarray]) -> tuple[str, str]:
  """(layout, prefix) of a U-Net state dict: 'ldm' under 'model.diffusion_model.' (an SD single file) or bare,
  'diffusers' bare. ValueError (one line) when neither."""
  if any(k.startswith(SD_PREFIX) for k in state):
    return "ldm", SD_PREFIX
  if "input_blocks.0.0.weight" in state:
    return "ldm", ""
  if "conv_in.weight" in state:
    return "diffusers", ""
  first = next(iter(state), None)
  if first is None:
    raise ValueError("holds no tensors")
  raise ValueError(f"neither an SD single file ({SD_PREFIX}*), LDM's U-Net (input_blocks.0.0.weight) nor "
                   f"diffusers' (conv_in.weight); its first key is {first!r}")


def _shape(state, key: str, ndim: tuple[int, ...], what: str) -> tuple[int, ...]:
  if key not in state:
    raise ValueError(f"missing key {key!r}")
  shape = tuple(np.shape(state[key]))
  if len(shape) not in ndim:
    raise ValueError(f"key {key!r} has shape {shape}, expected {what}")
  return shape


def infer_architecture(named: Mapping[str, np.ndarray]) -> dict:
  """ARCHITECTURE_FIELDS read from the shapes of a state dict in diffusers' names; ValueError (one line) when a
  witness key is missing."""
  levels = 0
  while f"down_blocks.{levels}.resnets.0.conv1.weight" in named:
    levels += 1
  if not levels:
    raise ValueError("missing key 'down_blocks.0.resnets.0.conv1.weight'")
  layers = 0
  while f"down_blocks.0.resnets.{layers}.conv1.weight" in named:
    layers += 1
  conv = (4,), "a conv weight [O, I, kh, kw]"
  found = {"in_channels": _shape(named, "conv_in.weight", *conv)[1],
           "out_channels": _shape(named, "conv_out.weight", *conv)[0],
           "block_out_channels": tuple(_shape(named, f"down_blocks.{i}.resnets.0.conv1.weight", *conv)[0]
                                       for i in range(levels)),
           "layers_per_block": layers,
           "down_block_types": tuple(CROSS_ATTN_DOWN if f"down_blocks.{i}.attentions.0.norm.weight" in named else DOWN
                                     for i in range(levels)),
           "up_block_types": tuple(CROSS_ATTN_UP if f"up_blocks.{i}.attentions.0.norm.weight" in named else UP
                                   for i in range(levels))}
  cross = sorted(k for k in named if k.endswith(".attn2.to_k.weight"))
  proj = sorted(k for k in named if k.endswith(".proj_in.weight"))
  found["cross_attention_dim"] = _shape(named, cross[0], (2,), "a linear weight [out, in]")[1] if cross else None
  found["use_linear_projection"] = len(_shape(named, proj[0], (2, 4), "a linear [C, C] or 1x1 conv [C, C, 1, 1] "
                                              "weight")) == 2 if proj else None
  return found


def model_architecture(model: SDUNet) -> dict:
  """`infer_architecture`'s fields of our model."""
  return {"in_channels": model.in_channels, "out_channels": model.out_channels,
          "block_out_channels": tuple(model.block_out_channels), "layers_per_block": model.layers_per_block,
          "down_block_types": tuple(model.down_block_types), "up_block_types": tuple(model.up_block_types),
          "cross_attention_dim": model.cross_attention_dim, "use_linear_projection": model.use_linear_projection}


def _file_names(state: Mapping[str, np.ndarray], layout: str, prefix: str) -> dict[str, str]:
  """{diffusers name: the file's name} of an LDM or diffusers U-Net; ValueError (one line) for a key outside
  the layout."""
  if layout == "diffusers":
    return {k: k for k in state}
  bare = [k[len(prefix):] for k in state if k.startswith(prefix)]
  layers = ldm_layers_per_block(bare)
  names = {}
  for k in bare:
    name = diffusers_key_of_ldm(k, layers)
    if name is None:
      raise ValueError(f"unknown key {prefix + k!r}: not a tensor of LDM's U-Net layout")
    if name in names:
      raise ValueError(f"keys {names[name]!r} and {prefix + k!r} are the same tensor ({name})")
    names[name] = prefix + k
  return names


def _ema_name(file_key: str) -> str:
  """SD's training checkpoints keep the EMA of 'model.diffusion_model.a.b' as 'model_ema.diffusion_modelab'."""
  return EMA_PREFIX + "".join(file_key.split(".")[1:])


def unet_params(state: Mapping[str, np.ndarray], model: SDUNet, ema: bool = False) -> tuple[dict, dict]:
  """A published U-Net's state dict (diffusers' names, or LDM's bare or under 'model.diffusion_model.') → (params,
  info): params our `model`'s parameter tree (numpy float32), info {'layout', 'prefix', 'ema', 'ignored': the
  number of the file's keys not read (other parts of an SD single file)}. ema=True reads an SD training
  checkpoint's EMA copy of the weights (model_ema.*) in place of model.diffusion_model.*.

  Checks, in order, each one ValueError line: the layout; every key inside it; the architecture the shapes
  show against the model's (`ArchitectureMismatch`); every parameter present with its shape and a float dtype;
  no key left over. Nothing is returned unless all of it holds."""
  layout, prefix = find_layout(state)
  if ema and prefix != SD_PREFIX:
    raise ValueError(f"ema=True reads an SD single file's EMA weights ({EMA_PREFIX}*); this is a bare {layout} "
                     "U-Net")
  names = _file_names(state, layout, prefix)
  if ema:
    missing = [f for f in names.values() if _ema_name(f) not in state]
    if missing:
      raise ValueError(f"missing key {_ema_name(missing[0])!r} (the EMA copy of {missing[0]!r})")
    names = {d: _ema_name(f) for d, f in names.items()}
  named = {d: state[f] for d, f in names.items()}
  try:
    found = infer_architecture(named)
  except ValueError as e:
    raise ValueError(f"{e} (layout {layout!r}{', under ' + prefix if prefix else ''})") from None
  for field, expected in model_architecture(model).items():
    if found[field] is not None and found[field] != expected:
      raise ArchitectureMismatch(field, found[field], expected, what="U-Net")
  up_attends = tuple(t == CROSS_ATTN_UP for t in model.up_block_types)
  flat, used = {}, set()
  for path, shape in param_shapes(model).items():
    key = diffusers_key(path)
    if key not in named:
      spelled = key if layout == "diffusers" else prefix + ldm_key(key, model.layers_per_block, up_attends)
      raise ValueError(f"missing key {(_ema_name(spelled) if ema else spelled)!r} (layout {layout!r})")
    flat[path] = torch_to_flax(named[key], shape, names[key])
    used.add(key)
  unknown = [names[k] for k in named if k not in used]
  if unknown:
    more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
    raise ValueError(f"unknown key {unknown[0]!r}{more} for a U-Net of {found}")
  read = set(names.values())
  info = {"layout": layout, "prefix": prefix, "ema": ema, "ignored": sum(k not in read for k in state)}
  return traverse_util.unflatten_dict(flat), info


def unet_state_dict(params, model: SDUNet, layout: str = "diffusers", prefix: str | None = None,
                    ema: bool = False) -> dict[str, np.ndarray]:
  """Our parameters → a torch state dict in `layout` (float32 numpy, C order), each name under `prefix` (default:
  'model.diffusion_model.' for 'ldm', '' for 'diffusers'); ema=True writes LDM's EMA names (model_ema.*) instead.
  What `unet_params` reads back exactly. For exporting to torch code and for tests."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: allowed {', '.join(map(repr, LAYOUTS))}")
  prefix = (SD_PREFIX if layout == "ldm" else "") if prefix is None else prefix
  if ema and (layout, prefix) != ("ldm", SD_PREFIX):
    raise ValueError(f"ema=True writes an SD single file's EMA names: layout 'ldm' under {SD_PREFIX!r}")
  up_attends = tuple(t == CROSS_ATTN_UP for t in model.up_block_types)
  out = {}
  for path, value in traverse_util.flatten_dict(jax.device_get(params)).items():
    value = np.asarray(value, np.float32)
    value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2 else value
    key = diffusers_key(path)
    name = prefix + (ldm_key(key, model.layers_per_block, up_attends) if layout == "ldm" else key)
    out[_ema_name(name) if ema else name] = np.ascontiguousarray(value)
  return out
