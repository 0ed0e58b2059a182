r"""ImageNet 64×64, class-conditional (TFDS 'imagenet_resized/64x64', 1,000 classes).

  python -m distill.main --config=configs/imagenet64.py --workdir=gs://BUCKET/imagenet64
  python -m distill.main --config=configs/imagenet64.py:quick --workdir=runs/imagenet64_quick  # path check

Teacher: the progressive-distillation ImageNet 64 U-Net (Salimans & Ho 2022, App. E; DESIGN §6), used as
the guided teacher in Meng et al. 2023 (App. C): ch 192, emb 768, mult (1, 2, 3, 4), 3 res blocks,
attention at 32/16/8 with head dim 64, FiLM, resampling in res blocks, dropout 0.1, Adam 3e-4 with 1k
warm-up, grad clip 1.0, EMA 0.9999, batch 2048. 295.9M parameters with this code (`distill.models.param_count`).
The data must be prepared by hand (see the README).
"""
from distill.configuration import base_config


def get_config(arg: str | None = None):
  config = base_config()
  config.data.name = "imagenet64"
  config.data.image_size = 64
  config.data.channels = 3
  config.data.num_classes = 1000

  m = config.model
  m.ch, m.emb_ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 192, 768, (1, 2, 3, 4), 3, (32, 16, 8)
  m.head_dim, m.dropout = 64, 0.1
  t = config.teacher
  t.batch_size, t.lr, t.warmup_steps, t.grad_clip, t.ema_decay = 2048, 3e-4, 1000, 1.0, 0.9999
  # The papers do not state the teacher's step count; this default is ours.
  t.num_steps, t.log_every, t.ckpt_every = 550_000, 1000, 10_000
  t.p_uncond = 0.1
  config.sample.num_steps = 256
  config.sample.per_cell = 2
  config.eval.class_agreement = False

  if arg == "quick":
    m.ch, m.emb_ch, m.num_res_blocks = 32, 0, 1
    t.num_steps, t.batch_size, t.log_every, t.ckpt_every, t.warmup_steps = 20, 8, 5, 10, 5
    config.sample.num_steps = 4
  elif arg:
    raise ValueError(f"configs/imagenet64.py: unknown variant {arg!r}; allowed: 'quick'")
  return config
