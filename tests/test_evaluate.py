"""The evaluation protocol and the evaluate stage's bookkeeping: metrics of a sample set against independent
computations, the reference cache, row naming, cumulative cost, the samples file reader, and the standalone
evaluate mode on real digits against noise."""
import json
import os

import numpy as np
import pytest

from distill import contract, evaluate, registry
from distill.evaluation import fid, metrics, protocol
from tests.test_main import run_main


def _fake_net(dim=4, classes=5):
  proj = np.random.default_rng(0).normal(size=(16, dim))
  cls = np.random.default_rng(1).normal(size=(16, classes))

  def outputs(images):
    flat = np.asarray(images, np.float64).reshape(len(images), -1)[:, :16]
    return flat @ proj, flat @ cls

  return protocol.FeatureNet("classifier", outputs, "fake")


def test_quantize_maps_to_8_bit_levels():
  x = np.array([-1.0, -0.99, 0.0, 0.5, 1.0, 1.7, -3.0])
  q = protocol.quantize(x)
  levels = (q + 1.0) * 127.5
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  assert q[0] == -1.0 and q[4] == 1.0 and q[5] == 1.0 and q[6] == -1.0
  assert np.max(np.abs(q[:5] - x[:5])) <= 1 / 127.5


def test_score_matches_direct_computations(tmp_path):
  rng = np.random.default_rng(2)
  net = _fake_net()
  real = np.clip(rng.normal(size=(300, 4, 4, 1)) * 0.4, -1, 1)
  fake = np.clip(rng.normal(size=(200, 4, 4, 1)) * 0.4 + 0.1, -1, 1)
  ref = protocol.reference_stats(net, lambda: [real[:150], real[150:]], str(tmp_path / "ref.npz"))
  got = protocol.score(net, ref, fake, is_splits=5, pr_k=3)
  rf, _ = net.outputs(real)  # (the real networks quantise inside `outputs`; this fake does not)
  ff, fl = net.outputs(fake)
  assert got["fid"] == pytest.approx(fid.feature_fid(ff, rf), rel=1e-9)
  order = np.random.default_rng(0).permutation(len(fl))
  assert got["is"] == pytest.approx(metrics.inception_score(fl[order], splits=5, from_logits=True)[0], rel=1e-9)
  assert (got["precision"], got["recall"]) == pytest.approx(metrics.precision_recall(rf, ff, k=3))
  assert got["num_samples"] == 200 and got["metric"] == "classifier"
  # A shifted sample set is farther away.
  assert protocol.score(net, ref, np.clip(fake + 0.5, -1, 1))["fid"] > got["fid"]


def test_reference_is_cached_and_keyed_by_metric(tmp_path):
  net = _fake_net()
  path = str(tmp_path / "ref.npz")
  images = np.random.default_rng(3).uniform(-1, 1, (50, 4, 4, 1))
  first = protocol.reference_stats(net, lambda: [images], path)

  def boom():
    raise AssertionError("the cache should have been used")

  second = protocol.reference_stats(net, boom, path)
  np.testing.assert_array_equal(first.mu, second.mu)
  assert second.num_images == 50
  other = protocol.FeatureNet("inception", net.outputs, "other")
  assert protocol.reference_stats(other, lambda: [images[:20]], path).num_images == 20  # recomputed


def _legacy(kind, n, sampler="ddim", w_range=(0.0, 4.0), **kw):
  """A guided-distillation meta.json as the code before the stage contract wrote it."""
  return {"kind": "w_student", "sampler": sampler, "num_sampling_steps": n, "w_conditioned": True,
          "w_range": list(w_range), "stage_kind": kind, "round": kw.pop("round", 1), **kw}


def test_pre_contract_guided_stages_convert_to_the_names_and_chains_the_report_used():
  """registry.upgrade_meta's guided rule: the method names and cost chains the evaluate stage used to guess
  from directory names, now written into the record once."""
  upgrade = registry.method("guided").upgrade_meta
  run = {"distill": {"batch_size": 8}}
  m = upgrade("distill_deterministic/N0004", _legacy("deterministic", 4, round=2), run)
  assert (m.method, m.report_sampler, m.cost_parents, m.batch_size) == ("guided PD", "deterministic",
                                                                          ("distill_deterministic/N0008",), 8)
  m = upgrade("distill_stochastic/N0004", _legacy("stochastic", 4, sampler="stochastic", round=1), run)
  assert (m.method, m.report_sampler, m.cost_parents) == ("guided PD", "stochastic", ("stage_one",))
  assert upgrade("stage_one", _legacy("stage_one", 64, round=0), run).method == "stage one"
  pair = upgrade("two_student/N0002", _legacy("two_student", 2, round=1), run)
  assert (pair.method, pair.teacher_evals_per_update, pair.student_evals_per_update, pair.cost_parents) == (
      "two-student", 4.0, 2.0, ())
  single = upgrade("single_w/w1/N0002", _legacy("deterministic", 2, w_range=(1.0, 1.0), round=1), run)
  assert (single.method, single.cost_parents) == ("single-w (w=1)", ("single_w/w1/stage_one",))
  enc = upgrade("encoder/N0004", _legacy("encoder", 4, sampler="encoder", round=1), run)
  assert not enc.scored and enc.sampler == ""
  assert upgrade("sfd/cfg/N0002", {"kind": "sfd_student", "stage_kind": "sfd"}, run) is None


def _meta(updates, teacher, student, parents=(), batch=8):
  m = contract.StageMeta(kind="w_student", method="m", sampler="ddim", num_sampling_steps=1, w_range=(0.0, 4.0),
                         batch_size=batch, teacher_evals_per_update=teacher, student_evals_per_update=student,
                         cost_parents=tuple(parents))
  return m, {"num_steps": updates, "train_seconds": updates / 10}


def test_chain_costs_sum_each_stage_and_its_cost_parents():
  parts = {"stage_one": _meta(100, 2.0, 1.0),
           "distill_deterministic/N0032": _meta(20, 2.0, 1.0, ["stage_one"]),
           "distill_deterministic/N0016": _meta(30, 2.0, 1.0, ["distill_deterministic/N0032"]),
           "two_student/N0004": _meta(40, 4.0, 2.0),
           "two_student/N0002": _meta(50, 4.0, 2.0, ["two_student/N0004"]),
           "sfd/N0004": _meta(30, 4.0, 2.0, batch=4),
           "sfd_one_nfe": _meta(10, 0.0, 1.0, ["sfd/N0004"], batch=2)}
  metas = {n: m for n, (m, _) in parts.items()}
  trained = {n: t for n, (_, t) in parts.items()}
  c = evaluate.chain_costs(metas, trained)
  assert c["stage_one"] == {"student_updates": 100, "train_seconds": 10.0, "teacher_evals": 100 * 16,
                            "student_evals": 100 * 8}
  assert c["distill_deterministic/N0016"] == {"student_updates": 150, "train_seconds": pytest.approx(15.0),
                                              "teacher_evals": 150 * 16, "student_evals": 150 * 8}
  assert c["two_student/N0002"] == {"student_updates": 90, "train_seconds": pytest.approx(9.0),
                                    "teacher_evals": 90 * 32, "student_evals": 90 * 16}
  assert c["sfd_one_nfe"] == {"student_updates": 40, "train_seconds": pytest.approx(4.0),
                              "teacher_evals": 30 * 4 * 4, "student_evals": 10 * 2 + 30 * 4 * 2}
  metas["sfd/N0004"] = metas["sfd/N0004"].replace(cost_parents=("sfd_one_nfe",))
  with pytest.raises(ValueError, match="cycle"):
    evaluate.chain_costs(metas, trained)


def test_stage_meta_round_trips_through_json_and_refuses_pre_contract_metas():
  m = contract.StageMeta.of(kind="sfd_student", method="SFD-v", sampler="sfd", num_sampling_steps=5,
                            eval_steps=[2, 3, 4, 5], w_range=[0, 4], batch_size=8, teacher_evals_per_update=3.5,
                            afs=True, sigma_min=0.006)
  d = json.loads(json.dumps(dict(m.to_dict(), stage="sfd_v", num_steps=10, train_seconds=1.0)))
  back = contract.StageMeta.from_dict(d)
  assert back == m and back.extra == {"afs": True, "sigma_min": 0.006} and back.steps_scored == (2, 3, 4, 5)
  assert back.serves(4.0) and not back.serves(4.5)
  with pytest.raises(contract.ContractError, match="upgrade_meta"):
    contract.StageMeta.from_dict({"kind": "w_student", "sampler": "ddim"}, "x/final/meta.json")
  with pytest.raises(contract.ContractError, match="method"):
    contract.StageMeta.from_dict({k: v for k, v in d.items() if k != "method"})
  with pytest.raises(contract.ContractError, match="repeats"):
    contract.StageMeta.of(kind="k", method="m", sampler="", num_sampling_steps=1, w_range=(0, 0), batch_size=1,
                          teacher_evals_per_update=0, extra={"method": "x"}).to_dict()


def test_registry_lists_every_method_stage_in_pipeline_order():
  names = registry.stage_names()
  assert names[:3] == ("autoencoder", "text_encoder", "teacher") and names[-1] == "evaluate"
  assert names.index("stage_one") < names.index("distill_deterministic") < names.index("sfd") < names.index("dsd")
  assert len(set(names)) == len(names)
  assert registry.sampler_owner("stochastic").name == "guided"
  with pytest.raises(KeyError, match="not registered"):
    registry.sampler_owner("heun")


def test_load_samples_reads_uint8_and_float_and_rejects_bad_files(tmp_path):
  u8 = np.random.default_rng(4).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
  np.savez(tmp_path / "u8.npz", images=u8)
  x = evaluate.load_samples(str(tmp_path / "u8.npz"), (8, 8, 1))
  np.testing.assert_allclose(x, u8 / 127.5 - 1.0, atol=1e-6)
  np.savez(tmp_path / "f.npz", images=np.full((3, 8, 8, 1), 2.0, np.float32))
  with pytest.raises(evaluate.EvaluationError, match=r"must lie in \[-1, 1\]"):
    evaluate.load_samples(str(tmp_path / "f.npz"), (8, 8, 1))
  with pytest.raises(evaluate.EvaluationError, match="needs"):
    evaluate.load_samples(str(tmp_path / "u8.npz"), (32, 32, 3))
  np.savez(tmp_path / "k.npz", x=u8)
  with pytest.raises(evaluate.EvaluationError, match="no 'images' array"):
    evaluate.load_samples(str(tmp_path / "k.npz"), (8, 8, 1))


def test_evaluate_mode_scores_real_digits_far_better_than_noise(tmp_path):
  from distill import data
  import ml_collections
  cfg = ml_collections.ConfigDict({"name": "digits", "image_size": 8, "channels": 1, "num_classes": 10})
  test = data.make_source(cfg, "test")
  images = test.get_batch(np.arange(len(test)))["image"]  # 297 held-out digits
  np.savez(tmp_path / "real.npz", images=np.round((images + 1) * 127.5).astype(np.uint8))
  np.savez(tmp_path / "noise.npz", images=np.random.default_rng(5).uniform(-1, 1, (300, 8, 8, 1)).astype(np.float32))
  scores = {}
  for name in ("real", "noise"):
    proc = run_main("--mode=evaluate", "--config=configs/digits.py", "--config.eval.classifier_steps=150",
                    f"--workdir={tmp_path / 'wd'}", f"--samples={tmp_path / name}.npz")
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores[name] = json.loads((tmp_path / f"{name}_eval.json").read_text())["rows"][0]
  assert scores["real"]["metric"] == "classifier"
  real, noise = scores["real"], scores["noise"]  # measured: FID 0.41 vs 29.4, IS 5.2 vs 1.3, R 0.95 vs 0.03
  assert real["fid"] < 0.05 * noise["fid"] and real["is"] > 3 * noise["is"]
  assert real["recall"] > 0.8 and noise["recall"] < 0.2 and real["precision"] > noise["precision"] + 0.2
  assert os.path.exists(tmp_path / "wd" / "classifier" / "digits.npz")  # trained once, then reused


def test_inception_score_does_not_depend_on_the_sample_order():
  """Samples arrive class by class; IS over contiguous splits of them would score ≈ 1."""
  net = protocol.FeatureNet("classifier", lambda x: (x.reshape(len(x), -1)[:, :2], 20.0 * x.reshape(len(x), -1)),
                            "one-hot")
  onehot = np.repeat(np.eye(10), 30, axis=0).reshape(300, 10, 1, 1)  # class-sorted, confident, balanced
  ref = protocol.Reference(np.zeros(2), np.eye(2), np.zeros((5, 2)), 5)
  assert protocol.score(net, ref, onehot, is_splits=10)["is"] > 8.0


def _tiny_ctx(tmp_path):
  from distill import configuration, context
  config = configuration.base_config()
  config.model.ch, config.model.ch_mult, config.model.num_res_blocks = 8, (1,), 1
  config.model.attn_resolutions, config.model.num_groups = (), 4
  return context.Context(config, str(tmp_path))


def _record(sampler, n, kind="w_student", **kw):
  return contract.StageMeta(kind=kind, method="m", sampler=sampler, num_sampling_steps=n, w_range=(0.0, 4.0),
                            batch_size=1, teacher_evals_per_update=0.0, **kw)


def test_sampler_registry_dispatches_on_the_checkpoint_sampler(tmp_path):
  """'cfg_ddim' is the CFG teacher's guided DDIM (2 evaluations per step); a guided-PD student's 'ddim' costs
  one per step and may switch to 'stochastic'; other checkpoints sample with their own method's samplers only."""
  import jax
  import jax.numpy as jnp
  from distill import context, models
  ctx = _tiny_ctx(tmp_path)
  c = ctx.config
  teacher = context.teacher_model(ctx)
  params = models.init_params(teacher, ctx.image_shape, 0)
  z = jax.random.normal(jax.random.PRNGKey(0), (3,) + ctx.image_shape)
  labels, w = jnp.array([0, 1, 2]), jnp.array([0.0, 1.0, 2.0])
  fn, nfe = registry.sampler(ctx, params, _record("cfg_ddim", 3, kind="cfg_teacher"))
  direct = context.cfg_sample(params, z, labels, w, model=teacher, parameterization=c.model.parameterization,
                              logsnr_fn=ctx.logsnr_fn, num_steps=3, null_label=ctx.null_label, clip=True)
  assert nfe == 6
  np.testing.assert_allclose(np.asarray(fn(z, labels, w)), np.asarray(direct), rtol=0, atol=1e-6)
  student = _record("ddim", 4, w_conditioned=True)
  assert registry.sampler(ctx, None, student)[1] == 4
  assert registry.sampler(ctx, None, student, name="stochastic")[1] == 4
  assert registry.sampler(ctx, None, student.replace(kind="two_student"), num_steps=2)[1] == 4
  with pytest.raises(KeyError, match="not registered"):
    registry.sampler(ctx, params, _record("heun", 3))
  with pytest.raises(ValueError, match="samples with 'cfg_ddim' or 'cfg_ddpm', not 'stochastic'"):
    registry.sampler(ctx, params, _record("cfg_ddim", 3), name="stochastic")


def test_adding_a_stage_scores_only_its_rows(tmp_path, monkeypatch):
  """The evaluate stage caches each row's scores under what determines them (`evaluate.row_key`): after a
  stage is added, only its rows are sampled; the cached rows come back equal; another seed scores anew."""
  import jax.numpy as jnp
  from distill import context, models, train
  from distill.methods.guided import stages as guided_stages
  from distill.methods.teacher import stage_meta
  ctx = _tiny_ctx(tmp_path / "wd")
  c = ctx.config
  c.data.num_examples = 64
  c.eval.per_class, c.eval.w_values, c.eval.classifier_steps, c.eval.class_agreement = 3, (0.0,), 20, False
  c.sample.num_steps, c.sample.batch_size, c.distill.start_steps = 2, 32, 2
  teacher = models.init_params(context.teacher_model(ctx), ctx.image_shape, 0)
  train._save_final(str(tmp_path / "wd" / "teacher"), teacher, dict(stage_meta(c).to_dict(), num_steps=1))
  student = models.init_params(context.student_model(ctx, w_embedding=True), ctx.image_shape, 1)
  meta = guided_stages.stage_one_meta(c.distill, 0.0, 4.0, True, "stage one")
  train._save_final(str(tmp_path / "wd" / "stage_one"), student, dict(meta.to_dict(), num_steps=1))
  calls = []
  real = evaluate.sample_images
  monkeypatch.setattr(evaluate, "sample_images", lambda ctx, fn, *a: calls.append(1) or real(ctx, fn, *a))

  evaluate.run_stage(ctx)
  first = json.loads((tmp_path / "wd" / "results.json").read_text())["rows"]
  assert len(calls) == len(first) == 3  # teacher DDIM and DDPM at 2 steps, stage one at 2
  round_meta = guided_stages.round_meta(c.distill, "deterministic", 1, 2, 0.0, 4.0, True, "guided PD", "stage_one")
  other = models.init_params(context.student_model(ctx, w_embedding=True), ctx.image_shape, 2)
  train._save_final(str(tmp_path / "wd" / "distill_deterministic" / "N0002"), other,
                    dict(round_meta.to_dict(), num_steps=1))
  calls.clear()
  evaluate.run_stage(ctx)
  second = json.loads((tmp_path / "wd" / "results.json").read_text())["rows"]
  assert len(calls) == 1 and len(second) == 4  # only the new round's row was sampled
  assert second[:3] == first and second[3]["method"] == "guided PD"
  calls.clear()
  evaluate.run_stage(ctx)
  assert not calls  # results.json covers every checkpoint: nothing is loaded or scored
  # The round trained again under the same name (other parameters, another record): results.json no longer
  # covers it, and only its row is scored anew.
  again = models.init_params(context.student_model(ctx, w_embedding=True), ctx.image_shape, 3)
  import shutil
  shutil.rmtree(tmp_path / "wd" / "distill_deterministic" / "N0002")
  train._save_final(str(tmp_path / "wd" / "distill_deterministic" / "N0002"), again,
                    dict(round_meta.to_dict(), num_steps=1, train_seconds=2.0))
  evaluate.run_stage(ctx)
  retrained = json.loads((tmp_path / "wd" / "results.json").read_text())["rows"]
  assert len(calls) == 1 and retrained[:3] == first and retrained[3]["method"] == "guided PD"
  # (a fresh U-Net's output layer is zero, so the two inits sample alike: the point is that the row was scored)
  c.seed = 1
  calls.clear()
  evaluate.run_stage(ctx)
  assert len(calls) == 4  # other noise: every row scored anew
  # FID against published statistics (eval.reference_stats): another key, every row rescored against them.
  ref = np.load(next((tmp_path / "wd" / "eval_reference").glob("*.npz")))
  width = ref["mu"].shape[0]
  np.savez(tmp_path / "stats.npz", mu=np.zeros(width), sigma=np.eye(width))
  c.eval.reference_stats = str(tmp_path / "stats.npz")
  calls.clear()
  evaluate.run_stage(ctx)
  rows = json.loads((tmp_path / "wd" / "results.json").read_text())["rows"]
  assert len(calls) == 4 and "stats.npz" in (tmp_path / "wd" / "report.md").read_text()
  assert all(r["fid"] > 0 for r in rows) and rows[0]["fid"] != second[0]["fid"]


def test_combine_seeds_is_the_mean_and_its_t_interval():
  """Three seeds: the mean and mean ± t(0.975, 2)·s/√3 with t = 4.302653 (tables), written out by hand; keys a
  seed lacks (density without enough reference points) are left out; one seed is refused."""
  per_seed = [{"fid": 1.0, "is": 2.0, "precision": 0.5, "recall": 0.4, "density": None, "fid_ci": [0.0, 2.0],
               "num_samples": 10},
              {"fid": 2.0, "is": 2.5, "precision": 0.6, "recall": 0.4, "density": None, "num_samples": 10},
              {"fid": 4.0, "is": 3.0, "precision": 0.7, "recall": 0.4, "density": None, "num_samples": 10}]
  out = protocol.combine_seeds(per_seed)
  s = np.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
  assert out["fid"] == pytest.approx(7 / 3)
  half = 4.302653 * s / np.sqrt(3)
  assert 7 / 3 - half < 0  # the t-interval reaches below 0 and is clipped to FID's range
  np.testing.assert_allclose(out["fid_ci"], [0.0, 7 / 3 + half], rtol=1e-6)
  np.testing.assert_allclose(out["is_ci"], [2.5 - 4.302653 * 0.5 / np.sqrt(3), 2.5 + 4.302653 * 0.5 / np.sqrt(3)],
                             rtol=1e-6)
  assert out["fid_seeds"] == [1.0, 2.0, 4.0] and out["is"] == pytest.approx(2.5)
  np.testing.assert_allclose(out["recall_ci"], [0.4, 0.4], atol=1e-12)  # no spread, no width
  assert out["density"] is None and "density_ci" not in out
  assert out["seeds"] == 3 and out["interval"] == "seeds" and out["num_samples"] == 10
  with pytest.raises(ValueError, match="at least 2 seeds"):
    protocol.combine_seeds(per_seed[:1])


def test_eval_seeds_score_each_seed_once_and_report_their_mean(tmp_path, monkeypatch):
  """eval.seeds = 2: every row is sampled under two noises; its first seed's scores are the one-seed run's
  (the same cache entry, not sampled again); raising to 3 samples only the third seed."""
  from distill import context, models, train
  from distill.methods.teacher import stage_meta
  ctx = _tiny_ctx(tmp_path / "wd")
  c = ctx.config
  c.data.num_examples = 64
  c.eval.per_class, c.eval.w_values, c.eval.classifier_steps, c.eval.class_agreement = 3, (0.0,), 20, False
  c.sample.num_steps, c.sample.batch_size = 2, 32
  teacher = models.init_params(context.teacher_model(ctx), ctx.image_shape, 0)
  train._save_final(str(tmp_path / "wd" / "teacher"), teacher, dict(stage_meta(c).to_dict(), num_steps=1))
  noises = []
  real = evaluate.sample_images
  monkeypatch.setattr(evaluate, "sample_images",
                      lambda ctx, fn, z, *a: noises.append(np.asarray(z)) or real(ctx, fn, z, *a))
  evaluate.run_stage(ctx)
  one = json.loads((tmp_path / "wd" / "results.json").read_text())["rows"]
  assert len(noises) == len(one) == 2 and "seeds" not in one[0]  # teacher DDIM and DDPM at 2 steps
  c.eval.seeds = 2
  noises.clear()
  evaluate.run_stage(ctx)
  two = json.loads((tmp_path / "wd" / "results.json").read_text())["rows"]
  assert len(noises) == 2 and not np.allclose(noises[0], np.asarray(
      __import__("jax").random.normal(__import__("jax").random.PRNGKey(c.seed + 2000), noises[0].shape)))
  for a, b in zip(one, two):
    assert b["seeds"] == 2 and b["fid_seeds"][0] == a["fid"]
    assert b["fid"] == pytest.approx(np.mean(b["fid_seeds"])) and b["fid_ci"][0] <= b["fid"] <= b["fid_ci"][1]
  assert "mean over 2 noise seeds" in (tmp_path / "wd" / "report.md").read_text()
  c.eval.seeds = 3
  noises.clear()
  evaluate.run_stage(ctx)
  assert len(noises) == 2  # the third seed only


def test_a_stop_request_ends_evaluate_between_rows_and_the_rerun_scores_only_the_rest(tmp_path, monkeypatch):
  """SIGTERM during the evaluate stage (recorded by the stop handler) ends it before the next row to sample
  with `train.Stopped` (main prints how to resume, exit 0); the rows scored so far are cached and the rerun
  samples only the others."""
  import signal
  from distill import context, models, train
  from distill.methods.teacher import stage_meta
  ctx = _tiny_ctx(tmp_path / "wd")
  c = ctx.config
  c.data.num_examples = 64
  c.eval.per_class, c.eval.w_values, c.eval.classifier_steps, c.eval.class_agreement = 3, (0.0, 1.0), 20, False
  c.sample.num_steps, c.sample.batch_size = 2, 32
  teacher = models.init_params(context.teacher_model(ctx), ctx.image_shape, 0)
  train._save_final(str(tmp_path / "wd" / "teacher"), teacher, dict(stage_meta(c).to_dict(), num_steps=1))
  calls = []
  real = evaluate.sample_images

  def sample_then_stop(ctx, fn, *a):
    calls.append(1)
    train._STOP["signal"] = signal.SIGTERM  # as the handler records a SIGTERM arriving during this row
    return real(ctx, fn, *a)

  monkeypatch.setattr(evaluate, "sample_images", sample_then_stop)
  try:
    with pytest.raises(train.Stopped, match="SIGTERM before row 2 of 4; the 1 scored rows are cached"):
      evaluate.run_stage(ctx)
  finally:
    train.clear_stop_request()
  assert len(calls) == 1 and len(list((tmp_path / "wd" / "eval_cache").glob("*.json"))) == 1
  assert not (tmp_path / "wd" / "results.json").exists()
  monkeypatch.setattr(evaluate, "sample_images", lambda ctx, fn, *a: calls.append(1) or real(ctx, fn, *a))
  evaluate.run_stage(ctx)
  assert len(calls) == 4 and len(json.loads((tmp_path / "wd" / "results.json").read_text())["rows"]) == 4
