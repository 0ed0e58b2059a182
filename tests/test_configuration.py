"""Config validation: every config builds, every variant validates, bad values name their field."""
import importlib.util
import os

import jax
import pytest

from distill import configuration, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name", ["digits", "cifar10", "imagenet64"])
@pytest.mark.parametrize("variant", [None, "quick"])
def test_configs_validate_and_build(name, variant):
  c = load_config(name, variant)
  configuration.validate(c)
  model = models.unet_from_config(c.model, c.data)
  shape = (c.data.image_size, c.data.image_size, c.data.channels)
  out = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1,) + shape),
                                          jax.numpy.zeros((1,)), jax.numpy.zeros((1,), jax.numpy.int32),
                                          train=False))
  assert out["params"]


def test_documented_parameter_counts():
  # The counts stated in the config docstrings.
  for name, count in [("digits", 650_689), ("cifar10", 60_016_387), ("imagenet64", 295_900_803)]:
    c = load_config(name)
    shape = (c.data.image_size, c.data.image_size, c.data.channels)
    assert models.param_count(models.unet_from_config(c.model, c.data), shape) == count, name


BAD_VALUES = [
    ("pipeline", ("teacher", "nope"), "pipeline"),
    ("data.name", "mnist", "data.name"),
    ("data.image_size", 0, "data.image_size"),
    ("data.num_workers", -1, "data.num_workers"),
    ("data.prefetch", -1, "data.prefetch"),
    ("model.parameterization", "score", "model.parameterization"),
    ("model.schedule", "sqrt", "model.schedule"),
    ("model.logsnr_min", 30.0, "model.logsnr_min"),
    ("model.ch_mult", (), "model.ch_mult"),
    ("model.attn_resolutions", (16,), "model.attn_resolutions"),
    ("model.dropout", 1.0, "model.dropout"),
    ("teacher.num_steps", 0, "teacher.num_steps"),
    ("teacher.lr", -1e-3, "teacher.lr"),
    ("teacher.p_uncond", 1.0, "teacher.p_uncond"),
    ("teacher.weighting", "p2", "teacher.weighting"),
    ("teacher.ema_decay", 1.0, "teacher.ema_decay"),
    ("sample.w_values", (), "sample.w_values"),
    ("sample.num_steps", -4, "sample.num_steps"),
    ("eval.agreement_w", (float("nan"),), "eval.agreement_w"),
    ("distill.start_steps", 48, "distill.start_steps"),
    ("distill.end_steps", 64, "distill.start_steps"),
    ("distill.w_min", 5.0, "distill.w_min"),
    ("distill.lr", 0.0, "distill.lr"),
    ("distill.weighting", "l1", "distill.weighting"),
    ("baselines.single_w", (-1.0,), "baselines.single_w"),
    ("eval.per_class", 0, "eval.per_class"),
    ("eval.seeds", 0, "eval.seeds"),
    ("eval.seeds", True, "eval.seeds"),
]


@pytest.mark.parametrize("field,value,named", BAD_VALUES, ids=[f for f, _, _ in BAD_VALUES])
def test_bad_values_name_their_field(field, value, named):
  c = load_config("digits")
  section, _, key = field.rpartition(".")
  (c[section] if section else c)[key] = value
  with pytest.raises(configuration.ConfigError, match=f"config.{named}"):
    configuration.validate(c)

