"""Image-to-image (SDEdit) with a finished stage: the partial trajectory against a hand-written DDIM, s → 0
returning the input, and the refusals."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import configuration, context, diffusion, models, sampling, train
from distill.methods import teacher as teacher_lib
from tests.cli import run_main


def tiny_run(tmp_path):
  """A workdir of mixture data with a randomly perturbed CFG teacher (it predicts something) and config.json."""
  c = configuration.base_config()
  c.data.name, c.data.image_size, c.data.channels, c.data.num_classes = "mixture", 4, 1, 3
  c.data.num_examples = 64
  m = c.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.head_dim, m.num_groups = 8, (1,), 1, (), 8, 4
  c.sample.num_steps, c.sample.batch_size, c.sample.clip = 8, 16, False
  configuration.validate(c)
  ctx = context.Context(c, str(tmp_path))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda l: np.asarray(l) + 0.1 * rng.standard_normal(l.shape).astype(np.float32),
                        models.init_params(context.teacher_model(ctx), ctx.image_shape, 0))
  train._save_final(ctx.stage_dir("teacher"), params, dict(teacher_lib.stage_meta(c).to_dict(), num_steps=1))
  (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))
  return ctx, params


def test_img2img_runs_the_last_k_steps_of_the_samplers_grid_from_the_noised_image(tmp_path):
  ctx, params = tiny_run(tmp_path)
  images = np.asarray(ctx.pixel_source("test").get_batch(np.arange(5))["image"])
  labels = np.array([0, 1, 2, 0, 1], np.int32)
  s, w = 0.5, 1.5
  got = sampling.img2img(str(tmp_path / "teacher"), strength=s, w_values=(w,), images=images, labels=labels,
                         seed=3, out=str(tmp_path / "out"))
  assert got["steps"] == 4  # half of the teacher's 8 steps

  # By hand: the same noise to t = s, then 4 guided DDIM steps on the teacher's own grid t = 4/8, 3/8, ... 0.
  model = models.x_function(context.teacher_model(ctx), "v")
  lam = lambda t: ctx.logsnr_fn(jnp.full((5,), t, jnp.float32))
  eps = jax.random.normal(jax.random.PRNGKey(3 + 31), images.shape)
  z = diffusion.q_sample(jnp.asarray(images), eps, lam(s))
  y = jnp.asarray(labels)
  for i in range(4):
    t, t_next = (4 - i) / 8, (3 - i) / 8
    cond = model(params, z, lam(t), y, None)
    uncond = model(params, z, lam(t), jnp.full((5,), 3), None)
    x_hat = (1 + w) * cond - w * uncond
    z = diffusion.ddim_step(z, x_hat, lam(t), lam(t_next))
  np.testing.assert_allclose(got["outputs"], np.asarray(x_hat), atol=2e-4)
  assert (tmp_path / "out.png").exists() and (tmp_path / "out.npz").exists()


def test_img2img_at_a_vanishing_strength_returns_the_input(tmp_path):
  _, _ = tiny_run(tmp_path)
  got = sampling.img2img(str(tmp_path / "teacher"), strength=1e-3, num=6, out=str(tmp_path / "o"))
  with np.load(tmp_path / "o.npz") as d:
    inputs, outputs = d["inputs"], d["outputs"]
  assert got["steps"] == 1
  np.testing.assert_allclose(outputs, inputs, atol=0.05)  # λ(0.001) ≈ 13: σ/α ≈ 0.0016
  # ... and a real strength changes the images.
  far = sampling.img2img(str(tmp_path / "teacher"), strength=1.0, num=6, out=str(tmp_path / "p"))
  assert np.abs(far["outputs"] - inputs).mean() > 0.2


@pytest.mark.parametrize("strength", [0.0, 1.5, float("nan")])
def test_img2img_refuses_strengths_outside_0_1(tmp_path, strength):
  tiny_run(tmp_path)
  with pytest.raises(sampling.SamplingError, match="--strength=.*must be in \\(0, 1\\]"):
    sampling.img2img(str(tmp_path / "teacher"), strength=strength)


def test_img2img_refuses_a_sampler_with_its_own_grid(tmp_path, monkeypatch):
  tiny_run(tmp_path)
  from distill import registry
  monkeypatch.setattr(registry, "follows_schedule", lambda sampler: False)
  with pytest.raises(sampling.SamplingError, match="cannot start part-way"):
    sampling.img2img(str(tmp_path / "teacher"), strength=0.5)


def test_which_samplers_follow_the_schedule():
  from distill import registry
  assert all(registry.follows_schedule(s) for s in ("cfg_ddim", "cfg_ddpm", "ddim", "stochastic", "consistency"))
  assert not registry.follows_schedule("sfd")  # SFD samples on its own σ grid


def test_img2img_from_the_command_line(tmp_path):
  tiny_run(tmp_path)
  ok = run_main("--mode=img2img", f"--checkpoint={tmp_path / 'teacher'}", "--strength=0.25", "--w=0,2",
                "--labels=1", "--num=3", f"--out={tmp_path / 'cli'}")
  assert ok.returncode == 0, ok.stderr
  assert "2 steps" in ok.stdout and (tmp_path / "cli.png").exists()
  with np.load(tmp_path / "cli.npz") as d:
    assert d["outputs"].shape == (6, 4, 4, 1) and set(d["target_labels"]) == {1}
  bad = run_main("--mode=img2img", f"--checkpoint={tmp_path / 'teacher'}", "--strength=2")
  assert bad.returncode == 2 and "--strength=2" in bad.stderr and "(0, 1]" in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_img2img_follows_the_requested_class_at_full_strength_and_keeps_the_input_at_low(tmp_path):
  """A real digits teacher (`configs/digits.py:quick`'s, trained here) and the run's digits classifier: at s = 1
  the inputs are fully noised, so 60 test digits decoded to another class (label + 3 mod 10) are classified as
  that class; at s = 0.1 they stay their own class. Random outputs would agree 10 % of the time."""
  ok = run_main("--config=configs/digits.py:quick", f"--workdir={tmp_path}", "--config.pipeline=('teacher',)")
  assert ok.returncode == 0, ok.stderr
  ctx = context.Context(*reversed(sampling.find_run(str(tmp_path / "teacher"))))
  clf, _ = context.get_classifier(ctx)
  batch = ctx.pixel_source("test").get_batch(np.arange(60))
  images, labels = np.asarray(batch["image"]), np.asarray(batch["label"], np.int32)
  targets = (labels + 3) % 10
  from distill.evaluation import classifier as classifier_lib
  for strength, expected, other in ((1.0, targets, labels), (0.1, labels, targets)):
    got = sampling.img2img(str(tmp_path / "teacher"), strength=strength, w_values=(1.0,), images=images,
                           labels=labels, target_labels=targets, out=str(tmp_path / f"s{strength}"))
    x = np.asarray(got["outputs"])
    assert classifier_lib.class_agreement(clf, x, expected, 10) >= 0.7, strength
    assert classifier_lib.class_agreement(clf, x, other, 10) <= 0.3, strength
