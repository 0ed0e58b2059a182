"""The contract between a method and the framework: what a method registers (`Method`), and what each finished
stage says of itself in `final/meta.json` (`StageMeta`), the one record sampling, evaluation, the report and round
chaining read. Nothing here imports a method or the trainer.

A method is a module or package under `distill/methods/` with a module-level `METHOD = Method(...)`;
`distill.registry` finds it. A finished stage's meta.json is `StageMeta.to_dict()` plus the trainer's own keys
(`stage`, `num_steps`, `train_seconds`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

# fn(ctx, params, meta: StageMeta, num_steps: int, sampler: str) -> (sample_fn(z, labels, w) -> x, evaluations
# per sample). z: [B, H, W, C] VP noise N(0, I) (every method maps the same noise); labels [B] int32; w [B]
# float32; x [B, H, W, C] in [-1, 1]. `sampler` is the registered name asked for (a method registering several
# samplers may serve them from one factory).
SamplerFactory = Callable[..., tuple[Callable, int]]
# fn(ctx) -> anything: runs one pipeline stage (resuming or skipping what is finished) under WORKDIR/<stage>/.
StageFn = Callable[[Any], Any]

# How a stage written before this contract is converted (the one line a reader prints).
UPGRADE_HINT = "python -m distill.registry --upgrade_meta WORKDIR"


class ContractError(ValueError):
  """A meta.json that does not hold the contract's fields: one line naming the file, the field and the fix."""


@dataclasses.dataclass(frozen=True)
class Method:
  """What a method module exports as `METHOD`.

  name: the method's name (its module's). order: where its stages fall when a pipeline lists every stage
  (the teacher's first; a method whose stages start from another's goes after it).
  stages: pipeline stage name -> runner, in the order they run.
  samplers: meta.sampler -> factory (`SamplerFactory`); samplers of one method may stand in for each other
  (`--sampler`), never another method's.
  config: () -> {section name: ConfigDict of defaults} — the config sections the method owns.
  validate: config -> None, raising `validation.ConfigError` (one line) on a bad field of its sections; called
  for every config, whatever the pipeline runs.
  preflight: config -> None, raising `validation.ConfigError`: checks before anything is written (weight files),
  called only when the pipeline runs one of the method's stages.
  quick: config -> None: shrinks its sections to a smoke run (`configs/*.py:quick`).
  data_batches: config fields ('teacher.batch_size') of batches its stages draw from the training set: each must
  not exceed the set's size (checked before anything is written, when the pipeline runs its stages).
  pipelines: {variant name: pipeline} the method offers config files as `:variant` (its paper's stages on a
  teacher), e.g. {'sfd': ('teacher', 'sfd', 'sfd_v', 'sfd_one_nfe', 'evaluate')}.
  plan: (config, stage name) -> [(stage directory name, StageMeta)]: what the stage would write, without
  training (teacher fingerprints and other trained values left out); `--mode=plan` prints it.
  upgrade_meta: (stage name, old meta dict, the run's config.json dict) -> StageMeta or None, for stages written
  before the contract (None: not one of this method's).
  claims: its paper's claims (`Claim`) the report checks on whatever rows a run has.
  schedule_samplers: those of its samplers whose time grid follows the run's schedule (`Context.logsnr_fn`), so
  that a context with the schedule rescaled to t ↦ λ(s·t) samples the last part [0, s] of the trajectory
  (image-to-image, `sampling.img2img`); a sampler on a grid of its own (SFD's σ grid) is not one.
  opt_in_stages: those of its stages a pipeline of every stage ('all', ':quick') leaves out, as they change what
  the later stages train ('teacher_inpaint': an inpainting run).
  """
  name: str
  order: int
  stages: Mapping[str, StageFn]
  samplers: Mapping[str, SamplerFactory] = dataclasses.field(default_factory=dict)
  config: Callable[[], Mapping[str, Any]] | None = None
  validate: Callable[[Any], None] | None = None
  preflight: Callable[[Any], None] | None = None
  quick: Callable[[Any], None] | None = None
  data_batches: tuple[str, ...] = ()
  pipelines: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
  plan: Callable[[Any, str], list] | None = None
  upgrade_meta: Callable[[str, dict, dict], "StageMeta | None"] | None = None
  claims: tuple["Claim", ...] = ()
  schedule_samplers: tuple[str, ...] = ()
  opt_in_stages: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Side:
  """One side of a `Claim`: which report row it reads.

  method: the rows' method label, a `fnmatch` pattern ('single-w*'; '*': every method, each in turn, the other
  side then reading the same method). samplers: accepted report samplers (empty: any); of several rows, the one
  best in the claim's quantity. steps: a step count, 'most' (the most steps the method has at that w) or 'same'
  (the other side's). w: 'same' (one comparison per w both sides have), 'lowest' or 'highest' (the method's).
  """
  method: str
  samplers: tuple[str, ...] = ()
  steps: int | str = "same"
  w: str = "same"

  def __post_init__(self):
    if not (isinstance(self.steps, int) and self.steps > 0) and self.steps not in ("most", "same"):
      raise ValueError(f"Side.steps must be a positive int, 'most' or 'same', got {self.steps!r}")
    if self.w not in ("same", "lowest", "highest"):
      raise ValueError(f"Side.w must be 'same', 'lowest' or 'highest', got {self.w!r}")


@dataclasses.dataclass(frozen=True)
class Claim:
  """A paper's claim as two report rows and how they should compare (`evaluation.report.claims_table`).

  quantity: 'fid' (lower is better) or 'is' (higher is better). relation: 'match' (a is as good as b: holds when
  a is better or the two cannot be told apart) or 'better' (a beats b: within noise when they cannot be told
  apart). source: where the paper says it.
  """
  text: str
  a: Side
  b: Side
  quantity: str = "fid"
  relation: str = "match"
  source: str = ""

  def __post_init__(self):
    if self.quantity not in ("fid", "is"):
      raise ValueError(f"Claim.quantity must be 'fid' or 'is', got {self.quantity!r}")
    if self.relation not in ("match", "better"):
      raise ValueError(f"Claim.relation must be 'match' or 'better', got {self.relation!r}")
    if "same" == self.a.steps == self.b.steps:
      raise ValueError(f"claim {self.text!r}: one side's steps must be fixed ('most' or a count)")


@dataclasses.dataclass(frozen=True)
class StageMeta:
  """What a finished stage is, for every reader. Written by every method to `final/meta.json`.

  kind: what the parameters are ('cfg_teacher', 'w_student', 'sfd_student', …; its method reads it back).
  method: the report's label ('guided PD', 'SFD', 'CD', …). sampler: the registered sampler that samples it
  ('' for a stage that is not sampled, e.g. an encoder). report_sampler: the report's sampler column.
  num_sampling_steps: the step count it was distilled for; eval_steps: the counts it is scored at (empty: that
  one). evals_per_step: network evaluations per sampling step (2 for a model guided at sampling by CFG). w_range: [lo, hi] guidance it serves (lo == hi: one w). w_conditioned: it takes w as an input.
  Cost of one update: batch_size examples, each costing teacher_evals_per_update teacher and
  student_evals_per_update student network evaluations. cost_parents: stages (names under the workdir) whose
  cost it builds on (a halving round: the round before it). scored: the evaluate stage scores it.
  extra: the method's own fields (a sampler's settings), stored beside the typed ones.
  """
  kind: str
  method: str
  sampler: str
  num_sampling_steps: int
  w_range: tuple[float, float]
  batch_size: int
  teacher_evals_per_update: float
  student_evals_per_update: float = 1.0
  evals_per_step: int = 1
  report_sampler: str = "deterministic"
  eval_steps: tuple[int, ...] = ()
  w_conditioned: bool = False
  cost_parents: tuple[str, ...] = ()
  scored: bool = True
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    # Normalised, so a record read back from JSON (lists) equals the one written (tuples).
    object.__setattr__(self, "w_range", tuple(float(w) for w in self.w_range))
    object.__setattr__(self, "eval_steps", tuple(int(n) for n in self.eval_steps))
    object.__setattr__(self, "cost_parents", tuple(self.cost_parents))
    object.__setattr__(self, "extra", dict(self.extra))

  @property
  def steps_scored(self) -> tuple[int, ...]:
    return self.eval_steps or (int(self.num_sampling_steps),)

  def serves(self, w: float) -> bool:
    return self.w_range[0] <= w <= self.w_range[1]

  def to_dict(self) -> dict:
    """The JSON form: the typed fields, with `extra`'s entries beside them (never overriding one)."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
    out["w_range"], out["eval_steps"], out["cost_parents"] = (list(self.w_range), list(self.eval_steps),
                                                               list(self.cost_parents))
    clash = sorted(set(self.extra) & set(out))
    if clash:
      raise ContractError(f"StageMeta.extra repeats typed fields {clash}")
    return {**out, **self.extra, "contract": CONTRACT_VERSION}

  def replace(self, **changes) -> "StageMeta":
    return dataclasses.replace(self, **changes)

  @classmethod
  def of(cls, **fields) -> "StageMeta":
    """The record of flat fields: the typed ones by name, every other one into `extra`."""
    typed = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return cls(**{k: v for k, v in fields.items() if k in typed},
               extra={**fields.get("extra", {}), **{k: v for k, v in fields.items() if k not in typed}})

  @classmethod
  def from_dict(cls, d: Mapping, where: str = "meta.json") -> "StageMeta":
    """The record of a meta.json dict; ContractError (one line) when it predates the contract or lacks a field.
    The trainer's keys (stage, num_steps, train_seconds) stay out of `extra`."""
    if d.get("contract") != CONTRACT_VERSION:
      raise ContractError(f"{where}: written before the stage contract (no 'contract': {CONTRACT_VERSION}); "
                          f"convert the run with `{UPGRADE_HINT}`")
    typed = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name in typed and f.default is dataclasses.MISSING and f.name not in d)
    if missing:
      raise ContractError(f"{where}: lacks the contract field(s) {missing}")
    extra = {k: v for k, v in d.items() if k not in typed and k not in TRAINER_KEYS}
    return cls(**{k: d[k] for k in typed if k in d}, extra=extra)


CONTRACT_VERSION = 1
TRAINER_KEYS = ("stage", "num_steps", "train_seconds", "contract")
