"""Bad input (issue 5): malformed configs, flags, data files and checkpoints.

Every case must print exactly one line on stderr ("error: …", naming the field/flag/file, the value and
what is allowed), exit with code 2, and write nothing: the tree under the case's tmp_path (which holds
the workdir, the data files and the checkpoints the case points at) is byte-identical before and after.
One subprocess per case, so the cases cannot influence each other; each costs the entry point's imports
(~1.5 s). A case that exposes a bug may be marked with `xfail=` (the observed behaviour as the reason).
"""
import functools
import hashlib
import importlib.util
import io
import json
import os
import shutil

import numpy as np
import pytest

from tests import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = "--config=configs/digits.py"
SAMPLE = "--mode=sample"
STYLE = "--mode=style_transfer"
STUDENT = "{run}/distill_deterministic/N0004"
ENCODER = "{run}/encoder/N0004"
TEACHER = "{run}/teacher"
ONLY_STAGE_ONE = "--config.pipeline=('stage_one',)"


# One subprocess per case; no persistent compilation cache (a case fails before compiling).
run_main = functools.partial(cli.run_main, cache=False)


# --- fixtures: a fake finished run (real Orbax checkpoints of a tiny tree) and data files ----------------


def _config_json(name: str) -> dict:
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return json.loads(module.get_config().to_json_best_effort())


def _stage(train, stage_dir, params, **meta):
  train._save_final(str(stage_dir), params, dict(meta, stage=os.path.basename(str(stage_dir)), num_steps=10,
                                                 train_seconds=1.0))


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory):
  """runs/digits: a digits run with a teacher, a 4-step deterministic student and a 4-step encoder;
  runs/cifar10: a cifar10 run with a teacher (3-channel first conv). Copied into each case's tmp_path."""
  from distill import registry, train

  root = tmp_path_factory.mktemp("fake_runs")
  tiny = {"w": np.zeros(3, np.float32)}
  student = dict(kind="w_student", num_sampling_steps=4, w_conditioned=True, w_range=[0.0, 4.0], round=4,
                 teacher_steps=8, teacher_fingerprint="0" * 16)
  run = root / "digits"
  run.mkdir()
  (run / "config.json").write_text(json.dumps(_config_json("digits"), indent=1, sort_keys=True))
  _stage(train, run / "teacher", tiny, kind="cfg_teacher", sampler="ddim", num_sampling_steps=128,
         parameterization="v")
  _stage(train, run / "distill_deterministic" / "N0004", tiny, sampler="ddim", stage_kind="deterministic",
         **student)
  _stage(train, run / "encoder" / "N0004", tiny, sampler="encoder", stage_kind="encoder", **student)
  # As written before the stage contract (kept as such for the 'pre_contract' case), then converted.
  shutil.copytree(run, root / "digits_pre_contract")
  assert sorted(registry.upgrade_meta(str(run))) == ["distill_deterministic/N0004", "encoder/N0004", "teacher"]
  other = root / "cifar10"
  other.mkdir()
  (other / "config.json").write_text(json.dumps(_config_json("cifar10"), indent=1, sort_keys=True))
  # Named like the U-Net's first conv, with CIFAR's 3 input channels: does not fit a digits model.
  _stage(train, other / "teacher", {"conv_in": {"kernel": np.zeros((3, 3, 3, 4), np.float32),
                                                "bias": np.zeros(4, np.float32)}},
         kind="cfg_teacher", sampler="ddim", num_sampling_steps=256, parameterization="v")
  registry.upgrade_meta(str(other))
  # A digits run trained with model.ch=16 (the config says 24): a teacher and a student whose parameters have
  # the shapes of that real U-Net (zeros: only shapes are checked before anything runs).
  narrow = root / "digits_ch16"
  shutil.copytree(run, narrow)
  for stage, w_embedding in (("teacher", False), ("distill_deterministic/N0004", True)):
    shutil.rmtree(narrow / stage / "final" / "params")
    checkpointer = train.ocp.StandardCheckpointer()
    checkpointer.save(str(narrow / stage / "final" / "params"), _unet_zeros(16, w_embedding=w_embedding))
    checkpointer.wait_until_finished()
  return root


def _unet_zeros(ch: int, w_embedding: bool = False) -> dict:
  """Zeros in the shapes of the digits config's U-Net at model.ch=ch."""
  import jax
  from distill import models
  config = json.loads(json.dumps(_config_json("digits")))
  import ml_collections
  model = ml_collections.ConfigDict(config["model"])
  model.ch, model.ch_mult, model.attn_resolutions = ch, tuple(model.ch_mult), tuple(model.attn_resolutions)
  data = ml_collections.ConfigDict(config["data"])
  shapes = models.abstract_params(models.unet_from_config(model, data, w_embedding=w_embedding), (8, 8, 1))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _npz(path, images=None, labels=None, drop=(), **extra):
  rng = np.random.default_rng(0)
  arrays = {"images": rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8) if images is None else images,
            "labels": np.arange(40) % 10 if labels is None else labels, **extra}
  np.savez(path, **{k: v for k, v in arrays.items() if k not in drop})


NPZ_FILES = {
    "npz_missing_labels": dict(drop=("labels",)),
    "npz_images_float": dict(images=np.zeros((40, 8, 8, 1), np.float32)),
    "npz_images_3d": dict(images=np.zeros((40, 8, 8), np.uint8)),
    "npz_rgb": dict(images=np.zeros((40, 8, 8, 3), np.uint8)),
    "npz_label_10": dict(labels=np.arange(40) % 11),
    "npz_labels_float": dict(labels=(np.arange(40) % 10).astype(np.float32)),
    "npz_zero_size": dict(images=np.zeros((40, 0, 0, 1), np.uint8)),
}


# Existing workdirs whose files a rerun reads back: {setup: {file: content}}.
WORKDIR_FILES = {
    "wd_config_list": {"config.json": "[]"},
    "wd_summary_corrupt": {"summary.json": '{"wall_clock_seconds": {"teach'},
    "wd_summary_list": {"summary.json": "[1, 2]"},
    "wd_summary_nan": {"summary.json": '{"wall_clock_seconds": {"teacher": NaN}}'},
}
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def _setup(name, tmp_path, fake_runs) -> dict:
  """Builds what a case needs under tmp_path; returns the names its args may use ({run}, {npz}, …)."""
  paths = {}
  if name in ("run", "other"):
    shutil.copytree(fake_runs / "digits", tmp_path / "run")
    paths["run"] = str(tmp_path / "run")
    if name == "other":
      shutil.copytree(fake_runs / "cifar10", tmp_path / "other")
      paths["other"] = str(tmp_path / "other")
  elif name in NPZ_FILES:
    _npz(tmp_path / "data.npz", **NPZ_FILES[name])
    paths["npz"] = str(tmp_path / "data.npz")
  elif name == "npz_garbage":
    (tmp_path / "data.npz").write_bytes(b"this is not a zip file\n" * 10)
    paths["npz"] = str(tmp_path / "data.npz")
  elif name == "pth_stride_0":  # 429 bytes once asked for 4 GiB: a stride-0 view of 2**30 floats over 4 of them
    from test_weight_fuzz import FLOATS4, tensor_pickle, tensor_zip
    (tmp_path / "w.pth").write_bytes(tensor_zip(tensor_pickle((2**30,), (0,)), FLOATS4))
    paths["pth"] = str(tmp_path / "w.pth")
  elif name in ("npz_deflate_bomb", "npz_deflate_bomb_images"):  # ~64 KB that inflate to 64 MiB
    buffer = io.BytesIO()
    if name == "npz_deflate_bomb":
      np.savez_compressed(buffer, mu=np.zeros(8 << 20), sigma=np.zeros((1, 1)))
    else:  # a well-formed data set of 2**20 blank 8x8 digits (72 MiB with their labels)
      np.savez_compressed(buffer, images=np.zeros((1 << 20, 8, 8, 1), np.uint8), labels=np.zeros(1 << 20, np.uint8))
    (tmp_path / "stats.npz").write_bytes(buffer.getvalue())
    paths["npz"] = str(tmp_path / "stats.npz")
  elif name == "npz_lying_header":  # 'images' declares 2**32 images of 8x8 (256 GiB) and holds 40
    from test_weight_fuzz import _zip, npy_header
    labels = io.BytesIO()
    np.save(labels, np.arange(40) % 10)
    (tmp_path / "data.npz").write_bytes(_zip({"images.npy": npy_header((2**32, 8, 8, 1), "|u1") + b"\0" * 40 * 64,
                                             "labels.npy": labels.getvalue()}))
    paths["npz"] = str(tmp_path / "data.npz")
  elif name == "ckpt_no_final":
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "checkpoints").mkdir()
  elif name == "pre_contract":
    shutil.copytree(fake_runs / "digits_pre_contract", tmp_path / "run")
    paths["run"] = str(tmp_path / "run")
  elif name == "ckpt_corrupt_meta":
    shutil.copytree(fake_runs / "digits", tmp_path / "run")
    (tmp_path / "run" / "distill_deterministic" / "N0004" / "final" / "meta.json").write_text('{"kind": "w_stu')
    paths["run"] = str(tmp_path / "run")
  elif name == "ckpt_meta_empty":
    shutil.copytree(fake_runs / "digits", tmp_path / "run")
    (tmp_path / "run" / "distill_deterministic" / "N0004" / "final" / "meta.json").write_text("{}")
    paths["run"] = str(tmp_path / "run")
  elif name == "ckpt_no_params":
    shutil.copytree(fake_runs / "digits", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "distill_deterministic" / "N0004" / "final" / "params")
    paths["run"] = str(tmp_path / "run")
  elif name == "ckpt_no_config":
    shutil.copytree(fake_runs / "digits" / "distill_deterministic" / "N0004", tmp_path / "N0004")
  elif name == "config_syntax_error":
    (tmp_path / "broken.py").write_text("def get_config(:\n  pass\n")
  elif name == "config_no_get_config":
    (tmp_path / "empty.py").write_text("X = 1\n")
  elif name == "wd_other_config":
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "config.json").write_text(json.dumps({"seed": 123}))
  elif name in ("run_ch16", "wd_teacher_ch16"):
    shutil.copytree(fake_runs / "digits_ch16", tmp_path / ("run" if name == "run_ch16" else "wd"))
    paths["run"] = str(tmp_path / "run")
  elif name == "two_devices":  # run_main gets XLA_FLAGS for two CPU devices (the test reads the setup's name)
    pass
  elif name in WORKDIR_FILES:
    (tmp_path / "wd").mkdir()
    for filename, text in WORKDIR_FILES[name].items():
      (tmp_path / "wd" / filename).write_text(text)
  elif name == "wd_is_file":
    (tmp_path / "afile").write_text("not a directory\n")
  else:
    raise KeyError(name)
  return paths


def _tree(root) -> dict:
  """relative path -> sha256 of the content ('dir' for directories) of everything under root."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for d in dirnames:
      out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
    for f in filenames:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


# --- the table ---------------------------------------------------------------------------------------------


def case(id_, args, *needles, setup=None, xfail=None, skip=None):
  """args and needles may use {tmp}, {wd} and what `setup` provides; every needle must be in the one line.
  skip: a reason to skip the case here (None: run it)."""
  marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
  marks += [pytest.mark.skip(reason=skip)] if skip else []
  return pytest.param(args, needles, setup, id=id_, marks=marks)


# gs:// workdirs go through etils.epath, which reaches GCS with gcsfs (or TensorFlow); without either it fails.
_GCS_CLIENT = next((m for m in ("gcsfs", "tensorflow") if importlib.util.find_spec(m)), None)


CASES = [
    # Config values: wrong types and out-of-range values (caught by configuration.validate or the flag parser).
    case("w_min_gt_w_max", [DIGITS, "--config.distill.w_min=3.0", "--config.distill.w_max=2.0"],
         "config.distill.w_min=3.0", "distill.w_max=2.0"),
    case("teacher_lr_negative", [DIGITS, "--config.teacher.lr=-0.001"], "config.teacher.lr=-0.001", "(0.0, 1.0]"),
    case("teacher_lr_not_number", [DIGITS, "--config.teacher.lr=abc"], "--config.teacher.lr=abc", "to float"),
    case("teacher_batch_0", [DIGITS, "--config.teacher.batch_size=0"], "config.teacher.batch_size=0",
         "positive integer"),
    case("image_size_float", [DIGITS, "--config.data.image_size=8.5"], "--config.data.image_size=8.5", "int()"),
    case("skip_nonfinite_not_bool", [DIGITS, "--config.teacher.skip_nonfinite=maybe"],
         "--config.teacher.skip_nonfinite=maybe", "boolean"),
    case("start_steps_48", [DIGITS, "--config.distill.start_steps=48"], "config.distill.start_steps=48",
         "power of two"),
    case("end_ge_start", [DIGITS, "--config.distill.end_steps=64"], "config.distill.start_steps=64",
         "distill.end_steps=64"),
    case("encoder_start_6", [DIGITS, "--config.distill.encoder_start_steps=6"],
         "config.distill.encoder_start_steps=6", "power of two"),
    case("baselines_start_12", [DIGITS, "--config.baselines.start_steps=12"], "config.baselines.start_steps=12",
         "power of two"),
    case("parameterization_unknown", [DIGITS, "--config.model.parameterization=noise"],
         "config.model.parameterization='noise'", "'eps'"),
    case("schedule_unknown", [DIGITS, "--config.model.schedule=sigmoid"], "config.model.schedule='sigmoid'",
         "'cosine'"),
    case("teacher_weighting_unknown", [DIGITS, "--config.teacher.weighting=huber"],
         "config.teacher.weighting='huber'", "'snr'"),
    case("pipeline_stage_unknown", [DIGITS, "--config.pipeline=('teacher','finetune')"], "config.pipeline=",
         "'finetune'", "stage_one"),
    case("data_name_unknown", [DIGITS, "--config.data.name=mnist"], "config.data.name='mnist'", "'digits'"),
    case("logsnr_min_ge_max", [DIGITS, "--config.model.logsnr_min=25.0"], "config.model.logsnr_min=25.0",
         "model.logsnr_max=20.0"),
    case("eval_w_negative", [DIGITS, "--config.eval.w_values=(0.0,-1.0)"], "config.eval.w_values=-1.0", ">= 0"),
    case("sample_w_empty", [DIGITS, "--config.sample.w_values=()"], "config.sample.w_values=()", "at least one"),
    case("sample_batch_0", [DIGITS, "--config.sample.batch_size=0"], "config.sample.batch_size=0",
         "positive integer"),
    case("seed_negative", [DIGITS, "--config.seed=-1"], "config.seed=-1", "integer >= 0"),
    case("batch_exceeds_data", [DIGITS, "--config.teacher.batch_size=4096"], "teacher.batch_size=4096",
         "larger than the 1500 training examples"),
    # Config files, variants, overrides and flags.
    case("variant_unknown", ["--config=configs/digits.py:nope"], "unknown variant 'nope'", "'quick'"),
    case("reference_stats_missing", ["--config=configs/digits.py", "--config.eval.reference_stats={tmp}/none.npz"],
         "eval.reference_stats='{tmp}/none.npz'", "No such file"),
    case("reference_stats_deflate_bomb", ["--config=configs/digits.py", "--config.eval.reference_stats={npz}"],
         "eval.reference_stats='{npz}'", "its arrays need more than", "the cap for a file of", setup="npz_deflate_bomb"),
    case("reference_stats_not_npz", ["--config=configs/digits.py", "--config.eval.reference_stats={npz}"],
         "eval.reference_stats=", "no mu", setup="npz_missing_labels"),
    case("config_file_missing", ["--config=configs/nope.py"], "configs/nope.py", "cannot load the config file"),
    case("config_syntax_error", ["--config={tmp}/broken.py"], "--config", "broken.py", "SyntaxError",
         setup="config_syntax_error"),
    case("config_no_get_config", ["--config={tmp}/empty.py"], "--config", "empty.py", "get_config",
         setup="config_no_get_config"),
    case("config_flag_missing", [], "--config is required"),
    case("override_without_config", ["--config.seed=1"], "Unknown command line flag 'config.seed'", "Did you mean"),
    case("override_unknown_field", [DIGITS, "--config.distill.nope=1"], "--config.distill.nope",
         "no such config field"),
    case("override_unknown_section", [DIGITS, "--config.optimizer.lr=1"], "--config.optimizer.lr",
         "no such config field"),
    # Data files (data.name=npz).
    case("npz_path_missing", [DIGITS, "--config.data.name=npz", "--config.data.path={tmp}/missing.npz"],
         "data.path='{tmp}/missing.npz'", "does not exist"),
    case("npz_path_empty", [DIGITS, "--config.data.name=npz"], "data.path is empty"),
    case("npz_garbage", [DIGITS, "--config.data.name=npz", "--config.data.path={npz}"], "data.path='{npz}'",
         "not a readable .npz", setup="npz_garbage"),
    case("npz_deflate_bomb", [DIGITS, "--config.data.name=npz", "--config.data.path={npz}"], "data.path='{npz}'",
         "its arrays need more than", "the cap for a file of", setup="npz_deflate_bomb_images"),
    case("npz_header_lies_about_shape", [DIGITS, "--config.data.name=npz", "--config.data.path={npz}"],
         "data.path='{npz}'", "'images.npy' declares shape (4294967296, 8, 8, 1)", "but holds 2560",
         setup="npz_lying_header"),
] + [
    case(name, [DIGITS, "--config.data.name=npz", "--config.data.path={npz}"], "data.path='{npz}'", needle,
         setup=name)
    for name, needle in (("npz_missing_labels", "no array 'labels'"), ("npz_images_float", "dtype float32"),
                         ("npz_images_3d", "4-D"), ("npz_rgb", "3 channels"), ("npz_label_10", "[0, 10]"),
                         ("npz_labels_float", "integer dtype"))
] + [
    # Teachers from elsewhere (distill.teacher_dir).
    case("teacher_dir_missing", [DIGITS, ONLY_STAGE_ONE, "--config.distill.teacher_dir={tmp}/no_teacher"],
         "distill.teacher_dir='{tmp}/no_teacher'", "no finished stage", "final/meta.json"),
    case("teacher_dir_not_teacher", [DIGITS, ONLY_STAGE_ONE, "--config.distill.teacher_dir=" + STUDENT],
         "distill.teacher_dir=", "distill_deterministic/N0004", "not a CFG teacher", "teacher/ directory",
         setup="run"),
    case("teacher_dir_other_data", [DIGITS, ONLY_STAGE_ONE, "--config.distill.teacher_dir={other}/teacher"],
         "distill.teacher_dir='{other}/teacher'", "data.name='cifar10'", "data.name='digits'", setup="other"),
    # Workdirs.
    case("workdir_other_config", ["--config=configs/digits.py:quick"], "{wd}", "another config",
         "--allow_config_change", setup="wd_other_config"),
    case("workdir_is_file", [DIGITS, "--workdir={tmp}/afile"], "--workdir={tmp}/afile", "not a directory",
         setup="wd_is_file"),
    # Sampling a checkpoint.
    case("checkpoint_missing", [SAMPLE, "--checkpoint={tmp}/nope"], "--checkpoint='{tmp}/nope'",
         "no finished stage"),
    case("checkpoint_no_final", [SAMPLE, "--checkpoint={tmp}/stage"], "--checkpoint='{tmp}/stage'",
         "no finished stage there (expected {tmp}/stage/final)", setup="ckpt_no_final"),
    case("checkpoint_no_config", [SAMPLE, "--checkpoint={tmp}/N0004"], "--checkpoint='{tmp}/N0004'",
         "no config.json", setup="ckpt_no_config"),
    case("checkpoint_meta_corrupt", [SAMPLE, "--checkpoint=" + STUDENT], "--checkpoint=", "final/meta.json: unreadable",
         setup="ckpt_corrupt_meta"),
    case("checkpoint_pre_contract", [SAMPLE, "--checkpoint=" + STUDENT], "--checkpoint=", "before the stage contract",
         "python -m distill.registry --upgrade_meta WORKDIR", setup="pre_contract"),
    case("checkpoint_params_missing", [SAMPLE, "--checkpoint=" + STUDENT], "--checkpoint=", "unreadable checkpoint",
         "final/params not found", setup="ckpt_no_params"),
    case("steps_not_distilled", [SAMPLE, "--checkpoint=" + STUDENT, "--steps=8"], "--steps=8", "distilled for 4",
         "--force", setup="run"),
    case("steps_not_int", [SAMPLE, "--checkpoint=" + STUDENT, "--steps=four"], "--steps=four", "int()", setup="run"),
    case("sampler_unknown", [SAMPLE, "--checkpoint=" + STUDENT, "--sampler=euler"], "--sampler", "euler",
         "deterministic", setup="run"),
    case("sampler_ddpm_student", [SAMPLE, "--checkpoint=" + STUDENT, "--sampler=ddpm"], "--sampler='ddpm'",
         "'stochastic'", setup="run"),
    case("w_negative", [SAMPLE, "--checkpoint=" + STUDENT, "--w=0,-1"], "--w=-1", ">= 0", setup="run"),
    case("labels_out_of_range", [SAMPLE, "--checkpoint=" + STUDENT, "--labels=3,10"], "--labels=10", "0..9",
         setup="run"),
    case("num_0", [SAMPLE, "--checkpoint=" + STUDENT, "--num=0"], "--num=0", "positive integer", setup="run"),
    # Style transfer.
    case("style_encoder_not_encoder", [STYLE, "--encoder=" + STUDENT, "--decoder=" + STUDENT], "--encoder=",
         "not a distilled encoder", setup="run"),
    case("style_decoder_teacher", [STYLE, "--encoder=" + ENCODER, "--decoder=" + TEACHER], "--decoder=",
         "distilled student", setup="run"),
    case("workdir_url_unknown_scheme", [DIGITS, "--workdir=http://host/run"], "--workdir=http://host/run",
         "gs://"),
    case("workdir_gcs_without_client", [DIGITS, "--workdir=gs://bucket/run"], "--workdir=gs://bucket/run",
         "cannot be reached", "gcsfs", skip=_GCS_CLIENT and f"{_GCS_CLIENT} is installed: it would try to reach GCS"),
    # Several processes (jax.distributed): checked before JAX starts.
    case("distributed_unknown", [DIGITS, "--distributed=maybe"], "--distributed=maybe", "auto|on|off"),
    case("distributed_on_no_cluster", [DIGITS, "--distributed=on"], "--distributed=on", "no cluster",
         "--coordinator_address"),
    case("distributed_off_with_flags", [DIGITS, "--distributed=off", "--num_processes=2"], "--distributed=off",
         "--num_processes=2"),
    case("coordinator_without_counts", [DIGITS, "--coordinator_address=127.0.0.1:1234"],
         "--coordinator_address=127.0.0.1:1234", "--num_processes", "--process_id"),
    case("coordinator_without_port", [DIGITS, "--coordinator_address=localhost", "--num_processes=2",
                                      "--process_id=0"], "--coordinator_address='localhost'", "HOST:PORT"),
    case("num_processes_0", [DIGITS, "--coordinator_address=127.0.0.1:1234", "--num_processes=0", "--process_id=0"],
         "--num_processes=0", "positive integer"),
    case("process_id_out_of_range", [DIGITS, "--coordinator_address=127.0.0.1:1234", "--num_processes=2",
                                     "--process_id=2"], "--process_id=2", "0..1"),
    case("sample_distributed", [SAMPLE, "--checkpoint=" + STUDENT, "--distributed=on"], "--mode=sample",
         "one process", setup="run"),
    # Direct self-distillation (config.dsd).
    case("dsd_kind_unknown", [DIGITS, "--config.dsd.kinds=('DSDI','DSDX')"], "config.dsd.kinds=", "'DSDX'",
         "DSDGEXP"),
    case("dsd_start_steps_odd", [DIGITS, "--config.dsd.start_steps=15"], "config.dsd.start_steps=15",
         "even integer"),
    case("dsd_end_above_start", [DIGITS, "--config.dsd.start_steps=8", "--config.dsd.end_steps=16"],
         "config.dsd.end_steps=16", "dsd.start_steps=8"),
    case("dsd_dsdi_ratio_not_power_of_two", [DIGITS, "--config.dsd.start_steps=24", "--config.dsd.end_steps=4"],
         "config.dsd.start_steps=24", "power of two"),
    case("dsd_updates_0", [DIGITS, "--config.dsd.updates=0"], "config.dsd.updates=0", "positive integer"),
    case("dsd_updates_too_few_for_depths", [DIGITS, "--config.dsd.updates=10"], "config.dsd.updates=10",
         "no trajectory"),
    case("dsd_beta_negative", [DIGITS, "--config.dsd.beta=-0.1"], "config.dsd.beta=-0.1", "[0.0, inf]"),
    case("dsd_w_range_reversed", [DIGITS, "--config.dsd.w_min=3.0", "--config.dsd.w_max=1.0"],
         "config.dsd.w_min=3.0", "dsd.w_max=1.0"),
    case("dsd_init_unknown", [DIGITS, "--config.dsd.init=scratch"], "config.dsd.init='scratch'", "'stage_one'"),
    case("training_dsd_needs_v", [DIGITS, "--config.pipeline=('training_dsd',)", "--config.model.parameterization=x"],
         "config.model.parameterization='x'", "'v'"),
    # SFD / SFD-v / one-NFE second stage (config.sfd).
    case("sfd_nfe_duplicate", [DIGITS, "--config.sfd.nfe=(2,2)"], "config.sfd.nfe=(2, 2)", "distinct positive"),
    case("sfd_solver_unknown", [DIGITS, "--config.sfd.solver=rk4"], "config.sfd.solver='rk4'", "'dpmpp_3m'"),
    case("sfd_metric_unknown", [DIGITS, "--config.sfd.metric=ssim"], "config.sfd.metric='ssim'", "'lpips'"),
    case("sfd_lpips_without_weights", [DIGITS, "--config.sfd.metric=lpips"], "config.sfd.lpips.trunk=''",
         "nothing is downloaded"),
    case("sfd_lpips_missing_file", ["--config=configs/digits.py:sfd", "--config.sfd.metric=lpips",
                                    "--config.sfd.lpips.trunk={tmp}/alexnet.pth", "--config.sfd.lpips.lin={tmp}/alex.pth"],
         "config.sfd.lpips", "trunk='{tmp}/alexnet.pth'", "No such file"),
    case("sfd_lpips_wrong_file", ["--config=configs/digits.py:sfd", "--config.sfd.metric=lpips",
                                  "--config.sfd.lpips.trunk=tests/data/state_dict.npz",
                                  "--config.sfd.lpips.lin=tests/data/state_dict.npz"],
         "config.sfd.lpips", "features.0.weight"),
    case("sfd_lpips_stride_0_pth", ["--config=configs/digits.py:sfd", "--config.sfd.metric=lpips",
                                    "--config.sfd.lpips.trunk={pth}", "--config.sfd.lpips.lin={pth}"],
         "config.sfd.lpips", "trunk='{pth}'", "stride 0 on a dimension of size 1073741824", setup="pth_stride_0"),
    # Validated before the first write (issue 18, item 1): pipelines, devices, numbers that are not finite,
    # existing workdir files, checkpoints of another model config, guidance flags.
    case("pipeline_empty", [DIGITS, "--config.pipeline=()"], "config.pipeline=()", "at least one stage", "teacher"),
    case("pipeline_stage_twice", [DIGITS, "--config.pipeline=('teacher','teacher')"], "config.pipeline=",
         "names 'teacher' twice"),
    case("pipeline_evaluate_not_last", [DIGITS, "--config.pipeline=('evaluate','teacher')"], "config.pipeline=",
         "'evaluate' must come last"),
    case("mesh_fsdp_3", [DIGITS, "--config.mesh.fsdp=3"], "config.mesh.fsdp=3", "must divide the 1 device",
         "allowed: 1"),
    case("mesh_fsdp_4_of_2_devices", [DIGITS, "--config.mesh.fsdp=4"], "config.mesh.fsdp=4", "the 2 devices",
         "allowed: 1, 2", setup="two_devices"),
    case("teacher_batch_odd_on_2_devices", [DIGITS, "--config.teacher.batch_size=127"],
         "config.teacher.batch_size=127", "does not split over the 2 devices", "multiple of 2", setup="two_devices"),
    case("distill_batch_odd_on_2_devices", [DIGITS, ONLY_STAGE_ONE, "--config.distill.batch_size=63"],
         "config.distill.batch_size=63", "multiple of 2", setup="two_devices"),
    case("teacher_lr_nan", [DIGITS, "--config.teacher.lr=nan"], "config.teacher.lr=nan", "finite number"),
    case("distill_w_max_inf", [DIGITS, "--config.distill.w_max=inf"], "config.distill.w_max=inf", "finite number"),
    case("model_dropout_nan", [DIGITS, "--config.model.dropout=nan"], "config.model.dropout=nan", "finite number"),
    case("sample_w_values_nan", [DIGITS, "--config.sample.w_values=(0.0,nan)"],
         "config.sample.w_values='(0.0,nan)'",
         "finite numbers >= 0"),
    case("mixture_std_nan", [DIGITS, "--config.data.name=mixture", "--config.data.mixture_std=nan"],
         "data.mixture_std=nan", "> 0"),
    case("npz_zero_size_images", [DIGITS, "--config.data.name=npz", "--config.data.path={npz}"], "data.path='{npz}'",
         "(40, 0, 0, 1)", "at least 1x1", setup="npz_zero_size"),
    case("workdir_config_json_list", [DIGITS], "{wd}/config.json", "holds a JSON list", "delete it",
         setup="wd_config_list"),
    case("workdir_summary_corrupt", [DIGITS], "{wd}/summary.json", "unreadable", "delete it",
         setup="wd_summary_corrupt"),
    case("workdir_summary_list", [DIGITS, "--allow_config_change"], "{wd}/summary.json", "holds a JSON list",
         setup="wd_summary_list"),
    case("workdir_summary_nan", [DIGITS], "{wd}/summary.json", "finite numbers of seconds", setup="wd_summary_nan"),
    case("workdir_teacher_of_another_model", [DIGITS, ONLY_STAGE_ONE, "--allow_config_change"],
         "{wd}/teacher/final", "does not fit config.model", "in the checkpoint", "in the model",
         setup="wd_teacher_ch16"),
    case("sample_checkpoint_of_another_model", [SAMPLE, "--checkpoint=" + STUDENT], "--checkpoint=",
         "does not fit the model of its run's config.json", "in the checkpoint", setup="run_ch16"),
    case("sample_w_empty_list", [SAMPLE, "--checkpoint=" + STUDENT, "--w="], "--w=:", "at least one", setup="run"),
    case("sample_w_nan", [SAMPLE, "--checkpoint=" + STUDENT, "--w=nan"], "--w=nan", "finite numbers >= 0",
         setup="run"),
    case("sample_w_inf", [SAMPLE, "--checkpoint=" + STUDENT, "--w=0,inf"], "--w=0,inf", "finite numbers >= 0",
         setup="run"),
    case("evaluate_w_nan", ["--mode=evaluate", "--checkpoint=" + STUDENT, "--w=nan"], "--w=nan",
         "finite numbers >= 0", setup="run"),
    case("style_w_enc_nan", [STYLE, "--encoder=" + ENCODER, "--decoder=" + STUDENT, "--w_enc=nan"], "--w_enc=nan",
         "finite numbers >= 0", setup="run"),
    case("img2img_strength_nan", ["--mode=img2img", "--checkpoint=" + STUDENT, "--strength=nan"], "--strength=nan",
         "(0, 1]", setup="run"),
    case("inpaint_not_an_inpainting_run", ["--mode=inpaint", "--checkpoint=" + STUDENT], "--checkpoint=",
         "not a stage of an inpainting run", setup="run"),
    case("sample_prompt_not_a_text_run", [SAMPLE, "--checkpoint=" + STUDENT, "--prompt=a bag"], "--prompt='a bag'",
         "not text-conditioned", setup="run"),
    case("inpaint_no_checkpoint", ["--mode=inpaint"], "--checkpoint=STAGE_DIR is required with --mode=inpaint"),
    case("inpaint_w_nan", ["--mode=inpaint", "--checkpoint=" + STUDENT, "--w=nan"], "--w=nan", "finite numbers >= 0",
         setup="run"),
    case("inpaint_stage_without_inpaint", [DIGITS, "--config.pipeline=('teacher','teacher_inpaint')"],
         "config.inpaint.enabled=False", "'teacher_inpaint'"),
    case("inpaint_with_training_dsd", ["--config=configs/digits.py:inpaint",
                                       "--config.pipeline=('teacher','teacher_inpaint','training_dsd')"],
         "'training_dsd'", "does not take an inpainting run's condition"),
    case("inpaint_eval_box_empty", ["--config=configs/digits.py:inpaint", "--config.inpaint.eval_box=(0.5,0,0.5,1)"],
         "config.inpaint.eval_box=(0.5, 0, 0.5, 1)", "top < bottom"),
    case("inpaint_p_full_2", ["--config=configs/digits.py:inpaint", "--config.inpaint.p_full=2.0"],
         "config.inpaint.p_full=2.0", "[0.0, 1.0]"),
    case("inception_weights_corrupt", [DIGITS, "--config.eval.metric=inception", "--config.eval.inception_path={npz}"],
         "eval.inception_path='{npz}'", "not the FID Inception's weights", "convert_inception", setup="npz_garbage"),
    case("inception_weights_other_arrays", [DIGITS, "--config.eval.metric=inception",
                                            "--config.eval.inception_path={npz}"],
         "eval.inception_path='{npz}'", "not the FID Inception's weights", setup="npz_rgb"),
    case("sample_checkpoint_meta_empty", [SAMPLE, "--checkpoint=" + STUDENT], "--checkpoint=", "meta.json",
         setup="ckpt_meta_empty"),
    case("sfd_k_0", [DIGITS, "--config.sfd.k=0"], "config.sfd.k=0", "positive integer"),
    case("sfd_label_dropout_1", [DIGITS, "--config.sfd.label_dropout=1.0"], "config.sfd.label_dropout=1.0",
         "[0.0, 1.0)"),
    case("sfd_one_nfe_teacher_not_trained", ["--config=configs/digits.py:sfd", "--config.sfd.one_nfe_k=4"],
         "config.sfd.one_nfe_k=4", "NFE 7", "sfd.v_nfe=(2, 3, 4, 5)"),
]


@pytest.mark.parametrize("args,needles,setup", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, fake_runs, args, needles, setup):
  names = {"tmp": str(tmp_path), "wd": str(tmp_path / "wd")}
  if setup:
    names.update(_setup(setup, tmp_path, fake_runs))
  argv = [a.format(**names) for a in args]
  if not any(a.startswith("--workdir=") for a in argv):
    argv.append(f"--workdir={names['wd']}")
  before = _tree(tmp_path)
  proc = run_main(*argv, **(TWO_DEVICES if setup == "two_devices" else {}))
  report = f"exit {proc.returncode}; stderr:\n{proc.stderr[-3000:]}"
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, report
  assert len(lines) == 1 and lines[0].startswith("error: "), report
  for needle in needles:
    assert needle.format(**names) in lines[0], f"{needle.format(**names)!r} not in {lines[0]!r}"
  assert _tree(tmp_path) == before, f"written under {tmp_path}: {sorted(set(_tree(tmp_path)) ^ set(before))}"
  assert not any(os.path.exists(os.path.join(ROOT, d)) for d in ("gs:", "http:")), "a URL made a local directory"
