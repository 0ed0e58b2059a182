"""The feature classifier chosen by config fields (eval.classifier_*), trained once per run and cached with its
held-out accuracy (distill/evaluation/classifier.py: settings, classifier_for_run)."""
import os

import numpy as np
import pytest

from distill import configuration, validation
from distill.evaluation import classifier as classifier_lib


def digits_config(**eval_fields):
  c = configuration.base_config()
  c.eval.classifier_steps, c.eval.classifier_widths, c.eval.classifier_features = 30, (8, 16), 16
  c.eval.classifier_batch_size = 64
  c.eval.update(eval_fields)
  return c


def test_settings_come_from_the_eval_section():
  assert classifier_lib.settings(digits_config().eval) == {"steps": 30, "widths": (8, 16), "features": 16,
                                                           "batch_size": 64}


def test_trained_once_with_the_configured_widths_and_its_accuracy_recorded(tmp_path, capsys):
  config = digits_config()
  params, meta = classifier_lib.classifier_for_run(config, str(tmp_path))
  assert "held-out test accuracy" in capsys.readouterr().out
  assert [params[f"conv_{i}"]["kernel"].shape[-1] for i in range(2)] == [8, 16] and "conv_2" not in params
  assert params["feature_head"]["kernel"].shape[-1] == 16
  assert meta["widths"] == [8, 16] and meta["steps"] == 30 and meta["num_test"] == 297
  assert 0.0 <= meta["test_accuracy"] <= 1.0
  path = tmp_path / "classifier" / "digits.npz"
  assert path.exists() and classifier_lib.load_classifier(str(path))[1]["test_accuracy"] == meta["test_accuracy"]
  # The cache is used as it is; other settings are said, not silently retrained.
  again, meta_again = classifier_lib.classifier_for_run(digits_config(classifier_widths=(16, 16)), str(tmp_path))
  assert meta_again == meta and "not the config's" in capsys.readouterr().out
  np.testing.assert_array_equal(again["logits"]["kernel"], params["logits"]["kernel"])


@pytest.mark.parametrize("widths", [(), (12,), (8, 0)])
def test_bad_widths_are_one_line(widths):
  config = digits_config(classifier_widths=widths)
  with pytest.raises(validation.ConfigError, match=r"config\.eval\.classifier_widths=.*multiples of 8"):
    configuration.validate(config)
