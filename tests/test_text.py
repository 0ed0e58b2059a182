"""The embedded text-to-image task's text side: captions from classes and pixels (distill/text.py) against a slow
pixel loop and hand-computed attributes, the word tokenizer and CLIP's pooled-output rules, the contrastive loss
and the held-out numbers against slow numpy loops, the 'text_encoder' stage on a real Fashion-MNIST subset with
its files and loader (distill/methods/text_encoder.py, distill/text_encoder_io.py), and the config's refusals."""
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from distill import configuration, contract, data, registry, text, text_encoder_io, train, validation
from distill.context import Context
from distill.methods import text_encoder as stage_lib
from distill.models import clip_text

NAMES = data.class_names("fashion_mnist")


# --- attributes and captions ------------------------------------------------------------------------------


def slow_attributes(image, foreground=text.FOREGROUND):
  """One image [H, W, C] in [−1, 1] → (brightness, size, width), pixel by pixel: each foreground pixel the unit
  square [c, c + 1) × [r, r + 1), the width the ratio of the standard deviations of a uniform point of their union
  (E[x²] − E[x]², E[x²] of one square = (c + ½)² + 1/12)."""
  h, w, channels = image.shape
  values, xs, ys = [], [], []
  for r in range(h):
    for c in range(w):
      u = (sum(float(image[r, c, k]) for k in range(channels)) / channels + 1.0) / 2.0
      if u > foreground:
        values.append(u)
        xs.append(c + 0.5)
        ys.append(r + 0.5)
  if not values:
    return 0.0, 0.0, 1.0
  n = len(values)

  def variance(p):
    return sum(q * q + 1.0 / 12.0 for q in p) / n - (sum(p) / n) ** 2

  return sum(values) / n, n / (h * w), math.sqrt(variance(xs) / variance(ys))


def two_shapes():
  """8×8 images: a 2×6 horizontal bar at u = 0.75 (plus one faint background pixel at u = 0.05), and a 6×1
  vertical bar half at u = 0.5, half at u = 1."""
  images = np.full((2, 8, 8, 1), -1.0, np.float32)
  images[0, 2:4, 1:7] = 0.5        # u = 0.75
  images[0, 7, 7] = -0.9           # u = 0.05: below the foreground level
  images[1, 0:3, 3] = 0.0          # u = 0.5
  images[1, 3:6, 3] = 1.0          # u = 1
  return images


def test_attributes_of_two_hand_computed_shapes():
  got = text.image_attributes(two_shapes())
  # Bar 1: rows {2, 3}, columns {1..6}: var_c = 35/12 + 1/12 = 3, var_r = 1/4 + 1/12 = 1/3, width = 3.
  # Bar 2: one column, rows {0..5}: var_c = 1/12, var_r = 35/12 + 1/12 = 3, width = 1/6; brightness (3·0.5 + 3)/6.
  np.testing.assert_allclose(got["brightness"], [0.75, 0.75], rtol=1e-12)
  np.testing.assert_allclose(got["size"], [12 / 64, 6 / 64], rtol=1e-12)
  np.testing.assert_allclose(got["width"], [3.0, 1.0 / 6.0], rtol=1e-12)


def test_attributes_equal_the_slow_pixel_loop_on_random_images():
  rng = np.random.default_rng(0)
  for channels in (1, 3):
    images = rng.uniform(-1, 1, (7, 10, 9, channels)).astype(np.float32)
    images[rng.uniform(size=images.shape) < 0.5] = -1.0
    images[0] = -1.0  # an empty foreground
    got = text.image_attributes(images)
    for i, image in enumerate(images):
      want = slow_attributes(image)
      np.testing.assert_allclose([got["brightness"][i], got["size"][i], got["width"][i]], want, rtol=1e-9)
  assert text.image_attributes(np.full((1, 4, 4, 1), -1.0))["width"][0] == 1.0


def test_thresholds_are_per_class_medians_and_json():
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (9, 8, 8, 1)).astype(np.float32)
  labels = np.array([0, 0, 0, 2, 2, 2, 2, 0, 2])
  got = text.caption_thresholds(images, labels, num_classes=4)
  assert json.loads(json.dumps(got)) == got and got["foreground"] == text.FOREGROUND
  slow = np.array([slow_attributes(im) for im in images])
  for i, (name, _) in enumerate(text.ATTRIBUTES):
    assert len(got[name]) == 4
    for k in (0, 2):
      np.testing.assert_allclose(got[name][k], np.median(slow[labels == k, i]), rtol=1e-9)
    for k in (1, 3):  # no images: the median over all
      np.testing.assert_allclose(got[name][k], np.median(slow[:, i]), rtol=1e-9)
  assert len(text.caption_thresholds(images, labels)["size"]) == 3  # default: max label + 1


def test_captions_of_the_two_shapes():
  cut = {"foreground": 0.1, "brightness": [0.7] * 10, "size": [0.1] * 10, "width": [1.0] * 10}
  images = two_shapes()
  assert text.captions(images, [8, 1], NAMES, cut) == ["a bright large wide bag", "a bright small narrow trouser"]
  cut["brightness"][8] = 0.75  # equal to the threshold: the first word
  cut["size"][0] = 0.05
  assert text.captions(images, [8, 0], NAMES, cut) == ["a dark large wide bag", "a bright large narrow t-shirt"]
  with pytest.raises(ValueError, match="labels must be integers"):
    text.captions(images, [8], NAMES, cut)
  with pytest.raises(ValueError, match="no class name"):
    text.captions(images, [8, 10], NAMES, cut)


def test_every_caption_and_prompts_and_vocabulary():
  every = text.every_caption(NAMES)
  assert len(every) == 10 and len(every[0]) == 8
  assert every[1][0] == "a dark small narrow trouser" and every[1][5] == "a bright small wide trouser"
  assert every[1][7] == "a bright large wide trouser"
  assert text.class_prompts(NAMES)[0] == "a t-shirt"
  vocab = text.caption_vocabulary(NAMES)
  assert vocab[:7] == ["a", "dark", "bright", "small", "large", "narrow", "wide"] and len(vocab) == 17
  assert text.caption_length(NAMES) == 7
  assert text.caption_length(["ankle boot"]) == 8


# --- tokens ------------------------------------------------------------------------------------------------


def test_tokenizer_round_trip_empty_prompt_and_eos_is_the_largest_id():
  tok = text.caption_tokenizer(NAMES, 8)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 19) and tok.eos_id == len(tok.vocab) - 1
  captions = [c for row in text.every_caption(NAMES) for c in row] + text.class_prompts(NAMES) + [""]
  tokens = tok.encode(captions)
  assert tokens.dtype == np.int32 and tokens.shape == (len(captions), 8)
  assert tok.decode(tokens) == captions
  assert tokens.max() == tok.eos_id and np.all(tokens.max(axis=1) == tok.eos_id)
  np.testing.assert_array_equal(tok.encode(["a dark small narrow trouser"])[0], [1, 2, 3, 5, 7, 10, 19, 0])
  np.testing.assert_array_equal(tok.encode(["A  Dark small narrow T-shirt"])[0], [1, 2, 3, 5, 7, 9, 19, 0])
  np.testing.assert_array_equal(tok.empty(), [1, 19, 0, 0, 0, 0, 0, 0])
  assert tok.decode(tok.empty()) == [""]
  again = text.WordTokenizer.from_json(tok.to_json())
  assert again == tok and hash(again) == hash(tok) and again.to_dict() == json.loads(json.dumps(tok.to_dict()))


def test_clip_pooled_index_finds_eos_under_both_rules():
  tok = text.caption_tokenizer(NAMES, 8)
  texts = ["a dark small narrow trouser", "a bag", "", "a bright large wide t-shirt"]
  tokens = jnp.asarray(tok.encode(texts))
  eos_at = [len(t.split()) + 1 for t in texts]
  np.testing.assert_array_equal(clip_text.pooled_index(tokens, 2), eos_at)  # legacy: the largest id
  np.testing.assert_array_equal(clip_text.pooled_index(tokens, tok.eos_id), eos_at)  # explicit eos id


def test_tokenizer_refusals_are_one_line():
  tok = text.caption_tokenizer(NAMES, 8)
  for bad, needle in ((["a purple bag"], "unknown word 'purple'"), (["a <eos> bag"], "unknown word '<eos>'"),
                      (["a dark small narrow wide bag bag"], "max_length=8 holds 6"), ("a bag", "list of texts")):
    with pytest.raises(ValueError, match=needle) as e:
      tok.encode(bad)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="no word"):
    tok.decode([[1, 0, 19]])
  with pytest.raises(ValueError, match="not a word tokenizer"):
    text.WordTokenizer.from_dict({"kind": "bpe", "vocab": ["x"]})
  with pytest.raises(ValueError, match="repeat"):
    text.WordTokenizer(["a", "a"], 4)
  with pytest.raises(ValueError, match="max_length"):
    text.WordTokenizer(["a"], 1)


# --- the loss and the held-out numbers ------------------------------------------------------------------------


def slow_clip_loss(img, txt, log_scale, positives):
  """CLIP's symmetric cross-entropy, one logit at a time (float64); targets spread evenly over the positives."""
  img = [np.asarray(v, np.float64) / np.linalg.norm(v) for v in img]
  txt = [np.asarray(v, np.float64) / np.linalg.norm(v) for v in txt]
  scale = math.exp(min(log_scale, math.log(100.0)))
  b = len(img)
  logit = [[scale * float(np.dot(img[i], txt[j])) for j in range(b)] for i in range(b)]
  by_image = by_text = 0.0
  for i in range(b):
    lse = math.log(sum(math.exp(logit[i][j]) for j in range(b)))
    pos = [j for j in range(b) if positives[i][j]]
    by_image -= sum(logit[i][j] - lse for j in pos) / len(pos)
  for j in range(b):
    lse = math.log(sum(math.exp(logit[i][j]) for i in range(b)))
    pos = [i for i in range(b) if positives[i][j]]
    by_text -= sum(logit[i][j] - lse for i in pos) / len(pos)
  return (by_image / b + by_text / b) / 2.0


def test_clip_loss_equals_the_slow_loop():
  rng = np.random.default_rng(2)
  img, txt = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  eye = np.eye(6, dtype=bool)
  for log_scale in (0.3, math.log(1 / 0.07), 6.0):  # 6 > log 100: clipped
    loss, logits = stage_lib.clip_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32),
                                       jnp.float32(log_scale))
    np.testing.assert_allclose(float(loss), slow_clip_loss(img, txt, log_scale, eye), rtol=2e-5)
    assert logits.shape == (6, 6)
  tokens = np.array([[1, 5, 9], [1, 6, 9], [1, 5, 9], [1, 7, 9], [1, 6, 9], [1, 5, 9]])
  positives = np.asarray(stage_lib.same_caption(tokens))
  assert positives.sum() == 9 + 4 + 1 and np.array_equal(positives, positives.T)
  loss, _ = stage_lib.clip_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), jnp.float32(2.0),
                                positives)
  np.testing.assert_allclose(float(loss), slow_clip_loss(img, txt, 2.0, positives), rtol=2e-5)
  # Distinct captions: the multi-positive form is CLIP's loss.
  distinct = np.asarray(stage_lib.same_caption(np.arange(6)[:, None]))
  a = stage_lib.clip_loss(jnp.asarray(img), jnp.asarray(txt), 2.0, distinct)[0]
  np.testing.assert_allclose(float(a), float(stage_lib.clip_loss(jnp.asarray(img), jnp.asarray(txt), 2.0)[0]),
                             rtol=1e-6)


def test_word_dropout_removes_words_and_keeps_the_order():
  rng = np.random.default_rng(5)
  tokens = rng.integers(1, 9, (6, 7))
  remove = rng.uniform(size=(6, 7)) < 0.4
  got = np.asarray(stage_lib.remove_tokens(tokens, remove, 0))
  for row, drop, out in zip(tokens, remove, got):
    kept = [int(t) for t, d in zip(row, drop) if not d]
    assert out.tolist() == kept + [0] * (7 - len(kept))
  tok = text.caption_tokenizer(NAMES, 8)
  mask = stage_lib.attribute_word_mask(tok)
  assert [tok.vocab[i] for i in np.flatnonzero(mask)] == ["dark", "bright", "small", "large", "narrow", "wide"]
  full = jnp.asarray(tok.encode(["a dark small narrow trouser", "a bright large wide bag"] * 500))
  key = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(stage_lib.drop_words(key, full, mask, 0.0, tok.pad_id), full)
  assert tok.decode(stage_lib.drop_words(key, full[:2], mask, 1.0, tok.pad_id)) == ["a trouser", "a bag"]
  dropped = np.asarray(stage_lib.drop_words(key, full, mask, 0.2, tok.pad_id))
  assert set(tok.decode(dropped)) <= {" ".join(words) for words in _subsets()}
  assert abs(float(np.mean(3 - (np.isin(dropped, np.flatnonzero(mask))).sum(1))) / 3 - 0.2) < 0.03


def _subsets():
  """Every caption of the two test captions with some attribute words left out."""
  import itertools
  out = []
  for words, cls in ((("dark", "small", "narrow"), "trouser"), (("bright", "large", "wide"), "bag")):
    for keep in itertools.product((0, 1), repeat=3):
      out.append(("a", *(w for w, k in zip(words, keep) if k), cls))
  return out


def test_retrieval_accuracy_equals_the_slow_loop():
  rng = np.random.default_rng(3)
  n, batch = 23, 5
  img, txt = rng.normal(size=(n, 4)), rng.normal(size=(n, 4))
  ids = rng.integers(0, 3, n)
  got = stage_lib.retrieval_accuracy(img, txt, ids, batch)
  hits_t2i = hits_i2t = shares = 0.0
  for s in range(0, 20, batch):
    for q in range(s, s + batch):
      best_image = max(range(s, s + batch), key=lambda j: float(img[j] @ txt[q]))
      best_text = max(range(s, s + batch), key=lambda j: float(img[q] @ txt[j]))
      hits_t2i += ids[best_image] == ids[q]
      hits_i2t += ids[best_text] == ids[q]
      shares += sum(ids[j] == ids[q] for j in range(s, s + batch)) / batch
  assert got["batches"] == 4 and got["batch"] == batch
  np.testing.assert_allclose([got["caption_to_image"], got["image_to_caption"], got["chance"]],
                             [hits_t2i / 20, hits_i2t / 20, shares / 20], rtol=1e-12)
  chance = stage_lib.retrieval_accuracy(np.eye(4), np.eye(4), [0, 0, 1, 2], 4)["chance"]
  assert chance == pytest.approx((2 + 2 + 1 + 1) / 16)
  with pytest.raises(ValueError, match="at least one batch"):
    stage_lib.retrieval_accuracy(img, txt, ids, 100)


def test_caption_attribute_and_zero_shot_accuracy_on_constructed_embeddings():
  rng = np.random.default_rng(4)
  basis = np.linalg.qr(rng.normal(size=(16, 16)))[0].T  # 16 orthonormal rows
  captions = basis.reshape(2, 8, 16)
  labels = np.array([0, 1, 1, 0, 1])
  bits = rng.integers(0, 2, (5, 3)).astype(bool)
  index = bits @ np.array([4, 2, 1])
  exact = captions[labels, index]
  assert stage_lib.caption_accuracy(exact, captions, labels, bits) == {"top1": 1.0, "chance": 1 / 16, "captions": 16}
  got = stage_lib.attribute_accuracy(exact, captions, labels, bits)
  assert (got["brightness"], got["size"], got["width"], got["all"], got["chance_all"]) == (1, 1, 1, 1, 1 / 8)
  flipped = captions[labels, index ^ 4]  # the brightness word wrong, the rest right
  got = stage_lib.attribute_accuracy(flipped, captions, labels, bits)
  assert (got["brightness"], got["size"], got["width"], got["all"]) == (0, 1, 1, 0)
  assert stage_lib.caption_accuracy(flipped, captions, labels, bits)["top1"] == 0
  assert stage_lib.zero_shot_accuracy(exact, captions.mean(axis=1), labels) == 1.0
  assert stage_lib.zero_shot_accuracy(exact, captions.mean(axis=1)[::-1], labels) == 0.0


# --- the stage on real Fashion-MNIST -------------------------------------------------------------------------


from tests.test_fashion_e2e import write_subset  # noqa: E402  (the first n images of each real split)


def tiny_config(data_dir, **text_fields):
  c = configuration.base_config()
  c.data.name, c.data.image_size, c.data.channels, c.data.num_classes = "fashion_mnist", 32, 1, 10
  c.data.data_dir = str(data_dir)
  c.model.ch_mult, c.model.attn_resolutions = (1, 2), (16,)
  c.pipeline = ("text_encoder",)
  t = c.text
  t.width, t.layers, t.heads, t.embed_dim, t.image_widths = 32, 1, 2, 32, (16, 32)
  t.steps, t.batch_size, t.warmup_steps, t.lr, t.log_every, t.ckpt_every = 150, 64, 10, 2e-3, 75, 75
  t.update(text_fields)
  return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A 150-update run on 1,000 + 300 real images (~20 s on 2 busy CPU cores, nearly all of it compilation: the tests
  using it are marked slow)."""
  if not os.path.isdir(data.FASHION_MNIST_DIR):
    pytest.skip(f"{data.FASHION_MNIST_DIR} absent: apt-get install {data.FASHION_MNIST_PACKAGE}")
  root = tmp_path_factory.mktemp("text_run")
  write_subset(root / "fmnist", 1000, 300)
  config = tiny_config(root / "fmnist")
  configuration.validate(config)
  workdir = str(root / "run")
  results = stage_lib.run_text_encoder(Context(config, workdir))
  return config, workdir, results


@pytest.mark.slow
def test_stage_writes_its_files_and_beats_chance(finished):
  config, workdir, results = finished
  stage_dir = os.path.join(workdir, "text_encoder")
  assert json.load(open(os.path.join(stage_dir, "text_encoder.json"))) == results
  r = results["retrieval"]
  assert results["test_images"] == 300 and r["batches"] == 3 and r["chance"] < 0.05
  assert r["caption_to_image"] > r["chance"] + 0.15 and r["image_to_caption"] > r["chance"] + 0.15
  assert results["caption"]["top1"] > 3 * results["caption"]["chance"]
  assert results["zero_shot"]["caption_ensemble"] > 0.3 and results["score"]["matched"] > results["score"]["shuffled"]
  for split in ("train", "test"):
    assert all(0.35 < v < 0.65 for v in results["balance"][split].values())
  _, raw = train.load_final_params(stage_dir)
  meta = contract.StageMeta.from_dict(raw)
  assert meta.kind == "text_encoder" and not meta.scored and meta.sampler == "" and raw["num_steps"] == 150
  assert meta.extra["architecture"]["text"]["eos_token_id"] == 19
  assert registry.stage_owner("text_encoder").name == "text_encoder"
  assert [(n, m.to_dict()) for _, n, m in registry.plan(config)] == [("text_encoder", meta.to_dict())]


@pytest.mark.slow
def test_caption_files_are_the_captions_of_the_data(finished):
  config, workdir, _ = finished
  stage_dir = os.path.join(workdir, "text_encoder")
  tok = text_encoder_io.read_tokenizer(stage_dir)
  assert tok == text.caption_tokenizer(NAMES, 8)
  train_set = data.make_source(config.data, "train").get_batch(np.arange(1000))
  thresholds = text.caption_thresholds(train_set["image"], train_set["label"], 10)
  for split, n in (("train", 1000), ("test", 300)):
    batch = data.make_source(config.data, split).get_batch(np.arange(n))
    want = text.captions(batch["image"], batch["label"], NAMES, thresholds)
    got = text_encoder_io.load_captions(stage_dir, split)
    assert got["captions"] == want and tok.decode(got["tokens"]) == want
    np.testing.assert_array_equal(got["tokens"], tok.encode(want))
    assert got["tokens"].dtype == np.int32 and got["tokens"].shape == (n, 8)
    np.testing.assert_array_equal(got["labels"], batch["label"])
    assert got["thresholds"] == thresholds and got["attributes"].shape == (n, 3)


@pytest.mark.slow
def test_loader_hidden_states_embeddings_and_score(finished):
  config, workdir, _ = finished
  enc = text_encoder_io.load_text_encoder(os.path.join(workdir, "text_encoder"))
  assert enc.hidden_size == 32 and enc.embed_dim == 32 and enc.tokenizer.max_length == 8
  tokens = enc.encode(["a dark small narrow trouser", "a bag", ""])
  hidden = enc.hidden_states(tokens)
  assert hidden.shape == (3, 8, 32) and hidden.dtype == jnp.float32
  direct, pooled = enc.text_model.apply({"params": enc.text_params}, tokens)
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(direct), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(pooled), np.asarray(direct)[np.arange(3), [6, 3, 1]], rtol=1e-6)
  assert jax.jit(lambda t: enc.hidden_states(t).sum())(jnp.asarray(tokens)).shape == ()  # traceable
  text_emb = enc.embed_text(tokens)
  # The embedding: the pooled state through text_projection, normalised.
  projected = np.asarray(pooled) @ np.asarray(enc.params["text_projection"]["kernel"])
  np.testing.assert_allclose(text_emb, projected / np.linalg.norm(projected, axis=1, keepdims=True), atol=1e-5)
  images = data.make_source(config.data, "test").get_batch(np.arange(3))["image"]
  img_emb = enc.embed_images(images)
  np.testing.assert_allclose(np.linalg.norm(img_emb, axis=1), 1.0, rtol=1e-5)
  scores = enc.score(images, tokens)
  assert scores.dtype == np.float32 and scores.shape == (3,)
  np.testing.assert_allclose(scores, 100 * np.maximum(np.sum(img_emb * text_emb, axis=1), 0), rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(enc.score(images, tokens[:1]), enc.score(images, np.repeat(tokens[:1], 3, 0)), rtol=1e-6)
  with pytest.raises(ValueError, match=r"tokens must be integers \[N, 8\]"):
    enc.embed_text(tokens[:, :5])


@pytest.mark.slow
def test_a_finished_stage_is_not_trained_again(finished):
  config, workdir, results = finished
  final = os.path.join(workdir, "text_encoder", "final")
  stamp = os.stat(os.path.join(final, "meta.json")).st_mtime_ns
  assert stage_lib.run_text_encoder(Context(config, workdir)) == results
  assert os.stat(os.path.join(final, "meta.json")).st_mtime_ns == stamp


@pytest.mark.slow
def test_loader_refuses_an_unfinished_or_incomplete_stage(finished, tmp_path):
  _, workdir, _ = finished
  with pytest.raises(train.TrainingError, match="no finished text encoder") as e:
    text_encoder_io.load_text_encoder(str(tmp_path / "nothing"))
  assert "\n" not in str(e.value) and str(tmp_path / "nothing") in str(e.value)
  copy = tmp_path / "copy"
  shutil.copytree(os.path.join(workdir, "text_encoder"), copy)
  os.remove(copy / "tokenizer.json")
  with pytest.raises(train.TrainingError, match="tokenizer.json: missing") as e:
    text_encoder_io.load_text_encoder(str(copy))
  assert "\n" not in str(e.value)
  (copy / "tokenizer.json").write_text(text.caption_tokenizer(NAMES + ("hat",), 8).to_json())
  with pytest.raises(train.TrainingError, match="is not tokenizer.json's"):
    text_encoder_io.load_text_encoder(str(copy))


# --- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,needle", [
    ("enabled", 1, "must be True or False"),
    ("encoder_dir", None, "must be a path"),
    ("max_length", 6, "must be >= 7"),
    ("max_length", 0, "positive integer"),
    ("heads", 3, "must divide text.width=64"),
    ("batch_size", 1, "needs negatives"),
    ("image_widths", (32, 12), "multiples of 8"),
    ("image_widths", (), "non-empty"),
    ("lr", 0.0, "must lie in (0.0, 1.0]"),
    ("warmup_steps", -1, "integer >= 0"),
    ("warmup_steps", 5000, "must not exceed text.steps=1000"),
    ("max_shift", 1.5, "integer >= 0"),
    ("word_dropout", 1.0, "must lie in [0.0, 1.0)"),
    ("steps", 0, "positive integer"),
])
def test_config_refusals_are_one_line_naming_the_field(field, value, needle):
  c = tiny_config("")
  # The section's defaults with the one bad field (a new ConfigDict: the old one refuses a value of another type).
  c.text = ml_collections.ConfigDict({**configuration.base_config().text.to_dict(), field: value})
  with pytest.raises(validation.ConfigError) as e:
    configuration.validate(c)
  message = str(e.value)
  assert message.startswith(f"config.text.{field}={value!r}:") and needle in message and "\n" not in message


def test_defaults_validate_quick_shrinks_and_the_stage_is_opt_in():
  c = configuration.base_config()
  configuration.validate(c)  # digits: class names are the numbers
  assert c.text.enabled is False and c.text.encoder_dir == ""
  assert text_encoder_io.encoder_dir(c, "/w") == "/w/text_encoder"
  c.text.encoder_dir = "/elsewhere"
  assert text_encoder_io.encoder_dir(c, "/w") == "/elsewhere"
  registry.quick(c)
  assert c.text.steps == 100 and c.text.batch_size == 64
  configuration.validate(c)
  assert "text_encoder" in registry.stage_names() and "text_encoder" not in configuration.all_stages()
  assert registry.stage_names().index("text_encoder") < registry.stage_names().index("teacher")
