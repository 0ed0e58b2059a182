r"""The embedded default: scikit-learn's 8×8 digits (10 classes), small enough for 2 CPU cores.

Full run (CFG teacher; stage one; deterministic and stochastic halving 64 → 1; single-w and two-student
baselines and encoder distillation, halving 8 → 1; evaluation):
  python -m distill.main --config=configs/digits.py --workdir=runs/digits
Every registered method (guided distillation and its baselines, SFD, DSD, consistency distillation, …) at toy
sizes in one command, a smoke run of every stage in a few minutes:
  python -m distill.main --config=configs/digits.py:quick --workdir=runs/digits_quick
Variants combine with ',': a pipeline ('sfd', 'dsd', 'all') and 'quick', e.g. configs/digits.py:quick,sfd.

Teacher: U-Net ch 24, mult (1, 2), 2 res blocks, attention at 4×4, v-prediction — 650,689 parameters
(`distill.models.param_count`); Adam 2e-3 with 200 warm-up steps, batch 128, 1,500 steps.
"""
from distill.configuration import apply_variants, base_config


def get_config(arg: str | None = None):
  config = base_config()
  config.data.name = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 10

  config.pipeline = ("teacher", "stage_one", "distill_deterministic", "distill_stochastic", "single_w",
                     "two_student", "encoder", "evaluate")
  d = config.distill
  d.w_min, d.w_max = 0.0, 4.0
  d.stage_one_steps, d.stage_one_lr, d.stage_one_ema = 400, 1e-3, 0.999
  d.start_steps, d.end_steps = 64, 1     # rounds: 32, 16, 8, 4, 2, 1 student steps
  # Updates per round: 120, and 250 for the 2- and 1-step rounds (the paper's pattern: 50k, and 100k for those).
  d.batch_size, d.round_steps, d.final_round_steps = 64, 120, 250
  d.lr = 3e-4
  d.encoder_start_steps = 8              # encoder rounds: 4, 2, 1
  config.baselines.single_w = (1.0,)
  config.baselines.start_steps = 8       # single-w and two-student rounds: 4, 2, 1
  config.teacher.num_steps = 1500
  config.eval.agreement_per_class = 50
  # 2,000 samples per cell: with 500 the bootstrap intervals of neighbouring rows overlapped everywhere.
  config.eval.per_class = 200
  config.eval.agreement_steps = 64

  s = config.dsd  # direct self-distillation (DSD paper) beside guided PD on the same teacher
  # N from 16 (the teacher's 16-step DDIM is within 0.01 of its 128-step FID at w = 0) down to 4: the last
  # depth teaches 2-step sampling; DSDN stays at 16. w over the range the report scores (eval.w_values).
  s.kinds, s.init, s.start_steps, s.end_steps, s.w_min, s.w_max = (
      ("DSDN", "DSDI", "DSDGL", "DSDGEXP"), "teacher", 16, 4, 0.0, 1.0)
  # lr: DSDI at P = 100 (2/4/8-step FID at w = 0): DSD improves at 1e-5, drifts at w = 0 at 1e-4 and collapses
  # at 3e-4, while TSD keeps improving up to 3e-4; one lr serves both, chosen where DSD is stable.
  s.updates, s.batch_size, s.lr = 160, 32, 3e-5
  # Table 3's 4,000-update rows (CelebA-HQ, LSUN): Adam (0.9, 0.98), EMA 0.995, clip 1; cosine to 10 %.
  s.adam_b1, s.adam_b2, s.ema_decay, s.grad_clip, s.lr_final_fraction = 0.9, 0.98, 0.995, 1.0, 0.1
  s.eval_steps, s.log_every, s.ckpt_every = (2, 4, 8), 50, 100
  s.training_steps, s.training_distill_steps = 0, 8  # training DSD: the teacher's 1,500 steps at batch 128

  s = config.sfd  # SFD, SFD-v and the one-NFE second stage beside guided PD on the same teacher
  # NFE 2–5 (grids of 3–6 Euler steps under AFS), the paper's SFD-v list; the second stage learns from the
  # SFD-v model at NFE 5 (K = 3, the SFD code's M = 2). Budgets fit the three stages in ~15 min on 2 cores:
  # 24 trajectory batches of 64 per SFD student (its NFE updates each) and per SFD-v list entry, 100 for the
  # second stage. The student distils the conditional teacher and is guided at sampling (sfd.cfg_student);
  # the fixed-w variant is `--config.sfd.fixed_w="(1.0,)"` (adds its students beside these).
  s.nfe, s.v_nfe, s.one_nfe_from, s.one_nfe_k = (2, 3, 4, 5), (2, 3, 4, 5), "sfd_v", 3
  s.batch_size, s.trajectories, s.one_nfe_trajectories = 64, 64 * 24, 64 * 100
  s.lr, s.one_nfe_lr = 2e-4, 5e-4
  s.cfg_student, s.fixed_w = True, ()
  s.log_every, s.ckpt_every = 50, 100

  # Pipelines a variant names (each keeps the teacher, stage one and deterministic halving for comparison):
  #   python -m distill.main --config=configs/digits.py:dsd --workdir=runs/digits_dsd
  # With a finished digits run's teacher (and its stage one and rounds copied into the workdir for the report):
  #   python -m distill.main --config=configs/digits.py:dsd --workdir=runs/digits_dsd \
  #     --config.distill.teacher_dir=runs/digits/teacher --config.pipeline="('dsd','tsd','training_dsd','evaluate')"
  # Inpainting (SD Inpainting's input layout, §4.2.4): the teacher extended and fine-tuned, then distilled:
  #   python -m distill.main --config=configs/digits.py:inpaint --workdir=runs/digits_inpaint
  #   python -m distill.main --mode=inpaint --checkpoint=runs/digits_inpaint/distill_deterministic/N0004 --w=0,1
  guided = ("teacher", "stage_one", "distill_deterministic")
  pipelines = {"dsd": guided + ("dsd", "tsd", "training_dsd", "evaluate"),
               "sfd": guided + ("sfd", "sfd_v", "sfd_one_nfe", "evaluate"),
               "inpaint": ("teacher", "teacher_inpaint", "stage_one", "distill_deterministic", "evaluate")}
  config.teacher.inpaint_steps, config.teacher.inpaint_lr = 1000, 2e-3  # at 2e-4 the new channels barely learn
  config = apply_variants(config, arg, pipelines, source="configs/digits.py")
  if "inpaint" in (arg or "").split(","):
    config.inpaint.enabled = True
  return config
