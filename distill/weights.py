"""Weight files made elsewhere, read as untrusted input into {name: np.ndarray}: `.safetensors` (read here, no
dependency), torch's `.pth` / `.pt` / `.bin` / `.ckpt` (`evaluation.torch_weights`, pickle-free; a PyTorch
Lightning `.ckpt` holds its tensors under 'state_dict'), and diffusers' model folders (`vae/`: config.json beside
diffusion_pytorch_model.safetensors or .bin). `read_state_dict(path)` dispatches on the suffix.

safetensors (huggingface/safetensors): 8 bytes, a little-endian u64 N; N bytes of UTF-8 JSON, an object
{name: {"dtype": D, "shape": [d0, …], "data_offsets": [begin, end]}, "__metadata__": {str: str} (optional)};
then the data section, each tensor's little-endian C-order bytes at [begin, end) from the section's start.
Before anything is allocated: N fits the file and `MAX_HEADER_BYTES`; each entry has exactly those three fields,
a dtype of `DTYPES`, a shape of at most 32 integers in [0, 2**62), offsets inside the data section that no other
tensor's overlap, and prod(shape) · itemsize == end − begin. Tensors are then read with bounded reads (their
total is at most the file's size; BF16 becomes float32, twice its bytes). Anything else: one ValueError line
naming the file and the tensor.
"""
from __future__ import annotations

import io
import json
import math
import os
import reprlib
from typing import Callable, Mapping

import ml_dtypes
import numpy as np
from etils import epath

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
_MAX_DIMS = 32
_MAX_INT = 2**62
# safetensors dtype -> (numpy dtype of the stored bytes, itemsize). BF16 is read as its bits and widened to float32
# (its 16 bits are the top half of a float32's); BOOL as bytes, nonzero = True.
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U8": "u1", "BOOL": "u1"}
TORCH_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
# A diffusers model folder's weight file, in the order diffusers itself prefers them.
DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                   "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
# A transformers model folder's (a pipeline's text_encoder/), likewise.
TRANSFORMERS_FILES = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80


def _fail(where: str, what: str):
  raise ValueError(f"{where}: {what}")


def _unique_keys(pairs):
  out = {}
  for key, value in pairs:
    if key in out:
      raise ValueError(f"the header names {_short.repr(key)} twice")
    out[key] = value
  return out


def _int(value) -> bool:
  return type(value) is int and 0 <= value < _MAX_INT  # noqa: E721 — bool is not a size


def safetensors_header(f, size: int, where: str) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
  """The checked header of a safetensors file open as `f` (`size` bytes): {name: (dtype, shape, begin, end)},
  offsets from the start of the file. ValueError (one line starting with `where`) on anything malformed."""
  raw = f.read(8)
  if len(raw) != 8:
    _fail(where, f"{size} bytes: too short for safetensors' 8-byte header length")
  n = int.from_bytes(raw, "little")
  if n > size - 8:
    _fail(where, f"header length {n} runs past the file's {size} bytes")
  if n > MAX_HEADER_BYTES:
    _fail(where, f"header length {n} exceeds the cap of {MAX_HEADER_BYTES} bytes")
  text = f.read(n)
  try:
    header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
  except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    first = (str(e).splitlines() or [""])[0][:120]
    _fail(where, f"unreadable JSON header ({type(e).__name__}: {first})")
  if not isinstance(header, dict):
    _fail(where, f"the header is a JSON {type(header).__name__}, not an object")
  data_start, data_size = 8 + n, size - 8 - n
  entries = {}
  for name, info in header.items():
    tensor = f"{where}: tensor {_short.repr(name)}"
    if name == "__metadata__":
      if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
        raise ValueError(f"{where}: __metadata__ must map strings to strings")
      continue
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
      raise ValueError(f"{tensor}: must hold exactly dtype, shape and data_offsets, got {_short.repr(info)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
      raise ValueError(f"{tensor}: dtype {_short.repr(dtype)} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_int(d) for d in shape):
      raise ValueError(f"{tensor}: shape {_short.repr(shape)} is not a list of at most {_MAX_DIMS} integers "
                       "in [0, 2**62)")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(o) for o in offsets)
        or offsets[0] > offsets[1] or offsets[1] > data_size):
      raise ValueError(f"{tensor}: data_offsets {_short.repr(offsets)} are not [begin, end] with "
                       f"0 <= begin <= end <= {data_size} (the data section's size)")
    nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if nbytes != offsets[1] - offsets[0]:
      raise ValueError(f"{tensor}: shape {tuple(shape)} of {dtype} needs {nbytes} bytes, its offsets span "
                       f"{offsets[1] - offsets[0]}")
    entries[name] = (dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
  spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
  for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
    if begin < prev_end:
      raise ValueError(f"{where}: tensor {_short.repr(name)} overlaps tensor {_short.repr(prev)}")
  return entries


def _read_tensor(f, dtype: str, shape: tuple, begin: int, end: int, where: str) -> np.ndarray:
  f.seek(begin)
  buffer = bytearray(end - begin)  # checked against the file's size: no larger than the file
  if f.readinto(buffer) != len(buffer):
    raise ValueError(f"{where}: the file ends inside the tensor")
  stored = np.frombuffer(buffer, DTYPES[dtype]).reshape(shape)
  if dtype == "BF16":
    return (stored.astype(np.uint32) << 16).view(np.float32)
  if dtype == "BOOL":
    return stored != 0
  return stored.astype(stored.dtype.newbyteorder("="), copy=False)


def _read_safetensors(f, size: int, where: str, select: Callable[[str], bool] | None) -> dict[str, np.ndarray]:
  entries = safetensors_header(f, size, where)
  return {name: _read_tensor(f, *entry, f"{where}: tensor {_short.repr(name)}")
          for name, entry in entries.items() if select is None or select(name)}


def read_safetensors(path: str | os.PathLike, select: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
  """A `.safetensors` file -> {name: array} in the header's order (F16 stays float16, BF16 becomes float32, BOOL
  bool, the rest their own dtype). select(name): read only the tensors it accepts (the whole header is checked
  either way). OSError when the file cannot be read; ValueError (one line naming file and tensor) otherwise."""
  with epath.Path(path).open("rb") as f:
    f.seek(0, io.SEEK_END)
    size = f.tell()
    f.seek(0)
    return _read_safetensors(f, size, str(path), select)


def safetensors_from_bytes(raw: bytes, select: Callable[[str], bool] | None = None,
                           where: str = "<bytes>") -> dict[str, np.ndarray]:
  """`read_safetensors` of a file's bytes."""
  return _read_safetensors(io.BytesIO(raw), len(raw), where, select)


_WRITE_DTYPES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                 np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
                 np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8",
                 np.dtype(np.bool_): "BOOL"}


def safetensors_bytes(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
  """{name: array} -> a safetensors file's bytes (tensors in the mapping's order, the header padded with spaces to
  a multiple of 8 bytes, as safetensors' own writer does). ValueError on a dtype safetensors cannot hold."""
  header, chunks, offset = {}, [], 0
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for name, array in arrays.items():
    a = np.asarray(array)
    if a.dtype.newbyteorder("=") not in _WRITE_DTYPES:
      raise ValueError(f"tensor {_short.repr(name)}: dtype {a.dtype} has no safetensors dtype")
    data = np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": _WRITE_DTYPES[a.dtype.newbyteorder("=")], "shape": list(a.shape),
                    "data_offsets": [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def write_safetensors(path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes `safetensors_bytes(arrays, metadata)` to `path` atomically (a killed write leaves no half file)."""
  from distill import writers
  writers.atomic_write_bytes(str(path), safetensors_bytes(arrays, metadata))


def diffusers_weight_file(folder: str | os.PathLike, subfolder: str = "vae") -> str:
  """The weight file of a diffusers or transformers model folder (`DIFFUSERS_FILES`, then `TRANSFORMERS_FILES`,
  the first present), or of its `subfolder` (vae, unet, text_encoder) when `folder` is a whole pipeline's.
  ValueError (one line) when there is none (sharded weights, *.safetensors.index.json, are not read)."""
  root = epath.Path(folder)
  for base in (root, root / subfolder):
    for name in DIFFUSERS_FILES + TRANSFORMERS_FILES:
      if (base / name).is_file():
        return str(base / name)
  for base in (root, root / subfolder):
    for name in (DIFFUSERS_FILES[0], TRANSFORMERS_FILES[0]):
      if (base / f"{name}.index.json").is_file():
        raise ValueError(f"{base}: sharded weights ({name}.index.json) are not read; join the shards into one "
                         f"{name}")
  raise ValueError(f"{folder}: a folder without a diffusers weight file ({DIFFUSERS_FILES[0]} or "
                   f"{DIFFUSERS_FILES[2]}, in it or in its {subfolder}/)")


def read_state_dict(path: str | os.PathLike, select: Callable[[str], bool] | None = None,
                    subfolder: str = "vae") -> dict[str, np.ndarray]:
  """A weight file -> {name: array}: `.safetensors` here, `.ckpt` / `.pth` / `.pt` / `.bin` through the pickle-free
  torch reader (a Lightning `.ckpt`'s 'state_dict' entry), a diffusers model folder through its weight file
  (`diffusers_weight_file`, a pipeline folder's `subfolder`). select(name): keep only those tensors (a
  safetensors file reads no others). OSError when a file cannot be read; ValueError (one line naming the file)
  when it is not a weight file."""
  p = str(path)
  if epath.Path(p).is_dir():
    p = diffusers_weight_file(p, subfolder)
  if p.endswith(".safetensors"):
    return read_safetensors(p, select)
  if not p.endswith(TORCH_SUFFIXES):
    raise ValueError(f"{p}: not a weight file this reads (suffixes: {', '.join(SUFFIXES)}, or a diffusers folder)")
  from distill.evaluation import torch_weights
  try:
    state = torch_weights.load_torch_state_dict(p, entry="state_dict")
  except ValueError as e:
    raise ValueError(f"{p}: {e}") from None
  return {k: v for k, v in state.items() if select is None or select(k)}
