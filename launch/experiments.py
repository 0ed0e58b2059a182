r"""The paper's experiments, one line each: name -> (config, overrides, teacher from).

  python launch/experiments.py list
  python launch/experiments.py show cifar10-guided                      # the distill.main command
  python launch/experiments.py show cifar10-single-w --root=gs://BUCKET/distill
  python launch/experiments.py check                                    # every config and override exists

Each experiment writes to ROOT/NAME (ROOT defaults to `runs`). An experiment whose third column names
another one reuses that one's CFG teacher (`--config.distill.teacher_dir=ROOT/OTHER/teacher`): the
guided-distillation paper compares every method on the same teacher, so run `*-guided` first.
Pipelines and settings not written here come from the config file (see its docstring).
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (config[:variant], overrides, experiment whose teacher this one reuses, what it reproduces)
EXPERIMENTS = {
    "digits": ("configs/digits.py", [], None,
               "every stage on 8x8 digits: teacher, stage one, deterministic and stochastic halving, "
               "single-w and two-student baselines, encoder, evaluation (over an hour on 2 CPU cores)"),
    "digits-quick": ("configs/digits.py:quick", [], None, "the same path end to end in a few minutes"),
    "cifar10-guided": ("configs/cifar10.py", [], None,
                       "CIFAR-10 teacher, stage one, deterministic + stochastic halving 1024 -> 1 "
                       "(paper Table 2, 'Ours D/S')"),
    "cifar10-single-w": ("configs/cifar10.py", ['--config.pipeline=("single_w","evaluate")',
                                                "--config.baselines.single_w=(0.0,0.3,1.0,4.0)"],
                         "cifar10-guided", "Single-w baseline: one student per fixed w (paper Table 2)"),
    "cifar10-two-student": ("configs/cifar10.py", ['--config.pipeline=("two_student","evaluate")'],
                            "cifar10-guided", "two-student progressive distillation, Algorithm 5 (paper Table 3)"),
    "cifar10-quick": ("configs/cifar10.py:quick", [], None, "path check on CIFAR-10 shapes (needs the data)"),
    "imagenet64-guided": ("configs/imagenet64.py", [], None,
                          "ImageNet 64 teacher, stage one, deterministic + stochastic halving 1024 -> 1 "
                          "(paper Table 1, 'Ours D/S')"),
    "imagenet64-single-w": ("configs/imagenet64.py", ['--config.pipeline=("single_w","evaluate")',
                                                      "--config.baselines.single_w=(0.0,0.3,1.0,4.0)"],
                            "imagenet64-guided", "Single-w baseline (paper Table 1)"),
    "imagenet64-encoder": ("configs/imagenet64.py",
                           ['--config.pipeline=("stage_one","distill_deterministic","encoder")',
                            "--config.distill.end_steps=16"],
                           "imagenet64-guided", "distilled 16-step encoder and decoder for style transfer "
                                                "(paper Fig. 12)"),
    "imagenet64-quick": ("configs/imagenet64.py:quick", [], None, "path check on ImageNet 64 shapes (needs the data)"),
    # Stable Diffusion (App. C.2): SD's weights and the image-text data are the user's; paths are read on every
    # host (a local disk or a mounted bucket), the workdir may be gs://.
    "sd-laion-512": ("configs/sd_laion.py:512", ["--config.autoencoder.weights=/mnt/models/stable-diffusion-v1-5",
                                                 "--config.data.path=/mnt/data/laion-512"], None,
                     "Stable Diffusion distilled on captioned images at 512x512, batch 512, w in [2, 14]: eps -> v "
                     "fine-tune, stage one, halving 512 -> 1 (paper App. C.2, Table 2)"),
    "sd-laion-256": ("configs/sd_laion.py:256", ["--config.autoencoder.weights=/mnt/models/stable-diffusion-v1-5",
                                                 "--config.data.path=/mnt/data/laion-256"], None,
                     "the same at 256x256, batch 1024 (paper App. C.2, Fig. 26)"),
}


class UnknownExperiment(KeyError):
  pass


def workdir_of(name: str, root: str) -> str:
  return root.rstrip("/") + "/" + name


def main_flags(name: str, root: str = "runs") -> list[str]:
  """The flags of `python -m distill.main` for one experiment, its workdir being ROOT/NAME."""
  if name not in EXPERIMENTS:
    raise UnknownExperiment(name)
  config, overrides, teacher_from, _ = EXPERIMENTS[name]
  flags = [f"--config={config}", f"--workdir={workdir_of(name, root)}", *overrides]
  if teacher_from:
    flags.append(f"--config.distill.teacher_dir={workdir_of(teacher_from, root)}/teacher")
  return flags


def _load_config(config_arg: str):
  """get_config(variant) of a configs/*.py file, imported by path (no absl flags involved)."""
  path, _, variant = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location(f"_launch_config_{os.path.basename(path)[:-3]}",
                                                os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant or None)


def _parse_like_config_flags(text: str, default):
  """An override's value as ml_collections' config_flags reads it for a field holding `default`."""
  if isinstance(default, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(default, tuple):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
  return value


def check_catalogue(experiments=None) -> list[str]:
  """One line per problem: a missing config file, an override naming no config field, a value the
  config validator rejects, or a teacher taken from an experiment that trains none. Imports distill."""
  experiments = EXPERIMENTS if experiments is None else experiments
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from distill import configuration

  problems = []
  for name, (config_arg, overrides, teacher_from, _) in experiments.items():
    path = config_arg.partition(":")[0]
    if not os.path.isfile(os.path.join(REPO, path)):
      problems.append(f"{name}: config file {path} does not exist")
      continue
    try:
      config = _load_config(config_arg)
    except Exception as e:  # noqa: BLE001 — a config file may raise anything
      problems.append(f"{name}: {config_arg} does not load: {type(e).__name__}: {e}")
      continue
    flags = list(overrides)
    if teacher_from:
      flags.append("--config.distill.teacher_dir=ROOT/teacher")
      if teacher_from not in experiments:
        problems.append(f"{name}: reuses the teacher of {teacher_from!r}, which is not in the catalogue")
      elif "teacher" not in _load_config(experiments[teacher_from][0]).pipeline:
        problems.append(f"{name}: reuses the teacher of {teacher_from!r}, whose pipeline trains none")
    ok = True
    for flag in flags:
      key, sep, text = flag.partition("=")
      if not key.startswith("--config.") or not sep:
        problems.append(f"{name}: {flag!r} is not of the form --config.a.b=value")
        ok = False
        continue
      *parents, leaf = key[len("--config."):].split(".")
      node = config
      for part in parents:
        node = node[part] if part in node and hasattr(node[part], "keys") else None
        if node is None:
          break
      if node is None or leaf not in node:
        problems.append(f"{name}: {key} names no config field")
        ok = False
        continue
      try:
        node[leaf] = _parse_like_config_flags(text, node[leaf])
      except TypeError as e:  # ConfigDict refuses a value of another type than the field's
        problems.append(f"{name}: {flag}: {e}")
        ok = False
    if ok:
      try:
        configuration.validate(config)
      except configuration.ConfigError as e:
        problems.append(f"{name}: {e}")
  return problems


def check_passthrough(values, main_flags, fail):
  """What a launcher passes on to distill.main: no control characters in any value (a newline could end a
  script line), and only distill.main --flags after `--`, none that the launcher itself owns."""
  for value in [*values, *main_flags]:
    if value and any(ord(c) < 32 or ord(c) == 127 for c in value):
      fail(f"{value!r}: control characters (such as newlines) are not allowed in values")
  for flag in main_flags:
    if not flag.startswith("--"):
      fail(f"{flag!r} after --: distill.main takes only --flags, e.g. --config.teacher.lr=1e-4")
    if flag == "--dry-run":
      fail("--dry-run after --: it would go to distill.main; put it before --")
    if flag.split("=", 1)[0] in ("--config", "--workdir"):
      fail(f"{flag!r} after --: use this script's --config/--workdir or --experiment/--root instead")


def job_flags(args, fail, location: str = "DIR", check_location=None) -> list[str]:
  """distill.main's flags from a launcher's arguments: --config with --workdir, or --experiment with --root; then
  the flags after `--`. `location` names what --workdir/--root must be in messages ('gs://BUCKET/DIR');
  check_location(flag, value) rejects a location the launcher cannot use (it calls `fail`)."""
  check = check_location or (lambda flag, value: None)
  if bool(args.config) == bool(args.experiment):
    fail("give either --config (with --workdir) or --experiment (with --root)")
  if args.experiment:
    if args.workdir or not args.root:
      fail(f"--experiment takes --root={location} (not --workdir); the run writes to ROOT/EXPERIMENT")
    check("--root", args.root)
    try:
      flags = main_flags(args.experiment, args.root)
    except UnknownExperiment:
      fail(f"--experiment={args.experiment}: unknown; python launch/experiments.py list names them")
  else:
    if args.root or not args.workdir:
      fail(f"--config takes --workdir={location} (not --root)")
    check("--workdir", args.workdir)
    path = args.config.partition(":")[0]
    if not os.path.isfile(os.path.join(REPO, path)):
      fail(f"--config={args.config}: {path} is not a file in this repository")
    flags = [f"--config={args.config}", f"--workdir={args.workdir}"]
  check_passthrough([args.config, args.workdir, args.experiment, args.root, *args.env], args.main_flags, fail)
  return flags + args.main_flags


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("list", help="one line per experiment")
  show = sub.add_parser("show", help="print the distill.main command of one experiment")
  show.add_argument("name")
  show.add_argument("--root", default="runs", help="the experiment writes to ROOT/NAME (default: runs)")
  sub.add_parser("check", help="check every config file, override and teacher reference (imports distill)")
  args = parser.parse_args(argv)

  if args.command == "list":
    width = max(map(len, EXPERIMENTS))
    for name, (config, overrides, teacher_from, what) in EXPERIMENTS.items():
      extra = shlex.join(overrides) + (f" (teacher of {teacher_from})" if teacher_from else "")
      print(f"{name:<{width}}  {config} {extra}".rstrip() + f"  # {what}")
    return 0
  if args.command == "show":
    try:
      flags = main_flags(args.name, args.root)
    except UnknownExperiment:
      print(f"error: unknown experiment {args.name!r}; `python launch/experiments.py list` names them",
            file=sys.stderr)
      return 2
    print(shlex.join(["python", "-m", "distill.main", *flags]))
    return 0
  problems = check_catalogue()
  for line in problems:
    print(line)
  if not problems:
    print(f"{len(EXPERIMENTS)} experiments: every config file, override and teacher reference checks out")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
