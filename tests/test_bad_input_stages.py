"""Bad input that only a later stage can find, on real checkpoints (issue 18): a tiny digits teacher and its
stage-one student are trained once through `distill.main` (the `trained` fixture, ~20 s on 2 cores), and each case
then drives a later stage (stage_one, distill_deterministic, sfd, dsd, consistency, evaluate) or --mode=sample /
--mode=evaluate on a copy of that run with one thing wrong: a teacher's parameters truncated or garbled, its
Orbax metadata unreadable, a meta.json naming an unknown kind, sampler or parameterization, a teacher of another
model config (the run resumed with another model.ch, or distill.teacher_dir pointing at it), Inception weights
that are not an .npz.

Every case must print exactly one line on stderr ("error: …", naming the file or field), with the exit code
`distill.main` documents: 2 for bad input it finds before anything is written (and then nothing under the case's
tmp_path changes), 1 for a stage that fails on it (a `TrainingError`/`StageFailed`: "a checkpoint that does not
fit", "any other error inside a stage"). Either way the finished stages' final/ are byte-identical afterwards.
One subprocess per case (~2 s: it fails before compiling anything). The cases are listed in docs/bad_input.md.
"""
import functools
import hashlib
import json
import os
import shutil

import pytest

from tests import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "--config=configs/digits.py:quick"
# The quick digits config shrunk to seconds: a 1-level U-Net of width 8, 4 teacher updates, 2 stage-one updates
# (a 2-step student), 4-step teacher sampling, a 4-update classifier and 2 samples per class per evaluated row.
TINY = (
    "--config.model.ch=8", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()",
    "--config.model.num_groups=4", "--config.model.head_dim=8",
    "--config.teacher.num_steps=4", "--config.teacher.batch_size=16", "--config.teacher.log_every=2",
    "--config.teacher.ckpt_every=2",
    "--config.distill.stage_one_steps=2", "--config.distill.start_steps=2", "--config.distill.batch_size=16",
    "--config.distill.round_steps=2", "--config.distill.final_round_steps=2", "--config.distill.log_every=2",
    "--config.distill.ckpt_every=2",
    "--config.sample.num_steps=4", "--config.sample.w_values=(0.0,)", "--config.sample.per_cell=1",
    "--config.eval.class_agreement=False", "--config.eval.classifier_steps=4", "--config.eval.per_class=2",
    "--config.eval.w_values=(0.0,)", "--config.eval.teacher_ddpm=reference", "--config.eval.bootstrap=0",
    "--config.eval.max_reference=200", "--config.eval.is_splits=2",
)
TRAINED = ("teacher", "stage_one")


run_main = functools.partial(cli.run_main, cache=False)


def tiny_args(workdir, pipeline, *extra) -> list[str]:
  """distill.main's arguments for the tiny run in `workdir` with config.pipeline=`pipeline`; an --config.x=y of
  `extra` replaces TINY's."""
  given = {a.split("=", 1)[0] for a in extra}
  return [QUICK, f"--workdir={workdir}", f"--config.pipeline={tuple(pipeline)!r}",
          *(a for a in TINY if a.split("=", 1)[0] not in given), *extra]


def train_tiny(workdir, pipeline=TRAINED):
  """Trains the tiny run's `pipeline` in `workdir` through distill.main; returns the finished process."""
  proc = run_main(*tiny_args(workdir, pipeline))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny run of ('teacher', 'stage_one'); each case works on its own copy."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  train_tiny(workdir)
  return workdir


# --- what a case breaks in its copy: (action, target, *argument) ------------------------------------------------


def _array_file(run, stage):
  """The largest OCDBT data file of a stage's final parameters (where its arrays' bytes are)."""
  files = [p for p in (run / stage / "final" / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _apply(step, run, tmp, names):
  action, target, *rest = step
  if action == "drop":  # a stage not trained yet, so the case's pipeline runs it
    shutil.rmtree(run / target)
  elif action == "truncate":
    path = _array_file(run, target)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  elif action == "garble":  # every data file overwritten after its first zstd magic number, deterministically
    # (1 KiB inside one file could land in a block that still decodes, to values that are merely wrong: the
    # stage then fails on a non-finite loss, another case; which block it lands in depends on the file layout.)
    for path in (run / target / "final" / "params").rglob("*"):
      if path.is_file() and path.parent.name == "d":
        size = path.stat().st_size
        path.write_bytes(path.read_bytes()[:4] + (bytes(range(256)) * (size // 256 + 1))[:size - 4])
  elif action == "unreadable_metadata":
    (run / target / "final" / "params" / "_METADATA").write_text("{")
  elif action == "meta":
    path = run / target / "final" / "meta.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **rest[0]}, indent=1))
  elif action == "config":  # the run's config.json, as --mode=sample/evaluate read it
    path = run / "config.json"
    config = json.loads(path.read_text())
    config[target].update({k: v.format(**names) if isinstance(v, str) else v for k, v in rest[0].items()})
    path.write_text(json.dumps(config, indent=1))
  elif action == "garbage":
    (tmp / target).write_bytes(b"this is not an .npz file\n" * 10)
  elif action == "move":  # a stage directory taken out of its run (no config.json above it)
    (tmp / rest[0]).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(run / target, tmp / rest[0])
  else:
    raise KeyError(action)


def describe(setup) -> str:
  """A case's setup in words, for docs/bad_input.md."""
  words = []
  for action, target, *rest in setup:
    what = {"drop": "remove {t}/", "truncate": "truncate {t}/final/params' largest data file to half",
            "garble": "overwrite {t}/final/params' data files after their first 4 bytes",
            "unreadable_metadata": "{t}/final/params/_METADATA = '{{'", "meta": "{t}/final/meta.json: {r}",
            "config": "config.json {t}: {r}", "garbage": "{{tmp}}/{t}: not an .npz",
            "move": "move {t}/ to {{tmp}}/{r}"}[action]
    words.append(what.format(t=target, r=", ".join(f"{k}={v!r}" for k, v in rest[0].items()) if rest and
                             isinstance(rest[0], dict) else (rest[0] if rest else "")))
  return "; ".join(words)


def _finals(run) -> dict:
  """{stage/final/file: sha256} of every finished stage's final/ in the run."""
  out = {}
  for dirpath, _, files in os.walk(run):
    rel = os.path.relpath(dirpath, run)
    if "final" in rel.split(os.sep):
      for f in files:
        with open(os.path.join(dirpath, f), "rb") as fh:
          out[os.path.join(rel, f)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _tree(root) -> dict:
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for d in dirnames:
      out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
    for f in filenames:
      with open(os.path.join(dirpath, f), "rb") as fh:
        out[os.path.relpath(os.path.join(dirpath, f), root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


# --- the table -------------------------------------------------------------------------------------------------


def case(id_, args, code, *needles, setup=()):
  """args and needles may use {run} (the copy of the trained run: the default --workdir) and {tmp}; '{tiny}' in
  args stands for the TINY overrides. code: the exit code (2: bad input, nothing written; 1: the stage fails)."""
  return pytest.param(args, code, needles, tuple(setup), id=id_)


def stage(*pipeline):
  """The arguments that run `pipeline` on the copy of the trained run (its config.json names another pipeline)."""
  return [QUICK, f"--config.pipeline={tuple(pipeline)!r}", "{tiny}", "--allow_config_change"]


NOT_AN_NPZ = "garbage.npz"
CASES = [
    # stage_one and distill_deterministic: the parameters they read.
    case("stage_one_teacher_params_truncated", stage("stage_one"), 1,
         "{run}/teacher/final/params: unreadable checkpoint", "OUT_OF_RANGE",
         setup=[("drop", "stage_one"), ("truncate", "teacher")]),
    # Garbled data files hold OCDBT's tree too: the check before the run cannot read the parameters' shapes.
    case("stage_one_teacher_params_garbled", stage("stage_one"), 2, "{run}/teacher/final: unreadable",
         setup=[("drop", "stage_one"), ("garble", "teacher")]),
    case("stage_one_teacher_metadata_unreadable", stage("stage_one"), 2, "{run}/teacher/final: unreadable",
         "_METADATA: missing or unreadable", setup=[("drop", "stage_one"), ("unreadable_metadata", "teacher")]),
    case("distill_deterministic_stage_one_params_truncated", stage("distill_deterministic"), 1,
         "{run}/stage_one/final/params: unreadable checkpoint", "OUT_OF_RANGE", setup=[("truncate", "stage_one")]),
    # A teacher of another model config: the run resumed with another model.ch, or one from elsewhere.
    case("consistency_teacher_of_another_model", stage("consistency") + ["--config.model.ch=16"], 2,
         "{run}/teacher/final", "does not fit config.model", "(32,) in the checkpoint, (64,) in the model"),
    case("stage_one_teacher_dir_of_another_model", stage("stage_one") + [
        "--config.model.ch=16", "--config.distill.teacher_dir={run}/teacher", "--workdir={tmp}/wd"], 2,
         "config.distill.teacher_dir='{run}/teacher'", "that teacher has model.ch=8, this run model.ch=16"),
    case("stage_one_teacher_dir_without_run_of_another_model", stage("stage_one") + [
        "--config.model.ch=16", "--config.distill.teacher_dir={tmp}/elsewhere/teacher", "--workdir={tmp}/wd"], 2,
         "{tmp}/elsewhere/teacher/final", "does not fit config.model", setup=[("move", "teacher", "elsewhere/teacher")]),
    # sfd, dsd, consistency: what the teacher's (or stage one's) meta.json says.
    case("sfd_teacher_kind_unknown", stage("sfd"), 1, "{run}/teacher: not a CFG teacher (kind='banana')",
         setup=[("meta", "teacher", {"kind": "banana"})]),
    case("dsd_teacher_parameterization_unknown", stage("dsd"), 1, "{run}/teacher predicts 'noise'",
         "model.parameterization is 'v'", setup=[("meta", "teacher", {"parameterization": "noise"})]),
    case("consistency_teacher_predicts_eps", stage("consistency"), 1, "{run}/teacher predicts 'eps'",
         "add 'teacher_v'", setup=[("meta", "teacher", {"parameterization": "eps"})]),
    case("dsd_init_stage_one_not_w_conditioned", stage("dsd") + ["--config.dsd.init=stage_one"], 1,
         "{run}/stage_one: not a w-conditioned stage-one student", setup=[("meta", "stage_one", {"w_conditioned": False})]),
    case("dsd_init_stage_one_metadata_unreadable", stage("dsd") + ["--config.dsd.init=stage_one"], 1,
         "{run}/stage_one/final/params: unreadable checkpoint", "JSONDecodeError",
         setup=[("unreadable_metadata", "stage_one")]),
    # evaluate: the weights it scores with, and every finished stage it loads.
    case("evaluate_inception_weights_not_npz", stage("evaluate") + [
        "--config.eval.metric=inception", "--config.eval.inception_path={tmp}/" + NOT_AN_NPZ], 2,
         "eval.inception_path='{tmp}/garbage.npz'", "not the FID Inception's weights", "convert_inception",
         setup=[("garbage", NOT_AN_NPZ)]),
    case("evaluate_student_sampler_unknown", stage("evaluate"), 1,
         "{run}/stage_one/final/meta.json: sampler='banana' is not registered", "registered: cfg_ddim",
         setup=[("meta", "stage_one", {"sampler": "banana"})]),
    case("evaluate_student_params_truncated", stage("evaluate"), 1,
         "{run}/stage_one/final/params: unreadable checkpoint", setup=[("truncate", "stage_one")]),
    # --mode=sample and --mode=evaluate of one checkpoint.
    case("sample_params_truncated", ["--mode=sample", "--checkpoint={run}/stage_one"], 2,
         "--checkpoint='{run}/stage_one'", "stage_one/final/params: unreadable checkpoint",
         setup=[("truncate", "stage_one")]),
    case("sample_metadata_unreadable", ["--mode=sample", "--checkpoint={run}/stage_one"], 2,
         "--checkpoint='{run}/stage_one'", "unreadable checkpoint", "JSONDecodeError",
         setup=[("unreadable_metadata", "stage_one")]),
    case("sample_teacher_parameterization_unknown", ["--mode=sample", "--checkpoint={run}/teacher"], 2,
         "--checkpoint='{run}/teacher'", "teacher/final/meta.json: parameterization='noise'", "'eps', 'v'",
         setup=[("meta", "teacher", {"parameterization": "noise"})]),
    case("sample_sampler_unknown", ["--mode=sample", "--checkpoint={run}/stage_one"], 2,
         "--checkpoint='{run}/stage_one'", "sampler='banana' is not registered",
         setup=[("meta", "stage_one", {"sampler": "banana"})]),
    case("evaluate_mode_inception_weights_not_npz", ["--mode=evaluate", "--checkpoint={run}/stage_one"], 2,
         "eval.inception_path='{tmp}/garbage.npz'", "not the FID Inception's weights",
         setup=[("garbage", NOT_AN_NPZ), ("config", "eval", {"metric": "inception",
                                                             "inception_path": "{tmp}/" + NOT_AN_NPZ})]),
    case("evaluate_mode_teacher_params_truncated", ["--mode=evaluate", "--checkpoint={run}/teacher"], 2,
         "--checkpoint='{run}/teacher'", "teacher/final/params: unreadable checkpoint", setup=[("truncate", "teacher")]),
]


@pytest.mark.parametrize("args,code,needles,setup", CASES)
def test_a_later_stage_names_bad_input_in_one_line(tmp_path, trained, args, code, needles, setup):
  run = tmp_path / "run"
  shutil.copytree(trained, run)
  names = {"run": str(run), "tmp": str(tmp_path)}
  for step in setup:
    _apply(step, run, tmp_path, names)
  argv = []
  for a in args:
    argv += list(TINY) if a == "{tiny}" else [a.format(**names)]
  if not any(a.startswith(("--workdir=", "--checkpoint=")) for a in argv):
    argv.append(f"--workdir={run}")
  finals, before = _finals(run), _tree(tmp_path)
  proc = run_main(*argv)
  report = f"exit {proc.returncode}; stderr:\n{proc.stderr[-3000:]}"
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == code, report
  assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, report
  for needle in needles:
    assert needle.format(**names) in lines[0], f"{needle.format(**names)!r} not in {lines[0]!r}"
  assert _finals(run) == finals, "a finished stage's final/ changed"
  if code == 2:
    assert _tree(tmp_path) == before, f"written under {tmp_path}: {sorted(set(_tree(tmp_path)) ^ set(before))}"
