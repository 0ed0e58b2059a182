"""The reference implementations our SD networks are checked against, when the optional `reference` extra is
installed (`pip install -e .[reference]`: diffusers 0.39, the last with Flax models, and transformers 4.57, the
last with Flax CLIP). Each getter skips the calling test with the reason when its package is absent. Nothing
here imports torch: diffusers' PyTorch → Flax conversion is called on numpy arrays, and its single-file LDM
converter (in a module that imports torch) is lifted out of its source text."""
from __future__ import annotations

import ast
import importlib.util
import logging
import os

import numpy as np
import pytest

DIFFUSERS_VERSION, TRANSFORMERS_VERSION = "0.39.", "4.57."


def _package(name: str, version: str):
  try:
    module = __import__(name)
  except ImportError:
    pytest.skip(f"{name} is not installed (the optional `reference` extra: pip install -e .[reference])")
  if not module.__version__.startswith(version):
    pytest.skip(f"{name} {module.__version__} is installed; the reference is {version}x (its last with Flax)")
  return module


def diffusers():
  """The diffusers package (0.39.x), its deprecation warnings silenced, or a skip."""
  module = _package("diffusers", DIFFUSERS_VERSION)
  module.utils.logging.set_verbosity_error()
  return module


def transformers():
  """The transformers package (4.57.x) or a skip."""
  module = _package("transformers", TRANSFORMERS_VERSION)
  module.logging.set_verbosity_error()
  return module


class _Tensor:
  """What diffusers' converter calls on a torch tensor (`.numpy()`), over a numpy array."""

  def __init__(self, array):
    self.array = np.asarray(array)

  def numpy(self):
    return self.array


def diffusers_pytorch_to_flax(state: dict, flax_model) -> dict:
  """diffusers' own PyTorch → Flax conversion (`convert_pytorch_state_dict_to_flax`) of a numpy state dict."""
  from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
  return convert_pytorch_state_dict_to_flax({k: _Tensor(v) for k, v in state.items()}, flax_model)


_LDM_NAMES = ("convert_ldm_unet_checkpoint", "update_unet_resnet_ldm_to_diffusers",
              "update_unet_attention_ldm_to_diffusers", "DIFFUSERS_TO_LDM_MAPPING", "LDM_UNET_KEY")


def diffusers_ldm_unet_converter():
  """diffusers' `convert_ldm_unet_checkpoint(checkpoint, config)` (loaders/single_file_utils.py: SD single file
  → diffusers' U-Net names), taken from the module's source with the helpers and tables it uses: the module
  imports torch, the function itself only renames dict keys."""
  diffusers()
  spec = importlib.util.find_spec("diffusers")
  path = os.path.join(spec.submodule_search_locations[0], "loaders", "single_file_utils.py")
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  nodes = [n for n in tree.body
           if (isinstance(n, ast.FunctionDef) and n.name in _LDM_NAMES)
           or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in _LDM_NAMES for t in n.targets))]
  found = {n.name if isinstance(n, ast.FunctionDef) else n.targets[0].id for n in nodes}
  if found != set(_LDM_NAMES):
    pytest.skip(f"diffusers' single_file_utils.py lacks {sorted(set(_LDM_NAMES) - found)}")
  namespace = {"logger": logging.getLogger("diffusers_ldm_unet_converter")}
  exec(compile(ast.Module(body=nodes, type_ignores=[]), path, "exec"), namespace)  # noqa: S102 — installed source
  return namespace["convert_ldm_unet_checkpoint"]
