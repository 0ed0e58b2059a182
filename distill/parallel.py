"""Devices: one mesh, data parallel by default, FSDP for models that do not fit one device.

    mesh axes ('data', 'fsdp'), shape (device_count // fsdp, fsdp), over every device of every process

    batch     [B, ...]  rows split over both axes: each device holds B / device_count rows
    params    replicated (P()) when fsdp = 1; with fsdp > 1 a leaf of >= fsdp_min_size elements is split
              along its largest dimension divisible by fsdp over the 'fsdp' axis, smaller leaves replicated
    opt/EMA   the rule of params, by shape: Adam's moments and the EMA follow the parameter they shadow
    scalars   (step, counters, metrics, a round's N) replicated

Why: diffusion models of this size fit one accelerator, so the default is pure data parallelism (every
device holds the whole state, gradients are averaged by the all-reduce GSPMD inserts for the batch mean).
The 'fsdp' axis is the option for models whose parameters and Adam state do not fit: each group of `fsdp`
devices holds one copy of the state between them, and XLA all-gathers a parameter where it is used and
reduce-scatters its gradient. The batch spans both axes either way, so fsdp changes memory and
communication, never the result. Sharding is a placement, not a code path: the step is one `jax.jit`
over NamedSharding'd arguments (no pmap), so the same loss runs on 1 device or 256.

Random draws inside the step are independent of the layout only with partitionable threefry
(`jax_threefry_partitionable`, on by default since JAX 0.5): a draw of shape [B, ...] over a sharded
batch then equals the unsharded draw, which `check_partitionable_rng` asserts.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
# Below 1 MiB (float32) a parameter costs more in all-gather latency than it saves in memory.
DEFAULT_FSDP_MIN_SIZE = 2**18


class ShardingError(ValueError):
  """A mesh or batch that does not fit the devices, said in one line the user can act on."""


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp') mesh of shape (len(devices) // fsdp, fsdp) over `devices` (default: all of them).

  Axes are Auto (GSPMD propagates shardings through the step), so losses need no sharding annotations.
  """
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ShardingError(f"fsdp={fsdp} must be a positive divisor of the {len(devices)} devices")
  return jax.make_mesh((len(devices) // fsdp, fsdp), BATCH_AXES, (AxisType.Auto, AxisType.Auto), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ('data', 'fsdp'); every other axis whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """P() or the spec splitting the largest dimension of `shape` divisible by `fsdp` over 'fsdp' (ties: the
  later dimension, e.g. a conv kernel's output channels). Leaves under `min_size` elements stay whole."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [(size, i) for i, size in enumerate(shape) if size % fsdp == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  return P(*([None] * axis + [FSDP]))


def param_shardings(mesh: Mesh, params: PyTree, fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> PyTree:
  """A NamedSharding per leaf of `params` (arrays or ShapeDtypeStructs): the rule of the module docstring.
  Applies to any state tree (optimizer state, EMA, scalars): it looks only at shapes."""
  fsdp = mesh.shape[FSDP]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp, fsdp_min_size)), params)


def replicated_shardings(mesh: Mesh, tree: PyTree) -> PyTree:
  return jax.tree.map(lambda _: replicated(mesh), tree)


def place(tree: PyTree, shardings: PyTree) -> PyTree:
  """`tree` as global arrays with `shardings` (a matching tree). Every process must pass the same values.
  A leaf already placed so may come back as itself, not a copy: copy before donating it."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.jit(lambda a: a, out_shardings=sharding)(x)  # reshard across processes
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's rows {name: numpy [b, ...]} -> global arrays [b * process_count, ...] split over the
  batch axes. b must be divisible by this process's device count; 0-d leaves are replicated as they are."""
  n_local = len(mesh.local_devices)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0:
      return jax.make_array_from_process_local_data(replicated(mesh), x)
    if x.shape[0] % n_local:
      raise ShardingError(f"a per-process batch of {x.shape[0]} rows does not split over {n_local} local devices; "
                          f"use a batch size divisible by {mesh.size} (the device count)")
    return jax.make_array_from_process_local_data(batch_sharding(mesh), x)

  return jax.tree.map(put, local_batch)


def to_host(tree: PyTree) -> PyTree:
  """Numpy copies of (global) arrays, whole on every process: a collective for a leaf split across processes,
  so every process calls it with the same tree."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      from jax.experimental import multihost_utils
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)

  return jax.tree.map(get, tree)


def sync_processes(name: str):
  """A barrier across processes (nothing with one): file work one process does before the others go on."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def check_partitionable_rng(mesh: Mesh):
  """Raises unless random draws over a sharded batch equal the unsharded ones (see the module docstring)."""
  if mesh.size > 1 and not jax.config.jax_threefry_partitionable:
    raise ShardingError("jax_threefry_partitionable is off: random draws would depend on the device count; "
                        "turn it on (jax.config.update('jax_threefry_partitionable', True))")
