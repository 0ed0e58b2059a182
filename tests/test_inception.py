"""FID Inception: network shapes and resize, weight conversion, the torch reader and its safety."""
import os
import pickle
import zipfile

import numpy as np
import pytest
from flax import traverse_util

from distill import testing
from distill.evaluation import convert_inception, inception, torch_weights

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="module")
def params():
  """Random FID Inception params (He-scaled kernels, unit BatchNorm), made without compiling init."""
  rng = np.random.default_rng(0)
  flat = {}
  for path, shape in inception.param_shapes().items():
    if path[-1] == "kernel":
      flat[path] = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[:-1])))
    elif path[-1] in ("scale", "var"):
      flat[path] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      flat[path] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def state_dict(params):
  """What pytorch-fid's state dict looks like: torch names and layouts, with num_batches_tracked."""
  result = convert_inception.params_to_state_dict(params)
  for name in list(result):
    if name.endswith(".bn.running_var"):
      result[name.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
  return result


def test_outputs_at_299(params):
  images = np.random.default_rng(1).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
  pool3, logits = inception.inception_outputs(params, images)
  assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
  assert np.all(np.isfinite(pool3)) and np.all(np.isfinite(logits))
  assert np.all(np.asarray(pool3) >= 0)  # an average of ReLUs
  np.testing.assert_allclose(logits, np.asarray(pool3) @ params["fc"]["kernel"], rtol=1e-4, atol=1e-4)


def test_smaller_input_is_resized(params):
  images = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  resized = inception.preprocess(images)
  assert resized.shape == (2, 299, 299, 3)
  pool3, logits = inception.inception_outputs(params, images)
  expected_pool3, expected_logits = inception.inception_outputs(params, resized)
  np.testing.assert_array_equal(pool3, expected_pool3)
  np.testing.assert_array_equal(logits, expected_logits)
  grey = images[..., :1]
  np.testing.assert_array_equal(inception.preprocess(grey), inception.preprocess(np.repeat(grey, 3, -1)))


def test_resize_matches_torch_interpolate():
  with np.load(os.path.join(DATA, "resize.npz")) as cases:
    for i in range(3):
      x, y = cases[f"input_{i}"], cases[f"output_{i}"]
      np.testing.assert_allclose(inception.resize_bilinear(x, y.shape[1:3]), y, atol=1e-6)
      # Affine in the values: resizing [-1, 1] images equals resizing [0, 1] ones, then 2x - 1.
      np.testing.assert_allclose(inception.resize_bilinear(2 * x - 1, y.shape[1:3]), 2 * y - 1, atol=2e-6)
  x = np.random.default_rng(3).uniform(-1, 1, (1, 299, 299, 3)).astype(np.float32)
  np.testing.assert_array_equal(inception.preprocess(x), x)


def test_frozen_batch_norm():
  x = np.random.default_rng(4).standard_normal((2, 3, 3, 4)).astype(np.float32)
  p = {"scale": np.full(4, 2.0, np.float32), "bias": np.ones(4, np.float32),
       "mean": np.full(4, 0.5, np.float32), "var": np.full(4, 3.0, np.float32)}
  out = inception.FrozenBatchNorm().apply({"params": p}, x)
  np.testing.assert_allclose(out, (x - 0.5) / np.sqrt(3.0 + 1e-3) * 2.0 + 1.0, rtol=1e-6, atol=1e-6)


def test_real_names_and_shapes():
  """Independent of the Flax tree: facts about pytorch-fid's FID Inception state dict."""
  names = {convert_inception.params_path_to_torch_name(p): s for p, s in inception.param_shapes().items()}
  torch_shapes = {name: tuple(np.array(s)[[3, 2, 0, 1]]) if name.endswith("conv.weight") else s
                  for name, s in names.items()}
  torch_shapes["fc.weight"] = names["fc.weight"][::-1]
  assert torch_shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert torch_shapes["Conv2d_4a_3x3.bn.running_var"] == (192,)
  assert torch_shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
  assert torch_shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
  assert torch_shapes["Mixed_7b.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
  assert torch_shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
  assert torch_shapes["fc.weight"] == (1008, 2048)
  assert torch_shapes["fc.bias"] == (1008,)
  assert sum(name.endswith("conv.weight") for name in names) == 94
  assert sum(int(np.prod(s)) for s in names.values()) == 23_885_392


def test_converter_fills_the_tree(params, state_dict):
  assert state_dict["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
  assert state_dict["fc.weight"].shape == (1008, 2048)
  converted = convert_inception.state_dict_to_params(state_dict)
  flat, expected = traverse_util.flatten_dict(converted), traverse_util.flatten_dict(params)
  assert flat.keys() == expected.keys()
  for path, value in expected.items():
    np.testing.assert_array_equal(flat[path], value)


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update({"AuxLogits.fc.weight": np.zeros((1000, 768))}), "unexpected AuxLogits.fc.weight"),
    (lambda sd: sd.pop("Mixed_7c.branch_pool.bn.running_var"), "missing Mixed_7c.branch_pool.bn.running_var"),
    (lambda sd: sd.update({"fc.weight": np.zeros((1000, 2048))}),
     "fc.weight has shape (1000, 2048), expected (1008, 2048)"),
])
def test_converter_rejects_a_different_state_dict(state_dict, change, message):
  changed = dict(state_dict)
  change(changed)
  with pytest.raises(ValueError) as error:
    convert_inception.state_dict_to_params(changed)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_convert_command_round_trip(params, state_dict, tmp_path, capsys):
  src, dst = tmp_path / "state_dict.npz", tmp_path / "weights" / "inception_fid.npz"
  np.savez(src, **state_dict)
  assert convert_inception.main([str(src), str(dst)]) == 0
  assert "23,885,392 parameters" in capsys.readouterr().out
  loaded = inception.load_inception(dst)
  testing.assert_trees_equal(loaded, params)


def test_convert_command_one_line_error(tmp_path, capsys):
  dst = tmp_path / "out.npz"
  assert convert_inception.main([os.path.join(DATA, "state_dict_zip.pth"), str(dst)]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "fc.weight has shape (5, 7), expected (1008, 2048)" in err
  assert "missing Conv2d_2a_3x3" in err and "more" in err
  assert not dst.exists()


def test_missing_weights_say_what_to_do(tmp_path):
  path = tmp_path / "inception_fid.npz"
  with pytest.raises(inception.InceptionWeightsMissing) as error:
    inception.load_inception(path)
  message = str(error.value)
  assert "\n" not in message and str(path) in message
  assert inception.WEIGHTS_FILE in message and "python -m distill.evaluation.convert_inception" in message


def test_load_rejects_other_weights(tmp_path):
  path = tmp_path / "classifier.npz"
  np.savez(path, **{"conv_0/kernel": np.zeros((3, 3, 1, 16), np.float32)})
  with pytest.raises(ValueError, match="not the FID Inception's parameters"):
    inception.load_inception(path)


@pytest.mark.parametrize("name", ["state_dict_zip.pth", "state_dict_legacy.pth"])
def test_torch_reader_reproduces_torch_save(name):
  with np.load(os.path.join(DATA, "state_dict.npz")) as data:
    expected = {key: data[key] for key in data.files}
  loaded = torch_weights.load_torch_state_dict(os.path.join(DATA, name))
  assert list(loaded) == list(expected)
  for key, value in expected.items():
    assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
    np.testing.assert_array_equal(loaded[key], value)
  assert loaded["Conv2d_1a_3x3.bn.num_batches_tracked"] == 2**40 + 7


def _zip_checkpoint(path, data_pkl: bytes, storages=None):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", data_pkl)
    for key, raw in (storages or {}).items():
      archive.writestr(f"archive/data/{key}", raw)


class _RunsAShellCommand:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["legacy", "zip"])
def test_torch_reader_refuses_code(tmp_path, container):
  marker = tmp_path / "was_run"
  payload = pickle.dumps({"w": _RunsAShellCommand(marker)}, protocol=2)
  path = tmp_path / "evil.pth"
  if container == "zip":
    _zip_checkpoint(path, payload)
  else:
    path.write_bytes(payload)
  with pytest.raises(torch_weights.UnsafePickleError, match="refusing to load posix.system|refusing to load nt.system"):
    torch_weights.load_torch_state_dict(path)
  assert not marker.exists()


def test_torch_reader_refuses_views_outside_their_storage(tmp_path):
  # {'w': _rebuild_tensor_v2(FloatStorage of 4, offset 0, size (3,), stride (5,), False, OrderedDict())}
  storage = b"(Vstorage\nctorch\nFloatStorage\nV0\nVcpu\nI4\ntQ"
  data_pkl = (b"ccollections\nOrderedDict\n)RVw\nctorch._utils\n_rebuild_tensor_v2\n(" + storage +
              b"I0\n(I3\nt(I5\ntI00\nccollections\nOrderedDict\n)RtRs.")
  path = tmp_path / "out_of_bounds.pth"
  _zip_checkpoint(path, data_pkl, {"0": np.arange(4, dtype="<f4").tobytes()})
  with pytest.raises(ValueError, match="outside its storage"):
    torch_weights.load_torch_state_dict(path)
  in_bounds = tmp_path / "in_bounds.pth"
  _zip_checkpoint(in_bounds, data_pkl.replace(b"(I5\nt", b"(I1\nt"), {"0": np.arange(4, dtype="<f4").tobytes()})
  np.testing.assert_array_equal(torch_weights.load_torch_state_dict(in_bounds)["w"], [0.0, 1.0, 2.0])
