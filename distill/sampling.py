"""Sampling from any finished stage of a run: the checkpoint's meta says what the model is, how many
steps it was distilled for and which sampler it expects, so no other flags are needed."""
from __future__ import annotations

import copy
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from distill import data as data_lib
from distill import conditions, contract, registry, samplers, train, writers
from distill.context import Context, class_captions, sample_images, student_model, x_fn_of
from distill.diffusion import q_sample


class SamplingError(ValueError):
  """Bad sampling request; one line naming the flag, the value and what is allowed."""


def find_run(stage_dir: str) -> tuple[str, ml_collections.ConfigDict]:
  """The workdir holding `stage_dir` (the nearest parent with config.json) and its config. A URL
  (gs://bucket/run/teacher) is searched up to its bucket."""
  path = writers.abspath(stage_dir.rstrip("/") or stage_dir)
  while True:
    config_path = os.path.join(path, "config.json")
    if epath.Path(config_path).is_file():
      return path, _tuplify(ml_collections.ConfigDict(json.loads(epath.Path(config_path).read_text())))
    parent = os.path.dirname(path)
    if parent == path or writers.is_url(parent) != writers.is_url(path):  # '/', or above gs://bucket
      raise SamplingError(f"--checkpoint={stage_dir!r}: no config.json in it or any parent; point at a stage "
                          "directory of a distill run (e.g. runs/digits/distill_deterministic/N0004)")
    path = parent


def _tuplify(config):
  """JSON turned tuples into lists; the model wants tuples back."""
  for key in ("ch_mult", "attn_resolutions"):
    config.model[key] = tuple(config.model[key])
  return config


def _check_finished(stage_dir: str, flag: str) -> None:
  """SamplingError unless `stage_dir` (local or a URL) holds a finished stage."""
  try:
    finished = train.has_final(stage_dir)
  except Exception as e:  # noqa: BLE001 — a URL whose client is missing or cannot reach it
    raise SamplingError(f"{flag}={stage_dir!r}: cannot be read ({type(e).__name__}: {e})") from e
  if not finished:
    raise SamplingError(f"{flag}={stage_dir!r}: no finished stage there (expected {stage_dir}/final)")


def load_stage(stage_dir: str, flag: str):
  """(params, meta) of a finished stage, or SamplingError naming the flag and what is wrong with it."""
  try:
    return train.load_final_params(stage_dir)
  except train.TrainingError as e:  # names the unreadable file
    raise SamplingError(f"{flag}={stage_dir!r}: {e}") from e
  except Exception as e:  # noqa: BLE001 — Orbax, JSON and OS errors alike mean an unreadable checkpoint
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise SamplingError(f"{flag}={stage_dir!r}: unreadable checkpoint ({type(e).__name__}: {first})") from e


def checkpoint_sampler(stage_dir: str, *, steps: int | None = None, sampler: str | None = None,
                       force: bool = False):
  """fn(z, labels, w) → x sampling a finished stage as its meta describes (or at `steps` / `sampler` with
  `force`). Returns (context, fn, steps, sampler, network evaluations per sample)."""
  ctx, params, meta, steps, sampler = resolve_checkpoint(stage_dir, steps=steps, sampler=sampler, force=force)
  check_fits(ctx, params, stage_dir)
  fn, nfe = registry.sampler(ctx, params, meta, num_steps=steps, name=sampler)
  return ctx, fn, steps, sampler, nfe


def check_fits(ctx, params, stage_dir: str, flag: str = "--checkpoint") -> None:
  """SamplingError naming the first parameter of the run's U-Net (config.model over its data) that the stage's
  parameters lack or hold at another shape: a stage trained with another model config (a run resumed with
  --allow_config_change), said in one line instead of Flax's shape error deep inside the first sampler call."""
  from distill import models
  model = models.unet_from_config(ctx.config.model, ctx.config.data, channels=ctx.image_shape[-1],
                                  inpaint=ctx.inpaint, text=ctx.text_shape)
  expected = models.param_shapes(models.abstract_params(model, ctx.image_shape))
  why = models.params_mismatch(expected, models.param_shapes(params))
  if why:
    raise SamplingError(f"{flag}={stage_dir!r}: does not fit the model of its run's config.json ({why}); was it "
                        "trained with another model config?")


def resolve_checkpoint(stage_dir: str, *, steps: int | None = None, sampler: str | None = None,
                       force: bool = False):
  """(context, params, StageMeta, steps, sampler) of a finished stage to sample: its own steps and sampler, or
  `steps` / `sampler` (another step count or sampler than it was distilled for only with `force`)."""
  _check_finished(stage_dir, "--checkpoint")
  workdir, config = find_run(stage_dir)
  params, raw = load_stage(stage_dir, "--checkpoint")
  try:
    meta = registry.load_meta(stage_dir, raw)
  except contract.ContractError as e:
    raise SamplingError(f"--checkpoint={stage_dir!r}: {e}") from e
  ctx = Context(config, workdir)
  own = meta.sampler
  if not own:
    raise SamplingError(f"--checkpoint={stage_dir!r}: a {meta.kind!r} stage is not sampled (a distilled encoder "
                        "maps images to noise: use it with --mode=style_transfer)")
  allowed = tuple(registry.sampler_owner(own).samplers)
  # '--sampler=deterministic' is DDIM's report name; a sampler may be named without its method's prefix
  # ('ddpm' for a CFG teacher's 'cfg_ddpm').
  sampler = {"deterministic": "ddim"}.get(sampler, sampler) or own
  sampler = next((a for a in allowed if a == sampler), next((a for a in allowed if a.endswith("_" + sampler)), sampler))
  if sampler not in allowed:
    raise SamplingError(f"--sampler={sampler!r}: this checkpoint samples with {' or '.join(map(repr, allowed))}")
  steps = steps or meta.num_sampling_steps
  if meta.kind != "cfg_teacher":  # a teacher samples at any step count
    own_steps = list(meta.steps_scored)
    if not force and (steps not in own_steps or sampler != own):
      raise SamplingError(f"--steps={steps} --sampler={sampler}: this checkpoint was distilled for "
                          f"{'/'.join(map(str, own_steps))} {own} steps; pass --force to sample it anyway")
    if force and (steps not in own_steps or sampler != own):
      print(f"[sample] note: distilled for {'/'.join(map(str, own_steps))} {own} steps, sampling {steps} {sampler} "
            "steps as forced")
  return ctx, params, meta, steps, sampler


def partial_steps(strength: float, num_steps: int) -> int:
  """Steps img2img takes over [0, strength] of an N-step sampler: round(strength·N), at least 1."""
  return max(1, int(round(strength * num_steps)))


def img2img(stage_dir: str, *, strength: float, w_values=(0.0,), target_labels=None, num: int = 8,
            steps: int | None = None, sampler: str | None = None, force: bool = False, seed: int = 0,
            out: str | None = None, images=None, labels=None, prompts=None) -> dict:
  """Image-to-image (SDEdit, Meng et al. 2022; guided distillation Fig. 8) with a finished stage: `num` test
  images (or `images` [N, H, W, C] in [−1, 1] with `labels`) — their autoencoder latents in a latent run — are
  noised stochastically to t = strength, z_s = α_s x + σ_s ε, then decoded deterministically by the stage's own
  sampler over [0, s]: with the schedule rescaled to t ↦ λ(s·t), k = `partial_steps(s, N)` of its steps, i.e. for
  s = k/N exactly the last k steps of its N-step trajectory. Each row of w decodes to `target_labels` (default:
  the images' own classes; in a text run, `prompts` cycled over the images). Writes OUT.png (row 1 the inputs, then
  one row per w) and OUT.npz; returns the paths, the steps taken and the outputs [len(w) · N, H, W, C]."""
  if not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
    raise SamplingError(f"--strength={strength!r}: must be in (0, 1] (the noise level the images are taken to)")
  for w in w_values:
    if not (w >= 0 and np.isfinite(w)):
      raise SamplingError(f"--w={w}: guidance strengths must be finite and >= 0")
  ctx, params, meta, steps, sampler = resolve_checkpoint(stage_dir, steps=steps, sampler=sampler, force=force)
  if not registry.follows_schedule(sampler):
    raise SamplingError(f"--checkpoint={stage_dir!r}: its sampler {sampler!r} runs on a time grid of its own, so it "
                        "cannot start part-way; img2img needs one that follows the schedule "
                        f"({', '.join(s for s in registry.sampler_names() if registry.follows_schedule(s))})")
  k = ctx.config.data.num_classes
  images, labels, targets = _inputs(ctx, images, labels, target_labels, num, seed)
  x0 = jnp.asarray(images)
  if ctx.is_latent:
    x0 = jnp.asarray(ctx.latent.encode(x0))
  base = ctx.logsnr_fn
  logsnr_s = base(jnp.full((len(images),), strength, jnp.float32))
  eps = jax.random.normal(jax.random.PRNGKey(seed + 31), x0.shape)
  z_s = q_sample(x0, eps, logsnr_s)  # the noise the rescaled sampler starts from: z at its t = 1 is at λ(s)
  mapped = copy.copy(ctx)
  mapped.logsnr_fn = functools.partial(_rescaled_logsnr, base, float(strength))
  mapped.cache = {}
  taken = partial_steps(strength, steps)
  fn, _ = registry.sampler(mapped, params, meta, num_steps=taken, name=sampler)
  n = len(images)
  ws = np.asarray(w_values, np.float32)
  z = jnp.tile(z_s, (len(ws),) + (1,) * (z_s.ndim - 1))
  cond = _tile(prompt_condition(ctx, prompts, n), len(ws)) if prompts else jnp.tile(jnp.asarray(targets), len(ws))
  cond = _whole_image(ctx, cond, z)  # an inpainting model, asked to generate the whole image
  outputs = sample_images(ctx, fn, z, cond, jnp.repeat(jnp.asarray(ws), n))
  out = out or os.path.join(stage_dir, f"img2img_s{strength:g}_{taken}steps_seed{seed}")
  captions = class_captions(ctx.config.data, k)
  writers.save_image_grid(out + ".png", np.concatenate([images, outputs]), ncols=n,
                          upscale=max(1, 128 // ctx.pixel_shape[0]),
                          row_labels=["input"] + [f"w = {w:g}" for w in ws],
                          col_labels=[prompts[i % len(prompts)] for i in range(n)] if prompts
                          else [captions[int(y)] for y in targets],
                          title=f"img2img: strength {strength:g}, {taken} of {steps} {sampler} steps")
  writers.atomic_write_bytes(out + ".npz", writers.npz_bytes(
      inputs=images, outputs=outputs, labels=labels, target_labels=targets, w=np.repeat(ws, n)))
  return {"png": out + ".png", "npz": out + ".npz", "steps": taken, "outputs": outputs}


def prompt_condition(ctx, prompts, n: int | None = None):
  """The text condition of `prompts` (list of str) for a text run's model: {'label': zeros, 'context': the text
  encoder's hidden states [P, L, D]}, cycled to n rows when n is given. SamplingError (one line) when the run is
  not text-conditioned or a prompt has a word the tokenizer does not know."""
  if not ctx.text:
    raise SamplingError(f"--prompt={prompts[0]!r}: the checkpoint's run is not text-conditioned (text.enabled=False); "
                        "use --labels")
  try:
    tokens = np.asarray(ctx.text_encoder.tokenizer.encode(list(prompts)), np.int32)
  except ValueError as e:
    raise SamplingError(f"--prompt={','.join(prompts)!r}: {e}") from e
  rows = np.arange(len(prompts) if n is None else n) % len(prompts)
  return {"label": jnp.zeros((len(rows),), jnp.int32), "context": jnp.asarray(ctx.text_contexts(tokens[rows]))}


def _whole_image(ctx, cond, z):
  """`cond` for generating whole images: in an inpainting run, with a mask of ones (nothing kept)."""
  if not ctx.inpaint:
    return cond
  return conditions.inpaint(jnp.zeros_like(z), cond, jnp.ones(z.shape[:3] + (1,)))


def _tile(cond, times: int):
  return jax.tree.map(lambda a: jnp.tile(jnp.asarray(a), (times,) + (1,) * (jnp.ndim(a) - 1)), cond)


def parse_mask(spec: str, height: int, width: int) -> np.ndarray:
  """`--mask`: 'box:TOP,LEFT,BOTTOM,RIGHT' (fractions of the image in [0, 1]) or a PNG file of the image's size
  (white, >= 128 = the region to generate). Returns float32 [H, W, 1] in {0, 1}; SamplingError (one line) else."""
  if spec.startswith("box:"):
    try:
      box = tuple(float(v) for v in spec[4:].split(","))
    except ValueError:
      box = ()
    if len(box) != 4 or not all(0 <= v <= 1 for v in box) or not (box[0] < box[2] and box[1] < box[3]):
      raise SamplingError(f"--mask={spec!r}: a box is box:TOP,LEFT,BOTTOM,RIGHT, fractions in [0, 1] with TOP < "
                          "BOTTOM and LEFT < RIGHT")
    mask = conditions.box_mask(height, width, box)
  else:
    from PIL import Image
    try:
      with Image.open(spec) as im:  # the header only: nothing is decoded unless it has the images' size
        fmt, size = im.format, im.size
        gray = np.asarray(im.convert("L")) if fmt == "PNG" and size == (width, height) else None
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
      raise SamplingError(f"--mask={spec!r}: unreadable ({type(e).__name__}); give a PNG of {height}x{width} or "
                          "box:T,L,B,R") from e
    if fmt != "PNG":
      raise SamplingError(f"--mask={spec!r}: not a PNG file ({fmt}); give a PNG or box:T,L,B,R")
    if gray is None:
      raise SamplingError(f"--mask={spec!r}: a {size[1]}x{size[0]} image; the data's images are {height}x{width}")
    mask = (gray >= 128).astype(np.float32)[..., None]
  if not mask.any():
    raise SamplingError(f"--mask={spec!r}: marks no pixel to generate")
  return mask


def inpaint(stage_dir: str, *, mask: str = "box:0.25,0,1,1", w_values=(0.0,), target_labels=None, num: int = 8,
            steps: int | None = None, sampler: str | None = None, force: bool = False, seed: int = 0,
            out: str | None = None, images=None, labels=None, prompts=None) -> dict:
  """Inpainting (guided distillation §4.2.4, Fig. 9) with a finished stage of an inpainting run (inpaint.enabled):
  `num` test images (or `images` [N, H, W, C] in [−1, 1] with `labels`) have the `mask` region (`parse_mask`;
  in a latent run max-pooled to the latents' resolution) generated anew by the stage's own sampler from noise,
  conditioned on the mask, the rest of the image (its latents in a latent run) and `target_labels` (default: the
  images' own classes; in a text run, `prompts` cycled over the images), at each w. The network's output is written as it is: nothing is pasted back. Writes
  OUT.png (rows: inputs, masked inputs, one row per w) and OUT.npz; returns the paths, the pixel mask [H, W, 1]
  and the outputs [len(w) · N, H, W, C]."""
  for w in w_values:
    if not (w >= 0 and np.isfinite(w)):
      raise SamplingError(f"--w={w}: guidance strengths must be finite and >= 0")
  ctx, params, meta, steps, sampler = resolve_checkpoint(stage_dir, steps=steps, sampler=sampler, force=force)
  if not ctx.inpaint:
    raise SamplingError(f"--checkpoint={stage_dir!r}: not a stage of an inpainting run (its config has "
                        "inpaint.enabled=False); train one with a config's :inpaint variant")
  check_fits(ctx, params, stage_dir)
  h, w_px = ctx.pixel_shape[:2]
  pixel_mask = parse_mask(mask, h, w_px)
  k = ctx.config.data.num_classes
  images, labels, targets = _inputs(ctx, images, labels, target_labels, num, seed)
  x0 = np.asarray(ctx.latent.encode(jnp.asarray(images))) if ctx.is_latent else images
  cond_mask = conditions.downsample_mask(pixel_mask, *x0.shape[1:3]) if ctx.is_latent else pixel_mask
  n, ws = len(images), np.asarray(w_values, np.float32)
  base = _tile(prompt_condition(ctx, prompts, n), len(ws)) if prompts else np.tile(targets, len(ws))
  cond = conditions.inpaint(np.tile(x0, (len(ws),) + (1,) * (x0.ndim - 1)), base,
                            np.broadcast_to(cond_mask, (len(ws) * n,) + cond_mask.shape))
  fn, _ = registry.sampler(ctx, params, meta, num_steps=steps, name=sampler)
  z = jax.random.normal(jax.random.PRNGKey(seed + 41), (n,) + tuple(x0.shape[1:]))
  z = jnp.tile(z, (len(ws),) + (1,) * (z.ndim - 1))
  outputs = sample_images(ctx, fn, z, jax.tree.map(jnp.asarray, cond), jnp.repeat(jnp.asarray(ws), n))
  masked = np.where(pixel_mask > 0, 0.0, images)  # the region to generate shown grey
  out = out or os.path.join(stage_dir, f"inpaint_{steps}steps_seed{seed}")
  captions = class_captions(ctx.config.data, k)
  writers.save_image_grid(out + ".png", np.concatenate([images, masked, outputs]), ncols=n,
                          upscale=max(1, 128 // ctx.pixel_shape[0]),
                          row_labels=["input", "masked"] + [f"w = {w:g}" for w in ws],
                          col_labels=[prompts[i % len(prompts)] for i in range(n)] if prompts
                          else [captions[int(y)] for y in targets],
                          title=f"inpainting: {steps} {sampler} steps")
  writers.atomic_write_bytes(out + ".npz", writers.npz_bytes(
      inputs=images, mask=pixel_mask, outputs=outputs, labels=labels, target_labels=targets, w=np.repeat(ws, n)))
  return {"png": out + ".png", "npz": out + ".npz", "steps": steps, "mask": pixel_mask, "outputs": outputs}


def _inputs(ctx, images, labels, target_labels, num: int, seed: int):
  """(images float32 [N, H, W, C], labels int32 [N], targets int32 [N]) of img2img and inpainting: `images` with
  `labels` (zeros when None), or `num` test images drawn with `seed`; targets are `target_labels` cycled over them,
  else the labels. SamplingError (one line) for a target outside the classes."""
  k = ctx.config.data.num_classes
  if images is None:
    source = ctx.pixel_source("test")
    idx = np.random.default_rng(seed).choice(len(source), size=min(num, len(source)), replace=False)
    batch = source.get_batch(idx)
    images, labels = np.asarray(batch["image"]), np.asarray(batch["label"], np.int32)
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels if labels is not None else np.zeros(len(images)), np.int32)
  targets = labels if target_labels is None else np.resize(np.asarray(target_labels, np.int32), len(images))
  for y in targets:
    if not 0 <= y < k:
      raise SamplingError(f"--labels={y}: classes are 0..{k - 1}")
  return images, labels, targets


def _rescaled_logsnr(base, s: float, t):
  """λ(s·t): the schedule squeezed onto [0, s], so a sampler's t = 1 is the original s."""
  return base(s * jnp.asarray(t, jnp.float32))


def sample_checkpoint(stage_dir: str, *, steps: int | None = None, w_values=(0.0,), sampler: str | None = None,
                      labels=None, num: int = 8, seed: int = 0, out: str | None = None,
                      force: bool = False, prompts=None) -> dict:
  """Samples `num` images per (w, label) — or per (w, prompt) of a text run's stage — from a finished stage;
  writes OUT.png (rows = w, columns = samples) and OUT.npz (images uint8 [N, H, W, C], labels, w). Returns the
  paths and the evaluation count."""
  ctx, params, meta, steps, sampler = resolve_checkpoint(stage_dir, steps=steps, sampler=sampler, force=force)
  k = ctx.config.data.num_classes
  labels = (list(range(min(k, 10))) if labels is None else list(labels)) if not prompts else [0] * len(prompts)
  for y in labels:
    if not 0 <= y < k:
      raise SamplingError(f"--labels={y}: classes are 0..{k - 1}")
  if not w_values:
    raise SamplingError("--w=: give at least one guidance strength, e.g. --w=0,1")
  for w in w_values:
    if not (math.isfinite(w) and w >= 0):
      raise SamplingError(f"--w={w}: guidance strengths must be finite numbers >= 0")
  prompted = prompt_condition(ctx, prompts) if prompts else None
  check_fits(ctx, params, stage_dir)
  fn, nfe = registry.sampler(ctx, params, meta, num_steps=steps, name=sampler)
  ws = np.asarray(w_values, np.float32)
  per_row = len(labels) * num
  y = jnp.tile(jnp.repeat(jnp.asarray(labels, jnp.int32), num), len(ws))
  cond = y
  w = jnp.repeat(jnp.asarray(ws), per_row)
  noise = jax.random.normal(jax.random.PRNGKey(seed), (1, per_row) + ctx.image_shape)
  z = jnp.broadcast_to(noise, (len(ws), per_row) + ctx.image_shape).reshape((-1,) + ctx.image_shape)
  if prompts:  # (in an inpainting run, whole images; with labels, the run's own test-image condition)
    cond = _whole_image(ctx, _tile(jax.tree.map(lambda a: jnp.repeat(a, num, axis=0), prompted), len(ws)), z)
  x = sample_images(ctx, fn, z, cond, w)
  out = out or os.path.join(stage_dir, f"sample_{sampler}_{steps}steps_seed{seed}")
  captions = list(prompts) if prompts else class_captions(ctx.config.data, ctx.config.data.num_classes)
  columns = range(len(prompts)) if prompts else labels
  writers.save_image_grid(out + ".png", x, ncols=per_row, upscale=max(1, 128 // ctx.pixel_shape[0]),
                          row_labels=[f"w = {v:g}" for v in ws],
                          col_labels=[captions[int(c)] for c in columns for _ in range(num)],
                          title=f"{sampler}, {steps} steps, seed {seed}")
  images = np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)
  writers.atomic_write_bytes(out + ".npz", writers.npz_bytes(images=images, labels=np.asarray(y), w=np.asarray(w)))
  return {"png": out + ".png", "npz": out + ".npz", "nfe_per_sample": nfe, "steps": steps, "sampler": sampler}


@functools.partial(jax.jit, static_argnames=("x_fn", "logsnr_fn", "num_steps"))
def _encode(params, x, labels, w, *, x_fn, logsnr_fn, num_steps: int):
  den = samplers.conditional_denoiser(lambda z, logsnr, y, w_: x_fn(params, z, logsnr, y, w_), labels, w)
  return samplers.ddim_encode(den, x, logsnr_fn, num_steps).x


def style_transfer(encoder_dir: str, decoder_dir: str, *, w_enc: float = 0.0, w_dec: float = 0.0,
                   target_labels=None, num: int = 8, seed: int = 0, out: str | None = None) -> dict:
  """Encodes test images of the encoder's run with its distilled encoder (reverse DDIM, at w_enc, their own
  labels) and decodes the latents with another student (at w_dec, `target_labels` or the same labels):
  the guided-distillation paper's style transfer (Fig. 3). Writes OUT.png (row 1 inputs, row 2 outputs)
  and OUT.npz."""
  for d, flag in ((encoder_dir, "--encoder"), (decoder_dir, "--decoder")):
    _check_finished(d, flag)
  enc_workdir, enc_config = find_run(encoder_dir)
  dec_workdir, dec_config = find_run(decoder_dir)
  enc_params, enc_raw = load_stage(encoder_dir, "--encoder")
  dec_params, dec_raw = load_stage(decoder_dir, "--decoder")
  try:
    enc_meta, dec_meta = registry.load_meta(encoder_dir, enc_raw), registry.load_meta(decoder_dir, dec_raw)
  except contract.ContractError as e:
    raise SamplingError(str(e)) from e
  if enc_meta.extra.get("stage_kind") != "encoder":
    raise SamplingError(f"--encoder={encoder_dir!r}: not a distilled encoder (kind={enc_meta.kind!r}); "
                        "use a stage of the 'encoder' pipeline stage")
  if dec_meta.kind == "cfg_teacher" or not dec_meta.sampler:
    raise SamplingError(f"--decoder={decoder_dir!r}: needs a distilled student (a stage_one, distill_* or "
                        "single_w stage)")
  enc_ctx = Context(enc_config, enc_workdir)
  dec_ctx = Context(dec_config, dec_workdir)
  if enc_ctx.is_latent != dec_ctx.is_latent or enc_ctx.image_shape != dec_ctx.image_shape:
    raise SamplingError(f"--decoder: diffuses in {'latents' if dec_ctx.is_latent else 'pixels'} of shape "
                        f"{dec_ctx.image_shape}, the encoder in {'latents' if enc_ctx.is_latent else 'pixels'} of "
                        f"shape {enc_ctx.image_shape}")
  source = data_lib.make_source(enc_config.data, "test")
  idx = np.random.default_rng(seed).choice(len(source), size=num, replace=False)
  batch = source.get_batch(idx)
  labels = jnp.asarray(batch["label"], jnp.int32)
  targets = labels if target_labels is None else jnp.asarray(np.resize(np.asarray(target_labels), num), jnp.int32)
  enc_model = student_model(enc_ctx, w_embedding=enc_meta.w_conditioned)
  x0 = jnp.asarray(batch["image"])
  if enc_ctx.is_latent:  # the autoencoder's latents of the images are what the encoder maps to noise
    x0 = jnp.asarray(enc_ctx.latent.encode(x0))
  latents = _encode(enc_params, x0, labels, jnp.full((num,), w_enc, jnp.float32),
                    x_fn=x_fn_of(enc_ctx, enc_model), logsnr_fn=enc_ctx.logsnr_fn,
                    num_steps=int(enc_meta.num_sampling_steps))
  decoded = dec_ctx.decode(registry.sampler(dec_ctx, dec_params, dec_meta)[0](
      latents, targets, jnp.full((num,), w_dec, jnp.float32)))
  out = out or os.path.join(decoder_dir, f"style_transfer_wenc{w_enc:g}_wdec{w_dec:g}_seed{seed}")
  grid = np.concatenate([np.asarray(batch["image"]), decoded])
  writers.save_image_grid(out + ".png", grid, ncols=num, upscale=max(1, 128 // dec_ctx.pixel_shape[0]),
                          row_labels=["input", "output"], title=f"style transfer: w_enc {w_enc:g}, w_dec {w_dec:g}")
  writers.atomic_write_bytes(out + ".npz", writers.npz_bytes(
      inputs=np.asarray(batch["image"]), outputs=decoded, labels=np.asarray(labels),
      target_labels=np.asarray(targets), latents=np.asarray(latents)))
  return {"png": out + ".png", "npz": out + ".npz"}
