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
# Every number to 3 significant figures: FIDs on small sets span 0.01 to 100, and two decimals hid the gaps.
_TABLES = (("fid", "FID", ".3g", "lower is better"), ("is", "IS", ".3g", "higher is better"),
           ("precision", "precision", ".3g", "higher is better"), ("recall", "recall", ".3g", "higher is better"),
           ("density", "density", ".3g", "about 1 for the data's own distribution"),
           ("coverage", "coverage", ".3g", "higher is better"),
           ("text_score", "text-image score", ".3g", "higher is better; 100·cos of the run's text and image towers"),
           ("clip_score", "CLIP score", ".3g", "higher is better; 100·max(cos, 0) of eval.clip_path's CLIP towers"))
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
    line = [_format_w(w), f"{ref['method']}, {_steps(ref['steps'])}", _cell(ref, "fid", ".3g"), str(ref["nfe"])]
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


def _better(a: float, b: float, quantity: str) -> bool:
  return a < b if quantity == "fid" else a > b


def _interval(row: Row, key: str):
  ci = row.get(f"{key}_ci")
  if ci and len(ci) == 2 and all(c is not None and math.isfinite(c) for c in ci):
    return float(ci[0]), float(ci[1])
  return None


def claim_verdict(a: Row, b: Row, quantity: str, relation: str) -> str:
  """'holds', 'fails' or 'within noise' for "a is as good as b" (relation 'match') or "a beats b" ('better').

  Two rows cannot be told apart when both have 95 % intervals and they overlap: a match then holds (within
  noise), a 'better' claim is within noise. Without intervals the point values decide, and the verdict says so.
  """
  va, vb = _value(a, quantity), _value(b, quantity)
  ia, ib = _interval(a, quantity), _interval(b, quantity)
  if ia and ib and ia[0] <= ib[1] and ib[0] <= ia[1]:
    return "holds (within noise)" if relation == "match" else "within noise"
  verdict = "holds" if _better(va, vb, quantity) else "fails"
  return verdict if ia and ib else f"{verdict} (no interval)"


def _methods_like(rows: Sequence[Row], pattern: str) -> list[str]:
  import fnmatch
  return [m for m in _ordered_methods(rows) if fnmatch.fnmatchcase(m, pattern)]


def _side_w(rows: Sequence[Row], method: str, side, w):
  """The w a side reads: the comparison's w, or the method's lowest / highest."""
  if side.w == "same":
    return w
  ws = sorted({_w(r) for r in rows if r["method"] == method})
  return (ws[0] if side.w == "lowest" else ws[-1]) if ws else None


def _pick(rows: Sequence[Row], side, method: str, w: float, steps, quantity: str, sampler: str | None = None):
  """The row a side reads (the best in `quantity` among its samplers), or None."""
  own = [r for r in rows if r["method"] == method and _w(r) == w and _value(r, quantity) is not None
         and math.isfinite(_value(r, quantity)) and (not side.samplers or r["sampler"] in side.samplers)]
  if sampler is not None and any(r["sampler"] == sampler for r in own):
    own = [r for r in own if r["sampler"] == sampler]
  if steps == "most":
    steps = max((r["steps"] for r in own), default=None)
  own = [r for r in own if r["steps"] == steps]
  if not own:
    return None
  sign = 1 if quantity == "fid" else -1
  return min(own, key=lambda r: sign * _value(r, quantity))


def _describe(row: Row, quantity: str) -> str:
  sampler = _SAMPLER_SHORT[row["sampler"]]
  label = row["method"] if row["method"].endswith(sampler) else f"{row['method']} {sampler}"
  return f"{label}, {_steps(row['steps'])}: {_cell(row, quantity, '.3g')}"


def check_claims(rows: Iterable[Row], claims: Sequence) -> list[dict]:
  """Each claim (`distill.contract.Claim`) on every w (or, for a claim across w, every method) where the run has
  both of its rows: {claim, w, a, b (the two rows), verdict (`claim_verdict`), source}."""
  rows, _ = _validate(rows)
  out = []
  for claim in claims:
    a_side, b_side = claim.a, claim.b
    for ma in _methods_like(rows, a_side.method):
      for mb in ([ma] if b_side.method == a_side.method else _methods_like(rows, b_side.method)):
        ws = sorted({_w(r) for r in rows if r["method"] == ma} & {_w(r) for r in rows if r["method"] == mb})
        for w in (ws if a_side.w == "same" else [None]):
          wa, wb = _side_w(rows, ma, a_side, w), _side_w(rows, mb, b_side, w)
          if wa is None or wb is None or (w is None and wa == wb):
            continue
          if a_side.steps == "same":  # b's steps are fixed (Claim checks one side is)
            b = _pick(rows, b_side, mb, wb, b_side.steps, claim.quantity)
            a = b and _pick(rows, a_side, ma, wa, b["steps"], claim.quantity)
          else:
            a = _pick(rows, a_side, ma, wa, a_side.steps, claim.quantity)
            b = a and _pick(rows, b_side, mb, wb, a["steps"] if b_side.steps == "same" else b_side.steps,
                            claim.quantity, sampler=a["sampler"] if ma == mb else None)
          if a and b:
            out.append({"claim": claim.text, "w": _format_w(w) if w is not None else
                        f"{_format_w(wa)} vs {_format_w(wb)}", "quantity": claim.quantity, "a": dict(a),
                        "b": dict(b), "verdict": claim_verdict(a, b, claim.quantity, claim.relation),
                        "source": claim.source})
  return out


def claims_table(rows: Iterable[Row], claims: Sequence) -> list[str]:
  """Markdown lines of `check_claims`: claim, w, the two rows with value (interval), verdict, source; [] when no
  claim has its rows."""
  checked = check_claims(rows, claims)
  if not checked:
    return []
  body = [[c["claim"], c["w"], _describe(c["a"], c["quantity"]), _describe(c["b"], c["quantity"]), c["verdict"],
           c["source"] or MISSING] for c in checked]
  return _markdown_table(["claim", "w", "A", "B", "verdict", "source"], body)


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
      line.append(f"{best['fid']:.3g} (w = {_format_w(_w(best))}, {_steps(best['steps'])}, "
                  f"{_SAMPLER_SHORT[best['sampler']]})")
    else:
      line.append(MISSING)
    body.append(line)
  header = ["method", "student updates", "teacher evaluations", "student evaluations", "wall-clock",
            f"best {metric_label(metric)}"]
  return _markdown_table(header, body)


def markdown_report(rows: Iterable[Row], *, title: str, notes: Sequence[str] = (), claims: Sequence = ()) -> str:
  """The whole report as markdown: title, notes, one Table 2 block per metric present (FID,
  then IS, precision, recall, density, coverage), the speed-up summary, the paper's claims checked on these rows
  (`claims_table`, when any claim has its rows), and the cost table when any row has cost fields."""
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
      label = name if key in ("text_score", "clip_score") else metric_label(metric, name)
      lines += [f"## {label} ({direction})", ""] + metric_table(rows, key) + [""]
  lines += [f"## Speed-up: fewest NFE reaching the teacher's {metric_label(metric)}", ""]
  if any(r.get("fid_ci") for r in rows):
    lines += ["A row reaches the reference when its FID is at most the reference's or their 95 % bootstrap "
              "intervals overlap (cells of the tables above: value (interval)).", ""]
  if any(_is_teacher(r) for r in rows):
    lines += speedup_table(rows) + [""]
  else:
    lines += ["No teacher rows (method \"teacher ...\"): no reference.", ""]
  checked = claims_table(rows, claims) if claims else []
  if checked:
    lines += ["## The papers' claims on this run", "",
              "A is claimed to match (or beat) B. With 95 % bootstrap intervals on both, overlapping intervals "
              "cannot be told apart: a match then holds within noise, a claimed win is within noise.", ""]
    lines += checked + [""]
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


_MARKERS = "osD^vP*X<>hp"


def _colors(methods: Sequence[str]) -> dict[str, Any]:
  from matplotlib import colormaps
  cmap, n = (colormaps["tab10"], 10) if len(methods) <= 10 else (colormaps["tab20"], 20)
  return {m: cmap(i % n) for i, m in enumerate(methods)}


def _markers(methods: Sequence[str]) -> dict[str, str]:
  return {m: _MARKERS[i % len(_MARKERS)] for i, m in enumerate(methods)}


def plot_fid_vs_nfe(rows: Iterable[Row], path: str, *, panel_px: tuple[int, int] = (400, 350)) -> bool:
  """PNG at `path` (paper Fig. 2, with cost on the x axis): one panel per w, FID against NFE (network
  evaluations per sample: a guided teacher step costs 2) on a log2 axis, one line per (method, sampler).
  Solid: deterministic, dashed: stochastic, dotted: teachers; error bars: the 95 % intervals where rows have them.
  Size: (panel_px[0] · number of w + 200 for the legend, panel_px[1]) pixels. Returns True when written."""
  rows, metric = _validate(rows)
  rows = [r for r in rows if _value(r, "fid") is not None and math.isfinite(r["fid"])]
  if not rows:
    return False
  ws = sorted({_w(r) for r in rows})
  nfes = sorted({r["nfe"] for r in rows})  # one x axis for every panel
  methods = _ordered_methods(rows)
  colors, markers = _colors(methods), _markers(methods)
  fig = _new_figure(panel_px[0] * len(ws) + 200, panel_px[1])
  axes = fig.subplots(1, len(ws), squeeze=False, sharey=True)[0]
  for ax, w in zip(axes, ws):
    for method in methods:
      for sampler in _SAMPLERS:
        line = sorted((r["nfe"], r["fid"], _interval(r, "fid")) for r in rows
                      if r["method"] == method and r["sampler"] == sampler and _w(r) == w)
        if not line:
          continue
        x, y, ci = zip(*line)
        err = None
        if all(ci):
          err = [[max(v - c[0], 0.0) for v, c in zip(y, ci)], [max(c[1] - v, 0.0) for v, c in zip(y, ci)]]
        ax.errorbar(x, y, yerr=err, fmt=_line_style(method, sampler), marker=markers[method], markersize=3,
                    capsize=2, elinewidth=0.6, color=colors[method], label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(nfes, [str(n) for n in nfes], fontsize=7)
    ax.minorticks_off()
    ax.set_title(f"w = {_format_w(w)}")
    ax.set_xlabel("NFE per sample")
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
  """One entry per method (colour and marker), then one per line style used (the sampler)."""
  from matplotlib.lines import Line2D
  labels, styles = {}, set()
  for ax in axes:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      labels.setdefault(label, handle)
    styles |= {line.get_linestyle() for line in ax.get_lines()}
  keys = (("-", "deterministic"), ("--", "stochastic"), (":", "teacher"))
  extra = {name: Line2D([], [], color="gray", linestyle=ls) for ls, name in keys if ls in styles}
  fig.legend(list(labels.values()) + list(extra.values()), list(labels) + list(extra),
             loc="outside right upper", fontsize=7)


def tradeoff_steps(rows: Sequence[Row], max_panels: int = 4) -> list[int]:
  """The step counts the trade-off plot shows: those with the most (method, sampler) curves of at least two w,
  at most `max_panels`, ascending."""
  curves: dict[int, set] = {}
  for r in rows:
    if sum(1 for q in rows if (q["method"], q["sampler"], q["steps"]) == (r["method"], r["sampler"], r["steps"])) > 1:
      curves.setdefault(r["steps"], set()).add((r["method"], r["sampler"]))
  ranked = sorted(curves, key=lambda n: (-len(curves[n]), n))[:max_panels]
  return sorted(ranked)


def plot_fid_is_tradeoff(rows: Iterable[Row], path: str, *, panel_px: tuple[int, int] = (420, 380),
                         max_panels: int = 4) -> bool:
  """PNG at `path` (paper Fig. 6/9): the FID–IS trade-off guidance buys. One panel per step count
  (`tradeoff_steps`); in each, one curve per (method, sampler) through its w values in increasing order, an
  arrow at the end pointing the way w grows and the lowest and highest w written at the ends. Teachers (at their
  most steps) appear in every panel as the reference. Colour: method; line style: sampler. Returns False,
  writing nothing, when no curve has two w values with FID and IS."""
  rows, metric = _validate(rows)
  rows = [r for r in rows if _value(r, "fid") is not None and _value(r, "is") is not None
          and math.isfinite(r["fid"]) and math.isfinite(r["is"])]
  students = [r for r in rows if not _is_teacher(r)]
  panels = tradeoff_steps(students, max_panels) or tradeoff_steps(rows, max_panels)
  if not panels:
    return False
  teacher_curves = []
  for method in _ordered_methods([r for r in rows if _is_teacher(r)]):
    for sampler in _SAMPLERS:
      own = [r for r in rows if r["method"] == method and r["sampler"] == sampler]
      if own:
        most = max(r["steps"] for r in own)
        teacher_curves.append((method, sampler, [r for r in own if r["steps"] == most]))
  methods = _ordered_methods(rows)
  colors, markers = _colors(methods), _markers(methods)
  fig = _new_figure(panel_px[0] * len(panels) + 220, panel_px[1])
  axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
  for ax, steps in zip(axes, panels):
    curves = [(m, s, [r for r in students if (r["method"], r["sampler"], r["steps"]) == (m, s, steps)])
              for m in _ordered_methods(students) for s in _SAMPLERS]
    for method, sampler, own in curves + teacher_curves:
      points = sorted((_w(r), r["is"], r["fid"]) for r in own)
      if len(points) < 2:
        continue
      _, x, y = zip(*points)
      ax.plot(x, y, _line_style(method, sampler), marker=markers[method], markersize=3, color=colors[method],
              label=method)
      ax.annotate("", xy=(x[-1], y[-1]), xytext=(x[-2], y[-2]),
                  arrowprops=dict(arrowstyle="-|>", color=colors[method], lw=1.2))
      ax.annotate(f"w={_format_w(points[0][0])}", (x[0], y[0]), fontsize=6, xytext=(-4, -9),
                  textcoords="offset points", color=colors[method])
      ax.annotate(f"w={_format_w(points[-1][0])}", (x[-1], y[-1]), fontsize=6, xytext=(3, 3),
                  textcoords="offset points", color=colors[method])
    ax.set_title(f"students at {_steps(steps)} (teachers: most steps)", fontsize=9)
    ax.set_xlabel(metric_label(metric, "IS") + "  (w grows along the arrows)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(metric_label(metric))
  _legend(fig, axes)
  _save_png(fig, path)
  return True
