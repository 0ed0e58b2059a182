r"""The embedded default: scikit-learn's 8×8 digits (10 classes), small enough for 2 CPU cores.

Full run (CFG teacher; stage one; deterministic and stochastic halving 64 → 1; single-w and two-student
baselines and encoder distillation, halving 8 → 1; evaluation):
  python -m distill.main --config=configs/digits.py --workdir=runs/digits
The same path end to end in a few minutes:
  python -m distill.main --config=configs/digits.py:quick --workdir=runs/digits_quick

Teacher: U-Net ch 24, mult (1, 2), 2 res blocks, attention at 4×4, v-prediction — 650,689 parameters
(`distill.models.param_count`); Adam 2e-3 with 200 warm-up steps, batch 128, 1,500 steps.
"""
from distill.configuration import base_config


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
  config.eval.agreement_per_class = config.eval.per_class = 50
  config.eval.agreement_steps = 64

  if arg == "quick":  # the same path with one res block per level and few updates: a smoke run, not a result
    config.model.num_res_blocks = 1
    config.teacher.num_steps, config.teacher.batch_size = 150, 64
    config.teacher.log_every = 50
    config.teacher.ckpt_every = 75
    config.sample.num_steps = 16
    config.eval.agreement_steps = 16
    config.eval.agreement_per_class = 10
    config.eval.classifier_steps = 200
    d.stage_one_steps, d.start_steps = 20, 4  # rounds: 2, 1
    d.encoder_start_steps = config.baselines.start_steps = 0
    d.round_steps, d.final_round_steps, d.log_every, d.ckpt_every = 10, 10, 5, 10
    config.eval.w_values, config.eval.per_class = (0.0,), 10
  elif arg:
    raise ValueError(f"configs/digits.py: unknown variant {arg!r}; allowed: 'quick'")
  return config
