"""The command line: bad flags and configs give one line and exit 2 with nothing written; a run resumes."""
import functools
import json
import os

import numpy as np
import pytest

from tests import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


run_main = functools.partial(cli.run_main, timeout=1800)


BAD = [
    (["--config=configs/digits.py", "--config.teacher.nope=1"], "--config.teacher.nope: no such config field"),
    (["--config=configs/digits.py", "--config.model.parameterization=foo"], "config.model.parameterization='foo'"),
    (["--config=configs/digits.py", "--config.teacher.num_steps=abc"], "--config.teacher.num_steps=abc"),
    (["--config=configs/nope.py"], "cannot load the config file"),
    (["--config=configs/digits.py:bogus"], "unknown variant 'bogus'"),
    (["--config=configs/digits.py", "--config.model.ch=1.5"], "--config.model.ch=1.5"),
    (["--config=configs/digits.py", "--bogus_flag=1"], "Unknown command line flag 'bogus_flag'"),
    (["--config=configs/digits.py", "--config.sample.w_values=(0,-1)"], "config.sample.w_values=-1"),
    (["--config=configs/digits.py", "--config.model.ch_mult=(1,2,2,2,2)"], "config.model.ch_mult="),
    (["--config=configs/digits.py", "--config.data.name=npz", "--config.data.path=/nope.npz"],
     "data.path='/nope.npz'"),
    (["--config=configs/digits.py", "--config.data.channels=3"], "data.channels=3"),
    (["--config=configs/digits.py", "extra_positional"], "unexpected arguments"),
    (["--config=configs/digits.py", "--config.distill.start_steps=48"], "config.distill.start_steps=48"),
    (["--config=configs/digits.py", "--config.distill.w_min=5.0"], "config.distill.w_min=5.0"),
    (["--mode=sample", "--checkpoint=/nope"], "--checkpoint='/nope': no finished stage"),
    (["--mode=sample"], "--checkpoint is required"),
    (["--mode=sample", "--checkpoint=/nope", "--w=0,x"], "--w=0,x"),
    (["--mode=style_transfer", "--encoder=/nope"], "--encoder and --decoder are required"),
    (["--mode=bogus"], "--mode=bogus"),
    (["--config=configs/digits.py", "--config.eval.metric=inception", "--config.eval.inception_path=/nope/w.npz"],
     "eval.inception_path: Inception weights not found at /nope/w.npz"),
    (["--config=configs/digits.py", "--config.eval.metric=fid"], "config.eval.metric='fid'"),
    (["--mode=evaluate"], "needs exactly one of --checkpoint"),
    (["--mode=evaluate", "--config=configs/digits.py", "--samples=/nope.npz"], "--samples='/nope.npz': no such file"),
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
def test_quick_pipeline_end_to_end_chains_rounds_and_rerun_skips(tmp_path):
  from distill import train

  workdir = tmp_path / "wd"
  # Guided distillation's stages (`:quick` alone runs every method's; README "Measured" has that run).
  pipeline = ("teacher", "stage_one", "distill_deterministic", "distill_stochastic", "single_w", "two_student",
              "encoder", "evaluate")
  common = ["--config=configs/digits.py:quick", f"--workdir={workdir}"]
  args = common + [f"--config.pipeline={pipeline!r}", "--config.teacher.num_steps=40",
          "--config.teacher.log_every=10", "--config.teacher.ckpt_every=20", "--config.eval.classifier_steps=300",
          "--config.distill.stage_one_steps=20", "--config.distill.start_steps=4", "--config.eval.per_class=5"]
  proc = run_main(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for f in ("config.json", "summary.json", "teacher/samples.png", "teacher/eval.json", "teacher/final/meta.json",
            "teacher/tb/metrics.jsonl", "classifier/digits.npz", "stage_one/samples.png", "results.json",
            "report.md", "distill_deterministic/N0001/samples.png", "distill_stochastic/N0002/samples.png",
            "single_w/w1/N0001/samples.png", "two_student/N0001/samples.png"):
    assert (workdir / f).exists(), f
  report = json.loads((workdir / "teacher" / "eval.json").read_text())
  assert set(report["agreement"]) == {"0.0", "1.0"} and report["nfe"] == 32
  scalars = [json.loads(l) for l in (workdir / "teacher" / "tb" / "metrics.jsonl").read_text().splitlines()]
  assert [s["step"] for s in scalars] == [10, 20, 30, 40]
  assert all(np.isfinite(s["loss"]) and s["lr"] > 0 for s in scalars)

  # Round chaining: each round's teacher is exactly the previous round's final student.
  for chain, first in (("distill_deterministic", "stage_one"), ("distill_stochastic", "stage_one"),
                       ("two_student", "teacher"), ("single_w/w1", "single_w/w1/stage_one")):
    previous = str(workdir / first)
    for n in (2, 1):
      stage = str(workdir / chain / f"N{n:04d}")
      _, meta = train.load_final_params(stage)
      assert meta["num_sampling_steps"] == n and meta["teacher_steps"] == 2 * n
      assert meta["teacher_fingerprint"] == train.fingerprint(train.load_final_params(previous)[0]), stage
      previous = stage
  # --mode=plan's records are the ones the stages wrote (trained values aside).
  from distill import contract, evaluate, registry, sampling
  _, config = sampling.find_run(str(workdir / "teacher"))  # the run's config.json
  planned = registry.plan(config)
  assert {name for _, name, _ in planned} == {n for n, _ in evaluate.finished_students(str(workdir))}
  for _, name, want in planned:
    got = contract.StageMeta.from_dict(train.load_final_params(str(workdir / name))[1])
    strip = lambda m: m.replace(extra={k: v for k, v in m.extra.items() if k != "teacher_fingerprint"})
    assert strip(got) == strip(want), name
  # Alg. 3 at N = 1 teaches the teacher's own x̂(z_1): that round's student is its teacher, not trained.
  stochastic_1, meta_1 = train.load_final_params(str(workdir / "distill_stochastic" / "N0001"))
  assert meta_1["num_steps"] == 0
  assert train.fingerprint(stochastic_1) == meta_1["teacher_fingerprint"]
  rows = json.loads((workdir / "results.json").read_text())["rows"]
  # (single-w students are scored at their own w only; this run evaluates w = 0)
  assert {(r["method"], r["sampler"], r["steps"]) for r in rows} >= {
      ("teacher DDIM", "ddim", 16), ("teacher DDPM", "ddpm", 16), ("guided PD", "deterministic", 1),
      ("guided PD", "stochastic", 2), ("two-student", "deterministic", 1), ("stage one", "deterministic", 4)}
  assert all(r["nfe"] == 2 * r["steps"] for r in rows if r["method"].startswith("teacher") or
             r["method"] == "two-student")
  assert all(r["metric"] == "classifier" and np.isfinite([r["fid"], r["is"], r["precision"], r["recall"]]).all()
             for r in rows)
  pd = {r["steps"]: r for r in rows if r["method"] == "guided PD" and r["sampler"] == "deterministic"}
  assert pd[1]["student_updates"] > pd[2]["student_updates"] > 0  # cost accumulates along the chain
  for f in ("report.md", "fid_vs_nfe.png", "fid_vs_is.png", "eval_grids/guided_PD_deterministic_w0_1.png"):
    assert (workdir / f).exists(), f
  assert "classifier-FID" in (workdir / "report.md").read_text()

  again = run_main(*args)
  assert again.returncode == 0 and "already finished" in again.stdout
  # Evaluating again from scratch (same checkpoints, noise and seed; the row cache removed) gives the same
  # numbers, and so does the cached evaluation.
  import shutil
  os.remove(workdir / "results.json")
  shutil.rmtree(workdir / "eval_cache")
  # A repeated --config.pipeline flag would be applied after the first one and names 'evaluate' twice: the
  # evaluate-only runs give every flag but the pipeline once.
  only_evaluate = [a for a in args if not a.startswith("--config.pipeline=")] + ["--config.pipeline=('evaluate',)"]
  reeval = run_main(*only_evaluate, "--allow_config_change")
  assert reeval.returncode == 0, reeval.stderr[-2000:]
  assert json.loads((workdir / "results.json").read_text())["rows"] == rows
  os.remove(workdir / "results.json")
  cached = run_main(*only_evaluate, "--allow_config_change")
  assert cached.returncode == 0 and "are cached" in cached.stdout, cached.stdout[-2000:]
  assert json.loads((workdir / "results.json").read_text())["rows"] == rows
  sample = run_main("--mode=sample", f"--checkpoint={workdir}/distill_deterministic/N0002", "--w=0,2", "--num=2")
  assert sample.returncode == 0 and (workdir / "distill_deterministic/N0002/sample_ddim_2steps_seed0.npz").exists()
  refused = run_main("--mode=sample", f"--checkpoint={workdir}/distill_deterministic/N0002", "--steps=4")
  assert refused.returncode == 2 and "distilled for 2" in refused.stderr


def test_a_rerun_may_change_how_data_is_read_and_checkpoints_written():
  from distill import main as main_lib
  saved = {"seed": 0, "data": {"name": "cifar10", "image_size": 32}, "mesh": {"fsdp": 1}}  # before those fields
  now = {"seed": 0, "data": {"name": "cifar10", "image_size": 32, "num_workers": 8, "prefetch": 4},
         "mesh": {"fsdp": 1}, "train": {"async_checkpoints": True}}
  assert main_lib._first_difference(saved, now) is None
  now["data"]["image_size"] = 16
  assert main_lib._first_difference(saved, now) == "data.image_size: saved 32, now 16"


def test_a_field_added_after_a_run_is_no_change_at_its_default():
  """A workdir's config.json written before eval.seeds existed resumes when the field is at its default (the
  behaviour the run had), and is refused when it is not."""
  from distill import configuration
  from distill import main as main_lib
  defaults = json.loads(configuration.base_config().to_json_best_effort())
  saved = {"seed": 0, "eval": {"per_class": 200}}
  now = {"seed": 0, "eval": {"per_class": 200, "seeds": 1}}
  assert main_lib._first_difference(saved, now, defaults=defaults) is None
  now["eval"]["seeds"] = 3
  assert main_lib._first_difference(saved, now, defaults=defaults) == "eval.seeds: saved None, now 3"
  assert main_lib._first_difference(saved, {"seed": 0, "eval": {"per_class": 200, "seeds": 1}}) is not None
