"""The KL autoencoder latent diffusion runs in (`distill.models.autoencoder`), trained as a pipeline stage.
Registers the stage 'autoencoder' and the config section 'autoencoder'; no sampler (the stage is not sampled).

Pretrained instead (autoencoder.weights = a `.safetensors` / `.ckpt` / `.pth` / `.bin` file or a diffusers `vae/`
folder, in LDM's / SD's or diffusers' layout, `distill.models.sd_keys`): the stage loads it as its final parameters
(the trainer with 0 updates, so final/ and a rerun behave as after training), records where it came from
(meta.json's extra.weights and autoencoder.json's weights: the path, the file read, its layout and prefix) and
encodes the data set as below. Its latents are scaled by autoencoder.scale_factor (SD's 0.18215), or by the
measured factor when that is 0. The config's architecture (block_out_channels, layers_per_block, latent_channels,
data.channels) must be the file's, which is read from its shapes; norm_num_groups cannot be read there (SD: 32).
A missing, unreadable or mismatched file is one line before anything is written (`preflight`: exit 2).

Training: the trainer's one loop (`train.run_stage`: resumable, EMA, checkpoints) on SD's objective without its
discriminator — per example Σ_pixels [L1 or L2 + perceptual_weight · LPIPS] + kl_weight · KL(q(z|x) ‖ N(0, I)),
LPIPS only when its weight files are configured (autoencoder.lpips).

After training, once (each file is skipped when present and made for these parameters):
  WORKDIR/autoencoder/latents_train.npz, latents_test.npz   the data set encoded once, encode_batch_size images
                                                            at a time (the cache below)
  WORKDIR/autoencoder/autoencoder.json                      scale factor, latent shape, reconstruction error
                                                            (L1, L2, PSNR) of the test split's first
                                                            metric_images images (0: all) and, where the run
                                                            scores with the classifier (embedded data), their
                                                            classifier-FID (beside that of as many training
                                                            images, its floor); written last: the stage is complete
  WORKDIR/autoencoder/reconstructions.png                   test images (odd rows) over their reconstructions

Cache format (`latents_{split}.npz`): `mean`, `logvar` float32 [N, h, w, c], the posterior q(z | x) of every
image of the split in the data set's order, unscaled; `labels` int32 [N]; `scale_factor` (scalar), `fingerprint`
(of the autoencoder's parameters: a cache of other parameters is refused). Storing the posterior rather than a
sample keeps both choices open: `load_latents` returns scale_factor · mean (the posterior mode; with SD's small KL
weight the posterior std is tiny) or, with a seed, one fixed sample scale_factor · (mean + std · ε).

Scale factor (Rombach et al. 2022, §4.3.2 / App. D.1; SD's 0.18215): with pretrained weights,
autoencoder.scale_factor unless it is 0; otherwise 1 / std of latents sampled from the posterior over the whole
training split (autoencoder.json records this measured value either way, as scale_factor_measured), in closed
form: 1 / sqrt(mean_i (mean_i − m̄)² + mean_i var_i) over every element i, m̄ the mean of the means (the law of
total variance).

For the stages that run on latents: `load_autoencoder(stage_dir)` → (encode_fn, decode_fn, scale_factor,
latent_shape), both functions on scaled latents; `load_latents(workdir_or_stage_dir, split)` → (latents, labels).
"""
from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from distill import batching, contract, optimizers, train, validation, weights, writers
from distill.context import Context, batch_fn, get_classifier, run_stage
from distill.evaluation import classifier as classifier_lib
from distill.evaluation import fid, protocol
from distill.models import autoencoder as ae
from distill.models import sd_keys
from distill.latent import (RESULTS, SPLITS, STAGE, AutoencoderError, latents_path, load_autoencoder,  # noqa: F401
                            load_latents, model_of)

LOSSES = ("l1", "l2")


# --- the stage ---------------------------------------------------------------------------------------


def architecture(config) -> dict:
  """What rebuilds the model from a finished stage (recorded in its meta)."""
  a = config.autoencoder
  return {"in_channels": int(config.data.channels), "block_out_channels": [int(c) for c in a.block_out_channels],
          "layers_per_block": int(a.layers_per_block), "latent_channels": int(a.latent_channels),
          "norm_num_groups": int(a.norm_num_groups), "image_size": int(config.data.image_size)}


def stage_meta(config, weights_record: dict | None = None) -> contract.StageMeta:
  """The autoencoder's record: not sampled, not scored; trained from data (no teacher evaluations), or loaded
  from autoencoder.weights (extra.weights: `weights_record`, or only the path before the file is read)."""
  a = config.autoencoder
  if a.weights:
    extra = {"architecture": architecture(config), "weights": weights_record or {"path": a.weights}}
  else:
    extra = {"architecture": architecture(config), "loss": a.loss, "kl_weight": float(a.kl_weight),
             "perceptual_weight": float(a.perceptual_weight)}
  return contract.StageMeta(
      kind="autoencoder", method="autoencoder", sampler="", num_sampling_steps=0, w_range=(0.0, 0.0),
      batch_size=int(a.batch_size), teacher_evals_per_update=0.0, student_evals_per_update=1.0, scored=False,
      extra=extra)


def load_pretrained(config) -> tuple[dict, dict]:
  """(params, record) of the autoencoder at config.autoencoder.weights, converted to the config's architecture
  (`sd_keys.autoencoder_params`); record: {'path' (as configured), 'file' (the file read), 'layout', 'prefix',
  'ignored_keys'}. OSError when the file cannot be read; ValueError (one line; `sd_keys.ArchitectureMismatch`
  when the file's architecture is another) otherwise. Reads only the file's autoencoder tensors when it can."""
  a = config.autoencoder
  path = os.path.expanduser(a.weights)
  file = weights.diffusers_weight_file(path) if epath.Path(path).is_dir() else path
  folder_config = epath.Path(file).parent / "config.json"
  if epath.Path(path).is_dir() and folder_config.is_file():  # diffusers' config says what the shapes cannot
    groups = json.loads(folder_config.read_text()).get("norm_num_groups", a.norm_num_groups)
    if groups != a.norm_num_groups:
      raise ValueError(f"{folder_config} has norm_num_groups={groups} where the config has "
                       f"autoencoder.norm_num_groups={a.norm_num_groups}")
  state = weights.read_state_dict(file, select=sd_keys.is_autoencoder_key)
  try:
    params, info = sd_keys.autoencoder_params(state, model_of(architecture(config)))
  except sd_keys.ArchitectureMismatch:
    raise
  except ValueError as e:
    raise ValueError(f"{file}: {e}") from None
  return params, {"path": a.weights, "file": file if "://" in file else os.path.abspath(file), "layout": info["layout"],
                  "prefix": info["prefix"], "ignored_keys": info["ignored"]}


def weights_error_line(config, e: BaseException) -> str:
  """One line for what `load_pretrained` raised, naming the config field to change."""
  a = config.autoencoder
  head = f"config.autoencoder.weights={a.weights!r}"
  if isinstance(e, sd_keys.ArchitectureMismatch):
    field = "data.channels" if e.field in ("in_channels", "out_channels") else f"autoencoder.{e.field}"
    return (f"{head}: holds an autoencoder with {e.field}={e.found} but the config has config.{field}="
            f"{e.expected}; set it to the file's")
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return f"{head}: {type(e).__name__}: {lines[0] if lines else ''}"


def _no_batches(step):
  raise AssertionError(f"a pretrained autoencoder trains no steps (asked for batch {step})")


def _perceptual(config):
  """(frozen LPIPS params, fn(frozen, a, b) → [B]) when autoencoder.perceptual_weight > 0, else (None, None)."""
  a = config.autoencoder
  if not a.perceptual_weight:
    return None, None
  from distill.evaluation import lpips
  model = lpips.load_lpips(a.lpips.net, os.path.expanduser(a.lpips.trunk), os.path.expanduser(a.lpips.lin))
  resize = int(a.lpips.resize) or None

  def distance(frozen, x, y):
    return lpips.lpips_distance(lpips.LPIPS(model.net, frozen), x, y, resize_to=resize,
                                precision=jax.lax.Precision.DEFAULT)

  return model.params, distance


def run_autoencoder(ctx: Context):
  c = ctx.config
  a = c.autoencoder
  model = model_of(architecture(c))
  if a.weights:
    return run_pretrained(ctx, model)
  frozen, perceptual_fn = _perceptual(c)
  optimizer, schedule = optimizers.adam_with_warmup(a.lr, a.warmup_steps, a.grad_clip)
  stage = train.Stage(
      name=STAGE,
      loss_fn=ae.reconstruction_loss_fn(model, kl_weight=float(a.kl_weight), loss=a.loss,
                                        perceptual_weight=float(a.perceptual_weight), perceptual_fn=perceptual_fn),
      init_params=ae.init_params(model, ctx.pixel_shape, c.seed), optimizer=optimizer, num_steps=a.steps,
      batch_fn=batch_fn(ctx.pixel_source("train"), a.batch_size, c.seed), seed=c.seed, frozen=frozen,
      ema_decay=float(a.ema_decay) if a.ema_decay else None, log_every=a.log_every, ckpt_every=a.ckpt_every,
      skip_nonfinite=a.skip_nonfinite, images_per_step=a.batch_size, lr_schedule=schedule,
      fsdp=c.mesh.fsdp, fsdp_min_size=c.mesh.fsdp_min_size)
  params, _ = run_stage(ctx, stage, stage_meta(c))
  if ctx.is_main_process:  # other processes write nothing; the caches are the main process's
    return finish(ctx, jax.device_get(params), model)
  return None


def run_pretrained(ctx: Context, model: ae.AutoencoderKL):
  """The stage with autoencoder.weights: the file's parameters become final/ through the trainer with 0 updates
  (read once: a finished stage is not read again), then `finish` as after training."""
  c = ctx.config
  record = None
  if not train.has_final(ctx.stage_dir(STAGE)):
    try:
      init, record = load_pretrained(c)
    except (OSError, ValueError) as e:
      raise AutoencoderError(weights_error_line(c, e)) from e
  else:
    init = None  # run_stage returns final/ without looking at it
  stage = train.Stage(
      name=STAGE, loss_fn=ae.reconstruction_loss_fn(model, kl_weight=0.0), init_params=init,
      optimizer=optax.identity(), num_steps=0, batch_fn=_no_batches, seed=c.seed,
      fsdp=c.mesh.fsdp, fsdp_min_size=c.mesh.fsdp_min_size)
  params, meta = run_stage(ctx, stage, stage_meta(c, record))
  if ctx.is_main_process:
    return finish(ctx, jax.device_get(params), model, meta.extra.get("weights"))
  return None


def finish(ctx: Context, params, model: ae.AutoencoderKL, weights_record: dict | None = None) -> dict:
  """The work after training (each part skipped when done): the latent caches, the scale factor, the
  reconstruction metrics and grid, and autoencoder.json. Returns autoencoder.json's contents."""
  from distill import data as data_lib
  c = ctx.config
  stage_dir = ctx.stage_dir(STAGE)
  results_path = os.path.join(stage_dir, RESULTS)
  if epath.Path(results_path).exists():
    return writers.read_json(results_path)
  start = time.time()
  print_ = lambda s: print(f"[{STAGE}] {s}")  # noqa: E731
  fp = train.fingerprint(params)
  batch = int(c.autoencoder.encode_batch_size)
  sources = {"train": ctx.pixel_source("train"), "test": ctx.pixel_source("test")}
  # Encode without a scale first: the factor comes from the training latents themselves.
  for split in SPLITS:
    if not _cache_ok(latents_path(stage_dir, split), fp):
      mean, logvar, labels = encode_split(model, params, sources[split], batch)
      _write_cache(latents_path(stage_dir, split), mean, logvar, labels, None, fp)
      print_(f"encoded the {split} split: {mean.shape[0]} images -> latents {mean.shape[1:]}")
  with writers.read_npz(latents_path(stage_dir, "train")) as d:
    measured = scale_factor(d["mean"], d["logvar"])
  configured = bool(c.autoencoder.weights) and float(c.autoencoder.scale_factor) > 0
  scale = float(c.autoencoder.scale_factor) if configured else measured
  for split in SPLITS:  # the factor into both caches (once)
    with writers.read_npz(latents_path(stage_dir, split)) as d:
      if float(d["scale_factor"]) == scale:  # exact: the same float64 written before
        continue
      mean, logvar, labels = d["mean"], d["logvar"], d["labels"]
    _write_cache(latents_path(stage_dir, split), mean, logvar, labels, scale, fp)

  # Reconstructions of the test split's first metric_images images (0: all), held in memory with the originals.
  count = min(int(c.autoencoder.metric_images) or len(sources["test"]), len(sources["test"]))
  test = sources["test"].get_batch(np.arange(count))
  test_images, test_labels = test["image"], test["label"]
  with writers.read_npz(latents_path(stage_dir, "test")) as d:
    recon = decode_all(model, params, d["mean"][:count], batch)
  metrics = reconstruction_metrics(test_images, recon)
  # The classifier's numbers where the run scores with it (embedded data): training it reads its whole training
  # split into memory, which an Inception-scored data set (ImageNet at 256²: 1 TB of float32) neither needs nor fits.
  if protocol.resolve_metric(c) == "classifier":
    metrics.update(_classifier_metrics(ctx, test_images, test_labels, recon, sources["train"]))
  k = min(10, len(test_images))
  pairs = np.stack([test_images[:8 * k], recon[:8 * k]]) if len(test_images) >= 8 * k else None
  if pairs is not None:
    grid = np.concatenate([np.concatenate([pairs[0][r * k:(r + 1) * k], pairs[1][r * k:(r + 1) * k]])
                           for r in range(8)])
    writers.save_image_grid(os.path.join(stage_dir, "reconstructions.png"), grid, ncols=k,
                            upscale=max(1, 64 // ctx.pixel_shape[0]))
  results = {"scale_factor": scale, "scale_factor_measured": measured,
             "scale_factor_source": "config.autoencoder.scale_factor" if configured else "measured",
             "latent_shape": list(model.latent_shape(ctx.pixel_shape)),
             "image_shape": list(ctx.pixel_shape), "fingerprint": fp, "architecture": architecture(c),
             "test": {**metrics, "num_images": int(len(test_images))},
             "seconds": time.time() - start}
  if weights_record is not None:
    results["weights"] = weights_record
  writers.atomic_write_json(results_path, results, indent=1)
  line = (f"scale factor {scale:.4f} ({results['scale_factor_source']}); {count} test reconstructions: "
          f"L1 {metrics['l1']:.4f}, L2 {metrics['l2']:.5f}, PSNR {metrics['psnr']:.2f} dB")
  if "classifier_fid" in metrics:
    line += (f", classifier-FID {metrics['classifier_fid']:.3f} "
             f"(training images: {metrics['classifier_fid_train_vs_test']:.3f}) "
             f"(classifier accuracy {metrics['classifier_accuracy_reconstructions']:.4f} on reconstructions, "
             f"{metrics['classifier_accuracy_test']:.4f} on the originals)")
  print_(line)
  return results


def _classifier_metrics(ctx: Context, images, labels, recon, train_source) -> dict:
  """Classifier-FID and accuracy of reconstructions against their originals, beside its floor: the same distance
  between the originals and as many training images."""
  clf_params, clf_meta = get_classifier(ctx)
  net = protocol.classifier_net(clf_params, ctx.config.data.num_classes, clf_meta["test_accuracy"])
  real_feats, real_logits = net.outputs(images)
  recon_feats, recon_logits = net.outputs(recon)
  train_images = train_source.get_batch(np.arange(min(len(train_source), len(images))))["image"]
  return {"classifier_fid": fid.feature_fid(recon_feats, real_feats),
          "classifier_fid_train_vs_test": fid.feature_fid(net.outputs(train_images)[0], real_feats),
          "classifier_accuracy_reconstructions": float(np.mean(np.argmax(recon_logits, -1) == labels)),
          "classifier_accuracy_test": float(np.mean(np.argmax(real_logits, -1) == labels)),
          "classifier": net.description}


def encode_split(model, params, source, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Every image of `source` -> (mean, logvar) float32 [N, h, w, c] (unscaled) and labels int32 [N], read and encoded
  `batch` images at a time (the last chunk padded: one compiled shape), so the split's pixels are never held whole."""
  n = len(source)
  means, logvars, labels = [], [], []
  for start in range(0, n, batch):
    rows = np.arange(start, min(start + batch, n))
    part = source.get_batch(np.pad(rows, (0, batch - len(rows)), mode="edge") if n > batch else rows)
    mean, logvar = ae.encode(model, params, jnp.asarray(part["image"]))
    means.append(np.asarray(mean)[:len(rows)])
    logvars.append(np.asarray(logvar)[:len(rows)])
    labels.append(np.asarray(part["label"], np.int32)[:len(rows)])
  return np.concatenate(means), np.concatenate(logvars), np.concatenate(labels)


def decode_all(model, params, latents: np.ndarray, batch: int) -> np.ndarray:
  """Unscaled latents [N, h, w, c] → images [N, H, W, C] clipped to [−1, 1]."""
  return np.clip(batching.in_batches(lambda z: ae.decode(model, params, z), latents, batch), -1.0, 1.0)


def scale_factor(mean: np.ndarray, logvar: np.ndarray) -> float:
  """1 / std of posterior samples over every element of `mean`/`logvar` [N, h, w, c], in closed form (float64)."""
  m = np.asarray(mean, np.float64)
  variance = np.mean(np.square(m - m.mean())) + np.mean(np.exp(np.asarray(logvar, np.float64)))
  return float(1.0 / math.sqrt(variance))


def reconstruction_metrics(images: np.ndarray, recon: np.ndarray) -> dict:
  """L1 and L2 (per-pixel means) and PSNR (per image on [−1, 1], peak-to-peak 2, averaged) of reconstructions."""
  diff = np.asarray(recon, np.float64) - np.asarray(images, np.float64)
  per_image_mse = np.mean(np.square(diff), axis=tuple(range(1, diff.ndim)))
  psnr = 10.0 * np.log10(4.0 / np.maximum(per_image_mse, 1e-12))
  return {"l1": float(np.mean(np.abs(diff))), "l2": float(np.mean(np.square(diff))), "psnr": float(np.mean(psnr))}


def _write_cache(path, mean, logvar, labels, scale, fp):
  writers.atomic_write_bytes(path, writers.npz_bytes(
      mean=np.asarray(mean, np.float32), logvar=np.asarray(logvar, np.float32), labels=np.asarray(labels, np.int32),
      scale_factor=np.float64(np.nan if scale is None else scale), fingerprint=np.array(fp)))


def _cache_ok(path: str, fp: str) -> bool:
  if not epath.Path(path).exists():
    return False
  try:
    with writers.read_npz(path) as d:
      return str(d["fingerprint"]) == fp
  except Exception:  # noqa: BLE001 — an unreadable cache is made again
    return False


# --- config -----------------------------------------------------------------------------------------


def config_sections():
  return {"autoencoder": ml_collections.ConfigDict(dict(
      # Architecture (SD's VAE: (128, 256, 512, 512), 2, 4, 32): L levels halve the image L − 1 times.
      block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
      steps=2000, batch_size=64, lr=1e-3, warmup_steps=100, grad_clip=1.0,
      ema_decay=0.0,                    # 0: no EMA
      loss="l1",                        # 'l1' | 'l2': the per-pixel reconstruction term (SD: l1)
      kl_weight=1e-6,                   # SD's KL weight (its loss sums over pixels, as here)
      perceptual_weight=0.0,            # > 0: + weight · LPIPS at every pixel (SD: 1.0), from these files:
      lpips=ml_collections.ConfigDict(dict(
          net="alex", trunk="", lin="",  # the torchvision trunk's state dict, the lpips package's lin weights
          resize=64,                    # bilinear resize before LPIPS (0: none; the alex trunk needs >= 31 px)
      )),
      encode_batch_size=500,            # rows per encode/decode call after training
      metric_images=0,                  # test images reconstructed for autoencoder.json's metrics (0: all)
      # Pretrained instead of trained: a .safetensors / .ckpt / .pth / .bin file or a diffusers vae/ folder in LDM's,
      # SD's or diffusers' layout (docs/weights.md); '' trains it. The architecture above must be the file's.
      weights="",
      scale_factor=0.18215,             # with weights: the latents' factor (SD's); 0: measured from the latents
      log_every=100, ckpt_every=500, skip_nonfinite=False,
  ))}


def validate(c) -> None:
  a = c.autoencoder
  for f in ("layers_per_block", "latent_channels", "norm_num_groups", "steps", "batch_size", "encode_batch_size",
            "log_every", "ckpt_every"):
    validation.positive_int(c, f"autoencoder.{f}")
  if isinstance(a.metric_images, bool) or not isinstance(a.metric_images, int) or a.metric_images < 0:
    validation.fail("autoencoder.metric_images", a.metric_images, "must be an integer >= 0 (0: the whole test split)")
  widths = a.block_out_channels
  if (not isinstance(widths, (tuple, list)) or not widths
      or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 or w % a.norm_num_groups for w in widths)):
    validation.fail("autoencoder.block_out_channels", widths,
                    f"must be a non-empty tuple of positive multiples of autoencoder.norm_num_groups={a.norm_num_groups}")
  down = 2 ** (len(widths) - 1)
  if c.data.image_size % down:
    validation.fail("autoencoder.block_out_channels", tuple(widths), f"{len(widths)} levels halve the image "
                    f"{len(widths) - 1} times; data.image_size={c.data.image_size} must divide by {down}")
  if c.latent.enabled and not c.latent.autoencoder_dir:  # the U-Net diffuses this stage's latents
    validation.check_unet_size(c, c.data.image_size // down, f"the latents' side (data.image_size / {down})")
  if isinstance(a.warmup_steps, bool) or not isinstance(a.warmup_steps, int) or a.warmup_steps < 0:
    validation.fail("autoencoder.warmup_steps", a.warmup_steps, "must be a non-negative integer")
  validation.number(c, "autoencoder.lr", 0.0, 1.0, lo_open=True)
  validation.number(c, "autoencoder.grad_clip", 0.0, lo_open=True)
  validation.number(c, "autoencoder.ema_decay", 0.0, 1.0, hi_open=True)
  validation.number(c, "autoencoder.kl_weight", 0.0)
  validation.number(c, "autoencoder.perceptual_weight", 0.0)
  validation.choice(c, "autoencoder.loss", LOSSES)
  validation.boolean(c, "autoencoder.skip_nonfinite")
  if not isinstance(a.weights, str):
    validation.fail("autoencoder.weights", a.weights, "must be set: the path of the autoencoder's weight file or "
                    "diffusers vae/ folder (docs/weights.md), or '' to train it")
  validation.number(c, "autoencoder.scale_factor", 0.0)
  if a.perceptual_weight:
    validation.choice(c, "autoencoder.lpips.net", ("alex", "vgg"))
    for f, what in (("trunk", "the torchvision trunk's state dict"), ("lin", "the lpips package's lin weights")):
      if not isinstance(a.lpips[f], str) or not a.lpips[f]:
        validation.fail(f"autoencoder.lpips.{f}", a.lpips[f], f"autoencoder.perceptual_weight > 0 needs a path "
                        f"to {what} (.pth or .npz); or set autoencoder.perceptual_weight=0")
    r = a.lpips.resize
    if isinstance(r, bool) or not isinstance(r, int) or (r != 0 and r < 32):
      validation.fail("autoencoder.lpips.resize", r, "must be 0 (no resize) or an integer >= 32")


def preflight(c) -> None:
  """Before anything is written: pretrained weights load and fit the config's architecture; or, with a perceptual
  loss, both LPIPS weight files load."""
  if c.autoencoder.weights:
    try:
      load_pretrained(c)
    except Exception as e:  # noqa: BLE001 — a missing file, an unreadable one, another architecture
      raise validation.ConfigError(weights_error_line(c, e)) from e
    return
  if not c.autoencoder.perceptual_weight:
    return
  try:
    _perceptual(c)
  except Exception as e:  # noqa: BLE001 — a missing file, a wrong key or shape
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    raise validation.ConfigError(f"config.autoencoder.lpips (trunk={c.autoencoder.lpips.trunk!r}, "
                                 f"lin={c.autoencoder.lpips.lin!r}): {type(e).__name__}: "
                                 f"{lines[0] if lines else ''}") from e


def quick(c) -> None:
  a = c.autoencoder
  a.steps, a.batch_size, a.log_every, a.ckpt_every, a.warmup_steps = 40, 32, 20, 20, 10
  a.block_out_channels, a.norm_num_groups = (16, 32, 32), 8


METHOD = contract.Method(
    name="autoencoder", order=-1, stages={STAGE: run_autoencoder}, config=config_sections, validate=validate,
    preflight=preflight, quick=quick, data_batches=("autoencoder.batch_size",),
    plan=lambda config, stage: [(STAGE, stage_meta(config))])
