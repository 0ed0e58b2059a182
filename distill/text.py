"""Captions of embedded image sets and their word-level tokenizer (pure numpy): the text side of the embedded
text-to-image task (docs/text_task.md).

Every image gets the caption

    "a {brightness} {size} {width} {class}"          e.g. "a dark small narrow trouser", "a bright large wide bag"

from its class name (lower-cased) and three attributes measured on its pixels. With u = (x + 1) / 2 in [0, 1]
the intensity (the channel mean when C > 1), the foreground F is the set of pixels with u > thresholds['foreground']
(`FOREGROUND` = 0.1: above the faint noise of Fashion-MNIST's black background), |F| its pixel count and H·W the
image's:

  brightness = mean of u over F                                   'dark' (≤ threshold) | 'bright' (> threshold)
  size       = |F| / (H·W), the foreground's area fraction        'small'              | 'large'
  width      = sqrt(var_x / var_y), the foreground's second-moment aspect ratio: var_x, var_y the variances of
               the column and row coordinates of F's pixels, each pixel a unit square (so + 1/12 each, the
               variance of a uniform position within one pixel, which keeps one-pixel-thin shapes finite)
                                                                  'narrow'             | 'wide'

An image with an empty foreground has brightness 0, size 0 and width 1. The thresholds are per class: the
medians of each statistic over a class's images of the training split (`caption_thresholds`), so each word
splits every class about in half and means what it says relative to that class ("a large sandal" is large for
a sandal). On Fashion-MNIST's training split the three statistics' rank correlations within a class average
0.13 (brightness, size), 0.18 (size, width) and -0.03 (brightness, width): three nearly independent bits.

Tokens (`WordTokenizer`): one id per word of a fixed vocabulary known in advance (`caption_vocabulary`: 'a', the
six attribute words and the class names' words), with pad = 0, bos = 1 and eos = the largest id, so that CLIP's
pooled-output rule finds the end of text under either convention (`distill.models.clip_text.pooled_index`). A
row is BOS, the words, EOS, then padding to max_length; the empty prompt (BOS, EOS, padding) is classifier-free
guidance's null condition.
"""
from __future__ import annotations

import itertools
import json
from typing import Mapping, Sequence

import numpy as np

FOREGROUND = 0.1
# (statistic, (word at or below the threshold, word above it)), in caption order.
ATTRIBUTES = (("brightness", ("dark", "bright")), ("size", ("small", "large")), ("width", ("narrow", "wide")))
ARTICLE = "a"
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


# --- attributes and captions -------------------------------------------------------------------------------


def intensity(images) -> np.ndarray:
  """images [N, H, W, C] float in [−1, 1] → u [N, H, W] float64 in [0, 1] (the channel mean of (x + 1) / 2)."""
  x = np.asarray(images, np.float64)
  if x.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {x.shape}")
  return (x.mean(axis=-1) + 1.0) / 2.0


def image_attributes(images, foreground: float = FOREGROUND) -> dict[str, np.ndarray]:
  """The three statistics of the module docstring: images [N, H, W, C] in [−1, 1] → {'brightness', 'size',
  'width'}, each float64 [N]."""
  u = intensity(images)
  n, h, w = u.shape
  fg = u > foreground
  count = fg.sum(axis=(1, 2)).astype(np.float64)
  safe = np.maximum(count, 1.0)
  brightness = np.where(count > 0, (u * fg).sum(axis=(1, 2)) / safe, 0.0)
  rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
  mean_r = (fg * rows).sum(axis=(1, 2)) / safe
  mean_c = (fg * cols).sum(axis=(1, 2)) / safe
  var_r = (fg * np.square(rows - mean_r[:, None, None])).sum(axis=(1, 2)) / safe + 1.0 / 12.0
  var_c = (fg * np.square(cols - mean_c[:, None, None])).sum(axis=(1, 2)) / safe + 1.0 / 12.0
  width = np.where(count > 0, np.sqrt(var_c / var_r), 1.0)
  return {"brightness": brightness, "size": count / (h * w), "width": width}


def thresholds_from_attributes(attributes: Mapping[str, np.ndarray], labels, num_classes: int,
                               foreground: float = FOREGROUND) -> dict:
  """Per-class medians of `image_attributes`' statistics ([N] each) for labels [N] in [0, num_classes): {'foreground':
  float, 'brightness' | 'size' | 'width': [num_classes] floats}; a class without images gets the median over all."""
  labels = np.asarray(labels)
  out = {"foreground": float(foreground)}
  for name, _ in ATTRIBUTES:
    values = np.asarray(attributes[name], np.float64)
    overall = float(np.median(values))
    out[name] = [float(np.median(values[labels == k])) if np.any(labels == k) else overall
                 for k in range(num_classes)]
  return out


def caption_thresholds(images, labels, num_classes: int | None = None, foreground: float = FOREGROUND) -> dict:
  """The thresholds captions are cut at, from a (training) split: images [N, H, W, C] in [−1, 1], labels [N] int in
  [0, num_classes) (default: max label + 1). JSON-serialisable (`thresholds_from_attributes`)."""
  labels = _labels(labels, len(images))
  k = int(labels.max()) + 1 if num_classes is None else int(num_classes)
  return thresholds_from_attributes(image_attributes(images, foreground), labels, k, foreground)


def attribute_bits(attributes: Mapping[str, np.ndarray], labels, thresholds: Mapping) -> np.ndarray:
  """bool [N, len(ATTRIBUTES)]: statistic > its class's threshold (the second word of its pair)."""
  labels = np.asarray(labels)
  columns = []
  for name, _ in ATTRIBUTES:
    cut = np.asarray(thresholds[name], np.float64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(cut)):
      raise ValueError(f"labels range [{labels.min()}, {labels.max()}] but thresholds[{name!r}] has {len(cut)} "
                       "classes")
    columns.append(np.asarray(attributes[name], np.float64) > cut[labels])
  return np.stack(columns, axis=1) if columns else np.zeros((len(labels), 0), bool)


def caption_of(class_name: str, bits: Sequence[bool]) -> str:
  """'a {word} … {class name}' for one image's attribute bits (len(ATTRIBUTES)), the class name lower-cased."""
  words = [pair[int(bool(b))] for (_, pair), b in zip(ATTRIBUTES, bits)]
  return " ".join([ARTICLE, *words, class_name.lower()])


def captions(images, labels, class_names: Sequence[str], thresholds: Mapping) -> list[str]:
  """images [N, H, W, C] in [−1, 1], labels [N] int → N captions (the module docstring's), cut at `thresholds`
  (`caption_thresholds` of the training split)."""
  labels = _labels(labels, len(images))
  if labels.size and labels.max() >= len(class_names):
    raise ValueError(f"label {int(labels.max())} has no class name ({len(class_names)} names)")
  bits = attribute_bits(image_attributes(images, float(thresholds["foreground"])), labels, thresholds)
  return [caption_of(class_names[k], b) for k, b in zip(labels, bits)]


def class_prompts(class_names: Sequence[str]) -> list[str]:
  """'a {class name}' per class: the class-only prompts (zero-shot classification)."""
  return [f"{ARTICLE} {name.lower()}" for name in class_names]


def every_caption(class_names: Sequence[str]) -> list[list[str]]:
  """[num_classes][2 ** len(ATTRIBUTES)] every caption a class can get; index j's bits are j's binary digits,
  the first attribute the most significant (j = 0: all first words)."""
  combos = list(itertools.product((False, True), repeat=len(ATTRIBUTES)))
  return [[caption_of(name, bits) for bits in combos] for name in class_names]


def caption_vocabulary(class_names: Sequence[str]) -> list[str]:
  """Every word a caption or class prompt can hold, in a fixed order: the article, the attribute words, then the
  class names' words (lower-cased, first occurrence)."""
  words = [ARTICLE, *(w for _, pair in ATTRIBUTES for w in pair)]
  for name in class_names:
    words += name.lower().split()
  return list(dict.fromkeys(words))


def _labels(labels, n: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (n,) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
    raise ValueError(f"labels must be integers [{n}] (one per image), got shape {labels.shape} ({labels.dtype})")
  if labels.size and labels.min() < 0:
    raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
  return labels


# --- tokens ------------------------------------------------------------------------------------------------


class WordTokenizer:
  """Words ↔ ids over a fixed vocabulary: vocab = [PAD, BOS, *words, EOS], so pad_id = 0, bos_id = 1 and
  eos_id = len(vocab) − 1 is the largest id. Text is lower-cased and split on whitespace.

  encode(texts) → int32 [N, max_length]: BOS, the words' ids, EOS, then pad_id; ValueError (one line) naming an
  unknown word or a text longer than max_length − 2 words. empty() → int32 [max_length], the empty prompt.
  """

  def __init__(self, words: Sequence[str], max_length: int):
    words = [str(w) for w in words]
    special = {PAD, BOS, EOS}
    if not words or any(not w or w != w.lower() or len(w.split()) != 1 or w in special for w in words):
      raise ValueError(f"words must be non-empty lower-case words without spaces, none of {sorted(special)}; "
                       f"got {words!r}")
    if len(set(words)) != len(words):
      raise ValueError(f"words repeat: {sorted(w for w in set(words) if words.count(w) > 1)}")
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
      raise ValueError(f"max_length={max_length!r}: must be an integer >= 2 (BOS and EOS)")
    self.vocab = [PAD, BOS, *words, EOS]
    self.max_length = int(max_length)
    self.pad_id, self.bos_id, self.eos_id = 0, 1, len(self.vocab) - 1
    self._ids = {w: i for i, w in enumerate(self.vocab)}

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @property
  def words(self) -> list[str]:
    return self.vocab[2:-1]

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """texts: N strings → int32 [N, max_length]."""
    if isinstance(texts, str):
      raise ValueError(f"encode takes a list of texts, got the string {texts!r}")
    out = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    for i, text in enumerate(texts):
      words = str(text).lower().split()
      if len(words) + 2 > self.max_length:
        raise ValueError(f"text {text!r} has {len(words)} words; max_length={self.max_length} holds "
                         f"{self.max_length - 2} (BOS and EOS take two)")
      for w in words:
        if w not in self._ids or w in (PAD, BOS, EOS):
          raise ValueError(f"unknown word {w!r} in text {text!r}; the vocabulary: {', '.join(self.words)}")
      out[i, :len(words) + 2] = [self.bos_id, *(self._ids[w] for w in words), self.eos_id]
    return out

  def empty(self) -> np.ndarray:
    """int32 [max_length]: BOS, EOS, padding (the null condition of classifier-free guidance)."""
    return self.encode([""])[0]

  def decode(self, tokens) -> list[str]:
    """int [N, L] (or [L]: a list of one) → N texts: the words between BOS and the first EOS."""
    tokens = np.atleast_2d(np.asarray(tokens))
    out = []
    for row in tokens:
      words = []
      body = row[1:] if len(row) and row[0] == self.bos_id else row
      for t in body:
        if t == self.eos_id:
          break
        if not 2 <= t < self.eos_id:
          raise ValueError(f"token {int(t)} in {row.tolist()} is no word (ids 2..{self.eos_id - 1} are)")
        words.append(self.vocab[int(t)])
      out.append(" ".join(words))
    return out

  def to_dict(self) -> dict:
    return {"kind": "word", "vocab": list(self.vocab), "max_length": self.max_length, "pad_id": self.pad_id,
            "bos_id": self.bos_id, "eos_id": self.eos_id}

  @classmethod
  def from_dict(cls, d: Mapping) -> "WordTokenizer":
    """The tokenizer `to_dict` wrote; ValueError (one line) for another layout."""
    vocab = list(d.get("vocab", ()))
    if d.get("kind") != "word" or len(vocab) < 3 or vocab[:2] != [PAD, BOS] or vocab[-1] != EOS:
      raise ValueError(f"not a word tokenizer (kind {d.get('kind')!r}, vocab starting {vocab[:3]!r}); expected "
                       f"kind 'word' and vocab [{PAD!r}, {BOS!r}, …, {EOS!r}]")
    return cls(vocab[2:-1], int(d.get("max_length", 0)))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  @classmethod
  def from_json(cls, text: str) -> "WordTokenizer":
    return cls.from_dict(json.loads(text))

  def __eq__(self, other) -> bool:
    return isinstance(other, WordTokenizer) and self.to_dict() == other.to_dict()

  def __hash__(self) -> int:
    return hash((tuple(self.vocab), self.max_length))

  def __repr__(self) -> str:
    return f"WordTokenizer({len(self.vocab)} ids, max_length={self.max_length})"


def caption_tokenizer(class_names: Sequence[str], max_length: int) -> WordTokenizer:
  """The tokenizer of `captions` over these class names."""
  return WordTokenizer(caption_vocabulary(class_names), max_length)


def caption_length(class_names: Sequence[str]) -> int:
  """Tokens of the longest caption: BOS, the article, one word per attribute, the longest class name, EOS."""
  return 2 + 1 + len(ATTRIBUTES) + max((len(n.split()) for n in class_names), default=1)
