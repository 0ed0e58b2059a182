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

The file is untrusted input, so what it can make the reader do is bounded by its size:
  * the unpickler is the pure-Python one with an allowlist of opcodes: no INST/OBJ/NEWOBJ/EXT (objects
    built from classes), no BYTEARRAY8 (allocates the length it reads before reading), no sets, and BUILD only
    on an OrderedDict the load itself made (torch uses it to attach `_metadata`, which is dropped), never on the
    shared whitelisted objects; REDUCE calls only the stand-ins, with at most 8 arguments (OrderedDict with
    none); dict keys are strings or integers (a deeply nested key would overflow the C stack when hashed);
  * zip entries are read with bounded reads: stored entries up to their size in the file, deflated ones up to
    the size their storage needs (counted against `max_bytes`), never decompressed whole;
  * every tensor view is checked before anything is allocated: non-negative ints below 2**62, at most 32
    dimensions, strides >= 1 on every dimension longer than 1 (a stride 0 would repeat elements), no two
    elements at the same place, inside its storage; all tensors together fit in `max_bytes`.
Anything else about the file that is wrong is a ValueError (UnsafePickleError is one) with one line saying what.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import reprlib
import struct
import sys
import zipfile
import zlib
from typing import Any, Callable

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_MAX_DIMS = 32
_MAX_INT = 2**62  # sizes, strides, offsets and element counts: far beyond any real tensor, far below overflow
_MAX_REDUCE_ARGS = 8  # _rebuild_tensor_v2 takes 6 (7 with metadata)
_MAX_COPIED_ITEMS = 1_000_000  # OrderedDict([...pairs]) items per load: far above any state dict's entries
_MAX_KEY_CHARS = 256  # storage keys are short ('0', '1', ..., or a number in legacy files)
# By default the reader may hold this many bytes of storages and tensors: a multiple of the file's size (a state
# dict references each storage about once; tied weights twice) plus room for small files.
DEFAULT_BYTES_PER_FILE_BYTE = 8
DEFAULT_EXTRA_BYTES = 16 << 20

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

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel = 3


class UnsafePickleError(pickle.UnpicklingError, ValueError):
  """The file's pickle names something (a global, an opcode, a use of BUILD) a state dict does not contain;
  nothing was called. A ValueError, as every other way a weight file can be unreadable is."""


def default_max_bytes(file_size: int) -> int:
  """The bytes of storages and tensors a file of `file_size` bytes may make the reader hold by default."""
  return DEFAULT_BYTES_PER_FILE_BYTE * file_size + DEFAULT_EXTRA_BYTES


class _Budget:
  """Counts bytes before they are allocated; ValueError past `limit`."""

  def __init__(self, limit: int):
    self.limit, self.used = limit, 0

  def take(self, nbytes: int, what: str):
    if nbytes > self.limit - self.used:
      raise ValueError(f"{what} needs {nbytes} bytes, more than the {self.limit - self.used} left of the reader's "
                       f"cap of {self.limit} bytes (max_bytes; by default {DEFAULT_BYTES_PER_FILE_BYTE}x the file's "
                       "size plus 16 MiB)")
    self.used += nbytes


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
  """What `torch.FloatStorage` & co. unpickle to: only a dtype. Not callable, so the pickle cannot
    construct anything with it; slotted and frozen, so nothing in a pickle can change it."""
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

  def nbytes(self) -> int:
    """The bytes of the contiguous copy, after checking the view against its storage (nothing allocated)."""
    data = self.storage.array()
    where = f"tensor (offset {self.offset}, size {self.size}, stride {self.stride})"
    if len(self.size) != len(self.stride):
      raise ValueError(f"{where}: size and stride differ in length")
    numel = math.prod(self.size)
    if numel == 0:
      return 0
    if self.offset >= len(data):
      raise ValueError(f"{where} reaches outside its storage of {len(data)} elements")
    dims = sorted((s, n) for n, s in zip(self.size, self.stride) if n > 1)
    if dims and dims[0][0] == 0:
      raise ValueError(f"{where}: stride 0 on a dimension of size {dims[0][1]} would repeat elements; a state dict "
                       "holds no expanded views")
    extent = 1  # the elements spanned by the dimensions of smaller stride: the next stride must reach past them
    for s, n in dims:
      if s < extent:
        raise ValueError(f"{where}: its elements overlap (stride {s} inside an extent of {extent})")
      extent = s * (n - 1) + extent
    if self.offset + extent > len(data):
      raise ValueError(f"{where} reaches outside its storage of {len(data)} elements")
    return numel * data.itemsize

  def to_numpy(self) -> np.ndarray:
    """A contiguous copy in native byte order; raises if the view reads outside its storage (`nbytes`)."""
    self.nbytes()
    data = self.storage.array()
    if math.prod(self.size) == 0:
      return np.zeros(self.size, data.dtype)
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


def _int(value, what: str) -> int:
  if type(value) is not int or not 0 <= value < _MAX_INT:  # noqa: E721 — bool is not an element count
    raise ValueError(f"{what} must be an integer in [0, 2**62), got {_short.repr(value)}")
  return value


def _ints(value, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or len(value) > _MAX_DIMS:
    raise ValueError(f"tensor {what} must be a tuple of at most {_MAX_DIMS} ints, got {_short.repr(value)}")
  return tuple(_int(v, f"tensor {what}") for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _Tensor:
  # _rebuild_tensor_v2 adds (requires_grad, backward_hooks[, metadata]); none matters for arrays.
  if not isinstance(storage, (_Storage, _StorageView)):
    raise ValueError("a tensor must be rebuilt from a storage")
  return _Tensor(storage, _int(storage_offset, "a tensor's storage offset"), _ints(size, "size"),
                 _ints(stride, "stride"))


def _rebuild_parameter(data, *unused):
  return data


def _ordered_dict(*args, **kwargs):
  """collections.OrderedDict as torch's pickles call it: empty (its items follow with SETITEMS). The one other
  form, a single list of (key, value) pairs, is built by the unpickler under a budget
  (`_RestrictedUnpickler._ordered_dict_of_pairs`); anything else is refused."""
  if args or kwargs:
    raise UnsafePickleError("refusing OrderedDict called with these arguments: torch.save builds it empty or "
                            "from one list of (key, value) pairs")
  return collections.OrderedDict()


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, np.dtype(dtype)) for name, dtype in _STORAGE_DTYPES.items()},
}
_CALLABLE = (_ordered_dict, _rebuild_tensor, _rebuild_parameter)

# The opcodes torch.save's pickles (protocol 2) and the legacy header use, and the plain-data ones of protocols
# 0-4 but sets; BUILD, REDUCE, DICT, SETITEM and SETITEMS are replaced below.
_OPCODES = ("PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 "
            "LONG4 FLOAT BINFLOAT STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 "
            "BINBYTES SHORT_BINBYTES BINBYTES8 EMPTY_LIST APPEND APPENDS LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 "
            "EMPTY_DICT DICT SETITEM SETITEMS GET BINGET LONG_BINGET PUT BINPUT "
            "LONG_BINPUT MEMOIZE GLOBAL STACK_GLOBAL REDUCE BUILD PERSID BINPERSID").split()


def _refused_opcode(code: int):
  def refuse(self):  # noqa: ARG001
    name = next((n for n in dir(pickle) if n.isupper() and getattr(pickle, n) == bytes([code])), f"0x{code:02x}")
    raise UnsafePickleError(f"refusing pickle opcode {name}: a state dict's pickle does not use it")
  return refuse


class _RestrictedUnpickler(pickle._Unpickler):  # noqa: SLF001 — the pure-Python one, whose opcodes can be replaced
  """Resolves only `_ALLOWED` and runs only `_OPCODES`; storages (persistent ids) go to `load_storage`."""

  dispatch = {code: _refused_opcode(code) for code in range(256)}
  dispatch.update({getattr(pickle, name)[0]: pickle._Unpickler.dispatch[getattr(pickle, name)[0]]  # noqa: SLF001
                   for name in _OPCODES})

  def load_reduce(self):
    args = self.stack.pop()
    func = self.stack[-1]
    if not any(func is f for f in _CALLABLE):
      raise UnsafePickleError(f"refusing to call {_short.repr(func)}")
    if type(args) is not tuple or len(args) > _MAX_REDUCE_ARGS:  # noqa: E721
      raise ValueError(f"malformed arguments for {func.__name__}: {_short.repr(args)}")
    if func is _ordered_dict and len(args) == 1:
      self.stack[-1] = self._ordered_dict_of_pairs(args[0])
      return
    self.stack[-1] = func(*args)

  def _ordered_dict_of_pairs(self, pairs):
    """OrderedDict([[key, value], ...]): how older torch versions pickled a state dict (LPIPS's lin weights).
    The pairs are copied, so every copy counts against a budget per load (a pickle could reuse one long list)."""
    if type(pairs) not in (list, tuple) or any(type(p) not in (list, tuple) or len(p) != 2 for p in pairs):
      raise ValueError(f"malformed OrderedDict items: {_short.repr(pairs)}")
    self._copied_items += len(pairs)
    if self._copied_items > _MAX_COPIED_ITEMS:
      raise ValueError(f"more than {_MAX_COPIED_ITEMS:,} OrderedDict items copied in one load")
    target = collections.OrderedDict()
    self._set_items(target, [x for pair in pairs for x in pair])
    return target

  def load_build(self):
    state = self.stack.pop()
    inst = self.stack[-1]
    # Only an OrderedDict can be one the load made (the whitelisted objects are a function, a class stand-in and
    # storage types); torch's state is {'_metadata': ...} (module versions), which arrays do not need.
    if type(inst) is not collections.OrderedDict:  # noqa: E721
      raise UnsafePickleError(f"refusing BUILD on {_short.repr(inst)}: torch.save uses it only to attach _metadata "
                              "to a state dict")
    if not (state is None or isinstance(state, dict) or isinstance(state, tuple) and len(state) == 2):
      raise ValueError(f"malformed state for an OrderedDict: {_short.repr(state)}")

  def _set_items(self, target, items):
    # Keys are scalars: hashing a key nested a million tuples deep would overflow the C stack.
    if type(target) not in (dict, collections.OrderedDict):
      raise ValueError(f"refusing to set items of {_short.repr(target)}")
    for key, value in zip(items[::2], items[1::2]):
      if type(key) not in (str, int, bytes):
        raise ValueError(f"a dict key must be a string or an integer, got {_short.repr(key)}")
      target[key] = value

  def load_setitem(self):
    value = self.stack.pop()
    key = self.stack.pop()
    self._set_items(self.stack[-1], [key, value])

  def load_setitems(self):
    items = self.pop_mark()
    self._set_items(self.stack[-1], items)

  def load_dict(self):
    items = self.pop_mark()
    target = {}
    self._set_items(target, items)
    self.append(target)

  dispatch[pickle.REDUCE[0]] = load_reduce
  dispatch[pickle.BUILD[0]] = load_build
  dispatch[pickle.SETITEM[0]] = load_setitem
  dispatch[pickle.SETITEMS[0]] = load_setitems
  dispatch[pickle.DICT[0]] = load_dict

  def __init__(self, file, load_storage: Callable[[tuple], Any] | None = None):
    super().__init__(file)
    self._load_storage = load_storage
    self._copied_items = 0

  def find_class(self, module, name):
    try:
      return _ALLOWED[(module, name)]
    except (KeyError, TypeError):
      raise UnsafePickleError(f"refusing to load {_short.repr(module)[1:-1]}.{_short.repr(name)[1:-1]}: a state "
                              "dict holds only OrderedDicts and tensors") from None

  def persistent_load(self, pid):
    if self._load_storage is None:
      raise UnsafePickleError("unexpected persistent id outside the main pickle")
    if not isinstance(pid, tuple) or not pid:
      raise ValueError(f"malformed persistent id {_short.repr(pid)}")
    if pid[0] not in ("storage", b"storage"):
      raise UnsafePickleError(f"refusing persistent id of type {_short.repr(pid[0])} (only 'storage')")
    return self._load_storage(pid[1:])


def _storage_type(value) -> _StorageType:
  if not isinstance(value, _StorageType):
    raise ValueError(f"storage type must be one of torch's typed storages, got {_short.repr(value)}")
  return value


def _storage_key(value) -> str:
  if not isinstance(value, (str, int)) or isinstance(value, bool) or len(str(value)) > _MAX_KEY_CHARS:
    raise ValueError(f"malformed storage key {_short.repr(value)}")
  return str(value)


def _read_entry(archive: zipfile.ZipFile, name: str, nbytes: int | None, budget: _Budget, file_size: int) -> bytes:
  """The first `nbytes` (None: all) bytes of entry `name`, read with a bounded read: a stored entry lies in the
  file; a deflated one is inflated only as far as needed, and that is counted against the budget."""
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise ValueError(f"the archive has no entry {_short.repr(name)}") from None
  if info.flag_bits & 0x1:
    raise ValueError(f"entry {name} is encrypted")
  if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
    raise ValueError(f"entry {name} is compressed with method {info.compress_type}; torch.save stores entries "
                     "(a deflated one is read too)")
  if info.compress_size > file_size or (info.compress_type == zipfile.ZIP_STORED and info.file_size > file_size):
    raise ValueError(f"entry {name} claims {max(info.compress_size, info.file_size)} bytes in a file of {file_size}")
  want = info.file_size if nbytes is None else nbytes
  if want > info.file_size:
    raise ValueError(f"entry {name} holds {info.file_size} bytes, expected {want}")
  budget.take(want, f"entry {name}")
  with archive.open(info) as f:
    data = f.read(want)
  if len(data) != want:
    raise ValueError(f"entry {name} ends after {len(data)} of {want} bytes")
  return data


def _load_zip(archive: zipfile.ZipFile, budget: _Budget, file_size: int) -> Any:
  names = archive.namelist()
  pickles = [name for name in names if name == "data.pkl" or name.endswith("/data.pkl")]
  if len(pickles) != 1:
    raise ValueError(f"expected one data.pkl in the torch zip archive, found {len(pickles)}")
  prefix = pickles[0][:-len("data.pkl")]
  little_endian = True
  if prefix + "byteorder" in names:
    if archive.getinfo(prefix + "byteorder").file_size > 16:
      raise ValueError("the archive's byteorder entry is not 'little' or 'big'")
    little_endian = _read_entry(archive, prefix + "byteorder", None, budget, file_size).strip() != b"big"
  storages: dict[str, _Storage] = {}

  def load_storage(fields: tuple) -> _Storage:
    if len(fields) != 4:
      raise ValueError(f"malformed storage id {_short.repr(fields)}")
    storage_type, key, _location, numel = fields
    dtype = _storage_type(storage_type).dtype
    key = _storage_key(key)
    if key not in storages:
      numel = _int(numel, f"storage {key}'s element count")
      raw = _read_entry(archive, f"{prefix}data/{key}", numel * dtype.itemsize, budget, file_size)
      storage = _Storage(dtype, numel)
      storage.data = _read_elements(raw, dtype, numel, little_endian)
      storages[key] = storage
    return storages[key]

  data_pkl = _read_entry(archive, pickles[0], None, budget, file_size)
  return _RestrictedUnpickler(io.BytesIO(data_pkl), load_storage).load()


def _load_legacy(f: io.BytesIO) -> Any:
  magic = _RestrictedUnpickler(f).load()
  if magic != _LEGACY_MAGIC:
    raise ValueError("not a file written by torch.save (wrong magic number)")
  protocol = _RestrictedUnpickler(f).load()
  if protocol != _LEGACY_PROTOCOL:
    raise ValueError(f"unsupported torch legacy protocol {_short.repr(protocol)}")
  sys_info = _RestrictedUnpickler(f).load()
  if not isinstance(sys_info, dict):
    raise ValueError("malformed torch legacy header")
  little_endian = bool(sys_info.get("little_endian", True))
  storages: dict[str, _Storage] = {}

  def load_storage(fields: tuple) -> _Storage | _StorageView:
    if len(fields) != 5:
      raise ValueError(f"malformed storage id {_short.repr(fields)}")
    storage_type, root_key, _location, numel, view_metadata = fields
    dtype = _storage_type(storage_type).dtype
    root = storages.setdefault(_storage_key(root_key), _Storage(dtype, _int(numel, "a storage's element count")))
    if view_metadata is None:
      return root
    if not isinstance(view_metadata, tuple) or len(view_metadata) != 3:
      raise ValueError(f"malformed storage view {_short.repr(view_metadata)}")
    _view_key, offset, view_numel = view_metadata
    return _StorageView(root, _int(offset, "a storage view's offset"), _int(view_numel, "a storage view's size"))

  result = _RestrictedUnpickler(f, load_storage).load()
  keys = _RestrictedUnpickler(f).load()
  if not isinstance(keys, list):
    raise ValueError(f"malformed list of storage keys {_short.repr(keys)}")
  for key in keys:
    storage = storages.get(_storage_key(key))
    if storage is None:
      raise ValueError(f"storage {_short.repr(key)} is written but no tensor uses it")
    header = f.read(8)
    if len(header) != 8:
      raise ValueError("file ends before its storages")
    numel = int.from_bytes(header, "little" if little_endian else "big", signed=True)
    if numel != storage.numel:
      raise ValueError(f"storage {_short.repr(key)} has {numel} elements, its tensors expect {storage.numel}")
    # A read of the file itself: it returns no more than the file holds, whatever numel says.
    storage.data = _read_elements(f.read(numel * storage.dtype.itemsize), storage.dtype, numel, little_endian)
  return result


# What a malformed file makes the parsers raise (beyond ValueError): reported as one ValueError.
_MALFORMED = (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, AttributeError, struct.error,
              OverflowError, NotImplementedError, RecursionError, zipfile.BadZipFile, zipfile.LargeZipFile,
              zlib.error)


def state_dict_from_bytes(raw: bytes, max_bytes: int | None = None, entry: str | None = None
                          ) -> dict[str, np.ndarray]:
  """`load_torch_state_dict` of a file's bytes. max_bytes: the cap on storages and tensors the reader may hold
  (default `default_max_bytes(len(raw))`). entry: when the file's top level is a dict holding this key (a
  PyTorch Lightning `.ckpt` keeps its tensors under 'state_dict', beside plain values such as 'epoch'), the
  state dict is that entry."""
  budget = _Budget(default_max_bytes(len(raw)) if max_bytes is None else max_bytes)
  try:
    if raw[:4] == b"PK\x03\x04":  # how torch itself tells the zip format from the legacy one
      with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        obj = _load_zip(archive, budget, len(raw))
    else:
      obj = _load_legacy(io.BytesIO(raw))
    if entry is not None and isinstance(obj, dict) and isinstance(obj.get(entry), dict):
      obj = obj[entry]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, _Tensor) for k, v in obj.items()):
      raise ValueError("not a state dict (a flat mapping of names to tensors)")
    for name, tensor in obj.items():  # every size checked and counted before the first copy is made
      budget.take(tensor.nbytes(), f"tensor {_short.repr(name)}")
    return {name: tensor.to_numpy() for name, tensor in obj.items()}
  except UnsafePickleError:
    raise
  except UnicodeDecodeError as e:
    raise ValueError(f"not a readable torch state dict (undecodable text at byte {e.start})") from None
  except ValueError:
    raise
  except _MALFORMED as e:
    raise ValueError(f"not a readable torch state dict ({type(e).__name__}: {_short.repr(str(e))[1:-1]})") from None


def load_torch_state_dict(path: str | os.PathLike, max_bytes: int | None = None, entry: str | None = None
                          ) -> dict[str, np.ndarray]:
  """A `torch.save`d state dict (zip or legacy format) -> {name: np.ndarray}, in the file's order.

    Arrays keep torch's dtype (float32, int64 for BatchNorm's num_batches_tracked, ...), size and
    element order, as contiguous copies. Raises OSError if the file cannot be read, ValueError (one line,
    not naming the file) if it is not a flat name -> tensor mapping within `max_bytes` (see
    `state_dict_from_bytes`); UnsafePickleError, a ValueError, if the pickle names anything but a state
    dict's parts. entry: see `state_dict_from_bytes` ('state_dict' reads a Lightning `.ckpt`).
    """
  from etils import epath
  raw = epath.Path(path).read_bytes()  # local or a URL
  return state_dict_from_bytes(raw, max_bytes, entry)
