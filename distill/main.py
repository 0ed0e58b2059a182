"""Entry point: `python -m distill.main --config=configs/digits.py --workdir=runs/digits`.

Any config field is overridable: `--config.teacher.num_steps=500 --config.model.ch_mult="(1,2)"`.

Exit codes:
  0  done, or stopped on request (SIGTERM, SIGINT, a preemption notice): the running stage finished its step
     and saved a checkpoint; one line says where, and the same command resumes there.
  1  a run that cannot go on (a non-finite loss, a checkpoint, grid, eval or summary file that cannot be
     written, e.g. on a full disk, any other error inside a stage): one line `error: …` naming the stage (and
     step, or file); the last good checkpoint is kept. DISTILL_TRACEBACK=1 shows the traceback instead.
  2  bad input (flags, config values, data files, checkpoints): one line naming the field, the value and
     what is allowed; nothing is written.

Several processes (`--mode=train` only): `jax.distributed.initialize` runs before JAX is used, from
--coordinator_address/--num_processes/--process_id, or, with no such flags, from the environment (Cloud
TPU, SLURM, Open MPI; JAX_COORDINATOR_ADDRESS). --distributed=auto does so when the environment says the
job has several processes (see `_multi_process_environment`); on a TPU pod slice whose environment does not
say so, pass --distributed=on. Process 0 alone prints progress and writes files other than checkpoints.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/digits.py or configs/digits.py:quick.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>[_<variant>]).")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False,
                                  "Resume a workdir whose saved config.json differs from this run's config.")

_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "style_transfer", "img2img", "evaluate", "plan"],
                          "train: run the config's pipeline; sample: sample a finished stage (--checkpoint); "
                          "style_transfer: encode with --encoder at --w_enc, decode with --decoder at --w_dec; "
                          "img2img: test images noised to --strength, decoded by --checkpoint toward --labels.")
_STRENGTH = flags.DEFINE_float("strength", 0.5, "img2img: the noise level t in (0, 1] the images are taken to "
                               "(SDEdit's strength); the checkpoint samples the last part [0, t] of its trajectory.")
_ENCODER = flags.DEFINE_string("encoder", None, "style_transfer: a distilled encoder stage, e.g. runs/digits/encoder/N0004.")
_DECODER = flags.DEFINE_string("decoder", None, "style_transfer: a distilled student stage to decode with.")
_W_ENC = flags.DEFINE_float("w_enc", 0.0, "style_transfer: guidance strength of the encoder.")
_W_DEC = flags.DEFINE_float("w_dec", 0.0, "style_transfer: guidance strength of the decoder.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "sample: a stage directory, e.g. runs/digits/distill_deterministic/N0004.")
_STEPS = flags.DEFINE_integer("steps", None, "sample: sampling steps (default: what the checkpoint was distilled for).")
_W = flags.DEFINE_list("w", ["0"], "sample: guidance strengths, e.g. --w=0,1,4 (one grid row each).")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["deterministic", "stochastic", "ddim", "ddpm"],
                             "sample: sampler (default: the checkpoint's own).")
_LABELS = flags.DEFINE_list("labels", None, "sample: class labels (default: the first 10); style_transfer: "
                            "the decoder's target labels (default: each input's own).")
_NUM = flags.DEFINE_integer("num", 4, "sample: samples per (w, label).")
_SEED = flags.DEFINE_integer("seed", 0, "sample: noise seed.")
_OUT = flags.DEFINE_string("out", None, "sample: output prefix (default: inside the checkpoint directory).")
_SAMPLES = flags.DEFINE_string("samples", None, "evaluate: an .npz of samples ('images' uint8 or [-1, 1] floats) "
                                "to score against --config's data set, instead of --checkpoint.")
_FORCE = flags.DEFINE_bool("force", False, "sample: allow a step count or sampler the checkpoint was not distilled for.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "train: call jax.distributed.initialize. auto: when the coordinator flags are given "
                                 "or the environment says there are several processes (JAX_COORDINATOR_ADDRESS, "
                                 "SLURM, Open MPI, TPU_WORKER_HOSTNAMES); on: always (JAX detects Cloud TPU, SLURM "
                                 "and Open MPI); off: one process.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "train, several processes: HOST:PORT of process 0's "
                                   "coordinator (with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "train, several processes: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "train, several processes: this one's id, 0..num_processes-1.")

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
_URL_SCHEMES = ("gs://", "s3://", "az://")  # the object stores etils.epath reaches


def fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def _root_cause(e: BaseException) -> BaseException:
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  return e


def _one_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _flags_parser(argv):
  """absl's parser, with every failure turned into one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    if "get_config" in str(e):
      path = next((a.split("=", 1)[1].split(":")[0] for a in argv if a.startswith("--config=")), "the config file")
      fail(f"--config={path}: the file defines no get_config(); a config file returns its ConfigDict from get_config")
    # An override naming a field the config does not have: say which flag.
    missing = str(e).strip("'\"")
    culprit = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.") and
                    missing in a.split("=", 1)[0].split(".")), "--config.<field>")
    fail(f"{culprit}: no such config field ({missing!r}); see the config file for the fields there are")
  except Exception as e:  # noqa: BLE001 — config files raise anything while loading or overriding
    root = _root_cause(e)
    if isinstance(e, flags.Error) and str(e).strip():
      head = str(e).strip().splitlines()[0]  # absl names the flag and the value
      fail(head if root is e or str(root) in head else f"{head} {_one_line(root)}")
    fail(f"--config: {_one_line(root)}")


def default_workdir(config_arg: str) -> str:
  path, _, variant = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{name}_{variant}" if variant else name)


# How a run reads its data and writes its checkpoints, not what it computes: a rerun may change them freely.
RESULT_NEUTRAL_FIELDS = ("data.num_workers", "data.prefetch", "train.async_checkpoints", "train.keep_checkpoints")


def _first_difference(a, b, prefix="", defaults=None):
  """The first field where the saved config `a` and the current one `b` differ, as "field: saved …, now …", or
  None. A field the saved config lacks (written before the field existed) whose current value is its default
  (`defaults`, the framework's base config) is no difference: a new field's default keeps the old behaviour."""
  defaults = {} if defaults is None else defaults
  for k in sorted(set(a) | set(b)):
    if f"{prefix}{k}" in RESULT_NEUTRAL_FIELDS:
      continue
    x, y = a.get(k), b.get(k)
    if isinstance(x, dict) or isinstance(y, dict):  # a section one side lacks: compared field by field
      x, y = ({} if x is None else x), ({} if y is None else y)
    if isinstance(x, dict) and isinstance(y, dict):
      d = _first_difference(x, y, f"{prefix}{k}.", defaults.get(k) if isinstance(defaults.get(k), dict) else {})
      if d:
        return d
    elif k not in a and k in defaults and y == defaults[k]:
      continue
    elif a.get(k) != b.get(k):
      return f"{prefix}{k}: saved {a.get(k)!r}, now {b.get(k)!r}"
  return None


def _guidance_flag() -> list[float]:
  """--w as guidance strengths: at least one, each a finite number >= 0 (one line and exit 2 otherwise)."""
  text = ",".join(_W.value)
  try:
    w_values = [float(v) for v in _W.value]
  except ValueError:
    fail(f"--w={text}: guidance strengths must be numbers, e.g. --w=0,1,4")
  if not w_values:
    fail("--w=: give at least one guidance strength, e.g. --w=0,1")
  for raw, w in zip(_W.value, w_values):
    if not (math.isfinite(w) and w >= 0):  # NaN fails every comparison: asked for what is allowed, not its opposite
      fail(f"--w={raw}: guidance strengths must be finite numbers >= 0" + (f" (in --w={text})" if raw != text else ""))
  return w_values


def sample_main():
  from distill import sampling
  if not _CHECKPOINT.value:
    fail("--checkpoint is required with --mode=sample, e.g. --checkpoint=runs/digits/distill_deterministic/N0004")
  w_values = _guidance_flag()
  try:
    labels = None if _LABELS.value is None else [int(v) for v in _LABELS.value]
  except ValueError:
    fail(f"--labels={','.join(_LABELS.value)}: class labels must be integers")
  if _STEPS.value is not None and _STEPS.value < 1:
    fail(f"--steps={_STEPS.value}: must be a positive integer")
  if _NUM.value < 1:
    fail(f"--num={_NUM.value}: must be a positive integer")
  try:
    result = sampling.sample_checkpoint(_CHECKPOINT.value, steps=_STEPS.value, w_values=w_values,
                                        sampler=_SAMPLER.value, labels=labels, num=_NUM.value, seed=_SEED.value,
                                        out=_OUT.value, force=_FORCE.value)
  except sampling.SamplingError as e:
    fail(str(e))
  print(f"wrote {result['png']} and {result['npz']} ({result['steps']} {result['sampler']} steps, "
        f"{result['nfe_per_sample']} network evaluations per sample)")


def plan_main():
  """--mode=plan: every stage the config's pipeline would write and every row its evaluate stage would score
  (method, sampler, w, steps, NFE), without training or reading data."""
  from distill import configuration, registry
  if _CONFIG.value is None:
    fail("--config is required with --mode=plan, e.g. --config=configs/cifar10.py")
  config = _CONFIG.value
  try:
    configuration.validate(config)
    planned = registry.plan(config)
  except (configuration.ConfigError, ValueError) as e:
    fail(str(e))
  print(f"pipeline: {', '.join(config.pipeline)}")
  for stage, name, m in planned:
    w = "any w" if m.w_range[1] == float("inf") else (
        f"w = {m.w_range[0]:g}" if m.w_range[0] == m.w_range[1] else f"w in [{m.w_range[0]:g}, {m.w_range[1]:g}]")
    scored = f"scored at {'/'.join(map(str, m.steps_scored))} steps" if m.scored else "not scored"
    print(f"  {stage:<22} {name:<34} {m.method:<20} {m.sampler or '-':<11} {w:<16} "
          f"{m.evals_per_step} NFE/step, {scored}")
  if registry.EVALUATE in config.pipeline:
    rows = registry.planned_rows(config, planned)
    print(f"evaluate: {len(rows)} rows, {config.eval.per_class} samples per class each (method, sampler, w, steps, "
          "NFE):")
    for r in rows:
      print(f"  {r['method']:<20} {r['sampler']:<13} w={r['w']:<4g} steps={r['steps']:<5} nfe={r['nfe']}")


def evaluate_main():
  """--mode=evaluate: score one checkpoint (--checkpoint, its run's config) or one samples file (--samples,
  with --config naming the data set); writes a JSON of rows and prints them."""
  if bool(_CHECKPOINT.value) == bool(_SAMPLES.value):
    fail("--mode=evaluate needs exactly one of --checkpoint=STAGE_DIR or --samples=FILE.npz (with --config)")
  from distill import configuration, evaluate, sampling
  try:
    if _CHECKPOINT.value:
      w_values = _guidance_flag()
      result = evaluate.evaluate_checkpoint(_CHECKPOINT.value, w_values=w_values, steps=_STEPS.value,
                                            sampler=_SAMPLER.value, force=_FORCE.value, seed=_SEED.value,
                                            out=_OUT.value)
    else:
      if _CONFIG.value is None:
        fail("--samples needs --config naming the data set the samples are compared with")
      configuration.validate(_CONFIG.value)
      config_arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "config")
      result = evaluate.evaluate_samples(_CONFIG.value, _WORKDIR.value or default_workdir(config_arg),
                                         _SAMPLES.value, out=_OUT.value)
  except (sampling.SamplingError, evaluate.EvaluationError, configuration.ConfigError) as e:
    fail(str(e))
  for row in result["rows"]:
    print(json.dumps(row))
  print(f"wrote {result['path']}")


def style_transfer_main():
  from distill import sampling
  if not _ENCODER.value or not _DECODER.value:
    fail("--encoder and --decoder are required with --mode=style_transfer")
  if not all(math.isfinite(w) and w >= 0 for w in (_W_ENC.value, _W_DEC.value)):
    fail(f"--w_enc={_W_ENC.value} --w_dec={_W_DEC.value}: guidance strengths must be finite numbers >= 0")
  try:
    labels = None if _LABELS.value is None else [int(v) for v in _LABELS.value]
  except ValueError:
    fail(f"--labels={','.join(_LABELS.value)}: class labels must be integers")
  try:
    result = sampling.style_transfer(_ENCODER.value, _DECODER.value, w_enc=_W_ENC.value, w_dec=_W_DEC.value,
                                     target_labels=labels, num=_NUM.value, seed=_SEED.value, out=_OUT.value)
  except sampling.SamplingError as e:
    fail(str(e))
  print(f"wrote {result['png']} (top: inputs, bottom: outputs) and {result['npz']}")


def img2img_main():
  from distill import sampling
  if not _CHECKPOINT.value:
    fail("--checkpoint=STAGE_DIR is required with --mode=img2img")
  w_values = _guidance_flag()
  if not (math.isfinite(_STRENGTH.value) and 0 < _STRENGTH.value <= 1):
    fail(f"--strength={_STRENGTH.value}: must lie in (0, 1] (the noise level the images are taken to)")
  try:
    labels = None if _LABELS.value is None else [int(v) for v in _LABELS.value]
  except ValueError:
    fail(f"--labels={','.join(_LABELS.value)}: class labels must be integers")
  if _NUM.value < 1:
    fail(f"--num={_NUM.value}: must be >= 1")
  try:
    result = sampling.img2img(_CHECKPOINT.value, strength=_STRENGTH.value, w_values=w_values, target_labels=labels,
                              num=_NUM.value, steps=_STEPS.value, sampler=_SAMPLER.value, force=_FORCE.value,
                              seed=_SEED.value, out=_OUT.value)
  except sampling.SamplingError as e:
    fail(str(e))
  print(f"wrote {result['png']} (top: inputs; then one row per w; {result['steps']} steps) and {result['npz']}")


def _enable_compilation_cache():
  """XLA compilations persist across runs (compiling dominates short CPU runs); DISTILL_JAX_CACHE='' turns it off."""
  path = os.environ.get("DISTILL_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "distill", "jax"))
  if path:
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _multi_process_environment() -> str | None:
  """The environment variable that says this process is one of several (for --distributed=auto), or None.

  SLURM: the step's task count when srun set it (a batch script itself runs once, whatever SLURM_NTASKS says)."""
  env = os.environ

  def count(var):
    try:
      return int(env.get(var, "1"))
    except ValueError:
      return 1

  if env.get("JAX_COORDINATOR_ADDRESS"):
    return f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']}"
  slurm = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
  for var in (slurm, "OMPI_COMM_WORLD_SIZE", "MEGASCALE_NUM_SLICES"):
    if count(var) > 1:
      return f"{var}={env[var]}"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return f"TPU_WORKER_HOSTNAMES lists {len(hosts)} hosts"
  return None


def _init_distributed():
  """jax.distributed.initialize as --distributed and the coordinator flags say, before JAX is used.
  Bad flag values: one line, exit 2; an initialisation that fails: one line, exit 1."""
  explicit = {"--coordinator_address": _COORDINATOR.value, "--num_processes": _NUM_PROCESSES.value,
              "--process_id": _PROCESS_ID.value}
  given = [f"{k}={v}" for k, v in explicit.items() if v is not None]
  if _MODE.value != "train":
    if given or _DISTRIBUTED.value == "on":
      fail(f"--mode={_MODE.value} runs as one process; {' '.join(given) or '--distributed=on'} is for --mode=train")
    return
  if _DISTRIBUTED.value == "off":
    if given:
      fail(f"--distributed=off contradicts {' '.join(given)}; drop one")
    return
  if given and len(given) < 3:
    missing = [k for k, v in explicit.items() if v is None]
    fail(f"{' '.join(given)}: also needs {' and '.join(missing)} (or none of them, to read the environment)")
  if given:
    address, n, pid = _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    if not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}", address) or not (
        0 < int(address.rsplit(":", 1)[1]) < 65536):
      fail(f"--coordinator_address={address!r}: must be HOST:PORT with a port in 1..65535, e.g. 10.0.0.1:8476")
    if n < 1:
      fail(f"--num_processes={n}: must be a positive integer")
    if not 0 <= pid < n:
      fail(f"--process_id={pid}: must lie in 0..{n - 1} (--num_processes={n})")
    source = "flags"
  else:
    source = _multi_process_environment()
    if source is None and _DISTRIBUTED.value == "auto":
      return
    source = source or "--distributed=on"
  import jax
  try:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except (ValueError, TypeError) as e:  # JAX found no cluster to read the missing values from
    found = "" if source == "--distributed=on" else f" ({source})"
    fail(f"--distributed={_DISTRIBUTED.value}{found}: jax.distributed.initialize found no cluster to read the "
         f"processes from ({_one_line(e)}); pass --coordinator_address, --num_processes and --process_id, or "
         "--distributed=off")
  except Exception as e:  # noqa: BLE001 — a coordinator that cannot be reached, a timeout
    print(f"error: jax.distributed.initialize ({source}) failed: {_one_line(e)}", file=sys.stderr)
    sys.exit(EXIT_FAILED)
  if jax.process_index() == 0:
    print(f"distributed: {jax.process_count()} processes, {jax.device_count()} devices "
          f"({jax.local_device_count()} here; from {source})")


def _check_inception_weights(config):
  """Before anything is written: a pipeline that ends in Inception metrics needs their weight file."""
  from etils import epath
  from distill.evaluation import inception, protocol
  if "evaluate" in tuple(config.pipeline) and protocol.resolve_metric(config) == "inception":
    path = os.path.expanduser(config.eval.inception_path)
    try:
      found = epath.Path(path).is_file()
    except Exception as e:  # noqa: BLE001 — a URL whose client is missing or cannot reach it
      fail(f"eval.inception_path={path!r}: cannot be read ({_one_line(e)})")
    try:  # read whole now: a corrupt file is named before the run, not at its evaluation hours later
      inception.load_inception(path)
    except inception.InceptionWeightsMissing as e:
      fail(f"eval.inception_path: {e}")
    except Exception as e:  # noqa: BLE001 — not an .npz, no pickle allowed, arrays missing or of other shapes
      if found:
        fail(f"eval.inception_path={path!r}: not the FID Inception's weights ({_one_line(e)}); convert them with "
             "`python -m distill.evaluation.convert_inception`")
      raise


def _check_reference_stats(config):
  """eval.reference_stats, when the pipeline evaluates: a readable .npz with mu [F] and sigma [F, F] (its width
  is checked against the metric's features when the evaluate stage runs)."""
  path = os.path.expanduser(config.eval.reference_stats)
  if not path or "evaluate" not in tuple(config.pipeline):
    return
  from distill import writers
  from distill.evaluation import protocol
  try:
    with writers.read_npz(path) as d:
      width = int(d["mu"].shape[0]) if "mu" in d.files else 0
    protocol.load_reference_stats(path, width)
  except Exception as e:  # noqa: BLE001 — a missing file, no pickle allowed, missing arrays, bad shapes
    fail(f"eval.reference_stats={config.eval.reference_stats!r}: {_one_line(e)}")


def _preflight(config):
  """Before anything is written: the pre-run checks (weight files, …) of the methods the pipeline runs."""
  from distill import registry, validation
  try:
    registry.preflight(config)
  except validation.ConfigError as e:
    fail(str(e))


def _weight_file_like(path: str) -> bool:
  """Whether `path` is a weight file (by its suffix, or a file at all) or a diffusers model folder."""
  from etils import epath
  from distill import weights
  if path.rstrip("/").endswith(weights.SUFFIXES):
    return True
  try:
    p = epath.Path(path)
    return p.is_file() or (p.is_dir() and ((p / "model_index.json").exists() or any(
        (folder / name).exists() for folder in (p, p / "unet") for name in weights.DIFFUSERS_FILES)))
  except Exception:  # noqa: BLE001 — unreachable: the checks after this one say so
    return False


def _check_teacher_dir(config):
  """distill.teacher_dir, when the pipeline uses a teacher trained elsewhere: a finished CFG teacher of the
  same data set and architecture, checked before anything is written."""
  teacher_dir = config.distill.teacher_dir
  if not teacher_dir or tuple(config.pipeline) == ("teacher",):
    return
  from etils import epath
  field = f"config.distill.teacher_dir={teacher_dir!r}"
  if _weight_file_like(teacher_dir):
    fail(f"{field}: a weight file, not a finished stage; this framework's U-Net cannot load LDM's or Stable "
         "Diffusion's U-Net weights (openaimodel / diffusers UNet: another architecture): train the teacher here "
         "('teacher', 'teacher_v' in config.pipeline) or point at a run's teacher/ or teacher_v/ directory")
  meta_path = os.path.join(teacher_dir, "final", "meta.json")
  try:
    found = epath.Path(meta_path).is_file()
  except Exception as e:  # noqa: BLE001 — a URL whose client is missing or cannot reach it
    fail(f"{field}: cannot be read ({_one_line(e)})")
  if not found:
    fail(f"{field}: no finished stage there (expected {meta_path})")
  try:
    kind = json.loads(epath.Path(meta_path).read_text()).get("kind")
  except (OSError, ValueError) as e:
    fail(f"{field}: unreadable {meta_path} ({type(e).__name__})")
  if kind != "cfg_teacher":
    fail(f"{field}: not a CFG teacher (its meta says kind={kind!r}); point at a run's teacher/ directory")
  from distill import writers
  run_config = os.path.join(os.path.dirname(writers.abspath(teacher_dir.rstrip("/"))), "config.json")
  if epath.Path(run_config).is_file():
    saved = json.loads(epath.Path(run_config).read_text())
    for section, keys in (("data", ("name", "image_size", "channels", "num_classes")),
                          ("model", ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "parameterization",
                                     "emb_ch", "head_dim"))):
      for key in keys:
        theirs, ours = saved.get(section, {}).get(key), config[section][key]
        if theirs is not None and (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) != (
            list(ours) if isinstance(ours, (list, tuple)) else ours):
          fail(f"{field}: that teacher has {section}.{key}={theirs!r}, this run {section}.{key}={ours!r}")


def _check_devices(config):
  """Before anything is written: the mesh's fsdp axis divides the devices JAX sees, and every batch the pipeline's
  stages split over them (their `data_batches` and their sections' batch_size) divides too."""
  import jax
  from distill import registry
  n = jax.device_count()
  fsdp = config.mesh.fsdp
  if n % fsdp:
    divisors = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
    fail(f"config.mesh.fsdp={fsdp}: must divide the {n} device{'s' if n > 1 else ''} JAX sees; allowed: {divisors}")
  fields = list(registry.data_batch_fields(config))
  for m in registry.methods():
    if set(m.stages) & set(config.pipeline):
      fields += [f"{name}.batch_size" for name, section in (m.config() if m.config else {}).items()
                 if "batch_size" in section]
  for field in dict.fromkeys(fields):
    section, name = field.split(".")
    value = config[section][name]
    if value % n:
      fail(f"config.{field}={value}: does not split over the {n} devices; use a multiple of {n}")


def _check_workdir_files(workdir: str, names=("config.json", "summary.json")):
  """Before anything is written: the files a rerun reads back (config.json, summary.json) are what they should be,
  so a corrupt one is named now rather than as a traceback after the first stage."""
  from etils import epath
  from distill import writers
  for name in names:
    path = os.path.join(workdir, name)
    if not epath.Path(path).exists():
      continue
    try:
      value = writers.read_json(path)
    except (OSError, ValueError) as e:
      fail(f"{path}: unreadable ({_one_line(e)}); delete it to run in {workdir}")
    if not isinstance(value, dict):
      fail(f"{path}: holds a JSON {type(value).__name__}, not an object; delete it to run in {workdir}")
    seconds = value.get("wall_clock_seconds", {}) if name == "summary.json" else {}
    if not isinstance(seconds, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in seconds.values()):
      fail(f"{path}: wall_clock_seconds must map stages to finite numbers of seconds; delete it to run in {workdir}")


def _check_teacher_fits(config, workdir: str):
  """Before anything is written: a finished teacher the pipeline will load (WORKDIR/teacher, teacher_v or
  distill.teacher_dir) holds the parameters of config.model's U-Net, parameter by parameter (its shapes from
  Orbax's metadata against the model's `jax.eval_shape` init): a teacher trained with another model config is
  named in one line instead of a Flax shape error deep in the first stage that uses it."""
  if config.latent.enabled or not tuple(config.pipeline):  # a latent U-Net's shape needs the autoencoder's latents
    return
  from distill import diffusion, models, train
  teacher_dirs = ([config.distill.teacher_dir] if config.distill.teacher_dir else
                  [os.path.join(workdir, "teacher"), os.path.join(workdir, "teacher_v")])
  for stage_dir in teacher_dirs:
    logging.set_verbosity(logging.ERROR)  # Orbax warns about what it cannot find, in lines of its own
    try:
      if not train.has_final(stage_dir):
        continue
      meta = train.load_final_meta(stage_dir)
      found = train.final_param_shapes(stage_dir)
    except Exception as e:  # noqa: BLE001 — an unreadable final/ is named
      fail(f"{stage_dir}/final: unreadable ({_one_line(e)}); delete the stage directory to train it again")
    finally:
      logging.set_verbosity(logging.WARNING)
    model_cfg = config.model.copy_and_resolve_references()
    if meta.get("parameterization") in diffusion.PARAMETERIZATIONS:
      model_cfg.parameterization = meta["parameterization"]  # an ε teacher of a v run (teacher_v)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    if config.latent.enabled:  # the U-Net diffuses the autoencoder's latents: their shape, once it has them
      from distill import latent
      shape = latent.recorded_latent_shape(config.latent.autoencoder_dir or os.path.join(workdir, "autoencoder"))
      if shape is None:
        continue
    expected = models.param_shapes(models.abstract_params(
        models.unet_from_config(model_cfg, config.data, channels=shape[-1]), shape))
    why = models.params_mismatch(expected, found)
    if why:
      fail(f"{stage_dir}/final: does not fit config.model ({why}); it was trained with another model config: "
           "restore that config or use another --workdir")


def main(argv):
  """Runs --mode; any error that escapes it ends as one line and exit 1 (DISTILL_TRACEBACK=1: the traceback)."""
  try:
    return _main(argv)
  except Exception as e:  # noqa: BLE001 — every expected failure has its own line already; this is the rest
    if os.environ.get("DISTILL_TRACEBACK"):
      raise
    from distill import writers
    line = writers.os_error_line(e) if isinstance(e, OSError) else _one_line(e)
    print(f"error: --mode={_MODE.value}: {line} (DISTILL_TRACEBACK=1 shows where)", file=sys.stderr)
    sys.exit(EXIT_FAILED)


def _main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  from distill import train
  train.quiet_closed_event_loops()  # Orbax's loop closed under tensorstore's callbacks: noise around one line
  _init_distributed()  # before JAX is used: it fixes which devices JAX sees
  _enable_compilation_cache()
  sys.stdout.reconfigure(line_buffering=True)  # progress lines reach `tail -f` of a redirected log as they happen
  if _MODE.value == "style_transfer":
    logging.set_verbosity(logging.WARNING)
    return style_transfer_main()
  if _MODE.value == "sample":
    logging.set_verbosity(logging.WARNING)
    return sample_main()
  if _MODE.value == "img2img":
    logging.set_verbosity(logging.WARNING)
    return img2img_main()
  if _MODE.value == "plan":
    logging.set_verbosity(logging.WARNING)
    return plan_main()
  if _MODE.value == "evaluate":
    logging.set_verbosity(logging.WARNING)
    return evaluate_main()
  if _CONFIG.value is None:
    fail("--config is required, e.g. --config=configs/digits.py")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  # Imports after flag parsing so `--help` and flag errors stay fast.
  from etils import epath
  from distill import configuration, data

  config = _CONFIG.value
  try:
    config.keys()  # a config file that failed to load reports it only on first use
  except OSError as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    fail(f"--config: cannot load the config file: {lines[-1]}")
  try:
    configuration.validate(config)
    train_source = data.make_source(config.data, "train")
  except (configuration.ConfigError, data.DataError) as e:
    fail(str(e))
  from distill import registry
  for field in registry.data_batch_fields(config):
    section, name = field.split(".")
    if config[section][name] > len(train_source):
      fail(f"config.{field}={config[section][name]}: larger than the {len(train_source)} training examples of "
           f"data.name={config.data.name!r}")
  _check_devices(config)
  _check_inception_weights(config)
  _check_reference_stats(config)
  _check_teacher_dir(config)
  _preflight(config)

  config_arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "config")
  workdir = _WORKDIR.value or default_workdir(config_arg)
  # Local, or an object store's URL (gs://bucket/run: etils.epath with gcsfs or TensorFlow installed).
  if "://" in workdir and not workdir.startswith(_URL_SCHEMES):
    fail(f"--workdir={workdir}: a URL workdir must start with one of {', '.join(_URL_SCHEMES)}")
  workdir_path = epath.Path(workdir)
  try:
    is_file = workdir_path.exists() and not workdir_path.is_dir()
  except Exception as e:  # noqa: BLE001 — the store's client missing (gcsfs), no credentials, no network
    fail(f"--workdir={workdir}: cannot be reached ({_one_line(e)})")
  if is_file:
    fail(f"--workdir={workdir}: exists and is not a directory")
  # --allow_config_change replaces config.json whatever it holds; summary.json is read back either way.
  _check_workdir_files(workdir, ("summary.json",) if _ALLOW_CHANGE.value else ("config.json", "summary.json"))
  _check_teacher_fits(config, workdir)
  import jax
  from distill import parallel, pipeline, train, writers
  main_process = jax.process_index() == 0
  resolved = json.loads(config.to_json_best_effort())
  config_path = os.path.join(workdir, "config.json")
  if epath.Path(config_path).exists() and not _ALLOW_CHANGE.value:
    try:
      saved = writers.read_json(config_path)
    except ValueError as e:
      fail(f"{config_path}: unreadable ({_one_line(e)}); delete it to run this config in {workdir}")
    from distill import configuration
    diff = _first_difference(saved, resolved, defaults=json.loads(configuration.base_config().to_json_best_effort()))
    if diff:
      fail(f"{workdir} holds a run with another config ({diff}); use another --workdir or --allow_config_change")
  if main_process:
    try:
      workdir_path.mkdir(parents=True, exist_ok=True)
      # A killed run leaves the old file or the new one, never half of one (a rerun reads it).
      writers.atomic_write_json(config_path, resolved, indent=1, sort_keys=True)
    except OSError as e:
      if e.errno == errno.ENOSPC:  # the workdir is fine, the disk is not: a failure, not bad input
        print(f"error: {writers.os_error_line(e, config_path)}; nothing was written", file=sys.stderr)
        sys.exit(EXIT_FAILED)
      fail(f"--workdir={workdir}: cannot be written ({writers.os_error_line(e, config_path)})")
    print(f"workdir: {workdir}")
  parallel.sync_processes("main: workdir ready")
  train.install_stop_handlers()
  try:
    summary = pipeline.run(config, workdir, train_source=train_source)
  except train.Stopped as e:
    if main_process:
      print(f"stopped: {e.message}. To resume, run the same command again: "
            f"{shlex.join(['python', '-m', 'distill.main', *sys.argv[1:]])}")
    sys.exit(0)
  except train.TrainingError as e:
    if os.environ.get("DISTILL_TRACEBACK"):
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_FAILED)
  if main_process:
    print(f"done: wall-clock per stage (s): {summary.get('wall_clock_seconds')}")


def run():
  app.run(main, flags_parser=_flags_parser)


if __name__ == "__main__":
  run()
