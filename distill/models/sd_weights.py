"""Stable Diffusion's U-Net and text encoder from local files, without torch and without pickle.

  a diffusers pipeline folder   its unet/ and text_encoder/: config.json beside diffusion_pytorch_model.safetensors
                                (unet/) or model.safetensors (text_encoder/), fp16 variants and .bin through the
                                pickle-free torch reader (`distill.weights`)
  a unet/ or text_encoder/      the same, one model
  an SD single file             .safetensors (or .ckpt): the U-Net under model.diffusion_model.* (LDM's layout),
                                SD 1.x's text encoder under cond_stage_model.transformer.*; only those tensors are read

A folder's config.json gives the architecture (`sd_unet_from_diffusers_config`, `clip_text_from_config`); a single
file holds none, so its U-Net needs `model=` (SDUNet(**sd_unet.SD1), SD2, in_channels=9 for inpainting), while
its text encoder defaults to SD 1.x's (the only one stored under cond_stage_model.transformer.). The key maps
(`sd_unet_keys`, `clip_keys`) check every tensor against the model; each failure is one ValueError line.
"""
from __future__ import annotations

import json
import os

from etils import epath

from distill import weights
from distill.models import clip_keys, sd_unet_keys
from distill.models.clip_text import SD1_TEXT, CLIPTextModel, clip_text_from_config
from distill.models.sd_unet import SDUNet, sd_unet_from_diffusers_config

_MAX_CONFIG_BYTES = 1 << 20
# CLIPTextModelWithProjection's pooled-output projection [E, D]: refused by `load_text_encoder` (see there).
TEXT_PROJECTION = "text_projection.weight"


def read_config(path: str | os.PathLike) -> dict:
  """A config.json → dict; ValueError (one line naming the file) when it is not a JSON object."""
  p = epath.Path(path)
  if p.stat().length > _MAX_CONFIG_BYTES:
    raise ValueError(f"{path}: larger than a config.json's {_MAX_CONFIG_BYTES} bytes")
  try:
    config = json.loads(p.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not JSON ({str(e).splitlines()[0][:120]})") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path}: not a JSON object")
  return config


def _weights_and_config(path: str, subfolder: str) -> tuple[str, dict | None]:
  """(the weight file, its folder's config.json or None) of a folder or file."""
  if not epath.Path(path).is_dir():
    return path, None
  file = weights.diffusers_weight_file(path, subfolder)
  config = epath.Path(file).parent / "config.json"
  return file, read_config(config) if config.is_file() else None


def _where(error: ValueError, file: str) -> ValueError:
  message = str(error)
  return ValueError(message if message.startswith(file) else f"{file}: {message}")


def load_unet(path: str | os.PathLike, model: SDUNet | None = None, ema: bool = False,
              **overrides) -> tuple[SDUNet, dict, dict]:
  """(model, params, info) of the U-Net at `path` (the module docstring). model: None reads a folder's
  config.json (with `overrides` of SDUNet fields: dtype, …); a single file needs it. ema: an SD training
  checkpoint's EMA weights. info: `sd_unet_keys.unet_params`' and the file read. ValueError (one line)."""
  file, config = _weights_and_config(str(path), "unet")
  if model is None:
    if config is None:
      raise ValueError(f"{file}: a single file holds no U-Net config; pass model=SDUNet(**sd_unet.SD1) (or SD2; "
                       "in_channels=9 for inpainting)")
    try:
      model = sd_unet_from_diffusers_config(config, **overrides)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{epath.Path(file).parent / 'config.json'}: {e}") from None
  state = weights.read_state_dict(file, select=sd_unet_keys.is_unet_key)
  try:
    params, info = sd_unet_keys.unet_params(state, model, ema=ema)
  except ValueError as e:
    raise _where(e, file) from None
  return model, params, {**info, "file": file}


def load_text_encoder(path: str | os.PathLike, model: CLIPTextModel | None = None,
                      **overrides) -> tuple[CLIPTextModel, dict, dict]:
  """(model, params, info) of the text encoder at `path` (the module docstring). model: None reads a folder's
  config.json (with `overrides`: dtype), or takes SD 1.x's for a single file. ValueError (one line); a file
  holding `text_projection.weight` is refused rather than read without it: it is CLIPTextModelWithProjection
  (SDXL's text_encoder_2, or a CLIP model's text half), whose U-Nets also read the projected pooled output, so
  dropping the projection silently would condition a U-Net on less than it was trained with."""
  file, config = _weights_and_config(str(path), "text_encoder")
  if model is None:
    try:
      model = clip_text_from_config(config if config is not None else SD1_TEXT, **overrides)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{epath.Path(file).parent / 'config.json'}: {e}") from None
  state = weights.read_state_dict(file, select=clip_keys.is_text_encoder_key)
  projection = next((k for k in state if k.endswith(TEXT_PROJECTION)), None)
  if projection is not None:
    raise ValueError(f"{file}: key {projection!r} is CLIPTextModelWithProjection's projection of the pooled output "
                     "(SDXL's second text encoder, CLIP's contrastive head), not an SD 1.x/2.x text encoder: their "
                     "U-Net cross-attends to the last hidden states, which no projection touches; use an SD 1.x/2.x "
                     "text_encoder/")
  try:
    params, info = clip_keys.text_encoder_params(state, model)
  except ValueError as e:
    raise _where(e, file) from None
  return model, params, {**info, "file": file}
