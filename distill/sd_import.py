"""A Stable Diffusion diffusers folder as this framework's text encoder and CFG teacher (guided-distillation paper
§4.2.3 and App. C.2: the teacher is a pretrained SD model, fine-tuned ε → v, then distilled).

  folder/model_index.json             (optional: any folder with unet/ and text_encoder/ is one, `is_sd_folder`)
  folder/unet/config.json + weights   → the teacher's U-Net: `teacher_from_sd`
  folder/text_encoder/ + tokenizer/   → the frozen text encoder every condition goes through: `SDTextEncoder`
  folder/scheduler/scheduler_config.json → what the teacher predicts (ε or v) and the check that its noise schedule
                                        is the one `model.schedule='scaled_linear_beta'` computes

Only the diffusers folder layout is read here (a single `.safetensors` holds no tokenizer and no scheduler);
`distill.models.sd_weights` reads the tensors, without torch and without pickle. Every refusal is one ValueError
line naming the file and the field.

The U-Net cross-attends to the text encoder's last hidden states [L = 77, D] (768 for SD 1.x's CLIP ViT-L, 1024 for
SD 2.x's OpenCLIP ViT-H). The unconditional rows of classifier-free guidance use the empty prompt's hidden states:
a teacher made here starts with `null_context` = those states, exactly what SD's pipelines feed as the negative
prompt, so the imported teacher's CFG equals SD's at s = 1 + w.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
from etils import epath

from distill import batching, models
from distill.models import clip_tokenizer, sd_weights

# diffusers' scheduler config → our names. SD 1.x and 2.x-base predict ε; SD 2.x (768) predicts v.
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}
# What schedules.get_logsnr_fn('scaled_linear_beta') computes: SD's training noise schedule.
SCALED_LINEAR = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                 "num_train_timesteps": 1000}
SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")


def is_sd_folder(path) -> bool:
  """Whether `path` is a diffusers Stable Diffusion pipeline folder: model_index.json, or unet/ and text_encoder/."""
  p = epath.Path(path)
  try:
    return p.is_dir() and ((p / "model_index.json").is_file()
                           or ((p / "unet").is_dir() and (p / "text_encoder").is_dir()))
  except OSError:
    return False


def _require_folder(folder) -> str:
  folder = os.fspath(folder)
  if not epath.Path(folder).is_dir():
    raise ValueError(f"{folder}: not a directory (a Stable Diffusion diffusers folder with unet/, text_encoder/, "
                     "tokenizer/ and scheduler/ is needed)")
  if not is_sd_folder(folder):
    raise ValueError(f"{folder}: not a Stable Diffusion diffusers folder (no model_index.json, nor unet/ and "
                     "text_encoder/)")
  return folder


class SDTokenizer:
  """CLIP's tokenizer of an SD folder in the framework's tokenizer API: encode(texts) → int32 [N, max_length],
  empty() → int32 [max_length] (the empty prompt: BOS, EOS, padding)."""

  def __init__(self, tokenizer: clip_tokenizer.CLIPTokenizer):
    self.clip = tokenizer
    self.max_length = int(tokenizer.max_length)

  def encode(self, texts) -> np.ndarray:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
      return np.zeros((0, self.max_length), np.int32)
    return np.asarray(self.clip(texts), np.int32)

  def empty(self) -> np.ndarray:
    return self.encode([""])[0]


class SDTextEncoder:
  """An SD folder's frozen text encoder, with the API of `distill.text_encoder_io.TextEncoder` that training
  needs: tokenizer (`SDTokenizer`), hidden_size (D), hidden_states(tokens [N, L]) → float32 [N, L, D] (jitted,
  in batches of `batch_size` rows padded to one compiled shape), encode(texts) and caption_tokens(split).

  caption_tokens(split) tokenizes the captions of an image-text source (`distill.image_text`, data.name=
  'image_text'): pass its data config as `data_config`; without one it is a ValueError saying so. score() is a
  ValueError: an SD folder holds no image tower (CLIP scores need the matching CLIP vision model)."""

  def __init__(self, text_model, text_params, tokenizer: SDTokenizer, *, folder: str = "", info: dict | None = None,
               data_config=None, batch_size: int = 64):
    self.text_model, self.text_params, self.tokenizer = text_model, jax.device_put(text_params), tokenizer
    self.hidden_size = int(text_model.hidden_size)
    self.folder, self.info, self.data_config, self.batch_size = folder, dict(info or {}), data_config, int(batch_size)
    if tokenizer.max_length > text_model.max_position_embeddings:
      raise ValueError(f"{folder}: the tokenizer pads to {tokenizer.max_length} tokens but the text encoder has "
                       f"{text_model.max_position_embeddings} positions")

  @functools.cached_property
  def _hidden_fn(self):
    return jax.jit(lambda p, t: self.text_model.apply({"params": p}, t)[0])

  def encode(self, texts) -> np.ndarray:
    """N texts → int32 [N, L]."""
    return self.tokenizer.encode(texts)

  def hidden_states(self, tokens) -> np.ndarray:
    """tokens int [N, L] → float32 [N, L, D]: the last hidden state (after the final LayerNorm), what SD's U-Net
    cross-attends to. Rows go through in batches of `batch_size` (the last padded), one compilation."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != self.tokenizer.max_length or not np.issubdtype(tokens.dtype,
                                                                                           np.integer):
      raise ValueError(f"tokens must be integers [N, {self.tokenizer.max_length}], got shape {tokens.shape} "
                       f"({tokens.dtype})")
    if not len(tokens):
      return np.zeros((0, tokens.shape[1], self.hidden_size), np.float32)
    return np.asarray(batching.in_batches(lambda t: self._hidden_fn(self.text_params, t), tokens.astype(np.int32),
                                          self.batch_size), np.float32)

  def caption_tokens(self, split: str) -> np.ndarray:
    """int32 [N, L]: the tokens of the captions of the image-text source's rows of `split`, in row order."""
    return self.encode(self.captions(split))

  def captions(self, split: str) -> list[str]:
    """The caption strings of the image-text source's rows of `split`, in row order."""
    if self.data_config is None or self.data_config.get("name") != "image_text":
      raise ValueError(f"{self.folder}: an SD text encoder tokenizes the captions of an image-text data set; "
                       "set data.name='image_text' and data.path to its directory (distill/image_text.py)")
    from distill import image_text
    source = image_text.make_image_text_source(self.data_config, split)
    return list(source.captions(np.arange(len(source))))

  def score(self, images, tokens):
    raise ValueError(f"{self.folder}: an SD folder holds no image tower; CLIP scores need a CLIP vision model")


def load_sd_text_encoder(folder, *, data_config=None, batch_size: int = 64, dtype=None) -> SDTextEncoder:
  """The text encoder and tokenizer of an SD diffusers folder (`SDTextEncoder`). dtype: the text encoder's compute
  dtype (None: float32). ValueError (one line)."""
  folder = _require_folder(folder)
  overrides = {} if dtype is None else {"dtype": dtype}
  text_model, text_params, info = sd_weights.load_text_encoder(folder, **overrides)
  tokenizer = SDTokenizer(clip_tokenizer.load_clip_tokenizer(folder))
  return SDTextEncoder(text_model, text_params, tokenizer, folder=folder, info=info, data_config=data_config,
                       batch_size=batch_size)


def scheduler_prediction(folder) -> str:
  """'eps' or 'v': what the folder's U-Net predicts (scheduler_config.json's prediction_type), after checking that
  its training noise schedule is SD's scaled-linear β 0.00085 → 0.012 over 1000 steps, the one
  `model.schedule='scaled_linear_beta'` computes. ValueError (one line naming the file and field)."""
  path = os.path.join(os.fspath(folder), SCHEDULER_CONFIG)
  if not epath.Path(path).is_file():
    raise ValueError(f"{path}: missing; the scheduler config says what the U-Net predicts and its noise schedule")
  config = sd_weights.read_config(path)
  for field, wanted in SCALED_LINEAR.items():
    value = config.get(field, wanted if field == "num_train_timesteps" else None)
    ok = value == wanted if isinstance(wanted, str) else (isinstance(value, (int, float)) and
                                                          not isinstance(value, bool) and
                                                          abs(float(value) - wanted) <= 1e-9 * max(1.0, wanted))
    if not ok:
      raise ValueError(f"{path}: {field}={value!r}, but model.schedule='scaled_linear_beta' is SD's scaled-linear "
                       f"β schedule ({', '.join(f'{k}={v!r}' for k, v in SCALED_LINEAR.items())})")
  if config.get("trained_betas") is not None:
    raise ValueError(f"{path}: trained_betas is set; only the scaled-linear β schedule is supported")
  prediction = config.get("prediction_type", "epsilon")
  if prediction not in PREDICTION_TYPES:
    raise ValueError(f"{path}: prediction_type={prediction!r}; supported: "
                     f"{', '.join(map(repr, PREDICTION_TYPES))}")
  return PREDICTION_TYPES[prediction]


# SDUNet fields read from the folder's unet/config.json that a config's model.sd must match (architecture and the
# numerics that no tensor shape reveals), with the config field that sets each.
_UNET_FIELDS = {"in_channels": "data.channels (latent channels)", "out_channels": "model.parameterization",
                "block_out_channels": "model.sd.block_out_channels", "layers_per_block": "model.sd.layers_per_block",
                "num_attention_heads": "model.sd.num_attention_heads",
                "down_block_types": "model.sd.down_block_types", "up_block_types": "model.sd.up_block_types",
                "use_linear_projection": "model.sd.use_linear_projection",
                "transformer_layers_per_block": "model.sd.transformer_layers_per_block",
                "norm_num_groups": "model.sd.norm_num_groups", "cross_attention_dim": "the text encoder's width",
                "flip_sin_to_cos": "(SDUNet's default)", "freq_shift": "(SDUNet's default)",
                "norm_eps": "(SDUNet's default)"}


def _field(unet, name):
  value = getattr(unet, name)
  if name in ("num_attention_heads", "transformer_layers_per_block"):
    return unet.per_level(value)
  return tuple(value) if isinstance(value, (list, tuple)) else value


def check_unet_fields(found, model_unet, where: str) -> None:
  """ValueError (one line) naming the first SDUNet field in which the folder's U-Net (`found`) differs from the
  one the config builds (`model_unet`)."""
  for name, config_field in _UNET_FIELDS.items():
    a, b = _field(found, name), _field(model_unet, name)
    if a != b:
      raise ValueError(f"{where}: the folder's U-Net has {name}={a!r} but the config's has {b!r} (set "
                       f"{config_field} to match)")


def teacher_from_sd(folder, model, image_shape: tuple | None = None,
                    text_encoder: SDTextEncoder | None = None) -> tuple[dict, dict]:
  """(params, meta_extra) of a CFG teacher made from an SD folder, for `model` (a `TextUNet`, e.g.
  `models.unet_from_config(config.model, config.data, channels=4, text=(77, D))`).

  params = {'unet': the folder's U-Net tree (`sd_weights.load_unet`), 'null_context': float32 [L, D], the text
  encoder's hidden states of the empty prompt}; checked against `models.abstract_params(model, image_shape)` (the
  first mismatching parameter in one line). image_shape: (H, W, C) of the latents (None: the smallest the U-Net
  takes). text_encoder: the folder's (None: loaded here).
  meta_extra = {'parameterization': 'eps' | 'v' (scheduler_config.json), 'schedule': 'scaled_linear_beta',
  'sd_folder', 'unet_file', 'text_encoder_file'}. ValueError (one line) for anything that does not fit."""
  folder = _require_folder(folder)
  unet = getattr(model, "unet", None)
  if unet is None or not hasattr(model, "context_length"):
    raise ValueError(f"teacher_from_sd needs a text U-Net (model.kind='sd_unet'), got {type(model).__name__}")
  parameterization = scheduler_prediction(folder)
  if getattr(model, "schedule", "scaled_linear_beta") != "scaled_linear_beta":
    raise ValueError(f"model.schedule={model.schedule!r}: an SD teacher was trained on 'scaled_linear_beta'")
  text_encoder = text_encoder or load_sd_text_encoder(folder)
  if (text_encoder.tokenizer.max_length, text_encoder.hidden_size) != (model.context_length, model.context_dim):
    raise ValueError(f"{folder}: the text encoder gives hidden states of shape ({text_encoder.tokenizer.max_length}, "
                     f"{text_encoder.hidden_size}); the model cross-attends to ({model.context_length}, "
                     f"{model.context_dim})")
  found, unet_params, unet_info = sd_weights.load_unet(folder)
  check_unet_fields(found, unet, os.path.join(folder, "unet", "config.json"))
  null_context = text_encoder.hidden_states(text_encoder.tokenizer.empty()[None])[0]
  params = {"unet": unet_params, "null_context": np.asarray(null_context, np.float32)}
  if image_shape is None:
    side = unet.downsampling
    image_shape = (side, side, unet.in_channels - getattr(model, "cond_channels", 0))
  expected = models.param_shapes(models.abstract_params(model, tuple(image_shape)))
  expected = {k: v for k, v in expected.items() if not k.startswith("w_embed/")}  # a student's new embedding
  found_shapes = models.param_shapes(params)
  for path, shape in expected.items():
    if path not in found_shapes:
      raise ValueError(f"{folder}: parameter {path} {shape} of the model is not in the SD weights")
    if found_shapes[path] != shape:
      raise ValueError(f"{folder}: parameter {path} has shape {found_shapes[path]} in the SD weights, {shape} in "
                       "the model")
  extra_keys = sorted(set(found_shapes) - set(expected))
  if extra_keys:
    raise ValueError(f"{folder}: parameter {extra_keys[0]} of the SD weights is not in the model")
  meta_extra = {"parameterization": parameterization, "schedule": "scaled_linear_beta", "sd_folder": folder,
                "unet_file": str(unet_info.get("file", "")),
                "text_encoder_file": str(text_encoder.info.get("file", ""))}
  return params, meta_extra


__all__ = ["SDTextEncoder", "SDTokenizer", "check_unet_fields", "is_sd_folder", "load_sd_text_encoder",
           "scheduler_prediction", "teacher_from_sd"]
