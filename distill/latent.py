"""Latent space: what a run in an autoencoder's latent space needs below the methods.

A latent run diffuses scaled latents z = scale_factor · E(x) instead of pixels: the methods see latents as their
"images" (`Context.train_source`, `Context.image_shape`) and never know it; every picture or score is made from
`Context.decode`d samples. A `LatentSpace` is read from a finished 'autoencoder' stage (`open_space`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from distill import batching, train, writers
from distill.models import autoencoder as ae

STAGE = "autoencoder"
RESULTS = "autoencoder.json"
SPLITS = ("train", "test")


class AutoencoderError(train.TrainingError):
  """A missing or unfinished autoencoder stage, or a latent cache that does not belong to it (one line)."""


def latents_path(stage_dir: str, split: str) -> str:
  return os.path.join(stage_dir, f"latents_{split}.npz")


def model_of(arch: dict) -> ae.AutoencoderKL:
  return ae.AutoencoderKL(in_channels=arch["in_channels"], block_out_channels=tuple(arch["block_out_channels"]),
                          layers_per_block=arch["layers_per_block"], latent_channels=arch["latent_channels"],
                          norm_num_groups=arch["norm_num_groups"])



@dataclasses.dataclass(frozen=True)
class LatentSpace:
  """encode(x [B, H, W, C] in [−1, 1], key=None) -> z [B, h, w, c] (scaled; the posterior mean, or a sample with a
  PRNG key); decode(z) -> x [B, H, W, C] in [−1, 1]; latents(split) -> (z [N, h, w, c] float32, labels [N] int32),
  the data set encoded once. latent_shape: (h, w, c); where: the autoencoder's stage directory."""
  encode: Callable
  decode: Callable
  latents: Callable
  latent_shape: tuple
  scale_factor: float
  where: str


def in_chunks(fn: Callable, x, batch: int) -> np.ndarray:
  """fn over x [N, ...] in chunks of `batch` rows (`batching.in_batches`), as one numpy array (decoding thousands
  of samples at once would hold every activation of the decoder)."""
  x = np.asarray(x)
  return x if len(x) == 0 else batching.in_batches(fn, x, batch)


# --- what the latent stages read ----------------------------------------------------------------------


def _stage_dir_of(path: str) -> str:
  """A workdir (holding autoencoder/) or the autoencoder's stage directory itself."""
  if epath.Path(path, RESULTS).exists() or epath.Path(path, "final").exists():
    return path
  inner = os.path.join(path, STAGE)
  return inner if epath.Path(inner).exists() or os.path.basename(path.rstrip("/")) != STAGE else path


def _results(stage_dir: str) -> dict:
  path = os.path.join(stage_dir, RESULTS)
  if not epath.Path(path).exists():
    why = "has not finished training" if not train.has_final(stage_dir) else "finished training but not its encoding"
    raise AutoencoderError(f"{stage_dir}: the autoencoder {why} (no {RESULTS}); run the 'autoencoder' stage first "
                           f"(config.pipeline starting with 'autoencoder')")
  return writers.read_json(path)


def load_latents(workdir_or_stage_dir: str, split: str, *, sample_seed: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """The cached latents of a split: (latents float32 [N, h, w, c], scaled by the scale factor, labels int32 [N]),
  in the data set's order. Latents are the posterior means (the mode); with sample_seed, one sample
  mean + std · ε per image from numpy's default_rng(sample_seed), scaled likewise.
  AutoencoderError (one line) when the stage has not finished or the cache belongs to other parameters."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: allowed {SPLITS}")
  stage_dir = _stage_dir_of(workdir_or_stage_dir)
  results = _results(stage_dir)
  path = latents_path(stage_dir, split)
  if not epath.Path(path).exists():
    raise AutoencoderError(f"{path}: missing; rerun the 'autoencoder' stage to encode the {split} split again")
  with writers.read_npz(path) as d:
    if str(d["fingerprint"]) != results["fingerprint"]:
      raise AutoencoderError(f"{path}: encoded by other parameters than {stage_dir}/final (fingerprint "
                             f"{str(d['fingerprint'])} != {results['fingerprint']}); delete it and rerun the stage")
    mean, labels = d["mean"], d["labels"]
    z = mean if sample_seed is None else mean + np.exp(0.5 * d["logvar"]) * np.random.default_rng(
        sample_seed).standard_normal(mean.shape, np.float32)
  return (np.float32(results["scale_factor"]) * z).astype(np.float32), labels.astype(np.int32)


def load_autoencoder(stage_dir: str):
  """(encode_fn, decode_fn, scale_factor, latent_shape) of a finished autoencoder stage (or its workdir).

  encode_fn(x [B, H, W, C] in [−1, 1], key=None) → scaled latents [B, h, w, c]: scale_factor · the posterior mean,
  or with a PRNG key scale_factor · a posterior sample. decode_fn(z [B, h, w, c] scaled) → x [B, H, W, C] clipped to
  [−1, 1]. Both jitted; latent_shape = (h, w, c)."""
  stage_dir = _stage_dir_of(stage_dir)
  results = _results(stage_dir)
  params, _ = train.load_final_params(stage_dir)
  model = model_of(results["architecture"])
  scale = float(results["scale_factor"])
  params = jax.device_put(params)  # once; passed to the jitted halves as an argument, not baked in as constants

  def encode_fn(x, key=None):
    return _scaled_encode(model, params, x, scale, key)

  def decode_fn(z):
    return _scaled_decode(model, params, z, scale)

  return encode_fn, decode_fn, scale, tuple(results["latent_shape"])


@functools.partial(jax.jit, static_argnames=("model",))
def _scaled_encode(model, params, x, scale, key=None):
  mean, logvar = ae.encode(model, params, x)
  z = mean if key is None else ae.DiagonalGaussian(mean, logvar).sample(key)
  return scale * z


@functools.partial(jax.jit, static_argnames=("model",))
def _scaled_decode(model, params, z, scale):
  return jnp.clip(ae.decode(model, params, z / scale), -1.0, 1.0)


def recorded_latent_shape(stage_dir: str) -> tuple | None:
  """(h, w, c) a finished autoencoder stage (or its workdir) records, without loading it; None before it has."""
  path = os.path.join(_stage_dir_of(stage_dir), RESULTS)
  if not epath.Path(path).exists():
    return None
  return tuple(int(n) for n in writers.read_json(path)["latent_shape"])


def open_space(stage_dir: str) -> LatentSpace:
  """The latent space of a finished 'autoencoder' stage (or the workdir holding it); AutoencoderError (one
  line) when it has not finished or its latent cache is not its own."""
  encode, decode, scale, shape = load_autoencoder(stage_dir)
  return LatentSpace(encode=encode, decode=decode, latents=functools.partial(load_latents, stage_dir),
                     latent_shape=tuple(shape), scale_factor=scale, where=_stage_dir_of(stage_dir))
