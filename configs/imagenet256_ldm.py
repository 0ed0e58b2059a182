r"""ImageNet 256×256, class-conditional, in a pretrained KL-f8 autoencoder's latent space (32×32×4): the
guided-distillation paper's latent class-conditional run (Meng et al. 2023, §4.2.1 and App. C.1).

  python -m distill.main --config=configs/imagenet256_ldm.py --workdir=gs://BUCKET/imagenet256 \
      --config.autoencoder.weights=/path/to/sd-vae          # a diffusers vae/ folder or a single file, see below
  python -m distill.main --config=configs/imagenet256_ldm.py --mode=plan --config.autoencoder.weights=PATH
  python -m distill.main --config=configs/imagenet256_ldm.py:quick --workdir=runs/imagenet256_quick  # path check

Data: TFDS 'imagenet2012' (data.name='imagenet2012'; 'validation' served as 'test', 1,000 classes), prepared
once in array_record format from the two ImageNet tarballs (the one-line error of a missing dataset says how);
each image is center-cropped and resized to 256×256 as ADM prepares ImageNet (`data.center_crop_resize`).

What runs, in order (config.pipeline):
  autoencoder   loads the autoencoder from --config.autoencoder.weights (required: no default; docs/weights.md) —
                SD's VAE or LDM's kl-f8: a diffusers vae/ folder (stabilityai/sd-vae-ft-mse, or a pipeline's vae/),
                an SD single file (v1-5-pruned-emaonly.safetensors / .ckpt: its first_stage_model.* is read) or LDM's
                kl-f8 model.ckpt — scales latents by SD's 0.18215 (autoencoder.scale_factor; 0 measures it), and
                encodes both splits once, 64 images at a time: WORKDIR/autoencoder/latents_{train,test}.npz hold the
                posterior (mean and log-variance, float32 [N, 32, 32, 4]): about 42 GB for the 1,281,167 training
                images, held in host memory while written; the latent stages then hold the scaled means (21 GB).
  teacher       an ε-prediction CFG U-Net trained here on those latents (p_uncond 0.1, ε-MSE). LDM's published
                ImageNet U-Nets cannot be loaded: they are openaimodel UNetModels (cross-attention on a class
                embedding) on a VQ autoencoder's latents (cin256-v2: VQ-f4, 64×64×3), another architecture and
                another latent space than this framework's U-Net and AutoencoderKL; pointing distill.teacher_dir at
                their weight file is refused in one line. distill.teacher_dir=RUN/teacher_v reuses a teacher trained
                by this framework.
  teacher_v     ε → v fine-tuning (App. C.1: "we first fine-tune the original ε-prediction model to a v-prediction
                model"); the students predict v.
  stage_one     w ~ U[0, 14], constant weighting, 2,000 updates after 500 warm-up updates (C.1: "extra 500 learning
                rate warm-up steps"), batch 2048; target: the teacher's CFG mix.
  distill_deterministic, distill_stochastic
                halving from the 512-step DDIM teacher (C.1: "start from the DDIM teacher model with 512 sampling
                steps") down to 1 step: rounds to 256, 128, …, 8 steps take 2,000 updates and those to 4, 2, 1 steps
                20,000 (distill.final_rounds), each after 500 warm-up updates (distill.round_warmup); truncated-SNR
                weighting; batch 2048.
  evaluate      FID, IS, precision/recall of 50,000 decoded samples per row against the training split's Inception
                statistics (eval.inception_path: the converted FID Inception, docs/results.md): 120 rows (teacher
                DDIM at every step count and DDPM at 512, both students at every round, w ∈ {0, 1, 2, 4}), 6M
                samples in all; `--mode=plan` lists them, and eval.w_values or the pipeline trims them.

Settings from App. C.1: ε → v fine-tuning first, the 512-step DDIM teacher target, stage one 2,000 updates with
constant weighting, stage two 2,000 updates per round and 20,000 for the 1-, 2- and 4-step rounds with truncated-SNR
weighting, 500 warm-up updates in both stages (counted here inside each stage's updates: 2,500 and 20,500), batch
2048, w ∈ [0, 14]. (§4.2.1 says batch 512; App. C.1 says 2048, used here.) Not stated by the paper, ours: the
learning rates (1e-4, annealed linearly to 0 within each round after its warm-up, as in pixel space), stage one's
EMA 0.999, the teacher's training (500k updates at batch 2048, lr 1e-4, EMA 0.9999; 50k updates of ε → v
fine-tuning), its schedule (SD's scaled-linear β 0.00085 → 0.012; LDM's ImageNet model used 0.0015 → 0.0195) and
its U-Net: cin256-v2's widths on 32×32 latents — ch 192, mult (1, 2, 3, 5), 2 res blocks, attention at 16/8/4
with head dim 32, no dropout (295.5M parameters with this code, `distill.models.unet.param_count`). The paper does not say which autoencoder its ImageNet LDM used; a KL-f8 (SD's VAE
layout: block_out_channels (128, 256, 512, 512), 2 resnets per level, 4 latent channels, 32 groups) is what
AutoencoderKL loads.

Guidance: this project's x̂ = (1 + w)·x̂_c − w·x̂_∅; LDM's and SD's scale s = 1 + w.
"""
import ml_collections

from distill.configuration import apply_variants, base_config

PIPELINE = ("autoencoder", "teacher", "teacher_v", "stage_one", "distill_deterministic", "distill_stochastic",
            "evaluate")
# Stable Diffusion's VAE (and LDM's kl-f8): what --config.autoencoder.weights must hold.
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32)


def get_config(arg: str | None = None):
  config = base_config()
  d = config.data
  d.name, d.image_size, d.channels, d.num_classes = "imagenet2012", 256, 3, 1000
  d.num_workers = 8  # JPEG decoding and cropping in grain worker processes
  config.pipeline = PIPELINE
  config.latent.enabled = True

  a = config.autoencoder
  a.update(SD_VAE)
  a.weights = ml_collections.config_dict.placeholder(str)  # required: validation names it until it is set
  a.scale_factor = 0.18215
  a.encode_batch_size, a.metric_images = 64, 10_000

  m = config.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.head_dim = 192, (1, 2, 3, 5), 2, (16, 8, 4), 32
  m.dropout, m.num_groups = 0.0, 32
  m.parameterization = "v"  # the students' and the fine-tuned teacher's; the teacher trains on ε first
  m.schedule = "scaled_linear_beta"

  t = config.teacher
  t.parameterization, t.weighting, t.p_uncond = "eps", "snr", 0.1
  t.num_steps, t.batch_size, t.lr, t.warmup_steps, t.grad_clip, t.ema_decay = 500_000, 2048, 1e-4, 1000, 1.0, 0.9999
  t.v_steps, t.v_lr = 50_000, 1e-4
  t.log_every, t.ckpt_every = 1000, 10_000

  s = config.sample
  s.clip = False  # latents are not images in [-1, 1]
  s.num_steps, s.per_cell, s.batch_size = 512, 2, 64
  s.w_values = (0.0, 1.0, 2.0, 4.0, 8.0, 14.0)

  dist = config.distill
  dist.w_min, dist.w_max, dist.batch_size, dist.dropout = 0.0, 14.0, 2048, 0.0
  dist.stage_one_steps, dist.stage_one_warmup, dist.stage_one_lr = 2500, 500, 1e-4
  dist.stage_one_weighting, dist.stage_one_ema = "constant", 0.999
  dist.start_steps, dist.end_steps = 512, 1
  dist.round_steps, dist.final_round_steps, dist.final_rounds, dist.round_warmup = 2500, 20_500, (4, 2, 1), 500
  dist.lr, dist.weighting = 1e-4, "truncated_snr"
  dist.grid_w = (0.0, 1.0, 2.0, 4.0, 8.0, 14.0)
  dist.log_every, dist.ckpt_every = 100, 500

  e = config.eval
  e.metric, e.per_class, e.max_reference, e.is_splits, e.bootstrap = "inception", 50, 50_000, 10, 0
  e.w_values = (0.0, 1.0, 2.0, 4.0)
  e.class_agreement = False  # no classifier of ImageNet here
  e.teacher_ddpm = "reference"  # teacher DDPM at 512 steps only: each row is 50,000 samples decoded at 256²

  def quick(config):  # tiny sizes and a tiny autoencoder trained here: a path check, not a result
    a = config.autoencoder
    a.weights, a.scale_factor = "", 0.0
    a.block_out_channels, a.layers_per_block, a.norm_num_groups = (16, 16, 16, 16), 1, 8
    a.steps, a.batch_size, a.log_every, a.ckpt_every, a.warmup_steps, a.metric_images = 10, 8, 5, 5, 2, 100
    m = config.model
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.head_dim, m.num_groups = 32, (1, 2), 1, (16,), 32, 8
    t = config.teacher
    t.num_steps, t.batch_size, t.log_every, t.ckpt_every, t.warmup_steps, t.v_steps = 20, 8, 5, 10, 5, 10
    config.sample.num_steps = 16
    d = config.distill
    d.batch_size, d.stage_one_steps, d.stage_one_warmup, d.start_steps = 8, 10, 2, 16  # rounds 8 (short), 4, 2, 1
    d.round_steps, d.final_round_steps, d.round_warmup, d.log_every, d.ckpt_every = 6, 8, 2, 5, 5
    config.eval.per_class, config.eval.max_reference = 1, 1000

  return apply_variants(config, arg, {}, quick=quick, source="configs/imagenet256_ldm.py")
