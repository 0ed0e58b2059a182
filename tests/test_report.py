"""The markdown report's exact layout, the speed-up summary, metric hygiene, and the PNG plots."""
import subprocess
import sys

import pytest
from PIL import Image

from distill.evaluation import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(method, sampler, w, steps, fid, metric="classifier", **extra):
  base = dict(method=method, sampler=sampler, w=w, steps=steps, nfe=2 * steps, fid=fid, precision=None,
              recall=None, num_samples=500, metric=metric, seed=0, checkpoint=f"/ckpt/{method}")
  base["is"] = None
  base.update(extra)
  return base


@pytest.fixture
def rows():
  return [
      row("teacher DDIM", "ddim", 0.0, 16, 10.0),
      row("teacher DDIM", "ddim", 0.0, 64, 8.0),
      row("teacher DDIM", "ddim", 1.0, 64, 6.5),
      row("guided PD", "deterministic", 0.0, 2, 12.345),
      row("guided PD", "stochastic", 0.0, 2, 7.9),  # reaches the w = 0 teacher at 4 NFE
      row("guided PD", "stochastic", 0.0, 8, 5.0),  # also reaches it, but at more NFE
      row("guided PD", "deterministic", 1.0, 2, 9.0),
      row("guided PD", "deterministic", 1.0, 8, 6.5),  # equal to the w = 1 teacher: reached
      row("single-w", "deterministic", 1.0, 4, 30.0),
  ]


EXPECTED = """\
# Digits, 8x8

- one seed
- Metric: classifier-FID (data set classifier features), 500 samples per cell.
- D / S: deterministic / stochastic sampler; NFE counts 2 network evaluations per guided step.

## classifier-FID (lower is better)

| method | steps | sampler | w = 0 | w = 1 |
| --- | --- | --- | --- | --- |
| teacher DDIM | 16 | DDIM | 10 | — |
| teacher DDIM | 64 | DDIM | 8 | 6.5 |
| guided PD | 2 | D / S | 12.3 / 7.9 | 9 / — |
| guided PD | 8 | D / S | — / 5 | 6.5 / — |
| single-w | 4 | D | — | 30 |

## Speed-up: fewest NFE reaching the teacher's classifier-FID

| w | teacher reference | reference classifier-FID | reference NFE | teacher DDIM | guided PD | single-w |
| --- | --- | --- | --- | --- | --- | --- |
| 0 | teacher DDIM, 64 steps | 8 | 128 | 128 (DDIM, 1×) | 4 (S, 32×) | — |
| 1 | teacher DDIM, 64 steps | 6.5 | 128 | 128 (DDIM, 1×) | 16 (D, 8×) | not reached |
"""


def test_markdown_report_exact_layout(rows):
  assert report.markdown_report(rows, title="Digits, 8x8", notes=["one seed"]) == EXPECTED


def test_row_order_does_not_change_the_tables_within_a_method(rows):
  shuffled = rows[2::-1] + rows[3:8][::-1] + rows[8:]  # methods keep their first-appearance order
  assert report.markdown_report(shuffled, title="Digits, 8x8", notes=["one seed"]) == EXPECTED


def speedup_cells(rows):
  lines = report.speedup_table(rows)
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_speedup_reference_is_the_teacher_with_most_steps(rows):
  # A cheaper teacher run with a better FID does not become the reference.
  rows.append(row("teacher DDIM", "ddim", 1.0, 32, 3.0))
  rows.append(row("teacher DDPM", "ddpm", 1.0, 64, 6.0))  # ties on steps: the lower FID wins
  w0, w1 = speedup_cells(rows)
  assert w0["reference classifier-FID"] == "8" and w0["guided PD"] == "4 (S, 32×)"
  assert w1["teacher reference"] == "teacher DDPM, 64 steps" and w1["reference classifier-FID"] == "6"
  assert w1["guided PD"] == "not reached" and w1["teacher DDIM"] == "64 (DDIM, 2×)"
  assert w1["teacher DDPM"] == "128 (DDPM, 1×)" and w0["teacher DDPM"] == "—"


def test_no_teacher_no_speedup(rows):
  text = report.markdown_report([r for r in rows if not r["method"].startswith("teacher")], title="t")
  assert "No teacher rows" in text


def test_inception_labels_and_optional_tables():
  rows = [row("guided PD", "deterministic", 0.3, 1, 3.2, metric="inception", precision=0.61),
          row("guided PD", "stochastic", 0.3, 1, 2.9, metric="inception", precision=0.65),
          row("teacher DDIM", "ddim", 0.3, 256, 2.5, metric="inception")]
  rows[0]["is"] = 51.2
  text = report.markdown_report(rows, title="ImageNet 64", notes=[])
  assert "classifier" not in text
  assert "## FID (lower is better)" in text and "## IS (higher is better)" in text
  assert "## precision (higher is better)" in text and "## recall" not in text
  assert "| guided PD | 1 | D / S | 51.2 / — |" in text
  assert "| guided PD | 1 | D / S | 0.61 / 0.65 |" in text
  assert "| teacher DDIM | 256 | DDIM | — |" in text  # no IS for the teacher
  assert "| 0.3 | teacher DDIM, 256 steps | 2.5 | 512 | not reached | 512 (DDIM, 1×) |" in text
  assert "Training cost" not in text


def test_cost_table(rows):
  rows[3].update(student_updates=1000, teacher_evals=256_000, train_seconds=90.0)
  rows[5].update(student_updates=4000, teacher_evals=1_024_000, student_evals=512_000, train_seconds=2 * 3600.0)
  text = report.markdown_report(rows, title="t")
  assert ("| method | student updates | teacher evaluations | student evaluations | wall-clock | "
          "best classifier-FID |") in text
  assert "| guided PD | 4,000 | 1,024,000 | 512,000 | 2.0 h | 5 (w = 0, 8 steps, S) |" in text
  assert "| single-w | — | — | — | — | 30 (w = 1, 4 steps, D) |" in text


def test_mixing_metrics_and_malformed_rows_raise(rows):
  with pytest.raises(ValueError, match="mix metrics"):
    report.markdown_report(rows + [row("guided PD", "deterministic", 4.0, 1, 3.0, metric="inception")], title="t")
  with pytest.raises(ValueError, match="mix metrics"):
    report.plot_fid_vs_nfe(rows + [row("x", "ddim", 0.0, 1, 3.0, metric="inception")], "/dev/null")
  with pytest.raises(ValueError, match="two rows"):
    report.markdown_report(rows + [dict(rows[0], w=0.0 + 1e-12, seed=1)], title="t")
  with pytest.raises(ValueError, match="sampler"):
    report.markdown_report([row("x", "heun", 0.0, 1, 3.0)], title="t")
  with pytest.raises(ValueError, match="lacks"):
    report.markdown_report([{"method": "x"}], title="t")
  with pytest.raises(ValueError, match="no rows"):
    report.markdown_report([], title="t")
  with pytest.raises(ValueError, match="metric"):
    report.metric_label("fid")
  with pytest.raises(ValueError, match="key"):
    report.metric_table(rows, "kid")


def png_size(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    return image.size


def test_plots_write_png(rows, tmp_path):
  nfe_png = tmp_path / "fid_vs_nfe.png"
  assert report.plot_fid_vs_nfe(rows, str(nfe_png)) is True
  assert png_size(nfe_png) == (2 * 400 + 200, 350)  # two w panels and the legend

  tradeoff_png = tmp_path / "fid_is.png"
  assert report.plot_fid_is_tradeoff(rows, str(tradeoff_png)) is False  # no IS in these rows
  assert not tradeoff_png.exists()
  for r, value in zip(rows, [9.0, 9.5, 11.0, 7.0, 8.5, 9.2, 10.1, 10.9, 4.0]):
    r["is"] = value
  assert report.plot_fid_is_tradeoff(rows, str(tradeoff_png)) is True
  # A curve needs two w at one step count: guided PD D at 2 steps has w = 0 and 1; at 8 steps D and S have one
  # w each -> one panel.
  assert report.tradeoff_steps([r for r in rows if not r["method"].startswith("teacher")]) == [2]
  assert png_size(tradeoff_png) == (420 + 220, 380)


def test_importing_report_does_not_import_matplotlib():
  code = "import sys, distill.evaluation.report; assert 'matplotlib' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_intervals_show_in_cells_and_overlap_counts_as_reaching_the_teacher():
  rows = [row("teacher DDIM", "ddim", 0.0, 64, 8.0, fid_ci=[7.5, 8.6]),
          row("guided PD", "deterministic", 0.0, 2, 8.3, fid_ci=[7.9, 8.8]),   # above, but the intervals overlap
          row("single-w", "deterministic", 0.0, 2, 9.5, fid_ci=[8.7, 10.1])]  # above, intervals apart
  table = "\n".join(report.metric_table(rows))
  assert "8.3 (7.9–8.8)" in table and "8 (7.5–8.6)" in table
  speed = report.speedup_table(rows)[-1]
  assert "4 (D, 32×)" in speed and speed.rstrip(" |").endswith("not reached")  # the helper counts 2 NFE per step
  assert "intervals overlap" in report.markdown_report(rows, title="t")


def test_claim_verdicts_use_intervals_when_both_rows_have_them():
  a, b = row("A", "ddim", 0.0, 4, 5.0, fid_ci=[4.5, 5.5]), row("B", "ddim", 0.0, 4, 6.0, fid_ci=[5.4, 6.6])
  assert report.claim_verdict(a, b, "fid", "match") == "holds (within noise)"
  assert report.claim_verdict(a, b, "fid", "better") == "within noise"
  b["fid_ci"] = [5.6, 6.4]  # apart: a is clearly lower
  assert report.claim_verdict(a, b, "fid", "better") == "holds"
  assert report.claim_verdict(b, a, "fid", "match") == "fails"
  a["is"], b["is"], a["is_ci"], b["is_ci"] = 9.0, 7.0, [8.5, 9.5], [6.5, 7.5]
  assert report.claim_verdict(a, b, "is", "better") == "holds"  # IS: higher is better
  assert report.claim_verdict(b, a, "is", "better") == "fails"
  del a["fid_ci"]
  assert report.claim_verdict(a, b, "fid", "match") == "holds (no interval)"
  assert report.claim_verdict(b, a, "fid", "match") == "fails (no interval)"


def test_claims_pick_their_rows_per_w_and_across_w():
  from distill.contract import Claim, Side
  rows = [row("teacher DDIM", "ddim", 0.0, 4, 3.0, fid_ci=[2.8, 3.2]),
          row("teacher DDIM", "ddim", 0.0, 16, 2.0, fid_ci=[1.8, 2.2]),
          row("teacher DDIM", "ddim", 1.0, 16, 1.5, fid_ci=[1.3, 1.7]),
          row("stage one", "deterministic", 0.0, 4, 3.1, fid_ci=[2.9, 3.3]),
          row("stage one", "deterministic", 1.0, 4, 9.0, fid_ci=[8.0, 10.0]),  # no teacher at 4 steps, w = 1
          row("guided PD", "deterministic", 0.0, 4, 2.9, fid_ci=[2.75, 3.05]),
          row("guided PD", "stochastic", 0.0, 4, 2.5, fid_ci=[2.3, 2.7]),
          row("single-w (w=0)", "deterministic", 0.0, 4, 4.0, fid_ci=[3.8, 4.2])]
  for r, v in zip(rows, [5.0, 5.5, 7.5, 5.2, 8.0, 6.0, 6.2, 5.9]):
    r["is"] = v
  claims = [Claim("stage one matches", Side("stage one", steps="most"), Side("teacher DDIM")),
            Claim("4-step beats DDIM 16", Side("guided PD", steps=4), Side("teacher DDIM", steps=16)),
            Claim("matches single-w", Side("guided PD", steps=4), Side("single-w*")),
            Claim("S beats D", Side("guided PD", ("stochastic",), steps=4), Side("guided PD", ("deterministic",)),
                  relation="better"),
            Claim("IS rises", Side("*", steps="most", w="highest"), Side("*", w="lowest"), quantity="is",
                  relation="better"),
            Claim("nothing to read", Side("CD", steps=1), Side("teacher DDIM"))]
  got = [(c["claim"], c["w"], c["a"]["method"], c["a"]["sampler"], c["a"]["steps"], c["b"]["method"],
          c["b"]["steps"], c["verdict"]) for c in report.check_claims(rows, claims)]
  assert got == [
      ("stage one matches", "0", "stage one", "deterministic", 4, "teacher DDIM", 4, "holds (within noise)"),
      # the best of D / S (2.5) against the teacher's 16 steps (2.0): apart and worse
      ("4-step beats DDIM 16", "0", "guided PD", "stochastic", 4, "teacher DDIM", 16, "fails"),
      ("matches single-w", "0", "guided PD", "stochastic", 4, "single-w (w=0)", 4, "holds"),
      ("S beats D", "0", "guided PD", "stochastic", 4, "guided PD", 4, "holds"),
      ("IS rises", "1 vs 0", "teacher DDIM", "ddim", 16, "teacher DDIM", 16, "holds (no interval)"),  # no IS interval
      ("IS rises", "1 vs 0", "stage one", "deterministic", 4, "stage one", 4, "holds (no interval)"),
  ]
  text = report.markdown_report(rows, title="t", claims=claims)
  assert "## The papers' claims on this run" in text
  assert "| stage one matches | 0 | stage one D, 4 steps: 3.1 (2.9–3.3) | teacher DDIM, 4 steps: 3 (2.8–3.2) |" in text
  assert "claims" not in report.markdown_report(rows, title="t")


def test_claim_definitions_are_checked():
  from distill.contract import Claim, Side
  with pytest.raises(ValueError, match="steps"):
    Side("x", steps=0)
  with pytest.raises(ValueError, match="Side.w"):
    Side("x", w="middle")
  with pytest.raises(ValueError, match="quantity"):
    Claim("c", Side("a", steps=1), Side("b"), quantity="kid")
  with pytest.raises(ValueError, match="fixed"):
    Claim("c", Side("a"), Side("b"))


def test_every_registered_claim_is_well_formed_and_reads_rows():
  from distill import registry
  claims = registry.claims()
  assert any(c.quantity == "is" for c in claims) and len(claims) >= 8
  rows = [row("teacher DDIM", "ddim", w, n, 5.0 - w) for w in (0.0, 1.0) for n in (4, 16, 64)]
  rows += [row("guided PD", s, w, n, 5.5 - w) for s in ("deterministic", "stochastic") for w in (0.0, 1.0)
           for n in (1, 2, 4, 8, 16)]
  rows += [row("stage one", "deterministic", w, 64, 5.0 - w) for w in (0.0, 1.0)]
  rows += [row("two-student", "deterministic", w, n, 6.0) for w in (0.0, 1.0) for n in (1, 2)]
  texts = {c["claim"] for c in report.check_claims(rows, claims)}
  assert {c.text for c in claims if c.quantity == "fid" and "single-w" not in c.text} <= texts
