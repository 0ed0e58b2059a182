"""Probability-flow ODE solvers in the EDM / variance-exploding view, shared by teachers and students.

A VP state z_t = α x + σ ε read as x_VE = z/α has noise level σ_VE = σ/α = exp(−λ/2) (docs/design.md §3), and the
probability-flow ODE becomes dx/dσ = (x − D(x; σ))/σ with D the x̂-denoiser. In these coordinates DDIM is
Euler, so one solver zoo serves VP teachers (cosine, linear-β) and EDM-grid students alike (SFD paper,
Sec. 2 and Table 6; the solver set follows the SFD reference code's zoo):

  euler            DDIM: x' = x̂ + (σ'/σ)(x − x̂)                              order 1, 1 evaluation a step
  heun             EDM Alg. 1 (deterministic): Euler, then trapezoidal correction   order 2, 2
  dpm_solver_2s    DPM-Solver-2 (singlestep, ε-form, midpoint σ_m = √(σσ'))       order 2, 2
  dpmpp_2m         DPM-Solver++(2M), multistep data prediction                      order 2, 1
  dpmpp_3m         DPM-Solver++(3M) as the DPM-Solver++ and SFD codes write it      order 2 (!), 1
  dpmpp_3m_taylor  DPM-Solver++(3M) with the Taylor-consistent D2                   order 3, 1

`dpmpp_3m` is the SFD paper's teacher (docs/design.md §6). Its D2 = (D1_0 − D1_1)/(r0 + r1) estimates h²x̂''/2 where
the third-order term −φ3·h²x̂'' needs h²x̂'', so its local error keeps an (h³/12)·x̂'' term: it is only
second order asymptotically (measured slope ≈ 1.9 on a Gaussian mixture, though more accurate than
dpmpp_2m at practical step counts). `dpmpp_3m_taylor` doubles D2 (as the reference's own singlestep
third-order 'taylor' update does): it integrates an x̂ quadratic in λ exactly and converges at order 3.

Grid convention: `sigmas` [N+1] is a concrete (numpy / list), strictly decreasing σ_VE grid; every entry is
positive except that the last may be 0. The solution is the state at sigmas[-1]. A step to σ = 0 is
x' = x̂ for every solver — Euler's step, the only finite one there (λ = ∞) — so Heun and DPM-Solver-2 skip
their second evaluation on it (EDM's "no correction on the last step") and a grid ending at 0 returns the
last x̂, exactly as `samplers.ddim_sample` does. SFD grids end at σ_min instead (no step to 0).

Multistep solvers run at lower order at the start (no history yet) and, with `lower_order_final`, at the
last steps, as the DPM-Solver++ reference scheme does: order_i = i + 1 while i + 1 < order, else
min(order, N − i).

Shapes: states x, x̂: [B, ...]; σ: a scalar shared by the batch. Every D evaluation is one call of the
underlying `samplers.Denoiser`, so `Samples.nfe` = evaluations × denoiser.evals_per_call.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill import diffusion
from distill.samplers import Denoiser, Samples
from distill.schedules import LogSNRFn, alpha_sigma, edm_sigmas, logsnr_from_ve_sigma, ve_sigma

# D(x [B, ...] VE state, sigma: scalar σ_VE > 0) -> x̂ [B, ...]
VEDenoiser = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


# --- VP <-> VE --------------------------------------------------------------------------------------------


def vp_to_ve(z, logsnr):
  """x_VE = z/α. z: [B, ...]; logsnr: [B] or scalar."""
  alpha, _ = alpha_sigma(logsnr)
  return z / diffusion.bcast_like(alpha, z)


def ve_to_vp(x, sigma):
  """(z, λ) with z = α x, α = 1/√(1 + σ²), λ = −2 log σ. x: [B, ...]; sigma: scalar > 0. λ: [B]."""
  logsnr = jnp.full((x.shape[0],), logsnr_from_ve_sigma(sigma))
  alpha, _ = alpha_sigma(logsnr)
  return diffusion.bcast_like(alpha, x) * x, logsnr


def ve_denoiser(denoiser: Denoiser) -> VEDenoiser:
  """D(x, σ) = x̂(α x, λ(σ)): the VE view of a VP denoiser (x̂ itself is the same in both views)."""
  def fn(x, sigma):
    z, logsnr = ve_to_vp(x, sigma)
    return denoiser(z, logsnr)
  return fn


def dynamic_threshold(x_hat, p: float = 0.995):
  """Imagen's dynamic thresholding of a denoised x̂ [B, ...]: s = the p-quantile of |x̂| per example, at least 1;
  x̂ clipped to [−s, s] and divided by s. The SFD authors' DPM-Solver++ applies it with p = 0.995 to every x̂
  (`dynamic_thresholding_fn` in their solver_utils.py)."""
  flat = jnp.abs(x_hat).reshape(x_hat.shape[0], -1)
  s = jnp.maximum(jnp.quantile(flat, p, axis=1), 1.0)
  s = s.reshape((-1,) + (1,) * (x_hat.ndim - 1))
  return jnp.clip(x_hat, -s, s) / s


def thresholded(D: VEDenoiser, p: float) -> VEDenoiser:
  """D with `dynamic_threshold` applied to every x̂ it returns."""
  return lambda x, sigma: dynamic_threshold(D(x, sigma), p)


def edm_grid(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
             to_zero: bool = False) -> np.ndarray:
  """`schedules.edm_sigmas` as a solver grid: [N+1] float64 from σ_max down to σ_min; with `to_zero` [N+2], one
  more step, to 0. Concrete even when called while tracing."""
  with jax.ensure_compile_time_eval():
    sig = np.asarray(edm_sigmas(num_steps + 1, sigma_min, sigma_max, rho), np.float64)
  return np.append(sig, 0.0) if to_zero else sig


def vp_sigmas(num_steps: int, logsnr_fn: LogSNRFn, to_zero: bool = True) -> np.ndarray:
  """σ_VE at the uniform VP times t_i = 1 − i/N, i = 0..N: [N+1] float64. With `to_zero` the last entry is
  exactly 0 (the data end, where `samplers.ddim_sample` returns its last x̂), else σ_VE(t = 0)."""
  ts = np.linspace(1.0, 0.0, num_steps + 1)
  with jax.ensure_compile_time_eval():  # a concrete grid even when called while tracing
    sig = np.asarray(ve_sigma(logsnr_fn(jnp.asarray(ts, jnp.float32))), np.float64)
  if to_zero:
    sig[-1] = 0.0
  return sig


def afs_denoised(x, sigma):
  """Analytical first step (SFD Alg. 5): ε̂ = x/√(1 + σ²), i.e. x̂ = x − σ·x/√(1 + σ²), no network call.

  Since √(1 + σ²) = 1/α, ε̂ is the VP state z = α x itself: the noise is its own estimate."""
  return x - (sigma / jnp.sqrt(1.0 + sigma**2)) * x


# --- steps ------------------------------------------------------------------------------------------------
# Shared arguments: D a VEDenoiser; x: [B, ...] the state at sigma; x_hat = D(x, sigma) (evaluated by the
# caller, or analytic for AFS); sigma > sigma_next > 0 (scalars, Python or traced); history: a tuple of
# (σ_j, x̂_j) at earlier grid points, oldest first; order: the step's order. Each returns x at sigma_next.


class History(NamedTuple):
  sigmas: tuple   # σ at earlier grid points, oldest first (scalars)
  denoised: tuple  # x̂ there, each [B, ...]


NO_HISTORY = History((), ())


def euler_update(x, x_hat, sigma, sigma_next):
  """Euler = DDIM in VE coordinates: x' = x̂ + (σ'/σ)(x − x̂). Valid for σ' = 0 (gives x̂)."""
  return x_hat + (sigma_next / sigma) * (x - x_hat)


def euler_step(D: VEDenoiser, x, x_hat, sigma, sigma_next, history=NO_HISTORY, order=1):
  """Euler / DDIM. No extra D call."""
  del D, history, order
  return euler_update(x, x_hat, sigma, sigma_next)


def heun_step(D: VEDenoiser, x, x_hat, sigma, sigma_next, history=NO_HISTORY, order=2):
  """EDM's Heun: d = (x − x̂)/σ, x_e = x + (σ' − σ) d, x' = x + (σ' − σ)(d + d(x_e, σ'))/2. One more D call."""
  del history, order
  d = (x - x_hat) / sigma
  x_e = x + (sigma_next - sigma) * d
  d_e = (x_e - D(x_e, sigma_next)) / sigma_next
  return x + (sigma_next - sigma) * 0.5 * (d + d_e)


def dpm_solver_2s_step(D: VEDenoiser, x, x_hat, sigma, sigma_next, history=NO_HISTORY, order=2):
  """DPM-Solver-2 (singlestep, noise prediction, r = 1/2): Euler to the λ-midpoint σ_m = √(σσ'), then
  x' = x + (σ' − σ)·ε̂(x_m, σ_m) with ε̂ = (x − D)/σ. One more D call."""
  del history, order
  sigma_mid = jnp.sqrt(sigma * sigma_next)
  x_mid = euler_update(x, x_hat, sigma, sigma_mid)
  eps_mid = (x_mid - D(x_mid, sigma_mid)) / sigma_mid
  return x + (sigma_next - sigma) * eps_mid


def _phis(h):
  """φ1 = expm1(−h), φ2 = φ1/h + 1, φ3 = φ2/h − 1/2 (docs/design.md §6), with Taylor series below h = 0.05, where the
  direct forms cancel catastrophically in float32 (φ3 ≈ −h/6 would carry an error ~1e-7/h²)."""
  h = jnp.asarray(h, jnp.float32)
  phi1 = jnp.expm1(-h)
  hs = jnp.maximum(h, 1e-3)  # keeps the unused direct branch finite
  phi2_direct = phi1 / hs + 1.0
  phi3_direct = phi2_direct / hs - 0.5
  # e^{−h} = Σ (−h)^k/k!: φ2 = h/2 − h²/6 + h³/24 − h⁴/120, φ3 = −h/6 + h²/24 − h³/120 + h⁴/720.
  phi2_series = h * (0.5 - h * (1 / 6 - h * (1 / 24 - h / 120)))
  phi3_series = -h * (1 / 6 - h * (1 / 24 - h * (1 / 120 - h / 720)))
  small = h < 0.05
  return phi1, jnp.where(small, phi2_series, phi2_direct), jnp.where(small, phi3_series, phi3_direct)


def dpmpp_update(x, x_hat, history: History, sigma, sigma_next, order: int, d2_scale: float = 1.0):
  """DPM-Solver++ multistep data-prediction update in λ = −log σ (docs/design.md §6), h = log(σ/σ'):

  order 1: x' = (σ'/σ)x − φ1 D0                                  (= Euler)
  order 2: adds −½ φ1 D1_0, D1_0 = (D0 − D_{−1})/r0, r0 = h0/h
  order 3: x' = (σ'/σ)x − φ1 D0 + φ2 D1 − φ3 D2, D1 = D1_0 + r0/(r0+r1)(D1_0 − D1_1),
           D2 = d2_scale·(D1_0 − D1_1)/(r0+r1), r1 = h1/h
  d2_scale = 1 is the reference code's update, 2 the Taylor-consistent one (module docstring).
  history must hold at least order − 1 entries. Needs σ' > 0.
  """
  if order not in (1, 2, 3) or len(history.sigmas) < order - 1:
    raise ValueError(f"dpmpp_update: order={order} needs order − 1 history entries, got {len(history.sigmas)}")
  h = jnp.log(sigma / sigma_next)
  phi1, phi2, phi3 = _phis(h)
  ratio = sigma_next / sigma
  if order == 1:
    return ratio * x - phi1 * x_hat
  sigma_1, d_1 = history.sigmas[-1], history.denoised[-1]
  r0 = jnp.log(sigma_1 / sigma) / h
  d1_0 = (x_hat - d_1) / r0
  if order == 2:
    return ratio * x - phi1 * x_hat - 0.5 * phi1 * d1_0
  sigma_2, d_2 = history.sigmas[-2], history.denoised[-2]
  r1 = jnp.log(sigma_2 / sigma_1) / h
  d1_1 = (d_1 - d_2) / r1
  d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
  d2 = d2_scale * (d1_0 - d1_1) / (r0 + r1)
  return ratio * x - phi1 * x_hat + phi2 * d1 - phi3 * d2


def dpmpp_step(D: VEDenoiser, x, x_hat, sigma, sigma_next, history=NO_HISTORY, order=1):
  """DPM-Solver++(2M/3M) as the reference codes write it (d2_scale = 1). No extra D call."""
  del D
  return dpmpp_update(x, x_hat, history, sigma, sigma_next, order)


def dpmpp_taylor_step(D: VEDenoiser, x, x_hat, sigma, sigma_next, history=NO_HISTORY, order=1):
  """DPM-Solver++(3M) with the Taylor-consistent D2 (d2_scale = 2); orders 1 and 2 are unchanged."""
  del D
  return dpmpp_update(x, x_hat, history, sigma, sigma_next, order, d2_scale=2.0)


# --- solvers and the driver --------------------------------------------------------------------------------

# step(D, x, x_hat, sigma, sigma_next, history, order) -> x at sigma_next
StepFn = Callable[..., jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class Solver:
  name: str
  step: StepFn
  order: int           # the order of a regular step's formula (history it reads: order − 1 x̂'s)
  evals_per_step: int  # D evaluations of a regular step, the one at (x, σ) included
  multistep: bool = False
  lower_order_final: bool = True  # multistep only

  @property
  def history_size(self) -> int:
    """x̂'s at earlier grid points that a regular step reads."""
    return self.order - 1 if self.multistep else 0  # reached after order − 1 steps

  def order_at(self, i: int, num_steps: int) -> int:
    """The order of step i of N (DPM-Solver++ reference scheme for multistep solvers)."""
    if not self.multistep:
      return self.order
    if i + 1 < self.order:
      return i + 1
    return min(self.order, num_steps - i) if self.lower_order_final else self.order


EULER = Solver("euler", euler_step, order=1, evals_per_step=1)
HEUN = Solver("heun", heun_step, order=2, evals_per_step=2)
DPM_SOLVER_2S = Solver("dpm_solver_2s", dpm_solver_2s_step, order=2, evals_per_step=2)
DPMPP_2M = Solver("dpmpp_2m", dpmpp_step, order=2, evals_per_step=1, multistep=True)
DPMPP_3M = Solver("dpmpp_3m", dpmpp_step, order=3, evals_per_step=1, multistep=True)  # asymptotically 2nd
DPMPP_3M_TAYLOR = Solver("dpmpp_3m_taylor", dpmpp_taylor_step, order=3, evals_per_step=1, multistep=True)
SOLVERS = {s.name: s for s in (EULER, HEUN, DPM_SOLVER_2S, DPMPP_2M, DPMPP_3M, DPMPP_3M_TAYLOR)}


def get_solver(name: str, lower_order_final: bool = True) -> Solver:
  """A solver by config name: 'euler' | 'heun' | 'dpm_solver_2s' | 'dpmpp_2m' | 'dpmpp_3m' | 'dpmpp_3m_taylor'."""
  if name not in SOLVERS:
    raise ValueError(f"solver: unknown name {name!r}; allowed: {sorted(SOLVERS)}")
  return dataclasses.replace(SOLVERS[name], lower_order_final=lower_order_final)


def check_grid(sigmas) -> np.ndarray:
  """sigmas as a float64 numpy array [N+1], N ≥ 1, strictly decreasing, positive except possibly the last.
  Raises ValueError otherwise (also for traced arrays: the grid must be concrete)."""
  try:
    s = np.asarray(sigmas, np.float64)
  except (TypeError, jax.errors.TracerArrayConversionError) as e:
    raise ValueError("sigmas: the grid must be concrete (numpy or a list), not traced") from e
  if s.ndim != 1 or len(s) < 2 or not np.all(np.diff(s) < 0) or not np.all(s[:-1] > 0) or s[-1] < 0:
    raise ValueError(f"sigmas: need [N+1], N ≥ 1, strictly decreasing, positive except the last ≥ 0; got {s}")
  return s


def _push(history: History, sigma, x_hat, keep: int) -> History:
  if keep == 0:
    return NO_HISTORY
  return History((history.sigmas + (sigma,))[-keep:], (history.denoised + (x_hat,))[-keep:])


def step_evals(solver: Solver, sigma_next: float, afs_step: bool = False) -> int:
  """D evaluations one step makes: the x̂ at its start (none under AFS), plus a second-order solver's extra
  one unless the step goes to σ = 0."""
  extra = solver.evals_per_step - 1 if sigma_next > 0 else 0
  return (0 if afs_step else 1) + extra


def _one_step(solver: Solver, D: VEDenoiser, x, history: History, sigma, sigma_next, order: int, afs_step: bool):
  """One grid step (unrolled): returns (x_next, history with (σ, x̂) appended, D evaluations)."""
  x_hat = afs_denoised(x, sigma) if afs_step else D(x, sigma)
  if sigma_next == 0.0:
    x_next = x_hat
  else:
    x_next = solver.step(D, x, x_hat, sigma, sigma_next, history, order)
  return x_next, _push(history, sigma, x_hat, solver.history_size), step_evals(solver, float(sigma_next), afs_step)


def integrate(solver: Solver, D: VEDenoiser, x_init, sigmas, *, afs: bool = False, return_trajectory: bool = False):
  """Solves from sigmas[0] to sigmas[-1]. x_init: [B, ...] the VE state at sigmas[0].

  Steps whose order or kind is special (multistep warm-up and final steps, AFS at step 0, a step to 0) are
  unrolled; the regular steps between them run as one `lax.scan`, so a long grid compiles D once.
  Returns (x at sigmas[-1] [B, ...], trajectory [N+1, B, ...] (x_init first) or None, D evaluations).
  """
  s = check_grid(sigmas)
  n = len(s) - 1
  orders = [solver.order_at(i, n) for i in range(n)]
  regular = [orders[i] == solver.order and s[i + 1] > 0 and not (afs and i == 0) for i in range(n)]
  first = next((i for i in range(n) if regular[i]), n)
  last = max((i for i in range(n) if regular[i]), default=n - 1) + 1
  if not all(regular[first:last]):
    first = last = n  # never for the solvers above; unroll everything rather than fail

  x, history, evals = x_init, NO_HISTORY, 0
  traj = [x_init[None]] if return_trajectory else None
  for i in range(first):
    x, history, e = _one_step(solver, D, x, history, float(s[i]), float(s[i + 1]), orders[i], afs and i == 0)
    evals += e
    if return_trajectory:
      traj.append(x[None])

  if last > first:
    keep = solver.history_size
    hist_sig = tuple(jnp.asarray(v, jnp.float32) for v in history.sigmas[-keep:]) if keep else ()
    hist_den = tuple(history.denoised[-keep:]) if keep else ()

    def body(carry, sig_pair):
      x, hs, hd = carry
      sigma, sigma_next = sig_pair[0], sig_pair[1]
      x_hat = D(x, sigma)
      x_next = solver.step(D, x, x_hat, sigma, sigma_next, History(hs, hd), solver.order)
      if keep:
        hs, hd = (hs + (sigma,))[-keep:], (hd + (x_hat,))[-keep:]
      return (x_next, hs, hd), (x_next if return_trajectory else None)

    pairs = jnp.asarray(np.stack([s[first:last], s[first + 1:last + 1]], axis=1), jnp.float32)
    (x, hist_sig, hist_den), ys = jax.lax.scan(body, (x, hist_sig, hist_den), pairs)
    history = History(tuple(hist_sig), tuple(hist_den))
    evals += (last - first) * solver.evals_per_step
    if return_trajectory:
      traj.append(ys)

  for i in range(last, n):
    x, history, e = _one_step(solver, D, x, history, float(s[i]), float(s[i + 1]), orders[i], afs and i == 0)
    evals += e
    if return_trajectory:
      traj.append(x[None])

  return x, (jnp.concatenate(traj) if return_trajectory else None), evals


def integrate_traced(solver: Solver, D: VEDenoiser, x_init, sigmas):
  """`integrate` for a grid whose VALUES are traced (one compilation serves every grid of the same length):
  sigmas [N+1] (jnp or numpy), strictly decreasing and all > 0 (not checked: a traced grid cannot be; no step
  to 0, no AFS). Every step unrolled, fresh history, orders as `integrate`. Returns (x at sigmas[-1],
  D evaluations). Alg. 3's teacher target from a sampled state at a sampled grid point uses it."""
  n = len(sigmas) - 1
  if n < 1:
    raise ValueError(f"integrate_traced: need a grid of N+1 >= 2 points; got {len(sigmas)}")
  x, history = x_init, NO_HISTORY
  for i in range(n):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    x_hat = D(x, sigma)
    x_next = solver.step(D, x, x_hat, sigma, sigma_next, history, solver.order_at(i, n))
    history = _push(history, sigma, x_hat, solver.history_size)
    x = x_next
  return x, n * solver.evals_per_step


def solve(solver: Solver, denoiser: Denoiser, x_init, sigmas: Sequence[float], *, afs: bool = False) -> Samples:
  """Samples(x at sigmas[-1], nfe). x_init: [B, ...] the VE state at sigmas[0] (e.g. σ_max·ε, or z_1/α_1 for a
  VP start); sigmas: [N+1] (see the module docstring); afs: analytical first step (saves one evaluation)."""
  x, _, evals = integrate(solver, ve_denoiser(denoiser), x_init, sigmas, afs=afs)
  return Samples(x, evals * denoiser.evals_per_call)


def solve_trajectory(solver: Solver, denoiser: Denoiser, x_init, sigmas: Sequence[float], *, afs: bool = False):
  """(trajectory [N+1, B, ...] of VE states at every grid point, x_init first; nfe)."""
  _, traj, evals = integrate(solver, ve_denoiser(denoiser), x_init, sigmas, afs=afs, return_trajectory=True)
  return traj, evals * denoiser.evals_per_call
