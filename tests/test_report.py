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
| teacher DDIM | 16 | DDIM | 10.00 | — |
| teacher DDIM | 64 | DDIM | 8.00 | 6.50 |
| guided PD | 2 | D / S | 12.35 / 7.90 | 9.00 / — |
| guided PD | 8 | D / S | — / 5.00 | 6.50 / — |
| single-w | 4 | D | — | 30.00 |

## Speed-up: fewest NFE reaching the teacher's classifier-FID

| w | teacher reference | reference classifier-FID | reference NFE | teacher DDIM | guided PD | single-w |
| --- | --- | --- | --- | --- | --- | --- |
| 0 | teacher DDIM, 64 steps | 8.00 | 128 | 128 (DDIM, 1×) | 4 (S, 32×) | — |
| 1 | teacher DDIM, 64 steps | 6.50 | 128 | 128 (DDIM, 1×) | 16 (D, 8×) | not reached |
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
  assert w0["reference classifier-FID"] == "8.00" and w0["guided PD"] == "4 (S, 32×)"
  assert w1["teacher reference"] == "teacher DDPM, 64 steps" and w1["reference classifier-FID"] == "6.00"
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
  assert "| guided PD | 1 | D / S | 51.20 / — |" in text
  assert "| guided PD | 1 | D / S | 0.610 / 0.650 |" in text
  assert "| teacher DDIM | 256 | DDIM | — |" in text  # no IS for the teacher
  assert "| 0.3 | teacher DDIM, 256 steps | 2.50 | 512 | not reached | 512 (DDIM, 1×) |" in text
  assert "Training cost" not in text


def test_cost_table(rows):
  rows[3].update(student_updates=1000, teacher_evals=256_000, train_seconds=90.0)
  rows[5].update(student_updates=4000, teacher_evals=1_024_000, student_evals=512_000, train_seconds=2 * 3600.0)
  text = report.markdown_report(rows, title="t")
  assert ("| method | student updates | teacher evaluations | student evaluations | wall-clock | "
          "best classifier-FID |") in text
  assert "| guided PD | 4,000 | 1,024,000 | 512,000 | 2.0 h | 5.00 (w = 0, 8 steps, S) |" in text
  assert "| single-w | — | — | — | — | 30.00 (w = 1, 4 steps, D) |" in text


def test_mixing_metrics_and_malformed_rows_raise(rows):
  with pytest.raises(ValueError, match="mix metrics"):
    report.markdown_report(rows + [row("guided PD", "deterministic", 4.0, 1, 3.0, metric="inception")], title="t")
  with pytest.raises(ValueError, match="mix metrics"):
    report.plot_fid_vs_steps(rows + [row("x", "ddim", 0.0, 1, 3.0, metric="inception")], "/dev/null")
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
  steps_png = tmp_path / "fid_vs_steps.png"
  assert report.plot_fid_vs_steps(rows, str(steps_png)) is True
  assert png_size(steps_png) == (2 * 400 + 200, 350)  # two w panels and the legend

  tradeoff_png = tmp_path / "fid_is.png"
  assert report.plot_fid_is_tradeoff(rows, str(tradeoff_png)) is False  # no IS in these rows
  assert not tradeoff_png.exists()
  for r, value in zip(rows, [9.0, 9.5, 11.0, 7.0, 8.5, 9.2, 10.1, 10.9, 4.0]):
    r["is"] = value
  assert report.plot_fid_is_tradeoff(rows, str(tradeoff_png)) is True
  assert png_size(tradeoff_png) == (700, 450)


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
