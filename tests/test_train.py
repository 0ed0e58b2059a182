"""The trainer: resumption is bit-identical, non-finite losses stop or skip, finished stages are skipped."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill import train


def _stage(num_steps=8, nan_at=None, crash_at=None, skip_nonfinite=False, ema=0.9):
  target = jnp.arange(6.0).reshape(2, 3)

  def loss_fn(params, frozen, batch, rng):
    noise = 0.01 * jax.random.normal(rng, target.shape)  # uses the per-step RNG
    loss = jnp.mean((params["w"] * batch["x"][0] - target - noise) ** 2)
    if nan_at is not None:
      loss = jnp.where(batch["step"][0] == nan_at, jnp.nan, loss)
    return loss, {"batch_mean": jnp.mean(batch["x"])}

  def batch_fn(step):
    if crash_at is not None and step == crash_at:
      raise KeyboardInterrupt("simulated kill")
    rng = np.random.default_rng(step)
    return {"x": rng.uniform(0.5, 1.5, (4,)).astype(np.float32), "step": np.full((4,), step, np.int32)}

  return train.Stage(name="toy", loss_fn=loss_fn, init_params={"w": jnp.ones((2, 3))},
                     optimizer=optax.adam(0.1), num_steps=num_steps, batch_fn=batch_fn, seed=3,
                     ema_decay=ema, log_every=2, ckpt_every=2, skip_nonfinite=skip_nonfinite)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_saves(request):
  """Checkpoints written synchronously (the CPU default) and asynchronously (the accelerators' default)."""
  with train.checkpoint_mode(request.param):
    yield request.param


def test_interrupted_run_resumes_bit_identically(tmp_path, async_saves):
  ref, _ = train.run_stage(_stage(), str(tmp_path / "a"))
  with pytest.raises(KeyboardInterrupt):
    train.run_stage(_stage(crash_at=5), str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b" / "final")
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["2", "4"]
  resumed, meta = train.run_stage(_stage(), str(tmp_path / "b"))
  np.testing.assert_array_equal(ref["w"], resumed["w"])
  assert meta["stage"] == "toy" and meta["num_steps"] == 8
  # A finished stage is skipped and hands back the same parameters.
  again, _ = train.run_stage(_stage(crash_at=0), str(tmp_path / "b"))
  np.testing.assert_array_equal(again["w"], ref["w"])


def test_training_reduces_the_loss_and_ema_lags(tmp_path):
  raw, _ = train.run_stage(_stage(num_steps=40, ema=None), str(tmp_path / "raw"))
  ema, _ = train.run_stage(_stage(num_steps=40, ema=0.9), str(tmp_path / "ema"))
  target = np.arange(6.0).reshape(2, 3)
  assert np.mean((np.asarray(raw["w"]) - target) ** 2) < 0.5 * np.mean((1 - target) ** 2)
  assert not np.allclose(raw["w"], ema["w"])


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, async_saves):
  with pytest.raises(train.TrainingError, match="non-finite"):
    train.run_stage(_stage(nan_at=3), str(tmp_path / "r"))
  ckpts = sorted(os.listdir(tmp_path / "r" / "checkpoints"))
  assert ckpts == ["2"], ckpts  # step 4 would hold the NaN update: never written
  assert not os.path.exists(tmp_path / "r" / "final")


def test_skip_nonfinite_drops_only_the_bad_update(tmp_path):
  params, _ = train.run_stage(_stage(nan_at=3, skip_nonfinite=True, ema=None), str(tmp_path / "s"))
  assert np.all(np.isfinite(params["w"]))


def test_ema_decay_warmup():
  np.testing.assert_allclose(train.ema_decay_at(0, 0.999), 0.1)
  np.testing.assert_allclose(train.ema_decay_at(10**6, 0.999), 0.999)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, capsys):
  with pytest.raises(KeyboardInterrupt):
    train.run_stage(_stage(crash_at=5), str(tmp_path / "c"))
  ckpt_dir = tmp_path / "c" / "checkpoints"
  assert sorted(os.listdir(ckpt_dir)) == ["2", "4"]
  for root, _, files in os.walk(ckpt_dir / "4"):  # truncate every file of the latest checkpoint
    for f in files:
      open(os.path.join(root, f), "w").close()
  resumed, _ = train.run_stage(_stage(), str(tmp_path / "c"))
  assert "restored step 2" in capsys.readouterr().out
  ref, _ = train.run_stage(_stage(), str(tmp_path / "ref"))
  np.testing.assert_array_equal(ref["w"], resumed["w"])


def test_the_train_step_calls_no_deprecated_api():
  """Building and running the jitted step raises no DeprecationWarning (optax.global_norm was one: the
  pytest.ini filter catches warnings attributed to our modules, but a library's deprecation is attributed to
  the library, so the step is checked here directly)."""
  import warnings
  stage = _stage()
  step = train.make_train_step(stage.loss_fn, stage.optimizer, stage.ema_decay, False, stage.seed)
  state = train.init_state(stage.init_params, stage.optimizer, with_ema=True)
  batch = {k: jnp.asarray(v) for k, v in stage.batch_fn(0).items()}
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.jit(step)(state, None, batch)
  assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == []
