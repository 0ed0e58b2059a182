"""SFD and DSD on a text or inpainting teacher: their trajectories start from noise, so a class run draws labels,
and a text or inpainting run takes each trajectory's condition from the training batch of the same index
(`Context.data_conditions`). Checked here: the batches carry those conditions (null rows where the class run's
draw is null), and every teacher, loss and sampler passes a condition pytree through row by row — the same numbers
as a labels-only model with the same per-row context closed over; then tiny SFD and DSD stages on an inpainting
run. The slow text end-to-end test (tests/test_text_e2e.py) runs both from the command line on a text run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import conditions, configuration, context, contract, models, registry, schedules, train, validation
from distill.losses import cfg_x_fn
from distill.methods import teacher as teacher_lib
from distill.methods.dsd import core as dsd
from distill.methods.dsd import stages as dsd_stages
from distill.methods.sfd import core as sfd
from distill.methods.sfd import stages as sfd_stages
from tests.test_sfd_stages import B, SHAPE, STUDENT_PARAMS, TEACHER_PARAMS, spec, x_fn

NULL, L, D = 3, 5, 4


def text_x_fn(params, z, logsnr, cond, w, **kwargs):
  """A toy text model: the mixture model of test_sfd_stages at the condition's labels, shifted by 0.2 × its
  row's context mean; a null-label row sees no context (as `models.text_unet` gives null rows its learned one)."""
  shift = jnp.where(cond["label"] == NULL, 0.0, cond["context"].mean(axis=(1, 2)))
  return x_fn(params, z, logsnr, cond["label"], w, **kwargs) + 0.2 * shift.reshape((-1,) + (1,) * len(SHAPE))


def closed_over(context_rows):
  """The labels-only model that is text_x_fn with each row's context fixed: the reference. A 2B-row call (both
  passes of classifier-free guidance) repeats the contexts, as `conditions.cond_and_null` does."""
  c = jnp.asarray(context_rows)

  def fn(params, z, logsnr, labels, w, **kwargs):
    rows = c if z.shape[0] == c.shape[0] else jnp.concatenate([c, c])
    return text_x_fn(params, z, logsnr, {"label": labels, "context": rows}, w, **kwargs)
  return fn


def text_condition(seed=0, rows=B):
  rng = np.random.default_rng(seed)
  return {"label": rng.integers(0, NULL, rows).astype(np.int32),
          "context": rng.standard_normal((rows, L, D)).astype(np.float32)}


def test_the_guided_sfd_denoiser_on_a_text_condition_is_the_cfg_mix_of_two_hand_written_passes():
  cond = jax.tree.map(jnp.asarray, text_condition())
  z = jnp.asarray(np.random.default_rng(1).standard_normal((B,) + SHAPE), jnp.float32)
  logsnr = jnp.full((B,), 0.5)
  w = 1.5
  got = sfd.denoiser(text_x_fn, TEACHER_PARAMS, cond, w, NULL)(z, logsnr)
  c = text_x_fn(TEACHER_PARAMS, z, logsnr, cond, None)
  u = text_x_fn(TEACHER_PARAMS, z, logsnr, conditions.null_like(cond, NULL), None)
  np.testing.assert_allclose(got, (1 + w) * c - w * u, rtol=1e-5, atol=1e-6)
  assert not np.allclose(c, u, atol=1e-3)  # the context matters, so a dropped one would show
  plain = sfd.denoiser(text_x_fn, TEACHER_PARAMS, cond)(z, logsnr)
  np.testing.assert_allclose(plain, c, rtol=1e-6)


@pytest.mark.parametrize("teacher_w", [None, 1.5])
def test_sfd_batches_take_the_conditions_of_the_data_and_the_draws_null_rows(teacher_w):
  plan = sfd.make_plan("global", 3, [3], afs=True, seed=0)
  asked = []

  def conditions_fn(j):
    asked.append(j)
    return text_condition(seed=100 + j)

  kw = dict(seed=0, stream=7, batch_size=B, image_shape=SHAPE, num_classes=NULL, label_dropout=0.3)
  plain = sfd_stages.TrajectoryBatches(plan, sfd_stages.local_teacher_fn(spec(teacher_w), TEACHER_PARAMS), **kw)
  text_spec = spec(teacher_w)._replace(x_fn=text_x_fn)
  batches = sfd_stages.TrajectoryBatches(plan, sfd_stages.local_teacher_fn(text_spec, TEACHER_PARAMS),
                                         conditions_fn=conditions_fn, **kw)
  for step in (0, 1, 2, 4):
    got, drawn = batches(step), plain(step)
    j = int(plan["trajectory"][step])
    want = text_condition(seed=100 + j)
    dropped = drawn["label"] == NULL
    assert 0 < dropped.sum() < B or step != 0  # the seed drops some rows of the first trajectory
    np.testing.assert_array_equal(got["label"]["label"], np.where(dropped, NULL, want["label"]))
    np.testing.assert_array_equal(got["label"]["context"], want["context"])  # a null row keeps its context
    np.testing.assert_array_equal(got["noise"], drawn["noise"])
    # The teacher states: the labels-only model with the rows' contexts closed over, on the same noise.
    ref_spec = spec(teacher_w)._replace(x_fn=closed_over(want["context"]))
    ref = sfd_stages.teacher_states(TEACHER_PARAMS, got["noise"], got["label"]["label"], spec=ref_spec, n=3)
    np.testing.assert_allclose(got["teacher"], ref, rtol=1e-5, atol=1e-6)
  assert asked == [0, 1, 2]  # once per trajectory


def test_sfd_losses_on_a_condition_equal_the_closed_over_model():
  cond = text_condition(seed=3)
  closed = closed_over(cond["context"])
  rng = np.random.default_rng(4)
  teacher = rng.standard_normal((B, 5) + SHAPE).astype(np.float32)
  batch = {"noise": rng.standard_normal((B,) + SHAPE).astype(np.float32), "step_index": np.int32(2),
           "num_steps": np.int32(4), "teacher": teacher}
  key = jax.random.PRNGKey(0)
  for make in (lambda f: sfd.global_loss(f, max_steps=4), lambda f: sfd.trajectory_loss(f)):
    got = make(text_x_fn)(STUDENT_PARAMS, {}, {**batch, "label": cond}, key)[0]
    want = make(closed)(STUDENT_PARAMS, {}, {**batch, "label": cond["label"]}, key)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
  local = {"state": batch["noise"], "label": cond, "step_index": np.int32(1), "num_steps": np.int32(3),
           "target": teacher[:, 2]}
  got = sfd.local_loss(text_x_fn, max_steps=4)(STUDENT_PARAMS, {}, local, key)[0]
  want = sfd.local_loss(closed, max_steps=4)(STUDENT_PARAMS, {}, {**local, "label": cond["label"]}, key)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_sfd_sampler_passes_the_condition_to_every_step():
  cond = text_condition(seed=5)
  table = sfd.grid_table(4)
  z = jnp.asarray(np.random.default_rng(6).standard_normal((B,) + SHAPE), jnp.float32)
  w = jnp.full((B,), 2.0)
  kw = dict(num_steps=3, sigma_table=table, afs=True, guided=True, step_condition=False, null_label=NULL)
  got = sfd_stages.euler_sample(STUDENT_PARAMS, z, jax.tree.map(jnp.asarray, cond), w, x_fn=text_x_fn, **kw)
  want = sfd_stages.euler_sample(STUDENT_PARAMS, z, jnp.asarray(cond["label"]), w, x_fn=closed_over(cond["context"]),
                                 **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_dsd_batches_and_loss_on_a_condition():
  plan = [(4, 2), (2, 2)]
  kw = dict(batch_size=B, image_shape=SHAPE, num_classes=NULL, w_min=0.0, w_max=2.0, seed=0)
  plain = dsd_stages.trajectory_batch_fn(plan, **kw)
  with_cond = dsd_stages.trajectory_batch_fn(plan, conditions_fn=lambda j: text_condition(seed=200 + j), **kw)
  for step in range(sum(dsd.updates_per_depth(plan))):
    got, drawn = with_cond(step), plain(step)
    j = dsd.update_position(plan, step)[1]
    want = text_condition(seed=200 + j)
    for k in ("label", "context"):
      np.testing.assert_array_equal(got["label"][k], want[k])
    for k in ("noise", "w", "num_steps", "position"):
      np.testing.assert_array_equal(got[k], drawn[k])
  logsnr_fn = schedules.get_logsnr_fn("cosine")
  batch = with_cond(1)  # position 1 of N = 4: one replayed two-step prefix
  context_rows = batch["label"]["context"]
  key = jax.random.PRNGKey(1)
  for loss in (lambda f: dsd.fine_tuning_loss(f, logsnr_fn=logsnr_fn),
               lambda f: dsd.teacher_student_loss(f, f, logsnr_fn=logsnr_fn)):
    got = loss(cfg_x_fn(text_x_fn, NULL))(STUDENT_PARAMS, {"teacher": TEACHER_PARAMS}, batch, key)[0]
    ref_batch = {**batch, "label": batch["label"]["label"]}
    want = loss(cfg_x_fn(closed_over(context_rows), NULL))(STUDENT_PARAMS, {"teacher": TEACHER_PARAMS}, ref_batch,
                                                           key)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(got) > 0


# --- the stages on a tiny inpainting run ------------------------------------------------------------------


def tiny_inpaint_config():
  c = configuration.base_config()
  c.data.name, c.data.image_size, c.data.channels, c.data.num_classes = "mixture", 4, 1, 3
  c.data.num_examples = 64
  m = c.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.head_dim, m.num_groups = 8, (1,), 1, (), 8, 4
  c.sample.num_steps, c.sample.batch_size, c.sample.clip, c.sample.max_grid_classes = 8, 16, False, 2
  c.distill.grid_w = (0.0, 1.0)
  c.inpaint.enabled = True
  s = c.sfd
  s.nfe, s.batch_size, s.trajectories, s.lr, s.log_every, s.ckpt_every, s.fixed_w = (2,), 8, 8 * 3, 2e-3, 3, 3, ()
  d = c.dsd
  d.kinds, d.start_steps, d.end_steps, d.updates, d.batch_size = ("DSDI",), 4, 2, 8, 8
  d.w_min, d.w_max, d.log_every, d.ckpt_every, d.eval_steps = 0.0, 2.0, 4, 4, (2,)
  c.pipeline = ("teacher", "teacher_inpaint", "sfd", "dsd", "tsd")
  configuration.validate(c)
  return c


def test_sfd_and_dsd_stages_distil_an_inpainting_teacher(tmp_path):
  c = tiny_inpaint_config()
  ctx = context.Context(c, str(tmp_path))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: np.asarray(a) + 0.1 * rng.standard_normal(a.shape).astype(np.float32),
                        models.init_params(context.teacher_model(ctx), ctx.image_shape, 0))
  train._save_final(ctx.stage_dir("teacher_inpaint"), params,
                    dict(teacher_lib.stage_meta(c, "teacher_inpaint").to_dict(), num_steps=1))
  # A trajectory's condition is the training batch's of the same index: masks and masked images of its images.
  cond = ctx.data_conditions(8)(2)
  want = ctx.train_batches(8)(2)["label"]
  assert conditions.is_inpaint(cond) and cond["mask"].shape == (8, 4, 4, 1)
  for k in conditions.INPAINT_KEYS:
    np.testing.assert_array_equal(cond[k], want[k])
  sfd_stages.run_sfd(ctx)
  dsd_stages.run_dsd(ctx)
  for name in ("sfd/cfg/N0002", "dsd/DSDI"):
    stage = ctx.stage_dir(name)
    assert os.path.isfile(os.path.join(stage, "samples.png")), name
    with open(os.path.join(stage, "tb", "metrics.jsonl")) as f:
      losses = [json.loads(line)["loss"] for line in f if "loss" in json.loads(line)]
    assert losses and all(np.isfinite(losses)), name
    student, meta = train.load_final_params(stage)
    fn, _ = registry.sampler(ctx, student, contract.StageMeta.from_dict(meta))
    # Sampled on an inpainting condition; the kept region's masked image reaches the network.
    labels = np.array([0, 1, 2, 0], np.int32)
    a = ctx.sample_condition(labels)
    b = {**a, "masked": a["masked"] + 1.0}
    z = jax.random.normal(jax.random.PRNGKey(0), (4,) + ctx.image_shape)
    w = jnp.ones((4,), jnp.float32)
    xa, xb = np.asarray(fn(z, a, w)), np.asarray(fn(z, b, w))
    assert np.all(np.isfinite(xa)) and not np.allclose(xa, xb, atol=1e-4), name


def test_text_and_inpainting_runs_validate_with_sfd_and_dsd_but_not_training_dsd():
  c = tiny_inpaint_config()
  c.pipeline = ("teacher", "teacher_inpaint", "sfd", "sfd_v", "sfd_one_nfe", "dsd", "tsd")
  configuration.validate(c)
  c.pipeline = ("teacher", "teacher_inpaint", "training_dsd")
  with pytest.raises(validation.ConfigError, match="'training_dsd' trains a plain model"):
    configuration.validate(c)
  from tests.test_configuration import load_config
  text = load_config("fashion_mnist", "text")
  text.pipeline = ("text_encoder", "teacher", "teacher_v", "stage_one", "sfd", "dsd", "tsd", "training_dsd")
  configuration.validate(text)
