"""The config schema: every field with its default, and one validator that names the field it rejects.

Data-set configs (configs/*.py) start from `base_config()` and change values; `validate` runs in the
entry point after command-line overrides, before anything is written.
"""
from __future__ import annotations

import math

import ml_collections

from distill import diffusion

DATA_NAMES = ("digits", "cifar10", "imagenet64", "npz", "mixture")
SCHEDULES = ("cosine", "linear_beta", "scaled_linear_beta")
STAGES = ("teacher", "stage_one", "distill_deterministic", "distill_stochastic", "single_w", "two_student",
          "encoder", "sfd", "sfd_v", "sfd_one_nfe", "dsd", "tsd", "training_dsd", "evaluate")


class ConfigError(ValueError):
  """A config value that is not allowed; the message is one line naming field, value and what is allowed."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pipeline = ("teacher",)  # stages run in order; each resumes or skips if already finished

  c.data = ml_collections.ConfigDict(dict(
      name="digits", image_size=8, channels=1, num_classes=10,
      path="",          # .npz file for name='npz'
      data_dir="",      # TFDS data_dir ('' = TFDS default)
      num_examples=4096, mixture_scale=1.0, mixture_std=0.2,  # name='mixture'
      seed=0,
  ))

  c.model = ml_collections.ConfigDict(dict(
      ch=24, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), head_dim=32,
      dropout=0.1, emb_ch=0,            # 0: 4·ch
      num_groups=32, resample_with_resblock=True,
      parameterization="v",             # network output: 'x' | 'eps' | 'v' | 'both'
      schedule="cosine", logsnr_min=-20.0, logsnr_max=20.0,
  ))

  c.teacher = ml_collections.ConfigDict(dict(
      num_steps=2000, batch_size=128, lr=2e-3, warmup_steps=200, grad_clip=1.0,
      ema_decay=0.999, p_uncond=0.1, weighting="snr_plus_one",  # v-MSE
      log_every=100, ckpt_every=500, skip_nonfinite=False,
  ))

  # Guided distillation (Meng et al. 2023): stage one, then halving rounds; the baselines reuse them.
  c.distill = ml_collections.ConfigDict(dict(
      teacher_dir="",                   # '' = WORKDIR/teacher; or the stage dir of a teacher trained elsewhere
      w_min=0.0, w_max=4.0,             # guidance range of the w-conditioned students
      dropout=0.0,                      # students train without dropout (PD)
      batch_size=128,
      stage_one_steps=1000, stage_one_lr=1e-3, stage_one_warmup=100, stage_one_ema=0.999,
      stage_one_weighting="snr",
      start_steps=64, end_steps=1,      # first round's teacher steps → last student's steps (powers of two)
      encoder_start_steps=0,            # first teacher steps of the encoder chain (0 = start_steps)
      round_steps=500, final_round_steps=1000,  # updates per round; the N = 2 and N = 1 rounds get final_round_steps
      lr=3e-4, grad_clip=1.0,           # Adam, annealed linearly to 0 within each round; no EMA
      weighting="truncated_snr",
      log_every=100, ckpt_every=250,
      grid_w=(0.0, 0.3, 1.0, 2.0, 4.0), # rows of each round's sample grid (columns = classes)
  ))
  c.baselines = ml_collections.ConfigDict(dict(
      single_w=(1.0,),                  # 'single_w': a stage-one student and rounds per fixed w, no w input
      start_steps=0,                    # first teacher steps of the single-w and two-student chains (0 = distill's)
  ))
  # SFD / SFD-v / one-NFE second stage (Zhou et al. 2024; distill/stages/sfd.py). Step counts are NFE (student
  # network evaluations per sample, as the paper's tables count them); with AFS an NFE-n student takes n + 1 steps.
  c.sfd = ml_collections.ConfigDict(dict(
      nfe=(2, 3, 4, 5),                 # 'sfd': one student per entry
      v_nfe=(2, 3, 4, 5),               # 'sfd_v': the list L of Alg. 6, one step-conditioned student
      solver="dpmpp_3m", k=4,           # teacher solver and its sub-steps per student step (K)
      metric="l1",                      # 'l1' | 'l2' | 'pseudo_huber' | 'lpips' (weights from sfd.lpips files)
      lpips=ml_collections.ConfigDict(dict(
          net="alex",                   # 'alex' | 'vgg': the LPIPS trunk
          trunk="",                     # its torchvision state dict (.pth or .npz), e.g. alexnet-owt-7be5be79.pth
          lin="",                       # the lpips package's weights/v0.1/{alex,vgg}.pth (or .npz)
          resize=224,                   # bilinear resize of both states before LPIPS (0: as they are)
      )),
      afs=True, sigma_min=0.006, sigma_max=80.0, rho=7.0,
      loss_form="global",               # 'global': an update per student step (Alg. 4); 'trajectory': per trajectory;
                                        # 'local': Alg. 3 (noised data, one step: not data-free)
      batch_size=128, lr=5e-5,          # Adam, lr ÷ 10 halfway; no EMA
      trajectories=200_000,             # teacher trajectories (examples) per SFD student; per entry of v_nfe for SFD-v
      cfg_student=True,                 # distil the conditional teacher (w = 0), CFG on the student (2 NFE/step)
      fixed_w=(),                       # and/or distil the teacher's CFG mix at each w here (1 NFE/step, that w only)
      label_dropout=0.1,                # cfg students: null-label rows, so CFG's unconditional branch is distilled
      one_nfe_from="sfd_v",             # 'sfd_one_nfe' starts from, and learns from, this stage's model
      one_nfe_k=3,                      # its teacher's Euler steps per student step: the source model at NFE 2K − 1
      one_nfe_lr=5e-4, one_nfe_trajectories=2_000_000,
      log_every=100, ckpt_every=250,
  ))
  # Direct self-distillation (seed paper 004; distill/stages/dsd.py): 'dsd' (Alg. 2), 'tsd' (its frozen-teacher
  # control), 'training_dsd' (Eq. 1). Defaults: Table 3's conditional (ImageNet-256) row and §5.
  c.dsd = ml_collections.ConfigDict(dict(
      kinds=("DSDN", "DSDI", "DSDGL", "DSDGEXP"),  # one student per schedule, in dsd/<KIND> and tsd/<KIND>
      init="teacher",                   # start model: 'teacher' (the CFG teacher) | 'stage_one' (w-conditioned)
      start_steps=64, end_steps=2,      # N of the first and last depths (even; DSDN stays at start_steps)
      updates=5000,                     # P: parameter updates per schedule (as §5 counts them; see stages/dsd.py)
      w_min=1.0, w_max=3.0,             # w ~ U[w_min, w_max] per trajectory (§5)
      batch_size=64,                    # trajectories per update (the paper states none; ours)
      lr=1e-7, lr_final_fraction=0.1,   # cosine annealing over P to lr·lr_final_fraction (Table 3, §5)
      warmup_steps=0,                   # Appendix I mentions a warm-up without its length
      adam_b1=0.99, adam_b2=0.999, grad_clip=1.0, ema_decay=0.9995,
      weighting="truncated_snr",        # Alg. 2: max(e^λ, 1)
      eval_steps=(2, 4, 8),             # step counts each student is scored at (Table 2)
      log_every=100, ckpt_every=500,
      # training DSD: the teacher stage's recipe (model, data, optimiser, EMA) with L = α·L_v + β·L_distill
      training_steps=0,                 # 0: teacher.num_steps (the plain teacher is the same run at β = 0)
      alpha=0.85, beta=0.15,            # §5.2
      training_distill_steps=8,         # N of L_distill's steps t → t − 1/N → t − 2/N (the paper gives none; ours)
      training_weighting="truncated_snr",
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      fsdp=1,                           # devices on the mesh's 'fsdp' axis; the rest form the data axis
      fsdp_min_size=2**18,              # with fsdp > 1: parameters (and their Adam/EMA state) this large are sharded
  ))

  c.sample = ml_collections.ConfigDict(dict(
      num_steps=128,                    # teacher DDIM steps (CFG: 2 evaluations each)
      w_values=(0.0, 0.3, 1.0, 2.0, 4.0),
      per_cell=4,                       # samples per (class, w) in the grid
      max_grid_classes=10,              # grid rows (first classes) for many-class data
      batch_size=250,                   # rows per sampler call (the last call padded): one compiled shape
      clip=True,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      class_agreement=True,             # needs a classifier: embedded data (digits, npz, mixture) only
      agreement_w=(0.0, 1.0),
      agreement_steps=128,
      agreement_per_class=100,
      classifier_steps=1500,
      w_values=(0.0, 1.0),              # 'evaluate' stage: guidance strengths scored
      per_class=100,                    # 'evaluate' stage: samples per class for each row
      metric="auto",                    # 'inception' | 'classifier' | 'auto' (classifier for embedded data)
      inception_path="~/.cache/distill/inception_fid_2015-12-05.npz",  # convert_inception's output
      max_reference=50000,              # reference images from the training split (FID statistics, P/R)
      is_splits=10, pr_k=3,
  ))
  return c


def _fail(field, value, allowed):
  raise ConfigError(f"config.{field}={value!r}: {allowed}")


def _positive_int(c, field):
  v = _get(c, field)
  if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
    _fail(field, v, "must be a positive integer")


def _number(c, field, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
  v = _get(c, field)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    _fail(field, v, "must be a finite number")
  if (v < lo or (lo_open and v == lo)) or (v > hi or (hi_open and v == hi)):
    lb, hb = ("(" if lo_open else "["), (")" if hi_open else "]")
    _fail(field, v, f"must lie in {lb}{lo}, {hi}{hb}")


def _choice(c, field, allowed):
  v = _get(c, field)
  if v not in allowed:
    _fail(field, v, f"allowed: {', '.join(map(repr, allowed))}")


def _get(c, field):
  node = c
  for part in field.split("."):
    if part not in node:
      raise ConfigError(f"config.{field} is missing")
    node = node[part]
  return node


def _validate_sfd(c) -> None:
  """The c.sfd section (SFD / SFD-v / one-NFE second stage)."""
  from distill import solvers  # imported here, not at the top: methods.sfd pulls in the trainer (Orbax)
  from distill.methods import sfd

  for f in ("nfe", "v_nfe"):
    v = tuple(_get(c, f"sfd.{f}"))
    if not v or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in v) or len(set(v)) != len(v):
      _fail(f"sfd.{f}", v, "must be a non-empty tuple of distinct positive integers (NFE per sample)")
  _choice(c, "sfd.solver", tuple(solvers.SOLVERS))
  _choice(c, "sfd.metric", sfd.DISTANCES + ("lpips",))
  if c.sfd.metric == "lpips":
    _choice(c, "sfd.lpips.net", ("alex", "vgg"))
    for f, what in (("trunk", "the torchvision trunk's state dict"), ("lin", "the lpips package's lin weights")):
      if not isinstance(c.sfd.lpips[f], str) or not c.sfd.lpips[f]:
        _fail(f"sfd.lpips.{f}", c.sfd.lpips[f], f"sfd.metric='lpips' needs a path to {what} (.pth or .npz); "
              "nothing is downloaded")
    v = c.sfd.lpips.resize
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or 0 < v < 32:
      _fail("sfd.lpips.resize", v, "must be 0 (no resize) or an integer >= 32 (the trunk needs >= 31 pixels)")
    if c.sfd.loss_form == "trajectory":
      _fail("sfd.loss_form", "trajectory", "sfd.metric='lpips' runs with the 'global' and 'local' forms only")
  _choice(c, "sfd.loss_form", ("global", "trajectory", "local"))
  _choice(c, "sfd.one_nfe_from", ("sfd", "sfd_v"))
  for f in ("afs", "cfg_student"):
    if not isinstance(_get(c, f"sfd.{f}"), bool):
      _fail(f"sfd.{f}", _get(c, f"sfd.{f}"), "must be True or False")
  for f in ("k", "batch_size", "trajectories", "one_nfe_trajectories", "log_every", "ckpt_every"):
    _positive_int(c, f"sfd.{f}")
  v = c.sfd.one_nfe_k
  if isinstance(v, bool) or not isinstance(v, int) or v < 2:
    _fail("sfd.one_nfe_k", v, "must be an integer >= 2 (the teacher takes K steps per student step)")
  _number(c, "sfd.sigma_min", 0.0, lo_open=True)
  _number(c, "sfd.sigma_max", 0.0, lo_open=True)
  if c.sfd.sigma_min >= c.sfd.sigma_max:
    _fail("sfd.sigma_min", c.sfd.sigma_min, f"must be below sfd.sigma_max={c.sfd.sigma_max}")
  _number(c, "sfd.rho", 0.0, lo_open=True)
  for f in ("lr", "one_nfe_lr"):
    _number(c, f"sfd.{f}", 0.0, 1.0, lo_open=True)
  _number(c, "sfd.label_dropout", 0.0, 1.0, hi_open=True)
  for w in c.sfd.fixed_w:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
      _fail("sfd.fixed_w", w, "guidance strengths must be finite numbers >= 0")
  if not c.sfd.cfg_student and not tuple(c.sfd.fixed_w):
    _fail("sfd.cfg_student", False, "with sfd.fixed_w=() no SFD variant is left; set one of them")
  if "sfd_one_nfe" in c.pipeline:
    teacher_nfe = (2 * c.sfd.one_nfe_k - 1) if c.sfd.afs else c.sfd.one_nfe_k
    source = "sfd.nfe" if c.sfd.one_nfe_from == "sfd" else "sfd.v_nfe"
    if teacher_nfe not in tuple(_get(c, source)):
      _fail("sfd.one_nfe_k", c.sfd.one_nfe_k, f"its teacher is the sfd.one_nfe_from model at NFE {teacher_nfe}, "
            f"which {source}={tuple(_get(c, source))} does not train")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line) on the first invalid field."""
  if isinstance(c.seed, bool) or not isinstance(c.seed, int) or c.seed < 0:
    _fail("seed", c.seed, "must be an integer >= 0")
  for stage in c.pipeline:
    if stage not in STAGES:
      _fail("pipeline", tuple(c.pipeline), f"stages allowed: {', '.join(STAGES)}")
  _choice(c, "data.name", DATA_NAMES)
  for f in ("data.image_size", "data.channels", "data.num_classes"):
    _positive_int(c, f)

  _choice(c, "model.parameterization", diffusion.PARAMETERIZATIONS)
  _choice(c, "model.schedule", SCHEDULES)
  _number(c, "model.logsnr_min")
  _number(c, "model.logsnr_max")
  if c.model.logsnr_min >= c.model.logsnr_max:
    _fail("model.logsnr_min", c.model.logsnr_min, f"must be below model.logsnr_max={c.model.logsnr_max}")
  for f in ("model.ch", "model.num_res_blocks", "model.head_dim", "model.num_groups"):
    _positive_int(c, f)
  if not isinstance(c.model.emb_ch, int) or c.model.emb_ch < 0:
    _fail("model.emb_ch", c.model.emb_ch, "must be 0 (= 4·ch) or a positive integer")
  mult = tuple(c.model.ch_mult)
  if not mult or any(not isinstance(m, int) or m <= 0 for m in mult):
    _fail("model.ch_mult", mult, "must be a non-empty tuple of positive integers")
  down = 2 ** (len(mult) - 1)
  if c.data.image_size % down:
    _fail("model.ch_mult", mult, f"{len(mult)} levels halve the resolution {len(mult) - 1} times; "
          f"data.image_size={c.data.image_size} must divide by {down}")
  resolutions = [c.data.image_size // 2**i for i in range(len(mult))]
  for r in c.model.attn_resolutions:
    if r not in resolutions:
      _fail("model.attn_resolutions", tuple(c.model.attn_resolutions), f"resolutions in this U-Net are {resolutions}")
  _number(c, "model.dropout", 0.0, 1.0, hi_open=True)

  t = "teacher"
  for f in ("num_steps", "batch_size", "log_every", "ckpt_every"):
    _positive_int(c, f"{t}.{f}")
  if not isinstance(c.teacher.warmup_steps, int) or c.teacher.warmup_steps < 0:
    _fail("teacher.warmup_steps", c.teacher.warmup_steps, "must be a non-negative integer")
  _number(c, "teacher.lr", 0.0, 1.0, lo_open=True)
  _number(c, "teacher.grad_clip", 0.0, lo_open=True)
  _number(c, "teacher.ema_decay", 0.0, 1.0, hi_open=True)
  _number(c, "teacher.p_uncond", 0.0, 1.0, hi_open=True)
  _choice(c, "teacher.weighting", diffusion.WEIGHTINGS)

  d = "distill"
  for f in ("batch_size", "stage_one_steps", "round_steps", "final_round_steps", "log_every", "ckpt_every"):
    _positive_int(c, f"{d}.{f}")
  _number(c, "distill.w_min", 0.0)
  _number(c, "distill.w_max", 0.0)
  if c.distill.w_min > c.distill.w_max:
    _fail("distill.w_min", c.distill.w_min, f"must not exceed distill.w_max={c.distill.w_max}")
  for f in ("stage_one_lr", "lr"):
    _number(c, f"distill.{f}", 0.0, 1.0, lo_open=True)
  _number(c, "distill.stage_one_ema", 0.0, 1.0, hi_open=True)
  _number(c, "distill.dropout", 0.0, 1.0, hi_open=True)
  _number(c, "distill.grad_clip", 0.0, lo_open=True)
  _choice(c, "distill.weighting", diffusion.WEIGHTINGS)
  _choice(c, "distill.stage_one_weighting", diffusion.WEIGHTINGS)
  for f in ("start_steps", "end_steps"):
    v = c.distill[f]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1):
      _fail(f"distill.{f}", v, "halving needs a power of two (1, 2, 4, …)")
  if c.distill.start_steps <= c.distill.end_steps:
    _fail("distill.start_steps", c.distill.start_steps, f"must exceed distill.end_steps={c.distill.end_steps}")
  for field in ("distill.encoder_start_steps", "baselines.start_steps"):
    v = _get(c, field)
    if v != 0 and (isinstance(v, bool) or not isinstance(v, int) or v <= c.distill.end_steps or v & (v - 1)):
      _fail(field, v, f"0 (= distill.start_steps) or a power of two above distill.end_steps={c.distill.end_steps}")
  for w in tuple(c.distill.grid_w) + tuple(c.baselines.single_w):
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
      _fail("distill.grid_w" if w in tuple(c.distill.grid_w) else "baselines.single_w", w,
            "guidance strengths must be finite numbers >= 0")
  _validate_sfd(c)

  _positive_int(c, "sample.num_steps")
  _positive_int(c, "sample.per_cell")
  _positive_int(c, "sample.max_grid_classes")
  _positive_int(c, "sample.batch_size")
  _positive_int(c, "mesh.fsdp")
  if isinstance(c.mesh.fsdp_min_size, bool) or not isinstance(c.mesh.fsdp_min_size, int) or c.mesh.fsdp_min_size < 0:
    _fail("mesh.fsdp_min_size", c.mesh.fsdp_min_size, "must be an integer >= 0")
  if not c.sample.w_values:
    _fail("sample.w_values", tuple(c.sample.w_values), "must name at least one guidance strength")
  for w in tuple(c.sample.w_values) + tuple(c.eval.agreement_w):
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
      _fail("sample.w_values" if w in tuple(c.sample.w_values) else "eval.agreement_w", w,
            "guidance strengths must be finite numbers >= 0")
  for w in c.eval.w_values:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
      _fail("eval.w_values", w, "guidance strengths must be finite numbers >= 0")
  for f in ("agreement_steps", "agreement_per_class", "classifier_steps", "per_class", "max_reference", "is_splits",
            "pr_k"):
    _positive_int(c, f"eval.{f}")
  _choice(c, "eval.metric", ("auto", "classifier", "inception"))
  _validate_dsd(c)


def _validate_dsd(c) -> None:
  from distill.methods import dsd  # the schedules' own rules (jax is already loaded by diffusion)
  kinds = c.dsd.kinds
  if (not isinstance(kinds, (tuple, list)) or not kinds or len(set(kinds)) != len(kinds)
      or any(k not in dsd.SCHEDULE_KINDS for k in kinds)):
    _fail("dsd.kinds", kinds, f"a non-empty tuple of distinct schedules from {', '.join(dsd.SCHEDULE_KINDS)}")
  _choice(c, "dsd.init", ("teacher", "stage_one"))
  for f in ("start_steps", "end_steps"):
    v = c.dsd[f]
    if isinstance(v, bool) or not isinstance(v, int) or v < 2 or v % 2:
      _fail(f"dsd.{f}", v, "must be an even integer >= 2 (a trajectory position spans two DDIM steps)")
  start, end = c.dsd.start_steps, c.dsd.end_steps
  if start < end:
    _fail("dsd.end_steps", end, f"must not exceed dsd.start_steps={start}")
  ratio = start // end
  if "DSDI" in kinds and (start % end or ratio & (ratio - 1)):
    _fail("dsd.start_steps", start, f"DSDI halves N: dsd.start_steps / dsd.end_steps={end} must be a power of two")
  for f in ("updates", "batch_size", "log_every", "ckpt_every", "training_distill_steps"):
    _positive_int(c, f"dsd.{f}")
  if c.dsd.training_distill_steps < 3:
    _fail("dsd.training_distill_steps", c.dsd.training_distill_steps, "must be >= 3 (rows need t >= 2/N)")
  for kind in kinds:
    steps = start if kind == "DSDN" else end
    plan = dsd.depth_schedule(kind, start, 2 * c.dsd.updates, steps)
    if any(u == 0 for _, u in plan):
      _fail("dsd.updates", c.dsd.updates, f"too few for {kind} over N = {start} -> {steps}: depth "
            f"N={next(n for n, u in plan if u == 0)} gets no trajectory; raise it or narrow the depths")
  _number(c, "dsd.w_min", 0.0)
  _number(c, "dsd.w_max", 0.0)
  if c.dsd.w_min > c.dsd.w_max:
    _fail("dsd.w_min", c.dsd.w_min, f"must not exceed dsd.w_max={c.dsd.w_max}")
  _number(c, "dsd.lr", 0.0, 1.0, lo_open=True)
  _number(c, "dsd.lr_final_fraction", 0.0, 1.0)
  for f in ("warmup_steps", "training_steps"):
    v = c.dsd[f]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      _fail(f"dsd.{f}", v, "must be an integer >= 0")
  if c.dsd.warmup_steps >= c.dsd.updates:
    _fail("dsd.warmup_steps", c.dsd.warmup_steps, f"must be below dsd.updates={c.dsd.updates}")
  for f in ("adam_b1", "adam_b2", "ema_decay"):
    _number(c, f"dsd.{f}", 0.0, 1.0, hi_open=True)
  _number(c, "dsd.grad_clip", 0.0, lo_open=True)
  _choice(c, "dsd.weighting", diffusion.WEIGHTINGS)
  _choice(c, "dsd.training_weighting", diffusion.WEIGHTINGS)
  steps = c.dsd.eval_steps
  if (not isinstance(steps, (tuple, list)) or not steps
      or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in steps)):
    _fail("dsd.eval_steps", steps, "must be a non-empty tuple of positive integers")
  _number(c, "dsd.alpha", 0.0)
  _number(c, "dsd.beta", 0.0)
  if c.dsd.alpha == 0 and c.dsd.beta == 0:
    _fail("dsd.beta", c.dsd.beta, "dsd.alpha and dsd.beta are both 0: the loss would be 0")
  if "training_dsd" in c.pipeline and c.model.parameterization != "v":
    _fail("model.parameterization", c.model.parameterization, "the 'training_dsd' stage trains v-prediction "
          "(Eq. 1); allowed: 'v'")
