r"""Fashion-MNIST (60,000 + 10,000 real 28×28 images, 10 classes, padded to 32×32) in latent space.

The guided-distillation paper's latent half (§4.2, App. C.1) on data that installs here
(`apt-get install dataset-fashion-mnist`): a KL autoencoder of Stable Diffusion's family (32×32×1 → 8×8×4), an
ε-prediction CFG teacher on its latents, ε → v fine-tuning, then every method on the same v teacher — stage one
(w ∈ [0, 4]), deterministic and stochastic halving, the single-w and two-student baselines, SFD, DSD and
consistency distillation — and the evaluation, which decodes every sample and scores it with a classifier
trained on the real images (classifier-FID, 2,000 samples per cell, 95 % bootstrap intervals).

  python -m distill.main --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist
A smoke run of the same path (every stage, toy budgets; a few minutes):
  python -m distill.main --config=configs/fashion_mnist.py:quick --workdir=runs/fashion_mnist_quick
Pixel space instead (the same pipeline without the autoencoder, sized for one GPU):
  python -m distill.main --config=configs/fashion_mnist.py:pixel --workdir=runs/fashion_mnist_pixel
Image-to-image with any finished stage (SDEdit: noise to --strength, decode with the student):
  python -m distill.main --mode=img2img --checkpoint=runs/fashion_mnist/distill_deterministic/N0004 \
      --strength=0.75 --labels=0,1,7 --w=0,2
Inpainting (SD Inpainting's input layout; the v teacher extended and fine-tuned, then distilled; docs/inpainting.md):
  python -m distill.main --config=configs/fashion_mnist.py:inpaint --workdir=runs/fashion_mnist_inpaint
  python -m distill.main --mode=inpaint --checkpoint=runs/fashion_mnist_inpaint/distill_deterministic/N0004 \
      --mask=box:0.5,0,1,1 --w=0,2
Text-to-image (captions from each image's class and pixels, a text encoder trained here, Stable Diffusion's U-Net
on the latents; docs/text_to_image.md), and its smoke run (`:text_quick` = `:text,quick`):
  python -m distill.main --config=configs/fashion_mnist.py:text --workdir=runs/fashion_mnist_text
  python -m distill.main --config=configs/fashion_mnist.py:text_quick --workdir=runs/fashion_mnist_text_quick
  python -m distill.main --mode=sample --checkpoint=runs/fashion_mnist_text/distill_deterministic/N0004 \
      --prompt="a bright large wide trouser" --prompt="a dark small narrow bag" --w=0,2
Text-guided inpainting (`:text,inpaint`; `--mode=inpaint --prompt=...` on its students).
"""
from distill.configuration import apply_variants, base_config

LATENT_PIPELINE = ("autoencoder", "teacher", "teacher_v", "stage_one", "distill_deterministic", "distill_stochastic",
                   "single_w", "two_student", "sfd", "dsd", "consistency", "evaluate")


# Every method on the text teacher: guided distillation's stage one and deterministic halving, SFD, DSD and CD
# (SFD's and DSD's trajectories take the captions of the training batches).
TEXT_PIPELINE = ("autoencoder", "text_encoder", "teacher", "teacher_v", "stage_one", "distill_deterministic",
                 "sfd", "dsd", "consistency", "evaluate")


def get_config(arg: str | None = None):
  arg = (arg or "").replace("text_quick", "text,quick")
  config = base_config()
  d = config.data
  d.name, d.image_size, d.channels, d.num_classes = "fashion_mnist", 32, 1, 10
  config.pipeline = LATENT_PIPELINE
  config.latent.enabled = True

  a = config.autoencoder  # 32×32×1 → 8×8×4: three levels (two halvings), SD's layout at toy width
  a.block_out_channels, a.layers_per_block, a.latent_channels, a.norm_num_groups = (32, 64, 64), 1, 4, 16
  a.steps, a.batch_size, a.lr = 1500, 64, 1e-3

  # The teacher's network on 8×8×4 latents: the digits U-Net's size (attention at 4×4).
  m = config.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.head_dim = 32, (1, 2), 2, (4,), 32
  m.parameterization = "v"  # the students' (and the fine-tuned teacher's); the teacher trains on ε first
  # Stable Diffusion's discrete schedule (1,000 steps, β scaled-linear 0.00085 → 0.012): its noisiest step has
  # ᾱ = 0.0047 (λ = −5.36), where an ε-predictor is usable. On the cosine schedule's λ = −20 end, x̂ = (z − σε̂)/α
  # multiplies ε's error by σ/α ≈ 22,000 and an ε teacher's DDIM samples are noise (seen on a 2,000-update run).
  m.schedule = "scaled_linear_beta"
  t = config.teacher
  t.parameterization, t.weighting = "eps", "snr"  # ε-MSE, as the LDMs and Stable Diffusion are trained
  t.num_steps, t.batch_size, t.lr, t.warmup_steps = 2500, 128, 1e-3, 200
  t.v_steps, t.v_lr = 600, 2e-4
  t.inpaint_steps, t.inpaint_lr = 1000, 1e-3
  # Latents are not images in [−1, 1]: no clipping of x̂ and no dynamic thresholding anywhere.
  config.sample.clip = False
  config.sample.num_steps = 64  # the teacher's reference row (and the largest DDIM row scored)

  dist = config.distill
  dist.w_min, dist.w_max = 0.0, 4.0
  dist.stage_one_steps, dist.stage_one_lr, dist.stage_one_weighting = 600, 1e-3, "constant"  # App. C.1: constant
  dist.start_steps, dist.end_steps = 64, 1
  dist.batch_size, dist.round_steps, dist.final_round_steps, dist.lr = 64, 150, 300, 3e-4
  dist.weighting = "truncated_snr"  # App. C.1: stage two with truncated SNR
  dist.encoder_start_steps = 8
  config.baselines.single_w = (1.0,)
  config.baselines.start_steps = 8

  s = config.sfd
  s.nfe, s.v_nfe, s.one_nfe_from = (2, 3, 4), (2, 3, 4), "sfd_v"
  s.batch_size, s.trajectories, s.lr, s.teacher_threshold = 64, 64 * 24, 2e-4, 0.0
  s.sigma_max = 14.6  # the schedule's noisiest σ_VE = exp(5.36 / 2): SFD's grid must stay where the teacher trained
  s.cfg_student, s.fixed_w = True, ()

  s = config.dsd
  s.kinds, s.init, s.start_steps, s.end_steps, s.w_min, s.w_max = ("DSDI",), "teacher", 16, 4, 0.0, 2.0
  s.updates, s.batch_size, s.lr, s.eval_steps = 160, 32, 3e-5, (2, 4, 8)

  s = config.consistency
  s.num_steps, s.batch_size, s.lr, s.sample_steps = 1200, 64, 2e-4, (1, 2, 4)

  e = config.eval
  e.w_values = (0.0, 1.0, 2.0)
  e.teacher_ddpm = "reference"  # DDPM at sample.num_steps only: the budgets above fit the run in 90 minutes
  e.per_class = 200  # 2,000 samples per cell
  e.agreement_per_class, e.agreement_steps = 50, 64
  # Held-out accuracy 0.90 at these settings (measured by the autoencoder stage's classifier, 1,600 updates).
  e.classifier_steps, e.classifier_widths, e.classifier_features = 1600, (16, 16, 32, 64, 128), 128

  pipelines = {"pixel": tuple(s for s in LATENT_PIPELINE if s not in ("autoencoder", "teacher_v")),
               "inpaint": ("autoencoder", "teacher", "teacher_v", "teacher_inpaint", "stage_one",
                           "distill_deterministic", "evaluate"),
               "text": TEXT_PIPELINE}
  config = apply_variants(config, arg, pipelines, quick=_quick, source="configs/fashion_mnist.py")
  names = arg.split(",")
  if "inpaint" in names:
    config.inpaint.enabled = True
  if "text" in names:
    _text(config, quick="quick" in names)
  if "text" in names and "inpaint" in names:  # text-guided inpainting: the text teacher extended, then distilled
    i = TEXT_PIPELINE.index("teacher_v") + 1
    config.pipeline = TEXT_PIPELINE[:i] + ("teacher_inpaint",) + TEXT_PIPELINE[i:]
  if "pixel" in (arg or "").split(","):
    _pixel(config)
  return config


def _pixel(config) -> None:
  """Pixel space at 32×32 (for one GPU): the CIFAR-sized U-Net on the images, v-prediction from the start."""
  config.latent.enabled = False
  config.sample.clip = True
  m = config.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.head_dim = 64, (1, 2, 2), 2, (8,), 64
  config.teacher.parameterization, config.teacher.weighting = "", "snr_plus_one"
  m.schedule, config.sfd.sigma_max = "cosine", 80.0  # the pixel-space papers' schedule and SFD grid


def _text(config, quick: bool) -> None:
  """Text-to-image on the latents: Stable Diffusion's U-Net (cross-attention at 8×8 and 4×4) conditioned on the
  captions' hidden states under the text encoder stage's frozen transformer."""
  config.text.enabled = True
  m = config.model
  m.kind = "sd_unet"
  m.sd.block_out_channels, m.sd.layers_per_block, m.sd.num_attention_heads, m.sd.norm_num_groups = (32, 64), 1, 4, 16
  m.sd.down_block_types = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
  m.sd.up_block_types = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  # DSD at the class run's lr 3e-5 takes the SD U-Net away from its teacher (text-image score 24 at w = 0 against
  # the teacher's 64, FID 23): a tenth of it keeps the teacher's samples.
  config.dsd.lr = 3e-6
  if quick:
    m.sd.block_out_channels = (16, 32)


def _quick(config) -> None:
  """Every stage of the latent pipeline at toy budgets (a smoke run, not a result)."""
  from distill.configuration import shrink
  shrink(config)
  config.teacher.parameterization, config.teacher.weighting = "eps", "snr"
  config.eval.max_reference = 10000
