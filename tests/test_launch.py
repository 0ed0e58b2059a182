"""launch/: the gcloud and srun commands the scripts print in dry-run mode, quoting, and the catalogue.

Nothing here runs gcloud, git or sbatch. The scripts run with --dry-run, under a PATH whose gcloud, git
and sbatch only leave a mark that the tests check for; the resume logic runs in-process against a fake.
"""
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
NAME, ZONE, PROJECT = "distill-test", "us-central2-b", "my-project-123"
WHERE = [f"--zone={ZONE}", f"--project={PROJECT}"]
TPU = ["--name=" + NAME, "--zone=" + ZONE, "--project=" + PROJECT]
# launch/tpu.py's archive: in a fresh private directory under the temp dir (never a predictable name).
TARBALL = re.compile(re.escape(os.path.join(tempfile.gettempdir(), "distill-launch-")) + r"[^/]+/distill\.tar\.gz")
INJECTIONS = ["x; rm -rf /", "$(touch /tmp/pwned)", "`id`", "a'b\"c", "x && y | z > /dev/null &", "~/$HOME\\*"]


def load(name):
  spec = importlib.util.spec_from_file_location(f"launch_{name}", os.path.join(LAUNCH, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


experiments = load("experiments")


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
  """A bin/ with gcloud, git and sbatch that only record that they ran."""
  d = tmp_path_factory.mktemp("bin")
  for tool in ("gcloud", "git", "sbatch"):
    (d / tool).write_text(f"#!/bin/sh\ntouch {d}/{tool}.ran\nexit 3\n")
    (d / tool).chmod(0o755)
  yield d
  assert not [p.name for p in d.glob("*.ran")], "a dry run executed a command"


def launch(tools, script, *args):
  env = dict(os.environ, PATH=f"{tools}{os.pathsep}{os.environ['PATH']}")
  # -S: without site-packages, so the scripts must get by with the standard library.
  proc = subprocess.run([sys.executable, "-S", os.path.join(LAUNCH, script), *args], capture_output=True, text=True,
                        env=env, timeout=60, cwd=tempfile.gettempdir())
  assert not list(tools.glob("*.ran")), f"{script} {args} executed a command"
  return proc


def commands(tools, *args):
  """The dry-run commands of launch/tpu.py, each split back into its argument list."""
  proc = launch(tools, "tpu.py", args[0], "--dry-run", *args[1:])
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def ssh(command, worker="all"):
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", NAME, *WHERE, f"--worker={worker}", f"--command={command}"]


def remote(argv):
  """The command a `gcloud ... ssh --command=CMD` line hands to the workers' shell."""
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and argv[-1].startswith("--command=")
  return argv[-1][len("--command="):]


def copy_install():
  return ["archive", "scp", "unpack", ssh("cd ~/distill && python3 -m pip install --quiet -e '.[gcs]' 'jax[tpu]'")]


def check_sequence(got, expected):
  assert len(got) == len(expected), "\n".join(map(shlex.join, got))
  tarball = None
  for g, e in zip(got, expected):
    if e == "archive":
      assert g[:5] == ["git", "-C", ROOT, "archive", "--format=tar.gz"] and g[6:] == ["HEAD"], g
      tarball = g[5][len("--output="):]
      assert g[5].startswith("--output=") and TARBALL.fullmatch(tarball), g
    elif e == "scp":
      assert g == ["gcloud", "compute", "tpus", "tpu-vm", "scp", NAME, *WHERE, tarball, f"{NAME}:distill.tar.gz",
                   "--worker=all"], g
    elif e == "unpack":
      assert g[:-1] == ssh("")[:-1] and remote(g).endswith("rm -rf ~/distill && mkdir -p ~/distill && "
                                                           "tar -xzf ~/distill.tar.gz -C ~/distill")
    elif e == "run":
      assert g[:-1] == ssh("")[:-1] and "nohup python3 -m distill.main" in remote(g)
    else:
      assert g == e


def run_tokens(argv):
  """distill.main's argument list inside the remote run command, less the --distributed=on the script adds."""
  tokens = shlex.split(remote(argv))
  start = tokens.index("distill.main") + 1
  flags = tokens[start:tokens.index(">>", start)]
  assert flags[-1] == "--distributed=on"  # every worker joins one jax.distributed job
  return flags[:-1]


# --- tpu.py: the commands -----------------------------------------------------------------------------


def test_up_prints_create_copy_install_run(tools):
  got = commands(tools, "up", *TPU, "--accelerator=v4-32", "--config=configs/cifar10.py",
                 "--workdir=gs://bkt/c10", "--", "--config.teacher.num_steps=10")
  create = ["gcloud", "compute", "tpus", "tpu-vm", "create", NAME, *WHERE, "--accelerator-type=v4-32",
            "--version=tpu-ubuntu2204-base"]
  check_sequence(got, [create, *copy_install(), "run"])
  assert run_tokens(got[-1]) == ["--config=configs/cifar10.py", "--workdir=gs://bkt/c10",
                                 "--config.teacher.num_steps=10"]


@pytest.mark.parametrize("flags,head,tail", [
    (["--spot"], ["gcloud", "compute", "tpus", "tpu-vm", "create"], ["--version=v2-alpha-tpuv5-lite", "--spot"]),
    (["--queued", "--spot"], ["gcloud", "compute", "tpus", "queued-resources", "create"],
     ["--runtime-version=v2-alpha-tpuv5-lite", "--spot"]),
    (["--queued", "--best-effort"], ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create"],
     ["--runtime-version=v2-alpha-tpuv5-lite", "--best-effort"]),
    (["--queued"], ["gcloud", "compute", "tpus", "queued-resources", "create"],
     ["--runtime-version=v2-alpha-tpuv5-lite"]),
])
def test_create(tools, flags, head, tail):
  got = commands(tools, "create", *TPU, "--accelerator=v5litepod-16", "--version=v2-alpha-tpuv5-lite", *flags)
  node = [f"--node-id={NAME}"] if "--queued" in flags else []
  assert got == [head + [NAME, *WHERE, *node, "--accelerator-type=v5litepod-16"] + tail]


def test_delete_tail_stop(tools):
  assert commands(tools, "delete", *TPU) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", NAME, *WHERE,
                                              "--quiet"]]
  assert commands(tools, "delete", *TPU, "--queued") == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", NAME, *WHERE, "--force", "--quiet"]]
  assert commands(tools, "tail", *TPU, "--lines=50") == [ssh("tail -n 50 -F ~/distill.log", worker="0")]
  [stop] = commands(tools, "stop", *TPU)
  assert stop[:-1] == ssh("")[:-1] and 'kill "$(cat ~/distill.pid)"' in remote(stop)


@pytest.mark.parametrize("queued", [False, True])
def test_resume_recreates_then_copies_installs_and_runs_in_the_same_workdir(tools, queued):
  """A dry run cannot ask gcloud for the state, so it shows the preempted case: delete, create, then the rest."""
  got = commands(tools, "resume", *TPU, "--spot", "--experiment=cifar10-guided", "--root=gs://bkt/runs",
                 *(["--queued"] if queued else []))
  if queued:
    api = ["gcloud", "compute", "tpus", "queued-resources"]
    expected = [api + ["describe", NAME, *WHERE, "--format=value(state.state)"],
                api + ["delete", NAME, *WHERE, "--force", "--quiet"],
                api + ["create", NAME, *WHERE, f"--node-id={NAME}", "--accelerator-type=v4-8",
                       "--runtime-version=tpu-ubuntu2204-base", "--spot"]]
  else:
    api = ["gcloud", "compute", "tpus", "tpu-vm"]
    expected = [api + ["describe", NAME, *WHERE, "--format=value(state)"],
                api + ["delete", NAME, *WHERE, "--quiet"],
                api + ["create", NAME, *WHERE, "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base", "--spot"]]
  check_sequence(got, expected + copy_install() + ["run"])
  assert run_tokens(got[-1]) == experiments.main_flags("cifar10-guided", "gs://bkt/runs")
  assert "--workdir=gs://bkt/runs/cifar10-guided" in run_tokens(got[-1])


def test_up_with_an_experiment_runs_the_catalogue_command(tools):
  got = commands(tools, "up", *TPU, "--experiment=imagenet64-single-w", "--root=gs://bkt/runs", "--env=A=1",
                 "--", "--config.seed=3")
  tokens = shlex.split(remote(got[-1]))
  assert tokens[tokens.index("nohup") + 1:tokens.index("distill.main") + 1] == ["env", "A=1", "python3", "-m",
                                                                                 "distill.main"]
  assert run_tokens(got[-1]) == experiments.main_flags("imagenet64-single-w", "gs://bkt/runs") + ["--config.seed=3"]


class FakeGcloud:
  """Stands in for tpu.execute: answers describe with the given states in turn, records the rest."""

  def __init__(self, *states):
    self.states, self.verbs = list(states), []

  def __call__(self, argv, dry_run, capture=False, may_fail=False):
    verb = argv[argv.index(NAME) - 1]
    self.verbs.append(verb)
    if verb != "describe":
      return subprocess.CompletedProcess(argv, 0, "", "")
    state = self.states.pop(0)
    if state is None:
      return subprocess.CompletedProcess(argv, 1, "", f"ERROR: NOT_FOUND: Resource '{NAME}' was not found")
    return subprocess.CompletedProcess(argv, 0, state + "\n", "")


@pytest.mark.parametrize("queued,states,verbs", [
    (False, ["READY"], ["describe"]),
    (False, [None], ["describe", "create"]),
    (False, ["PREEMPTED"], ["describe", "delete", "create"]),
    (True, ["ACTIVE"], ["describe"]),
    (True, ["SUSPENDED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"],
     ["describe", "delete", "create", "describe", "describe", "describe"]),
    (True, ["WAITING_FOR_RESOURCES", "ACTIVE"], ["describe", "describe"]),
])
def test_resume_keeps_creates_or_replaces_the_tpu_by_its_state(monkeypatch, queued, states, verbs):
  tpu = load("tpu")
  fake = FakeGcloud(*states)
  monkeypatch.setattr(tpu, "execute", fake)
  monkeypatch.setattr(tpu.time, "sleep", lambda seconds: None)
  args = tpu.parse(["resume", *TPU, *(["--queued"] if queued else []), "--config=configs/digits.py",
                    "--workdir=gs://bkt/x"])
  tpu.ensure_tpu(args)
  assert fake.verbs == verbs and not fake.states


def test_resume_stops_on_a_state_it_cannot_handle(monkeypatch, capsys):
  tpu = load("tpu")
  monkeypatch.setattr(tpu, "execute", FakeGcloud("CREATING"))
  with pytest.raises(SystemExit) as e:
    tpu.ensure_tpu(tpu.parse(["resume", *TPU, "--config=configs/digits.py", "--workdir=gs://bkt/x"]))
  assert e.value.code == 1 and "is CREATING" in capsys.readouterr().err


# --- tpu.py: quoting ----------------------------------------------------------------------------------


def test_values_reach_the_remote_shell_as_one_quoted_word(tools):
  overrides = [f"--config.data.path={value}" for value in INJECTIONS]
  envs = [f"PROBE{i}={value}" for i, value in enumerate(INJECTIONS)]
  workdir = "gs://bkt/" + INJECTIONS[0]
  [run] = commands(tools, "run", *TPU, "--config=configs/digits.py", f"--workdir={workdir}",
                   *(f"--env={e}" for e in envs), "--", *overrides)
  command = remote(run)
  assert run_tokens(run) == ["--config=configs/digits.py", f"--workdir={workdir}", *overrides]
  tokens = shlex.split(command)
  assert tokens[tokens.index("env") + 1:tokens.index("python3")] == envs
  for word in (*overrides, f"--workdir={workdir}", *envs):
    assert shlex.quote(word).startswith("'") and shlex.quote(word) in command
  [install] = commands(tools, "install", *TPU, *(f"--pip={value}" for value in INJECTIONS))
  assert shlex.split(remote(install))[-len(INJECTIONS):] == INJECTIONS


def test_the_remote_run_command_runs_nothing_but_distill_main(tools, tmp_path):
  """Runs the worker-side command in a local bash, with python3 a stub that records its arguments."""
  home, stubs = tmp_path / "home", tmp_path / "stubs"
  (home / "distill").mkdir(parents=True)
  stubs.mkdir()
  (stubs / "python3").write_text('#!/bin/sh\nprintf "%s\\0" "$PROBE" "$@" > "$HOME/argv.tmp"\n'
                                 'mv "$HOME/argv.tmp" "$HOME/argv"\n')
  (stubs / "python3").chmod(0o755)
  values = [f"x; touch {home}/pwned1", f"$(touch {home}/pwned2)", f"`touch {home}/pwned3`", "a'b\"c\\d *"]
  overrides = [f"--config.data.path={v}" for v in values]
  [run] = commands(tools, "run", *TPU, "--config=configs/digits.py", f"--workdir=gs://bkt/$(touch {home}/pwned4)",
                   f"--env=PROBE=$(touch {home}/pwned5)", "--", *overrides)
  env = {"HOME": str(home), "PATH": f"{stubs}{os.pathsep}/usr/bin{os.pathsep}/bin"}
  proc = subprocess.run(["bash", "-c", remote(run)], env=env, capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  deadline = time.time() + 10
  while not (home / "argv").exists() and time.time() < deadline:
    time.sleep(0.05)
  recorded = (home / "argv").read_text().split("\0")[:-1]
  assert recorded == [f"$(touch {home}/pwned5)", "-m", "distill.main", "--config=configs/digits.py",
                      f"--workdir=gs://bkt/$(touch {home}/pwned4)", *overrides, "--distributed=on"]
  assert not list(home.glob("pwned*"))
  assert (home / "distill.pid").read_text().strip().isdigit()


# --- tpu.py: bad input --------------------------------------------------------------------------------


# (args, needles): every needle must be in the one line: the flag with its value, and what is allowed.
TPU_BAD_INPUT = {
    "name_uppercase": (["delete", "--name=Bad_Name", f"--zone={ZONE}"], ["--name='Bad_Name'", "lowercase letters"]),
    "name_option_injection": (["delete", "--name=-oProxyCommand=x", f"--zone={ZONE}"],
                              ["--name='-oProxyCommand=x'", "starting with a letter"]),
    "zone_shell": (["create", f"--name={NAME}", "--zone=us-central2-b; rm -rf /"], ["--zone=", "a zone such as"]),
    "zone_substitution": (["run", f"--name={NAME}", "--zone=$(id)", "--config=configs/digits.py", "--workdir=gs://bkt/x"],
                          ["--zone='$(id)'", "a zone such as"]),
    "project_short": (["delete", f"--name={NAME}", f"--zone={ZONE}", "--project=ab"], ["--project='ab'", "6-30"]),
    "accelerator_bad": (["create", *TPU, "--accelerator=v4 8"], ["--accelerator='v4 8'", "v4-8"]),
    "best_effort_not_queued": (["create", *TPU, "--best-effort"], ["--best-effort needs --queued"]),
    "workdir_local": (["run", *TPU, "--config=configs/digits.py", "--workdir=/local/dir"],
                      ["--workdir=/local/dir", "gs://BUCKET/PATH"]),
    "config_missing": (["run", *TPU, "--config=configs/nope.py", "--workdir=gs://bkt/x"],
                       ["configs/nope.py is not a file"]),
    "experiment_unknown": (["run", *TPU, "--experiment=nope", "--root=gs://bkt/x"],
                           ["--experiment=nope: unknown", "experiments.py list"]),
    "no_config_no_experiment": (["run", *TPU], ["give either --config", "--experiment"]),
    "positional_after_separator": (["run", *TPU, "--config=configs/digits.py", "--workdir=gs://bkt/x", "--", "positional"],
                                   ["'positional' after --", "only --flags"]),
    "newline_in_main_flag": (["run", *TPU, "--config=configs/digits.py", "--workdir=gs://bkt/x", "--",
                              "--config.seed=1\nrm -rf /"], ["control characters"]),
    "newline_in_pip": (["install", *TPU, "--pip=x\ny"], ["--pip=", "control characters"]),
    "ref_option_injection": (["copy", *TPU, "--ref=--output=/etc/passwd"], ["--ref='--output=/etc/passwd'",
                                                                            "a git revision"]),
    "lines_0": (["tail", *TPU, "--lines=0"], ["--lines=0", "positive integer"]),
    "env_no_value": (["run", *TPU, "--config=configs/digits.py", "--workdir=gs://bkt/x", "--env=A"],
                     ["--env='A'", "NAME=VALUE"]),
    "command_unknown": (["bogus"], ["invalid choice", "'bogus'", "'up'"]),
    "dry_run_after_separator": (["run", *TPU, "--config=configs/digits.py", "--workdir=gs://bkt/x", "--", "--dry-run"],
                                ["--dry-run after --", "put it before --"]),
}


@pytest.mark.parametrize("name", list(TPU_BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(tools, name):
  args, needles = TPU_BAD_INPUT[name]
  proc = launch(tools, "tpu.py", args[0], "--dry-run", *args[1:])
  lines = proc.stderr.splitlines()
  assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


# --- experiments.py -----------------------------------------------------------------------------------


def _get_config(config_arg):
  path, _, variant = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("config_under_test", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant or None)


@pytest.mark.parametrize("name", list(experiments.EXPERIMENTS))
def test_every_entry_names_a_config_file_and_real_fields(name):
  config_arg, overrides, teacher_from, description = experiments.EXPERIMENTS[name]
  assert os.path.isfile(os.path.join(ROOT, config_arg.partition(":")[0])) and description
  config = _get_config(config_arg)
  for flag in experiments.main_flags(name, "ROOT")[2:]:
    assert flag.startswith("--config.") and "=" in flag, flag
    node = config
    for part in flag.split("=", 1)[0][len("--config."):].split("."):
      assert hasattr(node, "keys") and part in node, f"{name}: {flag} names no config field"
      node = node[part]
  if teacher_from:
    assert "teacher" not in config.pipeline or any("pipeline" in o for o in overrides)
    assert "teacher" in _get_config(experiments.EXPERIMENTS[teacher_from][0]).pipeline


def test_the_catalogue_checks_out_with_its_values_applied():
  assert experiments.check_catalogue() == []
  bad = {"typo": ("configs/digits.py", ["--config.distill.nope=1"], None, ""),
         "no-file": ("configs/nope.py", [], None, ""),
         "bad-value": ("configs/digits.py", ["--config.distill.start_steps=48"], None, ""),
         "orphan": ("configs/digits.py", [], "missing", "")}
  problems = "\n".join(experiments.check_catalogue(bad))
  for expected in ("typo: --config.distill.nope names no config field", "no-file: config file configs/nope.py",
                   "bad-value: config.distill.start_steps=48", "orphan: reuses the teacher of 'missing'"):
    assert expected in problems


def test_list_and_show(tools):
  listed = launch(tools, "experiments.py", "list").stdout.splitlines()
  assert [line.split()[0] for line in listed] == list(experiments.EXPERIMENTS)
  for name in ("digits-quick", "cifar10-single-w"):
    shown = launch(tools, "experiments.py", "show", name, "--root=gs://b/r").stdout.strip()
    assert shlex.split(shown) == ["python", "-m", "distill.main", *experiments.main_flags(name, "gs://b/r")]
  assert shlex.split(launch(tools, "experiments.py", "show", "digits").stdout) == [
      "python", "-m", "distill.main", "--config=configs/digits.py", "--workdir=runs/digits"]
  proc = launch(tools, "experiments.py", "show", "nope")
  assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1


# --- slurm.py -----------------------------------------------------------------------------------------


def test_slurm_script(tools):
  proc = launch(tools, "slurm.py", "--nodes=2", "--gpus-per-node=4", "--partition=gpu", "--time=2-00:00:00",
                "--experiment=cifar10-two-student", "--root=/path/to/runs", "--requeue", "--dry-run", "--",
                "--config.seed=1", "--config.data.path=x; rm -rf /")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == "#!/bin/bash"
  for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=2-00:00:00",
               "--requeue", "--job-name=distill-cifar10-two-student"):
    assert f"#SBATCH {flag}" in lines
  [srun] = [shlex.split(l) for l in lines if l.startswith("srun ")]
  assert srun == ["srun", "--kill-on-bad-exit=1", "python", "-m", "distill.main",
                  *experiments.main_flags("cifar10-two-student", "/path/to/runs"), "--config.seed=1",
                  "--config.data.path=x; rm -rf /"]
  assert f"cd {shlex.quote(ROOT)}" in lines
  assert any(l.startswith("export JAX_COORDINATOR_ADDRESS=") for l in lines)
  assert subprocess.run(["bash", "-n"], input=proc.stdout, text=True).returncode == 0


# (args, needles): every needle must be in the one line: the flag with its value, and what is allowed.
SLURM_BAD_INPUT = {
    "partition_newline": (["--partition=gpu\n#SBATCH --wrap=x"], ["--partition=", "a partition name"]),
    "nodes_0": (["--nodes=0"], ["--nodes=0", "[1, 100000]"]),
    "nodes_huge": (["--nodes=1000000"], ["--nodes=1000000", "[1, 100000]"]),
    "gpus_per_node_0": (["--gpus-per-node=0"], ["--gpus-per-node=0", "[1, 64]"]),
    "cpus_per_gpu_huge": (["--cpus-per-gpu=4096"], ["--cpus-per-gpu=4096", "[1, 1024]"]),
    "nodes_not_int": (["--nodes=two"], ["--nodes", "'two'", "int"]),
    "env_no_value": (["--env=A"], ["--env='A'", "NAME=VALUE"]),
    "env_newline": (["--env=A=1\n#SBATCH --wrap=x"], ["control characters"]),
    "job_name_newline": (["--job-name=x\n#SBATCH --wrap=id"], ["--job-name=", "letters, digits"]),
    "job_name_too_long": (["--job-name=" + "j" * 65], ["--job-name=", "(at most 64)"]),
    "account_space": (["--account=a b"], ["--account='a b'", "an account name"]),
    "time_bad": (["--time=2 days"], ["--time='2 days'", "48:00:00"]),
    "venv_newline": (["--venv=/v\nrm -rf /"], ["--venv=", "without control characters"]),
    "venv_empty": (["--venv="], ["--venv=''", "a directory path"]),
    "workdir_newline": (["--workdir=/s/r\n#SBATCH --wrap=x"], ["control characters"]),
    "main_flag_positional": (["--", "positional"], ["'positional' after --", "only --flags"]),
}


@pytest.mark.parametrize("name", list(SLURM_BAD_INPUT))
def test_slurm_bad_input(tools, name):
  args, needles = SLURM_BAD_INPUT[name]
  base = ["--dry-run", "--config=configs/digits.py"] + ([] if any(a.startswith("--workdir=") for a in args) else
                                                        ["--workdir=/s/r"])
  proc = launch(tools, "slurm.py", *base, *args)
  assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
  for needle in needles:
    assert needle in proc.stderr, (needle, proc.stderr)


# (config file name, needle): a job name derived from these is refused, naming it.
DERIVED_JOB_NAMES = [("my run.py", "'distill-my run'"), ("x" * 70 + ".py", "'distill-xxx")]


@pytest.mark.parametrize("filename,needle", DERIVED_JOB_NAMES)
def test_slurm_refuses_a_job_name_derived_from_an_unfit_config_name(tools, tmp_path, filename, needle):
  """The config file's name becomes #SBATCH --job-name: it is checked as --job-name is, and --job-name fixes it."""
  config = tmp_path / filename
  with open(os.path.join(ROOT, "configs", "digits.py")) as f:
    config.write_text(f.read())
  proc = launch(tools, "slurm.py", "--dry-run", f"--config={config}", "--workdir=/s/r")
  assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
  for expected in (f"--config={config}", needle, "letters, digits", "pass --job-name=NAME"):
    assert expected in proc.stderr, (expected, proc.stderr)
  proc = launch(tools, "slurm.py", "--dry-run", f"--config={config}", "--workdir=/s/r", "--job-name=ok")
  assert proc.returncode == 0 and "#SBATCH --job-name=ok" in proc.stdout.splitlines(), proc.stderr


def test_tpu_copy_writes_the_archive_into_a_private_directory_it_removes(monkeypatch, tmp_path):
  """Not /tmp/NAME.distill.tar.gz, which another user of the host could plant as a symlink: a fresh 0700
  directory per copy, gone afterwards, whatever sits at the old name."""
  tpu = load("tpu")
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  planted = tmp_path / f"{NAME}.distill.tar.gz"
  planted.symlink_to(tmp_path / "victim")
  seen = []

  def fake_execute(argv, dry_run, capture=False, may_fail=False):
    if argv[:2] == ["git", "-C"]:
      path = argv[5][len("--output="):]
      directory = os.path.dirname(path)
      seen.append((path, oct(os.stat(directory).st_mode & 0o777), os.stat(directory).st_uid))
      open(path, "wb").close()  # what git would write
    elif "scp" in argv:
      assert argv[argv.index("scp") + 1 + 1 + len(WHERE)] == seen[-1][0]
    return subprocess.CompletedProcess(argv, 0, "", "")

  monkeypatch.setattr(tpu, "execute", fake_execute)
  args = tpu.parse(["copy", *TPU])
  tpu.copy(args)
  tpu.copy(args)
  (first, mode, uid), (second, _, _) = seen
  assert first != second and mode == "0o700" and uid == os.getuid()
  assert os.path.dirname(os.path.dirname(first)) == str(tmp_path)
  assert not os.path.exists(os.path.dirname(first)) and not os.path.exists(os.path.dirname(second))
  assert planted.is_symlink() and not (tmp_path / "victim").exists()


def test_run_keeps_a_distributed_flag_given_after_the_separator(tools):
  [run] = commands(tools, "run", *TPU, "--config=configs/digits.py", "--workdir=gs://bkt/d", "--", "--distributed=off")
  tokens = shlex.split(remote(run))
  assert tokens.count("--distributed=off") == 1 and "--distributed=on" not in tokens
