"""Regenerates the torch fixtures of tests/test_inception.py (needs torch and numpy, not the package):

  python tests/data/make_torch_fixture.py

Writes next to this file:
  state_dict_zip.pth     torch.save of a tiny state dict with real FID Inception names (zip format)
  state_dict_legacy.pth  the same with _use_new_zipfile_serialization=False (the legacy format)
  state_dict.npz         the arrays both must read back to, exactly
  resize.npz             inputs and F.interpolate(mode='bilinear', align_corners=False) outputs
The state dict comes from real modules (so it carries torch's `_metadata` and an int64 0-d
num_batches_tracked) plus a transposed fc.weight (strides (1, 5)) and an fc.bias that is a strided
slice at offset 3 of a 20-element storage.
"""
import collections
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


class BasicConv2d(nn.Module):

  def __init__(self):
    super().__init__()
    self.conv = nn.Conv2d(3, 32, kernel_size=3, stride=2, bias=False)
    self.bn = nn.BatchNorm2d(32, eps=0.001)


class Tiny(nn.Module):

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d()
    self.fc = nn.Linear(7, 5)


def state_dict() -> collections.OrderedDict:
  torch.manual_seed(0)
  model = Tiny()
  bn = model.Conv2d_1a_3x3.bn
  with torch.no_grad():
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.num_batches_tracked.fill_(2**40 + 7)  # needs all 8 bytes
  result = model.state_dict()
  result["fc.weight"] = torch.randn(7, 5).t()
  result["fc.bias"] = torch.randn(20)[3:13:2]
  assert not result["fc.weight"].is_contiguous() and result["fc.bias"].storage_offset() == 3
  return result


def resize_cases():
  generator = torch.Generator().manual_seed(1)
  cases = {}
  for i, ((h, w), size) in enumerate([((5, 7), (11, 4)), ((13, 6), (7, 9)), ((4, 4), (9, 9))]):
    x = torch.rand(2, 3, h, w, generator=generator)
    y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    cases[f"input_{i}"] = x.permute(0, 2, 3, 1).numpy()  # NHWC, as the package uses
    cases[f"output_{i}"] = y.permute(0, 2, 3, 1).numpy()
  return cases


def main():
  sd = state_dict()
  torch.save(sd, os.path.join(HERE, "state_dict_zip.pth"))
  torch.save(sd, os.path.join(HERE, "state_dict_legacy.pth"), _use_new_zipfile_serialization=False)
  np.savez(os.path.join(HERE, "state_dict.npz"), **{k: v.contiguous().numpy() for k, v in sd.items()})
  np.savez(os.path.join(HERE, "resize.npz"), **resize_cases())
  for name in sorted(os.listdir(HERE)):
    print(f"{name}: {os.path.getsize(os.path.join(HERE, name))} bytes")
  print(f"torch {torch.__version__}")


if __name__ == "__main__":
  main()
