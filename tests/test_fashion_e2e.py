"""The latent pipeline end to end from the command line, on a real 2,000 + 500 image subset of Fashion-MNIST
(written as IDX files so the run stays short): autoencoder, ε teacher, ε → v, stage one, a halving round,
evaluation on decoded samples, then --mode=img2img on the finished student."""
import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from distill import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBIAN = "/usr/share/datasets/fashion-mnist"


def write_subset(directory, n_train=2000, n_test=500):
  os.makedirs(directory, exist_ok=True)
  for split, n in (("train", n_train), ("test", n_test)):
    images, labels = data.load_fashion_mnist(split)
    for name, array in zip(data.FASHION_MNIST_FILES[split], (images[:n, ..., 0], labels[:n].astype(np.uint8))):
      header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
      with gzip.open(os.path.join(directory, name + ".gz"), "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DEBIAN), reason=f"{DEBIAN} absent: apt-get install dataset-fashion-mnist")
def test_latent_pipeline_and_img2img_from_the_command_line(tmp_path):
  write_subset(tmp_path / "fmnist")
  workdir = tmp_path / "run"
  pipeline = ("autoencoder", "teacher", "teacher_v", "stage_one", "distill_deterministic", "evaluate")
  run = subprocess.run(
      [sys.executable, "-m", "distill.main", f"--config={ROOT}/configs/fashion_mnist.py:quick",
       f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'fmnist'}", f"--config.pipeline={pipeline!r}",
       "--config.distill.start_steps=2", "--config.eval.w_values=(0.0,)", "--config.eval.max_reference=2000"],
      capture_output=True, text=True, timeout=1200, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  methods = {r["method"] for r in results["rows"]}
  assert {"teacher DDIM", "stage one", "guided PD"} <= methods
  assert all(np.isfinite(r["fid"]) and r["num_samples"] == 100 for r in results["rows"])
  ae = json.loads((workdir / "autoencoder" / "autoencoder.json").read_text())
  assert ae["latent_shape"] == [8, 8, 4] and ae["scale_factor"] > 0
  assert json.loads((workdir / "teacher" / "final" / "meta.json").read_text())["parameterization"] == "eps"
  assert json.loads((workdir / "teacher_v" / "final" / "meta.json").read_text())["parameterization"] == "v"

  # img2img on the 1-step student: at a vanishing strength the output is the input's autoencoder reconstruction.
  student = workdir / "distill_deterministic" / "N0001"
  out = tmp_path / "i2i"
  i2i = subprocess.run([sys.executable, "-m", "distill.main", "--mode=img2img", f"--checkpoint={student}",
                        "--strength=0.001", "--num=6", f"--out={out}"], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
  assert i2i.returncode == 0, i2i.stderr[-3000:]
  from distill import latent
  encode, decode, _, _ = latent.load_autoencoder(str(workdir / "autoencoder"))
  with np.load(str(out) + ".npz") as d:
    inputs, outputs = d["inputs"], d["outputs"]
  reconstruction = np.asarray(decode(encode(inputs)))
  assert np.abs(outputs - reconstruction).mean() < 0.02
  assert np.abs(outputs - inputs).mean() > np.abs(outputs - reconstruction).mean()  # it is the latents' picture
