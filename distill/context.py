"""What every stage shares: the run's context (config, workdir, data, the model family), batches, parameter
init, the CFG teacher's parameters and sampler, chunked sampling, sample grids and the feature classifier."""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from distill import data as data_lib
from distill import latent as latent_lib
from distill import conditions, contract, models, parallel, samplers, schedules, train, writers
from distill.evaluation import classifier as classifier_lib
from distill.evaluation import protocol

EMBEDDED = protocol.EMBEDDED


class Context:
  """What every stage shares: config, workdir, data and the model family.

  In a latent run (config.latent.enabled) the diffusion space is the autoencoder's: `image_shape` and
  `train_source` are the latents', `decode` makes pictures of samples, and `pixel_source` is the data itself
  (for the autoencoder, the classifier and the FID reference). Otherwise all of them are the pixels'.
  """

  def __init__(self, config, workdir: str, train_source=None, latent_space: latent_lib.LatentSpace | None = None):
    self.config = config
    self.workdir = workdir
    self._pixel_train = train_source
    self._latent_train = None
    self._latent = latent_space
    self._text_encoder = None
    self._contexts = {}  # prompt tokens (bytes) -> the text encoder's hidden states [L, D]
    self.logsnr_fn = schedules.get_logsnr_fn(config.model.schedule, config.model.logsnr_min, config.model.logsnr_max)
    self.pixel_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    self.null_label = config.data.num_classes
    self.is_main_process = jax.process_index() == 0
    self.cache = {}  # teacher parameters and x-functions shared by stages

  @property
  def is_latent(self) -> bool:
    return bool(self.config.get("latent") and self.config.latent.enabled)

  @property
  def inpaint(self) -> bool:
    """An inpainting run (config.inpaint.enabled): every model after the plain teacher takes SD Inpainting's
    (label, mask, masked image) condition (`distill.conditions`)."""
    return bool(self.config.get("inpaint") and self.config.inpaint.enabled)

  @property
  def text(self) -> bool:
    """A text-to-image run (config.text.enabled): models take text conditions {'label', 'context'}
    (`distill.conditions`), the context being the frozen text encoder's hidden states of each row's prompt."""
    return bool(self.config.get("text") and self.config.text.enabled)

  @property
  def text_encoder(self):
    """The frozen text encoder of a text run: text.encoder_dir, '' = WORKDIR/text_encoder."""
    if self._text_encoder is None:
      from distill import sd_import, text_encoder_io
      path = self.config.text.encoder_dir or self.stage_dir("text_encoder")
      if sd_import.is_sd_folder(path):  # a Stable Diffusion folder's CLIP text encoder (docs/stable_diffusion.md)
        self._text_encoder = sd_import.load_sd_text_encoder(path, data_config=self.config.data)
      else:
        self._text_encoder = text_encoder_io.load_text_encoder(path)
    return self._text_encoder

  @property
  def text_shape(self) -> tuple | None:
    """(L, D) of the hidden states a text run's U-Net cross-attends to; None in other runs."""
    if not self.text:
      return None
    return (int(self.text_encoder.tokenizer.max_length), int(self.text_encoder.hidden_size))

  def text_contexts(self, tokens) -> np.ndarray:
    """float32 [N, L, D]: the text encoder's hidden states of prompts `tokens` int32 [N, L], each distinct prompt
    encoded once per process."""
    tokens = np.asarray(tokens, np.int32)
    keys = [row.tobytes() for row in tokens]
    new = sorted({k for k in keys if k not in self._contexts})
    if new:
      rows = np.stack([np.frombuffer(k, np.int32) for k in new])
      states = np.asarray(self.text_encoder.hidden_states(rows), np.float32)
      self._contexts.update(zip(new, states))
    return np.stack([self._contexts[k] for k in keys])

  def prompts(self, split: str) -> np.ndarray:
    """int32 [N, L]: the tokens of the captions of the split's rows, in their order (the text encoder stage's
    captions_<split>.npz)."""
    key = ("prompts", split)
    if key not in self.cache:
      self.cache[key] = np.asarray(self.text_encoder.caption_tokens(split), np.int32)
    return self.cache[key]

  def sample_prompts(self, labels) -> np.ndarray:
    """int32 [N, L]: the prompts grids, class agreement and evaluation sample a text run at, for labels [N]: for
    the k-th row asking for class y, the caption of the k-th test image of class y (cycled)."""
    return self.prompts("test")[self._sample_rows(labels)]

  def sample_captions(self, labels) -> list[str]:
    """The caption strings of `sample_prompts(labels)`, row for row."""
    key = ("captions", "test")
    if key not in self.cache:
      self.cache[key] = list(self.text_encoder.captions("test"))
    return [self.cache[key][i] for i in self._sample_rows(labels)]

  def _sample_rows(self, labels) -> np.ndarray:
    """int [N]: the test rows whose captions `sample_prompts(labels)` takes."""
    labels = np.asarray(labels)
    if "test_labels" not in self.cache:
      n = len(self.prompts("test"))
      self.cache["test_labels"] = np.asarray(self.pixel_source("test").get_batch(np.arange(n))["label"])
    test_labels = self.cache["test_labels"]
    out = np.zeros(len(labels), np.int64)
    for y in np.unique(labels):
      rows = np.flatnonzero(labels == y)
      of_class = np.flatnonzero(test_labels == y)
      if not len(of_class):
        raise data_lib.DataError(f"the test split has no image of class {y} to caption")
      out[rows] = of_class[np.arange(len(rows)) % len(of_class)]
    return out

  def train_batches(self, batch_size: int, *, plain: bool = False):
    """`batch_fn` of the training data (`train_source`): in an inpainting run (unless `plain`) each batch's
    'label' is the inpainting condition of its images with random training masks (config.inpaint), drawn from
    (seed, step) alone so that a resumed run sees the same batches."""
    fn = batch_fn(self.diffusion_source(), batch_size, self.config.seed)
    if plain or not self.inpaint:
      return fn
    p, seed, proc = self.config.inpaint, self.config.seed, jax.process_index()

    def with_masks(step):
      batch = fn(step)
      x = np.asarray(batch["image"])
      masks = conditions.random_masks(np.random.default_rng([seed, 4099, step, proc]), len(x), x.shape[1], x.shape[2],
                                      min_frac=p.min_frac, max_frac=p.max_frac, p_full=p.p_full)
      return {**batch, "label": conditions.inpaint(x, batch["label"], masks)}
    return with_masks

  def data_conditions(self, batch_size: int):
    """For a data-free method (its trajectories start from noise): index -> this process's rows of the
    conditions of training batch `index` (`train_batches(batch_size)`'s 'label': a text run's captions' hidden
    states, an inpainting run's masks and masked images), or None in a class-conditional run, where the
    method draws class labels of its own. Numpy pytrees (`distill.conditions`), a pure function of the index."""
    if not (self.text or self.inpaint):
      return None
    batches = self.train_batches(batch_size)
    return lambda index: batches(index)["label"]

  def sample_condition(self, labels, prompts=None):
    """The condition grids, class agreement and evaluation sample at, for labels [N]: the labels themselves, or in
    an inpainting run the inpainting condition of the first N test images (cycled) with inpaint.eval_box
    generated and `labels` requested. A text run's prompts are `prompts` (tokens int [N, L]) when given, else
    `sample_prompts(labels)`. A condition already built (a dict) is returned as it is."""
    if isinstance(labels, dict):
      return labels
    cond = labels
    if self.text:
      prompts = self.sample_prompts(np.asarray(labels)) if prompts is None else prompts
      cond = {"label": jnp.asarray(labels, jnp.int32), "context": jnp.asarray(self.text_contexts(prompts))}
    if not self.inpaint:
      return cond
    n = len(labels)
    if self.is_latent:
      x, _ = self.latent.latents("test")
    else:
      test = self.pixel_source("test")
      x = test.get_batch(np.arange(min(n, len(test))))["image"]
    x = np.asarray(x)[np.arange(n) % min(n, len(x))].astype(np.float32)
    mask = np.broadcast_to(conditions.box_mask(x.shape[1], x.shape[2], self.config.inpaint.eval_box),
                           x.shape[:3] + (1,))
    return jax.tree.map(jnp.asarray, conditions.inpaint(x, cond if self.text else np.asarray(labels, np.int32), mask))

  @property
  def latent(self) -> latent_lib.LatentSpace | None:
    """The autoencoder's latent space of a latent run (read once from its stage, `autoencoder_dir`), else None."""
    if self.is_latent and self._latent is None:
      self._latent = latent_lib.open_space(autoencoder_dir(self))
    return self._latent

  @property
  def image_shape(self) -> tuple:
    """(H, W, C) of what the diffusion models see: the latents' in a latent run, else the images'."""
    return tuple(self.latent.latent_shape) if self.is_latent else self.pixel_shape

  def pixel_source(self, split: str = "train"):
    """The data set's images (whatever space the run diffuses in)."""
    if split != "train":
      return data_lib.make_source(self.config.data, split)
    if self._pixel_train is None:  # sampling from a checkpoint needs no data
      self._pixel_train = data_lib.make_source(self.config.data, "train")
    return self._pixel_train

  @property
  def train_source(self):
    """What the diffusion stages train on: the cached latents of the training split in a latent run, else its
    images; either way a source of {'image', 'label'} batches."""
    if not self.is_latent:
      return self.pixel_source("train")
    if self._latent_train is None:
      z, labels = self.latent.latents("train")
      self._latent_train = data_lib.ArraySource(z, labels, self.config.data.num_classes, int(z.shape[1]))
    return self._latent_train

  def diffusion_source(self):
    """`train_source` as the diffusion stages draw it: in a text run each row's label is its text condition
    {'label', 'context'} (the hidden states of its caption, `prompts('train')`)."""
    if not self.text:
      return self.train_source
    if "text_source" not in self.cache:
      tokens = self.prompts("train")
      unique, index = np.unique(tokens, axis=0, return_inverse=True)
      self.cache["text_source"] = TextSource(self.train_source, self.text_contexts(unique), index.reshape(-1))
    return self.cache["text_source"]

  def decode(self, x) -> np.ndarray:
    """Pictures [N, H, W, C] in [−1, 1] of samples x [N, ...] of the diffusion space (the identity in pixel space)."""
    if not self.is_latent:
      return np.asarray(x)
    return latent_lib.in_chunks(self.latent.decode, x, self.config.sample.batch_size)

  def stage_dir(self, name: str) -> str:
    return os.path.join(self.workdir, name)


class TextSource(data_lib.Source):
  """A source whose rows' labels are text conditions: {'image', 'label': {'label' int32 [B], 'context' float32
  [B, L, D]}}, the context of row i being table[index[i]] (the hidden states of its caption)."""

  def __init__(self, source, table: np.ndarray, index: np.ndarray):
    if len(index) != len(source):
      raise data_lib.DataError(f"{len(index)} captions for {len(source)} training examples: the text encoder "
                               "stage captioned another split")
    self.source, self.table, self.index = source, np.asarray(table, np.float32), np.asarray(index)
    self.image_shape, self.num_classes, self._length = source.image_shape, source.num_classes, len(source)

  def get_batch(self, indices: np.ndarray) -> dict:
    batch = self.source.get_batch(indices)
    return {**batch, "label": {"label": np.asarray(batch["label"], np.int32),
                               "context": self.table[self.index[np.asarray(indices, np.int64)]]}}


def batch_fn(source, batch_size: int, seed: int):
  """step -> this process's rows of global batch `step` (numpy [batch_size // process_count, ...]);
  train.run_stage splits them over the devices, so batch_size must divide over all of them."""
  if batch_size % jax.device_count():
    raise data_lib.DataError(f"batch size {batch_size} does not split over the {jax.device_count()} devices; "
                             f"use a multiple of {jax.device_count()}")
  batches = data_lib.Batches(source, batch_size, seed, jax.process_index(), jax.process_count())
  return batches.batch_at


def autoencoder_dir(ctx: Context) -> str:
  """The autoencoder stage a latent run diffuses in: latent.autoencoder_dir, '' = WORKDIR/autoencoder."""
  return ctx.config.latent.autoencoder_dir or ctx.stage_dir("autoencoder")


def sample_images(ctx: Context, fn, z, labels, w, prompts=None) -> np.ndarray:
  """Pictures of fn(z, condition, w)'s samples: sampled in chunks of sample.batch_size, then `Context.decode`d.
  z: [N, *image_shape]; labels, w: [N] (the condition is `Context.sample_condition(labels, prompts)`). Returns
  [N, H, W, C] in [−1, 1] (numpy)."""
  cond = ctx.sample_condition(labels, prompts)
  return ctx.decode(sample_in_chunks(fn, z, cond, w, ctx.config.sample.batch_size))


def teacher_dir(ctx: Context) -> str:
  """The stage directory of the teacher every method distils: distill.teacher_dir when set, else the ε → v
  fine-tuned WORKDIR/teacher_v once it has finished, else WORKDIR/teacher."""
  if ctx.config.distill.teacher_dir:
    return ctx.config.distill.teacher_dir
  if ctx.inpaint:  # an inpainting run distils the inpainting teacher
    return ctx.stage_dir("teacher_inpaint")
  fine_tuned = ctx.stage_dir("teacher_v")
  return fine_tuned if train.has_final(fine_tuned) else ctx.stage_dir("teacher")


def teacher_params(ctx: Context):
  """The CFG teacher's final parameters, read-only (`teacher_dir`); TrainingError (one line) when it is not a
  CFG teacher or predicts another parameterization than model.parameterization (the students')."""
  if "teacher" not in ctx.cache:
    stage_dir = teacher_dir(ctx)
    params, meta = train.load_final_params(stage_dir)
    if meta.get("kind") != "cfg_teacher":
      raise train.TrainingError(f"{stage_dir}: not a CFG teacher (kind={meta.get('kind')!r})")
    predicts, wanted = meta.get("parameterization", "v"), ctx.config.model.parameterization
    if predicts != wanted:
      hint = " (add 'teacher_v' to config.pipeline: ε → v fine-tuning)" if (predicts, wanted) == ("eps", "v") else ""
      raise train.TrainingError(f"{stage_dir} predicts {predicts!r} but model.parameterization is {wanted!r}{hint}")
    ctx.cache["teacher"] = params
  return ctx.cache["teacher"]


def teacher_model(ctx: Context, *, plain: bool = False):
  """The CFG teacher's U-Net (config.model; no w input); in an inpainting run (unless `plain`: the teacher it is
  made from) with SD Inpainting's extra input channels."""
  return models.unet_from_config(ctx.config.model, ctx.config.data, channels=ctx.image_shape[-1],
                                 inpaint=ctx.inpaint and not plain, text=ctx.text_shape)


def student_model(ctx: Context, *, w_embedding: bool = False, step_embedding: bool = False):
  """A student U-Net: the teacher's architecture with a w input and/or a step-count input, and dropout
  distill.dropout (0: students fine-tune without dropout, as in progressive distillation)."""
  c = ctx.config
  model_cfg = c.model.copy_and_resolve_references()
  model_cfg.dropout = c.distill.dropout
  return models.unet_from_config(model_cfg, c.data, w_embedding=w_embedding, step_embedding=step_embedding,
                                 channels=ctx.image_shape[-1], inpaint=ctx.inpaint, text=ctx.text_shape)


def x_fn_of(ctx: Context, model):
  """The x-function of `model` under the run's parameterization (one per model in the process)."""
  return models.x_function(model, ctx.config.model.parameterization)


def init_params(ctx: Context, model, start=None):
  """Fresh parameters of `model` (seed config.seed), or `start`'s where it has them (`models.merge_params`: a
  student starting from its teacher keeps only its new, zero-initialised embeddings from its own init)."""
  fresh = models.init_params(model, ctx.image_shape, ctx.config.seed)
  if start is None:
    return fresh
  try:
    return models.merge_params(fresh, start)
  except ValueError as e:
    raise train.TrainingError(str(e)) from e


def load_stage(ctx: Context, name: str, *, needed_by: str = ""):
  """(params, contract.StageMeta) of the finished stage WORKDIR/<name>; TrainingError (one line) when it has
  not finished or predates the contract."""
  stage_dir = ctx.stage_dir(name)
  if not train.has_final(stage_dir):
    why = f"{needed_by} needs" if needed_by else "needs"
    raise train.TrainingError(f"{why} the finished stage {stage_dir}; put its stage in config.pipeline first")
  params, meta = train.load_final_params(stage_dir)
  try:
    return params, contract.StageMeta.from_dict(meta, os.path.join(stage_dir, "final", "meta.json"))
  except contract.ContractError as e:
    raise train.TrainingError(str(e)) from e


def run_stage(ctx: Context, stage: train.Stage, meta: contract.StageMeta | None = None):
  """Trains `stage` under WORKDIR/<stage.name> with `meta` (default: stage.meta, a StageMeta's dict) as its
  final/meta.json record, resuming, or returning the finished result. Returns (params, StageMeta)."""
  if meta is not None:
    stage = dataclasses.replace(stage, meta=meta.to_dict())
  stage_dir = ctx.stage_dir(stage.name)
  params, saved = train.run_stage(stage, stage_dir, is_main_process=ctx.is_main_process)
  return params, contract.StageMeta.from_dict(saved, os.path.join(stage_dir, "final", "meta.json"))


def write_student_grid(ctx: Context, name: str, fn, w_values, seed: int = 1):
  """WORKDIR/<name>/samples.png of a student's sampler fn(z, labels, w): rows = w_values, columns = classes (the
  same noise down a column, so rows show the effect of w alone). Main process only."""
  if not ctx.is_main_process:
    return
  c = ctx.config
  k = min(c.data.num_classes, c.sample.max_grid_classes)
  ws = np.asarray(w_values, np.float32)
  noise = jax.random.normal(jax.random.PRNGKey(seed), (1, k) + ctx.image_shape)
  z = jnp.broadcast_to(noise, (len(ws), k) + ctx.image_shape).reshape((-1,) + ctx.image_shape)
  labels = jnp.tile(jnp.arange(k), len(ws))
  w = jnp.repeat(jnp.asarray(ws), k)
  x = sample_images(ctx, fn, z, labels, w)
  writers.save_image_grid(os.path.join(ctx.stage_dir(name), "samples.png"), x, ncols=k,
                          upscale=max(1, 128 // ctx.pixel_shape[0]), row_labels=[f"w = {v:g}" for v in ws],
                          col_labels=class_captions(c.data, k), title=name)


@functools.partial(jax.jit, static_argnames=("model", "parameterization", "logsnr_fn", "null_label", "clip",
                                             "sampler"))
def cfg_sample(params, z, labels, w, *, model, parameterization: str, logsnr_fn, num_steps, null_label: int,
               clip: bool, sampler: str = "ddim"):
  """CFG teacher samples: z [B,H,W,C], labels [B], w [B] → x [B,H,W,C] (2·num_steps evaluations).
  sampler: 'ddim' or 'ddpm' (ancestral, noise from a fixed key). num_steps is traced: one compilation
  serves every step count."""
  model_fn = models.x_prediction_fn(model, params, parameterization)
  den = samplers.guided_denoiser(model_fn, labels, w, null_label)
  if sampler == "ddpm":
    return samplers.ddpm_sample(den, z, logsnr_fn, num_steps, jax.random.PRNGKey(17), clip=clip).x
  return samplers.ddim_sample(den, z, logsnr_fn, num_steps, clip=clip).x


def cpu_workers() -> int:
  """Chunks one CPU device samples at once: XLA's CPU backend keeps about one core busy per execution (on 2
  cores one execution ran only 12 % faster than on one), so concurrent executions from threads use the others.
  The cores this process may use, at most 8; 1 off the CPU (an accelerator serialises executions anyway)."""
  if jax.default_backend() != "cpu":
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  return max(1, min(cores, 8))


def sample_in_chunks(fn, z, labels, w, chunk: int):
  """fn over rows in chunks of exactly `chunk` rows (the last one padded), so every call of a jitted
  sampler has one shape and compiles once. With several devices each chunk (rounded up to a multiple of
  the device count) is split over them (`parallel.batch_sharding`); on one CPU device up to `cpu_workers()`
  chunks run at once from threads. A chunk's rows are the same whatever
  runs beside it, so the result is too. z [B, ...], labels [B], w [B] → [B, ...] numpy."""
  sharding = None
  if jax.device_count() > 1 and jax.process_count() == 1:
    chunk = -(-chunk // jax.device_count()) * jax.device_count()
    sharding = parallel.batch_sharding(parallel.make_mesh())

  def run(i):
    pad = max(0, i + chunk - len(z))
    part = [conditions.rows(a, i, i + chunk, pad) for a in (z, labels, w)]
    if sharding is not None:
      part = jax.device_put(part, sharding)
    return np.asarray(fn(*part))[:chunk - pad]

  starts = list(range(0, len(z), chunk))  # labels may be any condition pytree (`distill.conditions`)
  workers = 1 if sharding is not None else min(cpu_workers(), len(starts))
  if workers == 1:
    return np.concatenate([run(i) for i in starts])
  import concurrent.futures
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # a first call may compile in each thread at once
    return np.concatenate(list(pool.map(run, starts)))


def write_cfg_grid(ctx: Context, fn, path: str, seed: int = 1):
  """Sample grid PNG: rows = classes, columns = guidance w (per_cell samples each; the same noise
  across w within a row, so columns show the effect of w alone)."""
  c = ctx.config
  k = min(c.data.num_classes, c.sample.max_grid_classes)
  ws = np.asarray(c.sample.w_values, np.float32)
  per = c.sample.per_cell
  noise = jax.random.normal(jax.random.PRNGKey(seed), (k, 1, per) + ctx.image_shape)
  z = jnp.broadcast_to(noise, (k, len(ws), per) + ctx.image_shape).reshape((-1,) + ctx.image_shape)
  labels = jnp.repeat(jnp.arange(k), len(ws) * per)
  w = jnp.tile(jnp.repeat(jnp.asarray(ws), per), k)
  x = sample_images(ctx, fn, z, labels, w)
  writers.save_image_grid(path, x, ncols=len(ws) * per, upscale=max(1, 128 // ctx.pixel_shape[0]),
                          row_labels=class_captions(c.data, k), col_labels=[f"w = {v:g}" for v in ws for _ in range(per)],
                          title="CFG teacher")
  return x


def class_captions(data_cfg, k: int) -> list[str]:
  """Captions of classes 0..k-1 for grids: the data set's class names where it has them, else the numbers."""
  names = data_lib.class_names(data_cfg.name)
  return [names[i] if i < len(names) else str(i) for i in range(k)]


def get_classifier(ctx: Context):
  """(params, meta) of the data set's feature classifier, trained once on its images with the config's settings
  (eval.classifier_*) and cached in WORKDIR/classifier; meta['test_accuracy'] is its held-out accuracy."""
  return classifier_lib.classifier_for_run(ctx.config, ctx.workdir, ctx.pixel_source("train"))


def teacher_class_agreement(ctx: Context, fn) -> dict:
  """Fraction of balanced class-conditional teacher samples the classifier assigns to their class."""
  c = ctx.config
  params, meta = get_classifier(ctx)
  k = c.data.num_classes
  labels = jnp.repeat(jnp.arange(k), c.eval.agreement_per_class)
  agreement = {}
  for w in c.eval.agreement_w:
    z = jax.random.normal(jax.random.PRNGKey(1000 + c.seed), (len(labels),) + ctx.image_shape)
    x = sample_images(ctx, fn, z, labels, jnp.full((len(labels),), w, jnp.float32))
    agreement[str(float(w))] = classifier_lib.class_agreement(params, x, np.asarray(labels), k)
  return {"agreement": agreement, "sampler": "ddim", "steps": c.eval.agreement_steps,
          "nfe": 2 * c.eval.agreement_steps, "samples": int(len(labels)),
          "classifier_test_accuracy": meta["test_accuracy"]}
