"""The FID Inception network (2015-12-05 TF graph, as ported by pytorch-fid) in flax.linen.

Protocol (the numbers of this lineage's FID and IS tables depend on every step):
  1. Images: float [B, H, W, 3] in [-1, 1], any H, W (one channel is repeated to three, as
     PIL's convert('RGB') does for grey images).
  2. Resize to 299 x 299 with bilinear interpolation exactly as pytorch-fid's
     `F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)`: half-pixel
     centres (source = (dst + 0.5) * in / out - 0.5, clamped at 0), the two nearest pixels,
     edge pixels repeated, no antialiasing when shrinking. pytorch-fid resizes [0, 1] images and
     then maps them to [-1, 1] by 2x - 1; bilinear weights sum to one, so resizing [-1, 1]
     images directly is the same map. A 299 x 299 input is left untouched. (The TF graph's own
     ResizeBilinear has no half-pixel centres; the lineage's numbers come from the 299 input of
     the pytorch-fid port, and the two agree there.)
  3. InceptionV3 with pytorch-fid's patches of the TF graph: the pool branches of Mixed_5b..5d,
     6b..6e and 7b average 3x3 windows over valid pixels only (count_include_pad=False), Mixed_7c
     max-pools instead; BatchNorm in inference mode with eps 1e-3; convolutions have no bias.
  4. pool3: the global average of Mixed_7c, [B, 2048], the FID features.
  5. logits: pool3 @ fc kernel, [B, 1008], without the fc bias: Inception Score is the softmax of
     these over all 1008 classes, as in the original IS code (improved-GAN, and guided-diffusion's
     evaluator), which multiplies pool3 by the graph's `softmax/logits/MatMul` weight alone.
     torch-fidelity calls these 'logits_unbiased'. The bias stays in the parameters ('fc/bias').

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a port of the TF graph; FID within
~0.1 of the TF code), converted once with
  python -m distill.evaluation.convert_inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz
into a flat `.npz` of float32 arrays ('Mixed_5b/branch1x1/conv/kernel', ...) that `load_inception`
reads. Nothing here downloads anything, and there is no fallback to random weights.

Precision: convolutions, the resize and the fc run at `lax.Precision.HIGHEST` by default, because
TPU (bfloat16 passes) and GPU (TF32) defaults shift features that are compared with reference
statistics computed in float32.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Params = Mapping[str, Any]

INCEPTION_SIZE = 299
POOL3_FEATURES = 2048
NUM_LOGITS = 1008
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
_BATCH_NORM_EPS = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST


class InceptionWeightsMissing(FileNotFoundError):
  """The converted Inception weights are not at the path the config names."""


class FrozenBatchNorm(nn.Module):
  """BatchNorm in inference mode: (x - mean) / sqrt(var + 1e-3) * scale + bias over the last axis.

    All four statistics are 'params' (nothing here trains), so the weights are one plain tree.
    """

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    mean = self.param("mean", nn.initializers.zeros, (features,))
    var = self.param("var", nn.initializers.ones, (features,))
    return (x - mean) * (scale * jax.lax.rsqrt(var + _BATCH_NORM_EPS)) + bias


class ConvBN(nn.Module):
  """Conv without bias -> FrozenBatchNorm -> ReLU (pytorch-fid's BasicConv2d).

    padding: symmetric zero padding (rows, cols), as torch's Conv2d `padding`.
    """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    rows, cols = self.padding
    x = nn.Conv(self.features,
                self.kernel_size,
                self.strides,
                padding=((rows, rows), (cols, cols)),
                use_bias=False,
                precision=self.precision,
                name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_valid_pixels(x):
  # TF's average pool divides by the number of pixels inside the image, not 9 (pytorch-fid patch).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x):
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_halve(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
  """Mixed_5b..5d: [B, H, W, C] -> [B, H, W, 224 + pool_features]."""

  pool_features: int
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    branch1x1 = conv(64, (1, 1), name="branch1x1")(x)
    branch5x5 = conv(48, (1, 1), name="branch5x5_1")(x)
    branch5x5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
    branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_valid_pixels(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: [B, 35, 35, 288] -> [B, 17, 17, 768]."""

  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    branch3x3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_halve(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e: factorised 7x7 convolutions, [B, 17, 17, 768] -> [B, 17, 17, 768]."""

  channels_7x7: int
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    c7 = self.channels_7x7
    branch1x1 = conv(192, (1, 1), name="branch1x1")(x)
    branch7x7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    branch7x7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
    branch7x7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
    branch7x7dbl = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(branch7x7dbl)
    branch7x7dbl = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(branch7x7dbl)
    branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(branch7x7dbl)
    branch7x7dbl = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(branch7x7dbl)
    branch_pool = conv(192, (1, 1), name="branch_pool")(_avg_pool_valid_pixels(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: [B, 17, 17, 768] -> [B, 8, 8, 1280]."""

  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    branch3x3 = conv(192, (1, 1), name="branch3x3_1")(x)
    branch3x3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(branch3x3)
    branch7x7x3 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_halve(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (pool 'avg') and Mixed_7c (pool 'max', the FID graph's quirk): -> [B, 8, 8, 2048]."""

  pool: str
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, precision=self.precision)
    branch1x1 = conv(320, (1, 1), name="branch1x1")(x)
    branch3x3 = conv(384, (1, 1), name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
    ], axis=-1)
    branch3x3dbl = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(branch3x3dbl),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(branch3x3dbl),
    ], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_valid_pixels(x)
    elif self.pool == "max":
      pooled = _max_pool_same(x)
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    branch_pool = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class UnbiasedLogits(nn.Module):
  """pool3 [B, 2048] -> pool3 @ kernel [B, 1008]; 'bias' is ported but unused (module docstring, 5)."""

  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_LOGITS))
    self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
    return jnp.dot(x, kernel, precision=self.precision)


class InceptionV3(nn.Module):
  """The FID Inception: x [B, 299, 299, 3] in [-1, 1] -> (pool3 [B, 2048], logits [B, 1008]).

    Submodule names are pytorch-fid's, so 'Mixed_5b.branch1x1.conv.weight' lives at
    'Mixed_5b/branch1x1/conv/kernel'. Other sizes than 299 run (the net is convolutional up to
    pool3) but only 299 is the protocol; `inception_outputs` resizes.
    """

  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    conv = functools.partial(ConvBN, precision=p)
    x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # 149
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_halve(x)  # 73
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
    x = _max_pool_halve(x)  # 35
    x = InceptionA(32, p, name="Mixed_5b")(x)  # 256
    x = InceptionA(64, p, name="Mixed_5c")(x)  # 288
    x = InceptionA(64, p, name="Mixed_5d")(x)  # 288
    x = InceptionB(p, name="Mixed_6a")(x)  # 17, 768
    x = InceptionC(128, p, name="Mixed_6b")(x)
    x = InceptionC(160, p, name="Mixed_6c")(x)
    x = InceptionC(160, p, name="Mixed_6d")(x)
    x = InceptionC(192, p, name="Mixed_6e")(x)
    x = InceptionD(p, name="Mixed_7a")(x)  # 8, 1280
    x = InceptionE("avg", p, name="Mixed_7b")(x)  # 2048
    x = InceptionE("max", p, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    return pool3, UnbiasedLogits(p, name="fc")(pool3)


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float32 rows of torch's bilinear weights (align_corners=False, no antialias)."""
  scale = in_size / out_size
  source = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  upper_weight = source - lower
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.arange(out_size), lower), 1.0 - upper_weight)
  np.add.at(matrix, (np.arange(out_size), upper), upper_weight)
  return matrix.astype(np.float32)


def resize_bilinear(images: jax.Array, size: tuple[int, int], precision: Any = _HIGHEST) -> jax.Array:
  """images [B, H, W, C] -> [B, size[0], size[1], C], as torch's F.interpolate(mode='bilinear',
    align_corners=False) on NCHW. Separable: two small matrix products, exact weights."""
  _, height, width, _ = images.shape
  out_height, out_width = size
  if (height, width) == (out_height, out_width):
    return images
  rows = jnp.asarray(bilinear_resize_matrix(height, out_height))
  cols = jnp.asarray(bilinear_resize_matrix(width, out_width))
  images = jnp.einsum("oh,bhwc->bowc", rows, images, precision=precision)
  return jnp.einsum("pw,bowc->bopc", cols, images, precision=precision)


@jax.jit
def preprocess(images: jax.Array) -> jax.Array:
  """images [B, H, W, 1 or 3] in [-1, 1] -> [B, 299, 299, 3] float32 (protocol steps 1-2)."""
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [B, H, W, 1 or 3], got {images.shape}")
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  return resize_bilinear(images, (INCEPTION_SIZE, INCEPTION_SIZE))


@jax.jit
def _network(params, images):
  # A separate jit from `preprocess`: every input size reuses one compiled network.
  return InceptionV3().apply({"params": params}, images)


def inception_outputs(params: Params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """images [B, H, W, 3] (or 1 channel) float in [-1, 1], any H, W ->
    (pool3 [B, 2048], logits [B, 1008]) float32, by the protocol of the module docstring."""
  return _network(params, preprocess(images))


@functools.cache
def _traced_param_shapes() -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
  variables = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0),
                             jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32))
  return tuple((path, tuple(leaf.shape)) for path, leaf in traverse_util.flatten_dict(variables["params"]).items())


def param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """The flattened parameter tree of `InceptionV3`: path tuple -> shape (traced once, never compiled)."""
  return dict(_traced_param_shapes())


def check_params(params: Params) -> None:
  """Raises ValueError (one line) unless `params` has exactly the paths and shapes of `InceptionV3`."""
  expected = param_shapes()
  flat = {path: tuple(np.shape(leaf)) for path, leaf in traverse_util.flatten_dict(dict(params)).items()}
  problems = [f"missing {'/'.join(p)}" for p in expected if p not in flat]
  problems += [f"unexpected {'/'.join(p)}" for p in flat if p not in expected]
  problems += [
      f"{'/'.join(p)} has shape {flat[p]}, expected {shape}"
      for p, shape in expected.items()
      if p in flat and flat[p] != shape
  ]
  if problems:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    raise ValueError(f"not the FID Inception's parameters: {shown}")


def save_inception(path: str | os.PathLike, params: Params) -> None:
  """Writes checked params as a flat float32 `.npz` ('Mixed_5b/branch1x1/conv/kernel' keys)."""
  check_params(params)
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  arrays = {key: np.asarray(value, np.float32) for key, value in flat.items()}
  from distill import writers  # deferred: it imports TensorBoard's protos
  # Atomically, creating the directory; a path without '.npz' keeps its name; local or a URL.
  writers.atomic_write_bytes(os.fspath(path), writers.npz_bytes(**arrays))


def load_inception(path: str | os.PathLike) -> dict:
  """Reads what `save_inception` (or the convert command) wrote: params, a nested dict of float32.

    Raises InceptionWeightsMissing (one line: which file, how to convert it, where it goes) if
    `path` does not exist, and ValueError if the file is not the FID Inception's weights.
    """
  from etils import epath
  from distill import writers
  path = os.fspath(path)
  if not epath.Path(path).exists():
    raise InceptionWeightsMissing(
        f"Inception weights not found at {path}: download pytorch-fid's {WEIGHTS_FILE} ({WEIGHTS_URL}) "
        f"and run `python -m distill.evaluation.convert_inception {WEIGHTS_FILE} {path}`")
  with writers.read_npz(path) as data:
    flat = {key: np.asarray(data[key], np.float32) for key in data.files}
  params = traverse_util.unflatten_dict(flat, sep="/")
  check_params(params)
  return params
