"""CLIP score (distill/evaluation/clip_score.py): against a slow per-sample numpy computation, clipped at 0, its
bootstrap interval, the batched image embedder, and against transformers' FlaxCLIPModel's own cosine (skipped when
transformers is absent)."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from distill.evaluation import clip_score, protocol
from distill.models import clip_vision

MODEL = clip_vision.ClipVision(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
                               intermediate_size=37, projection_dim=24)


def slow_scores(image_embeds, text_embeds):
  out = []
  for a, b in zip(image_embeds, text_embeds):
    dot = sum(float(x) * float(y) for x, y in zip(a, b))
    norm_a = math.sqrt(sum(float(x) ** 2 for x in a))
    norm_b = math.sqrt(sum(float(y) ** 2 for y in b))
    out.append(100.0 * max(dot / (norm_a * norm_b), 0.0))
  return out


def embeds(n=50, d=16, seed=0):
  rng = np.random.default_rng(seed)
  text = rng.standard_normal((n, d))
  image = text + 0.8 * rng.standard_normal((n, d))  # mostly positive cosines, a few negative
  return image.astype(np.float32), text.astype(np.float32)


def test_matches_a_slow_per_sample_computation():
  image, text = embeds()
  want = slow_scores(image, text)
  np.testing.assert_allclose(clip_score.per_sample_scores(image, text), want, rtol=1e-12, atol=1e-10)
  out = clip_score.clip_score(image, text)
  assert out["num_samples"] == 50
  assert out["clip_score"] == pytest.approx(sum(want) / len(want), rel=1e-12)
  # Scale-free: embeddings need not be normalised.
  assert clip_score.clip_score(3 * image, 0.1 * text)["clip_score"] == pytest.approx(out["clip_score"], rel=1e-9)


def test_negative_cosine_counts_as_zero():
  image = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
  text = np.array([[-1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cos −1, 0, 1
  np.testing.assert_allclose(clip_score.per_sample_scores(image, text), [0.0, 0.0, 100.0], atol=1e-12)
  assert clip_score.clip_score(image, text)["clip_score"] == pytest.approx(100 / 3)
  assert clip_score.clip_score(image[:1], text[:1])["clip_score"] == 0.0


def test_one_caption_for_every_image():
  image, text = embeds()
  one = clip_score.per_sample_scores(image, text[:1])
  np.testing.assert_allclose(one, slow_scores(image, np.repeat(text[:1], len(image), 0)), atol=1e-10)


def test_interval_contains_the_estimate_and_stays_in_range():
  image, text = embeds()
  out = clip_score.clip_score(image, text, bootstrap=200, seed=3)
  lo, hi = out["clip_score_ci"]
  assert 0.0 <= lo < out["clip_score"] < hi <= 100.0
  assert out == clip_score.clip_score(image, text, bootstrap=200, seed=3)  # a fixed seed
  # Every sample at cosine 1: no spread, and an interval clipped to the range.
  same = clip_score.clip_score(text, text, bootstrap=20)
  assert same["clip_score"] == pytest.approx(100.0) and same["clip_score_ci"][1] <= 100.0
  assert "clip_score_ci" not in clip_score.clip_score(image, text)


def test_bad_inputs_are_one_line():
  image, text = embeds(4, 8)
  for bad, match in [((image[0], text), r"image_embeds must be \[N >= 1, D\]"),
                     ((image, text[:2]), r"text_embeds must be \[4 or 1, 8\]"),
                     ((image, text[:, :4]), r"text_embeds must be"),
                     ((np.zeros((4, 8)), text), r"zero or not finite")]:
    with pytest.raises(ValueError, match=match) as e:
      clip_score.per_sample_scores(*bad)
    assert "\n" not in str(e.value)


def test_image_embedder_quantises_and_batches():
  params = clip_vision.random_params(MODEL)
  images = np.random.default_rng(0).uniform(-1, 1, (5, 28, 28, 1)).astype(np.float32)  # grayscale, upsampled
  embed = clip_score.image_embedder(params, MODEL, batch_size=2)  # 2 + 2 + a padded 1
  got = embed(images)
  assert got.shape == (5, 24)
  want = np.asarray(clip_vision.embed_images(params, MODEL, jnp.asarray(protocol.quantize(images))))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  text = np.random.default_rng(1).standard_normal((5, 24))
  scored = clip_score.score_images(embed, images, text, bootstrap=10)
  assert scored["clip_score"] == pytest.approx(clip_score.clip_score(want, text)["clip_score"], abs=1e-4)
  assert scored["num_samples"] == 5 and len(scored["clip_score_ci"]) == 2


def test_same_score_as_flax_clip_model():
  from test_clip_vision import ours_from_reference, reference_model
  _, ref = reference_model("quick_gelu")  # skips with its reason when transformers is absent
  rng = np.random.default_rng(2)
  pixels = rng.standard_normal((4, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(1, 99, (4, 16)).astype(np.int32)
  out = ref(input_ids=ids, pixel_values=jnp.transpose(pixels, (0, 3, 1, 2)), params=ref.params)
  cos = np.diag(np.asarray(out.logits_per_image)) / float(np.exp(ref.params["logit_scale"]))
  want = 100 * np.maximum(cos, 0)
  ours = np.asarray(MODEL.apply({"params": ours_from_reference(ref)}, pixels))
  text = np.asarray(ref.get_text_features(ids, params=ref.params))
  np.testing.assert_allclose(clip_score.per_sample_scores(ours, text), want, atol=1e-3)
  assert clip_score.clip_score(ours, text)["clip_score"] == pytest.approx(want.mean(), abs=1e-3)
