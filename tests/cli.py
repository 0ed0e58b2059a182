"""`python -m distill.main` as a subprocess, as every command-line test runs it."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, timeout=300, cache=True, cwd=ROOT, **env) -> subprocess.CompletedProcess:
  """distill.main with `args`, run from the repository root, its output captured as text. cache=False: no
  persistent compilation cache (DISTILL_JAX_CACHE='') and the CPU only, for cases that fail before compiling
  or must not share compilations; env: more environment variables."""
  environ = dict(os.environ, **({"DISTILL_JAX_CACHE": "", "JAX_PLATFORMS": "cpu"} if not cache else {}))
  environ.update(env)
  return subprocess.run([sys.executable, "-m", "distill.main", *args], cwd=cwd, env=environ, capture_output=True,
                        text=True, timeout=timeout)
