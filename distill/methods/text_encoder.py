"""The text encoder of the embedded text-to-image task, trained as a pipeline stage (docs/text_task.md). Registers
the stage 'text_encoder' and the config section 'text'; no sampler (the stage is not sampled).

Captions (`distill.text`): every image of the data set gets "a {dark|bright} {small|large} {narrow|wide} {class}"
from its class and three pixel statistics cut at per-class medians of the training split. The stage writes them
once as tokens (captions_{train,test}.npz, tokenizer.json), then trains a toy CLIP
(`distill.text_encoder_io.ContrastivePair`: a CLIPTextModel of text.width, text.layers, text.heads over
text.max_length tokens, a small conv image tower, projections to text.embed_dim and a learnable logit scale)
through the one trainer on batches of (image, caption tokens) of the pixel training split.

Loss (`clip_loss`): CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3) on L2-normalised embeddings with logits
exp(logit_scale) · cos, the scale clipped at 100; with ~80 distinct captions a batch holds many equal ones, so the
targets of a row are spread evenly over every column with the same caption (the multi-positive form of UniCL,
Yang et al. 2022); with distinct captions it is CLIP's loss exactly.

After training, once (`finish`), WORKDIR/text_encoder/text_encoder.json with the test split's numbers:
  retrieval        within consecutive batches of text.retrieval_batch test rows: caption → image and image →
                   caption top-1, a hit when the retrieved item has the query's caption (equal captions are
                   indistinguishable), and chance, the mean share of a batch holding the query's caption
  caption          top-1 over every distinct caption (num_classes · 8), chance 1 / their number
  attributes       with the true class given, each attribute's word read off the best of the class's 8 captions
                   (chance 0.5 each), and all three right (chance 1/8)
  zero_shot        class accuracy from the class-only prompts 'a {class}' and from the mean embedding of each
                   class's 8 captions (chance 1 / num_classes)
  score            mean 100 · max(cos, 0) of matched (image, caption) pairs and of shuffled ones (a fixed permutation)
plus the thresholds and the share of 'upper' words per attribute on both splits.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from distill import contract, optimizers, text, train, validation, writers
from distill import data as data_lib
from distill import text_encoder_io as io
from distill.context import Context, batch_fn, class_captions, run_stage
from distill.evaluation import classifier as classifier_lib

STAGE = io.STAGE
CHUNK = 5000  # images read at once when captioning and embedding a split


# --- the loss ----------------------------------------------------------------------------------------------


def same_caption(tokens) -> jax.Array:
  """tokens int [B, L] → bool [B, B]: rows i and j hold the same caption."""
  tokens = jnp.asarray(tokens)
  return jnp.all(tokens[:, None, :] == tokens[None, :, :], axis=-1)


def clip_loss(image_emb, text_emb, logit_scale, positives=None) -> tuple[jax.Array, jax.Array]:
  """CLIP's symmetric InfoNCE. image_emb, text_emb [B, E] (normalised here), logit_scale scalar (the log of the
  inverse temperature; clipped at log 100), positives bool [B, B] symmetric with a true diagonal (None: the
  identity). logits [B, B] = exp(min(logit_scale, log 100)) · cos(image_i, text_j); each row's target spreads
  evenly over its positives; loss = (CE over rows + CE over columns) / 2. Returns (loss, logits)."""
  img, txt = io.normalize(image_emb), io.normalize(text_emb)
  scale = jnp.exp(jnp.minimum(logit_scale, io.MAX_LOGIT_SCALE))
  logits = scale * img @ txt.T
  b = logits.shape[0]
  pos = jnp.eye(b, dtype=bool) if positives is None else jnp.asarray(positives, bool)
  targets = pos / jnp.sum(pos, axis=1, keepdims=True)
  per_image = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=1), axis=1)
  per_text = -jnp.sum(targets.T * jax.nn.log_softmax(logits.T, axis=1), axis=1)
  return (jnp.mean(per_image) + jnp.mean(per_text)) / 2.0, logits


def remove_tokens(tokens, remove, pad_id: int) -> jax.Array:
  """tokens int [B, L], remove bool [B, L] → int [B, L]: each row without the removed tokens, the rest moved left
  in order and the row padded with pad_id."""
  tokens, remove = jnp.asarray(tokens), jnp.asarray(remove, bool)
  length = tokens.shape[1]
  positions = jnp.arange(length)
  order = jnp.argsort(jnp.where(remove, length + positions, positions), axis=1)  # kept first, in order
  kept = jnp.take_along_axis(tokens, order, axis=1)
  count = length - jnp.sum(remove, axis=1, keepdims=True)
  return jnp.where(positions[None, :] < count, kept, pad_id)


def drop_words(rng, tokens, droppable, probability: float, pad_id: int) -> jax.Array:
  """`remove_tokens` of the tokens whose id is droppable (bool [vocab]), each independently with `probability`:
  training captions with some attribute words left out ('a dark bag', 'a bag')."""
  tokens = jnp.asarray(tokens)
  remove = jnp.asarray(droppable)[tokens] & (jax.random.uniform(rng, tokens.shape) < probability)
  return remove_tokens(tokens, remove, pad_id)


def contrastive_loss_fn(model: io.ContrastivePair, max_shift: int = 1, word_dropout: float = 0.0,
                        droppable=None, pad_id: int = 0):
  """The trainer's loss_fn(params, frozen, batch {'image' [B, H, W, C], 'tokens' [B, L]}, rng) → (loss, metrics):
  `clip_loss` with equal captions as positives, the images shifted by up to `max_shift` pixels (background −1
  filling; the captions' statistics do not move with a shift of the padded Fashion-MNIST images) and, with
  word_dropout > 0, each droppable word (bool [vocab]: the attribute words) left out of the caption with that
  probability (`drop_words`)."""

  def loss_fn(params, frozen, batch, rng):  # noqa: ARG001 — the trainer's signature
    shift_rng, drop_rng = jax.random.split(rng)
    images = classifier_lib.random_shift(shift_rng, batch["image"], max_shift)
    tokens = batch["tokens"]
    if word_dropout:
      tokens = drop_words(drop_rng, tokens, droppable, word_dropout, pad_id)
    img, txt, scale = model.apply({"params": params}, images, tokens)
    positives = same_caption(tokens)
    loss, logits = clip_loss(img, txt, scale, positives)
    hit = jnp.take_along_axis(positives, jnp.argmax(logits, axis=1)[:, None], axis=1)[:, 0]
    return loss, {"loss": loss, "logit_scale": jnp.exp(jnp.minimum(scale, io.MAX_LOGIT_SCALE)),
                  "image_to_caption_top1": jnp.mean(hit)}

  return loss_fn


# --- captions and batches --------------------------------------------------------------------------------------


class CaptionedSource(data_lib.Source):
  """A pixel source with each row's caption tokens: get_batch(indices [B]) → {'image' float32 [B, H, W, C],
  'tokens' int32 [B, L]}."""

  def __init__(self, source: data_lib.Source, tokens: np.ndarray):
    if len(tokens) != len(source):
      raise ValueError(f"{len(tokens)} token rows for a source of {len(source)} images")
    self._source, self._tokens = source, np.asarray(tokens, np.int32)
    self._length, self.image_shape, self.num_classes = len(source), source.image_shape, source.num_classes

  def get_batch(self, indices: np.ndarray) -> dict:
    indices = np.asarray(indices, np.int64)
    return {"image": self._source.get_batch(indices)["image"], "tokens": self._tokens[indices]}


def split_attributes(source: data_lib.Source, foreground: float = text.FOREGROUND) -> tuple[dict, np.ndarray]:
  """`text.image_attributes` of every image of `source`, read CHUNK at a time → ({name: float64 [N]}, labels
  int32 [N])."""
  parts, labels = [], []
  for start in range(0, len(source), CHUNK):
    batch = source.get_batch(np.arange(start, min(start + CHUNK, len(source))))
    parts.append(text.image_attributes(batch["image"], foreground))
    labels.append(np.asarray(batch["label"], np.int32))
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, np.concatenate(labels)


def caption_split(attributes: dict, labels: np.ndarray, class_names, thresholds: dict,
                  tokenizer: text.WordTokenizer) -> dict:
  """The captions_{split}.npz arrays of one split from its statistics: tokens int32 [N, L], captions str [N],
  labels int32 [N], attributes float64 [N, 3], thresholds (JSON string)."""
  bits = text.attribute_bits(attributes, labels, thresholds)
  captions = [text.caption_of(class_names[k], b) for k, b in zip(labels, bits)]
  return {"tokens": tokenizer.encode(captions), "captions": np.asarray(captions),
          "labels": np.asarray(labels, np.int32),
          "attributes": np.stack([attributes[name] for name, _ in text.ATTRIBUTES], axis=1),
          "thresholds": np.asarray(json.dumps(thresholds, sort_keys=True))}


def write_captions(ctx: Context, stage_dir: str, tokenizer: text.WordTokenizer) -> dict:
  """tokenizer.json and captions_{train,test}.npz (each rewritten only when absent or different); returns
  {split: the npz arrays}."""
  c = ctx.config
  names = class_captions(c.data, c.data.num_classes)
  out, thresholds = {}, None
  for split in io.SPLITS:
    attributes, labels = split_attributes(ctx.pixel_source(split))
    if thresholds is None:  # the training split's, for both
      thresholds = text.thresholds_from_attributes(attributes, labels, c.data.num_classes)
    out[split] = caption_split(attributes, labels, names, thresholds, tokenizer)
  if ctx.is_main_process:
    epath.Path(stage_dir).mkdir(parents=True, exist_ok=True)
    path = os.path.join(stage_dir, io.TOKENIZER)
    if not epath.Path(path).exists() or epath.Path(path).read_text() != tokenizer.to_json():
      writers.atomic_write_text(path, tokenizer.to_json())
    for split, arrays in out.items():
      path = io.captions_path(stage_dir, split)
      if not _same_npz(path, arrays):
        writers.atomic_write_bytes(path, writers.npz_bytes(**arrays))
  return out


def _same_npz(path: str, arrays: dict) -> bool:
  if not epath.Path(path).exists():
    return False
  try:
    with writers.read_npz(path) as d:
      return set(d.files) == set(arrays) and all(np.array_equal(d[k], v) for k, v in arrays.items())
  except Exception:  # noqa: BLE001 — an unreadable file is written again
    return False


# --- the stage -------------------------------------------------------------------------------------------------


def tokenizer_of(config) -> text.WordTokenizer:
  return text.caption_tokenizer(class_captions(config.data, config.data.num_classes), config.text.max_length)


def attribute_word_mask(tokenizer: text.WordTokenizer) -> np.ndarray:
  """bool [vocab]: the attribute words' ids (what word dropout may leave out)."""
  words = {w for _, pair in text.ATTRIBUTES for w in pair}
  return np.array([w in words for w in tokenizer.vocab])


def architecture(config, tokenizer: text.WordTokenizer) -> dict:
  """What rebuilds the pair from a finished stage (meta.json's extra.architecture; `io.pair_of`)."""
  t = config.text
  return {"text": {"vocab_size": tokenizer.vocab_size, "hidden_size": int(t.width),
                   "intermediate_size": int(t.mlp_ratio * t.width), "num_hidden_layers": int(t.layers),
                   "num_attention_heads": int(t.heads), "max_position_embeddings": int(t.max_length),
                   "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": tokenizer.eos_id},
          "image_widths": [int(w) for w in t.image_widths], "embed_dim": int(t.embed_dim)}


def stage_meta(config) -> contract.StageMeta:
  """The text encoder's record: not sampled, not scored, trained from data (no teacher evaluations)."""
  t = config.text
  return contract.StageMeta(
      kind=STAGE, method="text encoder", sampler="", num_sampling_steps=0, w_range=(0.0, 0.0),
      batch_size=int(t.batch_size), teacher_evals_per_update=0.0, student_evals_per_update=1.0, scored=False,
      extra={"architecture": architecture(config, tokenizer_of(config)), "loss": "clip_multi_positive",
             "word_dropout": float(t.word_dropout)})


def run_text_encoder(ctx: Context):
  c = ctx.config
  t = c.text
  stage_dir = ctx.stage_dir(STAGE)
  results_path = os.path.join(stage_dir, io.RESULTS)
  if train.has_final(stage_dir) and epath.Path(results_path).exists():
    return writers.read_json(results_path)
  tokenizer = tokenizer_of(c)
  splits = write_captions(ctx, stage_dir, tokenizer)
  model = io.pair_of(architecture(c, tokenizer))
  optimizer, schedule = optimizers.cosine_adam(float(t.lr), int(t.steps), 0.1, int(t.warmup_steps), 0.9, 0.98,
                                               float(t.grad_clip))
  source = CaptionedSource(ctx.pixel_source("train"), splits["train"]["tokens"])
  stage = train.Stage(
      name=STAGE, loss_fn=contrastive_loss_fn(model, int(t.max_shift), float(t.word_dropout),
                                              attribute_word_mask(tokenizer), tokenizer.pad_id),
      init_params=io.init_params(model, ctx.pixel_shape, t.max_length, c.seed), optimizer=optimizer,
      num_steps=int(t.steps), batch_fn=batch_fn(source, int(t.batch_size), c.seed), seed=c.seed,
      log_every=int(t.log_every), ckpt_every=int(t.ckpt_every), images_per_step=int(t.batch_size),
      lr_schedule=schedule, fsdp=c.mesh.fsdp, fsdp_min_size=c.mesh.fsdp_min_size)
  run_stage(ctx, stage, stage_meta(c))
  if ctx.is_main_process:
    return finish(ctx, splits)
  return None


def finish(ctx: Context, splits: dict) -> dict:
  """text_encoder.json (the module docstring's numbers on the test split), written last. Returns its contents."""
  c = ctx.config
  stage_dir = ctx.stage_dir(STAGE)
  start = time.time()
  encoder = io.load_text_encoder(stage_dir)
  names = class_captions(c.data, c.data.num_classes)
  test = splits["test"]
  images = _embed_split(encoder, ctx.pixel_source("test"))
  texts = _embed_unique(encoder, test["tokens"])
  all_captions = text.every_caption(names)
  caption_embeds = encoder.embed_text(encoder.encode([s for row in all_captions for s in row]))
  caption_embeds = caption_embeds.reshape(len(names), len(all_captions[0]), -1)
  prompts = encoder.embed_text(encoder.encode(text.class_prompts(names)))
  labels = test["labels"]
  bits = text.attribute_bits({n: test["attributes"][:, i] for i, (n, _) in enumerate(text.ATTRIBUTES)}, labels,
                             json.loads(str(test["thresholds"])))
  perm = np.random.default_rng(0).permutation(len(labels))
  from distill.evaluation import clip_score
  results = {
      "test_images": int(len(labels)),
      "retrieval": retrieval_accuracy(images, texts, caption_ids(test["tokens"]), int(c.text.retrieval_batch)),
      "caption": caption_accuracy(images, caption_embeds, labels, bits),
      "attributes": attribute_accuracy(images, caption_embeds, labels, bits),
      "zero_shot": {"class_prompts": zero_shot_accuracy(images, prompts, labels),
                    "caption_ensemble": zero_shot_accuracy(images, caption_embeds.mean(axis=1), labels),
                    "chance": 1.0 / len(names)},
      "score": {"matched": float(clip_score.per_sample_scores(images, texts).mean()),
                "shuffled": float(clip_score.per_sample_scores(images, texts[perm]).mean())},
      "balance": {split: {n: float(np.mean(splits[split]["attributes"][:, i] > np.asarray(
          json.loads(str(splits[split]["thresholds"]))[n])[splits[split]["labels"]]))
          for i, (n, _) in enumerate(text.ATTRIBUTES)} for split in io.SPLITS},
      "thresholds": json.loads(str(test["thresholds"])),
      "captions_distinct": {split: int(len(np.unique(splits[split]["tokens"], axis=0))) for split in io.SPLITS},
      "logit_scale": float(np.exp(min(float(encoder.params["logit_scale"]), io.MAX_LOGIT_SCALE))),
      "architecture": train.load_final_meta(stage_dir).get("architecture"),
      "train_steps": int(c.text.steps), "seconds": time.time() - start,
  }
  writers.atomic_write_json(os.path.join(stage_dir, io.RESULTS), results, indent=1)
  r, z = results["retrieval"], results["zero_shot"]
  print(f"[{STAGE}] test split: caption→image top-1 {r['caption_to_image']:.3f}, image→caption "
        f"{r['image_to_caption']:.3f} (chance {r['chance']:.3f}, batches of {r['batch']}); caption top-1 "
        f"{results['caption']['top1']:.3f} (chance {results['caption']['chance']:.4f}); zero-shot class "
        f"{z['class_prompts']:.3f} (ensemble {z['caption_ensemble']:.3f}); score matched "
        f"{results['score']['matched']:.2f} vs shuffled {results['score']['shuffled']:.2f}")
  return results


def _embed_split(encoder: io.TextEncoder, source: data_lib.Source) -> np.ndarray:
  """Every image of `source` → [N, E] normalised embeddings, CHUNK images read at a time."""
  return np.concatenate([encoder.embed_images(source.get_batch(np.arange(i, min(i + CHUNK, len(source))))["image"])
                         for i in range(0, len(source), CHUNK)])


def _embed_unique(encoder: io.TextEncoder, tokens: np.ndarray) -> np.ndarray:
  """tokens [N, L] → [N, E]: each distinct row embedded once."""
  unique, inverse = np.unique(tokens, axis=0, return_inverse=True)
  return encoder.embed_text(unique)[inverse.reshape(-1)]


# --- held-out numbers (numpy; embeddings L2-normalised) ----------------------------------------------------


def caption_ids(tokens) -> np.ndarray:
  """tokens [N, L] → int [N]: equal rows get equal ids."""
  return np.unique(np.asarray(tokens), axis=0, return_inverse=True)[1].reshape(-1)


def retrieval_accuracy(image_emb, text_emb, ids, batch: int) -> dict:
  """Top-1 retrieval within consecutive batches of `batch` rows (a last partial batch is left out): image_emb,
  text_emb [N, E], ids int [N] (equal ids: equal captions). caption → image: the image most similar to caption i
  has caption id ids[i]; image → caption: likewise for the caption most similar to image i. chance: the mean over
  rows of the share of the row's batch with its id (either direction's expected hit rate at random)."""
  image_emb, text_emb, ids = np.asarray(image_emb), np.asarray(text_emb), np.asarray(ids)
  n = (len(ids) // batch) * batch
  if n == 0:
    raise ValueError(f"retrieval needs at least one batch of {batch} rows, got {len(ids)}")
  t2i, i2t, chance = [], [], []
  for s in range(0, n, batch):
    sims = image_emb[s:s + batch] @ text_emb[s:s + batch].T  # [image, caption]
    b_ids = ids[s:s + batch]
    same = b_ids[:, None] == b_ids[None, :]
    i2t.append(b_ids[np.argmax(sims, axis=1)] == b_ids)
    t2i.append(b_ids[np.argmax(sims, axis=0)] == b_ids)
    chance.append(same.mean(axis=1))
  return {"caption_to_image": float(np.mean(np.concatenate(t2i))),
          "image_to_caption": float(np.mean(np.concatenate(i2t))),
          "chance": float(np.mean(np.concatenate(chance))), "batch": int(batch), "batches": int(n // batch)}


def caption_accuracy(image_emb, caption_embeds, labels, bits) -> dict:
  """Top-1 over every caption: image_emb [N, E], caption_embeds [K, 2^A, E] (`text.every_caption`'s order),
  labels int [N], bits bool [N, A] (the images' own captions). chance: 1 / (K · 2^A)."""
  k, m, e = caption_embeds.shape
  best = np.argmax(np.asarray(image_emb) @ caption_embeds.reshape(k * m, e).T, axis=1)
  own = np.asarray(labels) * m + _bits_to_index(bits)
  return {"top1": float(np.mean(best == own)), "chance": 1.0 / (k * m), "captions": int(k * m)}


def attribute_accuracy(image_emb, caption_embeds, labels, bits) -> dict:
  """With the true class given: the best of the class's 2^A captions (caption_embeds [K, 2^A, E]) → per attribute,
  whether its word is the image's (bits bool [N, A]); and all A right. Chances 0.5 and 2^-A."""
  sims = np.einsum("ne,nme->nm", np.asarray(image_emb), caption_embeds[np.asarray(labels)])
  best = np.argmax(sims, axis=1)
  a = bits.shape[1]
  best_bits = (best[:, None] >> np.arange(a - 1, -1, -1)[None, :]) & 1
  right = best_bits.astype(bool) == np.asarray(bits, bool)
  out = {name: float(right[:, i].mean()) for i, (name, _) in enumerate(text.ATTRIBUTES[:a])}
  out.update(all=float(right.all(axis=1).mean()), chance_each=0.5, chance_all=2.0 ** -a)
  return out


def zero_shot_accuracy(image_emb, class_emb, labels) -> float:
  """Share of images [N, E] whose most similar class embedding (class_emb [K, E]) is their label [N]."""
  return float(np.mean(np.argmax(np.asarray(image_emb) @ np.asarray(class_emb).T, axis=1) == np.asarray(labels)))


def _bits_to_index(bits) -> np.ndarray:
  """bool [N, A] → int [N]: the binary number, the first attribute most significant (`text.every_caption`)."""
  bits = np.asarray(bits, np.int64)
  return bits @ (1 << np.arange(bits.shape[1] - 1, -1, -1))


# --- config ------------------------------------------------------------------------------------------------


def config_sections():
  return {"text": ml_collections.ConfigDict(dict(
      enabled=False,                    # a text-conditioned run: its U-Net cross-attends to this encoder's states
      encoder_dir="",                   # the finished text encoder stage it reads ('' = WORKDIR/text_encoder)
      max_length=8,                     # tokens per caption: BOS, 'a', 3 attribute words, the class, EOS, 1 pad
      # The toy CLIP: the text transformer, the image tower, the shared embedding.
      width=64, layers=2, heads=4, mlp_ratio=4, embed_dim=64, image_widths=(32, 64, 128),
      steps=1000, batch_size=256, lr=1e-3, warmup_steps=100, grad_clip=1.0,
      max_shift=1,                      # training images shifted by up to this many pixels (0: none)
      word_dropout=0.2,                 # each attribute word left out of a training caption with this probability
      retrieval_batch=100,              # rows per retrieval batch in text_encoder.json
      log_every=100, ckpt_every=500,
  ))}


def validate(c) -> None:
  t = c.text
  validation.boolean(c, "text.enabled")
  if not isinstance(t.encoder_dir, str):
    validation.fail("text.encoder_dir", t.encoder_dir, "must be a path ('' = WORKDIR/text_encoder)")
  for f in ("max_length", "width", "layers", "heads", "mlp_ratio", "embed_dim", "steps", "batch_size",
            "retrieval_batch", "log_every", "ckpt_every"):
    validation.positive_int(c, f"text.{f}")
  need = text.caption_length(class_captions(c.data, c.data.num_classes))
  if t.max_length < need:
    validation.fail("text.max_length", t.max_length, f"must be >= {need}: the longest caption of data.name="
                    f"{c.data.name!r} is {need} tokens with BOS and EOS")
  if t.width % t.heads:
    validation.fail("text.heads", t.heads, f"must divide text.width={t.width}")
  if t.batch_size < 2:
    validation.fail("text.batch_size", t.batch_size, "must be >= 2: a contrastive batch needs negatives")
  widths = t.image_widths
  if (not isinstance(widths, (tuple, list)) or not widths
      or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 or w % min(8, w) for w in widths)):
    validation.fail("text.image_widths", widths, "must be a non-empty tuple of positive integers, multiples of 8 "
                    "(GroupNorm's 8 groups) or below 8")
  for f in ("warmup_steps", "max_shift"):
    v = t[f]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      validation.fail(f"text.{f}", v, "must be an integer >= 0")
  if t.warmup_steps > t.steps:
    validation.fail("text.warmup_steps", t.warmup_steps, f"must not exceed text.steps={t.steps}")
  validation.number(c, "text.lr", 0.0, 1.0, lo_open=True)
  validation.number(c, "text.word_dropout", 0.0, 1.0, hi_open=True)
  validation.number(c, "text.grad_clip", 0.0, lo_open=True)


def quick(c) -> None:
  t = c.text
  t.steps, t.batch_size, t.warmup_steps, t.log_every, t.ckpt_every = 100, 64, 10, 50, 50


METHOD = contract.Method(
    name="text_encoder", order=-1, stages={STAGE: run_text_encoder}, config=config_sections, validate=validate,
    quick=quick, data_batches=("text.batch_size",), plan=lambda config, stage: [(STAGE, stage_meta(config))],
    # Not in 'all' or ':quick' pipelines: only a text-conditioned run needs it, and it names the stage.
    opt_in_stages=(STAGE,))
