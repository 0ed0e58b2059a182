r"""ImageNet 64×64, class-conditional (TFDS 'imagenet_resized/64x64', 1,000 classes).

  python -m distill.main --config=configs/imagenet64.py --workdir=gs://BUCKET/imagenet64
  python -m distill.main --config=configs/imagenet64.py:quick --workdir=runs/imagenet64_quick  # path check
  python -m distill.main --config=configs/imagenet64.py --mode=plan    # every stage and report row, no training
  python -m distill.main --config=configs/imagenet64.py:sfd ...   # the SFD paper's stages on this teacher (Tables 2-3)
  python -m distill.main --config=configs/imagenet64.py:dsd ...   # the DSD paper's stages (Table 3's hyperparameters)

Teacher: the progressive-distillation ImageNet 64 U-Net (Salimans & Ho 2022, App. E; docs/design.md §6), used as
the guided teacher in Meng et al. 2023 (App. C): ch 192, emb 768, mult (1, 2, 3, 4), 3 res blocks,
attention at 32/16/8 with head dim 64, FiLM, resampling in res blocks, dropout 0.1, Adam 3e-4 with 1k
warm-up, grad clip 1.0, EMA 0.9999, batch 2048. 295.9M parameters with this code (`distill.models.param_count`).
The data must be prepared by hand (see the README).
"""
from distill.configuration import apply_variants, base_config


def get_config(arg: str | None = None):
  config = base_config()
  config.data.name = "imagenet64"
  config.data.image_size = 64
  config.data.channels = 3
  config.data.num_classes = 1000
  # PNG decoding in grain worker processes, off the training process's interpreter (docs/projection.md: one
  # core already supplies ~6x what a v4-64 host consumes).
  config.data.num_workers = 4

  m = config.model
  m.ch, m.emb_ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 192, 768, (1, 2, 3, 4), 3, (32, 16, 8)
  m.head_dim, m.dropout = 64, 0.1
  t = config.teacher
  t.batch_size, t.lr, t.warmup_steps, t.grad_clip, t.ema_decay = 2048, 3e-4, 1000, 1.0, 0.9999
  # The papers do not state the teacher's step count; this default is ours.
  t.num_steps, t.log_every, t.ckpt_every = 550_000, 1000, 10_000
  t.p_uncond = 0.1
  config.sample.num_steps = 1024  # the tables' teacher row: DDIM 1024×2 (Tables 1–2, "Teacher (DDIM 1024x2-step)")
  config.sample.per_cell = 2
  config.eval.class_agreement = False

  # Guided distillation (Meng et al. 2023, App. C.2–C.4): stage one with SNR loss, lr 3e-4, EMA 0.9999,
  # w ~ U[0, 4]; stage two from 1,024 DDIM steps down to 1, 50k updates per round and 100k for the 2- and
  # 1-step rounds, lr 1e-4 annealed linearly to 0 within each round, truncated-SNR loss, no EMA.
  # The paper does not state the stage-one update count; 50k is ours.
  # Every row of the paper's tables: the w-conditioned students (D and S), the single-w baseline at each w of
  # Table 1 (and 2), the naive two-student baseline (arXiv Table 3), encoder distillation (style transfer,
  # Figs. 3-4 and 12: `--mode=style_transfer` on its students); the teacher's DDIM and DDPM rows at every step
  # count (Fig. 2). `python -m distill.main --config=... --mode=plan` lists them without training.
  config.pipeline = ("teacher", "stage_one", "distill_deterministic", "distill_stochastic", "single_w", "two_student",
                     "encoder", "evaluate")
  config.baselines.single_w = (0.0, 0.3, 1.0, 2.0, 4.0)
  d = config.distill
  d.w_min, d.w_max, d.dropout, d.batch_size = 0.0, 4.0, 0.0, 2048
  d.stage_one_steps, d.stage_one_lr, d.stage_one_ema, d.stage_one_weighting = 50_000, 3e-4, 0.9999, "snr"
  d.stage_one_warmup = 1000
  d.start_steps, d.end_steps = 1024, 1
  d.round_steps, d.final_round_steps, d.lr, d.weighting = 50_000, 100_000, 1e-4, "truncated_snr"
  d.log_every, d.ckpt_every = 1000, 5000
  config.eval.w_values = (0.0, 0.3, 1.0, 2.0, 4.0)
  # The paper's protocol: FID on 50,000 samples (here 50 per class) against the training split's
  # statistics, Inception Score over 10 splits, the FID Inception (pytorch-fid's weight file, converted).
  config.eval.metric, config.eval.per_class, config.eval.max_reference, config.eval.is_splits = (
      "inception", 50, 50000, 10)
  # Bootstrap intervals off by default here: each resampling recomputes a 2048-d covariance of 50,000 samples
  # and its eigendecomposition (minutes per row on a host); --config.eval.bootstrap=N turns them on.
  config.eval.bootstrap = 0

  # Direct self-distillation (DSD paper). The paper has no ImageNet 64 run: these are Table 3's values for its
  # conditional model (ImageNet-256, 400.92M parameters, 5,000 updates, lr 1e-7 → 1e-8 cosine, Adam
  # (0.99, 0.999), EMA 0.9995, clip 1), guidance scale s ~ U[1, 3] (§5, latent-diffusion convention: our
  # w = s − 1 ~ U[0, 2]) and N from 64 (§5), scored at 2, 4 and 8 steps (Table 2).
  # Its other rows (CelebA-HQ, LSUN Bedroom, unconditional): 4,000 updates, lr 1e-6 → 1e-7, Adam (0.9, 0.98),
  # EMA 0.995. The batch size is not stated in the paper; 2048 is this data set's distillation batch.
  # Training DSD (§5.2, 64×64 data, α, β = 0.85, 0.15) runs on the teacher's recipe here.
  s = config.dsd
  s.kinds, s.init, s.start_steps, s.end_steps = ("DSDN", "DSDI", "DSDGL", "DSDGEXP"), "teacher", 64, 2
  s.updates, s.w_min, s.w_max, s.batch_size = 5000, 0.0, 2.0, 2048
  s.lr, s.lr_final_fraction, s.adam_b1, s.adam_b2, s.ema_decay, s.grad_clip = 1e-7, 0.1, 0.99, 0.999, 0.9995, 1.0
  s.eval_steps, s.alpha, s.beta = (2, 4, 8), 0.85, 0.15
  s.log_every, s.ckpt_every = 100, 1000

  # SFD / SFD-v / one-NFE second stage (Zhou et al. 2024, Table 6 ImageNet column; App. D): DPM-Solver++(3M)
  # teacher, K = 4, σ_min 0.006, AFS, L1, Adam lr 1e-5 ÷ 10 halfway, batch 128, 200K teacher trajectories per SFD
  # student (per NFE on average for SFD-v, NFE 2–5); second stage from the SFD-v model at NFE 5 (K = 3, the SFD
  # code's M = 2), lr 10× (1e-4), 800K trajectories. The paper's ImageNet 64 rows (Table 3) distil EDM's
  # conditional model without guidance, 1 evaluation per step: here the conditional teacher at w = 0
  # (sfd.fixed_w=(0.0,), sampled at w = 0 only). §3.4's distil-at-scale-1-guide-the-student strategy (2 evaluations
  # per step) is the option sfd.cfg_student=True.
  # The paper's teacher is EDM's ImageNet 64 model; these settings are carried over to our VP teacher unchanged.
  f = config.sfd
  f.nfe, f.v_nfe = (2, 3, 4, 5), (2, 3, 4, 5)
  f.solver, f.k, f.metric, f.afs, f.sigma_min, f.sigma_max, f.rho = "dpmpp_3m", 4, "l1", True, 0.006, 80.0, 7.0
  f.batch_size, f.lr, f.trajectories = 128, 1e-5, 200_000
  f.one_nfe_from, f.one_nfe_k, f.one_nfe_lr, f.one_nfe_trajectories = "sfd_v", 3, 1e-4, 800_000
  f.cfg_student, f.fixed_w, f.log_every, f.ckpt_every = False, (0.0,), 100, 500
  # The SFD code's DPM-Solver++ thresholds every teacher x̂ (p = 0.995, solver_utils.dynamic_thresholding_fn);
  # the paper does not mention it. Used here, as the code that produced the tables ran; 0.0 turns it off.
  f.teacher_threshold = 0.995

  def quick(config):  # tiny sizes: a path check, not a result
    m.ch, m.emb_ch, m.num_res_blocks = 32, 0, 1
    t.num_steps, t.batch_size, t.log_every, t.ckpt_every, t.warmup_steps = 20, 8, 5, 10, 5
    config.sample.num_steps = 4
    d.batch_size, d.stage_one_steps, d.stage_one_warmup, d.start_steps = 8, 10, 2, 4
    d.round_steps, d.final_round_steps, d.log_every, d.ckpt_every = 5, 5, 5, 5

  # Variants combine with ',': the SFD paper's and the DSD paper's pipelines on this teacher, and 'quick'.
  return apply_variants(config, arg, quick=quick, source="configs/imagenet64.py")
