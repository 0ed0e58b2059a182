"""A Stable Diffusion diffusers folder as the framework's text encoder and CFG teacher (distill/sd_import.py).

A tiny pipeline folder is written from the reference implementations (diffusers 0.39's FlaxUNet2DConditionModel,
transformers 4.57's FlaxCLIPTextModel, both with noise in every parameter), a CLIP tokenizer's files and a scheduler
config. Checked: the text encoder's hidden states equal the reference's on tokenized prompts; the teacher's U-Net
tree equals the reference's and its null context is the empty prompt's hidden states; the TextUNet built from the
config (model.kind='sd_unet') computes the reference U-Net's output at the mapped timestep T·t(λ) − 1 on the same
hidden states (conditional rows) and on the empty prompt's (null rows); one stage-one step (Alg. 1) from the
imported teacher has a finite, nonzero gradient; and each wrong folder is one ValueError line."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import sd_reference
from distill import configuration, models, weights
from distill.models import clip_keys, sd_unet, sd_unet_keys
from distill.testing import assert_trees_equal

pytest.importorskip("tokenizers", reason="the `tokenizers` package is not installed")
from test_clip_tokenizer import VOCAB, write_files  # noqa: E402 — after the skip

from distill import sd_import  # noqa: E402

WIDTH = 32  # the text encoder's hidden size = the U-Net's cross_attention_dim
UNET = {"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [32, 64], "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": 2, "cross_attention_dim": WIDTH, "use_linear_projection": False,
        "flip_sin_to_cos": True, "freq_shift": 0, "norm_num_groups": 32, "norm_eps": 1e-5}
TEXT = {"vocab_size": len(VOCAB), "hidden_size": WIDTH, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "eos_token_id": VOCAB["<|endoftext|>"], "bos_token_id": VOCAB["<|startoftext|>"], "pad_token_id": 1}
SCHEDULER = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
             "num_train_timesteps": 1000, "prediction_type": "epsilon", "clip_sample": False}
PROMPTS = ["a photo of a cat", "cats of a photo", "", "a cat", "photo"]


def reference_models():
  """(diffusers' U-Net, transformers' text model), each with noise in every parameter, or a skip."""
  diffusers, transformers = sd_reference.diffusers(), sd_reference.transformers()
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in UNET.items() if not k.startswith("_")
            and k not in ("norm_num_groups", "norm_eps")}
  unet = diffusers.FlaxUNet2DConditionModel(**fields)
  rng = np.random.default_rng(2)
  noisy = lambda tree, s: jax.tree.map(  # noqa: E731
      lambda x: (np.asarray(x) + s * rng.standard_normal(np.shape(x))).astype(np.float32), jax.device_get(tree))
  unet_params = noisy(jax.jit(unet.init_weights)(jax.random.PRNGKey(0)), 0.05)
  text = transformers.FlaxCLIPTextModel(transformers.CLIPTextConfig(**TEXT), seed=0)
  return unet, unet_params, text, noisy(text.params, 0.3)


def write_folder(root, unet_params, text_params, scheduler=None, text_state_extra=None):
  """A diffusers pipeline folder of the given parameters (torch layouts, safetensors)."""
  root.mkdir(parents=True, exist_ok=True)
  (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
  (root / "unet").mkdir(exist_ok=True)
  (root / "unet" / "config.json").write_text(json.dumps(UNET))
  state = sd_unet_keys.unet_state_dict(unet_params, sd_unet.sd_unet_from_diffusers_config(UNET), "diffusers")
  weights.write_safetensors(root / "unet" / "diffusion_pytorch_model.safetensors", state)
  (root / "text_encoder").mkdir(exist_ok=True)
  (root / "text_encoder" / "config.json").write_text(json.dumps({**TEXT, "architectures": ["CLIPTextModel"]}))
  text_state = {**clip_keys.text_encoder_state_dict(text_params), **(text_state_extra or {})}
  weights.write_safetensors(root / "text_encoder" / "model.safetensors", text_state, metadata={"format": "pt"})
  write_files(root / "tokenizer")
  (root / "scheduler").mkdir(exist_ok=True)
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler or SCHEDULER))
  return root


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  unet, unet_params, text, text_params = reference_models()
  folder = write_folder(tmp_path_factory.mktemp("sd") / "pipe", unet_params, text_params)
  return folder, unet, unet_params, text, text_params


def sd_config(parameterization="eps"):
  """The config sections a TextUNet of the tiny folder is built from (model.kind='sd_unet')."""
  c = configuration.base_config()
  c.data.channels, c.data.num_classes, c.data.image_size = 4, 1, 8
  m = c.model
  m.kind, m.parameterization, m.schedule = "sd_unet", parameterization, "scaled_linear_beta"
  m.sd.block_out_channels, m.sd.layers_per_block, m.sd.num_attention_heads = (32, 64), 1, 2
  m.sd.down_block_types, m.sd.up_block_types = tuple(UNET["down_block_types"]), tuple(UNET["up_block_types"])
  m.sd.use_linear_projection, m.sd.transformer_layers_per_block, m.sd.norm_num_groups = False, 1, 32
  return c


def text_unet(config, **kwargs):
  return models.unet_from_config(config.model, config.data, channels=4, text=(77, WIDTH), **kwargs)


def with_flax_numerics(model):
  """The same TextUNet with diffusers' Flax port's two numerical choices (sd_unet.FLAX_REFERENCE)."""
  return model.clone(unet=model.unet.clone(**sd_unet.FLAX_REFERENCE))


def test_is_sd_folder(sd, tmp_path):
  folder = sd[0]
  assert sd_import.is_sd_folder(folder) and not sd_import.is_sd_folder(folder / "unet")
  assert not sd_import.is_sd_folder(tmp_path / "nothing") and not sd_import.is_sd_folder(tmp_path)
  (tmp_path / "unet").mkdir()
  (tmp_path / "text_encoder").mkdir()
  assert sd_import.is_sd_folder(tmp_path)  # no model_index.json, but both model folders


def test_text_encoder_equals_transformers(sd):
  folder, _, _, text, text_params = sd
  encoder = sd_import.load_sd_text_encoder(folder, batch_size=2)
  tokens = encoder.tokenizer.encode(PROMPTS)
  assert tokens.shape == (5, 77) and tokens.dtype == np.int32 and encoder.hidden_size == WIDTH
  assert np.array_equal(encoder.tokenizer.empty(), tokens[2]) and encoder.tokenizer.max_length == 77
  ours = encoder.hidden_states(tokens)  # batches of 2: 2 + 2 + 1 (padded)
  theirs = np.asarray(text(tokens, params=text_params).last_hidden_state)
  assert ours.shape == (5, 77, WIDTH) and float(np.max(np.abs(theirs))) > 0.5
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="data.name='image_text'"):
    encoder.caption_tokens("train")
  with pytest.raises(ValueError, match=r"integers \[N, 77\]"):
    encoder.hidden_states(tokens[:, :10])


def test_caption_tokens_of_an_image_text_source(sd, tmp_path):
  from PIL import Image
  for i, caption in enumerate(["a cat", "a photo of a cat", "cats"] * 4):
    Image.fromarray(np.full((10, 12, 3), 20 * i, np.uint8)).save(tmp_path / f"{i:02d}.png")
    (tmp_path / f"{i:02d}.txt").write_text(caption)
  c = sd_config()
  c.data.name, c.data.path, c.data.channels = "image_text", str(tmp_path), 3
  encoder = sd_import.load_sd_text_encoder(sd[0], data_config=c.data)
  from distill import data
  for split in ("train", "test"):
    source = data.make_source(c.data, split)
    tokens = encoder.caption_tokens(split)
    assert np.array_equal(tokens, encoder.tokenizer.encode(source.captions(np.arange(len(source)))))
  assert len(encoder.caption_tokens("train")) == 10 and len(encoder.caption_tokens("test")) == 2


def test_teacher_equals_the_reference_unet(sd):
  folder, unet, unet_params, text, text_params = sd
  config = sd_config()
  model = text_unet(config)
  params, extra = sd_import.teacher_from_sd(folder, model)
  assert extra["parameterization"] == "eps" and extra["schedule"] == "scaled_linear_beta"
  assert extra["unet_file"].endswith("unet/diffusion_pytorch_model.safetensors")
  assert_trees_equal(params["unet"], jax.device_get(unet_params))
  encoder = sd_import.load_sd_text_encoder(folder)
  empty = np.asarray(text(encoder.tokenizer.encode([""]), params=text_params).last_hidden_state)[0]
  np.testing.assert_allclose(params["null_context"], empty, rtol=1e-5, atol=1e-5)

  rng = np.random.default_rng(3)
  z = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
  logsnr = np.array([-4.0, 0.5, 6.0], np.float32)
  context = encoder.hidden_states(encoder.tokenizer.encode(PROMPTS[:3]))
  labels = np.array([0, 1, 0], np.int32)  # the middle row unconditional (label = num_classes = 1)
  flax_model = with_flax_numerics(model)
  out = flax_model.apply({"params": params}, z, logsnr, {"label": labels, "context": context})
  timesteps = np.asarray(model.timesteps(jnp.asarray(logsnr)))
  assert 0 < timesteps[2] < timesteps[1] < timesteps[0] < 999  # high log-SNR: an early step
  seen = np.where(labels[:, None, None] == 1, empty[None], context)
  ref = unet.apply({"params": unet_params}, jnp.asarray(z.transpose(0, 3, 1, 2)), jnp.asarray(timesteps),
                   jnp.asarray(seen)).sample
  ref = np.asarray(ref).transpose(0, 2, 3, 1)
  assert float(np.max(np.abs(ref))) > 0.1
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # torch's numerics (what the config builds) differ by a little, not by a bug's worth
  torch_out = model.apply({"params": params}, z, logsnr, {"label": labels, "context": context})
  assert 0 < float(np.max(np.abs(torch_out - ref))) < 0.02 * float(np.max(np.abs(ref)))


@pytest.mark.slow  # 35 s on 2 CPU cores: compiling the student's gradient through the teacher's CFG call
def test_one_stage_one_step_from_the_imported_teacher(sd):
  """Alg. 1's loss with the imported teacher (frozen, CFG mix of one 2B-row call) and a w-conditioned student
  initialised from it: the gradient is finite and nonzero, and reaches the U-Net and the w embedding."""
  from distill import schedules
  from distill.methods.guided.stage_one import stage_one_loss
  folder = sd[0]
  config = sd_config(parameterization="eps")
  teacher = text_unet(config)
  teacher_params, _ = sd_import.teacher_from_sd(folder, teacher)
  student = text_unet(config, w_embedding=True)
  params = models.merge_params(models.init_params(student, (8, 8, 4), 0), teacher_params)
  encoder = sd_import.load_sd_text_encoder(folder)
  logsnr_fn = schedules.get_logsnr_fn("scaled_linear_beta")
  loss_fn = stage_one_loss(models.x_function(student, "eps"), models.x_function(teacher, "eps"),
                           logsnr_fn=logsnr_fn, null_label=1, w_min=2.0, w_max=14.0, weighting="constant")
  rng = np.random.default_rng(4)
  batch = {"image": rng.uniform(-1, 1, (2, 8, 8, 4)).astype(np.float32),
           "label": {"label": np.zeros(2, np.int32),
                     "context": encoder.hidden_states(encoder.tokenizer.encode(PROMPTS[:2]))}}

  def loss(p):
    out = loss_fn(p, {"teacher": teacher_params}, batch, jax.random.PRNGKey(0))
    return out[0] if isinstance(out, tuple) else out

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  flat = traverse_util.flatten_dict(jax.device_get(grads), sep="/")
  assert np.isfinite(float(value)) and float(value) > 0
  assert all(np.all(np.isfinite(g)) for g in flat.values())
  norm = lambda prefix: sum(float(np.sum(np.square(g))) for k, g in flat.items() if k.startswith(prefix))  # noqa: E731
  assert norm("unet/") > 0 and norm("w_embed/") > 0


SCHEDULER_CASES = {
    "beta_end": ({**SCHEDULER, "beta_end": 0.02}, "beta_end=0.02, but model.schedule='scaled_linear_beta'"),
    "linear": ({**SCHEDULER, "beta_schedule": "linear"}, "beta_schedule='linear'"),
    "steps": ({**SCHEDULER, "num_train_timesteps": 500}, "num_train_timesteps=500"),
    "prediction": ({**SCHEDULER, "prediction_type": "sample"}, "prediction_type='sample'"),
}


@pytest.mark.parametrize("case", list(SCHEDULER_CASES))
def test_scheduler_config_is_checked(tmp_path, case):
  config, needle = SCHEDULER_CASES[case]
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError) as error:
    sd_import.scheduler_prediction(tmp_path)
  assert needle in str(error.value) and "\n" not in str(error.value)


def test_v_prediction_and_a_missing_scheduler(tmp_path):
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SCHEDULER,
                                                                          "prediction_type": "v_prediction"}))
  assert sd_import.scheduler_prediction(tmp_path) == "v"
  with pytest.raises(ValueError, match="scheduler_config.json: missing"):
    sd_import.scheduler_prediction(tmp_path / "elsewhere")


def test_wrong_folders_are_one_line(sd, tmp_path):
  folder, _, unet_params, _, text_params = sd

  def refused(needle, fn):
    with pytest.raises(ValueError) as error:
      fn()
    assert needle in str(error.value) and "\n" not in str(error.value), str(error.value)

  config = sd_config()
  config.model.sd.num_attention_heads = 4  # the folder's U-Net has 2 heads: no shape tells
  refused("num_attention_heads=(2, 2) but the config's has (4, 4) (set model.sd.num_attention_heads",
          lambda: sd_import.teacher_from_sd(folder, text_unet(config)))
  refused("hidden states of shape (77, 32); the model cross-attends to (77, 16)",
          lambda: sd_import.teacher_from_sd(folder, models.unet_from_config(
              sd_config().model, sd_config().data, channels=4, text=(77, 16))))
  refused("not a directory", lambda: sd_import.teacher_from_sd(tmp_path / "none", text_unet(sd_config())))
  refused("not a Stable Diffusion diffusers folder", lambda: sd_import.load_sd_text_encoder(tmp_path))
  # a text encoder with CLIPTextModelWithProjection's projection is refused, naming the key and why
  projected = write_folder(tmp_path / "projected", unet_params, text_params,
                           text_state_extra={"text_projection.weight": np.zeros((16, WIDTH), np.float32)})
  refused("'text_projection.weight' is CLIPTextModelWithProjection's projection",
          lambda: sd_import.load_sd_text_encoder(projected))


@pytest.mark.slow  # 60-90 s on 2 busy CPU cores: four compilations of a U-Net and its gradient
def test_remat_keeps_parameters_outputs_and_gradients():
  """SDUNet(remat=True) (gradient checkpointing of its blocks): the same tree, outputs and gradients."""
  plain = sd_unet.sd_unet_from_diffusers_config(UNET)
  remat = plain.clone(remat=True)
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t, context = np.array([3.0, 700.0], np.float32), rng.standard_normal((2, 5, WIDTH)).astype(np.float32)
  params = plain.init(jax.random.PRNGKey(0), x, t, context)["params"]
  shapes = jax.eval_shape(lambda k: remat.init(k, x, t, context)["params"], jax.random.PRNGKey(0))
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  np.testing.assert_allclose(jax.jit(remat.apply)({"params": params}, x, t, context),
                             jax.jit(plain.apply)({"params": params}, x, t, context), rtol=1e-6, atol=1e-6)
  def grad(m):
    return jax.jit(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, t, context) ** 2)))(params)
  ours, theirs = jax.tree.leaves(grad(remat)), jax.tree.leaves(grad(plain))
  scale = max(float(np.max(np.abs(b))) for b in theirs)
  # recomputation reorders float32 sums: equal up to rounding, relative to the largest gradient
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs)) < 1e-5 * scale


def test_the_teacher_stage_imports_the_folder(sd, tmp_path):
  """With model.sd.weights set, the 'teacher' stage writes the imported teacher as a finished CFG teacher (no
  training), which is not read again once finished; a teacher.parameterization the folder does not predict is one
  line."""
  from distill import context, train
  from distill.methods import teacher
  folder, _, unet_params, _, _ = sd
  c = sd_config("v")
  c.teacher.parameterization, c.model.sd.weights, c.pipeline = "eps", str(folder), ("teacher", "teacher_v")
  c.text.enabled, c.text.encoder_dir = True, str(folder)
  ctx = context.Context(c, str(tmp_path / "work"))
  assert isinstance(ctx.text_encoder, sd_import.SDTextEncoder) and ctx.text_shape == (77, WIDTH)
  teacher.run_teacher(ctx)
  params, meta = train.load_final_params(ctx.stage_dir("teacher"))
  assert meta["kind"] == "cfg_teacher" and meta["parameterization"] == "eps"
  np.testing.assert_array_equal(params["unet"]["conv_in"]["kernel"], unet_params["conv_in"]["kernel"])
  c.teacher.parameterization = "v"
  with pytest.raises(train.TrainingError, match="predicts 'eps' but teacher.parameterization is 'v'"):
    teacher.run_teacher(context.Context(c, str(tmp_path / "other")))
