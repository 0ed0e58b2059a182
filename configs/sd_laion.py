r"""Stable Diffusion distilled on captioned images: the guided-distillation paper's text-guided runs (Meng et al.
2023, §4.2.3 and App. C.2, LAION-5B at 256×256 and 512×512), from the user's SD weights and image-text data.

  python -m distill.main --config=configs/sd_laion.py:512 --workdir=gs://BUCKET/sd512 \
      --config.autoencoder.weights=/models/stable-diffusion-v1-5 --config.data.path=/data/laion-subset
  python -m distill.main --config=configs/sd_laion.py:256 ...          # App. C.2's 256×256 run (batch 1024)
  python -m distill.main --config=configs/sd_laion.py:512,quick ...    # a path check: few updates, 64² images
  python launch/tpu.py up --dry-run --name=distill-sd --zone=us-central2-b --accelerator=v4-64 \
      --experiment=sd-laion-512 --root=gs://BUCKET/distill                # the Cloud TPU command

Variants (comma-separated, they combine): '512' (the default) or '256' the resolution; 'quick'.

The SD folder: a diffusers copy of Stable Diffusion 1.x or 2.x-base (model_index.json, unet/, text_encoder/,
tokenizer/, scheduler/, vae/; docs/stable_diffusion.md). --config.autoencoder.weights names it once: the
autoencoder stage reads its vae/, and the SD fields below (`SD_FIELDS`) point at the same folder through a
FieldReference. The data: data.name='image_text', data.path=DIR, a directory of images with captions
(distill/image_text.py: same-name .txt files or captions.jsonl).

What runs, in order (config.pipeline):
  autoencoder   SD's VAE from the folder's vae/ (scale factor 0.18215); encodes the data set's latents
                (32×32×4 at 256, 64×64×4 at 512).
  teacher       SD's ε-prediction U-Net made a CFG teacher (`sd_import.teacher_from_sd`: the folder's U-Net, the
                empty prompt's hidden states as the null context) — once the teacher stage reads
                model.sd.weights (SD_FIELDS; see docs/stable_diffusion.md).
  teacher_v     ε → v fine-tuning (C.2: "we first fine-tune the original ε-prediction model to a v-prediction
                model"); the students predict v.
  stage_one     w ~ U[2, 14], constant weighting, 5,000 updates after 1,000 warm-up updates (C.2: 2,000–5,000
                updates; warm-up 100–1,000 at 256, 1,000 at 512).
  distill_deterministic, distill_stochastic
                halving from the 512-step DDIM teacher (C.2: "we start from the DDIM teacher model with 512
                sampling steps") down to 1 step: rounds to 256, …, 8 steps take 5,000 updates and those to 4, 2, 1
                steps 50,000 (C.2: 2,000–5,000 and 10,000–50,000), each after 1,000 warm-up updates; truncated-SNR
                weighting.
  evaluate      FID / IS of 5,000 samples at w ∈ {2, 8} against the test split (Table 2 is at w = 8). The
                paper's protocol, FID and CLIP score on COCO2017 captions: add
                --config.eval.clip_path=CLIP_FOLDER (e.g. a local openai/clip-vit-large-patch14) and
                --config.eval.captions=COCO_CAPTIONS.txt (one per line), and --config.eval.reference_stats=
                the COCO images' FID statistics (docs/text_to_image.md).

Batch: 1,024 at 256, 512 at 512 (C.2). We chose the upper ends of the paper's ranges (5,000 / 50,000 updates;
lower them for the few-thousand-update runs of Fig. 26). Not stated by the paper, ours: learning rates (1e-4,
annealed linearly within each round after its warm-up; 1e-5 for the 10,000-update ε → v fine-tune), stage one's
EMA 0.999, the FSDP width (8 devices per parameter shard group), bf16 compute with float32 parameters, and
gradient checkpointing of the U-Net's blocks (model.sd.remat).

Guidance: this project's x̂ = (1 + w)·x̂_c − w·x̂_∅; SD's scale s = 1 + w (w = 8: s = 9).
"""
import ml_collections

from distill.configuration import apply_variants, base_config

PIPELINE = ("autoencoder", "teacher", "teacher_v", "stage_one", "distill_deterministic", "distill_stochastic",
            "evaluate")
# Stable Diffusion 1.x's U-Net (sd_unet.SD1) in config.model.sd's fields; SD 2.x-base: num_attention_heads
# (5, 10, 20, 20), use_linear_projection=True (and its 1024-wide OpenCLIP text encoder, read from the folder).
SD1_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, num_attention_heads=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                use_linear_projection=False, transformer_layers_per_block=1, norm_num_groups=32)
# SD's VAE, what the folder's vae/ holds (configs/imagenet256_ldm.py's SD_VAE).
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32)
# App. C.2 per resolution: batch, warm-up updates (stage one and every round).
RESOLUTIONS = {256: dict(batch_size=1024, warmup=1000), 512: dict(batch_size=512, warmup=1000)}

# The fields that read the SD folder besides autoencoder.weights; "@sd" means: that folder (a FieldReference).
SD_FIELDS = {
    "model.sd.weights": "@sd",      # the SD folder the 'teacher' stage imports (sd_import.teacher_from_sd)
    "model.sd.remat": True,         # gradient checkpointing of the U-Net's blocks (SDUNet.remat)
    "text.enabled": True,           # a text-to-image run (Context.text)
    "text.encoder_dir": "@sd",      # the frozen text encoder: the SD folder's text_encoder/ + tokenizer/
}


def _set(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def get_config(arg: str | None = None):
  names = [a.strip() for a in (arg or "").split(",") if a.strip()]
  sizes = [int(n) for n in names if n in ("256", "512")]
  rest = ",".join(n for n in names if n not in ("256", "512"))
  size = sizes[-1] if sizes else 512
  r = RESOLUTIONS[size]

  config = base_config()
  d = config.data
  d.name, d.image_size, d.channels, d.num_classes = "image_text", size, 3, 1
  d.path = ml_collections.config_dict.placeholder(str)  # required: the image-text directory
  d.num_workers = 8  # image decoding and cropping in grain worker processes
  config.pipeline = PIPELINE
  config.latent.enabled = True

  a = config.autoencoder
  a.update(SD_VAE)
  a.weights = ml_collections.config_dict.placeholder(str)  # required: the SD folder (its vae/ is read here)
  a.scale_factor = 0.18215
  a.encode_batch_size, a.metric_images = 64, 1000
  for field, value in SD_FIELDS.items():
    _set(config, field, a.get_ref("weights") if value == "@sd" else value)

  m = config.model
  m.kind, m.parameterization, m.schedule = "sd_unet", "v", "scaled_linear_beta"
  m.sd.update(SD1_UNET)
  m.sd.dtype = "bfloat16"
  m.dropout = 0.0
  config.mesh.fsdp = 8

  t = config.teacher
  t.parameterization, t.weighting, t.p_uncond = "eps", "snr", 0.1  # SD's: ε-prediction, captions dropped 10 %
  t.batch_size, t.lr, t.warmup_steps, t.grad_clip, t.ema_decay = r["batch_size"], 1e-5, 1000, 1.0, 0.9999
  t.v_steps, t.v_lr = 10_000, 1e-5
  t.log_every, t.ckpt_every = 100, 1000

  s = config.sample
  s.clip = False  # latents are not images in [-1, 1]
  s.num_steps, s.per_cell, s.batch_size = 512, 2, 32
  s.w_values = (2.0, 4.0, 8.0, 14.0)

  dist = config.distill
  dist.w_min, dist.w_max, dist.batch_size, dist.dropout = 2.0, 14.0, r["batch_size"], 0.0
  dist.stage_one_steps, dist.stage_one_warmup, dist.stage_one_lr = 5000 + r["warmup"], r["warmup"], 1e-4
  dist.stage_one_weighting, dist.stage_one_ema = "constant", 0.999
  dist.start_steps, dist.end_steps = 512, 1
  dist.round_steps, dist.final_round_steps = 5000 + r["warmup"], 50_000 + r["warmup"]
  dist.final_rounds, dist.round_warmup = (4, 2, 1), r["warmup"]
  dist.lr, dist.weighting = 1e-4, "truncated_snr"
  dist.grid_w = (2.0, 4.0, 8.0, 14.0)
  dist.log_every, dist.ckpt_every = 100, 500

  e = config.eval
  e.metric, e.per_class, e.max_reference, e.is_splits, e.bootstrap = "inception", 5000, 5000, 10, 0
  e.w_values = (2.0, 8.0)
  e.class_agreement = False  # one class: captions condition the run
  e.teacher_ddpm = "reference"

  def quick(config):  # few updates, few samples, 64×64 images (8×8 latents), the folder's own networks: a path check
    config.data.image_size = 64
    config.autoencoder.metric_images = 16
    config.mesh.fsdp = 1
    t = config.teacher
    t.num_steps, t.batch_size, t.log_every, t.ckpt_every, t.warmup_steps, t.v_steps = 4, 8, 2, 2, 1, 4
    config.sample.num_steps, config.sample.batch_size, config.sample.per_cell = 16, 8, 1
    d = config.distill
    d.batch_size, d.stage_one_steps, d.stage_one_warmup, d.start_steps = 8, 4, 1, 16
    d.round_steps, d.final_round_steps, d.round_warmup, d.log_every, d.ckpt_every = 3, 4, 1, 2, 2
    config.eval.per_class, config.eval.max_reference = 8, 100

  return apply_variants(config, rest, {}, quick=quick, source="configs/sd_laion.py")
