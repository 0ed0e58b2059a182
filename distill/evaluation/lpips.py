"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"),
v0.1 with the AlexNet or VGG16 trunk, as pure JAX functions over a params pytree.

The computation, as in the `lpips` package (0.1.4) for two images a, b:
  1. Images [B, H, W, C] float in [-1, 1]; C = 1 is repeated to 3 channels. Optionally resized to
     `resize_to` first, with torch's F.interpolate(mode='bilinear', align_corners=False) (what the
     EDM/SFD lineage does to small images before LPIPS; `inception.resize_bilinear`).
  2. ScalingLayer: (x - shift) / scale per channel, shift (-.030, -.088, -.188), scale (.458, .448, .450).
  3. The torchvision trunk's `features`, every conv followed by ReLU, five taps:
       alex: conv 11x11/4 pad 2 (features.0) -> tap; maxpool 3/2; conv 5x5 pad 2 (.3) -> tap;
             maxpool 3/2; conv 3x3 pad 1 (.6) -> tap; (.8) -> tap; (.10) -> tap.
       vgg:  3x3 pad 1 convs (.0 .2) -> relu1_2; maxpool 2/2; (.5 .7) -> relu2_2; maxpool;
             (.10 .12 .14) -> relu3_3; maxpool; (.17 .19 .21) -> relu4_3; maxpool; (.24 .26 .28) -> relu5_3.
     Max-pools have no padding and floor their output size (torch's default ceil_mode=False).
  4. Per tap and pixel, unit-normalise over channels: f / (sqrt(sum_c f^2) + 1e-10).
  5. d = sum over taps of the spatial mean of sum_c w_c (f_a - f_b)^2, w the tap's 1x1 `lin` conv
     (no bias, dropout off). Result [B].

Weights are read only from files the user gives (nothing is downloaded):
  * trunk: a torchvision state dict, `.pth` (torch.save, read without torch by `torch_weights`) or
    `.npz` with the same keys: alexnet `features.{0,3,6,8,10}.{weight,bias}` (weights [O, I, k, k]),
    vgg16 `features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}`. Other keys (`classifier.*`)
    are ignored.
  * lin: the `lpips` package's `weights/v0.1/{alex,vgg}.pth` (or `.npz`), keys `lin{0..4}.model.1.weight`
    of shape [1, C_tap, 1, 1], C_tap = (64, 192, 384, 256, 256) for alex, (64, 128, 256, 512, 512) for vgg.

Where every channel of a tap is zero at a pixel, sqrt(sum_c f^2) has no derivative, but the ReLU's gradient
(a select, as in torch) drops what comes back through it, so gradients stay finite.

Precision: convolutions and the resize run at `lax.Precision.HIGHEST` unless the caller passes another
(TPU bfloat16 passes and GPU TF32 shift the distance; DEFAULT is faster as a training loss).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from distill.evaluation import inception

NETS = ("alex", "vgg")
_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg"}
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10
_HIGHEST = jax.lax.Precision.HIGHEST

# Per tap: (max-pool (window, stride) before it or None, its convs as (features index, kernel, stride, padding)).
_ARCHS: dict[str, tuple[tuple[tuple[int, int] | None, tuple[tuple[int, int, int, int], ...]], ...]] = {
    "alex": (
        (None, ((0, 11, 4, 2),)),
        ((3, 2), ((3, 5, 1, 2),)),
        ((3, 2), ((6, 3, 1, 1),)),
        (None, ((8, 3, 1, 1),)),
        (None, ((10, 3, 1, 1),)),
    ),
    "vgg": (
        (None, ((0, 3, 1, 1), (2, 3, 1, 1))),
        ((2, 2), ((5, 3, 1, 1), (7, 3, 1, 1))),
        ((2, 2), ((10, 3, 1, 1), (12, 3, 1, 1), (14, 3, 1, 1))),
        ((2, 2), ((17, 3, 1, 1), (19, 3, 1, 1), (21, 3, 1, 1))),
        ((2, 2), ((24, 3, 1, 1), (26, 3, 1, 1), (28, 3, 1, 1))),
    ),
}
# torchvision's output channels of every conv, in order.
TORCHVISION_WIDTHS = {
    "alex": (64, 192, 384, 256, 256),
    "vgg": (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512),
}


@struct.dataclass
class LPIPS:
  """An LPIPS metric: `net` ('alex' or 'vgg', static under jit) and `params`, a pytree of float32:
    {'convs': ({'kernel': [k, k, I, O], 'bias': [O]}, ...) in trunk order,
     'lins': ([C_tap], ...) one per tap}. A pytree itself, so it passes through jit and grad."""
  net: str = struct.field(pytree_node=False)
  params: Any


def _canonical_net(net: str) -> str:
  try:
    return _ALIASES[net.lower()]
  except (KeyError, AttributeError):
    raise ValueError(f"LPIPS net must be one of {NETS}, got {net!r}") from None


def _conv_specs(net: str) -> list[tuple[int, int, int, int]]:
  return [conv for _, convs in _ARCHS[net] for conv in convs]


def expected_shapes(net: str, widths: Sequence[int] | None = None) -> tuple[dict[str, tuple], dict[str, tuple]]:
  """(trunk, lin) state-dict shapes by key for `net`, torch layout: trunk 'features.i.weight' [O, I, k, k]
    and 'features.i.bias' [O], lin 'lin{t}.model.1.weight' [1, C_t, 1, 1]. `widths`: every conv's
    output channels (default torchvision's); other widths only serve small test networks."""
  net = _canonical_net(net)
  specs = _conv_specs(net)
  widths = tuple(TORCHVISION_WIDTHS[net] if widths is None else widths)
  if len(widths) != len(specs):
    raise ValueError(f"the {net} trunk has {len(specs)} convs, got {len(widths)} widths")
  trunk, in_channels = {}, 3
  for (index, kernel, _, _), out_channels in zip(specs, widths):
    trunk[f"features.{index}.weight"] = (out_channels, in_channels, kernel, kernel)
    trunk[f"features.{index}.bias"] = (out_channels,)
    in_channels = out_channels
  lin, conv = {}, 0
  for tap, (_, convs) in enumerate(_ARCHS[net]):
    conv += len(convs)
    lin[f"lin{tap}.model.1.weight"] = (1, widths[conv - 1], 1, 1)
  return trunk, lin


def _take(state: Mapping[str, Any], shapes: Mapping[str, tuple], source: str) -> dict[str, np.ndarray]:
  """The arrays of `state` named in `shapes`, float32; ValueError naming `source` and the key otherwise."""
  arrays = {}
  for key, shape in shapes.items():
    if key not in state:
      raise ValueError(f"{source}: missing key {key!r} (expected shape {shape})")
    value = np.asarray(state[key])
    if value.shape != shape:
      raise ValueError(f"{source}: key {key!r} has shape {value.shape}, expected {shape}")
    if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
      raise ValueError(f"{source}: key {key!r} has dtype {value.dtype}, expected floating point")
    arrays[key] = value.astype(np.float32)
  return arrays


def from_state_dicts(net: str,
                     trunk: Mapping[str, Any],
                     lin: Mapping[str, Any],
                     *,
                     widths: Sequence[int] | None = None,
                     trunk_source: str = "trunk weights",
                     lin_source: str = "lin weights") -> LPIPS:
  """torch-layout state dicts (see `expected_shapes`) -> LPIPS. Extra keys are ignored; a missing or
    mis-shaped key raises ValueError naming `trunk_source` / `lin_source` (e.g. the file) and the key."""
  net = _canonical_net(net)
  trunk_shapes, lin_shapes = expected_shapes(net, widths)
  trunk_arrays = _take(trunk, trunk_shapes, trunk_source)
  lin_arrays = _take(lin, lin_shapes, lin_source)
  convs = tuple({
      "kernel": jnp.asarray(trunk_arrays[f"features.{index}.weight"].transpose(2, 3, 1, 0)),  # OIHW -> HWIO
      "bias": jnp.asarray(trunk_arrays[f"features.{index}.bias"]),
  } for index, _, _, _ in _conv_specs(net))
  lins = tuple(jnp.asarray(lin_arrays[key].reshape(-1)) for key in lin_shapes)
  return LPIPS(net=net, params={"convs": convs, "lins": lins})


def _read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A '.npz' (np.savez of name -> array) or a torch.save'd state dict ('.pth' or any other name)."""
  path = os.fspath(path)
  if path.endswith(".npz"):
    from distill import writers  # deferred: it imports TensorBoard's protos
    with writers.read_npz(path) as data:
      return {key: data[key] for key in data.files}
  from distill.evaluation import torch_weights
  return torch_weights.load_torch_state_dict(path)


def load_lpips(net: str, trunk_path: str | os.PathLike, lin_path: str | os.PathLike) -> LPIPS:
  """LPIPS with `net` ('alex' or 'vgg'; 'alexnet', 'vgg16' also accepted) from two files: the torchvision
    trunk state dict (e.g. alexnet-owt-7be5be79.pth, vgg16-397923af.pth) and the lpips package's
    `weights/v0.1/{alex,vgg}.pth`, each `.pth` or `.npz` with the same keys, local or a URL.

    Raises ValueError naming the file and the key when a key is missing or has the wrong shape for `net`.
    """
  net = _canonical_net(net)
  return from_state_dicts(net, _read_state_dict(trunk_path), _read_state_dict(lin_path),
                          trunk_source=f"{net} trunk file {os.fspath(trunk_path)}",
                          lin_source=f"{net} lin file {os.fspath(lin_path)}")


def _max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H - window) // stride + 1, ...]: torch's MaxPool2d(window, stride), no padding."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID")


def _trunk_taps(net: str, convs, x: jax.Array, precision) -> list[jax.Array]:
  """x [B, H, W, 3] (scaled) -> the five ReLU taps [B, H_t, W_t, C_t]."""
  taps, conv = [], iter(convs)
  for pool, specs in _ARCHS[net]:
    if pool is not None:
      x = _max_pool(x, *pool)
    for _, _, stride, padding in specs:
      weights = next(conv)
      x = jax.lax.conv_general_dilated(x, weights["kernel"], (stride, stride), ((padding, padding),) * 2,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
      x = jax.nn.relu(x + weights["bias"])
    taps.append(x)
  return taps


def _check_size(net: str, height: int, width: int) -> None:
  """ValueError unless every conv and pool of the trunk has output for [H, W] inputs."""

  def fits(size: int) -> bool:
    for pool, specs in _ARCHS[net]:
      if pool is not None:
        size = (size - pool[0]) // pool[1] + 1
      for _, kernel, stride, padding in specs:
        if size < 1:
          return False
        size = (size + 2 * padding - kernel) // stride + 1
    return size >= 1

  if not (fits(height) and fits(width)):
    smallest = next(size for size in range(1, 1024) if fits(size))
    raise ValueError(f"images of {height}x{width} are too small for the LPIPS {net} trunk "
                     f"(at least {smallest}x{smallest}; pass resize_to)")


def _normalize(features: jax.Array) -> jax.Array:
  """features / (sqrt(sum_c features^2) + 1e-10) over the last axis (lpips' normalize_tensor)."""
  return features / (jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True)) + _EPS)


def _prepare(images: jax.Array, net: str, resize_to, precision) -> jax.Array:
  """[B, H, W, 1 or 3] in [-1, 1] -> [B, H', W', 3]: grey to RGB, resized, through the ScalingLayer."""
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  if resize_to is not None:
    size = (resize_to, resize_to) if isinstance(resize_to, int) else tuple(resize_to)
    images = inception.resize_bilinear(images, size, precision=precision)
  _check_size(net, images.shape[1], images.shape[2])
  return (images - jnp.asarray(_SHIFT, jnp.float32)) / jnp.asarray(_SCALE, jnp.float32)


@functools.partial(jax.jit, static_argnames=("resize_to", "precision"))
def lpips_distance(model: LPIPS,
                   a: jax.Array,
                   b: jax.Array,
                   resize_to: int | tuple[int, int] | None = None,
                   precision: Any = _HIGHEST) -> jax.Array:
  """LPIPS distance per example: a, b [B, H, W, C] float in [-1, 1], C in (1, 3) -> [B] float32.

    resize_to: None (as given), an int S (S x S) or (H', W'): bilinear resize of both first, as torch's
    F.interpolate(mode='bilinear', align_corners=False). Differentiable in a and b (and the params).
    d(x, x) is 0 and d symmetric up to float rounding (XLA fuses the two halves as it likes: ~1e-15 on CPU).
    """
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if a.shape != b.shape or a.ndim != 4 or a.shape[-1] not in (1, 3):
    raise ValueError(f"LPIPS needs two [B, H, W, 1 or 3] image batches of one shape, got {a.shape} and {b.shape}")
  batch = a.shape[0]
  images = _prepare(jnp.concatenate([a, b]), model.net, resize_to, precision)  # one trunk pass for both
  taps = _trunk_taps(model.net, model.params["convs"], images, precision)
  total = jnp.zeros((batch,), jnp.float32)
  for features, weights in zip(taps, model.params["lins"]):
    features = _normalize(features)
    squared = jnp.square(features[:batch] - features[batch:])
    total = total + jnp.mean(jnp.sum(squared * weights, axis=-1), axis=(1, 2))
  return total
