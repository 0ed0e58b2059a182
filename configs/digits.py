r"""The embedded default: scikit-learn's 8×8 digits (10 classes), small enough for 2 CPU cores.

Full run (CFG teacher, then its samples and class agreement):
  python -m distill.main --config=configs/digits.py --workdir=runs/digits
The same path end to end in a few minutes:
  python -m distill.main --config=configs/digits.py:quick --workdir=runs/digits_quick

Teacher: U-Net ch 24, mult (1, 2), 2 res blocks, attention at 4×4, v-prediction — 650,689 parameters
(`distill.models.param_count`); Adam 2e-3 with 200 warm-up steps, batch 128, 2,000 steps.
"""
from distill.configuration import base_config


def get_config(arg: str | None = None):
  config = base_config()
  config.data.name = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 10

  if arg == "quick":
    config.teacher.num_steps = 300
    config.teacher.log_every = 50
    config.teacher.ckpt_every = 100
    config.sample.num_steps = 32
    config.eval.agreement_steps = 32
    config.eval.agreement_per_class = 20
    config.eval.classifier_steps = 500
  elif arg:
    raise ValueError(f"configs/digits.py: unknown variant {arg!r}; allowed: 'quick'")
  return config
