"""docs/bad_input.md lists every bad-input case the suite runs; it is generated from the tests' own case tables,
and this test fails when the two disagree, so the page cannot go stale. To regenerate it:

  python tests/test_bad_input_table.py > docs/bad_input.md
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(os.path.dirname(HERE), "docs", "bad_input.md")
if HERE not in sys.path:
  sys.path.insert(0, HERE)


def _cell(text: str) -> str:
  """Markdown table cell: code, with newlines and pipes visible."""
  text = text.replace("\n", "\\n").replace("|", "\\|")
  return f"`{text}`" if text else ""


def _needles(needles) -> str:
  return "<br>".join(_cell(n) for n in needles)


def render() -> str:
  import test_bad_input
  import test_bad_input_stages
  import test_launch
  import test_weight_fuzz

  main_rows = []
  for param in test_bad_input.CASES:
    args, needles, setup = param.values
    xfail = [m.kwargs.get("reason") for m in param.marks if m.name == "xfail"]
    note = f"xfail: {xfail[0]}" if xfail else (f"setup: {setup}" if setup else "")
    main_rows.append((param.id, " ".join(args), needles, "2", note))
  stage_rows = []
  for param in test_bad_input_stages.CASES:
    args, code, needles, setup = param.values
    note = f"setup: {test_bad_input_stages.describe(setup)}" if setup else ""
    stage_rows.append((param.id, " ".join(args), needles, str(code), note))
  tpu_rows = [(name, " ".join([args[0], "--dry-run", *args[1:]]), needles, "2", "")
              for name, (args, needles) in test_launch.TPU_BAD_INPUT.items()]
  slurm_rows = [(name, " ".join(["--dry-run", "--config=configs/digits.py", "--workdir=/s/r", *args]), needles, "2", "")
                for name, (args, needles) in test_launch.SLURM_BAD_INPUT.items()]
  slurm_rows += [(f"job_name_derived_from_{filename[:12]}", f"--dry-run --config=TMP/{filename} --workdir=/s/r",
                  ["--config=", needle, "letters, digits", "pass --job-name=NAME"], "2", "config file made by the test")
                 for filename, needle in test_launch.DERIVED_JOB_NAMES]
  weight_rows = []
  for id_, kind, raw, expectation in test_weight_fuzz.crafted():
    if isinstance(expectation, tuple):
      weight_rows.append((id_, kind, ["(loads, with the right values)"], "-", f"{len(raw)} bytes"))
    else:
      weight_rows.append((id_, kind, [expectation], "ValueError", f"{len(raw)} bytes"))
  random_cases = sum(test_weight_fuzz.COUNTS.values()) + test_weight_fuzz.COUNTS["random"]

  out = [
      "# Bad input the test suite runs",
      "",
      "Generated from the tests' case tables by `python tests/test_bad_input_table.py > docs/bad_input.md`;",
      "`tests/test_bad_input_table.py` fails when this page and the suite disagree. Each command-line case must",
      "print exactly one line, `error: ...`, holding every fragment listed, exit with the code given, and (for",
      "`distill.main`, at exit 2) leave the files under its directory byte-identical. `{tmp}`, `{run}`, `{npz}`,",
      "`{pth}`, ... stand for files the case's setup makes.",
      "",
      f"Command-line cases: {len(main_rows) + len(stage_rows) + len(tpu_rows) + len(slurm_rows)}; weight-file "
      f"reader cases: {len(weight_rows)} crafted plus {random_cases} random mutations.",
      "",
  ]

  def table(title, source, rows, what="arguments", intro=()):
    out.extend([f"## {title}", "", f"From `{source}`.", *intro, "",
                f"| case | {what} | expected in the one line | exit | note |", "| --- | --- | --- | --- | --- |"])
    out.extend(f"| {name} | {_cell(args)} | {_needles(needles)} | {code} | {note} |"
               for name, args, needles, code, note in rows)
    out.append("")

  table("`python -m distill.main`", "tests/test_bad_input.py", main_rows)
  table("Later stages on real checkpoints (`python -m distill.main`)", "tests/test_bad_input_stages.py", stage_rows,
        intro=["A tiny digits run (teacher and stage one) is really trained, one thing is broken in a copy of it, and",
               "a later stage runs on it. `{run}` is that copy (the workdir unless the arguments name another),",
               "`{tiny}` the overrides that shrink the run (`TINY` there). Exit 2: found before anything is written,",
               "and nothing is; exit 1: the stage fails on it. Either way the finished stages' final/ are left",
               "byte-identical."])
  table("`python launch/tpu.py`", "tests/test_launch.py (TPU_BAD_INPUT)", tpu_rows)
  table("`python launch/slurm.py`", "tests/test_launch.py (SLURM_BAD_INPUT, DERIVED_JOB_NAMES)", slurm_rows)
  out.extend(["## Weight files (`.pth`, `.npz`)", "",
              "From `tests/test_weight_fuzz.py`: the readers (`torch_weights.state_dict_from_bytes`,",
              "`npz_arrays.read_npz_arrays`) in a subprocess under an address-space cap. Each crafted file must end",
              "as the one-line `ValueError` holding the fragment (or load correctly); each of the",
              f"{random_cases} random mutations of real `.pth` and `.npz` files must load or end as a one-line",
              "`ValueError`, within the cap. Through `distill.main` such an error",
              "is the one line of the field that named the file (see `sfd_lpips_stride_0_pth`,",
              "`reference_stats_deflate_bomb` above).", "",
              "| case | format | expected in the error | raises | note |", "| --- | --- | --- | --- | --- |"])
  out.extend(f"| {name} | {kind} | {_needles(needles)} | {code} | {note} |"
             for name, kind, needles, code, note in weight_rows)
  out.append("")
  return "\n".join(out)


def test_the_table_in_docs_lists_exactly_the_cases_the_suite_runs():
  with open(DOC) as f:
    written = f.read()
  expected = render()
  if written != expected:
    import difflib
    diff = "\n".join(list(difflib.unified_diff(written.splitlines(), expected.splitlines(), "docs/bad_input.md",
                                               "the suite", lineterm=""))[:40])
    raise AssertionError(f"docs/bad_input.md is stale; regenerate it with "
                         f"`python tests/test_bad_input_table.py > docs/bad_input.md`:\n{diff}")
  assert written.count("\n| ") >= 100 + 50  # ~130 command-line cases and 60 weight files


if __name__ == "__main__":
  sys.stdout.write(render())
