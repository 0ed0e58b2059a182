"""Reads a PyTorch state dict (what `torch.save(module.state_dict(), path)` writes) into numpy,
without torch and without running code from the file.

The pickle inside a `.pth` names the callables that rebuild it. A plain `pickle.load` would call
whatever the file names (`os.system` included); here the unpickler resolves only a whitelist
(collections.OrderedDict, torch._utils._rebuild_tensor[_v2], _rebuild_parameter and torch's typed
storage classes) to numpy stand-ins, and refuses everything else with UnsafePickleError.

Two container formats:
  * zip (torch >= 1.6 default): '<prefix>/data.pkl' is the pickle, each storage is the raw
    little-endian bytes of '<prefix>/data/<key>'; '<prefix>/byteorder' may say otherwise.
  * legacy (`_use_new_zipfile_serialization=False`, and torch < 1.6): five things in a row: a
    pickled magic number, a pickled protocol version (1001), a pickled sys_info dict, the main
    pickle, a pickled list of storage keys; then for each key its storage as an int64 element
    count followed by the raw elements, in the byte order sys_info names.
Tensors are (storage, offset, size, stride) views, all in elements; they become contiguous copies.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import sys
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickleError(pickle.UnpicklingError):
  """The file's pickle names something a state dict does not contain; nothing was called."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """What `torch.FloatStorage` & co. unpickle to: only a dtype. Not callable, so the pickle cannot
    construct anything with it."""
  name: str
  dtype: np.dtype


class _Storage:
  """`numel` elements of `dtype`; `data` (1-D) arrives from the file, for legacy files only after
    the main pickle, so tensors refer to storages and are read at the end."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype = dtype
    self.numel = numel
    self.data: np.ndarray | None = None

  def array(self) -> np.ndarray:
    if self.data is None:
      raise ValueError("a tensor refers to a storage that the file never wrote")
    return self.data


class _StorageView:
  """A legacy (pre-0.4) storage view: elements [offset, offset + numel) of a root storage."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    self.root, self.offset, self.numel = root, offset, numel
    self.dtype = root.dtype

  def array(self) -> np.ndarray:
    data = self.root.array()
    if self.offset < 0 or self.offset + self.numel > len(data):
      raise ValueError("a storage view reaches outside its storage")
    return data[self.offset:self.offset + self.numel]


@dataclasses.dataclass
class _Tensor:
  storage: _Storage | _StorageView
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]

  def to_numpy(self) -> np.ndarray:
    """A contiguous copy in native byte order; raises if the view reads outside its storage."""
    data = self.storage.array()
    if len(self.size) != len(self.stride):
      raise ValueError(f"tensor size {self.size} and stride {self.stride} differ in length")
    if any(n == 0 for n in self.size):
      return np.zeros(self.size, data.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or min(self.stride, default=0) < 0 or min(self.size, default=0) < 0 or last >= len(data):
      raise ValueError(f"tensor (offset {self.offset}, size {self.size}, stride {self.stride}) "
                       f"reaches outside its storage of {len(data)} elements")
    view = np.lib.stride_tricks.as_strided(data[self.offset:],
                                           shape=self.size,
                                           strides=[s * data.itemsize for s in self.stride],
                                           writeable=False)
    return np.array(view, order="C")


def _read_elements(raw: bytes, dtype: np.dtype, numel: int, little_endian: bool) -> np.ndarray:
  """The first `numel` elements of `raw`, in native byte order."""
  if len(raw) < numel * dtype.itemsize:
    raise ValueError(f"a storage holds {len(raw)} bytes, expected {numel * dtype.itemsize}")
  data = np.frombuffer(raw, dtype, count=numel)
  return data if little_endian == (sys.byteorder == "little") else data.byteswap()


def _ints(value, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
    raise ValueError(f"tensor {what} must be a tuple of ints, got {value!r}")
  return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _Tensor:
  # _rebuild_tensor_v2 adds (requires_grad, backward_hooks[, metadata]); none matters for arrays.
  if not isinstance(storage, (_Storage, _StorageView)) or not isinstance(storage_offset, int):
    raise ValueError("a tensor must be rebuilt from a storage and an integer offset")
  return _Tensor(storage, storage_offset, _ints(size, "size"), _ints(stride, "stride"))


def _rebuild_parameter(data, *unused):
  return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, np.dtype(dtype)) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED`; storages (persistent ids) go to `load_storage`."""

  def __init__(self, file, load_storage: Callable[[tuple], Any] | None = None):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module, name):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafePickleError(f"refusing to load {module}.{name}: a state dict holds only "
                              "OrderedDicts and tensors") from None

  def persistent_load(self, pid):
    if self._load_storage is None:
      raise UnsafePickleError("unexpected persistent id outside the main pickle")
    if not isinstance(pid, tuple) or not pid:
      raise ValueError(f"malformed persistent id {pid!r}")
    typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if typename != "storage":
      raise UnsafePickleError(f"refusing persistent id of type {typename!r} (only 'storage')")
    return self._load_storage(pid[1:])


def _storage_type(value) -> _StorageType:
  if not isinstance(value, _StorageType):
    raise ValueError(f"storage type must be one of torch's typed storages, got {value!r}")
  return value


def _load_zip(archive: zipfile.ZipFile) -> Any:
  pickles = [name for name in archive.namelist() if name == "data.pkl" or name.endswith("/data.pkl")]
  if len(pickles) != 1:
    raise ValueError(f"expected one data.pkl in the torch zip archive, found {len(pickles)}")
  prefix = pickles[0][:-len("data.pkl")]
  little_endian = True
  if prefix + "byteorder" in archive.namelist():
    little_endian = archive.read(prefix + "byteorder").strip() != b"big"
  storages: dict[str, _Storage] = {}

  def load_storage(fields: tuple) -> _Storage:
    if len(fields) != 4:
      raise ValueError(f"malformed storage id {fields!r}")
    storage_type, key, _location, numel = fields
    dtype = _storage_type(storage_type).dtype
    key = str(key)
    if key not in storages:
      storage = _Storage(dtype, numel)
      storage.data = _read_elements(archive.read(f"{prefix}data/{key}"), dtype, numel, little_endian)
      storages[key] = storage
    return storages[key]

  return _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load()


def _load_legacy(f: io.BytesIO) -> Any:
  magic = _RestrictedUnpickler(f).load()
  if magic != _LEGACY_MAGIC:
    raise ValueError("not a file written by torch.save (wrong magic number)")
  protocol = _RestrictedUnpickler(f).load()
  if protocol != _LEGACY_PROTOCOL:
    raise ValueError(f"unsupported torch legacy protocol {protocol!r}")
  sys_info = _RestrictedUnpickler(f).load()
  if not isinstance(sys_info, dict):
    raise ValueError("malformed torch legacy header")
  little_endian = bool(sys_info.get("little_endian", True))
  storages: dict[str, _Storage] = {}

  def load_storage(fields: tuple) -> _Storage | _StorageView:
    if len(fields) != 5:
      raise ValueError(f"malformed storage id {fields!r}")
    storage_type, root_key, _location, numel, view_metadata = fields
    dtype = _storage_type(storage_type).dtype
    root = storages.setdefault(str(root_key), _Storage(dtype, numel))
    if view_metadata is None:
      return root
    _view_key, offset, view_numel = view_metadata
    return _StorageView(root, offset, view_numel)

  result = _RestrictedUnpickler(f, load_storage).load()
  keys = _RestrictedUnpickler(f).load()
  for key in keys:
    storage = storages.get(str(key))
    if storage is None:
      raise ValueError(f"storage {key!r} is written but no tensor uses it")
    header = f.read(8)
    if len(header) != 8:
      raise ValueError("file ends before its storages")
    numel = int.from_bytes(header, "little" if little_endian else "big", signed=True)
    if numel != storage.numel:
      raise ValueError(f"storage {key!r} has {numel} elements, its tensors expect {storage.numel}")
    storage.data = _read_elements(f.read(numel * storage.dtype.itemsize), storage.dtype, numel, little_endian)
  return result


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A `torch.save`d state dict (zip or legacy format) -> {name: np.ndarray}, in the file's order.

    Arrays keep torch's dtype (float32, int64 for BatchNorm's num_batches_tracked, ...), size and
    element order, as contiguous copies. Raises UnsafePickleError if the pickle names anything but
    a state dict's parts, ValueError if the file is not a flat name -> tensor mapping.
    """
  from etils import epath
  raw = epath.Path(path).read_bytes()  # local or a URL
  if raw[:4] == b"PK\x03\x04":  # how torch itself tells the zip format from the legacy one
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
      obj = _load_zip(archive)
  else:
    obj = _load_legacy(io.BytesIO(raw))
  if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, _Tensor) for k, v in obj.items()):
    raise ValueError(f"{os.fspath(path)} is not a state dict (a flat mapping of names to tensors)")
  return {name: tensor.to_numpy() for name, tensor in obj.items()}
