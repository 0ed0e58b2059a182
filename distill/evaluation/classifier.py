"""A small CNN classifier for tiny image sets, and the feature network of classifier-FID.

Two uses:
  * checking that a class-conditional model draws the digit it was asked for
    (`class_agreement`);
  * as the feature extractor of a "classifier-FID" (`features`) for data sets where
    Inception features mean nothing (8x8 digits, small user .npz sets).

Images everywhere are `[N, H, W, C]` float in [-1, 1], small square (H = W in 8..32),
any number of channels. Parameters are a plain nested dict of arrays (no batch
statistics), so they save as an `.npz` without pickle and load anywhere.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from distill import batching

Params = Mapping[str, Any]

# The penultimate layer; its width tells `_model_from_params` the model's `features`.
_FEATURE_LAYER = "feature_head"
_LOGIT_LAYER = "logits"
_META_KEY = "__meta__"


class SmallClassifier(nn.Module):
  """3x3 conv layers (GroupNorm, GELU), avg-pooled down to <= 4x4 after the first layer,
    global mean pool, then a dense penultimate layer and the logits.

    Attributes:
      num_classes: number of output logits.
      features: width of the penultimate layer, which `return_features` exposes.
      widths: channels of the conv layers. Small on purpose: on 2 CPU cores a training
        step of (16, 32, 64) costs ~1/3 of (32, 64, 128) at the same digits accuracy.
      dropout_rate: dropout on the penultimate activations while training.
    """

  num_classes: int
  features: int = 64
  widths: tuple[int, ...] = (16, 32, 64)
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_features: bool = False):
    """x: [B, H, W, C] in [-1, 1] -> logits [B, num_classes] (or features [B, features]).

        Dropout needs an rng named 'dropout' when `train` is True.
        """
    h = x
    for i, width in enumerate(self.widths):
      h = nn.Conv(width, (3, 3), padding="SAME", name=f"conv_{i}")(h)
      # GroupNorm, not BatchNorm: no mutable statistics, and features of a batch of
      # generated images do not depend on which other images share the batch.
      h = nn.GroupNorm(num_groups=8)(h)
      h = nn.gelu(h)
      if h.shape[1] > 4 and i > 0:
        h = nn.avg_pool(h, (2, 2), strides=(2, 2))
    h = jnp.mean(h, axis=(1, 2))
    h = nn.gelu(nn.Dense(self.features, name=_FEATURE_LAYER)(h))
    if return_features:
      return h
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return nn.Dense(self.num_classes, name=_LOGIT_LAYER)(h)


def _model_from_params(params: Params, num_classes: int) -> SmallClassifier:
  """The module matching `params` (widths and features are read from the kernel shapes)."""
  widths = []
  while f"conv_{len(widths)}" in params:
    widths.append(int(params[f"conv_{len(widths)}"]["kernel"].shape[-1]))
  feature_kernel = params[_FEATURE_LAYER]["kernel"]
  logit_kernel = params[_LOGIT_LAYER]["kernel"]
  if logit_kernel.shape[-1] != num_classes:
    raise ValueError(f"params have {logit_kernel.shape[-1]} classes, num_classes={num_classes}")
  return SmallClassifier(num_classes=num_classes, features=int(feature_kernel.shape[-1]), widths=tuple(widths))


def random_shift(rng: jax.Array, images: jax.Array, max_shift: int = 1) -> jax.Array:
  """Shifts each image by an independent integer offset in [-max_shift, max_shift]^2.

    images: [B, H, W, C] in [-1, 1]; vacated pixels are filled with -1 (background).
    """
  if max_shift == 0:
    return images
  b, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * max_shift + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

  return jax.vmap(crop)(padded, offsets)


def _adamw_direction(weight_decay: float) -> optax.GradientTransformation:
  # AdamW without its learning-rate scaling: the rate is an argument of the step, so one
  # compiled step serves every schedule and every call of `train_classifier`.
  return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))


@functools.partial(jax.jit, static_argnames=("augment", "weight_decay"))
def _train_step(params, opt_state, images, labels, rng, learning_rate, *, augment: bool, weight_decay: float):
  """One AdamW step on label-smoothed cross-entropy. images: [B, H, W, C], labels: [B]."""
  num_classes = params[_LOGIT_LAYER]["kernel"].shape[-1]
  model = _model_from_params(params, num_classes)
  shift_rng, dropout_rng = jax.random.split(rng)
  if augment:
    images = random_shift(shift_rng, images)

  def loss_fn(params):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), 0.05)
    return optax.softmax_cross_entropy(logits, targets).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  direction, opt_state = _adamw_direction(weight_decay).update(grads, opt_state, params)
  params = jax.tree.map(lambda p, d: p - learning_rate * d, params, direction)
  return params, opt_state, loss


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_params(rng, image_shape: tuple[int, ...], num_classes: int, features: int, widths: tuple[int, ...]):
  # A module-level jit, so repeated `train_classifier` calls reuse the compiled init.
  model = SmallClassifier(num_classes=num_classes, features=features, widths=widths)
  return model.init(rng, jnp.zeros((1,) + tuple(image_shape)))["params"]


def train_classifier(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    seed: int = 0,
    steps: int = 600,
    batch_size: int = 128,
    augment: bool = True,
    features: int = 64,
    widths: tuple[int, ...] = (16, 32, 64),
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-4,
) -> tuple[dict, float]:
  """Trains a `SmallClassifier`; returns (params, accuracy on the test set).

    images: [N, H, W, C] float in [-1, 1]; labels: [N] int in [0, num_classes).
    AdamW with warmup + cosine decay and label smoothing; `augment` applies random
    +-1 pixel shifts, which makes the classifier tolerant of slightly off-centre
    generated samples. Deterministic given `seed` (batches come from a numpy
    generator, augmentation and dropout from jax.random). On digits the defaults
    (600 steps of 128, ~50 epochs) reach ~99% in ~10 s on 2 CPU cores.
    """
  train_images = np.asarray(train_images, np.float32)
  train_labels = np.asarray(train_labels, np.int32)
  if train_images.ndim != 4:
    raise ValueError(f"train_images must be [N, H, W, C], got {train_images.shape}")
  n = len(train_images)
  batch_size = min(batch_size, n)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  widths = tuple(int(w) for w in widths)
  if not widths or any(w <= 0 or w % 8 for w in widths):
    raise ValueError(f"widths={widths} must be a non-empty tuple of positive multiples of 8 (GroupNorm's 8 groups)")
  params = _init_params(init_rng, train_images.shape[1:], num_classes, features, widths)
  opt_state = _adamw_direction(weight_decay).init(params)
  schedule = optax.warmup_cosine_decay_schedule(0.0,
                                                learning_rate,
                                                warmup_steps=min(100, steps // 10),
                                                decay_steps=steps)
  learning_rates = np.asarray(jax.vmap(schedule)(jnp.arange(steps)), np.float32)

  batch_rng = np.random.default_rng(seed)
  order = batch_rng.permutation(n)
  position = 0
  for step in range(steps):
    # Epoch-wise shuffling: every image is seen once per pass.
    if position + batch_size > n:
      order = batch_rng.permutation(n)
      position = 0
    index = order[position:position + batch_size]
    position += batch_size
    params, opt_state, _ = _train_step(params,
                                       opt_state,
                                       train_images[index],
                                       train_labels[index],
                                       jax.random.fold_in(train_rng, step),
                                       learning_rates[step],
                                       augment=augment,
                                       weight_decay=weight_decay)

  params = jax.device_get(params)
  accuracy = class_agreement(params, test_images, test_labels, num_classes)
  return params, accuracy


@jax.jit
def _apply_logits(params, images):
  # num_classes and features are read from the parameter shapes, so one jit serves all.
  model = _model_from_params(params, params[_LOGIT_LAYER]["kernel"].shape[-1])
  return model.apply({"params": params}, images)


@jax.jit
def _apply_features(params, images):
  model = _model_from_params(params, params[_LOGIT_LAYER]["kernel"].shape[-1])
  return model.apply({"params": params}, images, return_features=True)


def _batched(apply_fn, params, images: np.ndarray, batch_size: int) -> np.ndarray:
  """Applies `apply_fn` in batches; the last batch is padded so shapes (and compiles) repeat."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or len(images) == 0:
    raise ValueError(f"images must be a non-empty [N, H, W, C], got {images.shape}")
  return batching.in_batches(lambda x: apply_fn(params, x), images, batch_size)


def logits(params: Params, images: np.ndarray, num_classes: int, batch_size: int = 1024) -> np.ndarray:
  """images: [N, H, W, C] in [-1, 1] -> class logits [N, num_classes] float32."""
  _model_from_params(params, num_classes)  # validates num_classes
  return _batched(_apply_logits, params, images, batch_size)


def predict(params: Params, images: np.ndarray, num_classes: int, batch_size: int = 1024) -> np.ndarray:
  """images: [N, H, W, C] in [-1, 1] -> predicted labels [N] int32."""
  _model_from_params(params, num_classes)  # validates num_classes
  logits = _batched(_apply_logits, params, images, batch_size)
  return np.argmax(logits, axis=-1).astype(np.int32)


def class_agreement(params: Params,
                    images: np.ndarray,
                    labels: np.ndarray,
                    num_classes: int,
                    batch_size: int = 1024) -> float:
  """Fraction of `images` classified as their (conditioning) `labels` [N]."""
  labels = np.asarray(labels)
  predictions = predict(params, images, num_classes, batch_size)
  return float(np.mean(predictions == labels))


def features(params: Params, images: np.ndarray, num_classes: int, batch_size: int = 1024) -> np.ndarray:
  """Penultimate activations: images [N, H, W, C] in [-1, 1] -> [N, F] float32 (F = features)."""
  _model_from_params(params, num_classes)
  return _batched(_apply_features, params, images, batch_size).astype(np.float32)


def save_classifier(path: str, params: Params, meta: Mapping[str, Any]) -> None:
  """Writes params as a flat `.npz` ('a/b/kernel' keys) with `meta` as a JSON string inside.

    meta: JSON-serialisable (e.g. num_classes, image_shape, accuracy, data set name).
    """
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  arrays = {key: np.asarray(value) for key, value in flat.items()}
  if _META_KEY in arrays:
    raise ValueError(f"parameter name {_META_KEY!r} is reserved")
  arrays[_META_KEY] = np.array(json.dumps(dict(meta), sort_keys=True))
  from distill import writers  # deferred: it imports TensorBoard's protos
  # Serialised in memory, then renamed into place (a killed run leaves no half cache); the directory is made,
  # and a path without '.npz' keeps its name. `path` may be local or a URL.
  writers.atomic_write_bytes(os.fspath(path), writers.npz_bytes(**arrays))


def load_classifier(path: str) -> tuple[dict, dict]:
  """Reads what `save_classifier` wrote: (params nested dict of np arrays, meta dict)."""
  from distill import writers
  with writers.read_npz(os.fspath(path)) as data:
    meta = json.loads(str(data[_META_KEY]))
    flat = {key: np.asarray(data[key]) for key in data.files if key != _META_KEY}
  params = traverse_util.unflatten_dict(flat, sep="/")
  return params, meta


# The config fields (config.eval) that choose the classifier, and the `train_classifier` argument each sets.
CONFIG_FIELDS = {"classifier_steps": "steps", "classifier_widths": "widths", "classifier_features": "features",
                 "classifier_batch_size": "batch_size"}


def settings(eval_config) -> dict:
  """`train_classifier`'s keyword arguments from a config's eval section (the fields it has of CONFIG_FIELDS)."""
  out = {arg: eval_config[field] for field, arg in CONFIG_FIELDS.items() if field in eval_config}
  if "widths" in out:
    out["widths"] = tuple(int(w) for w in out["widths"])
  return out


def classifier_for_run(config, workdir: str, train_source=None) -> tuple[dict, dict]:
  """The feature classifier of the run's data set, trained once with the config's settings (`settings`) and
  cached in WORKDIR/classifier/<data.name>.npz with its metadata: test_accuracy (held-out: the data set's test
  split), the sizes, the settings, train_seconds. Prints the held-out accuracy when it trains. A cached file is
  used as it is (a note is printed when it was trained with other settings).

  train_source: the run's training source (made from config.data when None)."""
  from etils import epath

  from distill import data as data_lib
  c = config
  path = os.path.join(workdir, "classifier", f"{c.data.name}.npz")
  chosen = settings(c.eval)
  if epath.Path(path).exists():
    params, meta = load_classifier(path)
    recorded = {k: meta[k] for k in chosen if k in meta}
    wanted = {k: (list(v) if isinstance(v, tuple) else v) for k, v in chosen.items() if k in recorded}
    if recorded != wanted:
      print(f"[classifier] {path} was trained with {recorded}, not the config's {wanted}; using it as it is "
            f"(delete it to retrain)")
    return params, meta
  train_source = train_source if train_source is not None else data_lib.make_source(c.data, "train")
  test_source = data_lib.make_source(c.data, "test")
  tr = train_source.get_batch(np.arange(len(train_source)))
  te = test_source.get_batch(np.arange(len(test_source)))
  import time
  start = time.time()
  params, acc = train_classifier(tr["image"], tr["label"], te["image"], te["label"], num_classes=c.data.num_classes,
                                 seed=c.seed, **chosen)
  meta = {"test_accuracy": float(acc), "num_train": len(tr["label"]), "num_test": len(te["label"]),
          "data": c.data.name, "train_seconds": time.time() - start,
          **{k: (list(v) if isinstance(v, tuple) else v) for k, v in chosen.items()}}
  save_classifier(path, params, meta)  # atomically, creating the directory
  print(f"[classifier] {c.data.name}: held-out test accuracy {acc:.4f} ({meta['train_seconds']:.0f}s, "
        f"widths {tuple(meta.get('widths', ()))}, {meta.get('steps')} steps)")
  return params, meta
