"""SFD, SFD-v and the one-NFE second stage (Zhou et al. 2024, Alg. 4–8) as pipeline stages.

The pure pieces (grids, teacher trajectories, AFS, the three losses, the plans, Alg. 8's sampler) live in
`distill.methods.sfd.core`; this module turns them into `train.Stage`s on the run's CFG teacher: the teacher
specs, the batch functions, the stages and the registered 'sfd' sampler.

    WORKDIR/sfd/<variant>/N{nfe:04d}     one SFD student per entry of sfd.nfe           (stage 'sfd')
    WORKDIR/sfd_v/<variant>              one step-conditioned student for all of sfd.v_nfe  (stage 'sfd_v')
    WORKDIR/sfd_one_nfe/<variant>        the one-NFE student of Alg. 7                   (stage 'sfd_one_nfe')

Step counts are NFE, as the paper's tables count them: network evaluations per sample of the student (a
CFG-guided student makes two per step). With AFS (the default) an NFE-n student runs n + 1 Euler intervals on
the EDM grid, the first one analytic (`sfd.analytical_first_step`): the SFD code's "num_steps = n + 2
timestamps". Directory names, `num_sampling_steps`, `eval_steps` and the report's steps column are NFE.

Guidance variants (`<variant>`), both data-free in a class run (a batch is noise and labels, no images):
  cfg   SFD §3.4: distil at guidance scale 1 — our w = 0, the conditional teacher — and guide the student at
        sampling with classifier-free guidance, 2 evaluations per step at every w. A fraction
        sfd.label_dropout of the rows carries the null label, so the unconditional branch that CFG needs at
        sampling follows the teacher's unconditional trajectory too (our choice; the paper does not say).
        Method names 'SFD (CFG)', 'SFD-v (CFG)', 'SFD one-NFE (CFG)'.
  w{w}  the teacher's classifier-free mix at a fixed w (2 teacher evaluations per call) distilled into a
        student without a w input, sampled at that w only (w_range [w, w]), 1 evaluation per step. One per
        entry of sfd.fixed_w. Method names 'SFD (w=1)', ….
A loss form other than 'global' appends itself to both: directories 'cfg-local', 'w1-trajectory', methods
'SFD local (CFG)', so the forms can share a workdir and a report.

Training form (sfd.loss_form):
  global      the paper's Alg. 4/5/6: one optimizer step per student step. A trajectory of grid N takes N − 1
              consecutive updates under AFS, each the loss of `sfd.global_loss` at step k = 1 … N − 1 from the
              student's own detached rollout (k − 1 extra forward evaluations), N traced: one compilation serves
              every N. The teacher trajectory of the trajectory's noise is computed ONCE, by the batch function,
              and served to all its updates.
  trajectory  `sfd.trajectory_loss`: the N − 1 step losses of a trajectory averaged into one update (gradients
              all at the same parameters). On the 2-core CPU its scanned backward pass measured 9 s (N = 3)
              and 24 s (N = 6) per update for the digits U-Net, against 0.16–0.6 s per global update: the
              digits config uses 'global'.
  local       the vanilla trajectory distillation of Alg. 3, the paper's baseline: each update draws data x_0
              (the run's training set: this form is NOT data-free), a grid N (from the stage's list) and a
              student step k (k ≥ 1 under AFS), noises x_k = x_0 + σ_k ε and regresses the student's Euler step
              onto K teacher solver steps from x_k to σ_{k+1} (`local_targets`, fresh history). As many updates
              as the global form would make for the same sfd.trajectories; one student evaluation each.

The batch function (`TrajectoryBatches`) is a pure function of the trainer step: the plan of (trajectory,
N, k) per update is fixed by the seed, a trajectory's noise and labels come from a generator seeded by
(seed, stage, trajectory), and the teacher states are a jitted, deterministic function of them. In a text or
inpainting run a trajectory's condition is that of training batch `trajectory` instead (`Context.data_conditions`:
its captions' hidden states, or its masks and masked images), its rows dropped to the null label where the
generator's label draw is; every loss, teacher and sampler passes the condition through as a pytree. A one-entry
cache keyed by the trajectory id means the teacher runs once per trajectory; after a resume it reruns for the
trajectory in progress and serves the same numbers, so resumption stays bit-identical.

Cost fields of every student's meta (the evaluate stage sums them into the report's cost table):
teacher_evals_per_update = teacher evaluations of all the plan's trajectories / updates (a CFG teacher call
counts 2), student_evals_per_update = mean forward evaluations per update (rollout included).
"""
from __future__ import annotations

import functools
import os
import zlib
from typing import NamedTuple

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from distill import conditions, contract, optimizers, parallel, samplers, solvers, train
from distill.context import (Context, init_params, load_stage, run_stage, student_model,
                             teacher_model, teacher_params, write_student_grid, x_fn_of)
from distill.methods.sfd import core as sfd

# --- variants and costs -----------------------------------------------------------------------------------------


class Variant(NamedTuple):
  """A guidance variant: 'cfg' (teacher_w None, CFG at sampling) or a fixed teacher w, trained in one loss form.
  Forms other than the paper's 'global' get their own directories and method names ('SFD local (CFG)'), so
  both can sit in one workdir and one report."""
  guidance: str             # 'cfg' or 'w1', 'w2.5'
  teacher_w: float | None   # None: the conditional teacher (w = 0); else the CFG mix at this w
  form: str = "global"      # sfd.loss_form

  @property
  def tag(self) -> str:
    """The directory name: 'cfg', 'w1', or 'cfg-local', 'w1-trajectory' for the other forms."""
    return self.guidance if self.form == "global" else f"{self.guidance}-{self.form}"

  @property
  def guided_sampling(self) -> bool:
    return self.teacher_w is None

  def method(self, base: str) -> str:
    base = base if self.form == "global" else f"{base} {self.form}"
    return f"{base} (CFG)" if self.teacher_w is None else f"{base} (w={self.teacher_w:g})"


def variants(config) -> list[Variant]:
  s = config.sfd
  out = [Variant("cfg", None, s.loss_form)] if s.cfg_student else []
  return out + [Variant(f"w{float(w):g}", float(w), s.loss_form) for w in s.fixed_w]


def grid_steps(nfe: int, afs: bool) -> int:
  """Euler intervals of an NFE-n student: n + 1 with AFS (its first step costs no evaluation), else n."""
  return int(nfe) + (1 if afs else 0)


def solver_evals(solver: solvers.Solver, sigmas, afs: bool = False) -> int:
  """Network evaluations of one `solvers.integrate` run over the grid (before a CFG factor of 2)."""
  s = solvers.check_grid(sigmas)
  return sum(solvers.step_evals(solver, float(s[i + 1]), afs and i == 0) for i in range(len(s) - 1))


def plan_costs(plan: dict, form: str, afs: bool, teacher_evals_of_n) -> dict:
  """Per-example evaluation counts per update of a plan: teacher_evals_per_update (every trajectory the plan
  starts, computed once, spread over the plan's updates) and student_evals_per_update (forward passes: the
  global form's rollout to step k plus the trained step; the trajectory form's N − 1 steps under AFS; the
  local form's one step, its teacher_evals_of_n giving the K-step run of one interval)."""
  updates = len(plan["step_index"])
  if form == "local":
    return {"teacher_evals_per_update": float(np.mean([teacher_evals_of_n(int(n)) for n in plan["num_steps"]])),
            "student_evals_per_update": 1.0}
  starts = np.flatnonzero(np.diff(plan["trajectory"], prepend=-1))
  teacher = sum(teacher_evals_of_n(int(n)) for n in plan["num_steps"][starts])
  first = 1 if afs else 0
  if form == "global":
    student = np.mean(plan["step_index"] - first + 1)
  else:
    student = np.mean(plan["num_steps"] - first)
  return {"teacher_evals_per_update": float(teacher) / updates, "student_evals_per_update": float(student)}


# --- teacher trajectories, served by the batch function ------------------------------------------------------


class TeacherSpec(NamedTuple):
  """What a teacher trajectory is (hashable: the static argument of one jitted function for every stage)."""
  x_fn: object                 # the teacher's x-function (models.x_function or `x_function` above)
  solver: str                  # solvers.SOLVERS name
  k: int                       # teacher sub-steps per student step
  teacher_w: float | None      # None: conditional (w = 0); else CFG mix at this w (2 evaluations per call)
  null_label: int
  sigma_min: float
  sigma_max: float
  rho: float
  afs: bool = False            # the teacher's own first step analytic (a distilled SFD teacher, Alg. 7)
  step_count: bool = False     # the teacher takes the step count of its grid (an SFD-v teacher)
  threshold: float = 0.0       # > 0: dynamic thresholding of every x̂ at this quantile (`solvers.dynamic_threshold`)

  def student_grid(self, n: int) -> np.ndarray:
    """The grid [n+1] of the student it teaches (`sfd.student_grid`); the teacher runs its K-fold refinement."""
    return sfd.student_grid(n, self.sigma_min, self.sigma_max, self.rho)

  def denoiser(self, params, labels, n: int) -> samplers.Denoiser:
    """The teacher at labels [B] (`sfd.denoiser`), told the step count n·K of its grid if it takes one."""
    den = sfd.denoiser(self.x_fn, params, labels, self.teacher_w, self.null_label,
                       steps=self.k * n if self.step_count else None)
    if not self.threshold:
      return den
    return samplers.Denoiser(lambda z, logsnr: solvers.dynamic_threshold(den(z, logsnr), self.threshold),
                             den.evals_per_call)


def teacher_evals(spec: TeacherSpec, n: int) -> int:
  """Teacher network evaluations per example of one trajectory of a grid-n student (CFG counts 2)."""
  per_call = 1 if spec.teacher_w is None else 2
  fine = sfd.refine_grid(spec.student_grid(n), spec.k, spec.rho)
  return per_call * solver_evals(solvers.get_solver(spec.solver), fine, spec.afs)


@functools.partial(jax.jit, static_argnames=("spec", "n"))
def teacher_states(params, noise, labels, *, spec: TeacherSpec, n: int):
  """The teacher's states at the student grid points: [B, n+1, ...] (batch-major, so the batch axis splits over
  devices), noise: [B, ...] N(0, I) (x_init = σ_max·noise), labels: [B]. One solver run over the refined grid,
  read every K-th point (`sfd.teacher_trajectory`; with spec.afs the run's first step is analytic)."""
  grid = spec.student_grid(n)
  states, _ = sfd.teacher_trajectory(solvers.get_solver(spec.solver), spec.denoiser(params, labels, n),
                                     float(grid[0]) * noise, grid, spec.k, spec.rho, afs=spec.afs)
  return jnp.moveaxis(states, 0, 1)


def trajectory_inputs(seed: int, stream: int, trajectory: int, batch_size: int, image_shape, num_classes: int,
                      label_dropout: float):
  """Noise [B, ...] float32 N(0, I) and labels [B] int32 (the null class num_classes with prob. label_dropout)
  of one trajectory: a pure function of (seed, stream, trajectory)."""
  rng = np.random.default_rng([seed, stream, trajectory])
  noise = rng.standard_normal((batch_size,) + tuple(image_shape), dtype=np.float32)
  labels = rng.integers(0, num_classes, batch_size).astype(np.int32)
  drop = rng.random(batch_size) < label_dropout
  return noise, np.where(drop, num_classes, labels).astype(np.int32)


class TrajectoryBatches:
  """step -> this process's rows of update `step`: {'noise' [b, ...], 'label' [b] (or a condition pytree),
  'step_index' int32, 'num_steps' int32 (the trajectory's grid N), 'teacher' [b, N+1, ...], or [b, pad_to+1, ...]
  padded} (numpy). A pure function of the step; the teacher runs once per trajectory (a one-entry cache keyed by
  the plan's trajectory id; `teacher_runs` counts its runs). conditions_fn (`Context.data_conditions`): trajectory
  id -> this process's rows of its condition, its labels then dropped where the drawn labels are null; None:
  the drawn labels are the condition."""

  def __init__(self, plan: dict, teacher_fn, *, seed: int, stream: int, batch_size: int, image_shape,
               num_classes: int, label_dropout: float, pad_to: int | None = None, conditions_fn=None):
    if batch_size % jax.device_count():
      raise ValueError(f"sfd: batch size {batch_size} does not split over the {jax.device_count()} devices; "
                       f"use a multiple of {jax.device_count()}")
    self.plan, self.teacher_fn = plan, teacher_fn
    self.seed, self.stream, self.batch_size = seed, stream, batch_size
    self.image_shape, self.num_classes, self.label_dropout = tuple(image_shape), num_classes, label_dropout
    self.pad_to, self.conditions_fn = pad_to, conditions_fn
    per = batch_size // jax.process_count()
    self.rows = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
    self._key, self._value = None, None
    self.teacher_runs = 0

  def trajectory(self, j: int, n: int):
    if self._key != (j, n):
      noise, labels = trajectory_inputs(self.seed, self.stream, j, self.batch_size, self.image_shape,
                                        self.num_classes, self.label_dropout)
      noise, labels = noise[self.rows], labels[self.rows]
      if self.conditions_fn is not None:  # the drawn labels are in [0, num_classes): null exactly where dropped
        labels = conditions.drop_labels(self.conditions_fn(j), labels == self.num_classes, self.num_classes)
      teacher = np.asarray(self.teacher_fn(n, noise, labels))
      if self.pad_to is not None:  # repeat the last state: never read, it only fixes the shape
        teacher = np.concatenate([teacher] + [teacher[:, -1:]] * (self.pad_to - n), axis=1)
      self._value = (noise, labels, teacher)
      self._key = (j, n)
      self.teacher_runs += 1
    return self._value

  def __call__(self, step: int) -> dict:
    noise, labels, teacher = self.trajectory(int(self.plan["trajectory"][step]), int(self.plan["num_steps"][step]))
    return {"noise": noise, "label": labels, "step_index": np.int32(self.plan["step_index"][step]),
            "num_steps": np.int32(self.plan["num_steps"][step]), "teacher": teacher}


def _on_local_devices(params):
  """(params replicated over this process's devices, put(*rows) splitting row arrays over them)."""
  devices = jax.local_devices()
  if len(devices) == 1:
    return jax.device_put(params), lambda *rows: rows
  mesh = parallel.make_mesh(1, devices)
  sharding = parallel.batch_sharding(mesh)
  return (parallel.place(params, parallel.replicated_shardings(mesh, params)),
          lambda *rows: tuple(jax.device_put(r, sharding) for r in rows))


def local_teacher_fn(spec: TeacherSpec, params):
  """(n, noise, labels) -> teacher states [b, n+1, ...] on this process's devices (rows split over them)."""
  placed, put = _on_local_devices(params)

  def fn(n, noise, labels):
    return teacher_states(placed, *put(noise, labels), spec=spec, n=int(n))
  return fn


def local_teacher_evals(spec: TeacherSpec) -> int:
  """Teacher network evaluations per example of one Alg. 3 target: K steps from a fresh start (CFG counts 2)."""
  per_call = 1 if spec.teacher_w is None else 2
  return per_call * spec.k * solvers.get_solver(spec.solver).evals_per_step


@functools.partial(jax.jit, static_argnames=("spec", "n"))
def local_targets(params, x, labels, sigma, sigma_next, *, spec: TeacherSpec, n: int = 0):
  """Alg. 3, line 6 (`sfd.local_teacher_target`) with the spec's teacher: its state at sigma_next after spec.k
  solver steps from x [B, ...] (VE) at sigma (fresh history). sigma, sigma_next: traced scalars, so one
  compilation serves every grid point (n matters only for a step-count teacher, the SFD-v model of a second
  stage; pass 0 otherwise)."""
  return sfd.local_teacher_target(solvers.get_solver(spec.solver), spec.denoiser(params, labels, n), x, sigma,
                                  sigma_next, spec.k, spec.rho)


class LocalBatches:
  """step -> this process's rows of Alg. 3 update `step`: {'state' x_k [b, ...] (data noised to σ_k, VE),
  'label' [b] (or the batch's condition pytree), 'step_index', 'num_steps' int32, 'target' [b, ...] the
  teacher's state at σ_{k+1}} (numpy). A pure function of the step: data from `data_fn(step)` ({'image',
  'label'}, this process's rows: `Context.train_batches`), noise and null labels from a generator seeded by
  (seed, stream, step), the target from `target_fn`."""

  def __init__(self, plan: dict, data_fn, target_fn, *, seed: int, stream: int, batch_size: int,
               num_classes: int, label_dropout: float, sigmas_of_n):
    self.plan, self.data_fn, self.target_fn = plan, data_fn, target_fn
    self.seed, self.stream, self.batch_size = seed, stream, batch_size
    self.num_classes, self.label_dropout, self.sigmas_of_n = num_classes, label_dropout, sigmas_of_n
    per = batch_size // jax.process_count()
    self.rows = slice(jax.process_index() * per, (jax.process_index() + 1) * per)

  def __call__(self, step: int) -> dict:
    data = self.data_fn(step)
    x0 = np.asarray(data["image"], np.float32)
    n, k = int(self.plan["num_steps"][step]), int(self.plan["step_index"][step])
    rng = np.random.default_rng([self.seed, self.stream, int(self.plan["trajectory"][step])])
    eps = rng.standard_normal((self.batch_size,) + x0.shape[1:], dtype=np.float32)[self.rows]
    drop = (rng.random(self.batch_size) < self.label_dropout)[self.rows]
    labels = conditions.drop_labels(data["label"], drop, self.num_classes)
    sig = self.sigmas_of_n(n)
    x = (x0 + np.float32(sig[k]) * eps).astype(np.float32)
    target = np.asarray(self.target_fn(n, x, labels, float(sig[k]), float(sig[k + 1])))
    return {"state": x, "label": labels, "step_index": np.int32(k), "num_steps": np.int32(n), "target": target}


def local_target_fn(spec: TeacherSpec, params):
  """(n, x, labels, σ_k, σ_{k+1}) -> teacher targets [b, ...] on this process's devices (rows split over them)."""
  placed, put = _on_local_devices(params)

  def fn(n, x, labels, sigma, sigma_next):
    return local_targets(placed, *put(x, labels), jnp.float32(sigma), jnp.float32(sigma_next), spec=spec,
                         n=int(n) if spec.step_count else 0)
  return fn


# --- losses and optimizer -----------------------------------------------------------------------------------


def lpips_metric(metric: str, net: str = "alex", resize: int = 0):
  """The `metric` argument of the sfd losses for sfd.metric: the name itself (checked by the loss), or for
  'lpips' frozen -> d(a, b) = LPIPS(a, b) [B] with the parameters in frozen['lpips'] (`load_lpips_params`),
  both states bilinearly resized to `resize` first (0: as they are)."""
  if metric != "lpips" and not metric.endswith("+lpips"):
    return metric
  from distill.evaluation import lpips  # only runs that ask for it import the trunk code
  of_frozen = lambda frozen: functools.partial(lpips.lpips_distance, lpips.LPIPS(net, frozen["lpips"]),
                                               resize_to=resize or None)
  if metric == "lpips":
    return of_frozen
  base = metric.removesuffix("+lpips")  # 'l1+lpips': the SFD code's second-stage L1 + LPIPS, per example
  return lambda frozen: lambda a, b: sfd.distance(a, b, base) + of_frozen(frozen)(a, b)


def stage_metric(config, one_nfe: bool = False) -> str:
  """The distance a stage trains with: sfd.metric; for the one-NFE stage (Alg. 7) sfd.metric + LPIPS when
  sfd.one_nfe_lpips is set and the LPIPS weight files are given (§4.2: "combining L1 loss with LPIPS loss
  yields better results"; the SFD code adds it at the student's last step, which is the one-NFE student's only
  trained step)."""
  s = config.sfd
  if one_nfe and s.one_nfe_lpips and s.metric != "lpips" and s.lpips.trunk and s.lpips.lin:
    return f"{s.metric}+lpips"
  return s.metric


@functools.lru_cache(maxsize=4)
def load_lpips_params(net: str, trunk: str, lin: str):
  """The LPIPS parameter pytree from the sfd.lpips files (cached: every student of a run shares it)."""
  from distill.evaluation import lpips
  return lpips.load_lpips(net, os.path.expanduser(trunk), os.path.expanduser(lin)).params


def max_grid_steps(config) -> int:
  """The largest student grid of the run's SFD stages (the padded loss's table size)."""
  s = config.sfd
  return max(grid_steps(n, s.afs) for n in tuple(s.nfe) + tuple(s.v_nfe) + (1,))


def loss_of(ctx: Context, student_x, form: str, step_condition: bool, metric: str | None = None):
  """The loss of a student: one function per (student, form, settings) in the process, so every student of one
  architecture shares a compiled step ('global', 'local': every N too; 'trajectory': one compilation per N).
  The student has no w input, so the guidance variant does not enter the loss (its teacher states come in the
  batch)."""
  s = ctx.config.sfd
  return _loss(student_x, form, step_condition, max_grid_steps(ctx.config), metric or s.metric, bool(s.afs),
               float(s.sigma_min), float(s.sigma_max), float(s.rho), s.lpips.net, int(s.lpips.resize))


@functools.lru_cache(maxsize=32)
def _loss(student_x, form, step_condition, max_steps, metric, afs, sigma_min, sigma_max, rho, lpips_net,
          lpips_resize):
  common = dict(metric=lpips_metric(metric, lpips_net, lpips_resize), step_condition=step_condition,
                sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
  if form == "global":
    return sfd.global_loss(student_x, max_steps=max_steps, afs=afs, **common)
  if form == "local":
    return sfd.local_loss(student_x, max_steps=max_steps, **common)
  return sfd.trajectory_loss(student_x, afs=afs, **common)


# --- one student ------------------------------------------------------------------------------------------


def student_meta(config, *, spec: TeacherSpec, step_counts, num_trajectories: int, form: str, lr: float,
                 metric: str, fields: dict) -> contract.StageMeta:
  """An SFD-family student's record: `fields` (the stage's own), its sampler settings and its cost."""
  s = config.sfd
  plan = sfd.make_plan(form, num_trajectories, step_counts, s.afs, config.seed)
  evals = (lambda n: local_teacher_evals(spec)) if form == "local" else (lambda n: teacher_evals(spec, n))
  return contract.StageMeta.of(
      **fields, kind="sfd_student", sampler="sfd", report_sampler="deterministic", w_conditioned=False,
      evals_per_step=2 if fields["guided_sampling"] else 1, batch_size=s.batch_size, loss_form=form,
      trajectories=num_trajectories * s.batch_size, teacher_solver=spec.solver, teacher_substeps=spec.k,
      teacher_threshold=spec.threshold, metric=metric, afs=bool(s.afs), sigma_min=s.sigma_min,
      sigma_max=s.sigma_max, rho=s.rho, lr=float(lr), **plan_costs(plan, form, s.afs, evals))


def train_student(ctx: Context, name: str, *, model, init, spec: TeacherSpec, teacher_params, step_counts,
                  num_trajectories: int, form: str, lr: float, meta: contract.StageMeta):
  """Trains one SFD-family student at WORKDIR/name with its record `meta` (`student_meta`); returns (params,
  meta). step_counts: the grid Ns trajectories draw from (one for SFD, the list for SFD-v); spec: its teacher.
  Null-label rows (sfd.label_dropout) only for CFG-sampled students (meta.extra['guided_sampling'])."""
  c = ctx.config
  s = c.sfd
  plan = sfd.make_plan(form, num_trajectories, step_counts, s.afs, c.seed)
  num_updates = len(plan["step_index"])
  label_dropout = s.label_dropout if meta.extra["guided_sampling"] else 0.0
  stream = zlib.crc32(name.encode())
  if form == "local":
    batches = LocalBatches(plan, ctx.train_batches(s.batch_size),
                           local_target_fn(spec, teacher_params), seed=c.seed, stream=stream,
                           batch_size=s.batch_size, num_classes=c.data.num_classes, label_dropout=label_dropout,
                           sigmas_of_n=spec.student_grid)
  else:
    batches = TrajectoryBatches(plan, local_teacher_fn(spec, teacher_params), seed=c.seed, stream=stream,
                                batch_size=s.batch_size, image_shape=ctx.image_shape,
                                num_classes=c.data.num_classes, label_dropout=label_dropout,
                                pad_to=max_grid_steps(c) if form == "global" else None,
                                conditions_fn=ctx.data_conditions(s.batch_size))
  optimizer, schedule = optimizers.adam_tenfold_drop(float(lr), num_updates)
  metric = meta.extra["metric"]
  student_x = x_fn_of(ctx, model)
  frozen = {"lpips": load_lpips_params(s.lpips.net, s.lpips.trunk, s.lpips.lin)} if "lpips" in metric else {}
  stage = train.Stage(name=name, loss_fn=loss_of(ctx, student_x, form, model.step_embedding, metric),
                      init_params=init, optimizer=optimizer, num_steps=num_updates, batch_fn=batches, seed=c.seed,
                      ema_decay=None, frozen=frozen, log_every=s.log_every, ckpt_every=s.ckpt_every,
                      images_per_step=s.batch_size, lr_schedule=schedule,
                      fsdp=c.mesh.fsdp, fsdp_min_size=c.mesh.fsdp_min_size)
  params, meta = run_stage(ctx, stage, meta)
  write_grid(ctx, name, params, meta)
  return params, meta


def teacher_spec(config, x_fn, teacher_w) -> TeacherSpec:
  """The first-stage teacher: the CFG teacher under sfd.solver with K = sfd.k sub-steps, at w = teacher_w."""
  s = config.sfd
  return TeacherSpec(x_fn, s.solver, int(s.k), teacher_w, config.data.num_classes, float(s.sigma_min),
                     float(s.sigma_max), float(s.rho), threshold=float(s.teacher_threshold))


def one_nfe_spec(config, x_fn, step_condition: bool) -> TeacherSpec:
  """Alg. 7's teacher: the source SFD model's own Euler sampler (AFS as trained), sfd.one_nfe_k steps per
  student step."""
  s = config.sfd
  return TeacherSpec(x_fn, "euler", int(s.one_nfe_k), None, config.data.num_classes, float(s.sigma_min),
                     float(s.sigma_max), float(s.rho), afs=bool(s.afs), step_count=step_condition)


def _w_range(config, variant: Variant) -> list[float]:
  if variant.teacher_w is not None:
    return [variant.teacher_w, variant.teacher_w]
  return [0.0, float(max([config.distill.w_max, *config.eval.w_values, *config.sample.w_values]))]


def _common_fields(config, variant: Variant, method: str, stage_kind: str) -> dict:
  return {"method": variant.method(method), "stage_kind": stage_kind, "guidance": variant.guidance,
          "teacher_w": variant.teacher_w, "guided_sampling": variant.guided_sampling,
          "w_range": _w_range(config, variant), "cost_parents": []}


def _trajectory_batches(config, trajectories: int) -> int:
  """Trajectory batches for a count of example trajectories (the paper's 'generated trajectories')."""
  return max(1, -(-int(trajectories) // config.sfd.batch_size))


def sfd_students(config, x_fn=None):
  """[(name, spec, step_counts, num_trajectories, record)] of stage 'sfd': per variant and entry of sfd.nfe."""
  s = config.sfd
  out = []
  for variant in variants(config):
    spec = teacher_spec(config, x_fn, variant.teacher_w)
    for nfe in s.nfe:
      n = grid_steps(nfe, s.afs)
      fields = dict(_common_fields(config, variant, "SFD", "sfd"), num_sampling_steps=int(nfe),
                    eval_steps=[int(nfe)], grid_steps=n, step_condition=False)
      trajectories = _trajectory_batches(config, s.trajectories)
      meta = student_meta(config, spec=spec, step_counts=[n], num_trajectories=trajectories, form=s.loss_form,
                          lr=s.lr, metric=stage_metric(config), fields=fields)
      out.append((f"sfd/{variant.tag}/N{int(nfe):04d}", spec, [n], trajectories, meta))
  return out


def sfd_v_students(config, x_fn=None):
  """The same for stage 'sfd_v': one step-conditioned student per variant over all of sfd.v_nfe."""
  s = config.sfd
  nfes = [int(n) for n in s.v_nfe]
  out = []
  for variant in variants(config):
    spec = teacher_spec(config, x_fn, variant.teacher_w)
    fields = dict(_common_fields(config, variant, "SFD-v", "sfd_v"), num_sampling_steps=max(nfes),
                  eval_steps=sorted(nfes), grid_steps=grid_steps(max(nfes), s.afs), step_condition=True)
    counts = [grid_steps(n, s.afs) for n in nfes]
    trajectories = _trajectory_batches(config, s.trajectories * len(nfes))
    meta = student_meta(config, spec=spec, step_counts=counts, num_trajectories=trajectories, form=s.loss_form,
                        lr=s.lr, metric=stage_metric(config), fields=fields)
    out.append((f"sfd_v/{variant.tag}", spec, counts, trajectories, meta))
  return out


def one_nfe_students(config, x_fn=None):
  """The same for stage 'sfd_one_nfe' (Alg. 7): per variant, the source model (`one_nfe_source`) as teacher."""
  s = config.sfd
  step_condition = s.one_nfe_from == "sfd_v"
  out = []
  for variant in variants(config):
    source, teacher_nfe = one_nfe_source(config, variant)
    spec = one_nfe_spec(config, x_fn, step_condition)
    n = grid_steps(1, s.afs)
    fields = dict(_common_fields(config, variant, "SFD one-NFE", "sfd_one_nfe"), num_sampling_steps=1,
                  eval_steps=[1], grid_steps=n, step_condition=step_condition, cost_parents=[source],
                  teacher_nfe=teacher_nfe)
    trajectories = _trajectory_batches(config, s.one_nfe_trajectories)
    meta = student_meta(config, spec=spec, step_counts=[n], num_trajectories=trajectories, form=s.loss_form,
                        lr=s.one_nfe_lr, metric=stage_metric(config, one_nfe=True), fields=fields)
    out.append((f"sfd_one_nfe/{variant.tag}", spec, [n], trajectories, meta))
  return out


def plan(config, stage: str) -> list[tuple[str, contract.StageMeta]]:
  """The students `stage` writes, with their records."""
  students = {"sfd": sfd_students, "sfd_v": sfd_v_students, "sfd_one_nfe": one_nfe_students}[stage](config)
  return [(name, meta) for name, _, _, _, meta in students]


# --- stages -------------------------------------------------------------------------------------------------


def run_sfd(ctx: Context):
  """SFD (Alg. 4 global form with AFS, Alg. 5): per variant, one student per NFE of sfd.nfe, each initialised
  from the CFG teacher and trained on sfd.trajectories teacher trajectories. WORKDIR/sfd/<variant>/N{nfe:04d}."""
  t_params = teacher_params(ctx)
  model = student_model(ctx)
  for name, spec, counts, trajectories, meta in sfd_students(ctx.config, x_fn_of(ctx, teacher_model(ctx))):
    train_student(ctx, name, model=model, init=t_params, spec=spec, teacher_params=t_params, step_counts=counts,
                  num_trajectories=trajectories, form=ctx.config.sfd.loss_form, lr=meta.extra["lr"], meta=meta)


def run_sfd_v(ctx: Context):
  """SFD-v (Alg. 6): per variant, one step-conditioned student, N drawn per trajectory from the grids of
  sfd.v_nfe, sfd.trajectories per entry on average (Table 6 †). WORKDIR/sfd_v/<variant>."""
  t_params = teacher_params(ctx)
  model = student_model(ctx, step_embedding=True)
  init = init_params(ctx, model, t_params)
  for name, spec, counts, trajectories, meta in sfd_v_students(ctx.config, x_fn_of(ctx, teacher_model(ctx))):
    train_student(ctx, name, model=model, init=init, spec=spec, teacher_params=t_params, step_counts=counts,
                  num_trajectories=trajectories, form=ctx.config.sfd.loss_form, lr=meta.extra["lr"], meta=meta)


def one_nfe_source(config, variant: Variant) -> tuple[str, int]:
  """(stage dir relative to WORKDIR, teacher NFE) of the model Alg. 7 starts from: the sfd.one_nfe_from model
  run at NFE 2K − 1 (grid 2K under AFS; K without), whose grid's every K-th point is the one-NFE student's."""
  s = config.sfd
  nfe = grid_steps(1, s.afs) * s.one_nfe_k - (1 if s.afs else 0)
  name = f"sfd/{variant.tag}/N{nfe:04d}" if s.one_nfe_from == "sfd" else f"sfd_v/{variant.tag}"
  return name, nfe


def run_second_stage(ctx: Context):
  """Alg. 7, second-stage one-NFE distillation: per variant, a student initialised from a trained SFD (or
  SFD-v) model that is also its teacher — that model's own Euler sampler (AFS as trained) over the grid of
  sfd.one_nfe_k steps per student step, the SFD code's `is_second_stage`. The student takes one Euler step
  (after AFS); lr sfd.one_nfe_lr (10× SFD's, App. D), sfd.one_nfe_trajectories; distance `stage_metric`
  (L1 + LPIPS when its weights are given). WORKDIR/sfd_one_nfe/<variant>."""
  c = ctx.config
  s = c.sfd
  step_condition = s.one_nfe_from == "sfd_v"
  model = student_model(ctx, step_embedding=step_condition)
  for name, spec, counts, trajectories, meta in one_nfe_students(c, x_fn_of(ctx, model)):
    source, teacher_nfe = meta.cost_parents[0], meta.extra["teacher_nfe"]
    src_params, src_meta = load_stage(ctx, source, needed_by="the 'sfd_one_nfe' stage")
    if (src_meta.kind != "sfd_student" or bool(src_meta.extra.get("step_condition")) != step_condition
        or teacher_nfe not in src_meta.steps_scored):
      raise train.TrainingError(f"{ctx.stage_dir(source)}: not an SFD model trained for NFE {teacher_nfe} "
                                f"(sfd.one_nfe_k={s.one_nfe_k}); kind={src_meta.kind!r}")
    train_student(ctx, name, model=model, init=src_params, spec=spec, teacher_params=src_params, step_counts=counts,
                  num_trajectories=trajectories, form=s.loss_form, lr=s.one_nfe_lr, meta=meta)


# --- sampling (Alg. 8) ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("x_fn", "afs", "guided", "step_condition", "null_label"))
def euler_sample(params, z, labels, w, *, num_steps, sigma_table, x_fn, afs: bool, guided: bool,
                 step_condition: bool, null_label: int):
  """`sfd.sample` (Alg. 8) of the student x_fn, jitted: x [B,H,W,C] in [−1, 1] from VP noise z [B,H,W,C]
  (x_init = σ_max·z), labels [B], w [B] (used only when guided: CFG on the student, 2 evaluations per step).
  num_steps: the grid's N (traced: one compilation serves every N), its σs row N of sigma_table
  (`sfd.grid_table`). The final state at σ_min is clipped; the steps are not (training rolled out unclipped)."""
  n = jnp.asarray(num_steps, jnp.int32)
  sig = jnp.asarray(sigma_table)[n]
  den = solvers.ve_denoiser(sfd.denoiser(x_fn, params, labels, w if guided else None, null_label,
                                         steps=n if step_condition else None))
  return jnp.clip(sfd.sample(den, sig[0] * z, sig, n, afs), -1.0, 1.0)


def sample_fn(ctx: Context, params, meta: contract.StageMeta, num_steps: int, sampler: str = "sfd"):
  """The 'sfd' sampler: (fn(z, labels, w) -> x, network evaluations per sample) for an SFD-family student at
  num_steps NFE (its grid: num_steps + 1 intervals under AFS). A CFG-sampled student costs 2 per step."""
  del sampler
  e = meta.extra
  nfe = int(num_steps)
  afs = bool(e["afs"])
  n = grid_steps(nfe, afs)
  size = max(n, max_grid_steps(ctx.config)) if "sfd" in ctx.config else n
  table = sfd.grid_table(size, e["sigma_min"], e["sigma_max"], e["rho"])
  step_condition = bool(e["step_condition"])
  model = student_model(ctx, step_embedding=step_condition)
  guided = bool(e["guided_sampling"])
  fn = functools.partial(euler_sample, params, num_steps=n, sigma_table=table, x_fn=x_fn_of(ctx, model), afs=afs,
                         guided=guided, step_condition=step_condition, null_label=ctx.null_label)
  return fn, (2 if guided else 1) * nfe


def write_grid(ctx: Context, name: str, params, meta: contract.StageMeta):
  """WORKDIR/name/samples.png at the student's default NFE: rows = its w values (distill.grid_w for a
  CFG-sampled student, its own w otherwise), columns = classes, the same noise down a column."""
  if epath.Path(ctx.stage_dir(name), "samples.png").exists():
    return
  ws = ctx.config.distill.grid_w if meta.extra["guided_sampling"] else [meta.extra["teacher_w"]]
  write_student_grid(ctx, name, sample_fn(ctx, params, meta, meta.num_sampling_steps)[0], ws)
