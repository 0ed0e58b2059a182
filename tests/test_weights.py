"""Weight files (distill/weights.py): the bounded `.safetensors` reader against files written by hand with struct and
json, its writer, a few thousand random and crafted byte strings (each a correct load or one ValueError line,
never a large allocation), and `read_state_dict`'s dispatch (.safetensors, torch files, Lightning .ckpt, diffusers
folders)."""
import json
import os
import shutil
import struct
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from distill import weights
from distill.evaluation import torch_weights

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
FORMATS = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "u1"}


def hand_file(tensors, metadata=None, pad=True) -> bytes:
  """A safetensors file from [(name, dtype, shape, raw bytes)], laid out by hand: u64 header length, JSON,
  the bytes back to back."""
  header, offset = {}, 0
  if metadata is not None:
    header["__metadata__"] = metadata
  for name, dtype, shape, raw in tensors:
    header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
    offset += len(raw)
  text = json.dumps(header).encode()
  if pad:
    text += b" " * (-len(text) % 8)
  return struct.pack("<Q", len(text)) + text + b"".join(raw for *_, raw in tensors)


# BF16 bit patterns written by hand: 1.5 = 0x3FC0, -2 = 0xC000, 2**-126 (the smallest normal) = 0x0080.
SAMPLE = [
    ("f32", "F32", (2, 3), struct.pack("<6f", 0, 1, 2, 3, 4.5, -6)),
    ("f16", "F16", (2,), struct.pack("<2e", 1.0, -0.5)),
    ("bf16", "BF16", (3,), struct.pack("<3H", 0x3FC0, 0xC000, 0x0080)),
    ("f64", "F64", (1, 1), struct.pack("<d", np.pi)),
    ("i64", "I64", (2,), struct.pack("<2q", -(2**40), 7)),
    ("i32", "I32", (), struct.pack("<i", -3)),
    ("i16", "I16", (2,), struct.pack("<2h", -2, 300)),
    ("i8", "I8", (2,), struct.pack("<2b", -128, 127)),
    ("u8", "U8", (3,), bytes([0, 128, 255])),
    ("bool", "BOOL", (2, 1), bytes([1, 0])),
    ("empty", "F32", (0, 4), b""),
]
EXPECTED = {
    "f32": np.array([[0, 1, 2], [3, 4.5, -6]], np.float32), "f16": np.array([1.0, -0.5], np.float16),
    "bf16": np.array([1.5, -2.0, 2.0**-126], np.float32), "f64": np.array([[np.pi]]),
    "i64": np.array([-(2**40), 7], np.int64), "i32": np.array(-3, np.int32), "i16": np.array([-2, 300], np.int16),
    "i8": np.array([-128, 127], np.int8), "u8": np.array([0, 128, 255], np.uint8),
    "bool": np.array([[True], [False]]), "empty": np.zeros((0, 4), np.float32),
}


def test_reads_a_hand_written_file_exactly(tmp_path):
  path = tmp_path / "sample.safetensors"
  path.write_bytes(hand_file(SAMPLE, metadata={"format": "pt"}))
  for loaded in (weights.read_safetensors(path), weights.read_state_dict(path)):
    assert list(loaded) == [name for name, *_ in SAMPLE]
    for name, want in EXPECTED.items():
      assert loaded[name].dtype == want.dtype and loaded[name].shape == want.shape, name
      np.testing.assert_array_equal(loaded[name], want)
  assert list(weights.read_safetensors(path, select=lambda n: n.startswith("i"))) == ["i64", "i32", "i16", "i8"]
  unpadded = weights.safetensors_from_bytes(hand_file(SAMPLE, pad=False))
  np.testing.assert_array_equal(unpadded["bf16"], EXPECTED["bf16"])


def _parse_by_hand(raw: bytes) -> dict:
  n, = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + n])
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    begin, end = info["data_offsets"]
    stored = np.frombuffer(raw[8 + n + begin:8 + n + end], FORMATS[info["dtype"]]).reshape(info["shape"])
    out[name] = (info["dtype"], stored)
  return out


def test_writer_writes_what_the_hand_parser_and_the_reader_read():
  arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1.5, -2], ml_dtypes.bfloat16),
            "c": np.array([[True, False]]), "d": np.arange(3, dtype=">i4"), "e": np.float16(2.5)}
  raw = weights.safetensors_bytes(arrays, {"who": "test"})
  n, = struct.unpack("<Q", raw[:8])
  assert n % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"] == {"who": "test"}
  by_hand = _parse_by_hand(raw)
  assert [by_hand[k][0] for k in arrays] == ["F32", "BF16", "BOOL", "I32", "F16"]
  np.testing.assert_array_equal(by_hand["b"][1], np.array([0x3FC0, 0xC000]))
  loaded = weights.safetensors_from_bytes(raw)
  for name, want in arrays.items():
    want = np.asarray(want)
    want = want.astype(np.float32) if want.dtype == ml_dtypes.bfloat16 else want
    assert loaded[name].dtype == want.dtype.newbyteorder("=") and loaded[name].shape == want.shape
    np.testing.assert_array_equal(loaded[name], want)
  with pytest.raises(ValueError, match="has no safetensors dtype"):
    weights.safetensors_bytes({"x": np.array(["s"])})


def test_against_the_safetensors_package(tmp_path):
  numpy_io = pytest.importorskip("safetensors.numpy", reason="the safetensors package is not installed here (not a "
                                 "dependency: the reader is our own); the hand-written files above stand in for it")
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int64),
            "c": np.ones((2, 2), np.float16)}
  numpy_io.save_file(arrays, str(tmp_path / "theirs.safetensors"))
  ours = weights.read_safetensors(tmp_path / "theirs.safetensors")
  assert set(ours) == set(arrays) and all(np.array_equal(ours[k], arrays[k]) for k in arrays)
  theirs = numpy_io.load(weights.safetensors_bytes(arrays))
  assert all(np.array_equal(theirs[k], arrays[k]) for k in arrays)


# --- hostile bytes -----------------------------------------------------------------------------------------


def _with_header(header, data=b"", length=None) -> bytes:
  text = header if isinstance(header, bytes) else json.dumps(header).encode()
  return struct.pack("<Q", len(text) if length is None else length) + text + data


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
  return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


CRAFTED = {
    "empty": b"",
    "seven_bytes": b"\x00" * 7,
    "length_past_the_end": _with_header({}, length=10**6),
    "length_2_63": _with_header({}, length=2**63),
    "not_json": _with_header(b"{nope"),
    "not_utf8": _with_header(b'{"\xff":1}'),
    "a_list": _with_header([1, 2]),
    "deep_nesting": _with_header(b"[" * 200000 + b"]" * 200000),
    "duplicate_names": _with_header(b'{"a":' + json.dumps(_entry()).encode() + b',"a":' +
                                    json.dumps(_entry()).encode() + b"}", b"\0" * 8),
    "unknown_dtype": _with_header({"w": _entry(dtype="F8_E4M3", shape=(8,))}, b"\0" * 8),
    "dtype_not_a_string": _with_header({"w": _entry(dtype=4)}, b"\0" * 8),
    "missing_field": _with_header({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
    "extra_field": _with_header({"w": {**_entry(), "x": 1}}, b"\0" * 8),
    "entry_not_a_dict": _with_header({"w": [1]}),
    "huge_shape": _with_header({"w": _entry(shape=(2**40, 2**40), offsets=(0, 8))}, b"\0" * 8),
    "huge_shape_that_fits_its_lie": _with_header({"w": _entry(shape=(2**61,), offsets=(0, 2**63))}, b"\0" * 8),
    "negative_dim": _with_header({"w": _entry(shape=(-2,))}, b"\0" * 8),
    "bool_dim": _with_header({"w": _entry(shape=(True, 2))}, b"\0" * 8),
    "float_dim": _with_header({"w": _entry(shape=(2.0,))}, b"\0" * 8),
    "too_many_dims": _with_header({"w": _entry(shape=(1,) * 33, offsets=(0, 4))}, b"\0" * 4),
    "shape_too_small": _with_header({"w": _entry(shape=(1,))}, b"\0" * 8),
    "offsets_past_the_data": _with_header({"w": _entry(offsets=(0, 8))}, b"\0" * 4),
    "offsets_reversed": _with_header({"w": _entry(offsets=(8, 0))}, b"\0" * 8),
    "offsets_negative": _with_header({"w": _entry(offsets=(-8, 0))}, b"\0" * 8),
    "offsets_three": _with_header({"w": _entry(offsets=(0, 4, 8))}, b"\0" * 8),
    "overlap": _with_header({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, b"\0" * 12),
    "same_span_twice": _with_header({"a": _entry(), "b": _entry()}, b"\0" * 8),
    "metadata_not_strings": _with_header({"__metadata__": {"a": 1}}),
    "bf16_odd_bytes": _with_header({"w": _entry(dtype="BF16", shape=(2,), offsets=(0, 3))}, b"\0" * 3),
}
# Crafted files that are well formed, and what they hold.
CRAFTED_LOADS = {
    "no_tensors": (_with_header({}), {}),
    "metadata_only": (_with_header({"__metadata__": {"a": "b"}}), {}),
    "empty_tensors_share_an_offset": (_with_header({"a": _entry(shape=(0,), offsets=(4, 4)),
                                                    "b": _entry(shape=(1,), offsets=(0, 4))}, struct.pack("<f", 2)),
                                      {"a": np.zeros(0, np.float32), "b": np.array([2], np.float32)}),
    "trailing_bytes": (_with_header({"w": _entry(shape=(1,), offsets=(0, 4))}, struct.pack("<f", 3) + b"junk"),
                       {"w": np.array([3], np.float32)}),
    "bool_byte_2_is_true": (_with_header({"w": _entry(dtype="BOOL", shape=(2,), offsets=(0, 2))}, b"\x02\x00"),
                            {"w": np.array([True, False])}),
}


def _check_one(raw: bytes, name: str):
  """The reader on `raw`: a correct load or one ValueError line; never more memory than a few times the input."""
  tracemalloc.start()
  try:
    loaded = weights.safetensors_from_bytes(raw, where="case.safetensors")
  except ValueError as e:
    message = str(e)
    assert message.startswith("case.safetensors: ") and "\n" not in message and len(message) < 400, (name, message)
    return "error"
  finally:
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < (1 << 20) + 40 * len(raw), (name, peak, len(raw))
  n, = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + n])
  entries = {k: v for k, v in header.items() if k != "__metadata__"}
  assert list(loaded) == list(entries), name
  for key, info in entries.items():
    begin, end = info["data_offsets"]
    stored = np.frombuffer(raw[8 + n + begin:8 + n + end], FORMATS[info["dtype"]]).reshape(info["shape"])
    want = {"BF16": lambda s: (s.astype(np.uint32) << 16).view(np.float32), "BOOL": lambda s: s != 0}.get(
        info["dtype"], lambda s: s)(stored)
    assert loaded[key].shape == want.shape and np.array_equal(loaded[key], want, equal_nan=True), (name, key)
  return "load"


def _mutations(seed: int):
  """(name, bytes): truncations of the sample file at every length, bit flips and byte overwrites anywhere, flips
  inside the JSON header only (past the length field, so they reach the parser), random strings."""
  rng = np.random.default_rng(seed)
  valid = hand_file(SAMPLE, metadata={"format": "pt"})
  n, = struct.unpack("<Q", valid[:8])
  for cut in range(len(valid)):
    yield f"truncated_{cut}", valid[:cut]
  for i in range(1200):
    raw = bytearray(valid)
    for _ in range(rng.integers(1, 4)):
      pos = int(rng.integers(len(raw)))
      raw[pos] ^= 1 << int(rng.integers(8))
    yield f"bitflip_{i}", bytes(raw)
  for i in range(600):
    raw = bytearray(valid)
    pos = int(rng.integers(8, 8 + n))
    raw[pos] = int(rng.choice([ord(c) for c in '0123456789[]{}",:-.e '] + [0, 0xFF]))
    yield f"header_byte_{i}", bytes(raw)
  lengths = [0, 1, n - 1, n + 1, n + 8, len(valid), 2**32, 2**64 - 1]
  for i in range(300):
    raw = bytearray(valid)
    raw[:8] = struct.pack("<Q", lengths[int(rng.integers(len(lengths)))])
    yield f"length_{i}", bytes(raw)
  for i in range(500):
    yield f"random_{i}", rng.bytes(int(rng.integers(0, 200)))
  for i in range(200):
    body = rng.bytes(int(rng.integers(0, 64)))
    yield f"random_with_length_{i}", struct.pack("<Q", int(rng.integers(0, 80))) + body


def test_fuzz_every_input_loads_correctly_or_is_one_value_error():
  verdicts = {}
  for name, raw in CRAFTED.items():
    verdicts[name] = _check_one(raw, name)
    assert verdicts[name] == "error", name
  for name, (raw, want) in CRAFTED_LOADS.items():
    assert _check_one(raw, name) == "load", name
    loaded = weights.safetensors_from_bytes(raw)
    assert list(loaded) == list(want) and all(np.array_equal(loaded[k], want[k]) for k in want), name
  counts = {"load": 0, "error": 0}
  for name, raw in _mutations(seed=0):
    counts[_check_one(raw, name)] += 1
  assert sum(counts.values()) > 3000 and counts["load"] > 50 and counts["error"] > 1000, counts
  # After all of it the sample still loads exactly.
  assert np.array_equal(weights.safetensors_from_bytes(hand_file(SAMPLE))["f32"], EXPECTED["f32"])


@pytest.mark.parametrize("case, needle", [
    ("huge_shape", "tensor 'w': shape (1099511627776, 1099511627776) of F32 needs"),
    ("overlap", "tensor 'b' overlaps tensor 'a'"),
    ("unknown_dtype", "tensor 'w': dtype 'F8_E4M3' is not one of F64, F32, F16, BF16"),
    ("length_past_the_end", "header length 1000000 runs past the file's"),
    ("offsets_past_the_data", "data_offsets [0, 8] are not [begin, end] with 0 <= begin <= end <= 4"),
    ("duplicate_names", "names 'a' twice"),
])
def test_errors_name_the_file_and_the_tensor(case, needle, tmp_path):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(CRAFTED[case])
  with pytest.raises(ValueError) as error:
    weights.read_safetensors(path)
  assert str(error.value).startswith(f"{path}: ") and needle in str(error.value), str(error.value)


# --- dispatch ------------------------------------------------------------------------------------------------


def _lightning_ckpt_pickle() -> bytes:
  """A protocol-0 data.pkl of {'state_dict': OrderedDict(w=tensor of 4 floats), 'epoch': 3, 'hparams': {...}}:
  a PyTorch Lightning checkpoint's top level (plain values beside the state dict)."""
  tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n((Vstorage\nctorch\nFloatStorage\nV0\nVcpu\nI4\ntQI0\n(I2\nI2\nt"
            b"(I2\nI1\ntI00\nccollections\nOrderedDict\n)RtR")
  state = b"ccollections\nOrderedDict\n)RVw\n" + tensor + b"s"
  return b"(Vstate_dict\n" + state + b"Vepoch\nI3\nVhparams\n(Vlr\nF0.001\ndd."


def test_read_state_dict_dispatches_on_the_suffix(tmp_path):
  import zipfile
  reference = torch_weights.load_torch_state_dict(os.path.join(DATA, "state_dict_zip.pth"))
  for suffix in (".pth", ".pt", ".bin", ".ckpt"):
    shutil.copy(os.path.join(DATA, "state_dict_zip.pth"), tmp_path / f"w{suffix}")
    loaded = weights.read_state_dict(tmp_path / f"w{suffix}")
    assert list(loaded) == list(reference) and all(np.array_equal(loaded[k], reference[k]) for k in reference)
  legacy = weights.read_state_dict(os.path.join(DATA, "state_dict_legacy.pth"))
  assert set(legacy) == set(reference)
  with zipfile.ZipFile(tmp_path / "lightning.ckpt", "w") as archive:
    archive.writestr("archive/data.pkl", _lightning_ckpt_pickle())
    archive.writestr("archive/data/0", np.arange(4, dtype="<f4").tobytes())
  ckpt = weights.read_state_dict(tmp_path / "lightning.ckpt")
  np.testing.assert_array_equal(ckpt["w"], np.arange(4, dtype=np.float32).reshape(2, 2))
  with pytest.raises(ValueError, match="not a state dict"):  # the same file without the entry named
    torch_weights.load_torch_state_dict(tmp_path / "lightning.ckpt")
  (tmp_path / "w.h5").write_bytes(b"x")
  with pytest.raises(ValueError, match=r"w\.h5: not a weight file this reads"):
    weights.read_state_dict(tmp_path / "w.h5")
  (tmp_path / "junk.ckpt").write_bytes(b"not a zip")
  with pytest.raises(ValueError) as error:
    weights.read_state_dict(tmp_path / "junk.ckpt")
  assert str(error.value).startswith(str(tmp_path / "junk.ckpt")) and "\n" not in str(error.value)


def test_diffusers_folders(tmp_path):
  pipeline = tmp_path / "sd"
  (pipeline / "vae").mkdir(parents=True)
  with pytest.raises(ValueError, match="without a diffusers weight file"):
    weights.read_state_dict(pipeline)
  weights.write_safetensors(pipeline / "vae" / "diffusion_pytorch_model.fp16.safetensors",
                            {"x": np.ones(2, np.float16)})
  assert weights.diffusers_weight_file(pipeline).endswith("vae/diffusion_pytorch_model.fp16.safetensors")
  weights.write_safetensors(pipeline / "vae" / "diffusion_pytorch_model.safetensors", {"x": np.ones(2, np.float32)})
  for folder in (pipeline, pipeline / "vae"):  # a pipeline's root or its vae/; the fp32 file first
    assert weights.read_state_dict(folder)["x"].dtype == np.float32


def test_a_pipelines_unet_and_text_encoder_folders(tmp_path):
  pipeline = tmp_path / "sd"
  for sub, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
    (pipeline / sub).mkdir(parents=True)
    weights.write_safetensors(pipeline / sub / name, {sub: np.ones(2, np.float32)})
  assert list(weights.read_state_dict(pipeline, subfolder="unet")) == ["unet"]
  assert list(weights.read_state_dict(pipeline, subfolder="text_encoder")) == ["text_encoder"]
  assert list(weights.read_state_dict(pipeline / "text_encoder")) == ["text_encoder"]
  (pipeline / "big").mkdir()
  (pipeline / "big" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
  with pytest.raises(ValueError, match=r"sharded weights \(diffusion_pytorch_model.safetensors.index.json\) are "
                                       "not read") as error:
    weights.read_state_dict(pipeline, subfolder="big")
  assert "\n" not in str(error.value)
