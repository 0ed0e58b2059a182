"""Result rows -> the paper-shaped report: Table 2-style markdown, FID-vs-steps and FID-vs-IS plots.

A row is one evaluated cell, a dict with keys
  method: str ("guided PD", "stage one", "teacher DDIM", ...; teachers' names start with "teacher"),
  sampler: "deterministic" | "stochastic" | "ddim" | "ddpm",
  w: float, steps: int, nfe: int (network evaluations; a guided step costs 2),
  fid: float, is: float | None, precision: float | None, recall: float | None,
  num_samples: int, metric: "inception" | "classifier", seed: int, checkpoint: str,
and optional cost fields student_updates, teacher_evals, student_evals (network evaluations during
training, per example, summed over batches), train_seconds.

All rows of a report share one metric: an Inception FID and a classifier-FID are different
numbers, so mixing them raises. matplotlib is imported inside the plot functions only.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

Row = Mapping[str, Any]

MISSING = "—"
_SAMPLERS = ("deterministic", "stochastic", "ddim", "ddpm")
_SAMPLER_SHORT = {"deterministic": "D", "stochastic": "S", "ddim": "DDIM", "ddpm": "DDPM"}
_DETERMINISTIC = ("deterministic", "ddim")
_STOCHASTIC = ("stochastic", "ddpm")
_METRICS = ("inception", "classifier")
_REQUIRED = ("method", "sampler", "w", "steps", "nfe", "fid", "num_samples", "metric")
# (row key, header name, number format, direction) in table order.
_TABLES = (("fid", "FID", ".2f", "lower is better"), ("is", "IS", ".2f", "higher is better"),
           ("precision", "precision", ".3f", "higher is better"), ("recall", "recall", ".3f", "higher is better"),
           ("density", "density", ".3f", "about 1 for the data's own distribution"),
           ("coverage", "coverage", ".3f", "higher is better"))
_COST_KEYS = ("student_updates", "teacher_evals", "student_evals", "train_seconds")


def metric_label(metric: str, quantity: str = "FID") -> str:
  """"FID" / "IS" / ... for Inception features; "classifier-FID" / "classifier-IS" / ... otherwise."""
  if metric not in _METRICS:
    raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
  return quantity if metric == "inception" else f"classifier-{quantity}"


def _validate(rows: Iterable[Row]) -> tuple[list[Row], str]:
  """The rows as a list and their one shared metric; raises on empty, malformed, duplicate or mixed rows."""
  rows = list(rows)
  if not rows:
    raise ValueError("no rows to report")
  seen = set()
  for row in rows:
    missing = [key for key in _REQUIRED if key not in row]
    if missing:
      raise ValueError(f"row {dict(row)} lacks {missing}")
    if row["sampler"] not in _SAMPLERS:
      raise ValueError(f"sampler must be one of {_SAMPLERS}, got {row['sampler']!r}")
    key = (row["method"], row["sampler"], _w(row), row["steps"])
    if key in seen:
      raise ValueError(f"two rows for method, sampler, w, steps = {key}: keep one per cell")
    seen.add(key)
  metrics = sorted({row["metric"] for row in rows})
  if len(metrics) > 1:
    raise ValueError(f"rows mix metrics {metrics}: an Inception FID and a classifier-FID are not comparable; "
                     "report them separately")
  metric_label(metrics[0])
  return rows, metrics[0]


def _w(row: Row) -> float:
  return round(float(row["w"]), 6)  # 0.30000000000000004 and 0.3 are one column


def _format_w(w: float) -> str:
  return f"{w:g}"


def _value(row: Row | None, key: str) -> float | None:
  if row is None:
    return None
  value = row.get(key)
  return None if value is None else float(value)


def _steps(n: int) -> str:
  return f"{n} step" if n == 1 else f"{n} steps"


def _format(value: float | None, fmt: str) -> str:
  return MISSING if value is None else format(value, fmt)


def _cell(row: Row | None, key: str, fmt: str) -> str:
  """A row's value; with its bootstrap interval (`<key>_ci`) as "v (lo–hi)" to 3 significant figures."""
  value = _value(row, key)
  if value is None:
    return MISSING
  ci = row.get(f"{key}_ci")
  if not ci or ci[0] is None or not all(math.isfinite(c) for c in ci):
    return format(value, fmt)
  return f"{value:.3g} ({ci[0]:.3g}–{ci[1]:.3g})"


def _ordered_methods(rows: Sequence[Row]) -> list[str]:
  return list(dict.fromkeys(row["method"] for row in rows))


def _sampler_groups(rows: Sequence[Row], method: str) -> list[tuple[str, ...]]:
  """Samplers of one method as table rows: (deterministic, stochastic) side by side when it has one of each."""
  samplers = [s for s in _SAMPLERS if any(r["method"] == method and r["sampler"] == s for r in rows)]
  det = [s for s in samplers if s in _DETERMINISTIC]
  sto = [s for s in samplers if s in _STOCHASTIC]
  if len(det) == 1 and len(sto) == 1:
    return [(det[0], sto[0])]
  return [(s,) for s in samplers]


def _markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
  def line(cells):
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
  return [line(header), "|" + "|".join(" --- " for _ in header) + "|"] + [line(cells) for cells in body]


def metric_table(rows: Iterable[Row], key: str = "fid") -> list[str]:
  """Markdown lines of one Table 2 block: rows = method × steps (methods in order of first
  appearance, steps ascending), columns = w ascending, cells "D / S" where a method has both
  samplers. `key` is "fid", "is", "precision", "recall", "density" or "coverage"."""
  rows, _ = _validate(rows)
  formats = {k: fmt for k, _, fmt, _ in _TABLES}
  if key not in formats:
    raise ValueError(f"key must be one of {tuple(formats)}, got {key!r}")
  fmt = formats[key]
  ws = sorted({_w(r) for r in rows})
  cells = {(r["method"], r["sampler"], _w(r), r["steps"]): r for r in rows}
  body = []
  for method in _ordered_methods(rows):
    for group in _sampler_groups(rows, method):
      steps = sorted({r["steps"] for r in rows if r["method"] == method and r["sampler"] in group})
      for n in steps:
        line = [method, str(n), " / ".join(_SAMPLER_SHORT[s] for s in group)]
        for w in ws:
          found = [cells.get((method, s, w, n)) for s in group]
          line.append(MISSING if all(_value(r, key) is None for r in found) else
                      " / ".join(_cell(r, key, fmt) for r in found))
        body.append(line)
  header = ["method", "steps", "sampler"] + [f"w = {_format_w(w)}" for w in ws]
  return _markdown_table(header, body)


def _is_teacher(row: Row) -> bool:
  return row["method"].lower().startswith("teacher")


def _reached(row: Row, reference: Row) -> bool:
  """FID at most the reference's, or, when both have bootstrap intervals, intervals that overlap (the two
  cannot be told apart at this sample count)."""
  fid, ref = _value(row, "fid"), _value(reference, "fid")
  if fid is None or not math.isfinite(fid):
    return False
  if fid <= ref:
    return True
  ci, ref_ci = row.get("fid_ci"), reference.get("fid_ci")
  return bool(ci and ref_ci and ci[0] is not None and ref_ci[1] is not None and ci[0] <= ref_ci[1])


def speedup_table(rows: Iterable[Row]) -> list[str]:
  """Markdown lines: per w, the teacher reference (the teacher row with the most steps; lower FID
  on a tie) and, per method, the fewest NFE at which it reaches an FID <= the reference, as
  "NFE (sampler, speed-up×)", or "not reached"."""
  rows, metric = _validate(rows)
  methods = _ordered_methods(rows)
  body = []
  for w in sorted({_w(r) for r in rows}):
    at_w = [r for r in rows if _w(r) == w]
    teachers = [r for r in at_w if _is_teacher(r) and _value(r, "fid") is not None]
    if not teachers:
      body.append([_format_w(w), MISSING, MISSING, MISSING] + [MISSING] * len(methods))
      continue
    ref = min(teachers, key=lambda r: (-r["steps"], r["fid"]))
    line = [_format_w(w), f"{ref['method']}, {_steps(ref['steps'])}", f"{ref['fid']:.2f}", str(ref["nfe"])]
    for method in methods:
      own = [r for r in at_w if r["method"] == method]
      hits = [r for r in own if _reached(r, ref)]
      if not own:
        line.append(MISSING)
      elif not hits:
        line.append("not reached")
      else:
        best = min(hits, key=lambda r: (r["nfe"], r["fid"]))
        line.append(f"{best['nfe']} ({_SAMPLER_SHORT[best['sampler']]}, {ref['nfe'] / best['nfe']:.3g}×)")
    body.append(line)
  fid = metric_label(metric)
  header = ["w", "teacher reference", f"reference {fid}", "reference NFE"] + methods
  return _markdown_table(header, body)


def _format_seconds(seconds: float) -> str:
  if seconds < 60:
    return f"{seconds:.0f} s"
  if seconds < 3600:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def cost_table(rows: Iterable[Row]) -> list[str]:
  """Markdown lines: per method, the largest cost over its rows (a later round's checkpoint
  includes the earlier rounds' training) and its best FID with where it was reached."""
  rows, metric = _validate(rows)
  body = []
  for method in _ordered_methods(rows):
    own = [r for r in rows if r["method"] == method]
    line = [method]
    for key in _COST_KEYS:
      values = [_value(r, key) for r in own if _value(r, key) is not None]
      if not values:
        line.append(MISSING)
      elif key == "train_seconds":
        line.append(_format_seconds(max(values)))
      else:
        line.append(f"{int(max(values)):,}")
    scored = [r for r in own if _value(r, "fid") is not None and math.isfinite(r["fid"])]
    if scored:
      best = min(scored, key=lambda r: r["fid"])
      line.append(f"{best['fid']:.2f} (w = {_format_w(_w(best))}, {_steps(best['steps'])}, "
                  f"{_SAMPLER_SHORT[best['sampler']]})")
    else:
      line.append(MISSING)
    body.append(line)
  header = ["method", "student updates", "teacher evaluations", "student evaluations", "wall-clock",
            f"best {metric_label(metric)}"]
  return _markdown_table(header, body)


def markdown_report(rows: Iterable[Row], *, title: str, notes: Sequence[str] = ()) -> str:
  """The whole report as markdown: title, notes, one Table 2 block per metric present (FID,
  then IS, precision, recall, density, coverage), the speed-up summary, and the cost table when any row has cost fields."""
  rows, metric = _validate(rows)
  counts = sorted({int(r["num_samples"]) for r in rows})
  samples = f"{counts[0]:,}" if len(counts) == 1 else (
      f"{counts[0]:,} to {counts[-1]:,} (varies; FID is biased by the sample count)")
  lines = [f"# {title}", ""]
  lines += [f"- {note}" for note in notes]
  lines += [f"- Metric: {metric_label(metric)} ({'Inception' if metric == 'inception' else 'data set classifier'} "
            f"features), {samples} samples per cell.",
            "- D / S: deterministic / stochastic sampler; NFE counts 2 network evaluations per guided step.", ""]
  for key, name, _, direction in _TABLES:
    if any(_value(r, key) is not None for r in rows):
      lines += [f"## {metric_label(metric, name)} ({direction})", ""] + metric_table(rows, key) + [""]
  lines += [f"## Speed-up: fewest NFE reaching the teacher's {metric_label(metric)}", ""]
  if any(r.get("fid_ci") for r in rows):
    lines += ["A row reaches the reference when its FID is at most the reference's or their 95 % bootstrap "
              "intervals overlap (cells of the tables above: value (interval)).", ""]
  if any(_is_teacher(r) for r in rows):
    lines += speedup_table(rows) + [""]
  else:
    lines += ["No teacher rows (method \"teacher ...\"): no reference.", ""]
  if any(_value(r, key) is not None for r in rows for key in _COST_KEYS):
    lines += ["## Training cost", ""] + cost_table(rows) + [""]
  return "\n".join(lines)


def _line_style(method: str, sampler: str) -> str:
  if method.lower().startswith("teacher"):
    return ":"
  return "--" if sampler in _STOCHASTIC else "-"


def _new_figure(width_px: int, height_px: int):
  # A bare Figure on an Agg canvas: no pyplot, no global backend switch, safe in any process.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width_px / 100, height_px / 100), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _colors(methods: Sequence[str]) -> dict[str, Any]:
  from matplotlib import colormaps
  cmap = colormaps["tab10"]
  return {m: cmap(i % 10) for i, m in enumerate(methods)}


def plot_fid_vs_steps(rows: Iterable[Row], path: str, *, panel_px: tuple[int, int] = (400, 350)) -> bool:
  """PNG at `path` (paper Fig. 2): one panel per w, FID against steps on a log2 axis, one line
  per (method, sampler). Solid: deterministic, dashed: stochastic, dotted: teachers. Size:
  (panel_px[0] · number of w + 200 for the legend, panel_px[1]) pixels. Returns True when written."""
  rows, metric = _validate(rows)
  rows = [r for r in rows if _value(r, "fid") is not None]
  if not rows:
    return False
  ws = sorted({_w(r) for r in rows})
  steps = sorted({r["steps"] for r in rows})  # one x axis for every panel
  methods = _ordered_methods(rows)
  colors = _colors(methods)
  fig = _new_figure(panel_px[0] * len(ws) + 200, panel_px[1])
  axes = fig.subplots(1, len(ws), squeeze=False)[0]
  for ax, w in zip(axes, ws):
    for method in methods:
      for sampler in _SAMPLERS:
        line = sorted((r["steps"], r["fid"]) for r in rows
                      if r["method"] == method and r["sampler"] == sampler and _w(r) == w)
        if line:
          ax.plot(*zip(*line), _line_style(method, sampler), marker="o", markersize=3, color=colors[method],
                  label=f"{method} ({_SAMPLER_SHORT[sampler]})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.minorticks_off()
    ax.set_title(f"w = {_format_w(w)}")
    ax.set_xlabel("sampling steps")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(metric_label(metric))
  _legend(fig, axes)
  _save_png(fig, path)
  return True


def _save_png(fig, path: str) -> None:
  """The figure as a PNG at `path` (local or a URL), written atomically."""
  import io
  from distill import writers
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  writers.atomic_write_bytes(path, buffer.getvalue())


def _legend(fig, axes) -> None:
  labels = {}
  for ax in axes:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      labels.setdefault(label, handle)
  fig.legend(labels.values(), labels.keys(), loc="outside right upper", fontsize=7)


def plot_fid_is_tradeoff(rows: Iterable[Row], path: str, *, size_px: tuple[int, int] = (700, 450)) -> bool:
  """PNG at `path` (paper Fig. 9): FID against IS across w, one line per (method, sampler, steps),
  points in order of w (w labels on the points when there are at most 6 lines). Returns False,
  writing nothing, when no row has both FID and IS."""
  rows, metric = _validate(rows)
  rows = [r for r in rows if _value(r, "fid") is not None and _value(r, "is") is not None]
  if not rows:
    return False
  methods = _ordered_methods(rows)
  colors = _colors(methods)
  keys = list(dict.fromkeys((r["method"], r["sampler"], r["steps"]) for r in rows))
  # Colour: method; line style: sampler; marker: steps.
  markers = {n: "os^DvPX*"[i % 8] for i, n in enumerate(sorted({r["steps"] for r in rows}))}
  fig = _new_figure(*size_px)
  ax = fig.subplots()
  for method, sampler, steps in keys:
    points = sorted((_w(r), r["is"], r["fid"]) for r in rows
                    if (r["method"], r["sampler"], r["steps"]) == (method, sampler, steps))
    _, is_values, fid_values = zip(*points)
    ax.plot(is_values, fid_values, _line_style(method, sampler), markersize=4,
            marker=markers[steps], color=colors[method],
            label=f"{method} ({_SAMPLER_SHORT[sampler]}, {_steps(steps)})")
    if len(keys) <= 6:
      for w, x, y in points:
        ax.annotate(f"w={_format_w(w)}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
  ax.set_xlabel(metric_label(metric, "IS"))
  ax.set_ylabel(metric_label(metric))
  ax.grid(alpha=0.3)
  _legend(fig, [ax])
  _save_png(fig, path)
  return True
