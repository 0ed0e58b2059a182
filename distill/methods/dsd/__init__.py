"""Direct self-distillation (DSD, Alg. 2 of the self-distillation paper): one model fine-tuned to do in N/2 steps
what it does in N, with no teacher copy and no data; its frozen-teacher control (TSD) and training DSD (Eq. 1).

  core.py     trajectory positions, the two-step target, the losses, the depth schedules
  stages.py   the pipeline stages 'dsd', 'tsd', 'training_dsd'

Config section: `dsd`. Its students sample with the samplers of the model they start from ('cfg_ddim' for the
CFG teacher, 'ddim' for guided stage one).
"""
from __future__ import annotations

import ml_collections

from distill import contract, diffusion
from distill.methods.dsd import core as dsd
from distill.methods.dsd import stages
from distill.validation import choice, fail, number, positive_int

STAGES = {"dsd": stages.run_dsd, "tsd": stages.run_tsd, "training_dsd": stages.run_training_dsd}


def config_sections():
  # Defaults: Table 3's conditional (ImageNet-256) row and §5.
  return {"dsd": ml_collections.ConfigDict(dict(
      kinds=("DSDN", "DSDI", "DSDGL", "DSDGEXP"),  # one student per schedule, in dsd/<KIND> and tsd/<KIND>
      init="teacher",                   # start model: 'teacher' (the CFG teacher) | 'stage_one' (w-conditioned)
      start_steps=64, end_steps=2,      # N of the first and last depths (even; DSDN stays at start_steps)
      updates=5000,                     # P: parameter updates per schedule (as §5 counts them; see stages/dsd.py)
      # §5 samples "the guidance scale ... from w=[1.0,3.0]" for latent diffusion models, whose guidance is
      # ε_∅ + s(ε_c − ε_∅) (s = 1: none); in our (1 + w)x̂_c − w·x̂_∅ that range is w = s − 1 ∈ [0, 2]
      # (`diffusion.w_from_guidance_scale`).
      w_min=0.0, w_max=2.0,             # w ~ U[w_min, w_max] per trajectory
      batch_size=64,                    # trajectories per update (the paper states none; ours)
      lr=1e-7, lr_final_fraction=0.1,   # cosine annealing over P to lr·lr_final_fraction (Table 3, §5)
      warmup_steps=0,                   # Appendix I mentions a warm-up without its length
      adam_b1=0.99, adam_b2=0.999, grad_clip=1.0, ema_decay=0.9995,
      weighting="truncated_snr",        # Alg. 2: max(e^λ, 1)
      # TSD's teacher: 'previous_depth' (each depth's teacher is the previous depth's student, as TSD "mimics"
      # progressive distillation in the paper; one stage per depth) or 'start_model' (frozen at every depth)
      tsd_teacher="previous_depth",
      tsd_kinds=("DSDI",),              # TSD runs "with identical scheduling to DSDI" (§4.1.1); others: ours
      eval_steps=(2, 4, 8),             # step counts each student is scored at (Table 2)
      log_every=100, ckpt_every=500,
      # training DSD: the teacher stage's recipe (model, data, optimiser, EMA) with L = α·L_v + β·L_distill
      training_steps=0,                 # 0: teacher.num_steps (the plain teacher is the same run at β = 0)
      alpha=0.85, beta=0.15,            # §5.2
      training_distill_steps=8,         # N of L_distill's steps t → t − 1/N → t − 2/N (the paper gives none; ours)
      training_weighting="constant",    # Eq. 1's L_distill is an unweighted MSE; 'truncated_snr' is Alg. 2's
  ))}


def validate(c) -> None:
  kinds = c.dsd.kinds
  if (not isinstance(kinds, (tuple, list)) or not kinds or len(set(kinds)) != len(kinds)
      or any(k not in dsd.SCHEDULE_KINDS for k in kinds)):
    fail("dsd.kinds", kinds, f"a non-empty tuple of distinct schedules from {', '.join(dsd.SCHEDULE_KINDS)}")
  choice(c, "dsd.init", ("teacher", "stage_one"))
  choice(c, "dsd.tsd_teacher", ("previous_depth", "start_model"))
  tsd_kinds = c.dsd.tsd_kinds
  if (not isinstance(tsd_kinds, (tuple, list)) or not tsd_kinds or len(set(tsd_kinds)) != len(tsd_kinds)
      or any(k not in dsd.SCHEDULE_KINDS for k in tsd_kinds)):
    fail("dsd.tsd_kinds", tsd_kinds, f"a non-empty tuple of distinct schedules from {', '.join(dsd.SCHEDULE_KINDS)}")
  kinds = tuple(kinds) + tuple(k for k in tsd_kinds if k not in kinds)
  for f in ("start_steps", "end_steps"):
    v = c.dsd[f]
    if isinstance(v, bool) or not isinstance(v, int) or v < 2 or v % 2:
      fail(f"dsd.{f}", v, "must be an even integer >= 2 (a trajectory position spans two DDIM steps)")
  start, end = c.dsd.start_steps, c.dsd.end_steps
  if start < end:
    fail("dsd.end_steps", end, f"must not exceed dsd.start_steps={start}")
  ratio = start // end
  if "DSDI" in kinds and (start % end or ratio & (ratio - 1)):
    fail("dsd.start_steps", start, f"DSDI halves N: dsd.start_steps / dsd.end_steps={end} must be a power of two")
  for f in ("updates", "batch_size", "log_every", "ckpt_every", "training_distill_steps"):
    positive_int(c, f"dsd.{f}")
  if c.dsd.training_distill_steps < 3:
    fail("dsd.training_distill_steps", c.dsd.training_distill_steps, "must be >= 3 (rows need t >= 2/N)")
  for kind in kinds:
    steps = start if kind == "DSDN" else end
    plan = dsd.depth_schedule(kind, start, 2 * c.dsd.updates, steps)
    if any(u == 0 for _, u in plan):
      fail("dsd.updates", c.dsd.updates, f"too few for {kind} over N = {start} -> {steps}: depth "
            f"N={next(n for n, u in plan if u == 0)} gets no trajectory; raise it or narrow the depths")
  number(c, "dsd.w_min", 0.0)
  number(c, "dsd.w_max", 0.0)
  if c.dsd.w_min > c.dsd.w_max:
    fail("dsd.w_min", c.dsd.w_min, f"must not exceed dsd.w_max={c.dsd.w_max}")
  number(c, "dsd.lr", 0.0, 1.0, lo_open=True)
  number(c, "dsd.lr_final_fraction", 0.0, 1.0)
  for f in ("warmup_steps", "training_steps"):
    v = c.dsd[f]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      fail(f"dsd.{f}", v, "must be an integer >= 0")
  if c.dsd.warmup_steps >= c.dsd.updates:
    fail("dsd.warmup_steps", c.dsd.warmup_steps, f"must be below dsd.updates={c.dsd.updates}")
  for f in ("adam_b1", "adam_b2", "ema_decay"):
    number(c, f"dsd.{f}", 0.0, 1.0, hi_open=True)
  number(c, "dsd.grad_clip", 0.0, lo_open=True)
  choice(c, "dsd.weighting", diffusion.WEIGHTINGS)
  choice(c, "dsd.training_weighting", diffusion.WEIGHTINGS)
  steps = c.dsd.eval_steps
  if (not isinstance(steps, (tuple, list)) or not steps
      or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in steps)):
    fail("dsd.eval_steps", steps, "must be a non-empty tuple of positive integers")
  number(c, "dsd.alpha", 0.0)
  number(c, "dsd.beta", 0.0)
  if c.dsd.alpha == 0 and c.dsd.beta == 0:
    fail("dsd.beta", c.dsd.beta, "dsd.alpha and dsd.beta are both 0: the loss would be 0")
  if "training_dsd" in c.pipeline and c.get("inpaint") and c.inpaint.enabled:
    fail("pipeline", tuple(c.pipeline), "stage 'training_dsd' trains a plain model from data, which does not "
         "take an inpainting run's condition (inpaint.enabled=True); leave it out")
  if "training_dsd" in c.pipeline and c.model.parameterization != "v":
    fail("model.parameterization", c.model.parameterization, "the 'training_dsd' stage trains v-prediction "
          "(Eq. 1); allowed: 'v'")


def quick(c) -> None:
  s = c.dsd
  s.kinds, s.start_steps, s.end_steps, s.updates, s.batch_size = ("DSDN", "DSDI", "DSDGL", "DSDGEXP"), 8, 4, 12, 16
  s.eval_steps, s.log_every, s.ckpt_every, s.training_steps = (4,), 4, 8, 30


# training_dsd draws the teacher recipe's batches from the training set.
METHOD = contract.Method(name="dsd", order=30, stages=STAGES, config=config_sections, validate=validate, quick=quick,
                         data_batches=("teacher.batch_size",), plan=stages.plan,
                         pipelines={"dsd": ("teacher", "dsd", "tsd", "training_dsd", "evaluate")})
