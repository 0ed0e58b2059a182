"""Checks distill's FID Inception against pytorch-fid's end to end (a manual check, not a test).

Two halves, each in its own environment, sharing a folder DIR:
  TORCH_PYTHON tests/data/compare_with_pytorch_fid.py torch DIR [--weights pt_inception-2015-12-05-6726825d.pth]
  python tests/data/compare_with_pytorch_fid.py jax DIR
The torch half (torch, torchvision, pytorch-fid; not the package) writes DIR/state_dict.pth, the
given weights or random ones saved in torch's legacy format, and DIR/reference.npz: images in
[0, 1] of several sizes with pytorch-fid's pool3 and pool3 @ fc.weight.T. The jax half converts
the weights with the convert command, runs `inception_outputs` on 2 * images - 1 and prints the
largest differences.
"""
import argparse
import os
import sys

SIZES = [(299, 299), (64, 48), (32, 32), (512, 384)]


def torch_half(folder: str, weights: str | None) -> None:
  import shutil
  import types

  import numpy as np
  import torch
  try:
    import torchvision  # noqa: F401
  except RuntimeError:
    # PyPI's torchvision wheel is a CUDA build; with a CPU torch its C ops fail to register.
    # Only the model classes are needed here.
    for name in [n for n in sys.modules if n.startswith("torchvision")]:
      del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
  from pytorch_fid import inception

  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "state_dict.pth")
  if weights:
    shutil.copyfile(weights, path)
    state_dict = torch.load(path, map_location="cpu")
  else:
    torch.manual_seed(0)
    donor = inception.fid_inception_v3.__globals__["_inception_v3"](num_classes=1008, aux_logits=False, weights=None)
    state_dict = {}
    for name, value in donor.state_dict().items():
      if name.endswith("conv.weight"):
        value = torch.randn_like(value) * (2.0 / value[0].numel())**0.5
      elif name.endswith(("bn.weight", "running_var")):
        value = torch.rand_like(value) + 0.5
      elif name.endswith(("bn.bias", "running_mean")):
        value = torch.randn_like(value) * 0.1
      elif name.startswith("fc."):
        value = torch.randn_like(value) * 0.05
      state_dict[name] = value
    torch.save(state_dict, path, _use_new_zipfile_serialization=False)
  # fid_inception_v3 downloads its weights; hand it these instead.
  inception.load_state_dict_from_url = lambda *args, **kwargs: state_dict
  model = inception.InceptionV3([3]).eval()
  fc_weight = state_dict["fc.weight"].double()
  generator = torch.Generator().manual_seed(1)
  arrays = {}
  for i, (h, w) in enumerate(SIZES):
    images = torch.rand(2, 3, h, w, generator=generator)
    with torch.no_grad():
      pool3 = model(images)[0][:, :, 0, 0]
    arrays[f"images_{i}"] = images.permute(0, 2, 3, 1).numpy()
    arrays[f"pool3_{i}"] = pool3.numpy()
    arrays[f"logits_{i}"] = (pool3.double() @ fc_weight.T).numpy()
  np.savez(os.path.join(folder, "reference.npz"), **arrays)
  print(f"wrote {folder}: torch {torch.__version__}")


def jax_half(folder: str) -> None:
  import numpy as np

  from distill.evaluation import convert_inception, inception

  converted = os.path.join(folder, "inception_fid.npz")
  if convert_inception.main([os.path.join(folder, "state_dict.pth"), converted]):
    sys.exit(1)
  params = inception.load_inception(converted)
  with np.load(os.path.join(folder, "reference.npz")) as reference:
    for i, size in enumerate(SIZES):
      pool3, logits = inception.inception_outputs(params, 2.0 * reference[f"images_{i}"] - 1.0)
      for name, ours in [("pool3", pool3), ("logits", logits)]:
        theirs = reference[f"{name}_{i}"]
        error = np.max(np.abs(np.asarray(ours, np.float64) - theirs))
        print(f"{size} {name}: max |diff| {error:.2e}, max |value| {np.max(np.abs(theirs)):.2e}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("half", choices=["torch", "jax"])
  parser.add_argument("folder")
  parser.add_argument("--weights", help="pytorch-fid's real weights (torch half); random ones if absent")
  args = parser.parse_args()
  if args.half == "torch":
    torch_half(args.folder, args.weights)
  else:
    jax_half(args.folder)


if __name__ == "__main__":
  main()
