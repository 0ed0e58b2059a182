"""Flax networks, and the glue that turns one into an x̂-predictor for the samplers."""
from __future__ import annotations

from distill import diffusion
from distill.models.unet import UNet, param_count


def unet_from_config(model_cfg, data_cfg, *, w_embedding: bool = False, step_embedding: bool = False) -> UNet:
  """The U-Net a config describes (config.model, config.data)."""
  return UNet(
      num_classes=data_cfg.num_classes,
      out_channels=diffusion.output_channels(model_cfg.parameterization, data_cfg.channels),
      ch=model_cfg.ch, ch_mult=tuple(model_cfg.ch_mult), num_res_blocks=model_cfg.num_res_blocks,
      attn_resolutions=tuple(model_cfg.attn_resolutions), head_dim=model_cfg.head_dim,
      dropout=model_cfg.dropout, emb_ch=model_cfg.emb_ch or None, num_groups=model_cfg.num_groups,
      resample_with_resblock=model_cfg.resample_with_resblock,
      w_embedding=w_embedding, step_embedding=step_embedding)


def x_prediction_fn(model: UNet, params, parameterization: str):
  """`x_function` with its parameters bound, in the samplers' ModelFn form:
  model_fn(z [B,H,W,C], logsnr [B], labels [B], w [B] | None) -> x̂ [B,H,W,C], in eval mode."""
  x_fn = x_function(model, parameterization)
  return lambda z, logsnr, labels, w=None: x_fn(params, z, logsnr, labels, w)


__all__ = ["UNet", "param_count", "unet_from_config", "x_function", "x_prediction_fn"]


def x_function(model: UNet, parameterization: str):
  """The x-function of a U-Net, the convention every distillation loss uses:

  x_fn(params, z [B,H,W,C], logsnr [B], labels [B], w [B], *, train=False, rng=None) -> x̂ [B,H,W,C].
  w reaches the network only if it has a w-embedding; `rng` feeds dropout when training.
  """
  def x_fn(params, z, logsnr, labels, w, *, train: bool = False, rng=None):
    out = model.apply({"params": params}, z, logsnr, labels, w if model.w_embedding else None, train=train,
                      rngs={"dropout": rng} if (train and rng is not None) else {})
    return diffusion.x_from_output(out, z, logsnr, parameterization)
  return x_fn
