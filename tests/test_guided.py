"""Stage one (Algorithm 1) against the exact Gaussian-mixture CFG teacher."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import losses, schedules
from distill.methods.guided import stage_one as guided
from distill.testing import GaussianMixture

LOGSNR = schedules.cosine_logsnr
GMM = GaussianMixture.random(0, num_classes=3, shape=(2, 2, 1), mean_scale=1.5, std=0.3)
NULL = GMM.num_classes
TEACHER_PARAMS = {"gain": jnp.float32(1.0)}  # read through frozen['teacher']; gradients must not reach it


def cfg_teacher_x(params, z, logsnr, labels, w, *, train=False, rng=None):
  """The plain CFG teacher as an x-function: the exact mixture denoiser, which ignores w."""
  del w, train, rng
  return params["gain"] * GMM.denoise(z, logsnr, labels)


def guided_x(params, z, logsnr, labels, w, *, train=False, rng=None):
  """A w-conditioned 'student' that IS the guided teacher: the CFG mix written out with two calls."""
  del params, train, rng
  b = lambda a: a[:, None, None, None]
  return (1 + b(w)) * GMM.denoise(z, logsnr, labels) - b(w) * GMM.denoise(z, logsnr, jnp.full_like(labels, NULL))


def _batch(seed=0, n=96):
  rng = np.random.default_rng(seed)
  labels = np.tile(np.arange(3), n // 3).astype(np.int32)
  return {"image": jnp.asarray(GMM.sample(rng, labels)), "label": jnp.asarray(labels)}


def _mix_error(target_fn):
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.standard_normal((6, 2, 2, 1)), jnp.float32)
  logsnr = jnp.asarray([-15.0, -4.0, -1.0, 0.5, 3.0, 9.0])
  labels = jnp.asarray([0, 1, 2, 0, 1, 2], jnp.int32)
  w = jnp.asarray([0.0, 0.3, 1.0, 2.0, 3.0, 4.0])
  cond = np.asarray(GMM.denoise(z, logsnr, labels), np.float64)
  uncond = np.asarray(GMM.denoise(z, logsnr, jnp.full_like(labels, NULL)), np.float64)
  ref = (1 + np.asarray(w)[:, None, None, None]) * cond - np.asarray(w)[:, None, None, None] * uncond
  got = target_fn(cfg_teacher_x, TEACHER_PARAMS, z, logsnr, labels, w, NULL)
  return float(np.max(np.abs(np.asarray(got) - ref)))


def _swapped_mix_target(teacher_x, params, z, logsnr, labels, w, null_label):
  """Mutant: guidance pushes towards the unconditional model (the sign of w flipped)."""
  return guided.stage_one_target(teacher_x, params, z, logsnr, labels, -w, null_label)


def test_stage_one_target_is_the_cfg_mix_of_the_exact_mixture():
  assert _mix_error(guided.stage_one_target) < 1e-5
  assert _mix_error(_swapped_mix_target) > 1e-2  # the same criterion catches a sign error


def test_stage_one_target_is_one_teacher_call_of_two_b_rows_with_w():
  seen = []

  def spy_teacher(params, z, logsnr, labels, w, *, train=False, rng=None):
    seen.append((z.shape[0], np.asarray(labels), np.asarray(w), train))
    return cfg_teacher_x(params, z, logsnr, labels, w)

  z = jnp.zeros((3, 2, 2, 1))
  guided.stage_one_target(spy_teacher, TEACHER_PARAMS, z, jnp.zeros(3), jnp.asarray([0, 1, 2]),
                          jnp.asarray([0.5, 1.0, 2.0]), NULL)
  assert len(seen) == 1
  rows, labels, w, train = seen[0]
  assert rows == 6 and not train
  np.testing.assert_array_equal(labels, [0, 1, 2, NULL, NULL, NULL])
  np.testing.assert_array_equal(w, [0.5, 1.0, 2.0, 0.5, 1.0, 2.0])


def test_sample_w_within_range_and_single_w_baseline():
  w = losses.sample_w(jax.random.PRNGKey(0), (4000,), 0.0, 4.0)
  assert w.dtype == jnp.float32 and w.shape == (4000,)
  assert float(w.min()) >= 0.0 and float(w.max()) <= 4.0
  assert abs(float(w.mean()) - 2.0) < 0.1 and float(w.max() - w.min()) > 3.9  # actually spread over the range
  np.testing.assert_array_equal(losses.sample_w(jax.random.PRNGKey(1), (5,), 1.5, 1.5), np.full(5, 1.5))


def _stage_one(student_x, w_min=0.0, w_max=4.0, weighting="snr"):
  loss_fn = guided.stage_one_loss(student_x, cfg_teacher_x, logsnr_fn=LOGSNR, null_label=NULL, w_min=w_min,
                                  w_max=w_max, weighting=weighting)
  return jax.jit(loss_fn)


def _conditional_student(params, z, logsnr, labels, w, *, train=False, rng=None):
  """The teacher's conditional model alone (what the student is initialised to): right only at w = 0."""
  del params, w, train, rng
  return GMM.denoise(z, logsnr, labels)


def test_loss_is_zero_for_the_guided_teacher_and_positive_otherwise():
  batch, rng, frozen = _batch(), jax.random.PRNGKey(3), {"teacher": TEACHER_PARAMS}
  # ω = e^λ reaches e^20 as t → 0, so even float32 rounding between two equal computations would weigh
  # in; the bound leaves room for that, and the wrong student is ~0.5.
  exact, _ = _stage_one(guided_x)(None, frozen, batch, rng)
  assert float(exact) < 1e-4, float(exact)
  wrong, metrics = _stage_one(_conditional_student)(None, frozen, batch, rng)
  assert float(wrong) > 0.1 and float(metrics["x_mse"]) > 0.1, (wrong, metrics)
  # With w fixed at 0 (the single-w baseline) the conditional model IS the guided teacher.
  base, _ = _stage_one(_conditional_student, 0.0, 0.0)(None, frozen, batch, rng)
  assert float(base) < 1e-4


def test_student_runs_in_train_mode_with_a_dropout_rng_and_gradients_skip_the_teacher():
  seen = {}

  def student_x(params, z, logsnr, labels, w, *, train=False, rng=None):
    seen.update(train=train, rng=rng is not None)
    return params["scale"] * guided_x(None, z, logsnr, labels, w)

  loss_fn = guided.stage_one_loss(student_x, cfg_teacher_x, logsnr_fn=LOGSNR, null_label=NULL, w_min=0.0,
                                  w_max=4.0, weighting="constant")
  grads = jax.jit(jax.grad(lambda p, f: loss_fn(p, f, _batch(), jax.random.PRNGKey(4))[0], argnums=(0, 1)))(
      {"scale": jnp.float32(1.5)}, {"teacher": TEACHER_PARAMS})
  assert seen == {"train": True, "rng": True}
  assert float(grads[0]["scale"]) > 0  # scale 1.5 overshoots the target: the loss pulls it down
  assert float(grads[1]["teacher"]["gain"]) == 0.0  # stop_gradient: the teacher is frozen


def test_unknown_weighting_fails_at_construction():
  with pytest.raises(ValueError, match="allowed"):
    guided.stage_one_loss(guided_x, cfg_teacher_x, logsnr_fn=LOGSNR, null_label=NULL, w_min=0.0, w_max=1.0,
                          weighting="snr2")
