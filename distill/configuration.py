"""The config schema: the framework's sections (data, model, mesh, sample, eval) with their defaults, plus every
registered method's own sections (`distill.registry`), and one validator that names the field it rejects.

Data-set configs (configs/*.py) start from `base_config()` and change values; `validate` runs in the
entry point after command-line overrides, before anything is written. `apply_variants` gives configs their
combinable `:variant` arguments.
"""
from __future__ import annotations

import ml_collections

from distill import diffusion, models, registry
from distill.validation import ConfigError, choice as _choice, fail as _fail, number as _number  # noqa: F401
from distill.validation import check_unet_size, guidance_values, positive_int as _positive_int

DATA_NAMES = ("digits", "cifar10", "imagenet64", "imagenet2012", "npz", "mixture", "fashion_mnist", "image_text")
SCHEDULES = ("cosine", "linear_beta", "scaled_linear_beta")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pipeline = ("teacher",)  # stages run in order; each resumes or skips if already finished

  c.data = ml_collections.ConfigDict(dict(
      name="digits", image_size=8, channels=1, num_classes=10,
      path="",          # .npz file for name='npz'
      data_dir="",      # TFDS data_dir ('' = TFDS default); fashion_mnist: its IDX files ('' = Debian's path)
      num_workers=0,    # TFDS: grain worker processes reading batches ahead (0: threads in the training process)
      prefetch=2,       # TFDS: host batches read ahead (per worker); 0 with num_workers=0: none
      num_examples=4096, mixture_scale=1.0, mixture_std=0.2,  # name='mixture'
      seed=0,
  ))

  c.model = ml_collections.ConfigDict(dict(
      ch=24, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), head_dim=32,
      dropout=0.1, emb_ch=0,            # 0: 4·ch
      num_groups=32, resample_with_resblock=True,
      parameterization="v",             # network output: 'x' | 'eps' | 'v' | 'both'
      schedule="cosine", logsnr_min=-20.0, logsnr_max=20.0,
      # 'unet': the PD/ADM U-Net above (class labels); 'sd_unet': Stable Diffusion's cross-attention U-Net on text
      # conditions (distill/models/text_unet.py), sized by model.sd (its cross_attention_dim is the text encoder's)
      kind="unet",
      sd=ml_collections.ConfigDict(dict(
          block_out_channels=(32, 64), layers_per_block=1, num_attention_heads=4,
          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
          use_linear_projection=False, transformer_layers_per_block=1, norm_num_groups=16,
          dtype="float32",              # compute dtype ('bfloat16' on accelerators); parameters stay float32
          remat=False,                  # gradient checkpointing of the U-Net's blocks (SDUNet.remat)
          weights="",                   # a Stable Diffusion diffusers folder: 'teacher' imports its U-Net (sd_import)
      )),
  ))

  c.latent = ml_collections.ConfigDict(dict(
      enabled=False,                    # diffuse in an autoencoder's latent space (distill/latent.py)
      autoencoder_dir="",               # its finished stage: '' = WORKDIR/autoencoder
  ))

  # Inpainting (distill/conditions.py): the 'teacher_inpaint' stage extends the finished teacher to SD
  # Inpainting's input layout (mask + masked image channels, zero-initialised) and every later stage trains on
  # (label, mask, masked image) conditions of the training data.
  c.inpaint = ml_collections.ConfigDict(dict(
      enabled=False,
      min_frac=0.25, max_frac=0.75,     # training boxes: sides uniform in this fraction of the image's
      p_full=0.25,                      # training masks that cover the whole image (plain generation)
      eval_box=(0.25, 0.0, 1.0, 1.0),   # grids, class agreement and evaluate: the region generated in test images
                                        # (top, left, bottom, right as fractions)
  ))

  for name, section in registry.default_sections().items():
    c[name] = section

  c.train = ml_collections.ConfigDict(dict(
      # Checkpoints written while training goes on (Orbax async): None = on accelerators, off on the CPU.
      async_checkpoints=ml_collections.config_dict.placeholder(bool),
      # A finished stage keeps its checkpoints/ beside final/ (False: only final/, removed once it is written).
      keep_checkpoints=False,
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
      classifier_steps=1500,            # the data set's feature classifier (classifier-FID, class agreement):
      classifier_widths=(16, 32, 64),   # its conv widths (multiples of 8), penultimate width and batch
      classifier_features=64,
      classifier_batch_size=128,
      w_values=(0.0, 1.0),              # 'evaluate' stage: guidance strengths scored
      per_class=100,                    # 'evaluate' stage: samples per class for each row
      seeds=1,                          # noise seeds per row (seed + 2000 + i); > 1: each number is the mean over
                                        # seeds and its interval the t-interval over seeds (`protocol.combine_seeds`)
      metric="auto",                    # 'inception' | 'classifier' | 'auto' (classifier for embedded data)
      inception_path="~/.cache/distill/inception_fid_2015-12-05.npz",  # convert_inception's output
      max_reference=50000,              # reference images from the training split (FID statistics, P/R)
      reference_stats="",               # a published .npz (mu, sigma; pytorch-fid's or EDM's) to compute FID against
      is_splits=10, pr_k=3,            # k of precision/recall (Kynkäänniemi et al.: 3)
      dc_k=5,                           # k of density/coverage (Naeem et al.: 5; SFD Table 10)
      bootstrap=100,                    # resamplings for every number's 95 % interval (0: none); each costs one
                                        # FID (a 2048-d eigendecomposition with Inception features)
      teacher_ddpm="all",               # teacher DDPM rows at every step count DDIM is scored at, or 'reference'
                                        # (sample.num_steps only)
      clip_path="",                     # text runs: a CLIP model folder (transformers' layout: config.json,
                                        # model.safetensors, tokenizer): each row also gets its CLIP score
      captions="",                      # text runs: a UTF-8 file, one caption per line, that every row samples
                                        # at (cycled) in place of the test split's captions ('' = those)
  ))
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line) on the first invalid field."""
  if isinstance(c.seed, bool) or not isinstance(c.seed, int) or c.seed < 0:
    _fail("seed", c.seed, "must be an integer >= 0")
  stages = registry.stage_names()
  pipeline = tuple(c.pipeline)
  if not pipeline:
    _fail("pipeline", pipeline, f"must name at least one stage; stages allowed: {', '.join(stages)}")
  for stage in pipeline:
    if stage not in stages:
      _fail("pipeline", pipeline, f"stages allowed: {', '.join(stages)}")
  for stage in pipeline:
    if pipeline.count(stage) > 1:
      _fail("pipeline", pipeline, f"names {stage!r} twice; each stage runs once (a rerun resumes it)")
  if registry.EVALUATE in pipeline[:-1]:
    _fail("pipeline", pipeline, f"{registry.EVALUATE!r} must come last: it scores the stages before it")
  _choice(c, "data.name", DATA_NAMES)
  for f in ("data.image_size", "data.channels", "data.num_classes"):
    _positive_int(c, f)
  for f in ("data.num_workers", "data.prefetch"):
    v = c.data[f.split(".")[1]]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      _fail(f, v, "must be an integer >= 0")

  if not isinstance(c.latent.enabled, bool):
    _fail("latent.enabled", c.latent.enabled, "must be True or False")
  if not isinstance(c.latent.autoencoder_dir, str):
    _fail("latent.autoencoder_dir", c.latent.autoencoder_dir, "must be a path ('' = WORKDIR/autoencoder)")
  if not isinstance(c.inpaint.enabled, bool):
    _fail("inpaint.enabled", c.inpaint.enabled, "must be True or False")
  _number(c, "inpaint.min_frac", 0.0, 1.0, lo_open=True)
  _number(c, "inpaint.max_frac", c.inpaint.min_frac, 1.0)
  _number(c, "inpaint.p_full", 0.0, 1.0)
  box = c.inpaint.eval_box
  if (not isinstance(box, (tuple, list)) or len(box) != 4
      or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 for v in box)
      or not (box[0] < box[2] and box[1] < box[3])):
    _fail("inpaint.eval_box", box, "must be (top, left, bottom, right), fractions in [0, 1] with top < bottom and "
          "left < right")
  if c.latent.enabled and c.sample.clip:
    _fail("sample.clip", c.sample.clip, "must be False in a latent run (latents are not images in [-1, 1])")

  _choice(c, "model.parameterization", diffusion.PARAMETERIZATIONS)
  _choice(c, "model.kind", ("unet", "sd_unet"))
  _choice(c, "model.sd.dtype", ("float32", "bfloat16"))
  if c.model.kind == "sd_unet":
    sd = c.model.sd
    levels = len(tuple(sd.block_out_channels))
    if not levels or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in sd.block_out_channels):
      _fail("model.sd.block_out_channels", tuple(sd.block_out_channels), "must be a non-empty tuple of positive "
            "integers")
    for f in ("down_block_types", "up_block_types"):
      if len(tuple(sd[f])) != levels:
        _fail(f"model.sd.{f}", tuple(sd[f]), f"must name one block per level ({levels}, as block_out_channels)")
    _positive_int(c, "model.sd.layers_per_block")
    if not isinstance(sd.remat, bool):
      _fail("model.sd.remat", sd.remat, "must be True or False")
    if not isinstance(sd.weights, str):
      _fail("model.sd.weights", sd.weights, "must be a path (a Stable Diffusion diffusers folder) or ''")
    _positive_int(c, "model.sd.norm_num_groups")
    try:
      models.sd_unet_from_config(c.model, out_channels=1, in_channels=1, context_dim=8).check()
    except ValueError as e:
      _fail("model.sd", "…", str(e))
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
  if not c.latent.enabled:  # in a latent run the autoencoder's method checks the U-Net against its latents
    check_unet_size(c, c.data.image_size, "data.image_size")
  _number(c, "model.dropout", 0.0, 1.0, hi_open=True)


  _positive_int(c, "sample.num_steps")
  _positive_int(c, "sample.per_cell")
  _positive_int(c, "sample.max_grid_classes")
  _positive_int(c, "sample.batch_size")
  _positive_int(c, "mesh.fsdp")
  if c.train.async_checkpoints is not None and not isinstance(c.train.async_checkpoints, bool):
    _fail("train.async_checkpoints", c.train.async_checkpoints, "must be True, False or None (None: async on "
          "accelerators, not on the CPU)")
  if not isinstance(c.train.keep_checkpoints, bool):
    _fail("train.keep_checkpoints", c.train.keep_checkpoints, "must be True or False")
  if isinstance(c.mesh.fsdp_min_size, bool) or not isinstance(c.mesh.fsdp_min_size, int) or c.mesh.fsdp_min_size < 0:
    _fail("mesh.fsdp_min_size", c.mesh.fsdp_min_size, "must be an integer >= 0")
  if not c.sample.w_values:
    _fail("sample.w_values", tuple(c.sample.w_values), "must name at least one guidance strength")
  guidance_values("sample.w_values", tuple(c.sample.w_values))
  guidance_values("eval.agreement_w", tuple(c.eval.agreement_w))
  guidance_values("eval.w_values", tuple(c.eval.w_values))
  for f in ("agreement_steps", "agreement_per_class", "classifier_steps", "per_class", "max_reference", "is_splits",
            "pr_k", "dc_k", "classifier_features", "classifier_batch_size"):
    _positive_int(c, f"eval.{f}")
  widths = c.eval.classifier_widths
  if (not isinstance(widths, (tuple, list)) or not widths
      or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 or w % 8 for w in widths)):
    _fail("eval.classifier_widths", widths, "must be a non-empty tuple of positive multiples of 8 (GroupNorm's 8 groups)")
  _choice(c, "eval.metric", ("auto", "classifier", "inception"))
  _choice(c, "eval.teacher_ddpm", ("all", "reference"))
  if isinstance(c.eval.bootstrap, bool) or not isinstance(c.eval.bootstrap, int) or c.eval.bootstrap < 0:
    _fail("eval.bootstrap", c.eval.bootstrap, "must be an integer >= 0 (0: no intervals)")
  if isinstance(c.eval.seeds, bool) or not isinstance(c.eval.seeds, int) or c.eval.seeds < 1:
    _fail("eval.seeds", c.eval.seeds, "must be an integer >= 1 (noise seeds per evaluated row)")
  if not isinstance(c.eval.reference_stats, str):
    _fail("eval.reference_stats", c.eval.reference_stats, "must be a path ('' = the training split's statistics)")
  text_run = bool(c.get("text") and c.text.enabled)
  for field in ("clip_path", "captions"):
    value = c.eval[field]
    if not isinstance(value, str):
      _fail(f"eval.{field}", value, "must be a path ('' = none)")
    if value and not text_run:
      _fail(f"eval.{field}", value, "is for text-to-image runs (text.enabled=True): the CLIP score compares each "
            "sample with its caption; leave it '' here")
  registry.validate(c)


def all_stages() -> tuple[str, ...]:
  """Every registered stage but the opt-in ones ('teacher_inpaint'), in the order one pipeline of all of them runs
  (`evaluate` last)."""
  return registry.default_stage_names()


def apply_variants(config: ml_collections.ConfigDict, arg: str | None, pipelines: dict | None = None, *,
                   quick=None, source: str = "config") -> ml_collections.ConfigDict:
  """A config file's `:variant` argument, a comma-separated list that combines: each name in `pipelines` (default:
  the ones the methods offer, `registry.named_pipelines`) sets config.pipeline (the last one named wins), 'all'
  runs every registered stage, and 'quick' shrinks every
  section to a smoke run — with `quick` given, that function does it and the pipeline stays; otherwise the
  framework's sections shrink here and each method's by its own `quick`, and 'quick' alone runs every stage.
  Raises ValueError (naming `source`) on an unknown variant."""
  names = [a.strip() for a in (arg or "").split(",") if a.strip()]
  pipelines = registry.named_pipelines() if pipelines is None else pipelines
  allowed = ("quick", "all", *pipelines)
  for name in names:
    if name not in allowed:
      raise ValueError(f"{source}: unknown variant {name!r}; allowed: {', '.join(map(repr, allowed))} "
                       "(combine with ',')")
  chosen = [n for n in names if n != "quick"]
  if chosen:
    config.pipeline = all_stages() if chosen[-1] == "all" else tuple(pipelines[chosen[-1]])
  elif "quick" in names and quick is None:
    config.pipeline = all_stages()
  if "quick" in names:
    (quick or shrink)(config)
  return config


def shrink(c: ml_collections.ConfigDict) -> None:
  """A smoke run of the same path: one res block per level, few updates, few samples; every method's sections
  through its own `quick`. Not a result."""
  c.model.num_res_blocks = 1
  c.sample.num_steps = 16
  c.eval.agreement_steps, c.eval.agreement_per_class, c.eval.classifier_steps = 16, 10, 200
  c.eval.w_values, c.eval.per_class = (0.0, 1.0), 10  # w = 1: the single-w baseline's own w is scored too
  registry.quick(c)
