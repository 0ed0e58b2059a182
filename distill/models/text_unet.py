"""Stable Diffusion's U-Net (`sd_unet.SDUNet`) in the framework's model interface, conditioned on text.

  model.apply({'params': p}, z [B, H, W, C], logsnr [B], cond, w [B] | None, steps=None, train=...)

cond is a text condition (`distill.conditions`): {'label': int32 [B], 'context': float32 [B, L, D]} — the frozen
text encoder's last hidden states of each row's prompt (computed outside the network, once per prompt), and a
label that is the null class (`num_classes`) on the rows classifier-free guidance makes unconditional. Those rows
cross-attend to `null_context` [L, D] instead: a parameter, so a teacher trained here learns its unconditional
context like the PD U-Net's null-class embedding, and one made from Stable Diffusion's weights starts from the
empty prompt's hidden states (`sd_weights`). With `cond_channels` the condition also carries inpainting's mask
and masked image, concatenated to z on channels (SD Inpainting's 9-channel input).

Time: SD's U-Net takes a timestep; it is given T·t(λ) − 1 for a discrete schedule of T steps (step i of
diffusers' `alphas_cumprod[i]` sits at t = (i + 1)/T, `schedules.linear_beta_logsnr_fn`) and 1000·t(λ) for a
continuous one, t(λ) the inverse of the run's schedule. A student's guidance w (`w_embedding`) is embedded as the
PD U-Net embeds it (sinusoidal features of 1000·w/w_max, an MLP whose output layer starts at zero) and added to
the time embedding, so a new student starts out computing what its teacher computes.

Parameters: {'unet': SD's U-Net tree (diffusers' names), 'null_context', 'w_embed' (students only)}.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from distill import schedules
from distill.models.sd_unet import SDUNet
from distill.models.unet import TimeEmbedding


class TextUNet(nn.Module):
  unet: SDUNet             # in_channels = C + cond_channels; out_channels = the parameterization's
  num_classes: int         # label == num_classes: the unconditional (null) rows
  context_length: int      # L and D of the text encoder's hidden states
  context_dim: int
  schedule: str = "scaled_linear_beta"
  logsnr_min: float = schedules.LOGSNR_MIN
  logsnr_max: float = schedules.LOGSNR_MAX
  w_embedding: bool = False
  step_embedding: bool = False  # not supported (SFD-v's step input); kept for the model interface
  cond_channels: int = 0
  w_max: float = 8.0

  def timesteps(self, logsnr):
    """SD's timestep input for log-SNR λ [B] (see the module docstring)."""
    t = schedules.get_time_fn(self.schedule, self.logsnr_min, self.logsnr_max)(logsnr)
    steps = schedules.DISCRETE_SCHEDULES.get(self.schedule)
    return steps * t - 1.0 if steps else 1000.0 * t

  @nn.compact
  def __call__(self, z, logsnr, labels, w=None, steps=None, *, train: bool = False):
    """z: [B, H, W, C]; logsnr: [B]; labels: {'label' [B], 'context' [B, L, D]} (+ 'mask', 'masked' with
    cond_channels); w: [B] (iff w_embedding). Returns [B, H, W, unet.out_channels]."""
    del train  # SD's U-Net has no dropout
    if not isinstance(labels, dict) or "context" not in labels:
      raise ValueError("a text U-Net takes a text condition {'label', 'context'} (distill.conditions)")
    if self.w_embedding != (w is not None):
      raise ValueError(f"w must be given iff w_embedding (w_embedding={self.w_embedding})")
    if self.step_embedding or steps is not None:
      raise ValueError("a text U-Net has no step-count input")
    if self.cond_channels != ((labels["mask"].shape[-1] + labels["masked"].shape[-1]) if "mask" in labels else 0):
      raise ValueError(f"an inpainting condition must be given iff cond_channels > 0 (cond_channels="
                       f"{self.cond_channels})")
    b = z.shape[0]
    context = labels["context"].astype(jnp.float32)
    if context.shape[1:] != (self.context_length, self.context_dim):
      raise ValueError(f"context of shape {context.shape[1:]}; this U-Net cross-attends to "
                       f"{(self.context_length, self.context_dim)}")
    null_context = self.param("null_context", nn.initializers.zeros, (self.context_length, self.context_dim))
    null = jnp.broadcast_to(jnp.asarray(labels["label"]), (b,)) == self.num_classes
    context = jnp.where(null[:, None, None], null_context[None], context)
    if self.cond_channels:
      z = jnp.concatenate([z, labels["mask"].astype(z.dtype), labels["masked"].astype(z.dtype)], axis=-1)
    extra = None
    if self.w_embedding:
      width = 4 * self.unet.block_out_channels[0]
      extra = TimeEmbedding(self.unet.block_out_channels[0], width, scale=1000.0 / self.w_max, zero_init_out=True,
                            name="w_embed")(jnp.broadcast_to(jnp.asarray(w, jnp.float32), (b,)))
    t = self.timesteps(jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32), (b,)))
    return self.unet(z, t, context, extra_emb=extra)
