"""SFD stages (distill/methods/sfd/stages.py) and the losses they train with: the global and local losses and the
Alg. 3 teacher targets against float64 loops, the trajectory batches, the cost fields, the Alg. 8 sampler, a tiny
end-to-end run of the three stages with resume, and the configs."""
import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import logsumexp

from distill import configuration, context, contract, models, optimizers, samplers, solvers, testing, train
from distill.methods.sfd import core as sfd
from distill.methods.sfd import stages
from distill.testing import GaussianMixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (2, 2, 1)
GMM = GaussianMixture.random(0, num_classes=3, shape=SHAPE, mean_scale=1.0, std=0.3)
B = 8
TEACHER_PARAMS = {"scale": jnp.ones(()), "shift": jnp.zeros(SHAPE), "step_gain": jnp.zeros(())}
STUDENT_PARAMS = {"scale": jnp.asarray(1.1), "shift": jnp.full(SHAPE, 0.03), "step_gain": jnp.asarray(0.02)}


def x_fn(params, z, logsnr, labels, w, *, train=False, rng=None, steps=None):
  """A toy x-function: an affine map of the exact mixture denoiser, plus step_gain·N when given a step count N
  (so a wrong N changes the output); TEACHER_PARAMS make it the mixture's own x̂."""
  del w, train, rng
  out = params["scale"] * GMM.denoise(z, logsnr, labels) + params["shift"]
  if steps is not None:
    out = out + params["step_gain"] * steps.astype(jnp.float32).reshape((-1,) + (1,) * len(SHAPE))
  return out


def spec(teacher_w=None, **kw):
  return stages.TeacherSpec(x_fn, kw.pop("solver", "dpmpp_3m"), kw.pop("k", 4), teacher_w, 3, sfd.SIGMA_MIN,
                            sfd.SIGMA_MAX, sfd.RHO, **kw)


def inputs(trajectory=0, label_dropout=0.0):
  noise, labels = stages.trajectory_inputs(0, 7, trajectory, B, SHAPE, 3, label_dropout)
  return jnp.asarray(noise), jnp.asarray(labels)


def direct_teacher(noise, labels, n, teacher_w=None):
  """sfd.teacher_trajectory with the exact mixture teacher: ([n+1, B, ...], nfe), the reference for the batches."""
  model_fn = lambda z, l, y, w: x_fn(TEACHER_PARAMS, z, l, y, w)
  den = (samplers.conditional_denoiser(model_fn, labels) if teacher_w is None
         else samplers.guided_denoiser(model_fn, labels, teacher_w, 3))
  return sfd.teacher_trajectory(solvers.DPMPP_3M, den, sfd.SIGMA_MAX * noise, sfd.student_grid(n), 4)


@functools.partial(jax.jit, static_argnames=("n", "teacher_w"))
def direct_states(noise, labels, n, teacher_w=None):
  return direct_teacher(noise, labels, n, teacher_w)[0]


# --- independent float64 references -----------------------------------------------------------------------------


def np_ve_denoise(x, sigma, labels):
  """E[data | x = data + σε, class] for GMM in float64, written in the VE view (label 3: unconditional)."""
  x = np.asarray(x, np.float64)
  b, d = x.shape[0], int(np.prod(SHAPE))
  mu, s2 = GMM.means.reshape(-1, d).astype(np.float64), GMM.stds.astype(np.float64) ** 2
  xf, var = x.reshape(b, d), s2 + sigma**2                                                     # var: [K]
  logp = np.log(GMM.weights)[None] - 0.5 * ((xf[:, None] - mu[None]) ** 2).sum(-1) / var - 0.5 * d * np.log(var)
  labels = np.asarray(labels)
  logp = np.where((GMM.classes[None] == labels[:, None]) | (labels[:, None] == GMM.num_classes), logp, -np.inf)
  r = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
  post = mu[None] + (s2 / var)[None, :, None] * (xf[:, None] - mu[None])
  return np.einsum("bk,bkd->bd", r, post).reshape(x.shape)


def np_teacher(labels, teacher_w=None):
  """The exact mixture teacher as a float64 VE denoiser D(x, σ): conditional, or CFG (1 + w)·D_c − w·D_∅."""
  if teacher_w is None:
    return lambda x, s: np_ve_denoise(x, s, labels)
  null = np.full(len(labels), 3)
  return lambda x, s: (1 + teacher_w) * np_ve_denoise(x, s, labels) - teacher_w * np_ve_denoise(x, s, null)


def np_solve(name, D, x, sigmas):
  """Euler, Heun (EDM Alg. 1) and DPM-Solver++(3M) (fresh history, orders 1, 2, 3, …, lowered at the end) as
  float64 loops; returns the states at every grid point [N+1, B, ...]."""
  x, n, hist, out = np.asarray(x, np.float64), len(sigmas) - 1, [], []
  out.append(x)
  for i in range(n):
    s, t = float(sigmas[i]), float(sigmas[i + 1])
    d0 = D(x, s)
    if name == "euler":
      x = x + (t - s) * (x - d0) / s
    elif name == "heun":
      d = (x - d0) / s
      xe = x + (t - s) * d
      x = x + (t - s) * 0.5 * (d + (xe - D(xe, t)) / t)
    else:
      order = min(i + 1, 3, n - i)
      lam = lambda v: -np.log(v)
      h = lam(t) - lam(s)
      p1 = np.expm1(-h)
      p2 = p1 / h + 1
      p3 = p2 / h - 0.5
      new = (t / s) * x - p1 * d0
      if order >= 2:
        s1, dm1 = hist[-1]
        r0 = (lam(s) - lam(s1)) / h
        d10 = (d0 - dm1) / r0
        new = new - 0.5 * p1 * d10
      if order == 3:
        s2, dm2 = hist[-2]
        r1 = (lam(s1) - lam(s2)) / h
        d11 = (dm1 - dm2) / r1
        d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
        new = (t / s) * x - p1 * d0 + p2 * d1 - p3 * (d10 - d11) / (r0 + r1)
      x = new
    hist.append((s, d0))
    out.append(x)
  return np.stack(out)


def np_local_target(x, labels, sigma, sigma_next, teacher_w=None, solver="dpmpp_3m", k=4, rho=7.0):
  """Alg. 3's target in float64: k solver steps from x at σ to σ', uniform in σ^(1/ρ), fresh history."""
  fine = (sigma ** (1 / rho) + np.arange(k + 1) / k * (sigma_next ** (1 / rho) - sigma ** (1 / rho))) ** rho
  fine[0], fine[-1] = sigma, sigma_next
  return np_solve(solver, np_teacher(labels, teacher_w), x, fine)[-1]


def np_student(params, x, sigma, labels, steps=None):
  """x_fn's x̂ in float64 at the VE state x: scale·E[data | x] + shift (+ step_gain·N told N)."""
  p = {key: np.asarray(v, np.float64) for key, v in params.items()}
  return p["scale"] * np_ve_denoise(x, sigma, labels) + p["shift"] + (0.0 if steps is None else p["step_gain"] * steps)


def np_step_loss_l1(params, x, sigma, sigma_next, target, labels, steps=None):
  """mean_B mean |x + (σ' − σ)(x − x̂)/σ − target| and its gradient in params, by hand in float64 (x, target
  constants: ∂x'/∂x̂ = 1 − σ'/σ)."""
  g = np_ve_denoise(x, sigma, labels)
  x_hat = np_student(params, x, sigma, labels, steps)
  resid = x + (sigma_next - sigma) * (x - x_hat) / sigma - np.asarray(target, np.float64)
  dl = np.sign(resid) * (1 - sigma_next / sigma) / resid.size  # ∂loss/∂x̂
  grad = {"scale": np.sum(dl * g), "shift": np.sum(dl, axis=0), "step_gain": np.sum(dl) * (steps or 0)}
  return np.mean(np.abs(resid)), grad


def np_global_loss(params, noise, labels, teacher, n, k, afs):
  """Alg. 4/5/6 at step k of grid N = n in float64: the student's rollout (AFS, then its own Euler steps) to x_k,
  then `np_step_loss_l1` onto teacher[k + 1]; the student told N."""
  grid = sfd.student_grid(n)
  x = sfd.SIGMA_MAX * np.asarray(noise, np.float64)
  for i in range(k):
    s, t = grid[i], grid[i + 1]
    eps = x / np.sqrt(1.0 + s * s) if afs and i == 0 else (x - np_student(params, x, s, labels, n)) / s
    x = x + (t - s) * eps
  return np_step_loss_l1(params, x, grid[k], grid[k + 1], teacher[k + 1], labels, n)


# --- the global loss (Alg. 4/5/6): one compilation for every N -------------------------------------------------


@pytest.mark.parametrize("afs", [True, False])
def test_global_loss_is_the_float64_rollout_and_step_for_every_n_and_k_with_one_compilation(afs):
  max_steps, traces = 5, []
  loss = sfd.global_loss(x_fn, max_steps=max_steps, metric="l1", afs=afs, step_condition=True)
  mine = jax.jit(jax.value_and_grad(lambda p, b: (traces.append(1), loss(p, {}, b, jax.random.PRNGKey(0))[0])[1]))
  noise, labels = inputs()
  for n in (2, 5):
    states = direct_states(noise, labels, n)
    batch_major = jnp.moveaxis(states, 0, 1)
    padded_states = jnp.concatenate([batch_major] + [batch_major[:, -1:]] * (max_steps - n), axis=1)
    for k in range(1 if afs else 0, n):
      want, want_grad = np_global_loss(STUDENT_PARAMS, noise, labels, np.asarray(states), n, k, afs)
      batch = {"noise": noise, "label": labels, "step_index": jnp.int32(k), "num_steps": jnp.int32(n),
               "teacher": padded_states}
      got, got_grad = mine(STUDENT_PARAMS, batch)
      np.testing.assert_allclose(got, want, rtol=1e-5)
      for key in STUDENT_PARAMS:
        np.testing.assert_allclose(got_grad[key], want_grad[key], rtol=1e-4, atol=1e-7)
    # A wrong N (another grid, another step count for the student) is another loss: the check can fail.
    wrong, _ = mine(STUDENT_PARAMS, dict(batch, num_steps=jnp.int32(n - 1 if n > 2 else 3)))
    assert abs(float(wrong) - float(got)) > 1e-4
  assert len(traces) == 1


# --- the local form (Alg. 3) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher_w,solver", [(None, "dpmpp_3m"), (1.5, "heun")])
def test_local_targets_are_the_float64_solver_at_every_grid_point_with_one_compilation(teacher_w, solver):
  noise, labels = inputs()
  teacher = spec(teacher_w, solver=solver)
  before = stages.local_targets._cache_size()
  for n, k in ((3, 0), (3, 2), (6, 1), (6, 5)):
    grid = sfd.student_grid(n)
    x = noise * grid[k] + 0.3
    got = stages.local_targets(TEACHER_PARAMS, x, labels, jnp.float32(grid[k]), jnp.float32(grid[k + 1]), spec=teacher)
    want = np_local_target(x, labels, float(grid[k]), float(grid[k + 1]), teacher_w, solver)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * max(1.0, grid[k]))
    # K solver steps are not one step: the check can tell the refinement apart.
    one = np_solve("euler", np_teacher(labels), x, [grid[k], grid[k + 1]])[-1]
    assert np.max(np.abs(np.asarray(got) - one)) > 1e-3
  assert stages.local_targets._cache_size() == before + 1


def test_local_loss_is_the_float64_step_for_every_n_with_one_compilation():
  """Alg. 3 at drawn (k, ε): the student's one Euler step from data noised to σ_k onto the served teacher target,
  value and gradient against float64 by hand, for every grid N in one compilation."""
  loss, traces = sfd.local_loss(x_fn, max_steps=6, metric="l1"), []
  mine = jax.jit(jax.value_and_grad(lambda p, b, r: (traces.append(1), loss(p, {}, b, r)[0])[1]))
  x0, labels = inputs(3)
  x0 = jnp.tanh(x0)
  for n in (2, 6):
    grid = sfd.student_grid(n)
    for seed in range(3):
      rng = jax.random.PRNGKey(seed)
      k_step, k_eps, k_dropout = jax.random.split(rng, 3)
      k = int(jax.random.randint(k_step, (), 0, n))
      x = x0 + jnp.float32(grid[k]) * jax.random.normal(k_eps, x0.shape, x0.dtype)
      target = stages.local_targets(TEACHER_PARAMS, x, labels, jnp.float32(grid[k]), jnp.float32(grid[k + 1]),
                                    spec=spec())
      batch = {"state": x, "label": labels, "step_index": jnp.int32(k), "num_steps": jnp.int32(n),
               "target": target}
      got, got_grad = mine(STUDENT_PARAMS, batch, k_dropout)
      want, want_grad = np_step_loss_l1(STUDENT_PARAMS, x, grid[k], grid[k + 1], target, labels)
      np.testing.assert_allclose(got, want, rtol=1e-4)
      for key in STUDENT_PARAMS:
        np.testing.assert_allclose(got_grad[key], want_grad[key], rtol=1e-3, atol=1e-6)
    wrong, _ = mine(STUDENT_PARAMS, dict(batch, step_index=jnp.int32((k + 1) % n)), k_dropout)
    assert abs(float(wrong) - float(got)) > 1e-4
  assert len(traces) == 1


def test_local_plan_batches_and_costs():
  glob = sfd.make_plan("global", 10, [3, 4, 5, 6], afs=True, seed=2)
  plan = sfd.make_plan("local", 10, [3, 4, 5, 6], afs=True, seed=2)
  updates = len(glob["step_index"])
  assert len(plan["step_index"]) == updates and plan["trajectory"].tolist() == list(range(updates))
  assert set(plan["num_steps"].tolist()) <= {3, 4, 5, 6}
  assert np.all(plan["step_index"] >= 1) and np.all(plan["step_index"] < plan["num_steps"])  # AFS: k ≥ 1
  big = sfd.make_plan("local", 400, [4], afs=False, seed=0)
  assert set(big["step_index"].tolist()) == {0, 1, 2, 3}
  # Costs: K teacher steps from a fresh start per update (a CFG call counts 2), one student evaluation.
  for w, per_call in ((None, 1), (1.0, 2)):
    costs = stages.plan_costs(plan, "local", True, lambda n, w=w: stages.local_teacher_evals(spec(teacher_w=w)))
    assert costs == {"teacher_evals_per_update": per_call * 4, "student_evals_per_update": 1.0}
  assert stages.local_teacher_evals(spec(solver="heun")) == 8

  # Batches: data noised to σ_k with the step's own noise, the target the teacher's K steps from there.
  x0 = np.tanh(np.arange(B * 4, dtype=np.float32).reshape((B,) + SHAPE) / 7.0)
  data_fn = lambda step: {"image": x0 + step, "label": np.arange(B) % 3}
  batches = stages.LocalBatches(plan, data_fn, stages.local_target_fn(spec(), TEACHER_PARAMS), seed=0, stream=7,
                                batch_size=B, num_classes=3, label_dropout=0.0,
                                sigmas_of_n=lambda n: sfd.student_grid(n))
  for step in (0, 5):
    got = batches(step)
    n, k = int(plan["num_steps"][step]), int(plan["step_index"][step])
    assert (int(got["num_steps"]), int(got["step_index"])) == (n, k)
    grid = sfd.student_grid(n)
    eps = (got["state"] - (x0 + step)) / grid[k]
    assert abs(float(np.std(eps)) - 1.0) < 0.5 and abs(float(np.mean(eps))) < 0.5
    want = np_local_target(got["state"], got["label"], float(grid[k]), float(grid[k + 1]))
    np.testing.assert_allclose(got["target"], want, rtol=1e-4, atol=1e-4 * grid[k])
    again = batches(step)  # a pure function of the step (resume)
    for key in got:
      np.testing.assert_array_equal(again[key], got[key])
  assert not np.allclose(batches(0)["state"] - x0, batches(1)["state"] - x0 - 1.0)
  dropped = stages.LocalBatches(plan, lambda step: {"image": np.zeros((400,) + SHAPE, np.float32),
                                                    "label": np.zeros(400, np.int32)},
                                lambda n, x, y, s, t: x, seed=0, stream=7, batch_size=400, num_classes=3,
                                label_dropout=0.25, sigmas_of_n=lambda n: sfd.student_grid(n))(0)["label"]
  assert set(np.unique(dropped)) == {0, 3} and abs(np.mean(dropped == 3) - 0.25) < 0.07


# --- LPIPS as the distance (weights from files) ---------------------------------------------------------------


def random_lpips_state_dicts(widths=None, seed=0):
  """Random weights with the torchvision / lpips keys and shapes (the real files cannot be fetched here)."""
  from distill.evaluation import lpips
  trunk_shapes, lin_shapes = lpips.expected_shapes("alex", widths)
  rng = np.random.default_rng(seed)
  trunk = {k: (rng.standard_normal(v) / np.sqrt(np.prod(v[1:]) if len(v) > 1 else 10.0)).astype(np.float32)
           for k, v in trunk_shapes.items()}
  lin = {k: rng.random(v).astype(np.float32) for k, v in lin_shapes.items()}
  return trunk, lin


def test_lpips_metric_of_the_stages_is_the_losses_with_a_directly_built_lpips():
  from distill.evaluation import lpips
  trunk, lin = random_lpips_state_dicts(widths=(8, 8, 8, 8, 8))
  model = lpips.from_state_dicts("alex", trunk, lin, widths=(8, 8, 8, 8, 8))
  metric = functools.partial(lpips.lpips_distance, model, resize_to=32)
  frozen = {"lpips": model.params}
  noise, labels = inputs()
  states = direct_states(noise, labels, 3)
  batch = {"noise": noise, "label": labels, "step_index": jnp.int32(2), "num_steps": jnp.int32(3),
           "teacher": jnp.moveaxis(states, 0, 1)}
  padded = sfd.global_loss(x_fn, max_steps=3, metric=stages.lpips_metric("lpips", "alex", 32))
  got = float(padded(STUDENT_PARAMS, frozen, batch, jax.random.PRNGKey(0))[0])
  ref = sfd.global_loss(x_fn, max_steps=3, afs=True, metric=lambda frozen: metric)
  want = float(ref(STUDENT_PARAMS, {}, batch, jax.random.PRNGKey(0))[0])
  l1 = float(sfd.global_loss(x_fn, max_steps=3)(STUDENT_PARAMS, {}, batch, jax.random.PRNGKey(0))[0])
  assert got == pytest.approx(want, rel=1e-5) and abs(got - l1) > 1e-3 and got > 0
  # The local form: the same distance between the student's step and the target it is served.
  x = noise * 2.0
  target = x * 0.9
  local = sfd.local_loss(x_fn, max_steps=3, metric=stages.lpips_metric("lpips", "alex", 32))
  lb = {"state": x, "label": labels, "step_index": jnp.int32(1), "num_steps": jnp.int32(3), "target": target}
  grid = sfd.student_grid(3)
  x_hat = sfd.student_x_hat(x_fn, STUDENT_PARAMS, x, grid[1], labels)
  want = float(jnp.mean(metric(sfd.student_step(x_hat, x, grid[1], grid[2]), target)))
  assert float(local(STUDENT_PARAMS, frozen, lb, jax.random.PRNGKey(0))[0]) == pytest.approx(want, rel=1e-5)
  # Gradients flow through LPIPS into the student.
  g = jax.grad(lambda p: padded(p, frozen, batch, jax.random.PRNGKey(0))[0])(STUDENT_PARAMS)
  assert all(np.isfinite(np.asarray(v)).all() for v in g.values()) and float(jnp.abs(g["scale"])) > 0


def test_lpips_fields_are_checked():
  for field, value, needle in (("trunk", "", "config.sfd.lpips.trunk=''"), ("lin", "", "config.sfd.lpips.lin=''"),
                               ("resize", 16, "config.sfd.lpips.resize=16"), ("net", "squeeze", "'alex'")):
    c = tiny_config()
    c.sfd.metric = "lpips"
    c.sfd.lpips.trunk, c.sfd.lpips.lin = "trunk.npz", "lin.npz"
    c.sfd.lpips[field] = value
    with pytest.raises(configuration.ConfigError) as e:
      configuration.validate(c)
    assert needle in str(e.value), str(e.value)
  c = tiny_config()
  c.sfd.metric, c.sfd.loss_form, c.sfd.lpips.trunk, c.sfd.lpips.lin = "lpips", "trajectory", "t.npz", "l.npz"
  with pytest.raises(configuration.ConfigError, match="config.sfd.loss_form='trajectory'"):
    configuration.validate(c)


def test_tiny_sfd_stage_with_lpips_from_weight_files(tmp_path):
  """sfd.metric=lpips end to end: the run loads both weight files (torchvision / lpips keys, full AlexNet
  widths) and trains on the LPIPS distance, resized as configured."""
  trunk, lin = random_lpips_state_dicts()
  np.savez(tmp_path / "alexnet.npz", **trunk)
  np.savez(tmp_path / "alex_lin.npz", **lin)
  c = tiny_config(loss_form="local", trajectories=8 * 2)
  c.sfd.metric = "lpips"
  c.sfd.lpips.trunk, c.sfd.lpips.lin, c.sfd.lpips.resize = str(tmp_path / "alexnet.npz"), str(
      tmp_path / "alex_lin.npz"), 32
  configuration.validate(c)
  wd = str(tmp_path / "run")
  t_params = fake_teacher(c, wd)
  stages.run_sfd(context.Context(c, wd))
  m = _meta(wd, "sfd/cfg-local/N0002")
  assert m["metric"] == "lpips" and m["num_steps"] == 4
  params, _ = train.load_final_params(os.path.join(wd, "sfd/cfg-local/N0002"))
  assert any(np.max(np.abs(a - b)) > 1e-6 for _, a, b in testing.tree_leaf_pairs(params, t_params))


# --- batches, plans and costs ---------------------------------------------------------------------------------


def test_batches_serve_one_trajectory_to_its_updates_and_run_the_teacher_once():
  plan = sfd.make_plan("global", 3, [3], afs=True, seed=0)
  assert plan["trajectory"].tolist() == [0, 0, 1, 1, 2, 2] and plan["step_index"].tolist() == [1, 2, 1, 2, 1, 2]
  batches = stages.TrajectoryBatches(plan, stages.local_teacher_fn(spec(), TEACHER_PARAMS), seed=0, stream=7,
                                     batch_size=B, image_shape=SHAPE, num_classes=3, label_dropout=0.0)
  got = [batches(step) for step in range(6)]
  assert batches.teacher_runs == 3
  for a, b in ((0, 1), (2, 3), (4, 5)):
    np.testing.assert_array_equal(got[a]["noise"], got[b]["noise"])
    np.testing.assert_array_equal(got[a]["label"], got[b]["label"])
    assert got[a]["teacher"] is got[b]["teacher"]  # served from the cache, not recomputed
  assert not np.array_equal(got[0]["noise"], got[2]["noise"])
  assert [int(g["step_index"]) for g in got] == [1, 2, 1, 2, 1, 2] and all(int(g["num_steps"]) == 3 for g in got)
  # The cached teacher equals a direct computation of the trajectory's teacher states.
  for step in (0, 2):
    states = direct_states(jnp.asarray(got[step]["noise"]), jnp.asarray(got[step]["label"]), 3)
    np.testing.assert_allclose(got[step]["teacher"], np.moveaxis(np.asarray(states), 0, 1), rtol=1e-5, atol=1e-6)
  # A pure function of the step: asking again (as a resumed run does) gives the same numbers.
  again = batches(1)
  assert batches.teacher_runs == 4
  for key in got[1]:
    np.testing.assert_array_equal(again[key], got[1][key])
  # Padded to a larger grid for the one-compilation loss; the fixed-w teacher mixes CFG at its w.
  padded = stages.TrajectoryBatches(plan, stages.local_teacher_fn(spec(teacher_w=1.5), TEACHER_PARAMS), seed=0,
                                    stream=7, batch_size=B, image_shape=SHAPE, num_classes=3, label_dropout=0.0,
                                    pad_to=6)(0)
  assert padded["teacher"].shape == (B, 7) + SHAPE
  guided = direct_states(jnp.asarray(padded["noise"]), jnp.asarray(padded["label"]), 3, teacher_w=1.5)
  np.testing.assert_allclose(padded["teacher"][:, :4], np.moveaxis(np.asarray(guided), 0, 1), rtol=1e-5, atol=1e-6)
  assert not np.allclose(padded["teacher"][:, 3], got[0]["teacher"][:, 3], atol=1e-3)


def test_label_dropout_draws_the_null_class():
  _, none = inputs(label_dropout=0.0)
  labels = stages.trajectory_inputs(0, 7, 0, 4000, SHAPE, 3, 0.25)[1]
  assert none.max() < 3 and abs(np.mean(labels == 3) - 0.25) < 0.03 and set(np.unique(labels)) == {0, 1, 2, 3}


def test_global_plan_is_a_prefix_of_trajectory_plan_and_counts_trajectories():
  plan = sfd.make_plan("global", 10, [3, 4, 5, 6], afs=True, seed=2)
  assert len(np.unique(plan["trajectory"])) == 10
  full = sfd.trajectory_plan(len(plan["step_index"]), [3, 4, 5, 6], afs=True, seed=2)
  assert all(np.array_equal(plan[k], full[k]) for k in plan)
  starts = np.flatnonzero(np.diff(plan["trajectory"], prepend=-1))
  assert len(plan["step_index"]) == int(np.sum(plan["num_steps"][starts] - 1))  # N − 1 updates per trajectory
  whole = sfd.make_plan("trajectory", 10, [3, 4, 5, 6], afs=True, seed=2)
  np.testing.assert_array_equal(whole["num_steps"], plan["num_steps"][starts])  # the same N sequence


def test_cost_fields_count_teacher_evaluations_per_update():
  # The teacher's evaluation count is the one its solver run reports (sfd.teacher_trajectory's nfe).
  noise, labels = inputs()
  for n in (3, 6):
    nfe = []
    jax.eval_shape(lambda x, y: nfe.append(direct_teacher(x, y, n)[1]), noise, labels)  # counted while tracing
    nfe = nfe[0]
    assert stages.teacher_evals(spec(), n) == nfe == 4 * n
    assert stages.teacher_evals(spec(teacher_w=1.0), n) == 2 * 4 * n  # a CFG teacher call counts 2
  for nfe in (2, 5):  # SFD at NFE n: grid n + 1, n updates per trajectory, the k-th with k student evaluations
    n = nfe + 1
    for w, per_call in ((None, 1), (1.0, 2)):
      plan = sfd.make_plan("global", 4, [n], afs=True, seed=0)
      costs = stages.plan_costs(plan, "global", True, lambda m, w=w: stages.teacher_evals(spec(teacher_w=w), m))
      assert costs["teacher_evals_per_update"] == pytest.approx(per_call * 4 * n / nfe)
      assert costs["student_evals_per_update"] == pytest.approx((nfe + 1) / 2)
    whole = stages.plan_costs(sfd.make_plan("trajectory", 4, [n], afs=True, seed=0), "trajectory", True,
                              lambda m: stages.teacher_evals(spec(), m))
    assert whole == {"teacher_evals_per_update": 4 * n, "student_evals_per_update": nfe}
  # SFD-v: every trajectory's N·K over all updates, by brute force.
  plan = sfd.make_plan("global", 7, [3, 4, 5, 6], afs=True, seed=1)
  total = sum(4 * int(plan["num_steps"][np.flatnonzero(plan["trajectory"] == j)[0]]) for j in range(7))
  costs = stages.plan_costs(plan, "global", True, lambda m: stages.teacher_evals(spec(), m))
  assert costs["teacher_evals_per_update"] == pytest.approx(total / len(plan["step_index"]))
  # Alg. 7's teacher: the SFD model's Euler sampler over 2K steps, the first analytic: 2K − 1 evaluations.
  assert stages.teacher_evals(spec(solver="euler", k=3, afs=True), 2) == 5


def test_second_stage_teacher_is_the_sfd_models_own_sampler_on_the_refined_grid():
  noise, labels = inputs()
  teacher = spec(solver="euler", k=3, afs=True, step_count=True)
  states = stages.teacher_states(STUDENT_PARAMS, noise, labels, spec=teacher, n=2)
  assert states.shape == (B, 3) + SHAPE
  # The SFD-v model sampled at NFE 5 (grid 6, AFS, step condition 6) ends where the teacher's trajectory ends,
  # and its grid's 3rd point is the one-NFE student's middle point.
  fine = sfd.student_grid(6)
  np.testing.assert_array_equal(fine[::3], sfd.student_grid(2))
  assert stages.teacher_evals(teacher, 2) == 5
  # That model's Euler sampler with AFS, in float64: AFS, then its own x̂ told N = 6.
  x = sfd.SIGMA_MAX * np.asarray(noise, np.float64)
  sampled = [x]
  for i in range(6):
    s, t = fine[i], fine[i + 1]
    eps = x / np.sqrt(1.0 + s * s) if i == 0 else (x - np_student(STUDENT_PARAMS, x, s, labels, 6)) / s
    x = x + (t - s) * eps
    sampled.append(x)
  np.testing.assert_allclose(states[:, -1], sampled[6], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(states[:, 1], sampled[3], rtol=1e-5, atol=1e-5)


def test_tenfold_drop_is_adam_with_the_lr_divided_by_10_halfway_and_one_program_for_every_length():
  params = {"a": jnp.asarray([1.0, -2.0]), "b": jnp.asarray(0.5)}
  grads = [jax.tree.map(lambda p, i=i: jnp.cos(p * (i + 1)), params) for i in range(6)]

  def run(opt):
    state, p, out = opt.init(params), params, []
    for g in grads:
      u, state = opt.update(g, state, p)
      p = optax.apply_updates(p, u)
      out.append(p)
    return out

  mine, schedule = optimizers.adam_tenfold_drop(1e-2, 6)
  ref = optax.adam(optax.piecewise_constant_schedule(1e-2, {3: 0.1}), b1=0.9, b2=0.999)
  for x, y in zip(run(mine), run(ref)):
    for key in params:
      np.testing.assert_allclose(x[key], y[key], rtol=1e-6)
  assert [schedule(i) for i in (0, 2, 3, 5)] == [1e-2, 1e-2, 1e-3, 1e-3]
  # The drop step is state, not a constant of the program: students of any length share one compilation.
  hlo = lambda opt: jax.jit(opt.update).lower(grads[0], opt.init(params), params).as_text()
  assert hlo(optimizers.adam_tenfold_drop(1e-2, 6)[0]) == hlo(optimizers.adam_tenfold_drop(1e-2, 100)[0])
  baked = lambda n: optax.adam(optax.piecewise_constant_schedule(1e-2, {n // 2: 0.1}))
  assert hlo(baked(6)) != hlo(baked(100))


# --- a tiny run of the three stages ---------------------------------------------------------------------------


def tiny_config(**sfd_overrides):
  c = configuration.base_config()
  c.data.name, c.data.image_size, c.data.channels, c.data.num_classes = "mixture", 4, 1, 3
  m = c.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.head_dim, m.num_groups = 8, (1,), 1, (), 8, 4
  s = c.sfd
  s.nfe, s.v_nfe, s.one_nfe_k, s.batch_size = (2,), (2, 3), 2, 8
  s.trajectories, s.one_nfe_trajectories, s.lr, s.one_nfe_lr = 8 * 12, 8 * 4, 2e-3, 1e-3
  s.log_every, s.ckpt_every = 4, 2
  c.distill.grid_w = (0.0, 1.0)
  c.sample.batch_size = 32
  c.pipeline = ("sfd", "sfd_v", "sfd_one_nfe")
  for key, value in sfd_overrides.items():
    s[key] = value
  configuration.validate(c)
  return c


def fake_teacher(c, workdir):
  """A CFG-teacher checkpoint of the tiny U-Net: its init with every parameter perturbed (the zero-initialised
  output layer included, so it predicts something)."""
  model = models.unet_from_config(c.model, c.data)
  rng = np.random.default_rng(1)  # numpy: a jitted draw would compile once per parameter shape
  params = jax.tree.map(lambda l: np.asarray(l) + 0.1 * rng.standard_normal(l.shape).astype(np.float32),
                        models.init_params(model, (4, 4, 1), 0))
  train._save_final(os.path.join(workdir, "teacher"), params,
                    {"kind": "cfg_teacher", "sampler": "ddim", "num_sampling_steps": 8, "parameterization": "v"})
  return params


def _meta(workdir, name):
  with open(os.path.join(workdir, name, "final", "meta.json")) as f:
    return json.load(f)


def test_tiny_sfd_stage_trains_resumes_bit_identically_and_samples(tmp_path, monkeypatch):
  c = tiny_config()
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  t_params = fake_teacher(c, a)
  fake_teacher(c, b)
  ctx = context.Context(c, a)
  stages.run_sfd(ctx)

  assert os.path.isfile(os.path.join(a, "sfd/cfg/N0002/samples.png"))
  m = _meta(a, "sfd/cfg/N0002")
  assert (m["method"], m["sampler"], m["kind"], m["report_sampler"]) == ("SFD (CFG)", "sfd", "sfd_student",
                                                                         "deterministic")
  assert m["num_steps"] == 12 * 2 and m["eval_steps"] == [2] and m["grid_steps"] == 3 and m["cost_parents"] == []
  assert m["w_range"] == [0.0, 4.0] and m["guided_sampling"] and not m["w_conditioned"]
  assert m["teacher_evals_per_update"] == pytest.approx(3 * 4 / 2) and m["student_evals_per_update"] == 1.5

  # The trained NFE-2 student lands nearer the teacher's DPM-Solver++ trajectory end than where it started
  # (the teacher itself sampled at NFE 2), on noise it was not trained on.
  params, meta = train.load_final_params(os.path.join(a, "sfd/cfg/N0002"))
  meta = contract.StageMeta.from_dict(meta)
  noise, labels = stages.trajectory_inputs(5, 99, 0, 64, (4, 4, 1), 3, 0.0)
  target = np.asarray(stages.teacher_states(t_params, noise, labels, spec=stages.teacher_spec(ctx.config, context.x_fn_of(ctx, context.teacher_model(ctx)), None), n=3))
  fn, nfe = stages.sample_fn(ctx, params, meta, 2)
  fn0, _ = stages.sample_fn(ctx, t_params, meta, 2)
  w0 = jnp.zeros((64,), jnp.float32)
  err = lambda f: float(np.mean(np.abs(np.clip(target[:, -1], -1, 1) - np.asarray(f(noise, labels, w0)))))
  assert nfe == 4  # CFG on the student: 2 evaluations per step
  assert err(fn) < 0.8 * err(fn0), (err(fn), err(fn0))

  # Resume: killed after the checkpoint at update 4, the rerun ends bit-identical to the uninterrupted run.
  original = stages.TrajectoryBatches.__call__

  def crash_at_5(self, step):
    if step == 5:
      raise KeyboardInterrupt("simulated kill")
    return original(self, step)

  monkeypatch.setattr(stages.TrajectoryBatches, "__call__", crash_at_5)
  with pytest.raises(KeyboardInterrupt):
    stages.run_sfd(context.Context(c, b))
  assert not os.path.exists(os.path.join(b, "sfd/cfg/N0002/final"))
  assert os.path.isdir(os.path.join(b, "sfd/cfg/N0002/checkpoints/4"))
  monkeypatch.setattr(stages.TrajectoryBatches, "__call__", original)
  stages.run_sfd(context.Context(c, b))
  resumed, _ = train.load_final_params(os.path.join(b, "sfd/cfg/N0002"))
  testing.assert_trees_equal(params, resumed)


def test_tiny_sfd_stage_in_the_local_form_trains_on_data(tmp_path):
  """Alg. 3 as a stage: the run's training set noised to a drawn grid point, one student step per update."""
  c = tiny_config(loss_form="local", fixed_w=(1.0,), cfg_student=False)
  wd = str(tmp_path)
  t_params = fake_teacher(c, wd)
  ctx = context.Context(c, wd)
  calls = []
  original = stages.LocalBatches.__call__
  stages.LocalBatches.__call__ = lambda self, step: calls.append(step) or original(self, step)
  try:
    stages.run_sfd(ctx)
  finally:
    stages.LocalBatches.__call__ = original
  m = _meta(wd, "sfd/w1-local/N0002")
  assert m["loss_form"] == "local" and m["method"] == "SFD local (w=1)" and m["guidance"] == "w1" and m["num_steps"] == 24 == len(calls)
  assert m["teacher_evals_per_update"] == 2 * 4 and m["student_evals_per_update"] == 1.0  # fixed-w: CFG teacher
  params, meta = train.load_final_params(os.path.join(wd, "sfd/w1-local/N0002"))
  meta = contract.StageMeta.from_dict(meta)
  assert any(np.max(np.abs(a - b)) > 1e-4 for _, a, b in testing.tree_leaf_pairs(params, t_params))
  assert os.path.isfile(os.path.join(wd, "sfd/w1-local/N0002/samples.png"))
  # On updates it was not trained on (another stream), the student's one Euler step lands nearer the teacher's
  # K-step target than the teacher's own Euler step (its init) does.
  plan = sfd.make_plan("local", 6, [3], afs=True, seed=9)
  held_out = stages.LocalBatches(plan, context.batch_fn(ctx.train_source, 8, 9),
                                 stages.local_target_fn(stages.teacher_spec(ctx.config, context.x_fn_of(ctx, context.teacher_model(ctx)), 1.0), t_params), seed=9, stream=3,
                                 batch_size=8, num_classes=3, label_dropout=0.0,
                                 sigmas_of_n=lambda n: sfd.student_grid(n, c.sfd.sigma_min, c.sfd.sigma_max,
                                                                        c.sfd.rho))
  loss = stages.loss_of(ctx, context.x_fn_of(ctx, context.student_model(ctx, step_embedding=False)), "local",
                        False)
  mean_loss = lambda p: np.mean([float(loss(p, {}, held_out(i), jax.random.PRNGKey(0))[0]) for i in range(12)])
  assert mean_loss(params) < 0.9 * mean_loss(t_params), (mean_loss(params), mean_loss(t_params))
  noise, labels = stages.trajectory_inputs(5, 99, 0, 8, (4, 4, 1), 3, 0.0)
  fn, nfe = stages.sample_fn(ctx, params, meta, 2)
  assert nfe == 2 and np.all(np.isfinite(np.asarray(fn(noise, labels, jnp.ones((8,))))))


@pytest.mark.slow
def test_tiny_sfd_v_and_second_stage_with_both_guidance_variants(tmp_path):
  c = tiny_config(fixed_w=(1.0,))
  wd = str(tmp_path)
  fake_teacher(c, wd)
  ctx = context.Context(c, wd)
  stages.run_sfd_v(ctx)
  stages.run_second_stage(ctx)
  for tag, method_tag, w_range in (("cfg", "CFG", [0.0, 4.0]), ("w1", "w=1", [1.0, 1.0])):
    v = _meta(wd, f"sfd_v/{tag}")
    assert v["method"] == f"SFD-v ({method_tag})" and v["eval_steps"] == [2, 3] and v["step_condition"]
    assert v["w_range"] == w_range and v["guided_sampling"] == (tag == "cfg")
    one = _meta(wd, f"sfd_one_nfe/{tag}")
    assert (one["method"], one["eval_steps"], one["cost_parents"]) == (f"SFD one-NFE ({method_tag})", [1],
                                                                      [f"sfd_v/{tag}"])
    assert one["teacher_evals_per_update"] == 3 and one["student_evals_per_update"] == 1 and one["num_steps"] == 4
    assert os.path.isfile(os.path.join(wd, f"sfd_one_nfe/{tag}", "samples.png"))
  # The fixed-w teacher is a CFG call (2 evaluations), the conditional one is not.
  assert _meta(wd, "sfd_v/w1")["teacher_evals_per_update"] == pytest.approx(
      2 * _meta(wd, "sfd_v/cfg")["teacher_evals_per_update"])
  # Scored at one NFE, guided students cost 2 evaluations, fixed-w ones 1.
  for tag, evals in (("cfg", 2), ("w1", 1)):
    params, meta = train.load_final_params(os.path.join(wd, f"sfd_one_nfe/{tag}"))
    assert stages.sample_fn(ctx, params, contract.StageMeta.from_dict(meta), 1)[1] == evals


def test_sampler_is_euler_with_afs_and_counts_cfg_evaluations_twice():
  c = tiny_config()
  ctx = context.Context(c, "/nonexistent")
  model = context.student_model(ctx, step_embedding=True)
  params = context.init_params(ctx, model, models.init_params(models.unet_from_config(c.model, c.data), (4, 4, 1), 3))
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [l + 0.05 * jnp.cos(jnp.arange(l.size).reshape(l.shape)) for l in leaves])
  z = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 1))
  labels = jnp.asarray([0, 1, 2, 0, 1, 2], jnp.int32)
  w = jnp.asarray([0.0, 0.5, 1.0, 2.0, 0.0, 3.0], jnp.float32)
  base = {"afs": True, "sigma_min": 0.006, "sigma_max": 80.0, "rho": 7.0, "step_condition": True}
  x_fn = models.x_function(model, c.model.parameterization)

  @functools.partial(jax.jit, static_argnames="guided")
  def by_hand(z, guided):
    """AFS, then 3 Euler steps on the 4-interval EDM grid, the model told N = 4; CFG mixes per row."""
    grid = sfd.student_grid(4)
    x = sfd.analytical_first_step(80.0 * z, grid[0], grid[1])
    for i in (1, 2, 3):
      zz, logsnr = solvers.ve_to_vp(x, grid[i])
      steps = jnp.full((6,), 4, jnp.int32)
      x_hat = cond = x_fn(params, zz, logsnr, labels, None, steps=steps)
      if guided:
        uncond = x_fn(params, zz, logsnr, jnp.full((6,), 3, jnp.int32), None, steps=steps)
        x_hat = (1 + w)[:, None, None, None] * cond - w[:, None, None, None] * uncond
      x = sfd.student_step(x_hat, x, grid[i], grid[i + 1])
    return jnp.clip(x, -1, 1)

  for guided in (True, False):
    # The contract's typed fields (not read by the sampler) around the sampler's own settings.
    meta = contract.StageMeta.of(kind="sfd_student", method="SFD-v", sampler="sfd", num_sampling_steps=3,
                                 w_range=[0.0, 3.0], batch_size=6, teacher_evals_per_update=0.0,
                                 **dict(base, guided_sampling=guided))
    fn, nfe = stages.sample_fn(ctx, params, meta, 3)
    assert nfe == (6 if guided else 3)
    np.testing.assert_allclose(fn(z, labels, w), by_hand(z, guided), rtol=1e-4, atol=1e-5)


# --- configs ----------------------------------------------------------------------------------------------------


def _config(name, arg=None):
  spec_ = importlib.util.spec_from_file_location(f"_cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  return module.get_config(arg)


def test_configs_carry_table_6_and_the_digits_variant_validates():
  for name, lr, second_lr, second_traj in (("cifar10", 5e-5, 5e-4, 2_000_000), ("imagenet64", 1e-5, 1e-4, 800_000)):
    s = _config(name).sfd
    assert (s.solver, s.k, s.sigma_min, s.afs, s.metric, s.batch_size, s.trajectories) == (
        "dpmpp_3m", 4, 0.006, True, "l1", 128, 200_000)
    assert (s.lr, s.one_nfe_lr, s.one_nfe_trajectories) == (lr, second_lr, second_traj)
  c = _config("digits", "sfd")
  configuration.validate(c)
  assert c.pipeline == ("teacher", "stage_one", "distill_deterministic", "sfd", "sfd_v", "sfd_one_nfe", "evaluate")
  with pytest.raises(ValueError, match="'sfd'"):
    _config("digits", "nope")


@pytest.mark.parametrize("field,value,needle", [
    ("nfe", (2, 2), "distinct positive integers"), ("v_nfe", (), "non-empty"), ("solver", "rk4", "'dpmpp_3m'"),
    ("metric", "ssim", "'lpips'"), ("k", 0, "positive integer"), ("one_nfe_k", 1, ">= 2"),
    ("one_nfe_k", 4, "NFE 7"), ("lr", 0.0, "(0.0, 1.0]"), ("label_dropout", 1.0, "[0.0, 1.0)"),
    ("loss_form", "rollout", "'local'"), ("sigma_min", 90.0, "sfd.sigma_max=80.0"), ("fixed_w", (-1.0,), ">= 0"),
])
def test_bad_sfd_fields_are_named(field, value, needle):
  c = tiny_config()
  c.sfd[field] = value
  with pytest.raises(configuration.ConfigError) as e:
    configuration.validate(c)
  assert f"config.sfd.{field}=" in str(e.value) and needle in str(e.value), str(e.value)


def test_a_config_without_any_sfd_variant_is_refused():
  with pytest.raises(configuration.ConfigError, match="no SFD variant"):
    tiny_config(cfg_student=False)


def test_teacher_threshold_clips_every_teacher_prediction():
  """sfd.teacher_threshold: the teacher's x̂ goes through solvers.dynamic_threshold before the solver uses it
  (a teacher whose x̂ leaves [−1, 1] gives other states); 0 leaves the teacher as it is."""
  big_x = lambda params, z, logsnr, labels, w, **kw: 3.0 * jnp.tanh(z)  # |x̂| up to 3
  plain = stages.TeacherSpec(big_x, "dpmpp_3m", 2, None, 10, 0.006, 80.0, 7.0)
  clipped = plain._replace(threshold=0.995)
  noise = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 1))
  labels = jnp.array([1, 2])
  den = clipped.denoiser(None, labels, 3)
  z, lam = jnp.ones((2, 4, 4, 1)) * 0.5, jnp.zeros(2)
  np.testing.assert_allclose(np.asarray(den(z, lam)),
                             np.asarray(solvers.dynamic_threshold(big_x(None, z, lam, labels, None), 0.995)), atol=1e-6)
  a = np.asarray(stages.teacher_states(None, noise, labels, spec=plain, n=3))
  b = np.asarray(stages.teacher_states(None, noise, labels, spec=clipped, n=3))
  # The last state, at σ_min = 0.006, is x̂ plus σ_min-sized noise: within ~1 with thresholding, ~3 without.
  assert np.abs(a - b).max() > 0.1 and np.abs(b[:, -1]).max() < 1.1 < 2.5 < np.abs(a[:, -1]).max()


def test_one_nfe_loss_adds_lpips_when_its_weights_are_given():
  """§4.2: the one-NFE stage trains with L1 + LPIPS; with a tiny random-weight LPIPS the 'l1+lpips' loss is the
  'l1' loss plus the mean LPIPS distance of the same student step and target. Without weight files, L1 alone."""
  from distill import configuration
  from distill.evaluation import lpips
  trunk, lin = random_lpips_state_dicts(widths=(8, 8, 8, 8, 8))
  model = lpips.from_state_dicts("alex", trunk, lin, widths=(8, 8, 8, 8, 8))
  frozen = {"lpips": model.params}
  c = configuration.base_config()
  assert stages.stage_metric(c, one_nfe=True) == "l1"
  c.sfd.lpips.trunk, c.sfd.lpips.lin = "trunk.npz", "lin.npz"
  assert stages.stage_metric(c, one_nfe=True) == "l1+lpips" and stages.stage_metric(c) == "l1"
  c.sfd.one_nfe_lpips = False
  assert stages.stage_metric(c, one_nfe=True) == "l1"
  x_fn = lambda p, z, logsnr, labels, w, **kw: jnp.tanh(p * z)
  batch = {"noise": jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3)), "label": jnp.array([0, 1]),
           "step_index": jnp.int32(1), "num_steps": jnp.int32(2),
           "teacher": jax.random.uniform(jax.random.PRNGKey(2), (2, 3, 32, 32, 3), minval=-1, maxval=1)}
  rng = jax.random.PRNGKey(3)
  both = sfd.global_loss(x_fn, max_steps=2, metric=stages.lpips_metric("l1+lpips", "alex", 32))(0.7, frozen, batch, rng)
  l1 = sfd.global_loss(x_fn, max_steps=2, metric="l1")(0.7, frozen, batch, rng)
  lp = sfd.global_loss(x_fn, max_steps=2, metric=stages.lpips_metric("lpips", "alex", 32))(0.7, frozen, batch, rng)
  assert float(lp[0]) > 1e-4
  np.testing.assert_allclose(float(both[0]), float(l1[0]) + float(lp[0]), rtol=1e-5)


def test_paper_configs_distil_at_w0_with_one_evaluation_per_step():
  """SFD Tables 2-3 sample an unguided student: the CIFAR-10 and ImageNet 64 configs' SFD rows cost 1 network
  evaluation per step at w = 0 (no CFG on the student), and train on no null-label rows."""
  import importlib.util
  from distill import registry
  for name in ("cifar10", "imagenet64"):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.pipeline = ("teacher", "sfd", "sfd_v", "sfd_one_nfe", "evaluate")
    planned = registry.plan(c)
    rows = [r for r in registry.planned_rows(c, planned) if r["method"].startswith("SFD")]
    assert rows and all(r["w"] == 0.0 and r["nfe"] == r["steps"] for r in rows), name
    assert all(not m.extra["guided_sampling"] and m.w_range == (0.0, 0.0) for _, _, m in planned if m.kind == "sfd_student")
    assert c.sfd.teacher_threshold == 0.995
