"""Simple and Fast Distillation (SFD, Zhou et al. 2024): the pure pieces; the trainer owns the loop.

A student takes N Euler steps (Eq. 6) on a decreasing σ_VE grid (EDM ρ = 7 from σ_max = 80 to σ_min = 0.006,
no step to 0: Table 6, DESIGN §6) and learns to land where the teacher's solver lands after K sub-steps
(DPM-Solver++(3M), K = 4). Everything runs in the EDM / VE view of `distill.solvers`: states x = z/α.

Indexing: the paper counts n = N−1 … 0 from noise to data; here student step k = 0 … N−1 goes from
sigmas[k] to sigmas[k+1] (k = N − 1 − n), and a trajectory [N+1, B, ...] starts with the noise at index 0.

  student_grid, refine_grid   the student grid [N+1] and the teacher's grid [N·K+1]. As in the SFD code, the
                              teacher runs the ρ-polynomial grid with N·K steps, whose every K-th point is the
                              student grid: refining each interval K-fold uniformly in σ^(1/ρ) gives exactly that
  teacher_trajectory          Alg. 4, line 5 for every n at once: one solver run over the refined grid (a
                              multistep teacher keeps its history across student steps), read every K-th point
  local_teacher_target        Alg. 3, line 6: Solver(x_{n+1}, t_{n+1}, t_n, K) from a given state, fresh history
  analytical_first_step       Alg. 5 (AFS): ε̂ = x_N/√(1 + t_N²), x_{N−1} = x_N + (t_{N−1} − t_N)ε̂; no network
  student_step, step_loss     Eq. 6 and d(x_n^ψ, x̃_n) at one step, the student's input state detached
  distance                    'l1' (the paper's choice), 'l2', 'pseudo_huber' (Fig. 4c, Table 1)
  local_loss                  Alg. 3 as a trainer LossFn (one update per call; natural fit)
  global_loss                 Alg. 4 / 5 / 6 as a LossFn for ONE student step k of a trajectory (batch-driven)
  trajectory_loss             Alg. 4 / 5 with the N per-step losses of one trajectory averaged, one update
  trajectory_plan             which (trajectory, N, k) each trainer step serves; SFD-v draws N ~ U(L) (Alg. 6)
  sample                      Alg. 8: N Euler steps, the first analytic under AFS (N − 1 evaluations)

Models are x-functions (see `distill.losses`): x_fn(params, z, logsnr, labels, w, *, train, rng)
-> x̂, called on VP inputs (z = α x, λ = −2 log σ). An SFD-v student (Alg. 6, App. D.1) also takes
steps=[B] int32, the student's step count N (the grid's intervals, the AFS step included; the SFD code
passes N + 1, its count of grid points). The teacher is x̂_θ(z) conditional (w=None, SFD §3.4: distil
at guidance scale 1, i.e. our w = 0, and guide the student at sampling) or classifier-free guided at a
fixed w (two evaluations per call).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill import samplers, solvers
from distill.losses import LossFn, XFn

DISTANCES = ("l1", "l2", "pseudo_huber")
SIGMA_MIN, SIGMA_MAX, RHO, TEACHER_SUBSTEPS = 0.006, 80.0, 7.0, 4  # Table 6 (pixel-space models)


# --- grids and the teacher -----------------------------------------------------------------------------------


def student_grid(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                 rho: float = RHO) -> np.ndarray:
  """EDM ρ-polynomial grid [N+1] float64 from σ_max down to σ_min (no trailing 0). Concrete even when called
  while tracing (the losses build it from a static N inside the jitted step)."""
  return solvers.edm_grid(num_steps, sigma_min, sigma_max, rho)


def refine_grid(sigmas, k: int, rho: float = RHO) -> np.ndarray:
  """Each interval of a decreasing grid [N+1] cut into k, uniformly in σ^(1/ρ): [N·k+1] float64, with
  refine_grid(sigmas, k)[::k] == sigmas. On an EDM ρ-grid it is the ρ-grid of N·k steps. (For a VP grid
  uniform in t, build the fine grid with `solvers.vp_sigmas(N·k, …)` and take every k-th point instead.)"""
  coarse = solvers.check_grid(sigmas)
  s = coarse ** (1.0 / rho)
  frac = np.arange(k) / k
  fine = np.append((s[:-1, None] + frac[None, :] * (s[1:] - s[:-1])[:, None]).reshape(-1), s[-1]) ** rho
  fine[::k] = coarse  # exactly, not through the round trip of the power
  return fine


def teacher_trajectory(solver: solvers.Solver, teacher: samplers.Denoiser, x_init, sigmas, k: int,
                       rho: float = RHO):
  """The teacher's states at the student grid points (Alg. 4–6, the x̃_n of every n).

  x_init: [B, ...] VE noise at sigmas[0] (σ_max·ε); sigmas: the student grid [N+1]; k: teacher sub-steps per
  student step (K). One `solver` run over refine_grid(sigmas, k, rho), so a multistep teacher carries its
  history across student steps and lowers its order only at the end of the whole run, as the SFD code does.
  Returns (states [N+1, B, ...] (x_init first), nfe), not differentiated.
  """
  fine = refine_grid(sigmas, k, rho)
  traj, nfe = solvers.solve_trajectory(solver, teacher, x_init, fine)
  return jax.lax.stop_gradient(traj[::k]), nfe


def local_teacher_target(solver: solvers.Solver, teacher: samplers.Denoiser, x, sigma: float, sigma_next: float,
                         k: int, rho: float = RHO):
  """Alg. 3's target: k solver steps from state x at sigma to sigma_next (fresh history), not differentiated."""
  return jax.lax.stop_gradient(solvers.solve(solver, teacher, x, refine_grid([sigma, sigma_next], k, rho)).x)


# --- one student step --------------------------------------------------------------------------------------


def analytical_first_step(x, sigma, sigma_next):
  """AFS (Alg. 5): x' = x + (σ' − σ)·x/√(1 + σ²), i.e. Euler with ε̂ = x/√(1 + σ²) — the VP state z = α x —
  in place of a network evaluation. x: [B, ...]; sigma, sigma_next: scalars."""
  return solvers.euler_update(x, solvers.afs_denoised(x, sigma), sigma, sigma_next)


def student_step(x_hat, x, sigma, sigma_next):
  """Eq. 6: the student's Euler step x' = x + (σ' − σ)(x − x̂)/σ = x̂ + (σ'/σ)(x − x̂)."""
  return solvers.euler_update(x, x_hat, sigma, sigma_next)


def distance(a, b, metric: str = "l1", huber_c: float | None = None):
  """d(a, b) per example: a, b [B, ...] -> [B].

  'l1': mean |a − b|; 'l2': mean (a − b)² (the squared L2 of the paper, per pixel); 'pseudo_huber':
  √(‖a − b‖² + c²) − c over the whole example, c = 0.00054·√d by default (improved consistency training, the
  paper's ref. [49]; the SFD paper does not state its c). Means are over the d = prod(a.shape[1:]) entries.
  A callable metric is called as metric(a, b) -> [B] (LPIPS: `distill.stages.sfd.lpips_metric`).
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


# --- trainer losses -----------------------------------------------------------------------------------------


def _teacher_denoiser(teacher_x: XFn, teacher_params, labels, w, null_label: int | None) -> samplers.Denoiser:
  model_fn = lambda z, logsnr, y, w_: teacher_x(teacher_params, z, logsnr, y, w_)
  if w is None:
    return samplers.conditional_denoiser(model_fn, labels, jnp.zeros(labels.shape, jnp.float32))
  if null_label is None:
    raise ValueError("sfd: a guided teacher (teacher_w is not None) needs null_label")
  return samplers.guided_denoiser(model_fn, labels, w, null_label)


def student_x_hat(student_x: XFn, params, x, sigma, labels, w, num_steps, step_condition: bool, **kwargs):
  """The student's x̂ at VE state x [B, ...], σ scalar (Python or traced), via its VP x-function."""
  z, logsnr = solvers.ve_to_vp(x, sigma)
  w_b = jnp.full(labels.shape, 0.0 if w is None else w, jnp.float32)
  extra = {"steps": jnp.full(labels.shape, num_steps, jnp.int32)} if step_condition else {}
  return student_x(params, z, logsnr, labels, w_b, **extra, **kwargs)


def _check(metric: str, k: int):
  if not callable(metric):
    distance(jnp.zeros((1, 1)), jnp.zeros((1, 1)), metric)  # fail at construction, not in the first step
  if k < 1:
    raise ValueError(f"sfd: teacher sub-steps k={k} must be >= 1")


def local_loss(student_x: XFn, teacher_x: XFn, *, num_steps: int, solver: str = "dpm_solver_2s",
               k: int = TEACHER_SUBSTEPS, metric: str = "l1", sigma_min: float = SIGMA_MIN,
               sigma_max: float = SIGMA_MAX, rho: float = RHO, teacher_w: float | None = None,
               null_label: int | None = None) -> LossFn:
  """Alg. 3 (vanilla trajectory distillation). loss_fn(params, frozen, batch, rng); frozen = {'teacher': params};
  batch: image [B, ...] (x_0), label [B].

  One student step k ~ U{0..N−1} per call (shared by the batch, as the paper samples n per iteration):
  x = x_0 + σ_k ε, target = Solver(x, σ_k → σ_{k+1}, K sub-steps), loss = mean_B d(Euler_ψ(x), target). The
  teacher runs in a `lax.switch` over the N static sub-grids, so only the drawn step costs teacher calls.
  A multistep teacher restarts its history at σ_k (why the paper pairs Alg. 3 with one-step solvers).
  """
  _check(metric, k)
  teacher_solver = solvers.get_solver(solver)
  grid = student_grid(num_steps, sigma_min, sigma_max, rho)

  def loss_fn(params, frozen, batch, rng):
    x0, labels = batch["image"], batch["label"]
    k_step, k_eps, k_dropout = jax.random.split(rng, 3)
    step = jax.random.randint(k_step, (), 0, num_steps)
    sigma, sigma_next = jnp.asarray(grid, jnp.float32)[step], jnp.asarray(grid, jnp.float32)[step + 1]
    x = x0 + sigma * jax.random.normal(k_eps, x0.shape, x0.dtype)
    teacher = _teacher_denoiser(teacher_x, frozen["teacher"], labels, teacher_w, null_label)
    branches = [lambda x, i=i: local_teacher_target(teacher_solver, teacher, x, grid[i], grid[i + 1], k, rho)
                for i in range(num_steps)]
    target = jax.lax.switch(step, branches, x)
    x_hat = student_x_hat(student_x, params, x, sigma, labels, teacher_w, num_steps, False, train=True,
                           rng=k_dropout)
    d, _ = step_loss(x_hat, x, sigma, sigma_next, target, metric)
    return jnp.mean(d), {"distance": jnp.mean(d), "student_step": step.astype(jnp.float32)}

  return loss_fn


def _trajectory_setup(batch, num_steps, teacher_solver, teacher_x, frozen, labels, teacher_w, null_label, k,
                      grid_fn, rho):
  """(N, grid [N+1] numpy, x_init [B, ...], teacher states [N+1, B, ...]) for the global losses."""
  if "teacher" in batch:
    n = batch["teacher"].shape[0] - 1
    if num_steps is not None and n != num_steps:
      raise ValueError(f"sfd: batch['teacher'] has {n} steps, the loss was built for num_steps={num_steps}")
  elif num_steps is None:
    raise ValueError("sfd: without batch['teacher'] the loss needs num_steps")
  else:
    n = num_steps
  grid = grid_fn(n)
  x_init = float(grid[0]) * batch["noise"]
  if "teacher" in batch:
    states = jax.lax.stop_gradient(batch["teacher"])
  else:
    teacher = _teacher_denoiser(teacher_x, frozen["teacher"], labels, teacher_w, null_label)
    states, _ = teacher_trajectory(teacher_solver, teacher, x_init, grid, k, rho)
  return n, grid, x_init, states


def global_loss(student_x: XFn, teacher_x: XFn, *, num_steps: int | None = None, solver: str = "dpmpp_3m",
                k: int = TEACHER_SUBSTEPS, metric: str = "l1", afs: bool = True, step_condition: bool = False,
                sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                teacher_w: float | None = None, null_label: int | None = None) -> LossFn:
  """Alg. 4 (SFD), with AFS Alg. 5, with step_condition Alg. 6 (SFD-v): the loss of ONE student step k of one
  trajectory, so that N consecutive trainer updates (N − 1 with AFS) walk one trajectory as the paper does.

  batch: noise [B, ...] ε (x_0 = σ_max·ε; the SAME for the calls of one trajectory), label [B],
  step_index int32 scalar k (≥ 1 under AFS; see `trajectory_plan`), and optionally teacher [N+1, B, ...] —
  `teacher_trajectory` of that noise, computed once per trajectory by the batch pipeline. Without it the
  teacher trajectory is recomputed in every call (N·K teacher evaluations per update instead of per trajectory).
  N is batch['teacher'].shape[0] − 1 (so SFD-v batches of several N retrace once per N) or `num_steps`.

  The student's state x_k is its own rollout from x_0 with the current parameters (AFS first, then Euler,
  eval mode, no gradient) — the paper reuses the output of its previous update's forward pass, one update
  older; the rollout costs k extra student evaluations. Loss: mean_B d(Euler_ψ(x_k → σ_{k+1}), x̃_{k+1}).
  """
  _check(metric, k)
  teacher_solver = solvers.get_solver(solver)
  grid_fn = lambda n: student_grid(n, sigma_min, sigma_max, rho)

  def loss_fn(params, frozen, batch, rng):
    labels = batch["label"]
    n, grid, x_init, states = _trajectory_setup(batch, num_steps, teacher_solver, teacher_x, frozen, labels,
                                                teacher_w, null_label, k, grid_fn, rho)
    sig = jnp.asarray(grid, jnp.float32)
    step = jnp.asarray(batch["step_index"], jnp.int32)
    step = jnp.clip(step, 1 if afs else 0, n - 1)
    frozen_params = jax.lax.stop_gradient(params)

    def rollout(i, x):
      x_hat = student_x_hat(student_x, frozen_params, x, sig[i], labels, teacher_w, n, step_condition)
      return student_step(x_hat, x, sig[i], sig[i + 1])

    if afs:
      x = jax.lax.fori_loop(1, step, rollout, analytical_first_step(x_init, grid[0], grid[1]))
    else:
      x = jax.lax.fori_loop(0, step, rollout, x_init)
    x_hat = student_x_hat(student_x, params, x, sig[step], labels, teacher_w, n, step_condition, train=True,
                           rng=rng)
    d, _ = step_loss(x_hat, x, sig[step], sig[step + 1], states[step + 1], metric)
    return jnp.mean(d), {"distance": jnp.mean(d), "student_step": step.astype(jnp.float32)}

  return loss_fn


def trajectory_loss(student_x: XFn, teacher_x: XFn, *, num_steps: int | None = None, solver: str = "dpmpp_3m",
                    k: int = TEACHER_SUBSTEPS, metric: str = "l1", afs: bool = True, step_condition: bool = False,
                    sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                    teacher_w: float | None = None, null_label: int | None = None) -> LossFn:
  """Alg. 4 / 5 / 6 compressed to one update per trajectory: the mean over the trained steps of
  d(Euler_ψ(x_k), x̃_{k+1}), each step's input x_k the student's own previous output, detached. Its gradient is
  the mean of the paper's N per-step gradients, all taken at the same parameters (the paper applies each
  before the next step). batch: noise [B, ...], label [B], optionally teacher [N+1, B, ...] (as `global_loss`).
  """
  _check(metric, k)
  teacher_solver = solvers.get_solver(solver)
  grid_fn = lambda n: student_grid(n, sigma_min, sigma_max, rho)

  def loss_fn(params, frozen, batch, rng):
    labels = batch["label"]
    n, grid, x_init, states = _trajectory_setup(batch, num_steps, teacher_solver, teacher_x, frozen, labels,
                                                teacher_w, null_label, k, grid_fn, rho)
    first = 1 if afs else 0
    if n <= first:
      raise ValueError(f"sfd: N={n} steps with afs={afs} leaves no step to train")
    x = analytical_first_step(x_init, grid[0], grid[1]) if afs else x_init
    sig = jnp.asarray(grid, jnp.float32)

    def body(x, inputs):
      i, key, target = inputs
      x_hat = student_x_hat(student_x, params, x, sig[i], labels, teacher_w, n, step_condition, train=True,
                             rng=key)
      d, x_next = step_loss(x_hat, x, sig[i], sig[i + 1], target, metric)
      return x_next, jnp.mean(d)

    steps = jnp.arange(first, n)
    keys = jax.random.split(rng, n - first)
    _, d = jax.lax.scan(body, x, (steps, keys, states[first + 1:]))
    return jnp.mean(d), {"distance": jnp.mean(d), "last_step_distance": d[-1]}

  return loss_fn


# --- schedule of trajectories and sampling --------------------------------------------------------------------


def trajectory_plan(total_updates: int, step_counts: Sequence[int], afs: bool = True, seed: int = 0) -> dict:
  """Which trajectory, step count N and student step k every trainer update serves, for `global_loss`.

  SFD: step_counts = [N]. SFD-v (Alg. 6): N ~ U(step_counts) drawn per trajectory. A trajectory of N steps
  takes N updates (k = 0..N−1), or N − 1 under AFS (k = 1..N−1). A pure function of its arguments, so a
  resumed run serves the same batches. Returns {'trajectory', 'num_steps', 'step_index'}: [total_updates] int.
  """
  counts = [int(n) for n in step_counts]
  first = 1 if afs else 0
  if not counts or min(counts) <= first:
    raise ValueError(f"trajectory_plan: step_counts={step_counts} must be >= {first + 1} (afs={afs})")
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


def sample(student: samplers.Denoiser, x_init, sigmas, afs: bool = True) -> samplers.Samples:
  """Alg. 8: Euler over the student grid (the first step analytic under AFS). x_init: [B, ...] VE noise at
  sigmas[0] (σ_max·ε). Returns Samples(x at sigmas[-1], nfe = N, or N − 1 with AFS)."""
  return solvers.solve(solvers.EULER, student, x_init, sigmas, afs=afs)
