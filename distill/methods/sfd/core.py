"""Simple and Fast Distillation (SFD, Zhou et al. 2024): the pure pieces; the trainer owns the loop.

A student takes N Euler steps (Eq. 6) on a decreasing σ_VE grid (EDM ρ = 7 from σ_max = 80 to σ_min = 0.006,
no step to 0: Table 6, docs/design.md §6) and learns to land where the teacher's solver lands after K sub-steps
(DPM-Solver++(3M), K = 4). Everything runs in the EDM / VE view of `distill.solvers`: states x = z/α.

Indexing: the paper counts n = N−1 … 0 from noise to data; here student step k = 0 … N−1 goes from
sigmas[k] to sigmas[k+1] (k = N − 1 − n), and a trajectory [N+1, B, ...] starts with the noise at index 0.

The losses and the sampler take N as a traced value: a grid N is row N of `grid_table`, so one compilation
serves every N ≤ max_steps (a shape-N form compiles once per N, ~40 s each for the digits U-Net on 2 cores).

  student_grid, grid_table    the student grid [N+1] (`solvers.edm_grid` at SFD's σ range) and all of them
                              up to max_steps as the rows of one padded table (the traced form)
  refine_grid                 the teacher's grid [N·K+1]: each interval cut K-fold uniformly in σ^(1/ρ). As in
                              the SFD code, on the ρ-grid of N steps it gives the ρ-grid of N·K steps
  denoiser                    a network (teacher or student) as a `samplers.Denoiser`: conditional, or CFG at w
  teacher_trajectory          Alg. 4, line 5 for every n at once: one solver run over the refined grid (a
                              multistep teacher keeps its history across student steps), read every K-th point
  local_teacher_target        Alg. 3, line 6: Solver(x_{n+1}, t_{n+1}, t_n, K) from a given state, fresh history
  analytical_first_step       Alg. 5 (AFS): ε̂ = x_N/√(1 + t_N²), x_{N−1} = x_N + (t_{N−1} − t_N)ε̂; no network
  student_step, step_loss     Eq. 6 and d(x_n^ψ, x̃_n) at one step, the student's input state detached
  distance                    'l1' (the paper's choice), 'l2', 'pseudo_huber' (Fig. 4c, Table 1)
  sample                      Alg. 8: Euler over the grid, the first step analytic under AFS (N − 1 evaluations);
                              stopped at step k it is the student's rollout of the global loss
  global_loss                 Alg. 4 / 5 / 6 as a LossFn for ONE student step k of a trajectory (batch-driven)
  local_loss                  Alg. 3 as a LossFn: one student step from a served state onto a served target
  trajectory_loss             Alg. 4 / 5 with the N per-step losses of one trajectory averaged, one update
  trajectory_plan, make_plan  which (trajectory, N, k) each trainer update serves; SFD-v draws N ~ U(L) (Alg. 6)

Models are x-functions (see `distill.losses`): x_fn(params, z, logsnr, labels, w, *, train, rng) -> x̂, called on
VP inputs (z = α x, λ = −2 log σ); `labels` is class labels [B] or any condition of `distill.conditions` (a text or
inpainting run's), passed through untouched. An SFD-v student (Alg. 6, App. D.1) also takes steps=[B] int32, the
student's step count N (the grid's intervals, the AFS step included; the SFD code passes N + 1, its count of grid points).
The teacher is x̂_θ(z) conditional (SFD §3.4: distil at guidance scale 1, i.e. our w = 0, and guide the student
at sampling) or classifier-free guided at a fixed w (two evaluations per call); its states come in the batch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill import conditions, samplers, solvers
from distill.losses import LossFn, XFn

DISTANCES = ("l1", "l2", "pseudo_huber")
LOSS_FORMS = ("global", "trajectory", "local")
SIGMA_MIN, SIGMA_MAX, RHO, TEACHER_SUBSTEPS = 0.006, 80.0, 7.0, 4  # Table 6 (pixel-space models)


# --- grids ----------------------------------------------------------------------------------------------------


def student_grid(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                 rho: float = RHO) -> np.ndarray:
  """The student's grid: `solvers.edm_grid` [N+1] float64 from σ_max down to σ_min (no trailing 0) with SFD's
  defaults. Concrete even when called while tracing."""
  return solvers.edm_grid(num_steps, sigma_min, sigma_max, rho)


def grid_table(max_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
               rho: float = RHO) -> np.ndarray:
  """[max_steps+1, max_steps+1] float32: row n (1 ≤ n ≤ max_steps) is student_grid(n) padded with ones, so
  jnp.asarray(table)[n] is the grid of a traced N (row 0 is all ones, never read)."""
  table = np.ones((max_steps + 1, max_steps + 1), np.float32)
  for n in range(1, max_steps + 1):
    table[n, :n + 1] = student_grid(n, sigma_min, sigma_max, rho)
  return table


def refine_grid(sigmas, k: int, rho: float = RHO):
  """Each interval of a decreasing grid [N+1] cut into k, uniformly in σ^(1/ρ): [N·k+1], with
  refine_grid(sigmas, k)[::k] == sigmas exactly. On an EDM ρ-grid it is the ρ-grid of N·k steps. (For a VP grid
  uniform in t, build the fine grid with `solvers.vp_sigmas(N·k, …)` and take every k-th point instead.)

  A concrete grid (numpy, a list of numbers) gives a checked float64 numpy grid, as `solvers.integrate` wants; a
  sequence of jax scalars (e.g. a traced (σ, σ'), Alg. 3's interval at a sampled grid point) gives a float32 jax
  grid by the same formula, for `solvers.integrate_traced`."""
  if any(isinstance(v, jax.Array) for v in sigmas):
    coarse, xp, frac = list(sigmas), jnp, jnp.arange(k + 1, dtype=jnp.float32) / k
    s = [c ** (1.0 / rho) for c in coarse]
  else:
    coarse, xp, frac = solvers.check_grid(sigmas), np, np.arange(k + 1) / k
    s = coarse ** (1.0 / rho)
  n = len(coarse) - 1
  # interval i: its k points from σ_i on, the last interval also its end point
  fine = xp.concatenate([s[i] + frac[:k + (i == n - 1)] * (s[i + 1] - s[i]) for i in range(n)]) ** rho
  if xp is np:
    fine[::k] = coarse  # the grid's own points exactly, not through the round trip of the power
    return fine
  for i, c in enumerate(coarse):
    fine = fine.at[i * k].set(c)
  return fine


# --- the networks as denoisers and the teacher ---------------------------------------------------------------


def denoiser(x_fn: XFn, params, labels, w=None, null_label: int | None = None, steps=None) -> samplers.Denoiser:
  """The x-function at fixed labels [B] (or a `distill.conditions` condition) as a `samplers.Denoiser`, called x_fn(params, z, λ, labels, None) (no w
  input): conditional for w None; else classifier-free guided (1 + w)·x̂_c − w·x̂_∅ at w (scalar or [B]), two
  evaluations per call, the unconditional rows labelled null_label. steps (an int, traced or not): the step count
  told to a step-conditioned (SFD-v) model as steps=[rows] int32."""
  def model_fn(z, logsnr, y, w_):
    del w_
    extra = {"steps": jnp.full(z.shape[:1], steps, jnp.int32)} if steps is not None else {}
    return x_fn(params, z, logsnr, y, None, **extra)

  if w is None:
    return samplers.conditional_denoiser(model_fn, labels)
  if null_label is None:
    raise ValueError("sfd: a guided denoiser (w is not None) needs null_label")
  rows = conditions.label_of(labels).shape
  return samplers.guided_denoiser(model_fn, labels, jnp.broadcast_to(jnp.asarray(w, jnp.float32), rows), null_label)


def teacher_trajectory(solver: solvers.Solver, teacher: samplers.Denoiser, x_init, sigmas, k: int,
                       rho: float = RHO, afs: bool = False):
  """The teacher's states at the student grid points (Alg. 4–6, the x̃_n of every n).

  x_init: [B, ...] VE noise at sigmas[0] (σ_max·ε); sigmas: the student grid [N+1] (concrete); k: teacher
  sub-steps per student step (K). One `solver` run over refine_grid(sigmas, k, rho), so a multistep teacher carries
  its history across student steps and lowers its order only at the end of the whole run, as the SFD code does;
  afs: the run's first step analytic (a distilled SFD model as the teacher, Alg. 7).
  Returns (states [N+1, B, ...] (x_init first), nfe), not differentiated.
  """
  traj, nfe = solvers.solve_trajectory(solver, teacher, x_init, refine_grid(sigmas, k, rho), afs=afs)
  return jax.lax.stop_gradient(traj[::k]), nfe


def local_teacher_target(solver: solvers.Solver, teacher: samplers.Denoiser, x, sigma, sigma_next, k: int,
                         rho: float = RHO):
  """Alg. 3's target: k solver steps from state x [B, ...] at sigma to sigma_next (fresh history), on the interval
  refined as `refine_grid` does, not differentiated. sigma, sigma_next: scalars, Python or traced (one compilation
  serves every grid point)."""
  fine = refine_grid((jnp.asarray(sigma, jnp.float32), jnp.asarray(sigma_next, jnp.float32)), k, rho)
  return jax.lax.stop_gradient(solvers.integrate_traced(solver, solvers.ve_denoiser(teacher), x, fine)[0])


# --- one student step and the sampler ------------------------------------------------------------------------


def analytical_first_step(x, sigma, sigma_next):
  """AFS (Alg. 5): x' = x + (σ' − σ)·x/√(1 + σ²), i.e. Euler with ε̂ = x/√(1 + σ²) — the VP state z = α x —
  in place of a network evaluation. x: [B, ...]; sigma, sigma_next: scalars."""
  return solvers.euler_update(x, solvers.afs_denoised(x, sigma), sigma, sigma_next)


def student_step(x_hat, x, sigma, sigma_next):
  """Eq. 6: the student's Euler step x' = x + (σ' − σ)(x − x̂)/σ = x̂ + (σ'/σ)(x − x̂)."""
  return solvers.euler_update(x, x_hat, sigma, sigma_next)


def student_x_hat(student_x: XFn, params, x, sigma, labels, steps=None, **kwargs):
  """The student's x̂ at VE state x [B, ...], σ scalar (Python or traced), via its VP x-function, called with
  w = 0 (the student has no w input) and, for an SFD-v student, steps=[B] int32 the grid's N."""
  z, logsnr = solvers.ve_to_vp(x, sigma)
  w_b = jnp.zeros(x.shape[:1], jnp.float32)
  extra = {"steps": jnp.full(x.shape[:1], steps, jnp.int32)} if steps is not None else {}
  return student_x(params, z, logsnr, labels, w_b, **extra, **kwargs)


def sample(x_hat_fn: Callable, x_init, sigmas, num_steps, afs: bool = True):
  """Alg. 8: the state after student steps 0 … num_steps − 1 of Euler over sigmas, the first analytic under AFS
  (num_steps − 1 evaluations). x_hat_fn(x, σ) -> x̂ (the student's); x_init: [B, ...] VE noise at sigmas[0]
  (σ_max·ε); sigmas: the grid, or a longer padded row of `grid_table` (only [0 … num_steps] read); num_steps: an
  int or a traced int32 (with AFS ≥ 1). The full grid N samples; stopped at k < N it is the student's own rollout
  to x_k (the global loss's input)."""
  first = 1 if afs else 0
  x = analytical_first_step(x_init, sigmas[0], sigmas[1]) if afs else x_init
  return jax.lax.fori_loop(first, num_steps, lambda i, x: student_step(x_hat_fn(x, sigmas[i]), x, sigmas[i],
                                                                         sigmas[i + 1]), x)


# --- distances and the loss of one step ----------------------------------------------------------------------


def distance(a, b, metric: str = "l1", huber_c: float | None = None):
  """d(a, b) per example: a, b [B, ...] -> [B].

  'l1': mean |a − b|; 'l2': mean (a − b)² (the squared L2 of the paper, per pixel); 'pseudo_huber':
  √(‖a − b‖² + c²) − c over the whole example, c = 0.00054·√d by default (improved consistency training, the
  paper's ref. [49]; the SFD paper does not state its c). Means are over the d = prod(a.shape[1:]) entries.
  A callable metric is called as metric(a, b) -> [B] (LPIPS: `distill.methods.sfd.stages.lpips_metric`).
  """
  if callable(metric):
    return metric(a, b)
  diff = (a - b).reshape(a.shape[0], -1)
  if metric == "l1":
    return jnp.mean(jnp.abs(diff), axis=1)
  if metric == "l2":
    return jnp.mean(diff**2, axis=1)
  if metric == "pseudo_huber":
    c = 0.00054 * np.sqrt(diff.shape[1]) if huber_c is None else huber_c
    sq = jnp.sum(diff**2, axis=1)
    return sq / (jnp.sqrt(sq + c**2) + c)  # = √(‖δ‖² + c²) − c without cancellation near 0
  raise ValueError(f"distance: unknown metric {metric!r}; allowed: {DISTANCES}")


def step_loss(x_hat, x, sigma, sigma_next, target, metric: str = "l1"):
  """Loss of one student step (Alg. 3 and Alg. 4 alike): d(Euler(x, σ → σ'; x̂), x̃) per example [B].

  x: [B, ...] the student's current state (Alg. 3: the noised data; Alg. 4: its own previous output), detached
  here; target: the teacher state x̃ at σ' (detached); x_hat: the student's x̂ at (x, σ), the one path for
  gradients. Returns (d [B], the next student state, detached, for the following step)."""
  x, target = jax.lax.stop_gradient(x), jax.lax.stop_gradient(target)
  x_next = student_step(x_hat, x, sigma, sigma_next)
  return distance(x_next, target, metric), jax.lax.stop_gradient(x_next)


def _metric_of(metric):
  """frozen -> the step_loss metric. metric: a DISTANCES name (checked here, when the loss is built), or a
  function of the trainer's frozen tree returning a callable d(a, b) -> [B] (a distance with parameters:
  LPIPS, `stages.lpips_metric`)."""
  if callable(metric):
    return metric
  distance(jnp.zeros((1, 1)), jnp.zeros((1, 1)), metric)
  return lambda frozen: metric


# --- trainer losses (N traced: one compilation for every grid N ≤ max_steps) --------------------------------


def global_loss(student_x: XFn, *, max_steps: int, metric="l1", afs: bool = True, step_condition: bool = False,
                sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> LossFn:
  """Alg. 4 (SFD), with AFS Alg. 5, with step_condition Alg. 6 (SFD-v): the loss of ONE student step k of one
  trajectory, so that N consecutive trainer updates (N − 1 with AFS) walk one trajectory as the paper does.
  loss_fn(params, frozen, batch, rng); trajectories of any grid N ≤ max_steps in one compiled step.

  batch: noise [B, ...] ε (x_init = σ_max·ε; the SAME for the updates of one trajectory), label [B], step_index k
  and num_steps N int32 scalars (k clipped to [1 under AFS else 0, N − 1]; see `trajectory_plan`), teacher
  [B, ≥ N+1, ...] the teacher's states at the trajectory's grid points 0..N (batch-major, padded beyond N;
  `teacher_trajectory` of that noise, computed once per trajectory by the batch pipeline).

  The student's state x_k is its own rollout with the current parameters (`sample` stopped at k: AFS first, then
  Euler, eval mode, no gradient) — the paper reuses the output of its previous update's forward pass, one update
  older; the rollout costs k − 1 extra student evaluations under AFS. Loss: mean_B d(Euler_ψ(x_k → σ_{k+1}),
  x̃_{k+1}); metric: see `_metric_of`.
  """
  metric_of = _metric_of(metric)
  table = grid_table(max_steps, sigma_min, sigma_max, rho)
  first = 1 if afs else 0

  def loss_fn(params, frozen, batch, rng):
    labels = batch["label"]
    n = jnp.asarray(batch["num_steps"], jnp.int32)
    sig = jnp.asarray(table)[n]
    step = jnp.clip(jnp.asarray(batch["step_index"], jnp.int32), first, n - 1)
    steps = n if step_condition else None
    frozen_params = jax.lax.stop_gradient(params)
    rollout_x_hat = lambda x, sigma: student_x_hat(student_x, frozen_params, x, sigma, labels, steps)
    x = sample(rollout_x_hat, jax.lax.stop_gradient(sig[0] * batch["noise"]), sig, step, afs)  # no gradient
    x_hat = student_x_hat(student_x, params, x, sig[step], labels, steps, train=True, rng=rng)
    target = jnp.take(batch["teacher"], step + 1, axis=1)
    d, _ = step_loss(x_hat, x, sig[step], sig[step + 1], target, metric_of(frozen))
    return jnp.mean(d), {"distance": jnp.mean(d), "student_step": step.astype(jnp.float32)}

  return loss_fn


def local_loss(student_x: XFn, *, max_steps: int, metric="l1", step_condition: bool = False,
               sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> LossFn:
  """Alg. 3 (vanilla trajectory distillation), N and k traced: one compilation for every grid N ≤ max_steps.
  batch: state [B, ...] x_k = x_0 + σ_k ε (data noised to the drawn grid point), label [B], step_index k and
  num_steps N int32 scalars, target [B, ...] = Solver(x_k, σ_k → σ_{k+1}, K sub-steps) (`local_teacher_target`;
  a multistep teacher restarts its history at σ_k, why the paper pairs Alg. 3 with one-step solvers).
  Loss: mean_B d(Euler_ψ(x_k → σ_{k+1}), target); metric: see `_metric_of`."""
  metric_of = _metric_of(metric)
  table = grid_table(max_steps, sigma_min, sigma_max, rho)

  def loss_fn(params, frozen, batch, rng):
    n = jnp.asarray(batch["num_steps"], jnp.int32)
    step = jnp.asarray(batch["step_index"], jnp.int32)
    sig = jnp.asarray(table)[n]
    x = batch["state"]
    x_hat = student_x_hat(student_x, params, x, sig[step], batch["label"], n if step_condition else None,
                          train=True, rng=rng)
    d, _ = step_loss(x_hat, x, sig[step], sig[step + 1], batch["target"], metric_of(frozen))
    return jnp.mean(d), {"distance": jnp.mean(d), "student_step": step.astype(jnp.float32)}

  return loss_fn


def trajectory_loss(student_x: XFn, *, metric="l1", afs: bool = True, step_condition: bool = False,
                    sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> LossFn:
  """Alg. 4 / 5 / 6 compressed to one update per trajectory: the mean over the trained steps of
  d(Euler_ψ(x_k), x̃_{k+1}), each step's input x_k the student's own previous output, detached. Its gradient is
  the mean of the paper's N per-step gradients, all taken at the same parameters (the paper applies each
  before the next step). batch: noise [B, ...], label [B], teacher [B, N+1, ...] (batch-major, unpadded: N is
  its shape, one compilation per N)."""
  metric_of = _metric_of(metric)

  def loss_fn(params, frozen, batch, rng):
    labels = batch["label"]
    states = jax.lax.stop_gradient(jnp.moveaxis(batch["teacher"], 1, 0))
    n = states.shape[0] - 1
    first = 1 if afs else 0
    if n <= first:
      raise ValueError(f"sfd: N={n} steps with afs={afs} leaves no step to train")
    grid = student_grid(n, sigma_min, sigma_max, rho)
    x_init = float(grid[0]) * batch["noise"]
    x = analytical_first_step(x_init, grid[0], grid[1]) if afs else x_init
    sig = jnp.asarray(grid, jnp.float32)
    steps = n if step_condition else None

    def body(x, inputs):
      i, key, target = inputs
      x_hat = student_x_hat(student_x, params, x, sig[i], labels, steps, train=True, rng=key)
      d, x_next = step_loss(x_hat, x, sig[i], sig[i + 1], target, metric_of(frozen))
      return x_next, jnp.mean(d)

    keys = jax.random.split(rng, n - first)
    _, d = jax.lax.scan(body, x, (jnp.arange(first, n), keys, states[first + 1:]))
    return jnp.mean(d), {"distance": jnp.mean(d), "last_step_distance": d[-1]}

  return loss_fn


# --- which trajectory and step each update serves -----------------------------------------------------------


def _first_trained_step(step_counts, afs: bool) -> tuple[list[int], int]:
  counts = [int(n) for n in step_counts]
  first = 1 if afs else 0
  if not counts or min(counts) <= first:
    raise ValueError(f"sfd plan: step_counts={step_counts} must be >= {first + 1} (afs={afs})")
  return counts, first


def trajectory_plan(total_updates: int, step_counts: Sequence[int], afs: bool = True, seed: int = 0) -> dict:
  """Which trajectory, step count N and student step k every trainer update serves, for `global_loss`.

  SFD: step_counts = [N]. SFD-v (Alg. 6): N ~ U(step_counts) drawn per trajectory. A trajectory of N steps
  takes N updates (k = 0..N−1), or N − 1 under AFS (k = 1..N−1). A pure function of its arguments, so a
  resumed run serves the same batches. Returns {'trajectory', 'num_steps', 'step_index'}: [total_updates] int.
  """
  counts, first = _first_trained_step(step_counts, afs)
  rng = np.random.default_rng(seed)
  traj, num, idx = [], [], []
  j = 0
  while len(idx) < total_updates:
    n = counts[rng.integers(len(counts))]
    traj += [j] * (n - first)
    num += [n] * (n - first)
    idx += list(range(first, n))
    j += 1
  cut = lambda a: np.asarray(a[:total_updates], np.int32)
  return {"trajectory": cut(traj), "num_steps": cut(num), "step_index": cut(idx)}


def make_plan(form: str, num_trajectories: int, step_counts, afs: bool, seed: int) -> dict:
  """Which trajectory, grid N and student step k every update of a loss form serves. {'trajectory',
  'num_steps', 'step_index'}: [U] int32, U the number of updates. 'global': `trajectory_plan` cut after
  num_trajectories trajectories (N − 1 updates each under AFS). 'trajectory': one update per trajectory, N
  drawn from step_counts as trajectory_plan draws it (the same N sequence for the same seed). 'local':
  `local_plan` with as many updates as the global plan."""
  if form not in LOSS_FORMS:
    raise ValueError(f"sfd: unknown loss form {form!r}; allowed: {LOSS_FORMS}")
  counts, first = _first_trained_step(step_counts, afs)
  if form == "global":
    plan = trajectory_plan(num_trajectories * max(counts), counts, afs=afs, seed=seed)
    used = int(np.sum(plan["trajectory"] < num_trajectories))  # trajectory_plan is sequential: a prefix
    return {key: v[:used] for key, v in plan.items()}
  if form == "local":
    return local_plan(make_plan("global", num_trajectories, counts, afs, seed), counts, afs, seed)
  rng = np.random.default_rng(seed)
  num = [counts[rng.integers(len(counts))] for _ in range(num_trajectories)]
  return {"trajectory": np.arange(num_trajectories, dtype=np.int32), "num_steps": np.asarray(num, np.int32),
          "step_index": np.zeros(num_trajectories, np.int32)}


def local_plan(global_plan: dict, step_counts, afs: bool, seed: int) -> dict:
  """Alg. 3's plan with as many updates as `global_plan`: update u draws its own data (trajectory = u), a grid N
  uniformly from step_counts and a student step k ~ U{first … N − 1} (first = 1 under AFS: the analytic step
  is never trained)."""
  counts, first = _first_trained_step(step_counts, afs)
  updates = len(global_plan["step_index"])
  rng = np.random.default_rng([seed, 3])
  num = np.asarray(counts, np.int32)[rng.integers(len(counts), size=updates)]
  return {"trajectory": np.arange(updates, dtype=np.int32), "num_steps": num,
          "step_index": rng.integers(first, num).astype(np.int32)}
