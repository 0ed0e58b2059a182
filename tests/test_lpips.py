"""LPIPS: the JAX metric against a slow float64 numpy LPIPS written from the paper/lpips-package facts,
its properties and gradients, and reading weights with torchvision/lpips key names (.npz and .pth)."""
import dataclasses
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import testing
from distill.evaluation import lpips

DATA = os.path.join(os.path.dirname(__file__), "data")

# --- an independent float64 LPIPS in torch's NCHW layout, on torch state dicts ------------------------------------

# torchvision's `features` as (kind, stride, padding) per module index: every conv is followed by a ReLU.
_ALEX_FEATURES = [("conv", 4, 2), ("relu",), ("pool", 3, 2), ("conv", 1, 2), ("relu",), ("pool", 3, 2), ("conv", 1, 1),
                  ("relu",), ("conv", 1, 1), ("relu",), ("conv", 1, 1), ("relu",), ("pool", 3, 2)]
_VGG_FEATURES = []
for _v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
  _VGG_FEATURES += [("pool", 2, 2)] if _v == "M" else [("conv", 1, 1), ("relu",)]
# The last module of each of lpips' five slices (pretrained_networks.py): the taps are these modules' outputs.
_TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
_FEATURES = {"alex": _ALEX_FEATURES, "vgg": _VGG_FEATURES}


def _ref_conv(x, weight, bias, stride, padding):
  """x [B, I, H, W], weight [O, I, k, k] -> [B, O, H', W'] (torch Conv2d), as a sum over kernel offsets."""
  x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  k = weight.shape[-1]
  out_h, out_w = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
  out = np.zeros((x.shape[0], weight.shape[0], out_h, out_w))
  for i in range(k):
    for j in range(k):
      patch = x[:, :, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
      out += np.tensordot(patch, weight[:, :, i, j], axes=([1], [1])).transpose(0, 3, 1, 2)
  return out + bias[None, :, None, None]


def _ref_pool(x, window, stride):
  """torch MaxPool2d(window, stride) (no padding, floor) by looping over output pixels."""
  out_h, out_w = (x.shape[2] - window) // stride + 1, (x.shape[3] - window) // stride + 1
  out = np.empty(x.shape[:2] + (out_h, out_w))
  for i in range(out_h):
    for j in range(out_w):
      out[:, :, i, j] = x[:, :, i * stride:i * stride + window, j * stride:j * stride + window].max(axis=(2, 3))
  return out


def _ref_resize(x, out_h, out_w):
  """torch F.interpolate(mode='bilinear', align_corners=False) on [B, C, H, W], pixel by pixel."""

  def taps(in_size, out_size, dst):
    src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
    lo = min(int(np.floor(src)), in_size - 1)
    return lo, min(lo + 1, in_size - 1), src - lo

  out = np.empty(x.shape[:2] + (out_h, out_w))
  for i in range(out_h):
    y0, y1, wy = taps(x.shape[2], out_h, i)
    for j in range(out_w):
      x0, x1, wx = taps(x.shape[3], out_w, j)
      out[:, :, i, j] = ((1 - wy) * ((1 - wx) * x[:, :, y0, x0] + wx * x[:, :, y0, x1]) +
                         wy * ((1 - wx) * x[:, :, y1, x0] + wx * x[:, :, y1, x1]))
  return out


def reference_lpips(net, trunk, lin, a, b, resize_to=None):
  """Per-tap LPIPS [B, 5] in float64; a, b NHWC in [-1, 1]; trunk/lin torch state dicts."""
  trunk = {k: np.asarray(v, np.float64) for k, v in trunk.items()}
  features = []
  for x in (a, b):
    x = np.asarray(x, np.float64).transpose(0, 3, 1, 2)
    if x.shape[1] == 1:
      x = np.concatenate([x] * 3, axis=1)
    if resize_to is not None:
      x = _ref_resize(x, *resize_to)
    x = (x - np.array([-.030, -.088, -.188])[None, :, None, None]) / np.array([.458, .448, .450])[None, :, None, None]
    taps = []
    for index, module in enumerate(_FEATURES[net][:_TAPS[net][-1] + 1]):
      if module[0] == "conv":
        x = _ref_conv(x, trunk[f"features.{index}.weight"], trunk[f"features.{index}.bias"], *module[1:])
      elif module[0] == "relu":
        x = np.maximum(x, 0)
      else:
        x = _ref_pool(x, *module[1:])
      if index in _TAPS[net]:
        taps.append(x / (np.sqrt(np.sum(x**2, axis=1, keepdims=True)) + 1e-10))
    features.append(taps)
  per_tap = []
  for t, (fa, fb) in enumerate(zip(*features)):
    w = np.asarray(lin[f"lin{t}.model.1.weight"], np.float64)[0, :, 0, 0]
    per_tap.append(np.einsum("bchw,c->bhw", (fa - fb)**2, w).mean(axis=(1, 2)))
  return np.stack(per_tap, axis=1)


# --- random weights with torchvision / lpips names ----------------------------------------------------------------

SMALL = {"alex": (8, 12, 16, 12, 10), "vgg": (4, 5, 6, 6, 8, 8, 8, 8, 10, 10, 6, 8, 8)}


def random_state_dicts(net, widths=None, seed=0):
  """(trunk, lin) float32 state dicts: He-scaled conv weights, small biases, lin weights in [0, 1)."""
  rng = np.random.default_rng(seed)
  trunk_shapes, lin_shapes = lpips.expected_shapes(net, widths)
  trunk = {}
  for key, shape in trunk_shapes.items():
    if key.endswith("weight"):
      trunk[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
    else:
      trunk[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  lin = {key: rng.uniform(0, 1, shape).astype(np.float32) for key, shape in lin_shapes.items()}
  return trunk, lin


def images(shape, seed):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(scope="module")
def small():
  """Reduced-width random alex and vgg with the real layer geometry: {net: (LPIPS, trunk, lin)}."""
  result = {}
  for net, widths in SMALL.items():
    trunk, lin = random_state_dicts(net, widths, seed=len(net))
    result[net] = (lpips.from_state_dicts(net, trunk, lin, widths=widths), trunk, lin)
  return result


# --- against the reference ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("net, shape", [("alex", (2, 35, 40, 3)), ("vgg", (2, 32, 24, 3))])
def test_matches_float64_reference(small, net, shape):
  model, trunk, lin = small[net]
  a, b = images(shape, 1), images(shape, 2)
  expected = reference_lpips(net, trunk, lin, a, b).sum(axis=1)
  got = np.asarray(lpips.lpips_distance(model, a, b))
  assert got.shape == (shape[0],) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-4)


@pytest.mark.parametrize("shape, resize_to", [((2, 16, 16, 1), 36), ((1, 48, 44, 3), (35, 33))])
def test_grey_and_resize_match_reference(small, shape, resize_to):
  # Upsampling grey images (repeated to RGB), and shrinking without antialiasing, as torch does.
  model, trunk, lin = small["alex"]
  a, b = images(shape, 3), images(shape, 4)
  size = (resize_to, resize_to) if isinstance(resize_to, int) else resize_to
  expected = reference_lpips("alex", trunk, lin, a, b, resize_to=size).sum(axis=1)
  np.testing.assert_allclose(lpips.lpips_distance(model, a, b, resize_to=resize_to), expected, rtol=1e-4)


# --- properties ---------------------------------------------------------------------------------------------------


def test_identity_symmetry_and_taps(small):
  model, trunk, lin = small["alex"]
  a, b = images((3, 35, 35, 3), 5), images((3, 35, 35, 3), 6)
  np.testing.assert_allclose(lpips.lpips_distance(model, a, a), np.zeros(3), atol=1e-12)  # XLA's rounding only
  d_ab = np.asarray(lpips.lpips_distance(model, a, b))
  assert np.all(d_ab > 0)
  np.testing.assert_allclose(lpips.lpips_distance(model, b, a), d_ab, rtol=1e-6)
  per_tap = reference_lpips("alex", trunk, lin, a, b)
  for tap in range(5):
    lins = list(model.params["lins"])
    lins[tap] = jnp.zeros_like(lins[tap])
    without = dataclasses.replace(model, params={**model.params, "lins": tuple(lins)})
    d_without = np.asarray(lpips.lpips_distance(without, a, b))
    np.testing.assert_allclose(d_ab - d_without, per_tap[:, tap], rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(d_without, per_tap.sum(axis=1) - per_tap[:, tap], rtol=1e-4)


def test_gradient_matches_reference_finite_difference(small):
  model, trunk, lin = small["alex"]
  a, b, v = images((2, 35, 35, 3), 7), images((2, 35, 35, 3), 8), images((2, 35, 35, 3), 9)
  grad_a, grad_b = jax.grad(lambda a, b: lpips.lpips_distance(model, a, b).sum(), argnums=(0, 1))(a, b)
  for grad in (grad_a, grad_b):
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  # Directional derivative along v against a central difference of the float64 reference.
  h = 1e-5
  slope = (reference_lpips("alex", trunk, lin, a.astype(np.float64) + h * v, b).sum() -
           reference_lpips("alex", trunk, lin, a.astype(np.float64) - h * v, b).sum()) / (2 * h)
  np.testing.assert_allclose(np.sum(np.asarray(grad_a, np.float64) * v), slope, rtol=1e-3)


def test_jit_grad_with_resize_and_a_dead_tap(small):
  # conv5's bias far below zero: its ReLU tap is 0 at every pixel, where sqrt(sum f^2) has no derivative. The
  # distance and its gradient (jit, grey images, resize) stay finite, and the distance matches the reference.
  model, trunk, lin = small["alex"]
  trunk = {**trunk, "features.10.bias": np.full_like(trunk["features.10.bias"], -100.0)}
  model = lpips.from_state_dicts("alex", trunk, lin, widths=SMALL["alex"])
  a, b = images((2, 12, 12, 1), 10), images((2, 12, 12, 1), 11)
  per_tap = reference_lpips("alex", trunk, lin, a, b, resize_to=(32, 32))
  assert np.all(per_tap[:, 4] == 0) and np.all(per_tap[:, :4] > 0)
  loss = jax.jit(jax.value_and_grad(lambda m, a, b: lpips.lpips_distance(m, a, b, resize_to=32).sum(), argnums=2))
  value, grad = loss(model, a, b)  # the LPIPS itself is a pytree argument
  np.testing.assert_allclose(value, per_tap.sum(), rtol=1e-4)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_rejects_bad_inputs(small):
  model = small["alex"][0]
  with pytest.raises(ValueError, match="too small.*at least 31x31"):
    lpips.lpips_distance(model, images((1, 30, 40, 3), 0), images((1, 30, 40, 3), 1))
  with pytest.raises(ValueError, match="one shape"):
    lpips.lpips_distance(model, images((1, 35, 35, 3), 0), images((2, 35, 35, 3), 1))
  with pytest.raises(ValueError, match="1 or 3"):
    lpips.lpips_distance(model, images((1, 35, 35, 2), 0), images((1, 35, 35, 2), 1))
  with pytest.raises(ValueError, match="must be one of"):
    lpips.expected_shapes("squeeze")


# --- loading ------------------------------------------------------------------------------------------------------


def test_real_shapes():
  # torchvision alexnet / vgg16 `features` and lpips' lin layers, written out independently of the module.
  alex = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
  vgg, channels, index = {}, 3, 0
  for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
    if v == "M":
      index += 1
    else:
      vgg[index], channels, index = (v, channels, 3), v, index + 2
  for net, convs, lin_channels in [("alex", alex, [64, 192, 384, 256, 256]), ("vgg16", vgg, [64, 128, 256, 512, 512])]:
    trunk = {}
    for i, (out_channels, in_channels, k) in convs.items():
      trunk[f"features.{i}.weight"], trunk[f"features.{i}.bias"] = (out_channels, in_channels, k, k), (out_channels,)
    lin = {f"lin{t}.model.1.weight": (1, c, 1, 1) for t, c in enumerate(lin_channels)}
    assert lpips.expected_shapes(net) == (trunk, lin)


@pytest.fixture(scope="module")
def full_alex(tmp_path_factory):
  """Full-size random torchvision AlexNet + lpips lin weights as .npz files (with a classifier key)."""
  trunk, lin = random_state_dicts("alex", seed=11)
  folder = tmp_path_factory.mktemp("lpips")
  trunk_path, lin_path = str(folder / "alexnet.npz"), str(folder / "alex_lin.npz")
  np.savez(trunk_path, **trunk, **{"classifier.1.weight": np.zeros((4, 9216), np.float32)})
  np.savez(lin_path, **lin)
  return trunk, lin, trunk_path, lin_path


def test_load_full_size_npz(full_alex):
  trunk, lin, trunk_path, lin_path = full_alex
  model = lpips.load_lpips("alexnet", trunk_path, lin_path)
  assert model.net == "alex"
  np.testing.assert_array_equal(model.params["convs"][1]["kernel"], trunk["features.3.weight"].transpose(2, 3, 1, 0))
  a, b = images((1, 35, 37, 3), 12), images((1, 35, 37, 3), 13)
  np.testing.assert_allclose(lpips.lpips_distance(model, a, b),
                             reference_lpips("alex", trunk, lin, a, b).sum(axis=1), rtol=1e-4)


def _torch_save_zip(path, state):
  """Writes `state` (float32 arrays) as torch.save does (zip format, protocol-level pickle), without torch."""
  pkl = b"ccollections\nOrderedDict\n)R"
  for i, (key, value) in enumerate(state.items()):
    ints = lambda xs: b"(" + b"".join(b"I%d\n" % x for x in xs) + b"t"
    strides = [int(np.prod(value.shape[d + 1:])) for d in range(value.ndim)]
    pkl += (b"V" + key.encode() + b"\nctorch._utils\n_rebuild_tensor_v2\n(" +
            b"(Vstorage\nctorch\nFloatStorage\nV%d\nVcpu\nI%d\ntQ" % (i, value.size) + b"I0\n" + ints(value.shape) +
            ints(strides) + b"I00\nccollections\nOrderedDict\n)RtRs")
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", pkl + b".")
    archive.writestr("archive/byteorder", "little")
    for i, value in enumerate(state.values()):
      archive.writestr(f"archive/data/{i}", np.ascontiguousarray(value, "<f4").tobytes())


def test_load_pth(full_alex, tmp_path):
  trunk, lin, trunk_path, lin_path = full_alex
  _torch_save_zip(tmp_path / "alexnet.pth", trunk)
  _torch_save_zip(tmp_path / "alex.pth", lin)
  from_pth = lpips.load_lpips("alex", tmp_path / "alexnet.pth", tmp_path / "alex.pth")
  from_npz = lpips.load_lpips("alex", trunk_path, lin_path)
  testing.assert_trees_equal(from_pth, from_npz)
  # A real torch.save'd file that is not a trunk (the Inception reader's fixture): names file and key.
  fixture = os.path.join(DATA, "state_dict_legacy.pth")
  with pytest.raises(ValueError, match=r"trunk file .*state_dict_legacy\.pth: missing key 'features\.0\.weight'"):
    lpips.load_lpips("alex", fixture, lin_path)


def test_load_errors_name_file_and_key(full_alex, tmp_path):
  trunk, lin, trunk_path, lin_path = full_alex
  missing = dict(trunk)
  del missing["features.8.bias"]
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(ValueError, match=r"trunk file .*missing\.npz: missing key 'features\.8\.bias'"):
    lpips.load_lpips("alex", tmp_path / "missing.npz", lin_path)
  np.savez(tmp_path / "bad_lin.npz", **{**lin, "lin2.model.1.weight": np.ones((1, 383, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"lin file .*bad_lin\.npz: key 'lin2\.model\.1\.weight' has shape "
                     r"\(1, 383, 1, 1\), expected \(1, 384, 1, 1\)"):
    lpips.load_lpips("alex", trunk_path, tmp_path / "bad_lin.npz")
  # The other net's files: VGG's first conv is 3x3, AlexNet's lin1 has 192 channels.
  vgg_trunk, vgg_lin = random_state_dicts("vgg", widths=SMALL["vgg"])
  np.savez(tmp_path / "vgg_trunk.npz", **vgg_trunk)
  with pytest.raises(ValueError, match=r"vgg_trunk\.npz: key 'features\.0\.weight' has shape \(4, 3, 3, 3\)"):
    lpips.load_lpips("alex", tmp_path / "vgg_trunk.npz", lin_path)
  with pytest.raises(ValueError, match=r"vgg trunk file .*alexnet\.npz: key 'features\.0\.weight'"):
    lpips.load_lpips("vgg", trunk_path, lin_path)


@pytest.mark.skipif(not os.environ.get("LPIPS_PACKAGE_DIR"), reason="set LPIPS_PACKAGE_DIR to an unpacked lpips wheel")
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_real_lin_files(net):
  # Development check of the real lpips 0.1.4 lin weights (their .pth is torch's legacy format).
  from distill.evaluation import torch_weights
  path = os.path.join(os.environ["LPIPS_PACKAGE_DIR"], "weights", "v0.1", f"{net}.pth")
  real = torch_weights.load_torch_state_dict(path)
  assert {key: value.shape for key, value in real.items()} == lpips.expected_shapes(net)[1]
