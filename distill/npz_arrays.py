"""Reads an `.npz` (np.savez / np.savez_compressed) as untrusted input: no pickles, and no more memory than the
file's size allows.

`np.load(allow_pickle=False)` already refuses object arrays, but it allocates whatever shape an array's header
declares, and inflates a deflated member whole: a few hundred bytes can ask for gigabytes. Here every member's
header is read first (bounded, as numpy's own header reader is), its shape and dtype must account for exactly
the bytes the member holds, and all arrays together must fit in `max_bytes` (by default 8x the file's size plus
16 MiB) before any is allocated; members are then read with bounded reads. Anything wrong is a ValueError.
"""
from __future__ import annotations

import io
import math
import struct
import tokenize
import zipfile
import zlib
from typing import IO, Iterator, Mapping

import numpy as np

DEFAULT_BYTES_PER_FILE_BYTE = 8
DEFAULT_EXTRA_BYTES = 16 << 20
_MAX_HEADER_BYTES = 10000  # numpy's own default limit for a .npy header
_CHUNK = 1 << 20


class NpzArrays(Mapping[str, np.ndarray]):
  """The arrays of an .npz, read: a mapping of name -> array with `files` (the names, in the file's order), as
  np.load's NpzFile has."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self._arrays = arrays
    self.files = list(arrays)

  def __getitem__(self, key: str) -> np.ndarray:
    return self._arrays[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._arrays)

  def __len__(self) -> int:
    return len(self._arrays)


def default_max_bytes(file_size: int) -> int:
  return DEFAULT_BYTES_PER_FILE_BYTE * file_size + DEFAULT_EXTRA_BYTES


class _Counted:
  """A reader that counts the bytes read through it (a deflated member's position, without seeking)."""

  def __init__(self, f: IO[bytes]):
    self.f, self.count = f, 0

  def read(self, n: int) -> bytes:
    data = self.f.read(n)
    self.count += len(data)
    return data


def _header(member: _Counted, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
  version = np.lib.format.read_magic(member)
  if version not in ((1, 0), (2, 0)):
    raise ValueError(f"{name}: .npy format version {version} (only 1.0 and 2.0 are read)")
  read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
  prefix = member.read(2 if version == (1, 0) else 4)
  length = int.from_bytes(prefix, "little")
  if len(prefix) not in (2, 4) or length > _MAX_HEADER_BYTES:  # checked before numpy reads (inflates) that much
    raise ValueError(f"{name}: .npy header of {length} bytes (at most {_MAX_HEADER_BYTES})")
  try:
    shape, fortran, dtype = read(io.BytesIO(prefix + member.read(length)), max_header_size=_MAX_HEADER_BYTES)
  except (ValueError, SyntaxError, TypeError, tokenize.TokenError) as e:  # numpy tokenizes and evaluates it
    raise ValueError(f"{name}: malformed .npy header ({type(e).__name__}: {' '.join(str(e).split())[:200]})") \
        from None
  if dtype.hasobject:
    raise ValueError(f"{name}: holds Python objects (dtype {dtype}), which would need a pickle; not read")
  if not all(isinstance(n, int) and 0 <= n < 2**62 for n in shape):
    raise ValueError(f"{name}: malformed shape {shape}")
  return shape, fortran, dtype


def read_npz_arrays(f: IO[bytes], file_size: int, max_bytes: int | None = None) -> NpzArrays:
  """The arrays of the .npz open as `f` (seekable, `file_size` bytes long). ValueError (one line) for a file that
  is not a zip of .npy arrays, an array that needs a pickle, a member whose bytes do not match its header, or
  arrays that would take more than `max_bytes` (default `default_max_bytes(file_size)`)."""
  limit = default_max_bytes(file_size) if max_bytes is None else max_bytes
  try:
    with zipfile.ZipFile(f) as archive:
      plan, total = [], 0
      for info in archive.infolist():
        name = info.filename
        if not name.endswith(".npy"):
          raise ValueError(f"member {name!r} is not an .npy array")
        if info.flag_bits & 0x1:
          raise ValueError(f"member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
          raise ValueError(f"member {name!r} is compressed with method {info.compress_type} (np.savez stores, "
                           "np.savez_compressed deflates)")
        with archive.open(info) as member:  # only the header: a bounded read, inflated no further
          counted = _Counted(member)
          shape, fortran, dtype = _header(counted, name)
          offset = counted.count
        nbytes = math.prod(shape) * dtype.itemsize
        if offset + nbytes != info.file_size:
          raise ValueError(f"member {name!r} declares shape {shape} of {dtype} ({nbytes} bytes) but holds "
                           f"{info.file_size - offset}")
        total += nbytes
        if total > limit:
          raise ValueError(f"its arrays need more than {limit} bytes, the cap for a file of {file_size} bytes "
                           f"(max_bytes; by default {DEFAULT_BYTES_PER_FILE_BYTE}x the file's size plus 16 MiB)")
        plan.append((info, name[:-len(".npy")], shape, fortran, dtype, offset, nbytes))
      arrays = {}
      for info, key, shape, fortran, dtype, offset, nbytes in plan:
        buffer = np.empty(nbytes, np.uint8)
        with archive.open(info) as member:
          member.read(offset)
          done = 0
          while done < nbytes:
            chunk = member.read(min(_CHUNK, nbytes - done))
            if not chunk:
              raise ValueError(f"member {info.filename!r} ends after {done} of {nbytes} bytes of array data")
            buffer[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
            done += len(chunk)
          member.read(1)  # at the end: zipfile checks the member's CRC
        array = buffer.view(dtype) if dtype.itemsize else np.zeros(math.prod(shape), dtype)
        arrays[key] = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
      return NpzArrays(arrays)
  except ValueError:
    raise
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, struct.error, KeyError, OverflowError,
          NotImplementedError, TypeError, SyntaxError) as e:
    raise ValueError(f"not a readable .npz ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
