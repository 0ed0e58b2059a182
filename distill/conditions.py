"""What a diffusion model is conditioned on, as one pytree with a leading batch axis: the layer below the methods
that lets every loss, sampler and stage pass "the condition" around without knowing what is in it.

  class-conditional       labels: int32 [B] in [0, num_classes]; num_classes is the null class
  inpainting              {'label': int32 [B], 'mask': float32 [B, H, W, 1], 'masked': float32 [B, H, W, C]}
  text                    {'label': int32 [B], 'context': float32 [B, L, D]} (+ the inpainting keys)

A text condition's context is the frozen text encoder's hidden states of each row's prompt; its label is the
row's class where it has one and the null class on unconditional rows, where the network cross-attends to its
learned unconditional context instead (`models.text_unet`).

Inpainting follows Stable Diffusion Inpainting's input layout (guided-distillation paper §4.2.4): the network
sees z_t, the mask (1 = the region to generate, 0 = kept) and the masked image x·(1 − mask), concatenated on
channels (`models.unet.UNet.cond_channels`). Classifier-free guidance drops only the label: the unconditional
pass keeps the mask and the masked image, as SD Inpainting's keeps them while it drops the prompt. In a latent run
the masked image is masked in latent space (z₀·(1 − mask) with the mask at latent resolution); SD encodes the
masked pixels instead (docs/inpainting.md).

Every function here takes either form, so a method written for labels runs unchanged on inpainting conditions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INPAINT_KEYS = ("label", "mask", "masked")


def is_inpaint(cond) -> bool:
  return isinstance(cond, dict) and "mask" in cond


def label_of(cond):
  """The class labels [B] of a condition."""
  return cond["label"] if isinstance(cond, dict) else cond


def without_image(cond):
  """`cond` less inpainting's mask and masked image (what the plain model an inpainting one is made from takes):
  the labels, or a text condition's {'label', 'context'}."""
  if not is_inpaint(cond):
    return cond
  rest = {k: v for k, v in cond.items() if k not in ("mask", "masked")}
  return rest if len(rest) > 1 else rest["label"]


def with_label(cond, labels):
  """`cond` with its class labels replaced by `labels` [B]."""
  return {**cond, "label": labels} if isinstance(cond, dict) else labels


def null_like(cond, null_label: int):
  """The unconditional condition of classifier-free guidance: every label the null class; an inpainting
  condition keeps its mask and masked image."""
  label = label_of(cond)
  xp = np if isinstance(label, np.ndarray) else jnp
  return with_label(cond, xp.full_like(label, null_label))


def drop_labels(cond, dropped, null_label: int):
  """`cond` with the labels of rows where `dropped` ([B] bool) is set replaced by the null class (CFG training's
  label dropout). numpy in, numpy out."""
  label = label_of(cond)
  xp = np if isinstance(label, np.ndarray) else jnp
  return with_label(cond, xp.where(dropped, null_label, label).astype(label.dtype))


def concat(*conds):
  """Conditions stacked along the batch axis (the 2B-row call of a conditional and an unconditional pass)."""
  return jax.tree.map(lambda *a: jnp.concatenate(a), *conds)


def cond_and_null(cond, null_label: int):
  """concat(cond, null_like(cond)): the 2B rows of one classifier-free-guided call."""
  return concat(cond, null_like(cond, null_label))


def rows(cond, start: int, stop: int, pad: int = 0):
  """Rows [start, stop) of every leaf, then the last of them repeated `pad` times (a sampler's fixed chunk)."""
  def take(a):
    part = a[start:stop]
    return jnp.concatenate([part, jnp.repeat(part[-1:], pad, axis=0)]) if pad else part
  return jax.tree.map(take, cond)


def batch_size(cond) -> int:
  return int(jax.tree.leaves(cond)[0].shape[0])


# --- inpainting ----------------------------------------------------------------------------------------


def inpaint(x, labels, mask):
  """The inpainting condition of data x [B, H, W, C] (images or latents), labels [B] (or a text condition, which
  it extends) and mask [B, H, W, 1] (1 = generate): {'label', 'mask', 'masked': x·(1 − mask)}. numpy or jax, as x."""
  xp = np if isinstance(x, np.ndarray) else jnp
  mask = xp.asarray(mask, xp.float32)
  base = labels if isinstance(labels, dict) else {"label": labels}
  return {**base, "mask": mask, "masked": (x * (1.0 - mask)).astype(xp.float32)}


def random_masks(rng: np.random.Generator, n: int, height: int, width: int, *, min_frac: float, max_frac: float,
                 p_full: float) -> np.ndarray:
  """Training masks float32 [n, H, W, 1]: with probability p_full the whole image (the model stays a plain
  generator, as SD Inpainting is also trained), else one box whose sides are uniform in [min_frac, max_frac] of
  the image's (at least one cell) at a uniform position."""
  masks = np.zeros((n, height, width, 1), np.float32)
  full = rng.random(n) < p_full
  for i in range(n):
    if full[i]:
      masks[i] = 1.0
      continue
    h = max(1, int(round(rng.uniform(min_frac, max_frac) * height)))
    w = max(1, int(round(rng.uniform(min_frac, max_frac) * width)))
    y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    masks[i, y:y + h, x:x + w] = 1.0
  return masks


def box_mask(height: int, width: int, box) -> np.ndarray:
  """float32 [H, W, 1]: 1 inside box = (top, left, bottom, right) as fractions of the image in [0, 1]."""
  top, left, bottom, right = box
  mask = np.zeros((height, width, 1), np.float32)
  mask[int(round(top * height)):int(round(bottom * height)), int(round(left * width)):int(round(right * width))] = 1
  return mask


def downsample_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
  """A pixel mask [..., H·f, W·f, 1] at a latent resolution [..., H, W, 1]: a cell is generated if any of its
  pixels is (max-pooling), so nothing the user marked is kept."""
  fh, fw = mask.shape[-3] // height, mask.shape[-2] // width
  if fh * height != mask.shape[-3] or fw * width != mask.shape[-2]:
    raise ValueError(f"mask of {mask.shape[-3]}x{mask.shape[-2]} does not pool to {height}x{width}")
  lead = mask.shape[:-3]
  return mask.reshape(lead + (height, fh, width, fw, 1)).max(axis=(-4, -2))
