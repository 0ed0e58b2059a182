"""Tests for distill.models.unet: shapes, the null class, exact teacher→student initialisation for
the w- and step-embeddings, dropout, and parameter counting without allocation.

XLA compiles dominate the cost here, so shapes and argument checks only trace (jax.eval_shape),
"trained" parameters are drawn with numpy from the traced shapes, and each jitted function is
compiled once per model configuration.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.models.unet import UNet, param_count

# dropout > 0 costs nothing with train=False, and lets the teacher compile serve the dropout test.
TINY = dict(num_classes=10, out_channels=2, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
            dropout=0.5)
IMAGE = (8, 8, 1)
B = 3


def _inputs(seed=0, image_shape=IMAGE, num_classes=10):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((B, *image_shape), dtype=np.float32)
  logsnr = rng.uniform(-20.0, 20.0, (B,)).astype(np.float32)
  labels = np.minimum([0, 1, num_classes], num_classes).astype(np.int32)  # includes the null label
  return z, logsnr, labels


def _cond(model, w=1.0, steps=4):
  """The (w, steps) arguments a model takes: [B] arrays where it has the embedding, else None."""
  return (np.full((B,), w, np.float32) if model.w_embedding else None,
          np.full((B,), steps, np.int32) if model.step_embedding else None)


def _param_shapes(model, image_shape=IMAGE):
  z, logsnr, labels = _inputs(0, image_shape, model.num_classes)
  init = lambda key: model.init(key, z, logsnr, labels, *_cond(model), train=False)
  return jax.eval_shape(init, jax.random.key(0))["params"]


def _random_like(tree, seed):
  """Random values in the shapes of ``tree``: stands in for a trained network (a fresh one outputs zeros)."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = path[-1].key
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if name == "kernel":
      return noise / np.sqrt(np.prod(x.shape[:-1]))
    return 1.0 + 0.1 * noise if name == "scale" else 0.1 * noise

  return jax.tree_util.tree_map_with_path(draw, tree)


@functools.cache
def _fresh_params():
  """A real init of TINY with both w- and step-embeddings (the zero-initialised layers matter).

  Init is the most expensive compile here (one threefry per parameter), so it happens once: the
  w-only and step-only students take this tree minus the other subtree, which the naming scheme
  makes exact (checked in test_student_starts_exactly_as_teacher). XLA optimisation is off for
  this one compile, which is ~3x faster unoptimised; the values do not depend on it.
  """
  model = UNet(**TINY, w_embedding=True, step_embedding=True)
  z, logsnr, labels = _inputs(1, IMAGE, model.num_classes)
  init = jax.jit(lambda key, *args: model.init(key, *args, train=False))
  args = (jax.random.key(1), z, logsnr, labels, *_cond(model))
  compiled = init.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
  return compiled(*args)["params"]


def _real_init(model):
  """Freshly initialised parameters of a TINY model with any of the two embeddings."""
  assert model == UNet(**TINY, w_embedding=model.w_embedding, step_embedding=model.step_embedding)
  absent = {"w_embed": not model.w_embedding, "step_embed": not model.step_embedding}
  return {k: v for k, v in _fresh_params().items() if not absent.get(k, False)}


@functools.cache
def _apply(model, train=False):
  """One jitted apply per (model, train), compiled with default options like real use."""
  def apply(params, z, logsnr, labels, w=None, steps=None, dropout_key=None):
    rngs = None if dropout_key is None else {"dropout": dropout_key}
    return model.apply({"params": params}, z, logsnr, labels, w, steps, train=train, rngs=rngs)
  return jax.jit(apply)


@pytest.mark.parametrize(
    "kwargs, image_shape",
    [
        (dict(attn_resolutions=()), (8, 8, 3)),  # attention only in the middle
        (dict(attn_resolutions=(8, 4)), (8, 8, 1)),
        # one level (no resampling); 12 channels: 6 groups, 1 head of 12; a 'both' output; both embeddings
        (dict(ch=12, ch_mult=(1,), head_dim=8, out_channels=6, w_embedding=True, step_embedding=True),
         (8, 8, 3)),
        # conv resampling, three levels; unconditional (only the null label); H != W
        (dict(num_classes=0, ch_mult=(1, 1, 2), resample_with_resblock=False, num_groups=8), (16, 8, 3)),
    ],
)
def test_output_shape(kwargs, image_shape):
  model = UNet(**{**TINY, **kwargs})
  z, logsnr, labels = _inputs(0, image_shape, model.num_classes)
  out = jax.eval_shape(_apply(model), _param_shapes(model, image_shape), z, logsnr, labels, *_cond(model))
  assert out.shape == (B, *image_shape[:2], model.out_channels) and out.dtype == jnp.float32


def test_scalar_conditioning_broadcasts():
  model = UNet(**TINY, w_embedding=True, step_embedding=True)
  z, _, _ = _inputs()
  out = jax.eval_shape(_apply(model), _param_shapes(model), z, 0.5, model.num_classes, 2.0, 4)
  assert out.shape == (B, *IMAGE[:2], model.out_channels)


def test_conditioning_arguments_are_checked():
  model = UNet(**TINY)
  z, logsnr, labels = _inputs()
  params = _param_shapes(model)
  with pytest.raises(ValueError, match="w must be given"):
    jax.eval_shape(_apply(model), params, z, logsnr, labels, w=np.ones((B,), np.float32))
  with pytest.raises(ValueError, match="steps must be given"):
    jax.eval_shape(_apply(UNet(**TINY, step_embedding=True)), params, z, logsnr, labels)
  with pytest.raises(ValueError, match="not divisible"):
    _param_shapes(UNet(**{**TINY, "ch_mult": (1, 1, 1, 1, 1)}))


def test_fresh_model_outputs_zeros_and_label_matters():
  z, logsnr, labels = _inputs(2)
  fresh_model = UNet(**TINY, w_embedding=True)  # shares its compiles with the student test
  fresh = _apply(fresh_model)(_real_init(fresh_model), z, logsnr, labels, *_cond(fresh_model))
  np.testing.assert_array_equal(fresh, 0.0)  # zero-initialised output conv

  model = UNet(**TINY)
  params = _random_like(_param_shapes(model), 3)
  null = np.full((B,), model.num_classes, np.int32)
  out_null = _apply(model)(params, z, logsnr, null)
  out_class = _apply(model)(params, z, logsnr, np.zeros((B,), np.int32))
  assert np.all(np.isfinite(out_null)) and np.std(out_null) > 0
  assert np.max(np.abs(out_null - out_class)) > 1e-4


@pytest.mark.parametrize("extra", ["w_embed", "step_embed"])
def test_student_starts_exactly_as_teacher(extra):
  teacher_model = UNet(**TINY)
  teacher = _random_like(_param_shapes(teacher_model), 4)  # a "trained" teacher
  if extra == "w_embed":
    student_model = UNet(**TINY, w_embedding=True)
    cases = [dict(w=np.full((B,), w, np.float32)) for w in (0.0, 0.3, 1.0, 4.0, 8.0)]
  else:
    student_model = UNet(**TINY, step_embedding=True)
    cases = [dict(steps=np.full((B,), n, np.int32)) for n in (1, 2, 4, 16, 1000)]
  student = _real_init(student_model)
  # Every teacher parameter keeps its name and shape; the new ones form one top-level subtree.
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: x.shape, tree)
  assert shapes(student) == shapes(_param_shapes(student_model))
  assert set(student) == set(teacher) | {extra}
  assert shapes({k: student[k] for k in teacher}) == shapes(teacher)
  student = {**student, **teacher}

  z, logsnr, labels = _inputs(5)
  expected = _apply(teacher_model)(teacher, z, logsnr, labels)
  assert np.std(expected) > 0
  for case in cases:
    np.testing.assert_array_equal(_apply(student_model)(student, z, logsnr, labels, **case), expected)

  # Training the new embedding changes the output, and differently for different w / step counts.
  trained = {**student, extra: _random_like(student[extra], 6)}
  outs = [_apply(student_model)(trained, z, logsnr, labels, **case) for case in cases[1:3]]
  for out in outs:
    assert np.max(np.abs(out - expected)) > 1e-4
  assert np.max(np.abs(outs[0] - outs[1])) > 1e-5


def test_step_embedding_reaches_every_res_block():
  model = UNet(**TINY, step_embedding=True)
  step_params = _real_init(model)["step_embed"]
  assert set(step_params) == {"mlp"} | {name for name, _ in model.res_blocks()}
  for name, channels in model.res_blocks():
    assert step_params[name]["kernel"].shape == (4 * model.ch, 2 * channels)
    np.testing.assert_array_equal(step_params[name]["kernel"], 0.0)
    np.testing.assert_array_equal(step_params[name]["bias"], 0.0)


def test_dropout_only_when_training():
  model = UNet(**TINY)  # dropout 0.5
  params = _random_like(_param_shapes(model), 7)
  z, logsnr, labels = _inputs(8)
  evaluated = _apply(model)(params, z, logsnr, labels)
  np.testing.assert_array_equal(evaluated, _apply(model)(params, z, logsnr, labels))  # no rng needed
  # 'rbg' keys: the same dropout, compiled in half the time of the default threefry keys.
  train_apply = _apply(model, train=True)
  train = lambda seed: train_apply(params, z, logsnr, labels, dropout_key=jax.random.key(seed, impl="rbg"))
  a, b = train(0), train(1)
  assert np.max(np.abs(a - evaluated)) > 1e-3 and np.max(np.abs(a - b)) > 1e-3
  np.testing.assert_array_equal(a, train(0))
  with pytest.raises(Exception, match="dropout"):  # flax's InvalidRngError: training needs a 'dropout' rng
    jax.eval_shape(_apply(model, train=True), params, z, logsnr, labels)


def test_param_count_matches_real_init():
  model = UNet(**TINY, w_embedding=True, step_embedding=True)
  assert param_count(model, IMAGE) == sum(x.size for x in jax.tree_util.tree_leaves(_fresh_params()))


@pytest.mark.parametrize(
    "kwargs, image_shape, expected",
    [
        # digits: 8×8×1, 10 classes
        (dict(num_classes=10, out_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,)),
         (8, 8, 1), 1_153_025),
        # CIFAR-10 teacher (docs/design.md §6)
        (dict(num_classes=10, out_channels=3, ch=256, ch_mult=(1, 1, 1), num_res_blocks=3,
              attn_resolutions=(16, 8)),
         (32, 32, 3), 60_016_387),
        # ImageNet 64 teacher (docs/design.md §6)
        (dict(num_classes=1000, out_channels=3, ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
              attn_resolutions=(32, 16, 8), head_dim=64, emb_ch=768),
         (64, 64, 3), 295_900_803),
    ],
)
def test_param_count_of_paper_models_without_allocation(kwargs, image_shape, expected):
  # eval_shape only traces: the 300M-parameter ImageNet model is counted in about a second.
  assert param_count(UNet(**kwargs), image_shape) == expected
