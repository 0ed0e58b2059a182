"""SFD, SFD-v and the one-NFE second stage (Zhou et al. 2024, "Simple and Fast Distillation of Diffusion
Models"): a student whose few Euler steps on the EDM grid land where the teacher's solver lands.

  core.py     the pure pieces, each once: grids, teacher trajectories and targets, AFS, Alg. 8's sampler, the
              global / local / trajectory losses (N traced where the stages need one compilation), the plans
  stages.py   the pipeline stages 'sfd', 'sfd_v', 'sfd_one_nfe' built on them: teacher specs, batch functions,
              the registered 'sfd' sampler

Config section: `sfd`. With sfd.metric='lpips' the LPIPS weight files are loaded before anything is written.
"""
from __future__ import annotations

import math

import ml_collections

from distill import contract, solvers
from distill.methods.sfd import core, stages
from distill.validation import ConfigError, boolean, choice, fail, get, number, positive_int

STAGES = {"sfd": stages.run_sfd, "sfd_v": stages.run_sfd_v, "sfd_one_nfe": stages.run_second_stage}


def config_sections():
  # Step counts are NFE (student network evaluations per sample, as the paper's tables count them); with AFS an
  # NFE-n student takes n + 1 steps.
  return {"sfd": ml_collections.ConfigDict(dict(
      nfe=(2, 3, 4, 5),                 # 'sfd': one student per entry
      v_nfe=(2, 3, 4, 5),               # 'sfd_v': the list L of Alg. 6, one step-conditioned student
      solver="dpmpp_3m", k=4,           # teacher solver and its sub-steps per student step (K)
      # > 0: dynamic thresholding of every teacher x̂ at this quantile. The paper does not mention it; the SFD
      # code's DPM-Solver++ applies it at 0.995 (solver_utils.dynamic_thresholding_fn). 0: off (our default).
      teacher_threshold=0.0,
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
      one_nfe_lpips=True,               # the one-NFE stage adds LPIPS to sfd.metric when sfd.lpips files are given (§4.2)
      log_every=100, ckpt_every=250,
  ))}


def validate(c) -> None:
  """The c.sfd section (SFD / SFD-v / one-NFE second stage)."""
  number(c, "sfd.teacher_threshold", 0.0, 1.0, hi_open=True)
  boolean(c, "sfd.one_nfe_lpips")
  for f in ("nfe", "v_nfe"):
    v = tuple(get(c, f"sfd.{f}"))
    if not v or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in v) or len(set(v)) != len(v):
      fail(f"sfd.{f}", v, "must be a non-empty tuple of distinct positive integers (NFE per sample)")
  choice(c, "sfd.solver", tuple(solvers.SOLVERS))
  choice(c, "sfd.metric", core.DISTANCES + ("lpips",))
  if c.sfd.metric == "lpips":
    choice(c, "sfd.lpips.net", ("alex", "vgg"))
    for f, what in (("trunk", "the torchvision trunk's state dict"), ("lin", "the lpips package's lin weights")):
      if not isinstance(c.sfd.lpips[f], str) or not c.sfd.lpips[f]:
        fail(f"sfd.lpips.{f}", c.sfd.lpips[f], f"sfd.metric='lpips' needs a path to {what} (.pth or .npz); "
              "nothing is downloaded")
    v = c.sfd.lpips.resize
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or 0 < v < 32:
      fail("sfd.lpips.resize", v, "must be 0 (no resize) or an integer >= 32 (the trunk needs >= 31 pixels)")
    if c.sfd.loss_form == "trajectory":
      fail("sfd.loss_form", "trajectory", "sfd.metric='lpips' runs with the 'global' and 'local' forms only")
  choice(c, "sfd.loss_form", core.LOSS_FORMS)
  choice(c, "sfd.one_nfe_from", ("sfd", "sfd_v"))
  for f in ("afs", "cfg_student"):
    boolean(c, f"sfd.{f}")
  for f in ("k", "batch_size", "trajectories", "one_nfe_trajectories", "log_every", "ckpt_every"):
    positive_int(c, f"sfd.{f}")
  v = c.sfd.one_nfe_k
  if isinstance(v, bool) or not isinstance(v, int) or v < 2:
    fail("sfd.one_nfe_k", v, "must be an integer >= 2 (the teacher takes K steps per student step)")
  number(c, "sfd.sigma_min", 0.0, lo_open=True)
  number(c, "sfd.sigma_max", 0.0, lo_open=True)
  if c.sfd.sigma_min >= c.sfd.sigma_max:
    fail("sfd.sigma_min", c.sfd.sigma_min, f"must be below sfd.sigma_max={c.sfd.sigma_max}")
  number(c, "sfd.rho", 0.0, lo_open=True)
  for f in ("lr", "one_nfe_lr"):
    number(c, f"sfd.{f}", 0.0, 1.0, lo_open=True)
  number(c, "sfd.label_dropout", 0.0, 1.0, hi_open=True)
  for w in c.sfd.fixed_w:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
      fail("sfd.fixed_w", w, "guidance strengths must be finite numbers >= 0")
  if not c.sfd.cfg_student and not tuple(c.sfd.fixed_w):
    fail("sfd.cfg_student", False, "with sfd.fixed_w=() no SFD variant is left; set one of them")
  if "sfd_one_nfe" in c.pipeline:
    teacher_nfe = (2 * c.sfd.one_nfe_k - 1) if c.sfd.afs else c.sfd.one_nfe_k
    source = "sfd.nfe" if c.sfd.one_nfe_from == "sfd" else "sfd.v_nfe"
    if teacher_nfe not in tuple(get(c, source)):
      fail("sfd.one_nfe_k", c.sfd.one_nfe_k, f"its teacher is the sfd.one_nfe_from model at NFE {teacher_nfe}, "
            f"which {source}={tuple(get(c, source))} does not train")


def preflight(c) -> None:
  """When a stage trains with LPIPS (sfd.metric='lpips', or the one-NFE stage's L1 + LPIPS): both weight files
  load and fit sfd.lpips.net, before anything is written (the stage reuses what is loaded here)."""
  one_nfe = "sfd_one_nfe" in c.pipeline and "lpips" in stages.stage_metric(c, one_nfe=True)
  if c.sfd.metric != "lpips" and not one_nfe:
    return
  try:
    stages.load_lpips_params(c.sfd.lpips.net, c.sfd.lpips.trunk, c.sfd.lpips.lin)
  except Exception as e:  # noqa: BLE001 — a missing file, a URL that cannot be reached, a wrong key or shape
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    raise ConfigError(f"config.sfd.lpips (trunk={c.sfd.lpips.trunk!r}, lin={c.sfd.lpips.lin!r}): "
                      f"{type(e).__name__}: {lines[0] if lines else ''}") from e


def quick(c) -> None:
  s = c.sfd
  s.nfe, s.v_nfe, s.one_nfe_from, s.one_nfe_k = (2,), (2, 3), "sfd_v", 2
  s.batch_size, s.trajectories, s.one_nfe_trajectories = 16, 16 * 3, 16 * 4
  s.log_every, s.ckpt_every = 5, 10


METHOD = contract.Method(
    name="sfd", order=20, stages=STAGES, samplers={"sfd": stages.sample_fn},
    config=config_sections, validate=validate, preflight=preflight, quick=quick, plan=stages.plan,
    pipelines={"sfd": ("teacher", "sfd", "sfd_v", "sfd_one_nfe", "evaluate")})
