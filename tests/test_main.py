"""The command line: bad flags and configs give one line and exit 2 with nothing written; a run resumes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "distill.main", *args], cwd=cwd, capture_output=True, text=True,
                        timeout=600)


BAD = [
    (["--config=configs/digits.py", "--config.teacher.nope=1"], "--config.teacher.nope: no such config field"),
    (["--config=configs/digits.py", "--config.model.parameterization=foo"], "config.model.parameterization='foo'"),
    (["--config=configs/digits.py", "--config.teacher.num_steps=abc"], "invalid literal for int()"),
    (["--config=configs/nope.py"], "cannot load the config file"),
    (["--config=configs/digits.py:bogus"], "unknown variant 'bogus'"),
    (["--config=configs/digits.py", "--bogus_flag=1"], "Unknown command line flag 'bogus_flag'"),
    (["--config=configs/digits.py", "--config.sample.w_values=(0,-1)"], "config.sample.w_values=-1"),
    (["--config=configs/digits.py", "--config.model.ch_mult=(1,2,2,2,2)"], "config.model.ch_mult="),
    (["--config=configs/digits.py", "--config.data.name=npz", "--config.data.path=/nope.npz"],
     "data.path='/nope.npz'"),
    (["--config=configs/digits.py", "--config.data.channels=3"], "data.channels=3"),
    (["--config=configs/digits.py", "extra_positional"], "unexpected arguments"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
  workdir = tmp_path / "wd"
  proc = run_main(*args, f"--workdir={workdir}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
  assert not workdir.exists()


def test_refuses_to_resume_a_workdir_with_another_config(tmp_path):
  workdir = tmp_path / "wd"
  workdir.mkdir()
  saved = {"seed": 123}
  (workdir / "config.json").write_text(json.dumps(saved))
  proc = run_main("--config=configs/digits.py:quick", f"--workdir={workdir}")
  assert proc.returncode == 2 and "another config" in proc.stderr
  assert json.loads((workdir / "config.json").read_text()) == saved
  assert sorted(os.listdir(workdir)) == ["config.json"]


@pytest.mark.slow
def test_quick_pipeline_end_to_end_and_rerun_skips(tmp_path):
  workdir = tmp_path / "wd"
  args = ["--config=configs/digits.py:quick", f"--workdir={workdir}", "--config.teacher.num_steps=40",
          "--config.teacher.log_every=10", "--config.teacher.ckpt_every=20", "--config.eval.classifier_steps=300"]
  proc = run_main(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for f in ("config.json", "summary.json", "teacher/samples.png", "teacher/eval.json", "teacher/final/meta.json",
            "teacher/tb/metrics.jsonl", "classifier/digits.npz"):
    assert (workdir / f).exists(), f
  report = json.loads((workdir / "teacher" / "eval.json").read_text())
  assert set(report["agreement"]) == {"0.0", "1.0"} and report["nfe"] == 64
  scalars = [json.loads(l) for l in (workdir / "teacher" / "tb" / "metrics.jsonl").read_text().splitlines()]
  assert [s["step"] for s in scalars] == [10, 20, 30, 40]
  assert all(np.isfinite(s["loss"]) and s["lr"] > 0 for s in scalars)
  again = run_main(*args)
  assert again.returncode == 0 and "already finished" in again.stdout
