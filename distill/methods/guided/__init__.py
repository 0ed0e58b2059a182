"""Guided distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models"): a w-conditioned student
of the CFG teacher (stage one), then progressive halving of its steps, deterministic or stochastic; with the
paper's baselines (single-w, two-student) and encoder distillation.

  stage_one.py     Algorithm 1's loss               progressive.py   Algorithms 2–5: round targets and losses
  stages.py        the pipeline stages and the 'ddim' / 'stochastic' student samplers

Config sections: `distill` (stage one and the halving rounds; `distill.teacher_dir` and `distill.dropout` are
read by every method's students) and `baselines`.
"""
from __future__ import annotations

import ml_collections

from distill import contract, diffusion, validation
from distill.methods.guided import stages

STAGES = {
    "stage_one": stages.run_stage_one,
    "distill_deterministic": stages.run_distill_deterministic,
    "distill_stochastic": stages.run_distill_stochastic,
    "single_w": stages.run_single_w,
    "two_student": stages.run_two_student,
    "encoder": stages.run_encoder,
}


def config_sections():
  return {
      "distill": ml_collections.ConfigDict(dict(
          teacher_dir="",                   # '' = WORKDIR/teacher; or the stage dir of a teacher trained elsewhere
          w_min=0.0, w_max=4.0,             # guidance range of the w-conditioned students
          dropout=0.0,                      # students train without dropout (PD)
          batch_size=128,
          stage_one_steps=1000, stage_one_lr=1e-3, stage_one_warmup=100, stage_one_ema=0.999,
          stage_one_weighting="snr",
          start_steps=64, end_steps=1,      # first round's teacher steps → last student's steps (powers of two)
          encoder_start_steps=0,            # first teacher steps of the encoder chain (0 = start_steps)
          round_steps=500, final_round_steps=1000,  # updates per round; the rounds to N in final_rounds get
          final_rounds=(2, 1),              # final_round_steps (App. C's latent runs: (4, 2, 1))
          lr=3e-4, grad_clip=1.0,           # Adam, annealed linearly to 0 within each round; no EMA
          round_warmup=0,                   # > 0: each round's lr first rises linearly from 0 over this many updates
          weighting="truncated_snr",
          log_every=100, ckpt_every=250,
          grid_w=(0.0, 0.3, 1.0, 2.0, 4.0), # rows of each round's sample grid (columns = classes)
      )),
      "baselines": ml_collections.ConfigDict(dict(
          single_w=(1.0,),                  # 'single_w': a stage-one student and rounds per fixed w, no w input
          start_steps=0,                    # first teacher steps of the single-w and two-student chains (0 = distill's)
      )),
  }


def validate(c) -> None:
  v = validation
  for f in ("batch_size", "stage_one_steps", "round_steps", "final_round_steps", "log_every", "ckpt_every"):
    v.positive_int(c, f"distill.{f}")
  v.number(c, "distill.w_min", 0.0)
  v.number(c, "distill.w_max", 0.0)
  if c.distill.w_min > c.distill.w_max:
    v.fail("distill.w_min", c.distill.w_min, f"must not exceed distill.w_max={c.distill.w_max}")
  for f in ("stage_one_lr", "lr"):
    v.number(c, f"distill.{f}", 0.0, 1.0, lo_open=True)
  v.number(c, "distill.stage_one_ema", 0.0, 1.0, hi_open=True)
  v.number(c, "distill.dropout", 0.0, 1.0, hi_open=True)
  v.number(c, "distill.grad_clip", 0.0, lo_open=True)
  v.choice(c, "distill.weighting", diffusion.WEIGHTINGS)
  v.choice(c, "distill.stage_one_weighting", diffusion.WEIGHTINGS)
  for f in ("start_steps", "end_steps"):
    n = c.distill[f]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
      v.fail(f"distill.{f}", n, "halving needs a power of two (1, 2, 4, …)")
  if c.distill.start_steps <= c.distill.end_steps:
    v.fail("distill.start_steps", c.distill.start_steps, f"must exceed distill.end_steps={c.distill.end_steps}")
  for field in ("distill.encoder_start_steps", "baselines.start_steps"):
    n = v.get(c, field)
    if n != 0 and (isinstance(n, bool) or not isinstance(n, int) or n <= c.distill.end_steps or n & (n - 1)):
      v.fail(field, n, f"0 (= distill.start_steps) or a power of two above distill.end_steps={c.distill.end_steps}")
  rounds = c.distill.final_rounds
  if not isinstance(rounds, (tuple, list)) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1)
                                                  for n in rounds):
    v.fail("distill.final_rounds", rounds, "must be a tuple of student step counts (powers of two) whose rounds get "
           "distill.final_round_steps")
  w = c.distill.round_warmup
  if isinstance(w, bool) or not isinstance(w, int) or w < 0:
    v.fail("distill.round_warmup", w, "must be an integer >= 0")
  for f in ("round_steps", "final_round_steps"):
    if w and c.distill[f] <= w:
      v.fail(f"distill.{f}", c.distill[f], f"must exceed distill.round_warmup={w} (the warm-up is part of a round)")
  v.guidance_values("distill.grid_w", tuple(c.distill.grid_w))
  v.guidance_values("baselines.single_w", tuple(c.baselines.single_w))


def quick(c) -> None:
  d = c.distill
  d.stage_one_steps, d.start_steps = 20, 4  # rounds: 2, 1
  d.encoder_start_steps = c.baselines.start_steps = 0
  d.round_steps, d.final_round_steps, d.log_every, d.ckpt_every = 10, 10, 5, 10


def upgrade_meta(name: str, meta: dict, run_config: dict):
  """A guided-distillation stage written before the contract, which named neither its method nor its cost:
  both follow from its chain (the directory it sits in) as the code that wrote it laid them out."""
  kind = meta.get("stage_kind")
  if kind not in ("stage_one", "deterministic", "stochastic", "encoder", "two_student"):
    return None
  top = name.split("/")[0]
  pair = kind == "two_student"
  if top == "single_w":
    method = f"single-w (w={meta['w_range'][0]:g})"
  else:
    method = {"stage_one": "stage one", "two_student": "two-student", "encoder": "encoder"}.get(top, "guided PD")
  chain = name.rsplit("/", 1)[0] if "/" in name else ""
  if kind == "stage_one":
    parents = ()
  elif int(meta.get("round", 1)) > 1:
    parents = (f"{chain}/N{2 * int(meta['num_sampling_steps']):04d}",)
  elif top == "two_student":
    parents = ()
  else:
    parents = (f"{chain}/stage_one" if top == "single_w" else "stage_one",)
  known = {"kind", "sampler", "num_sampling_steps", "w_conditioned", "w_range"} | set(contract.TRAINER_KEYS)
  return contract.StageMeta(
      kind=meta["kind"], method=method, sampler="" if kind == "encoder" else meta["sampler"],
      report_sampler="stochastic" if meta["sampler"] == "stochastic" else "deterministic",
      num_sampling_steps=int(meta["num_sampling_steps"]), w_range=tuple(meta["w_range"]),
      w_conditioned=bool(meta.get("w_conditioned")), batch_size=int(meta.get("batch_size", run_config["distill"]["batch_size"])),
      teacher_evals_per_update=4.0 if pair else 2.0, student_evals_per_update=2.0 if pair else 1.0,
      evals_per_step=2 if pair else 1, cost_parents=parents, scored=kind != "encoder",
      extra={k: v for k, v in meta.items() if k not in known})


def _claims() -> tuple[contract.Claim, ...]:
  """The guided-distillation paper's claims (Meng et al. 2023, Table 1 and §4.1) as report rows to compare."""
  S, C = contract.Side, contract.Claim
  out = [C("stage one matches the CFG teacher at the same steps", S("stage one", steps="most"),
           S("teacher DDIM"), source="§3.1, Alg. 1"),
         C("distilled 4-step matches or beats teacher DDIM 16×2", S("guided PD", steps=4),
           S("teacher DDIM", steps=16), source="Table 1")]
  out += [C(f"distilled {n}-step matches the teacher's most-steps DDIM", S("guided PD", steps=n),
            S("teacher DDIM", steps="most"), source="Table 1, §4.1") for n in (8, 16)]
  out += [C(f"stochastic beats deterministic at {n} steps", S("guided PD", ("stochastic",), steps=n),
            S("guided PD", ("deterministic",)), relation="better", source="Table 1 (w = 0)") for n in (8, 16)]
  out += [C(f"w-conditioned matches two-student at {n} step{'s' if n > 1 else ''}", S("guided PD", steps=n),
            S("two-student"), source="App. Alg. 5") for n in (1, 2)]
  out += [C("w-conditioned matches single-w at 4 steps", S("guided PD", steps=4), S("single-w*"),
            source="Table 1")]
  return tuple(out)


METHOD = contract.Method(
    name="guided", order=10, stages=STAGES, claims=_claims(),
    samplers={"ddim": stages.student_sampler, "stochastic": stages.student_sampler},
    schedule_samplers=("ddim", "stochastic"),
    config=config_sections, validate=validate, quick=quick, data_batches=("distill.batch_size",),
    plan=stages.plan, upgrade_meta=upgrade_meta)
