r"""Multi-node GPU runs under SLURM: writes a batch script and submits it with sbatch (standard library only).

  python launch/slurm.py --nodes=2 --gpus-per-node=8 --config=configs/cifar10.py \
      --workdir=/shared/runs/cifar10 --dry-run                 # print the script, submit nothing
  python launch/slurm.py --nodes=4 --experiment=imagenet64-guided --root=/shared/runs \
      --partition=gpu --time=2-00:00:00 --venv=/shared/venvs/distill --requeue

The script starts one process per GPU (`srun python -m distill.main ...` on every task). Process 0, on
the job's first node, coordinates: JAX_COORDINATOR_ADDRESS is that node and a port derived from the job
id; `jax.distributed.initialize()` reads the process count and this process's id from SLURM_NTASKS and
SLURM_PROCID, which srun sets for each task, and gives each process its own GPU (SLURM_LOCALID).
The workdir must be on a file system every node sees. Running the same script again (or --requeue after
a preemption) resumes from the last checkpoint. Flags after `--` go to distill.main unchanged.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import experiments  # noqa: E402 — launch/experiments.py, next to this file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_BAD_INPUT = 2

# Values that go into #SBATCH lines, which sbatch reads before any shell does: refuse anything else.
PATTERNS = {
    "job_name": (r"[A-Za-z0-9][-A-Za-z0-9_.]{0,63}", "letters, digits, '-', '_' and '.' (at most 64)"),
    "partition": (r"[A-Za-z0-9][-A-Za-z0-9_.,]*", "a partition name (or a comma-separated list)"),
    "account": (r"[A-Za-z0-9][-A-Za-z0-9_.]*", "an account name"),
    "time": (r"([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}", "a SLURM time limit such as 48:00:00 or 2-00:00:00"),
}
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def fail(message: str):
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def job_flags(args) -> list[str]:
  """distill.main's flags: from --config and --workdir, or --experiment and --root; then those after --."""
  return experiments.job_flags(args, fail)


def job_name(args) -> str:
  """--job-name, or distill-EXPERIMENT / distill-CONFIGNAME; checked like --job-name, as it lands in an #SBATCH
  line (a config file named 'x\n#SBATCH --wrap=...' would add a directive)."""
  if args.job_name:
    return args.job_name
  source = (f"--experiment={args.experiment}" if args.experiment else f"--config={args.config}")
  name = "distill-" + (args.experiment or os.path.basename(args.config.partition(":")[0]).removesuffix(".py"))
  pattern, allowed = PATTERNS["job_name"]
  if not re.fullmatch(pattern, name):
    fail(f"{source}: the job name derived from it, {name!r}, must be {allowed}; pass --job-name=NAME")
  return name


def batch_script(args) -> str:
  """The sbatch script; every value from the command line reaches the shell through shlex.quote."""
  flags = job_flags(args)  # first: it checks --config/--experiment, which the job name is derived from
  name = job_name(args)
  sbatch = [f"--job-name={name}", f"--nodes={args.nodes}", f"--ntasks-per-node={args.gpus_per_node}",
            f"--gpus-per-node={args.gpus_per_node}", "--output=distill-%j.log"]
  for flag in ("partition", "account", "time"):
    if getattr(args, flag):
      sbatch.append(f"--{flag}={getattr(args, flag)}")
  if args.cpus_per_gpu:
    sbatch.append(f"--cpus-per-task={args.cpus_per_gpu}")
  if args.requeue:
    sbatch += ["--requeue", "--open-mode=append"]
  lines = ["#!/bin/bash", *(f"#SBATCH {flag}" for flag in sbatch), "set -eo pipefail",
           f"cd {shlex.quote(REPO)}"]
  if args.venv:
    lines.append(f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}")
  lines += [f"export {shlex.quote(pair)}" for pair in args.env]
  lines += [
      "# jax.distributed: process 0 runs on the first node; the port is derived from the job id (as JAX does).",
      '# Each task\'s process id and the process count come from SLURM_PROCID and SLURM_NTASKS (set by srun).',
      'first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
      'export JAX_COORDINATOR_ADDRESS="${first_node}:$((61440 + SLURM_JOB_ID % 4096))"',
      shlex.join(["srun", "--kill-on-bad-exit=1", "python", "-m", "distill.main", *flags]),
  ]
  return "\n".join(lines) + "\n"


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    fail(f"{message} (see: python launch/slurm.py -h)")


def parse(argv=None):
  parser = _Parser(prog="python launch/slurm.py", description=__doc__.split("\n")[0])
  parser.add_argument("--nodes", type=int, default=1)
  parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node = processes per node")
  parser.add_argument("--cpus-per-gpu", type=int, default=None, help="CPU cores per process (--cpus-per-task)")
  parser.add_argument("--partition")
  parser.add_argument("--account")
  parser.add_argument("--time", help="time limit, e.g. 48:00:00 or 2-00:00:00")
  parser.add_argument("--job-name")
  parser.add_argument("--requeue", action="store_true", help="let SLURM requeue the job after preemption")
  parser.add_argument("--venv", help="virtual environment to activate on every node")
  parser.add_argument("--config", help="config file[:variant], e.g. configs/cifar10.py")
  parser.add_argument("--workdir", help="run directory on a shared file system, for --config")
  parser.add_argument("--experiment", help="a name from launch/experiments.py (instead of --config)")
  parser.add_argument("--root", help="for --experiment: the run writes to ROOT/EXPERIMENT")
  parser.add_argument("--env", action="append", default=[], help="NAME=VALUE exported for the run; repeatable")
  parser.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")
  parser.add_argument("main_flags", nargs="*", metavar="-- FLAG", help="flags passed on to distill.main")
  args = parser.parse_args(argv)
  for field, (pattern, allowed) in PATTERNS.items():
    value = getattr(args, field)
    if value is not None and not re.fullmatch(pattern, value):
      fail(f"--{field.replace('_', '-')}={value!r}: must be {allowed}")
  for field, most in (("nodes", 100_000), ("gpus_per_node", 64), ("cpus_per_gpu", 1024)):
    value = getattr(args, field)
    if value is not None and not 1 <= value <= most:
      fail(f"--{field.replace('_', '-')}={value}: must be an integer in [1, {most}]")
  if args.venv is not None and (not args.venv or any(ord(c) < 32 or ord(c) == 127 for c in args.venv)):
    fail(f"--venv={args.venv!r}: must be a directory path without control characters (such as newlines)")
  for pair in args.env:
    key, sep, _ = pair.partition("=")
    if not sep or not ENV_KEY.fullmatch(key):
      fail(f"--env={pair!r}: must be NAME=VALUE with NAME made of letters, digits and underscores")
  return args


def main(argv=None):
  args = parse(argv)
  script = batch_script(args)
  if args.dry_run:
    print(script, end="")
    return
  print("+ sbatch  (the script on stdin; --dry-run prints it)", file=sys.stderr)
  try:
    result = subprocess.run(["sbatch"], input=script, text=True)
  except FileNotFoundError:
    print("error: sbatch is not installed or not on PATH; --dry-run prints the script", file=sys.stderr)
    sys.exit(1)
  sys.exit(result.returncode)


if __name__ == "__main__":
  main()
