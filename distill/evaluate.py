"""The evaluate stage (every model a run trained, side by side) and the standalone evaluation of one
checkpoint or one file of samples.

    WORKDIR/results.json        one row per (method, sampler, w, steps): nfe, fid, is, precision, recall, ...
    WORKDIR/report.md           the paper's Table 2 layout, speed-up and cost summaries (`evaluation/report.py`)
    WORKDIR/fid_vs_nfe.png      FID against NFE per w (paper Fig. 2); fid_vs_is.png: the trade-off over w (Fig. 6/9)
    WORKDIR/eval_grids/         the first samples of every row, rows = classes
    WORKDIR/eval_reference/     cached reference statistics of the training split
    WORKDIR/eval_cache/         one file of scores per row, keyed by what determines them (`row_key`): adding a
                                stage to a run scores only its rows

Every row uses the same noise and labels (`eval.per_class` per class, seed `seed + 2000`), so rows differ
only by the model and sampler. With `eval.seeds` = S > 1 every row is also scored under seeds seed + 2000 + i,
i < S, and reports the mean over seeds with the t-interval over seeds (`protocol.combine_seeds`). The protocol (features, quantisation, splits) is in `evaluation/protocol.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from distill import contract, registry, sampling, train, writers
from distill.context import (Context, cfg_sample, class_captions, get_classifier, sample_images, teacher_dir,
                             teacher_model, teacher_params)
from distill.evaluation import classifier as classifier_lib
from distill.evaluation import inception, metrics, protocol, report

class EvaluationError(ValueError):
  """Bad evaluation input (a missing weight file, an unreadable samples file): one line, exit code 2."""


def feature_net(ctx: Context) -> protocol.FeatureNet:
  c = ctx.config
  if protocol.resolve_metric(c) == "inception":
    path = os.path.expanduser(c.eval.inception_path)
    try:
      return protocol.inception_net(inception.load_inception(path))
    except inception.InceptionWeightsMissing as e:  # names the path
      raise EvaluationError(f"eval.inception_path: {e}") from e
    except ValueError as e:  # not an .npz, or other arrays: as distill.main's check before a run says it
      raise EvaluationError(f"eval.inception_path={path!r}: not the FID Inception's weights ({e}); convert them "
                            "with `python -m distill.evaluation.convert_inception`") from e
  params, meta = get_classifier(ctx)
  return protocol.classifier_net(params, c.data.num_classes, meta["test_accuracy"])


def reference(ctx: Context, net: protocol.FeatureNet) -> protocol.Reference:
  c = ctx.config
  source = ctx.pixel_source("train")
  n = min(len(source), c.eval.max_reference)
  path = os.path.join(ctx.workdir, "eval_reference", f"{c.data.name}_{c.data.image_size}_{net.metric}_{n}.npz")
  chunk = 1000
  ref = protocol.reference_stats(
      net, lambda: (source.get_batch(np.arange(i, min(i + chunk, n)))["image"] for i in range(0, n, chunk)), path)
  if not c.eval.reference_stats:
    return ref
  # FID against the published statistics; precision/recall and density/coverage still need reference features,
  # which come from the training split as before.
  try:
    mu, sigma = protocol.load_reference_stats(os.path.expanduser(c.eval.reference_stats), ref.mu.shape[0])
  except ValueError as e:
    raise EvaluationError(f"eval.reference_stats: {e}") from e
  return dataclasses.replace(ref, mu=mu, sigma=sigma, stats_source=c.eval.reference_stats)


def stamps(stages) -> dict:
  """{name: a short hash of its final/meta.json} of finished stages [(name, stage_dir)]: the record holds the
  training time, so a stage trained again under the same name gets another stamp and results.json no longer
  covers it (its rows are then found or scored by the parameters' fingerprint, `row_key`)."""
  import hashlib
  return {name: hashlib.sha256(epath.Path(d, "final", "meta.json").read_bytes()).hexdigest()[:16]
          for name, d in stages}


def finished_students(workdir: str):
  """(name, stage_dir) of every finished stage (a directory holding final/meta.json) under the directories of the
  registered stages in the workdir, local or a URL: in pipeline-stage order and, within a stage, in order of the
  directory path. Whether one is scored is its meta's to say (`StageMeta.scored`)."""
  out = []
  for top in registry.stage_names():
    root = os.path.join(workdir, top)
    if top == registry.EVALUATE or not epath.Path(root).is_dir():
      continue
    # One listing of the tree. An object store's walk may name directories without the URL's scheme, so each
    # is taken relative to the first one walked (the root itself), whatever form the walk gives them in.
    walked = [(os.fspath(d), dirs, files) for d, dirs, files in epath.Path(root).walk()]
    listing = {os.path.relpath(d, walked[0][0]): (dirs, files) for d, dirs, files in walked}
    names = []
    for rel, (dirs, _) in listing.items():
      if "final" in dirs and "meta.json" in listing.get(os.path.normpath(os.path.join(rel, "final")), ((), ()))[1]:
        names.append(top if rel == "." else f"{top}/{rel}")
    for name in sorted(names, key=lambda n: os.path.join(workdir, n)):
      out.append((name, os.path.join(workdir, name)))
  return out


def load_students(workdir: str) -> dict[str, tuple]:
  """{name: (params, StageMeta, the trainer's meta dict)} of every finished stage in the workdir, scored or not.
  contract.ContractError (one line, naming the file and the conversion command) for a stage written before
  the contract."""
  out = {}
  for name, stage_dir in finished_students(workdir):
    params, raw = train.load_final_params(stage_dir)
    out[name] = (params, registry.load_meta(stage_dir, raw), raw)
  return out


def chain_costs(metas: dict[str, contract.StageMeta], trained: dict[str, dict]) -> dict[str, dict]:
  """Distillation cost of each student including every stage it was built on (its meta's cost_parents, and
  theirs), excluding the teacher's own training. trained: {name: the trainer's meta keys (num_steps,
  train_seconds)}.
  Returns {name: {student_updates, teacher_evals, student_evals, train_seconds}} (evaluations are per-example
  network evaluations summed over the batch)."""
  own = {}
  for name, m in metas.items():
    updates = int(trained[name].get("num_steps", 0))
    examples = updates * int(m.batch_size)
    own[name] = {"student_updates": updates, "train_seconds": float(trained[name].get("train_seconds", 0.0)),
                 "teacher_evals": int(round(examples * m.teacher_evals_per_update)),
                 "student_evals": int(round(examples * m.student_evals_per_update))}

  def members(name: str, seen: frozenset = frozenset()) -> set[str]:
    if name in seen:
      raise ValueError(f"cost_parents of {name!r} form a cycle")
    out = {name}
    for parent in metas[name].cost_parents:
      if parent in metas:
        out |= members(parent, seen | {name})
    return out

  keys = ("student_updates", "teacher_evals", "student_evals", "train_seconds")
  return {name: {k: sum(own[o][k] for o in members(name)) for k in keys} for name in metas}


def _save_row_grid(path: str, x: np.ndarray, labels: np.ndarray, per_class: int, data_cfg, title: str):
  """A row's samples as a grid: one row per class (captioned), up to 10 samples each, under `title`."""
  cols, k = min(per_class, 10), min(data_cfg.num_classes, 10)
  rows = [x[np.flatnonzero(labels == c)[:cols]] for c in range(k)]
  writers.save_image_grid(path, np.concatenate(rows), ncols=cols, upscale=max(1, 64 // data_cfg.image_size),
                          row_labels=class_captions(data_cfg, k), title=title)


# Bumped whenever sampling or scoring changes what a row's numbers are, so cached rows of older code are not reused.
EVAL_CACHE_VERSION = 2  # 2: the CFG teacher skips its unconditional pass at w = 0


def row_key(c, fingerprint: str, sampler: str, w: float, steps: int, metric: str, reference_images: int,
            seed: int | None = None) -> str:
  """The cache key of one row's scores under one noise seed (default c.seed; eval.seeds > 1 scores seeds c.seed,
  c.seed + 1, …): the model's parameter fingerprint and its sampler, w and steps, and everything else the numbers
  depend on (noise seed and count, metric, reference, metric settings)."""
  import hashlib
  seed = c.seed if seed is None else seed
  fields = {"version": EVAL_CACHE_VERSION, "fingerprint": fingerprint, "sampler": sampler, "w": float(w),
            "steps": int(steps), "per_class": int(c.eval.per_class), "seed": int(seed), "metric": metric,
            "reference_images": int(reference_images), "data": c.data.name, "image_size": int(c.data.image_size),
            "is_splits": int(c.eval.is_splits), "pr_k": int(c.eval.pr_k), "dc_k": int(c.eval.dc_k),
            "clip": bool(c.sample.clip), "classes": int(c.data.num_classes),
            "reference_stats": c.eval.get("reference_stats", ""), "bootstrap": int(c.eval.get("bootstrap", 0))}
  for field in ("clip_path", "captions"):  # named only when set: rows cached without them keep their keys
    if c.eval.get(field):
      fields[field] = c.eval[field]
  if c.eval.get("captions"):
    fields["captions_sha256"] = hashlib.sha256(epath.Path(os.path.expanduser(c.eval.captions)).read_bytes()).hexdigest()
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def text_score(ctx: Context, images, prompts, bootstrap: int, seed: int) -> dict:
  """{'text_score': the mean over samples of 100·max(cos, 0) between each image and its prompt under the text
  encoder stage's two towers (the CLIP score's definition on the run's own encoder), 'text_score_ci': its 95 %
  bootstrap interval (B = bootstrap resamplings of the samples; none at 0)}. images [N, H, W, C] in [−1, 1];
  prompts int32 [N, L]."""
  s = np.asarray(ctx.text_encoder.score(np.asarray(images), np.asarray(prompts)), np.float64)
  out = {"text_score": float(s.mean())}
  if bootstrap:
    rng = np.random.default_rng(seed)
    reps = [s[rng.integers(0, len(s), len(s))].mean() for _ in range(bootstrap)]
    out["text_score_ci"] = list(metrics.normal_interval(out["text_score"], reps))
  return protocol.clip_intervals(out)


def read_captions(path: str) -> list[str]:
  """eval.captions: a UTF-8 text file, one caption per line; blank lines are skipped. EvaluationError (one line
  naming the file) when it cannot be read or holds no caption."""
  try:
    lines = epath.Path(os.path.expanduser(path)).read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise EvaluationError(f"eval.captions={path!r}: cannot be read as UTF-8 text ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160]})") from None
  captions = [line.strip() for line in lines if line.strip()]
  if not captions:
    raise EvaluationError(f"eval.captions={path!r}: holds no caption (one per line)")
  return captions


def clip_scorer(path: str):
  """The `clip_score.Scorer` of eval.clip_path; EvaluationError (one line naming the file) when the folder does
  not hold a CLIP model's weights, config and tokenizer."""
  from distill.evaluation import clip_score
  try:
    return clip_score.Scorer(os.path.expanduser(path))
  except (OSError, ImportError, ValueError) as e:
    raise EvaluationError(f"eval.clip_path={path!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
        from None


def row_captions(ctx: Context, labels) -> tuple[list[str] | None, np.ndarray | None]:
  """(caption strings [N], their prompt tokens int32 [N, L]) a text run's evaluation rows sample at, for labels
  [N]: eval.captions' lines cycled, tokenized by the run's text encoder, or the test split's captions
  (`Context.sample_captions`); (None, None) in other runs."""
  if not ctx.text:
    return None, None
  labels = np.asarray(labels)
  if ctx.config.eval.captions:
    file = read_captions(ctx.config.eval.captions)
    captions = [file[i % len(file)] for i in range(len(labels))]
    try:
      return captions, np.asarray(ctx.text_encoder.encode(captions), np.int32)
    except ValueError as e:  # a word the run's own tokenizer does not know
      raise EvaluationError(f"eval.captions={ctx.config.eval.captions!r}: the run's text encoder cannot tokenize "
                            f"it ({str(e).splitlines()[0][:200]})") from None
  return ctx.sample_captions(labels), ctx.sample_prompts(labels)


def run_stage(ctx: Context):
  """The pipeline's 'evaluate' stage: the CFG teacher (DDIM at the reference step count and at every student
  step count, DDPM at the reference) and every finished student, at each w of eval.w_values."""
  c = ctx.config
  e = c.eval
  students = [(n, d) for n, d in finished_students(ctx.workdir) if n != "teacher"]
  results_path = os.path.join(ctx.workdir, "results.json")
  evaluated = {"checkpoints": ["teacher"] + [name for name, _ in students],
               "stamps": stamps([("teacher", teacher_dir(ctx))] + students), "w_values": list(e.w_values),
               "per_class": e.per_class, "seed": c.seed, "metric": protocol.resolve_metric(c),
               "teacher_ddpm": e.teacher_ddpm, "reference_stats": e.reference_stats, "seeds": e.seeds,
               **{f: e[f] for f in ("clip_path", "captions") if e[f]}}
  if epath.Path(results_path).exists():
    if writers.read_json(results_path).get("evaluated") == evaluated:
      print(f"[evaluate] {results_path} already covers these checkpoints; delete it to evaluate again")
      return
  loaded = load_students(ctx.workdir)  # first: an unreadable checkpoint is named before the features are computed
  net = feature_net(ctx)
  ref = reference(ctx, net)
  k = c.data.num_classes
  labels = jnp.repeat(jnp.arange(k), e.per_class)
  captions, prompts = row_captions(ctx, labels)
  # Class agreement asks whether a sample shows its label's class: not a question for captions from a file.
  agreement_clf = get_classifier(ctx)[0] if c.data.name in protocol.EMBEDDED and not e.captions else None
  scorer = clip_scorer(e.clip_path) if e.clip_path else None

  costs = chain_costs({n: m for n, (_, m, _) in loaded.items()}, {n: raw for n, (_, _, raw) in loaded.items()})
  metas = {n: (p, m) for n, (p, m, _) in loaded.items() if m.scored}
  prints = {n: train.fingerprint(p) for n, (p, _) in metas.items()}
  teacher_fn = functools.partial(cfg_sample, teacher_params(ctx), model=teacher_model(ctx),
                                 parameterization=c.model.parameterization, logsnr_fn=ctx.logsnr_fn,
                                 null_label=ctx.null_label, clip=c.sample.clip)
  student_steps = sorted({n for _, m in metas.values() for n in m.steps_scored})
  jobs = []  # (method, sampler, w, steps, nfe, sample fn, checkpoint, cost, cache key)
  teacher_print = train.fingerprint(teacher_params(ctx))
  key = lambda fp, sampler, w, steps: row_key(c, fp, sampler, w, steps, net.metric, ref.num_images)
  teacher_steps = sorted(set(student_steps) | {c.sample.num_steps})
  ddpm_steps = teacher_steps if e.teacher_ddpm == "all" else [c.sample.num_steps]
  for w in e.w_values:
    for steps in teacher_steps:
      jobs.append(("teacher DDIM", "ddim", w, steps, 2 * steps, functools.partial(teacher_fn, num_steps=steps),
                   "teacher", {}, key(teacher_print, "cfg_ddim", w, steps)))
    for steps in ddpm_steps:
      jobs.append(("teacher DDPM", "ddpm", w, steps, 2 * steps,
                   functools.partial(teacher_fn, num_steps=steps, sampler="ddpm"), "teacher", {},
                   key(teacher_print, "cfg_ddpm", w, steps)))
    for name, (params, meta) in metas.items():
      if not meta.serves(w):
        continue  # a single-w student is scored at its own w only
      for steps in meta.steps_scored:
        fn, nfe = registry.sampler(ctx, params, meta, steps)
        jobs.append((meta.method, meta.report_sampler, w, steps, nfe, fn, name, costs[name],
                     key(prints[name], meta.sampler, w, steps)))

  grid_dir = os.path.join(ctx.workdir, "eval_grids")
  cache_dir = os.path.join(ctx.workdir, "eval_cache")
  for d in (grid_dir, cache_dir):
    epath.Path(d).mkdir(parents=True, exist_ok=True)
  seeds = [c.seed + i for i in range(e.seeds)]
  # One cache entry per (row, seed): a row's key names c.seed, the others are derived from the same fields.
  seed_key = lambda job, seed: job[-1] if seed == c.seed else job[-1] + f"_s{seed}"
  cached = {seed_key(j, s) for j in jobs for s in seeds if epath.Path(cache_dir, seed_key(j, s) + ".json").exists()}
  # The ETA weighs each row to score by its network evaluations (rows differ 30x in cost); cached rows cost 0.
  todo_nfe = sum(j[4] for j in jobs for s in seeds if seed_key(j, s) not in cached)
  hits = sum(seed_key(j, s) in cached for j in jobs for s in seeds)
  if hits:
    print(f"[evaluate] {hits} of {len(jobs) * len(seeds)} row scorings are cached in {cache_dir}; scoring the "
          f"other {len(jobs) * len(seeds) - hits}")
  noise = {}  # seed -> z, drawn when first needed
  rows, start, done_nfe = [], time.time(), 0
  for done, job in enumerate(jobs, start=1):
    method, sampler, w, steps, nfe, fn, checkpoint, cost, _ = job
    head = {"method": method, "sampler": sampler, "w": float(w), "steps": int(steps), "nfe": int(nfe)}
    per_seed = []
    for seed in seeds:
      row_id, t0 = seed_key(job, seed), time.time()
      if row_id in cached:  # (clipped: entries written before intervals were clipped to a metric's range)
        per_seed.append(protocol.clip_intervals(writers.read_json(os.path.join(cache_dir, row_id + ".json"))))
        continue
      if reason := train.agreed_stop():  # every process asks at the same rows (the cache is the workdir's)
        raise train.Stopped(f"evaluate stopped by {reason} before row {done} of {len(jobs)}; the {done - 1} scored "
                            f"rows are cached in {cache_dir}", "evaluate", done - 1, len(jobs), None)
      if seed not in noise:
        noise[seed] = jax.random.normal(jax.random.PRNGKey(seed + 2000), (len(labels),) + ctx.image_shape)
      x = sample_images(ctx, fn, noise[seed], labels, jnp.full((len(labels),), w, jnp.float32), prompts)
      scores = protocol.score(net, ref, x, is_splits=e.is_splits, pr_k=e.pr_k, dc_k=e.dc_k,
                              bootstrap=e.bootstrap, seed=seed)
      if agreement_clf is not None:
        scores["class_agreement"] = classifier_lib.class_agreement(agreement_clf, x, np.asarray(labels), k)
      if ctx.text and hasattr(ctx.text_encoder, "embed_images"):  # an SD folder's encoder has no image tower
        scores.update(text_score(ctx, x, prompts, e.bootstrap, seed))
      if scorer is not None:
        scores.update(scorer.score(x, captions, bootstrap=e.bootstrap, seed=seed))
      if seed == c.seed:
        tag = re.sub(r"[^A-Za-z0-9.+-]+", "_", method).strip("_") + f"_{sampler}_w{w:g}_{steps}"
        title = f"{method} ({sampler}), w = {w:g}, {steps} steps, NFE {nfe}"
        if e.captions:
          writers.save_image_grid(os.path.join(grid_dir, tag + ".png"), x[:100], ncols=10,
                                  upscale=max(1, 64 // c.data.image_size),
                                  title=f"{title}; the first captions of {os.path.basename(e.captions)}")
        else:
          _save_row_grid(os.path.join(grid_dir, tag + ".png"), x, np.asarray(labels), e.per_class, c.data, title)
      # Last: a cached row is never sampled again, so its grid is written first (a full disk at the grid leaves
      # the row to be scored again, not cached without its grid).
      writers.atomic_write_json(os.path.join(cache_dir, row_id + ".json"), scores)
      per_seed.append(scores)
      elapsed = time.time() - start
      done_nfe += nfe
      eta = elapsed / done_nfe * (todo_nfe - done_nfe)
      fid_ci = ' (%.3g–%.3g)' % tuple(scores['fid_ci']) if scores.get('fid_ci') else ''
      print(f"[evaluate] {done}/{len(jobs)}{f' seed {seed}' if len(seeds) > 1 else ''} {method:<18} {sampler:<13} "
            f"w={w:<4g} steps={steps:<4} nfe={nfe:<4} {report.metric_label(net.metric)} {scores['fid']:8.3f}{fid_ci}"
            f"  {report.metric_label(net.metric, 'IS')} {scores['is']:6.2f}  P/R {scores['precision']:.3f}/"
            f"{scores['recall']:.3f}" + (f"  text {scores['text_score']:.2f}" if "text_score" in scores else "")
            + (f"  CLIP {scores['clip_score']:.2f}" if "clip_score" in scores else "")
            + f" ({time.time() - t0:.0f}s, ETA {writers.format_duration(eta)})")
    scores = per_seed[0] if len(per_seed) == 1 else protocol.combine_seeds(per_seed)
    rows.append({**head, **scores, "seed": c.seed, "checkpoint": checkpoint, **cost})
  write_outputs(ctx.workdir, rows, net, ref, evaluated)


def write_outputs(workdir: str, rows, net: protocol.FeatureNet, ref: protocol.Reference, evaluated=None):
  """results.json, report.md and the two plots."""
  stats = f"FID against {ref.stats_source}; " if ref.stats_source else ""
  notes = [f"Features: {net.description}; {stats}reference features: {ref.num_images:,} training images.",
           "Every row samples the same noise and labels; nfe counts network evaluations per sample."]
  seeds = max((int(r.get("seeds", 1)) for r in rows), default=1)
  if any("clip_score" in r for r in rows):
    source = (f"the captions of {evaluated['captions']} (one per line, cycled over a row's samples)"
              if evaluated and evaluated.get("captions") else "the test split's captions of each row's classes")
    where = f" of {evaluated['clip_path']}" if evaluated and evaluated.get("clip_path") else ""
    notes.append(f"CLIP score (Hessel et al. 2021): mean over samples of 100·max(cos, 0) between the CLIP image and "
                 f"text embeddings{where} of each sample and the caption it was sampled at: {source}; each row at "
                 "its own guidance w.")
  if seeds > 1:
    notes.append(f"Each number is the mean over {seeds} noise seeds and its interval the 95 % t-interval of that "
                 "mean over seeds (per-seed values in results.json, `<metric>_seeds`).")
  claims = registry.claims()
  result = {"rows": rows, "evaluated": evaluated, "metric": net.metric, "reference_images": ref.num_images,
            "protocol": protocol.__doc__.split("\n\n")[-1].strip(),
            "claims": [{**c, "a": _row_id(c["a"]), "b": _row_id(c["b"])} for c in report.check_claims(rows, claims)]}
  writers.atomic_write_json(os.path.join(workdir, "results.json"), result, indent=1)
  writers.atomic_write_text(os.path.join(workdir, "report.md"),
                            report.markdown_report(rows, title="Evaluation", notes=notes, claims=claims))
  report.plot_fid_vs_nfe(rows, os.path.join(workdir, "fid_vs_nfe.png"))
  report.plot_fid_is_tradeoff(rows, os.path.join(workdir, "fid_vs_is.png"))


def _row_id(row) -> dict:
  """A claim's row in results.json: which cell, and its FID and IS with their intervals."""
  keys = ("method", "sampler", "w", "steps", "nfe", "fid", "fid_ci", "is", "is_ci")
  return {k: row[k] for k in keys if k in row}


def _standalone_outputs(ctx, rows, net, ref, out: str) -> dict:
  result = {"rows": rows, "metric": net.metric, "reference_images": ref.num_images, "features": net.description}
  writers.atomic_write_json(out, result, indent=1)  # creates the directory
  return result


def evaluate_checkpoint(stage_dir: str, *, w_values=(0.0,), steps=None, sampler=None, force=False, seed: int = 0,
                        out: str | None = None) -> dict:
  """Scores one finished stage (any run's): `eval.per_class` samples per class at each w, against its run's
  reference statistics. Writes OUT (default STAGE_DIR/eval_<sampler>_<steps>steps_seed<seed>.json)."""
  ctx, fn, steps, sampler, nfe = sampling.checkpoint_sampler(stage_dir, steps=steps, sampler=sampler, force=force)
  c = ctx.config
  net = feature_net(ctx)
  ref = reference(ctx, net)
  labels = jnp.repeat(jnp.arange(c.data.num_classes), c.eval.per_class)
  z = jax.random.normal(jax.random.PRNGKey(seed + 2000), (len(labels),) + ctx.image_shape)
  rows = []
  for w in w_values:
    x = sample_images(ctx, fn, z, labels, jnp.full((len(labels),), w, jnp.float32))
    rows.append({"checkpoint": writers.abspath(stage_dir), "sampler": sampler, "w": float(w), "steps": int(steps),
                 "nfe": int(nfe), "seed": seed, **protocol.score(net, ref, x, is_splits=c.eval.is_splits,
                                                                    pr_k=c.eval.pr_k, dc_k=c.eval.dc_k,
                                                                    bootstrap=c.eval.bootstrap, seed=seed)})
  out = out or os.path.join(stage_dir, f"eval_{sampler}_{steps}steps_seed{seed}.json")
  return dict(_standalone_outputs(ctx, rows, net, ref, out), path=out)


def load_samples(path: str, image_shape) -> np.ndarray:
  """images [N, H, W, C] from an .npz ('images': uint8 in [0, 255], or float in [−1, 1]) → float [−1, 1]."""
  try:
    found = epath.Path(path).is_file()
  except Exception as e:  # noqa: BLE001 — a URL whose client is missing or cannot reach it
    raise EvaluationError(f"--samples={path!r}: cannot be read ({type(e).__name__}: {e})") from e
  if not found:
    raise EvaluationError(f"--samples={path!r}: no such file")
  try:
    with writers.read_npz(path) as d:
      if "images" not in d.files:
        raise EvaluationError(f"--samples={path!r}: no 'images' array (has {sorted(d.files)})")
      images = np.asarray(d["images"])
  except (OSError, ValueError) as e:
    if isinstance(e, EvaluationError):
      raise
    raise EvaluationError(f"--samples={path!r}: not a readable .npz ({e})") from e
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape) or len(images) < 2:
    raise EvaluationError(f"--samples={path!r}: images have shape {images.shape}; the config's data set needs "
                          f"[N >= 2, {', '.join(map(str, image_shape))}]")
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  images = images.astype(np.float32)
  if images.min() < -1.0 - 1e-3 or images.max() > 1.0 + 1e-3:
    raise EvaluationError(f"--samples={path!r}: float images must lie in [-1, 1] (found [{images.min():.3g}, "
                          f"{images.max():.3g}]); or store uint8")
  return images


def evaluate_samples(config, workdir: str, samples_path: str, out: str | None = None) -> dict:
  """Scores a file of samples made anywhere against the config's data set (reference cached in WORKDIR)."""
  ctx = Context(config, workdir)
  images = load_samples(samples_path, ctx.pixel_shape)
  net = feature_net(ctx)
  ref = reference(ctx, net)
  row = {"samples": writers.abspath(samples_path),
         **protocol.score(net, ref, images, is_splits=config.eval.is_splits, pr_k=config.eval.pr_k,
                          dc_k=config.eval.dc_k, bootstrap=config.eval.bootstrap, seed=config.seed)}
  out = out or os.path.splitext(samples_path)[0] + "_eval.json"
  return dict(_standalone_outputs(ctx, [row], net, ref, out), path=out)
