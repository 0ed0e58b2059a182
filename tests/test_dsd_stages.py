"""DSD, TSD and training DSD as pipeline stages (distill/methods/dsd/stages.py): batches across depths, one compiled
step for every depth and schedule, tiny end-to-end stages, bit-identical resumption and the cost fields.

The math is tested in tests/test_dsd.py (Alg. 2 against a float64 hand loop, zero loss at two-step consistency
with the exact mixture denoiser, gradients only through x′, the (N_i, U_i) table); here only the wiring."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import configuration, context, contract, losses, models, registry, testing, train
from distill.methods.dsd import core as dsd
from distill.methods import teacher as teacher_lib
from distill.methods.dsd import stages


def _config(teacher_dir: str):
  """A 8×8 digits config with a U-Net small enough to compile in seconds, and DSDI 4 → 2 with P = 8:
  the printed U_i with 2P give (4, 2), (2, 4): 2·2 + 4·1 = 8 updates, depth 4 → 2 at update 4."""
  c = configuration.base_config()
  c.model.ch, c.model.ch_mult, c.model.num_res_blocks, c.model.attn_resolutions = 8, (1,), 1, ()
  c.model.num_groups, c.model.dropout = 4, 0.0
  c.distill.teacher_dir = teacher_dir
  c.distill.grid_w = (0.0, 1.0)
  c.sample.max_grid_classes, c.sample.batch_size, c.sample.num_steps = 2, 4, 4
  d = c.dsd
  d.kinds, d.start_steps, d.end_steps, d.updates, d.batch_size = ("DSDI", "DSDN"), 4, 2, 8, 4
  d.lr, d.adam_b1, d.adam_b2, d.ema_decay, d.w_min, d.w_max = 1e-3, 0.9, 0.98, 0.9, 0.0, 2.0
  d.log_every, d.ckpt_every, d.eval_steps = 1, 4, (2, 4)
  # The one-stage TSD (start model frozen) for both kinds; the per-depth form has its own test.
  d.tsd_kinds, d.tsd_teacher = ("DSDI", "DSDN"), "start_model"
  c.teacher.num_steps, c.teacher.batch_size, c.teacher.log_every, c.teacher.ckpt_every = 3, 8, 1, 2
  c.teacher.warmup_steps = 1
  c.pipeline = ("dsd", "tsd", "training_dsd")
  configuration.validate(c)
  return c


def _fake_teacher(root: str):
  """A randomly initialised CFG model saved as a finished teacher stage (what the DSD stages start from)."""
  c = _config("")
  model = models.unet_from_config(c.model, c.data)
  params = models.init_params(model, (8, 8, 1), 5)
  train._save_final(root, params, {"kind": "cfg_teacher", "sampler": "ddim", "num_sampling_steps": 4,
                                   "stage": "teacher", "num_steps": 1, "parameterization": "v"})
  return params


def _final_meta(stage_dir):
  """The stage's final/meta.json as written: StageMeta.to_dict() plus the trainer's keys (stage, num_steps)."""
  with open(os.path.join(stage_dir, "final", "meta.json")) as f:
    return json.load(f)


def _metrics(stage_dir):
  with open(os.path.join(stage_dir, "tb", "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# --- batches and costs (no compilation) ---------------------------------------------------------------------


def test_stage_batches_cross_a_depth_boundary(monkeypatch):
  c = _config("")
  plan = stages.schedule_plan(c.dsd, "DSDI")
  assert plan == [(4, 2), (2, 4)]
  assert stages.schedule_plan(c.dsd, "DSDN") == [(4, 4)]  # DSDN stays at start_steps: 4·4/2 = 8 = P updates
  kw = dict(batch_size=4, image_shape=(8, 8, 1), num_classes=10, w_min=0.0, w_max=2.0, seed=3)
  fn = stages.trajectory_batch_fn(plan, **kw)
  batches = [fn(u) for u in range(8)]
  # (N, j): trajectory 0 at positions 0, 1; trajectory 1 at 0, 1; then four one-position trajectories at N = 2.
  assert [(int(b["num_steps"][0]), int(b["position"][0])) for b in batches] == (
      [(4, 0), (4, 1), (4, 0), (4, 1)] + [(2, 0)] * 4)
  for b in batches:  # the depth and position travel as [B] int32 arrays: traced, not static
    assert b["num_steps"].shape == b["position"].shape == (4,) and b["position"].dtype == np.int32
  same = lambda a, b: all(np.array_equal(a[k], b[k]) for k in ("noise", "label", "w"))
  assert same(batches[0], batches[1]) and same(batches[2], batches[3])  # one trajectory, its positions
  firsts = [batches[i] for i in (0, 2, 4, 5, 6, 7)]
  assert not any(same(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:])  # each a new trajectory
  assert all(0.0 <= b["w"].min() and b["w"].max() <= 2.0 for b in batches)
  # A pure function of the step; with two processes each takes its half of the rows.
  np.testing.assert_array_equal(fn(5)["noise"], batches[5]["noise"])
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  half = stages.trajectory_batch_fn(plan, **kw)(5)
  np.testing.assert_array_equal(half["noise"], batches[5]["noise"][2:])
  assert half["position"].shape == (2,)


def _replayed_by_enumeration(plan):
  """Mean over every update of the plan of 2j, walking the updates one by one (dsd.update_position)."""
  total = sum(dsd.updates_per_depth(plan))
  return sum(2 * dsd.update_position(plan, u)[2] for u in range(total)) / total


@pytest.mark.parametrize("plan", [[(4, 2), (2, 4)], [(8, 3), (4, 5), (2, 1)], [(16, 25)],
                                  dsd.depth_schedule("DSDGEXP", 16, 600, 4)])
def test_cost_fields_count_the_replay(plan):
  mean = _replayed_by_enumeration(plan)
  assert stages.mean_replayed_steps(plan) == pytest.approx(mean, rel=1e-12)
  # DSD: the prefix + x̂(z_t) + the second step, all the student's; a CFG model's call counts 2.
  assert stages.evals_per_update(plan, "dsd", 2) == (0.0, pytest.approx(2 * (2 + mean)))
  assert stages.evals_per_update(plan, "dsd", 1) == (0.0, pytest.approx(2 + mean))
  # TSD: the frozen teacher samples and targets; the student evaluates once, with gradient.
  assert stages.evals_per_update(plan, "tsd", 2) == (pytest.approx(2 * (2 + mean)), 2.0)
  assert stages.evals_per_update([(4, 2), (2, 4)], "dsd", 2)[1] == 5.0  # by hand: 2j = 0, 2, 0, 2, 0, 0, 0, 0


# --- tiny end-to-end stages -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dsd_run(tmp_path_factory):
  """'dsd' and 'tsd' with kinds DSDI (depths 4, 2) and DSDN, the jitted train steps recorded."""
  root = tmp_path_factory.mktemp("dsd_run")
  teacher_params = _fake_teacher(str(root / "teacher"))
  ctx = context.Context(_config(str(root / "teacher")), str(root / "wd"))
  recorded = []
  original = train.jitted_train_step

  def record(loss_fn, *args):
    step = original(loss_fn, *args)
    recorded.append((loss_fn, step))
    return step

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, "jitted_train_step", record)
    out = {"dsd": stages.run_dsd(ctx), "tsd": stages.run_tsd(ctx)}
  return ctx, teacher_params, out, recorded


def test_one_compiled_step_serves_every_depth_and_schedule(dsd_run):
  ctx, _, out, recorded = dsd_run
  assert len(recorded) == 4  # dsd/DSDI, dsd/DSDN, tsd/DSDI, tsd/DSDN
  dsd_steps = {id(step) for _, step in recorded[:2]}
  tsd_steps = {id(step) for _, step in recorded[2:]}
  assert len(dsd_steps) == 1 and len(tsd_steps) == 1 and dsd_steps != tsd_steps
  # DSDI crossed the depth boundary (N = 4 → 2) and DSDN stayed at N = 4: one compilation each for all of it.
  for _, step in (recorded[0], recorded[2]):
    assert step._cache_size() == 1


def test_dsd_and_tsd_stages_train_from_the_teacher(dsd_run):
  ctx, teacher_params, out, _ = dsd_run
  c = ctx.config
  model = models.unet_from_config(c.model, c.data)
  guided = losses.cfg_x_fn(models.x_function(model, "v"), ctx.null_label)
  batch0 = stages.trajectory_batch_fn([(4, 2), (2, 4)], batch_size=4, image_shape=ctx.image_shape, num_classes=10,
                                      w_min=0.0, w_max=2.0, seed=c.seed)(0)
  rng0 = jax.random.fold_in(jax.random.PRNGKey(c.seed), 0)  # the trainer's step-0 key
  first = float(dsd.fine_tuning_loss(guided, logsnr_fn=ctx.logsnr_fn)(teacher_params, None, batch0, rng0)[0])
  for mode in ("dsd", "tsd"):
    for kind in ("DSDI", "DSDN"):
      stage_dir = ctx.stage_dir(f"{mode}/{kind}")
      params, meta = out[mode][kind]
      assert os.path.isfile(os.path.join(stage_dir, "final", "meta.json"))
      assert os.path.isfile(os.path.join(stage_dir, "samples.png"))
      saved = _final_meta(stage_dir)
      assert saved["num_steps"] == 8 and saved["stage"] == f"{mode}/{kind}"
      assert meta == contract.StageMeta.from_dict(saved)  # the returned record is the one written
      logged = _metrics(stage_dir)
      assert [m["step"] for m in logged] == list(range(1, 9)) and all(np.isfinite(m["loss"]) for m in logged)
      if kind == "DSDI":
        # Update 1: the teacher's own DSD loss on the first trajectory batch; TSD starts equal to it (the
        # student is the teacher), so the stage fed the right model, batch and key.
        assert logged[0]["loss"] == pytest.approx(first, rel=1e-4)
      moved = max(float(np.max(np.abs(a - b))) for _, a, b in testing.tree_leaf_pairs(params, teacher_params))
      assert moved > 1e-5
  # The same noise, yet TSD's later losses differ from DSD's: its targets stay the frozen teacher's.
  assert _metrics(ctx.stage_dir("tsd/DSDI"))[-1]["loss"] != _metrics(ctx.stage_dir("dsd/DSDI"))[-1]["loss"]


def test_tsd_by_depth_learns_from_the_previous_depths_student(dsd_run, tmp_path):
  """dsd.tsd_teacher='previous_depth': DSDI's depths N = 4, 2 are stages tsd/DSDI/N0004, tsd/DSDI/N0002; depth
  k's teacher (fingerprint in its meta) is depth k−1's final student, the first's the start model; only the
  last depth is scored, and its cost includes the first's. Batches and the learning rate continue the
  one-stage schedule."""
  ctx, teacher_params, out, _ = dsd_run
  config = ctx.config.copy_and_resolve_references()
  config.dsd.tsd_kinds, config.dsd.tsd_teacher = ("DSDI",), "previous_depth"
  c2 = context.Context(config, str(tmp_path / "wd"))
  params, meta = stages.run_tsd(c2)["DSDI"]
  first_dir, last_dir = c2.stage_dir("tsd/DSDI/N0004"), c2.stage_dir("tsd/DSDI/N0002")
  first_params, first_raw = train.load_final_params(first_dir)
  first, last = contract.StageMeta.from_dict(first_raw), contract.StageMeta.from_dict(_final_meta(last_dir))
  assert first.extra["teacher_fingerprint"] == train.fingerprint(teacher_params)
  assert last.extra["teacher_fingerprint"] == train.fingerprint(first_params)
  assert last.extra["teacher_fingerprint"] != first.extra["teacher_fingerprint"]
  assert (first.scored, last.scored, last.cost_parents, last.num_sampling_steps) == (False, True,
                                                                                     ("tsd/DSDI/N0004",), 1)
  assert meta == last and [_final_meta(d)["num_steps"] for d in (first_dir, last_dir)] == [4, 4]
  # Depth 0 is the one-stage TSD's first 4 updates exactly (same start, batches, keys and schedule).
  one_stage = _metrics(ctx.stage_dir("tsd/DSDI"))
  np.testing.assert_allclose([m["loss"] for m in _metrics(first_dir)], [m["loss"] for m in one_stage[:4]],
                             rtol=1e-5)
  assert _metrics(last_dir)[0]["lr"] == pytest.approx(one_stage[4]["lr"], rel=1e-6)


def test_meta_states_sampler_steps_and_cost(dsd_run):
  ctx, _, out, _ = dsd_run
  meta = out["dsd"]["DSDI"][1].to_dict()
  assert meta["sampler"] == "cfg_ddim" and meta["w_conditioned"] is False and meta["kind"] == "dsd_student"
  assert meta["num_sampling_steps"] == 1 and meta["eval_steps"] == [2, 4] and meta["w_range"] == [0.0, 2.0]
  assert meta["method"] == "DSDI" and meta["report_sampler"] == "deterministic" and meta["cost_parents"] == []
  assert meta["plan"] == [[4, 2], [2, 4]] and meta["updates_per_depth"] == [4, 4] and meta["batch_size"] == 4
  # Replay 2j ∈ {0, 2, 0, 2, 0, 0, 0, 0}: 0.5 on average; (2 + 0.5) guided calls of 2 evaluations each.
  assert meta["teacher_evals_per_update"] == 0.0 and meta["student_evals_per_update"] == 5.0
  tsd_meta = out["tsd"]["DSDI"][1].to_dict()
  assert tsd_meta["method"] == "TSD (DSDI)" and tsd_meta["kind"] == "tsd_student"
  assert tsd_meta["teacher_evals_per_update"] == 5.0 and tsd_meta["student_evals_per_update"] == 2.0
  dsdn = out["dsd"]["DSDN"][1].to_dict()  # N = 4 throughout: 2j ∈ {0, 2} → 1; 2·(2 + 1)
  assert dsdn["num_sampling_steps"] == 2 and dsdn["student_evals_per_update"] == 6.0
  # The registry samples it as the CFG teacher is sampled: 2 evaluations per step.
  fn, nfe = registry.sampler(ctx, out["dsd"]["DSDI"][0], out["dsd"]["DSDI"][1], 4)
  assert nfe == 8
  x = fn(jnp.zeros((2, 8, 8, 1)), jnp.array([0, 1]), jnp.array([0.0, 1.0]))
  assert x.shape == (2, 8, 8, 1) and bool(jnp.all(jnp.abs(x) <= 1.0))


def test_interrupted_dsd_stage_resumes_bit_identically(dsd_run, tmp_path, monkeypatch):
  ctx, _, out, _ = dsd_run
  config = ctx.config.copy_and_resolve_references()
  config.dsd.kinds = ("DSDI",)
  resumed_ctx = context.Context(config, str(tmp_path / "wd"))
  resumed_ctx.cache = ctx.cache  # the same models and losses: reuse the compiled step
  real = dsd.trajectory_batch

  def killed_at_5(plan, update, **kw):
    if update == 5:
      raise KeyboardInterrupt("simulated kill")
    return real(plan, update, **kw)

  monkeypatch.setattr(dsd, "trajectory_batch", killed_at_5)
  with pytest.raises(KeyboardInterrupt):
    stages.run_dsd(resumed_ctx)  # checkpoint at update 4, killed in the first update of depth N = 2
  assert not os.path.exists(tmp_path / "wd" / "dsd" / "DSDI" / "final")
  monkeypatch.setattr(dsd, "trajectory_batch", real)
  params, meta = stages.run_dsd(resumed_ctx)["DSDI"]
  testing.assert_trees_equal(params, out["dsd"]["DSDI"][0])
  assert [m["loss"] for m in _metrics(resumed_ctx.stage_dir("dsd/DSDI"))][-3:] == [
      m["loss"] for m in _metrics(ctx.stage_dir("dsd/DSDI"))][-3:]


def test_stage_one_start_needs_the_finished_stage(dsd_run, tmp_path):
  ctx, _, _, _ = dsd_run
  config = ctx.config.copy_and_resolve_references()
  config.dsd.init = "stage_one"
  with pytest.raises(train.TrainingError, match="stage_one"):
    stages.run_dsd(context.Context(config, str(tmp_path / "wd")))


# --- training DSD -------------------------------------------------------------------------------------


def test_training_dsd_at_beta_zero_is_the_teachers_loss(tmp_path):
  """The stage reuses the teacher's draws (t, ε, label dropout, dropout key), so α = 1, β = 0 is the teacher's
  v-MSE loss on the same batch and key: the plain teacher is the same-budget baseline."""
  c = _config("")
  c.dsd.alpha, c.dsd.beta = 1.0, 0.0
  ctx = context.Context(c, str(tmp_path))
  stage = stages.training_stage(ctx)
  model = models.unet_from_config(c.model, c.data)
  teacher_loss = teacher_lib.teacher_loss(model, "v", "snr_plus_one", c.teacher.p_uncond, ctx.logsnr_fn,
                                          ctx.null_label)
  assert c.teacher.weighting == "snr_plus_one"  # x-space weight 1 + e^λ: the v-MSE
  batch = {k: jnp.asarray(v) for k, v in stage.batch_fn(0).items()}
  rng = jax.random.PRNGKey(11)
  both = jax.jit(lambda p, b, r: (stage.loss_fn(p, None, b, r), teacher_loss(p, None, b, r)[0]))  # one compile
  (ours, metrics), theirs = both(stage.init_params, batch, rng)
  np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5)
  assert float(metrics["distill"]) > 0  # the distillation term is there, weighted 0
  assert stage.num_steps == c.teacher.num_steps and stage.ema_decay == c.teacher.ema_decay
  assert stage.meta["student_evals_per_update"] == 2.0 and stage.meta["teacher_evals_per_update"] == 0.0
  assert stage.meta["eval_steps"] == [2, 4] and stage.meta["sampler"] == "cfg_ddim"  # 4 = sample.num_steps


@pytest.mark.slow
def test_training_dsd_stage_runs(tmp_path):
  ctx = context.Context(_config(""), str(tmp_path))
  params, meta = stages.run_training_dsd(ctx)
  logged = _metrics(ctx.stage_dir("training_dsd"))
  assert [m["step"] for m in logged] == [1, 2, 3]
  assert all(np.isfinite(m["loss"]) and m["distill"] > 0 for m in logged)
  np.testing.assert_allclose([m["loss"] for m in logged], [0.85 * m["v_mse"] + 0.15 * m["distill"] for m in logged],
                             rtol=1e-5)
  assert meta.method == "training-DSD" and _final_meta(ctx.stage_dir("training_dsd"))["num_steps"] == 3
  assert os.path.isfile(os.path.join(ctx.stage_dir("training_dsd"), "samples.png"))
