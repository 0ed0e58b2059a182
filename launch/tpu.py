r"""Run distill on a Cloud TPU VM or pod slice with gcloud (standard library only).

  python launch/tpu.py up --name=distill-c10 --zone=us-central2-b --accelerator=v4-32 \
      --experiment=cifar10-guided --root=gs://BUCKET/distill
  python launch/tpu.py tail --name=distill-c10 --zone=us-central2-b
  python launch/tpu.py resume ...the flags of up...      # after a preemption: recreate, copy, install, run
  python launch/tpu.py delete --name=distill-c10 --zone=us-central2-b

Commands: create, copy, install, run, tail, stop, resume, delete, and up (create, copy, install, run).
Add --dry-run to any of them to print the commands, one per line, and run nothing. Flags after `--` go
to distill.main unchanged: `... run --config=configs/cifar10.py --workdir=gs://B/c10 -- --config.seed=1`.

Every command runs through `execute`, as an argument list (no local shell). The command that gcloud
ssh hands to the workers' shell is built with shlex.quote around every value that came from the
command line, so a config value cannot run anything there.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import experiments  # noqa: E402 — launch/experiments.py, next to this file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_BAD_INPUT = 2

# Patterns for names that gcloud receives; values outside them are refused before anything runs.
PATTERNS = {
    "name": (r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", "lowercase letters, digits and hyphens, starting with a letter, "
                                                 "at most 63 characters (e.g. distill-v4-32)"),
    "zone": (r"[a-z]+-[a-z]+[0-9]+-[a-z]", "a zone such as us-central2-b or europe-west4-a"),
    "project": (r"[a-z][-a-z0-9]{4,28}[a-z0-9]", "a project id: 6-30 lowercase letters, digits and hyphens"),
    "accelerator": (r"v[0-9][a-z0-9]*-[0-9]+", "an accelerator type such as v4-8, v4-32, v5litepod-16 or v6e-8"),
    "version": (r"[a-z0-9][-a-z0-9.]*", "a TPU runtime version such as tpu-ubuntu2204-base or v2-alpha-tpuv5-lite"),
    "ref": (r"[A-Za-z0-9_][-A-Za-z0-9_./@{}~^]*", "a git revision such as HEAD, main or a commit hash"),
}
BUCKET = re.compile(r"gs://[a-z0-9][-a-z0-9_.]{1,221}[a-z0-9](/.*)?")
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# On every worker: the code in ~/distill, the run's output in ~/distill.log, its process id in ~/distill.pid.
IS_RUNNING = '[ -f ~/distill.pid ] && kill -0 "$(cat ~/distill.pid)" 2>/dev/null'
REFUSE_IF_RUNNING = (f'if {IS_RUNNING}; then echo "distill is running on $(hostname) (pid $(cat ~/distill.pid)); '
                     f'stop it first: python launch/tpu.py stop" >&2; exit 1; fi')

# States (gcloud describe) in which the TPU can be used, is gone for good, or is still coming up.
STATES = {
    "tpu-vm": dict(ready={"READY"}, gone={"PREEMPTED", "TERMINATED", "STOPPED"}, pending=set()),
    "queued": dict(ready={"ACTIVE"}, gone={"SUSPENDING", "SUSPENDED", "FAILED"},
                   pending={"CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING"}),
}
POLL_SECONDS = 60


def fail(message: str, code: int = EXIT_BAD_INPUT):
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(code)


def note(message: str):
  print(f"# {message}", file=sys.stderr, flush=True)


def execute(argv: list[str], dry_run: bool, capture: bool = False, may_fail: bool = False):
  """The one place a command runs: as an argument list, never through a local shell.

  With dry_run the command is printed (shlex.join, one line) and None is returned. Otherwise it runs
  (echoed to stderr); a failure ends this script with exit code 1 unless may_fail.
  """
  if dry_run:
    print(shlex.join(argv), flush=True)
    return None
  print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
  try:
    result = subprocess.run(argv, text=True, capture_output=capture)
  except FileNotFoundError:
    fail(f"{argv[0]} is not installed or not on PATH", code=1)
  if result.returncode and not may_fail:
    fail(f"exit code {result.returncode} from: {shlex.join(argv)}", code=1)
  return result


# --- the gcloud commands ---------------------------------------------------------------------------


def _where(args) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _tpu_vm(args, verb: str, *rest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, args.name, *_where(args), *rest]


def _queued(args, verb: str, *rest: str, alpha: bool = False) -> list[str]:
  return ["gcloud", *(["alpha"] if alpha else []), "compute", "tpus", "queued-resources", verb, args.name,
          *_where(args), *rest]


def ssh(args, command: str, worker: str = "all") -> list[str]:
  return _tpu_vm(args, "ssh", f"--worker={worker}", f"--command={command}")


def create_argv(args) -> list[str]:
  machine = [f"--accelerator-type={args.accelerator}"]
  if args.queued:
    # --best-effort exists only in the alpha command group.
    provisioning = ["--spot"] if args.spot else ["--best-effort"] if args.best_effort else []
    return _queued(args, "create", f"--node-id={args.name}", *machine, f"--runtime-version={args.version}",
                   *provisioning, alpha=args.best_effort)
  return _tpu_vm(args, "create", *machine, f"--version={args.version}", *(["--spot"] if args.spot else []))


def delete_argv(args) -> list[str]:
  if args.queued:
    return _queued(args, "delete", "--force", "--quiet")  # --force deletes the TPU VM with the request
  return _tpu_vm(args, "delete", "--quiet")


def describe_argv(args) -> list[str]:
  if args.queued:
    return _queued(args, "describe", "--format=value(state.state)")
  return _tpu_vm(args, "describe", "--format=value(state)")


TARBALL = "distill.tar.gz"


# --- what runs on the workers (one shell command each) ------------------------------------------------


def unpack_command() -> str:
  return f"{REFUSE_IF_RUNNING}; rm -rf ~/distill && mkdir -p ~/distill && tar -xzf ~/distill.tar.gz -C ~/distill"


def install_command(packages: list[str]) -> str:
  """The package with its 'gcs' extra (gcsfs: the run's own files in a gs:// workdir go through etils.epath)."""
  return "cd ~/distill && " + shlex.join(["python3", "-m", "pip", "install", "--quiet", "-e", ".[gcs]", *packages])


def run_command(main_flags: list[str], env: list[str]) -> str:
  """Starts `python3 -m distill.main FLAGS` in the background, appending to ~/distill.log."""
  job = ["python3", "-m", "distill.main", *main_flags]
  if env:
    job = ["env", *env, *job]
  return (f'cd ~/distill || exit 1; {REFUSE_IF_RUNNING}; date -u "+--- %FT%TZ start" >> ~/distill.log; '
          f"nohup {shlex.join(job)} >> ~/distill.log 2>&1 < /dev/null & echo $! > ~/distill.pid")


def stop_command() -> str:
  return f'if {IS_RUNNING}; then kill "$(cat ~/distill.pid)"; fi; rm -f ~/distill.pid'


def tail_command(lines: int, follow: bool) -> str:
  return f"tail -n {int(lines)}{' -F' if follow else ''} ~/distill.log"


# --- steps --------------------------------------------------------------------------------------------


def create(args):
  execute(create_argv(args), args.dry_run)
  if args.queued:
    wait_until_ready(args)


def copy(args):
  # The archive goes to a fresh private (0700) directory, removed afterwards: a predictable /tmp name could be
  # a symlink or be swapped by another user of the host between git writing it and gcloud reading it.
  with tempfile.TemporaryDirectory(prefix="distill-launch-") as private:
    tarball = os.path.join(private, TARBALL)
    execute(["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={tarball}", args.ref], args.dry_run)
    execute(_tpu_vm(args, "scp", tarball, f"{args.name}:{TARBALL}", "--worker=all"), args.dry_run)
  execute(ssh(args, unpack_command()), args.dry_run)


def install(args):
  execute(ssh(args, install_command(args.pip)), args.dry_run)


def run(args):
  flags = job_flags(args)
  if not any(f.split("=", 1)[0] == "--distributed" for f in flags):
    # Every worker of a slice joins one jax.distributed job (JAX finds the slice's hosts itself, one host
    # included); it also lets the workers agree on the step at which a preemption's SIGTERM stops them.
    flags.append("--distributed=on")
  execute(ssh(args, run_command(flags, args.env)), args.dry_run)
  if not args.dry_run:
    note(f"started on every worker; follow it with: python launch/tpu.py tail --name={args.name} --zone={args.zone}")


def current_state(args):
  """The TPU's state ('READY', 'PREEMPTED', ... or the queued resource's 'ACTIVE', 'SUSPENDED', ...),
  '' if it does not exist, None in a dry run."""
  result = execute(describe_argv(args), args.dry_run, capture=True, may_fail=True)
  if result is None:
    return None
  if result.returncode == 0:
    return result.stdout.strip()
  if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
    return ""
  lines = result.stderr.strip().splitlines()
  fail(f"cannot read the state of {args.name}: {lines[-1] if lines else result.returncode}", code=1)


def wait_until_ready(args):
  """A queued resource is granted some time after it is created: poll until it is ACTIVE."""
  if args.dry_run:
    note("then wait until the queued resource is ACTIVE (describe every minute)")
    return
  states = STATES["queued"]
  deadline = time.time() + 60 * args.max_wait
  while True:
    state = current_state(args)
    if state in states["ready"]:
      return
    if state == "" or state in states["gone"]:
      fail(f"the queued resource {args.name} is {state or 'gone'}; see gcloud compute tpus queued-resources "
           f"describe {args.name} --zone={args.zone}", code=1)
    if time.time() > deadline:
      fail(f"the queued resource {args.name} is still {state} after {args.max_wait} minutes (--max-wait)", code=1)
    note(f"{args.name} is {state}; checking again in {POLL_SECONDS} s")
    time.sleep(POLL_SECONDS)


def ensure_tpu(args):
  """Keeps a usable TPU, creates a missing one, and replaces a preempted one."""
  states = STATES["queued" if args.queued else "tpu-vm"]
  state = current_state(args)
  if state is None:
    note("dry run: the state is unknown, so this shows what a preempted TPU gets: delete, then create")
    execute(delete_argv(args), args.dry_run)
    create(args)
  elif state in states["ready"]:
    note(f"{args.name} is {state}: keeping it")
  elif state == "":
    note(f"{args.name} does not exist: creating it")
    create(args)
  elif state in states["gone"]:
    note(f"{args.name} is {state}: deleting and creating it again")
    execute(delete_argv(args), args.dry_run)
    create(args)
  elif state in states["pending"]:
    wait_until_ready(args)
  else:
    fail(f"{args.name} is {state}; run resume again once it is {' or '.join(sorted(states['ready']))} or gone",
         code=1)


def resume(args):
  job_flags(args)  # refuse bad job flags before touching the TPU
  ensure_tpu(args)
  copy(args)
  install(args)
  run(args)


def up(args):
  job_flags(args)
  create(args)
  copy(args)
  install(args)
  run(args)


COMMANDS = {
    "create": create, "copy": copy, "install": install, "run": run, "resume": resume, "up": up,
    "tail": lambda args: execute(ssh(args, tail_command(args.lines, not args.no_follow), worker="0"), args.dry_run),
    "stop": lambda args: execute(ssh(args, stop_command()), args.dry_run),
    "delete": lambda args: execute(delete_argv(args), args.dry_run),
}


# --- command line -------------------------------------------------------------------------------------


def job_flags(args) -> list[str]:
  """The flags of distill.main: from --config and --workdir, or --experiment and --root; then those after --."""
  return experiments.job_flags(args, fail, "gs://BUCKET/DIR", _check_bucket)


def _check_bucket(flag: str, value: str):
  if not BUCKET.fullmatch(value):
    fail(f"{flag}={value}: must be a gs://BUCKET/PATH location; a TPU VM's disk is lost when it is preempted")


def _check(args):
  for field, (pattern, allowed) in PATTERNS.items():
    value = getattr(args, field, None)
    if value is not None and not re.fullmatch(pattern, value):
      fail(f"--{field}={value!r}: must be {allowed}")
  for package in getattr(args, "pip", None) or []:
    if any(ord(c) < 32 or ord(c) == 127 for c in package):
      fail(f"--pip={package!r}: control characters (such as newlines) are not allowed")
  for pair in getattr(args, "env", None) or []:
    key, sep, _ = pair.partition("=")
    if not sep or not ENV_KEY.fullmatch(key):
      fail(f"--env={pair!r}: must be NAME=VALUE with NAME made of letters, digits and underscores")
  if getattr(args, "best_effort", False) and not args.queued:
    fail("--best-effort needs --queued (it is a queued-resource provisioning model)")
  if getattr(args, "lines", 1) < 1:
    fail(f"--lines={args.lines}: must be a positive integer")


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    fail(f"{message} (see: python launch/tpu.py -h)")


def parse(argv=None):
  common = _Parser(add_help=False)
  common.add_argument("--name", required=True, help="TPU name (and queued-resource id)")
  common.add_argument("--zone", required=True, help="e.g. us-central2-b")
  common.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
  common.add_argument("--queued", action="store_true", help="the TPU comes from a queued resource of this name")
  common.add_argument("--dry-run", action="store_true", help="print the commands, one per line; run nothing")

  machine = _Parser(add_help=False)
  machine.add_argument("--accelerator", default="v4-8", help="accelerator type (default: v4-8)")
  machine.add_argument("--version", default="tpu-ubuntu2204-base",
                       help="TPU runtime version (default: tpu-ubuntu2204-base, for v4)")
  kind = machine.add_mutually_exclusive_group()
  kind.add_argument("--spot", action="store_true", help="Spot TPU: cheaper, can be preempted")
  kind.add_argument("--best-effort", action="store_true", help="queued resource, best-effort provisioning")
  machine.add_argument("--max-wait", type=int, default=24 * 60,
                       help="minutes to wait for a queued resource to become ACTIVE (default: a day)")

  code = _Parser(add_help=False)
  code.add_argument("--ref", default="HEAD", help="git revision to copy (default: HEAD; commit your changes)")
  code.add_argument("--pip", action="append", default=None,
                    help="extra pip requirement installed with the package (default: jax[tpu]); repeatable")

  job = _Parser(add_help=False)
  job.add_argument("--config", help="config file[:variant], e.g. configs/cifar10.py")
  job.add_argument("--workdir", help="gs://BUCKET/DIR for --config")
  job.add_argument("--experiment", help="a name from launch/experiments.py (instead of --config)")
  job.add_argument("--root", help="gs://BUCKET/DIR for --experiment; the run writes to ROOT/EXPERIMENT")
  job.add_argument("--env", action="append", default=[], help="NAME=VALUE set for distill.main; repeatable")
  job.add_argument("main_flags", nargs="*", metavar="-- FLAG", help="flags passed on to distill.main")

  parser = _Parser(prog="python launch/tpu.py", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  sub.add_parser("create", parents=[common, machine], help="create the TPU VM or queued resource")
  sub.add_parser("copy", parents=[common, code], help="copy the repository (git archive) to every worker")
  sub.add_parser("install", parents=[common, code], help="pip install -e . on every worker")
  sub.add_parser("run", parents=[common, job], help="start distill.main on every worker (nohup, ~/distill.log)")
  tail = sub.add_parser("tail", parents=[common], help="show ~/distill.log of worker 0")
  tail.add_argument("--lines", type=int, default=100)
  tail.add_argument("--no-follow", action="store_true", help="print and return instead of following")
  sub.add_parser("stop", parents=[common], help="stop distill.main on every worker")
  sub.add_parser("resume", parents=[common, machine, code, job],
                 help="recreate the TPU if it is gone or preempted, then copy, install and run again")
  sub.add_parser("delete", parents=[common], help="delete the TPU VM (or the queued resource and its TPU)")
  sub.add_parser("up", parents=[common, machine, code, job], help="create, copy, install and run")
  args = parser.parse_args(argv)
  if hasattr(args, "pip") and args.pip is None:
    args.pip = ["jax[tpu]"]
  _check(args)
  return args


def main(argv=None):
  args = parse(argv)
  COMMANDS[args.command](args)


if __name__ == "__main__":
  main()
