"""Text-to-image end to end from the command line on a real 2,000 + 500 image subset of Fashion-MNIST: the
autoencoder, the text encoder stage, a text-conditioned ε teacher on Stable Diffusion's U-Net, its inpainting
extension, stage one, a halving round, SFD, DSD and CD, and the evaluation with the text-image score; then --prompt with
--mode=sample, img2img and inpaint on the finished student."""
import functools
import json
import os

import numpy as np
import pytest

from tests import cli
from tests.test_fashion_e2e import DEBIAN, ROOT, write_subset


_main = functools.partial(cli.run_main, timeout=1500)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DEBIAN), reason=f"{DEBIAN} absent: apt-get install dataset-fashion-mnist")
def test_text_guided_pipeline_and_prompt_modes(tmp_path):
  write_subset(tmp_path / "fmnist")
  workdir = tmp_path / "run"
  # SFD, DSD and CD too: SFD's and DSD's trajectories take the text + inpainting conditions of the training batches.
  common = [f"--config={ROOT}/configs/fashion_mnist.py:text,inpaint,quick", f"--workdir={workdir}",
            f"--config.data.data_dir={tmp_path / 'fmnist'}", "--config.distill.start_steps=2",
            "--config.eval.w_values=(0.0,)", "--config.eval.max_reference=2000", "--config.text.steps=150",
            "--config.dsd.kinds=('DSDI',)"]
  run = _main(*common)
  assert run.returncode == 0, run.stderr[-3000:]
  rows = json.loads((workdir / "results.json").read_text())["rows"]
  assert {"SFD (CFG)", "DSDI", "CD"} <= {r["method"] for r in rows}, {r["method"] for r in rows}
  scores = [r["text_score"] for r in rows]
  assert rows and all(0.0 <= s <= 100.0 for s in scores) and all(r.get("text_score_ci") for r in rows)
  assert "text-image score" in (workdir / "report.md").read_text()
  # The CLIP score from a CLIP model folder, every row sampled at the captions of a file (issue 17, item 6).
  from test_clip_scorer import write_clip_folder
  (tmp_path / "captions.txt").write_text("a bright large wide trouser\na dark small narrow bag\n")
  scored = _main(*common, f"--config.eval.clip_path={write_clip_folder(tmp_path / 'clip')}",
                 f"--config.eval.captions={tmp_path / 'captions.txt'}", "--allow_config_change")
  assert scored.returncode == 0, scored.stderr[-3000:]
  clip_rows = json.loads((workdir / "results.json").read_text())["rows"]
  assert len(clip_rows) == len(rows) and all(0.0 <= r["clip_score"] <= 100.0 and r.get("clip_score_ci")
                                             for r in clip_rows)
  report = (workdir / "report.md").read_text()
  assert "CLIP score" in report and "the captions of" in report and "captions.txt" in report
  student = workdir / "distill_deterministic" / "N0001"
  prompts = ["--prompt=a bright large wide trouser", "--prompt=a dark small narrow bag"]
  for mode, extra in (("sample", ["--num=2"]), ("img2img", ["--num=2", "--strength=0.8"]),
                      ("inpaint", ["--num=2", "--mask=box:0.5,0,1,1"])):
    out = tmp_path / mode
    ok = _main(f"--mode={mode}", f"--checkpoint={student}", *prompts, "--w=0,2", *extra, f"--out={out}")
    assert ok.returncode == 0, (mode, ok.stderr[-2000:])
    with np.load(str(out) + ".npz") as d:
      images = d["images"] if "images" in d else d["outputs"]
      assert np.all(np.isfinite(images)) and len(images) == 4 * (2 if mode == "sample" else 1)
  bad = _main("--mode=sample", f"--checkpoint={student}", "--prompt=a purple trouser")
  assert bad.returncode == 2 and "unknown word 'purple'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
