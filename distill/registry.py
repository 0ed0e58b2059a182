"""The method registry: every module or package under `distill/methods/` that defines `METHOD` (a
`contract.Method`) is found by listing the package, so adding a method adds a file and edits nothing else.

The entry point, the pipeline, evaluation and sampling reach methods only through here: stage runners by
stage name, samplers by a checkpoint's `meta.sampler`, config sections, validation, pre-run checks and the
`quick` shrink. `python -m distill.registry` lists what is registered; `--upgrade_meta WORKDIR` converts the
meta.json of stages written before `contract.StageMeta`.
"""
from __future__ import annotations

import functools
import importlib
import os
import pkgutil
import sys

from distill import contract

# The pipeline's last stage, the framework's own (distill/evaluate.py): scores every finished student.
EVALUATE = "evaluate"


@functools.lru_cache(maxsize=None)
def methods() -> tuple[contract.Method, ...]:
  """Every registered method, in `order` (then name)."""
  import distill.methods as package
  found = []
  for info in pkgutil.iter_modules(package.__path__):
    module = importlib.import_module(f"{package.__name__}.{info.name}")
    method = getattr(module, "METHOD", None)
    if isinstance(method, contract.Method):
      found.append(method)
  found.sort(key=lambda m: (m.order, m.name))
  seen: dict[str, str] = {}
  for m in found:
    for kind, names in (("stage", m.stages), ("sampler", m.samplers), ("config section", _sections(m))):
      for name in names:
        key = f"{kind} {name!r}"
        if key in seen or name == EVALUATE:
          raise RuntimeError(f"{key} is registered by both {seen.get(key, 'the framework')!r} and {m.name!r}")
        seen[key] = m.name
  return tuple(found)


def _sections(method: contract.Method) -> dict:
  return dict(method.config()) if method.config else {}


def method(name: str) -> contract.Method:
  for m in methods():
    if m.name == name:
      return m
  raise KeyError(f"no method {name!r}; registered: {', '.join(m.name for m in methods())}")


def stage_names() -> tuple[str, ...]:
  """Every stage a pipeline may name, in the order a pipeline of all of them runs (`evaluate` last)."""
  return tuple(s for m in methods() for s in m.stages) + (EVALUATE,)


def default_stage_names() -> tuple[str, ...]:
  """`stage_names` less the methods' opt-in stages: what a pipeline of 'all' stages runs."""
  opt_in = {s for m in methods() for s in m.opt_in_stages}
  return tuple(s for s in stage_names() if s not in opt_in)


def stage_owner(stage: str) -> contract.Method:
  for m in methods():
    if stage in m.stages:
      return m
  raise KeyError(f"no stage {stage!r}; stages: {', '.join(stage_names())}")


def stage_runner(stage: str) -> contract.StageFn:
  return stage_owner(stage).stages[stage]


def sampler_owner(sampler: str) -> contract.Method:
  for m in methods():
    if sampler in m.samplers:
      return m
  raise KeyError(f"sampler {sampler!r} is not registered; registered: {', '.join(sampler_names())}")


def sampler_names() -> tuple[str, ...]:
  return tuple(s for m in methods() for s in m.samplers)


def sampler(ctx, params, meta: contract.StageMeta, num_steps: int | None = None, name: str | None = None):
  """(fn(z, labels, w) -> x, evaluations per sample) for the stage `meta` describes, at its own step count and
  sampler unless given. Another sampler is allowed only from the same method (a guided-PD student samples
  'ddim' or 'stochastic'); ValueError (one line) otherwise."""
  own = meta.sampler
  if not own:
    raise ValueError(f"a {meta.kind!r} stage is not sampled (its meta names no sampler)")
  name = name or own
  owner = sampler_owner(own)
  if name not in owner.samplers:
    raise ValueError(f"a {own!r} checkpoint samples with {' or '.join(map(repr, owner.samplers))}, not {name!r}")
  return owner.samplers[name](ctx, params, meta, int(num_steps or meta.num_sampling_steps), name)


def default_sections() -> dict:
  """{section: ConfigDict of defaults} of every method (configuration.base_config adds them)."""
  out = {}
  for m in methods():
    out.update(_sections(m))
  return out


def validate(config) -> None:
  """Every method's own checks (validation.ConfigError on the first bad field)."""
  for m in methods():
    if m.validate:
      m.validate(config)


def preflight(config) -> None:
  """The pre-run checks (weight files, …) of the methods whose stages the pipeline runs."""
  for m in methods():
    if m.preflight and set(m.stages) & set(config.pipeline):
      m.preflight(config)


def data_batch_fields(config) -> tuple[str, ...]:
  """The config fields of batches drawn from the training set by the stages the pipeline runs."""
  return tuple(f for m in methods() if set(m.stages) & set(config.pipeline) for f in m.data_batches)


def named_pipelines() -> dict[str, tuple]:
  """{variant: pipeline} of every method's `pipelines` (config files' `:variant` names)."""
  out = {}
  for m in methods():
    out.update(m.pipelines)
  return out


def follows_schedule(sampler: str) -> bool:
  """Whether a registered sampler's time grid follows the run's schedule (`contract.Method.schedule_samplers`)."""
  return sampler in sampler_owner(sampler).schedule_samplers


def claims() -> tuple[contract.Claim, ...]:
  """Every method's paper claims, in method order (the report checks them on the rows a run has)."""
  return tuple(c for m in methods() for c in m.claims)


def quick(config) -> None:
  """Every method's smoke-run shrink of its own sections."""
  for m in methods():
    if m.quick:
      m.quick(config)


def plan(config) -> list[tuple[str, str, contract.StageMeta]]:
  """(pipeline stage, stage directory, record) of every stage config.pipeline would write, in order, without
  training. ValueError naming a stage whose method registers no plan."""
  out = []
  for stage in config.pipeline:
    if stage == EVALUATE:
      continue
    owner = stage_owner(stage)
    if owner.plan is None:
      raise ValueError(f"method {owner.name!r} registers no plan for its stage {stage!r}")
    out += [(stage, name, meta) for name, meta in owner.plan(config, stage)]
  return out


def planned_rows(config, planned) -> list[dict]:
  """The rows the evaluate stage would score for `planned` (`plan`'s output): the teacher's DDIM (and DDPM)
  rows at every step count, then every scored stage at each eval.w_values it serves and each step count.
  Each row: {method, sampler, w, steps, nfe, checkpoint}."""
  e = config.eval
  scored = [(name, m) for _, name, m in planned if m.scored]
  steps = sorted({n for _, m in scored for n in m.steps_scored} | {int(config.sample.num_steps)})
  ddpm = steps if e.teacher_ddpm == "all" else [int(config.sample.num_steps)]
  rows = []
  for w in e.w_values:
    rows += [dict(method="teacher DDIM", sampler="ddim", w=w, steps=n, nfe=2 * n, checkpoint="teacher")
             for n in steps]
    rows += [dict(method="teacher DDPM", sampler="ddpm", w=w, steps=n, nfe=2 * n, checkpoint="teacher")
             for n in ddpm]
    for name, m in scored:
      if m.serves(w):
        rows += [dict(method=m.method, sampler=m.report_sampler, w=w, steps=n, nfe=n * m.evals_per_step,
                      checkpoint=name) for n in m.steps_scored]
  return rows


def load_meta(stage_dir: str, meta: dict) -> contract.StageMeta:
  """The contract record of a loaded meta dict. contract.ContractError (one line, naming the file) for one written
  before the contract, or naming a sampler no method registers or a parameterization no model predicts (a
  meta.json edited by hand or written by other code), before a reader dispatches on either."""
  from distill import diffusion
  where = os.path.join(stage_dir, "final", "meta.json")
  record = contract.StageMeta.from_dict(meta, where)
  if record.sampler and record.sampler not in sampler_names():
    raise contract.ContractError(f"{where}: sampler={record.sampler!r} is not registered; registered: "
                                 f"{', '.join(sampler_names())}")
  parameterization = record.extra.get("parameterization")
  if parameterization is not None and parameterization not in diffusion.PARAMETERIZATIONS:
    raise contract.ContractError(f"{where}: parameterization={parameterization!r}; allowed: "
                                 f"{', '.join(map(repr, diffusion.PARAMETERIZATIONS))}")
  return record


def upgrade_meta(workdir: str) -> list[str]:
  """Rewrites every final/meta.json under `workdir` written before the contract, through its method's
  `upgrade_meta`. Returns the stage names converted; a stage no method recognises is left as it is."""
  import json

  from etils import epath

  from distill import writers
  done = []
  root = epath.Path(workdir)
  run_config = json.loads((root / "config.json").read_text())
  paths = [epath.Path(d) / "meta.json" for d, _, files in root.walk()
           if os.path.basename(os.fspath(d)) == "final" and "meta.json" in files]
  for meta_path in sorted(paths):
    d = json.loads(meta_path.read_text())
    if d.get("contract") == contract.CONTRACT_VERSION:
      continue
    name = os.path.relpath(os.fspath(meta_path.parent.parent), os.fspath(root.parent / root.name))
    for m in methods():
      record = m.upgrade_meta(name, d, run_config) if m.upgrade_meta else None
      if record is not None:
        kept = {k: d[k] for k in contract.TRAINER_KEYS if k in d}
        writers.atomic_write_json(os.fspath(meta_path), {**record.to_dict(), **kept}, indent=1)
        done.append(name)
        break
  return done


def _main(argv) -> int:
  if len(argv) == 3 and argv[1] == "--upgrade_meta":
    if not os.path.isfile(os.path.join(argv[2], "config.json")) and "://" not in argv[2]:
      print(f"error: --upgrade_meta {argv[2]!r}: not a run's workdir (no config.json in it)", file=sys.stderr)
      return 2
    names = upgrade_meta(argv[2])
    print(f"converted {len(names)} stage(s): {', '.join(names) or '-'}")
    return 0
  if len(argv) == 1:
    for m in methods():
      print(f"{m.name:<12} stages: {', '.join(m.stages) or '-'}; samplers: {', '.join(m.samplers) or '-'}; "
            f"config: {', '.join(_sections(m)) or '-'}")
    return 0
  print("usage: python -m distill.registry [--upgrade_meta WORKDIR]", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(_main(sys.argv))
