"""Converts pytorch-fid's FID Inception weights into the `.npz` that `inception.load_inception` reads.

  python -m distill.evaluation.convert_inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz

SRC is a `torch.save`d state dict (read without torch, see `torch_weights`) or an `.npz` of the same
name -> array mapping. Every tensor must land on exactly one parameter of `inception.InceptionV3`
with the right shape, and every parameter must be filled; otherwise one error line says what
differs. Names map one to one ('Mixed_5b.branch1x1.conv.weight' -> 'Mixed_5b/branch1x1/conv/kernel');
BatchNorm's weight, bias, running_mean, running_var become scale, bias, mean, var and its
num_batches_tracked counters are dropped; conv weights go from OIHW to HWIO, fc.weight [1008, 2048]
to a kernel [2048, 1008].
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Mapping

import numpy as np
from flax import traverse_util

from distill.evaluation import inception, torch_weights

# Last part of a torch name -> (last part of the Flax path, axes taking the torch array to Flax).
_CONV_LEAVES = {"weight": ("kernel", (2, 3, 1, 0))}
_BN_LEAVES = {
    "weight": ("scale", None),
    "bias": ("bias", None),
    "running_mean": ("mean", None),
    "running_var": ("var", None),
}
_FC_LEAVES = {"weight": ("kernel", (1, 0)), "bias": ("bias", None)}
_SKIPPED = "num_batches_tracked"


def _leaf_rules(module_path: tuple[str, ...]) -> dict:
  if module_path == ("fc",):
    return _FC_LEAVES
  if module_path and module_path[-1] == "conv":
    return _CONV_LEAVES
  if module_path and module_path[-1] == "bn":
    return _BN_LEAVES
  return {}


def _shown(problems: list[str]) -> str:
  return "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")


def state_dict_to_params(state_dict: Mapping[str, np.ndarray]) -> dict:
  """pytorch-fid's state dict {torch name: array} -> `InceptionV3` params (nested dict, float32).

    Raises ValueError, one line listing (up to five) unexpected, missing and misshapen names, in
    torch's naming, unless the state dict fills the tree exactly.
    """
  expected = inception.param_shapes()
  flat, seen, problems = {}, set(), []
  for name, value in state_dict.items():
    parts = tuple(name.split("."))
    if parts[-1] == _SKIPPED:
      continue
    rule = _leaf_rules(parts[:-1]).get(parts[-1])
    path = parts[:-1] + (rule[0],) if rule else None
    if path not in expected:
      problems.append(f"unexpected {name}")
      continue
    seen.add(path)
    array = np.asarray(value)
    if rule[1] is not None and array.ndim == len(rule[1]):
      array = array.transpose(rule[1])
    if array.shape != expected[path]:
      torch_shape = tuple(expected[path][a] for a in np.argsort(rule[1])) if rule[1] else expected[path]
      problems.append(f"{name} has shape {tuple(np.shape(value))}, expected {torch_shape}")
      continue
    flat[path] = np.asarray(array, np.float32)
  problems += [f"missing {params_path_to_torch_name(path)}" for path in expected if path not in seen]
  if problems:
    raise ValueError(f"state dict does not match the FID Inception: {_shown(problems)}")
  return traverse_util.unflatten_dict(flat)


def params_path_to_torch_name(path: tuple[str, ...]) -> str:
  """('Mixed_5b', 'branch1x1', 'bn', 'mean') -> 'Mixed_5b.branch1x1.bn.running_mean'."""
  for torch_leaf, (flax_leaf, _) in _leaf_rules(path[:-1]).items():
    if flax_leaf == path[-1]:
      return ".".join(path[:-1] + (torch_leaf,))
  raise ValueError(f"no torch name for {'/'.join(path)}")


def params_to_state_dict(params) -> dict[str, np.ndarray]:
  """The inverse of `state_dict_to_params` (without num_batches_tracked): torch names and layouts."""
  state_dict = {}
  for path, value in traverse_util.flatten_dict(dict(params)).items():
    name = params_path_to_torch_name(path)
    axes = _leaf_rules(path[:-1])[name.rsplit(".", 1)[1]][1]
    array = np.asarray(value)
    state_dict[name] = array.transpose(np.argsort(axes)) if axes else array
  return state_dict


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A `.npz` of name -> array, or anything else as a `torch.save`d state dict."""
  if os.fspath(path).endswith(".npz"):
    from distill import writers
    with writers.read_npz(os.fspath(path)) as data:
      return {key: np.asarray(data[key]) for key in data.files}
  return torch_weights.load_torch_state_dict(path)


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
  """Reads SRC, maps it onto `InceptionV3` and writes DST (`inception.save_inception`); returns params."""
  params = state_dict_to_params(read_state_dict(src))
  inception.save_inception(dst, params)
  return params


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m distill.evaluation.convert_inception",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("src", help=f"pytorch-fid's {inception.WEIGHTS_FILE} (or an .npz of its state dict)")
  parser.add_argument("dst", help="the .npz to write (the path the config's Inception weights field names)")
  args = parser.parse_args(argv)
  from etils import epath
  if not epath.Path(args.src).exists():
    print(f"error: {args.src} does not exist (pytorch-fid's weights: {inception.WEIGHTS_URL})", file=sys.stderr)
    return 1
  try:
    params = convert(args.src, args.dst)
  except (ValueError, torch_weights.UnsafePickleError) as e:
    print(f"error: {args.src}: {e}", file=sys.stderr)
    return 1
  digest = hashlib.sha256(epath.Path(args.src).read_bytes()).hexdigest()
  count = sum(np.size(leaf) for leaf in traverse_util.flatten_dict(params).values())
  print(f"wrote {args.dst}: {count:,} parameters from {args.src} (sha256 {digest})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
