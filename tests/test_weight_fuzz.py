"""Weight files as hostile input (issue 18, item 3): a few thousand random and crafted byte strings through the
`.pth` reader (`torch_weights.state_dict_from_bytes`) and the `.npz` reader (`npz_arrays.read_npz_arrays`).

Each must end as a correct load or as one ValueError (the readers' documented error; UnsafePickleError is one),
never another exception, a crash or a large allocation: the cases run in a subprocess whose address space is
capped (RLIMIT_AS, a few hundred MiB above what its imports use), so a reader that allocated what a file
declares would die of MemoryError there instead of taking the machine. Inputs: mutations (byte flips, interesting
integers, truncations, insertions, deletions) of the real torch.save fixtures and of .npz files made here, the
same mutations applied inside data.pkl or an .npy header and re-zipped (so they reach the parsers past the zip
CRC), and crafted cases: huge shapes, stride 0, overlapping views, deflate bombs, BUILD payloads, deep nesting.
After them all the fixtures still load exactly (a BUILD payload once corrupted every later load).
"""
import collections
import io
import json
import os
import pickle
import resource
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(HERE, "data")
SEED = 18
HEADROOM = 768 << 20  # bytes of address space the cases may use above the imports


# --- inputs ------------------------------------------------------------------------------------------------


def _zip(entries: dict, deflate=()) -> bytes:
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    for name, data in entries.items():
      archive.writestr(name, data, zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED)
  return buffer.getvalue()


def _unzip(raw: bytes) -> dict:
  with zipfile.ZipFile(io.BytesIO(raw)) as archive:
    return {name: archive.read(name) for name in archive.namelist()}


def _i(n) -> bytes:
  return b"I%d\n" % n


def _t(values) -> bytes:
  return b"(" + b"".join(map(_i, values)) + b"t"


def tensor_pickle(size, stride, offset=0, numel=4, key=b"0", storage=b"FloatStorage", name=b"w", copies=1):
  """A protocol-0 data.pkl: {name: _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())},
  the tensor repeated under `copies` names (name, name1, ...) through the memo."""
  tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n((Vstorage\nctorch\n" + storage + b"\nV" + key + b"\nVcpu\n" +
            _i(numel) + b"tQ" + _i(offset) + _t(size) + _t(stride) + b"I00\nccollections\nOrderedDict\n)RtRp0\n")
  more = b"".join(b"V" + name + b"%d\ng0\ns" % i for i in range(1, copies))
  return b"ccollections\nOrderedDict\n)RV" + name + b"\n" + tensor + b"s" + more + b"."


def tensor_zip(data_pkl: bytes, storage: bytes, deflate=()) -> bytes:
  return _zip({"archive/data.pkl": data_pkl, "archive/data/0": storage}, deflate)


FLOATS4 = np.arange(4, dtype="<f4").tobytes()


def npz_bytes(compressed=False, **arrays) -> bytes:
  buffer = io.BytesIO()
  (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
  return buffer.getvalue()


def npz_sample() -> dict:
  return {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.array(7, np.int64),
          "f": np.asfortranarray(np.arange(6, dtype=">i2").reshape(2, 3)), "b": np.array([True, False]),
          "e": np.zeros((0, 3), np.float64)}


def npy_header(shape, descr="<f8", version=b"\x01\x00", fortran=False, length=None) -> bytes:
  header = repr({"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}).encode()
  header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
  size = len(header) if length is None else length
  return b"\x93NUMPY" + version + (size.to_bytes(2, "little") if version == b"\x01\x00" else
                                    size.to_bytes(4, "little")) + header


def crafted():
  """(id, kind, bytes, expectation): expectation is a substring of the ValueError, or ('ok', check) with
  check(result) -> bool."""
  deep = 200_000
  cases = [
      ("stride_0_4GiB", "pth", tensor_zip(tensor_pickle((2**30,), (0,)), FLOATS4), "stride 0"),
      ("stride_0_2d", "pth", tensor_zip(tensor_pickle((3, 2**20), (1, 0)), FLOATS4), "stride 0"),
      ("stride_0_size_1_is_fine", "pth", tensor_zip(tensor_pickle((1, 4), (0, 1)), FLOATS4),
       ("ok", lambda r: r["w"].tolist() == [[0.0, 1.0, 2.0, 3.0]])),
      ("huge_size", "pth", tensor_zip(tensor_pickle((2**40,), (1,)), FLOATS4), "outside its storage"),
      ("huge_size_2d", "pth", tensor_zip(tensor_pickle((2**31, 2**31), (1, 2**31)), FLOATS4), "outside its storage"),
      ("overlapping", "pth", tensor_zip(tensor_pickle((2, 3), (1, 1)), FLOATS4), "overlap"),
      ("negative_stride", "pth", tensor_zip(tensor_pickle((2,), (-1,), offset=3), FLOATS4), "[0, 2**62)"),
      ("negative_size", "pth", tensor_zip(tensor_pickle((-2,), (1,)), FLOATS4), "[0, 2**62)"),
      ("int_beyond_2_62", "pth", tensor_zip(tensor_pickle((2**70,), (1,)), FLOATS4), "[0, 2**62)"),
      ("huge_offset", "pth", tensor_zip(tensor_pickle((2,), (1,), offset=2**61), FLOATS4), "outside its storage"),
      ("too_many_dims", "pth", tensor_zip(tensor_pickle((1,) * 40, (1,) * 40), FLOATS4), "at most 32"),
      ("storage_numel_beyond_entry", "pth", tensor_zip(tensor_pickle((4,), (1,), numel=2**40), FLOATS4),
       "expected 4398046511104"),
      ("storage_numel_beyond_entry_small", "pth", tensor_zip(tensor_pickle((4,), (1,), numel=5), FLOATS4),
       "expected 20"),
      ("in_bounds_strided", "pth", tensor_zip(tensor_pickle((2,), (2,), offset=1), FLOATS4),
       ("ok", lambda r: r["w"].tolist() == [1.0, 3.0])),
      # Deflate: a deflated storage is inflated only as far as its tensor needs, and counted against the cap.
      ("deflate_bomb_storage", "pth", tensor_zip(tensor_pickle((16 << 20,), (1,), numel=16 << 20), b"\0" * (64 << 20),
                                                 deflate=("archive/data/0",)), "needs 67108864 bytes"),
      ("deflate_bomb_storage_read_4_bytes", "pth", tensor_zip(tensor_pickle((1,), (1,), numel=1), b"\0" * (64 << 20),
                                                              deflate=("archive/data/0",)),
       ("ok", lambda r: r["w"].tolist() == [0.0])),
      ("deflate_bomb_data_pkl", "pth", _zip({"archive/data.pkl": tensor_pickle((4,), (1,)) + b"\0" * (64 << 20),
                                             "archive/data/0": FLOATS4}, deflate=("archive/data.pkl",)),
       "entry archive/data.pkl needs"),
      ("many_views_of_one_storage", "pth", tensor_zip(tensor_pickle((1 << 20,), (1,), numel=1 << 20, copies=64),
                                                      b"\0" * (4 << 20)), "tensor 'w"),
      ("lzma_entry", "pth", b"", "compressed with method"),  # filled in below
      # The pickle: BUILD on the shared whitelisted objects (it once rewrote FloatStorage's dtype for every
      # later load), calls with arguments that would copy, opcodes a state dict does not use.
      ("build_on_storage_type", "pth", _zip({"a/data.pkl": b"ctorch\nFloatStorage\n}Vdtype\nI1\nsb."}),
       "refusing BUILD"),
      ("build_slots_on_storage_type", "pth",
       _zip({"a/data.pkl": b"ctorch\nFloatStorage\nN}Vdtype\nVx\ns\x86b."}), "refusing BUILD"),
      ("build_on_rebuild_function", "pth",
       _zip({"a/data.pkl": b"ctorch._utils\n_rebuild_tensor_v2\n}V__code__\nI1\nsb."}), "refusing BUILD"),
      ("build_on_ordered_dict", "pth", _zip({"a/data.pkl": b"ccollections\nOrderedDict\n}Vx\nI1\nsb."}),
       "refusing BUILD"),
      ("build_metadata_on_a_new_state_dict", "pth",
       _zip({"a/data.pkl": b"ccollections\nOrderedDict\n)R}V_metadata\n}sb."}), ("ok", lambda r: r == {})),
      # Older torch pickles OrderedDict([[key, value], ...]) (LPIPS's lin weights): pairs are read, anything else not.
      ("ordered_dict_of_pairs", "pth", _zip({"a/data.pkl": b"ccollections\nOrderedDict\n(](X\x01\x00\x00\x00kK\x07tatR."}),
       "not a state dict"),  # the pairs are read; 7 is not a tensor
      ("ordered_dict_of_no_pairs", "pth", _zip({"a/data.pkl": b"ccollections\nOrderedDict\n(]tR."}),
       ("ok", lambda r: r == {})),
      ("ordered_dict_of_non_pairs", "pth",
       _zip({"a/data.pkl": b"ccollections\nOrderedDict\n(]K\x01atR."}), "malformed OrderedDict items"),
      ("ordered_dict_two_args", "pth",
       _zip({"a/data.pkl": b"ccollections\nOrderedDict\n(]]tR."}), "OrderedDict called with these arguments"),
      ("reduce_many_args", "pth", _zip({"a/data.pkl": b"ctorch._utils\n_rebuild_parameter\n(" + b"N" * 20 + b"tR."}),
       "malformed arguments"),
      ("reduce_non_callable", "pth", _zip({"a/data.pkl": b"ctorch\nFloatStorage\n)R."}), "refusing to call"),
      ("os_system", "pth", _zip({"a/data.pkl": b"cos\nsystem\n(Vtouch /tmp/pwned\ntR."}), "refusing to load os.system"),
      ("stack_global_builtins_eval", "pth", _zip({"a/data.pkl": b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93."}),
       "refusing to load builtins.eval"),
      ("newobj", "pth", _zip({"a/data.pkl": b"\x80\x02ccollections\nOrderedDict\n)\x81."}), "opcode NEWOBJ"),
      ("inst", "pth", _zip({"a/data.pkl": b"(ios\nsystem\n."}), "opcode INST"),
      ("ext1", "pth", _zip({"a/data.pkl": b"\x80\x02\x82\x01."}), "opcode EXT1"),
      ("bytearray8_huge", "pth", _zip({"a/data.pkl": b"\x80\x05\x96" + (2**40).to_bytes(8, "little") + b"."}),
       "opcode BYTEARRAY8"),
      ("binunicode8_huge", "pth", _zip({"a/data.pkl": b"\x80\x04\x8d" + (2**40).to_bytes(8, "little") + b"x."}),
       "not a readable torch state dict"),
      ("frame_huge", "pth", _zip({"a/data.pkl": b"\x80\x04\x95" + (2**40).to_bytes(8, "little") + b"N."}),
       "not a state dict"),
      ("long_binput_huge_index", "pth", _zip({"a/data.pkl": b"N" + b"r\xff\xff\xff\xff" + b"."}), "not a state dict"),
      ("long4_huge", "pth", _zip({"a/data.pkl": b"\x80\x02\x8b" + (2**31 - 1).to_bytes(4, "little") + b"."}),
       "not a readable torch state dict"),
      ("int_many_digits", "pth", _zip({"a/data.pkl": b"I" + b"9" * 100_000 + b"\n."}), "digits"),
      ("deep_tuple_dict_key", "pth", _zip({"a/data.pkl": b"})" + b"\x85" * deep + b"I1\ns."}), "dict key"),
      ("deep_tuple_value", "pth", _zip({"a/data.pkl": b"}Vk\n)" + b"\x85" * deep + b"s."}), "not a state dict"),
      ("deep_list_repr", "pth", _zip({"a/data.pkl": b"ctorch\nFloatStorage\n" + b"]" * deep + b"\x85" + b"R."}),
       "refusing to call"),
      ("persistent_id_not_storage", "pth", _zip({"a/data.pkl": b"(Vmodule\ntQ."}), "only 'storage'"),
      ("storage_key_missing", "pth", _zip({"a/data.pkl": tensor_pickle((4,), (1,), key=b"9")}), "no entry"),
      ("storage_type_not_storage", "pth",
       tensor_zip(tensor_pickle((4,), (1,), storage=b"FloatStorage").replace(b"ctorch\nFloatStorage\n",
                                                                              b"ccollections\nOrderedDict\n"), FLOATS4),
       "storage type"),
      ("not_zip_not_pickle", "pth", b"\x00" * 64, "refusing pickle opcode 0x00"),
      ("empty", "pth", b"", "not a readable torch state dict"),
      ("legacy_storage_count_huge", "pth", b"", "elements"),  # filled in below
      # .npz
      ("npz_huge_shape", "npz", _zip({"x.npy": npy_header((2**40,)) + b"\0" * 8}), "declares shape"),
      ("npz_shape_beyond_2_62", "npz", _zip({"x.npy": npy_header((2**63,)) + b"\0" * 8}), "malformed shape"),
      ("npz_short_data", "npz", _zip({"x.npy": npy_header((4,)) + b"\0" * 8}), "declares shape"),
      ("npz_object_dtype", "npz", npz_bytes(x=np.array([{"a": 1}], dtype=object)), "Python objects"),
      ("npz_deflate_bomb", "npz", npz_bytes(True, x=np.zeros(64 << 20, np.uint8)), "more than"),
      ("npz_deflate_small_fits", "npz", npz_bytes(True, x=np.zeros(1 << 20, np.uint8)),
       ("ok", lambda r: r["x"].shape == (1 << 20,) and not r["x"].any())),
      ("npz_header_version_3", "npz", _zip({"x.npy": npy_header((1,), version=b"\x03\x00") + b"\0" * 8}),
       "version (3, 0)"),
      ("npz_header_too_long", "npz", _zip({"x.npy": npy_header((1,), version=b"\x02\x00", length=2**31) + b"\0" * 8}),
       ".npy header of 2147483648 bytes"),
      ("npz_header_deflate_bomb", "npz", _zip({"x.npy": npy_header((1,), version=b"\x02\x00", length=2**31) +
                                              b" " * (64 << 20)}, deflate=("x.npy",)), ".npy header of"),
      ("npz_member_not_npy", "npz", _zip({"x.pkl": pickle.dumps(1)}), "not an .npy"),
      ("npz_fortran", "npz", npz_bytes(x=np.asfortranarray(np.arange(6.0).reshape(2, 3))),
       ("ok", lambda r: r["x"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])),
      ("npz_not_zip", "npz", b"this is not a zip file\n" * 10, "not a readable .npz"),
      ("npz_empty_file", "npz", b"", "not a readable .npz"),
  ]
  out = []
  for id_, kind, raw, expected in cases:
    if id_ == "lzma_entry":
      buffer = io.BytesIO()
      with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a/data.pkl", b"}.", zipfile.ZIP_LZMA)
      raw = buffer.getvalue()
    if id_ == "legacy_storage_count_huge":
      raw = _legacy_with_storage_count(2**40)
    out.append((id_, kind, raw, expected))
  return out


def _legacy_with_storage_count(count: int) -> bytes:
  """The legacy fixture with the first storage's element count replaced."""
  raw = open(os.path.join(DATA, "state_dict_legacy.pth"), "rb").read()
  f = io.BytesIO(raw)
  for _ in range(5):
    _skip_pickle(f)
  at = f.tell()
  return raw[:at] + count.to_bytes(8, "little", signed=True) + raw[at + 8:]


def _skip_pickle(f):
  import pickletools
  for op, _, _ in pickletools.genops(f):
    if op.name == "STOP":
      return


INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**62, 2**63 - 1, 2**64 - 1]


def mutate(raw: bytes, rng) -> bytes:
  data = bytearray(raw)
  kind = rng.integers(6)
  if not data or kind == 0:  # insert
    at = int(rng.integers(len(data) + 1))
    data[at:at] = rng.bytes(int(rng.integers(1, 16)))
  elif kind == 1:  # flip bytes
    for at in rng.integers(len(data), size=int(rng.integers(1, 9))):
      data[at] = int(rng.integers(256))
  elif kind == 2:  # truncate
    del data[int(rng.integers(len(data))):]
  elif kind == 3:  # delete a slice
    at = int(rng.integers(len(data)))
    del data[at:at + int(rng.integers(1, 64))]
  elif kind == 4:  # an interesting integer, 1-8 bytes, either byte order
    value = INTERESTING[int(rng.integers(len(INTERESTING)))]
    width = int(rng.choice([1, 2, 4, 8]))
    at = int(rng.integers(len(data)))
    data[at:at + width] = (value % 2**(8 * width)).to_bytes(width, str(rng.choice(["little", "big"])))
  else:  # duplicate a chunk
    at = int(rng.integers(len(data)))
    chunk = data[at:at + int(rng.integers(1, 64))]
    to = int(rng.integers(len(data) + 1))
    data[to:to] = chunk
  return bytes(data)


def fuzz_inputs(seed: int, counts: dict):
  """(id, kind, bytes) of the random cases."""
  rng = np.random.default_rng(seed)
  pth_zip = open(os.path.join(DATA, "state_dict_zip.pth"), "rb").read()
  pth_legacy = open(os.path.join(DATA, "state_dict_legacy.pth"), "rb").read()
  npz_plain, npz_deflated = npz_bytes(**npz_sample()), npz_bytes(True, **npz_sample())
  zip_entries = _unzip(pth_zip)
  [pkl_name] = [n for n in zip_entries if n.endswith("data.pkl")]
  npz_entries = _unzip(npz_plain)

  def repeat(name, n, make):
    for i in range(n):
      yield f"{name}_{i}", make()

  def inner_pkl():
    entries = dict(zip_entries)
    raw = entries[pkl_name]
    for _ in range(int(rng.integers(1, 4))):
      raw = mutate(raw, rng)
    entries[pkl_name] = raw
    return _zip(entries)

  def inner_npy():
    entries = dict(npz_entries)
    name = sorted(entries)[int(rng.integers(len(entries)))]
    head, tail = entries[name][:128], entries[name][128:]
    entries[name] = mutate(head, rng) + tail
    return _zip(entries, deflate=tuple(entries) if rng.integers(2) else ())

  sources = [
      ("pth_zip_bytes", "pth", counts["pth_zip_bytes"], lambda: mutate(pth_zip, rng)),
      ("pth_zip_data_pkl", "pth", counts["pth_zip_data_pkl"], inner_pkl),
      ("pth_legacy_bytes", "pth", counts["pth_legacy_bytes"], lambda: mutate(pth_legacy, rng)),
      ("pth_random", "pth", counts["random"], lambda: rng.bytes(int(rng.integers(0, 512)))),
      ("npz_bytes", "npz", counts["npz_bytes"], lambda: mutate(npz_plain if rng.integers(2) else npz_deflated, rng)),
      ("npz_npy_header", "npz", counts["npz_npy_header"], inner_npy),
      ("npz_random", "npz", counts["random"], lambda: rng.bytes(int(rng.integers(0, 512)))),
  ]
  for name, kind, n, make in sources:
    for id_, raw in repeat(name, n, make):
      yield id_, kind, raw


COUNTS = dict(pth_zip_bytes=800, pth_zip_data_pkl=900, pth_legacy_bytes=900, npz_bytes=600, npz_npy_header=600,
              random=100)


# --- the subprocess ----------------------------------------------------------------------------------------


def _expected_state_dict():
  with np.load(os.path.join(DATA, "state_dict.npz")) as data:
    return {key: data[key] for key in data.files}


def _same(got, want) -> bool:
  return (list(got) == list(want) and
          all(got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and np.array_equal(got[k], want[k])
              for k in want))


def _vm_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmSize:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmSize in /proc/self/status")


def worker(seed: int, counts: dict, headroom: int) -> dict:
  """Runs every case under an address-space cap; returns a summary (failures listed)."""
  sys.path.insert(0, ROOT)
  from distill import npz_arrays
  from distill.evaluation import torch_weights
  expected = _expected_state_dict()
  pth = {name: open(os.path.join(DATA, name), "rb").read() for name in ("state_dict_zip.pth", "state_dict_legacy.pth")}
  sample = npz_sample()
  inputs = list(fuzz_inputs(seed, counts))
  cases = crafted()
  read = {"pth": torch_weights.state_dict_from_bytes,
          "npz": lambda raw: npz_arrays.read_npz_arrays(io.BytesIO(raw), len(raw))}
  limit = _vm_bytes() + headroom
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  outcomes, failures, slowest = collections.Counter(), [], (0.0, "")

  def attempt(id_, kind, raw):
    nonlocal slowest
    start = time.perf_counter()
    try:
      result = read[kind](raw)
      valid = all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in dict(result).items())
      outcome = ("ok", result) if valid else ("bad result", f"{type(result).__name__}")
    except ValueError as e:  # the documented error; UnsafePickleError is one
      message = str(e)
      outcome = ("error", message) if message and "\n" not in message else ("bad message", repr(message))
    except BaseException as e:  # noqa: BLE001 — anything else is what this test looks for
      outcome = ("crash", f"{type(e).__name__}: {str(e)[:300]}")
    seconds = time.perf_counter() - start
    slowest = max(slowest, (seconds, id_))
    return outcome

  for id_, kind, raw in inputs:
    status, detail = attempt(id_, kind, raw)
    outcomes[f"{kind} {status}"] += 1
    if status not in ("ok", "error"):
      failures.append(f"{id_} ({len(raw)} bytes): {status}: {detail}")
  for id_, kind, raw, expectation in cases:
    status, detail = attempt(id_, kind, raw)
    outcomes[f"crafted {status}"] += 1
    if isinstance(expectation, tuple):
      if status != "ok" or not expectation[1](detail):
        failures.append(f"crafted {id_}: expected a correct load, got {status}: {str(detail)[:300]}")
    elif status != "error" or expectation not in detail:
      failures.append(f"crafted {id_}: expected a ValueError with {expectation!r}, got {status}: {str(detail)[:300]}")
  # After all of that (BUILD payloads included), the real files still read exactly.
  for name, raw in pth.items():
    if not _same(torch_weights.state_dict_from_bytes(raw), expected):
      failures.append(f"{name} no longer reads back to state_dict.npz after the fuzz cases")
  for compressed in (False, True):
    got = npz_arrays.read_npz_arrays(io.BytesIO(npz_bytes(compressed, **sample)), len(npz_bytes(compressed, **sample)))
    if not _same(got, sample):
      failures.append(f"the sample .npz (compressed={compressed}) does not read back")
  return {"cases": len(inputs) + len(cases), "outcomes": dict(outcomes), "failures": failures,
          "slowest": slowest, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "limit_mib": limit / 2**20}


def _run_worker(counts, headroom=HEADROOM, timeout=120):
  code = (f"import json, sys; sys.path.insert(0, {HERE!r}); import test_weight_fuzz as t; "
          f"print(json.dumps(t.worker({SEED}, {counts!r}, {headroom})))")
  env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                        cwd=ROOT)
  assert proc.returncode == 0, f"the fuzz worker died (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
  return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the tests -----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status: Linux only")
def test_every_fuzzed_and_crafted_weight_file_loads_or_is_one_value_error_within_a_memory_cap():
  start = time.time()
  summary = _run_worker(COUNTS)
  failures = summary["failures"]
  assert not failures, f"{len(failures)} of {summary['cases']} cases:\n" + "\n".join(failures[:40])
  assert summary["cases"] >= 3000
  outcomes = summary["outcomes"]
  # The mutations reach past the first check: many still load, many fail, in both formats.
  for kind, loads in (("pth", 100), ("npz", 20)):  # a flipped byte of an .npz mostly breaks its CRC
    assert outcomes.get(f"{kind} ok", 0) >= loads and outcomes.get(f"{kind} error", 0) >= 500, outcomes
  print(f"\nweight fuzz: {summary['cases']} cases in {time.time() - start:.1f}s, {outcomes}, slowest "
        f"{summary['slowest'][0] * 1000:.0f} ms ({summary['slowest'][1]}), max RSS {summary['maxrss_mib']:.0f} MiB "
        f"under a cap of {summary['limit_mib']:.0f} MiB of address space")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS: Linux only")
def test_the_memory_cap_bites():
  """The cap is real: np.load's way with a declared 4 GiB (allocate, then read) fails under it."""
  code = (f"import resource, sys; sys.path.insert(0, {HERE!r}); import numpy as np; import test_weight_fuzz as t; "
          f"limit = t._vm_bytes() + {HEADROOM}; resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); "
          "np.empty(4 << 30, np.uint8)")
  env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
  assert proc.returncode != 0 and "MemoryError" in proc.stderr, proc.stderr[-2000:]


def test_file_readers_name_no_more_than_one_line(tmp_path):
  """Through the path-taking entry points (load_torch_state_dict, writers.read_npz): the same one-line ValueError."""
  from distill import writers
  from distill.evaluation import torch_weights
  bomb = tmp_path / "bomb.npz"
  bomb.write_bytes(npz_bytes(True, x=np.zeros(64 << 20, np.uint8)))
  with pytest.raises(ValueError, match=r"^its arrays need more than \d+ bytes, the cap for a file of \d+ bytes"):
    with writers.read_npz(str(bomb)):
      pass
  stride0 = tmp_path / "stride0.pth"
  stride0.write_bytes(tensor_zip(tensor_pickle((2**30,), (0,)), FLOATS4))
  assert stride0.stat().st_size < 1000
  with pytest.raises(ValueError, match="stride 0 on a dimension of size 1073741824 would repeat elements"):
    torch_weights.load_torch_state_dict(stride0)
