"""Flax networks, and the glue that turns one into an x̂-predictor for the samplers."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distill import diffusion
from distill.models.unet import UNet, example_condition, param_count


def sd_unet_from_config(model_cfg, *, in_channels: int, out_channels: int, context_dim: int):
  """Stable Diffusion's U-Net as config.model.sd describes it (cross-attending to context_dim features)."""
  from distill.models.sd_unet import SDUNet
  sd = model_cfg.sd
  return SDUNet(
      in_channels=int(in_channels), out_channels=int(out_channels), block_out_channels=tuple(sd.block_out_channels),
      down_block_types=tuple(sd.down_block_types), up_block_types=tuple(sd.up_block_types),
      layers_per_block=int(sd.layers_per_block), num_attention_heads=sd.num_attention_heads,
      cross_attention_dim=int(context_dim), use_linear_projection=bool(sd.use_linear_projection),
      transformer_layers_per_block=sd.transformer_layers_per_block, norm_num_groups=int(sd.norm_num_groups),
      dtype=jnp.bfloat16 if sd.dtype == "bfloat16" else jnp.float32, remat=bool(sd.get("remat", False)))


def unet_from_config(model_cfg, data_cfg, *, w_embedding: bool = False, step_embedding: bool = False,
                     channels: int | None = None, inpaint: bool = False, text: tuple | None = None):
  """The U-Net a config describes (config.model, config.data). channels: those of what it diffuses (a latent
  run's latent channels; default data.channels). inpaint: SD Inpainting's input layout (mask + masked image).
  text: (L, D) of the text encoder's hidden states, for model.kind='sd_unet' (a `TextUNet`)."""
  c = data_cfg.channels if channels is None else int(channels)
  if model_cfg.get("kind", "unet") == "sd_unet":
    from distill.models.text_unet import TextUNet
    if text is None:
      raise ValueError("model.kind='sd_unet' is text-conditioned: it needs the text encoder's (length, width)")
    unet = sd_unet_from_config(model_cfg, in_channels=c + (c + 1 if inpaint else 0),
                               out_channels=diffusion.output_channels(model_cfg.parameterization, c),
                               context_dim=int(text[1]))
    return TextUNet(unet=unet, num_classes=data_cfg.num_classes, context_length=int(text[0]),
                    context_dim=int(text[1]), schedule=model_cfg.schedule, logsnr_min=float(model_cfg.logsnr_min),
                    logsnr_max=float(model_cfg.logsnr_max), w_embedding=w_embedding, step_embedding=step_embedding,
                    cond_channels=c + 1 if inpaint else 0)
  return UNet(
      num_classes=data_cfg.num_classes, out_channels=diffusion.output_channels(model_cfg.parameterization, c),
      ch=model_cfg.ch, ch_mult=tuple(model_cfg.ch_mult), num_res_blocks=model_cfg.num_res_blocks,
      attn_resolutions=tuple(model_cfg.attn_resolutions), head_dim=model_cfg.head_dim,
      dropout=model_cfg.dropout, emb_ch=model_cfg.emb_ch or None, num_groups=model_cfg.num_groups,
      resample_with_resblock=model_cfg.resample_with_resblock,
      w_embedding=w_embedding, step_embedding=step_embedding, cond_channels=c + 1 if inpaint else 0)


def x_prediction_fn(model: UNet, params, parameterization: str):
  """`x_function` with its parameters bound, in the samplers' ModelFn form:
  model_fn(z [B,H,W,C], logsnr [B], labels [B], w [B] | None) -> x̂ [B,H,W,C], in eval mode."""
  x_fn = x_function(model, parameterization)
  return lambda z, logsnr, labels, w=None: x_fn(params, z, logsnr, labels, w)


__all__ = ["UNet", "example_condition", "extend_input_channels", "init_params", "param_count", "unet_from_config", "x_function", "x_prediction_fn"]


@functools.lru_cache(maxsize=64)
def x_function(model: UNet, parameterization: str):
  """The x-function of a U-Net, the convention every distillation loss uses (`distill.losses`):

  x_fn(params, z [B,H,W,C], logsnr [B], labels [B], w [B] | None, *, train=False, rng=None, steps=[B] | None)
      -> x̂ [B,H,W,C].
  w reaches the network only if it has a w-embedding, steps (an SFD-v student's step count) only if it has a
  step embedding; `rng` feeds dropout when training. One function per (model, parameterization) in the process:
  jitted functions take it as a static argument, so equal models reuse their compilations.
  """
  def x_fn(params, z, logsnr, labels, w, *, train: bool = False, rng=None, steps=None):
    out = model.apply({"params": params}, z, logsnr, labels, w if model.w_embedding else None,
                      steps if model.step_embedding else None, train=train,
                      rngs={"dropout": rng} if (train and rng is not None) else {})
    return diffusion.x_from_output(out, z, logsnr, parameterization)
  return x_fn


@functools.lru_cache(maxsize=8)
def init_params(model: UNet, image_shape: tuple, seed: int):
  """Fresh parameters of `model` (with its w and step inputs when it has those embeddings); cached, as stages
  share inits. image_shape: (H, W, C)."""
  b = 1
  key = jax.random.PRNGKey(seed)
  w = jnp.zeros((b,)) if model.w_embedding else None
  steps = jnp.ones((b,), jnp.int32) if model.step_embedding else None
  init = jax.jit(lambda key: model.init(key, jnp.zeros((b,) + tuple(image_shape)), jnp.zeros((b,)),
                                        example_condition(model, image_shape, b), w, steps, train=False))
  # Init runs once: XLA's lowest backend optimisation compiles it ~4x faster on CPU (5 s, not 20 s, for digits).
  return init.lower(key).compile({"xla_backend_optimization_level": 0})(key)["params"]


def extend_input_channels(fresh, loaded):
  """An inpainting network's parameters (`fresh`, its own init) from a plain network's (`loaded`), as SD
  Inpainting was made from SD: every shared entry copied, and conv_in's kernel [3, 3, C + extra, ch] takes the
  plain kernel on its first C input channels and zeros on the extra ones (mask, masked image), so the network
  starts out computing exactly what the plain one computes. ValueError when anything else differs."""
  if "conv_in" not in fresh and "unet" in fresh:  # a TextUNet: SD's U-Net under 'unet'
    rest = merge_params({k: v for k, v in fresh.items() if k != "unet"}, loaded)
    return {**rest, "unet": extend_input_channels(fresh["unet"], loaded["unet"])}
  kernel, plain = fresh["conv_in"]["kernel"], jnp.asarray(loaded["conv_in"]["kernel"])
  if kernel.shape[:2] + kernel.shape[3:] != plain.shape[:2] + plain.shape[3:] or kernel.shape[2] < plain.shape[2]:
    raise ValueError(f"conv_in kernel of shape {plain.shape} does not extend to {kernel.shape}")
  extended = jnp.zeros_like(kernel).at[:, :, :plain.shape[2], :].set(plain)
  loaded = {**loaded, "conv_in": {**loaded["conv_in"], "kernel": extended}}
  return merge_params(fresh, loaded)


def merge_params(fresh, loaded):
  """`fresh` with every entry that `loaded` also has replaced by loaded's: a student initialised from its
  teacher keeps only its new parameters (a zero-initialised w or step embedding) from its own init, so it
  starts out computing what the teacher computes. ValueError when a shared entry's shape differs."""
  if isinstance(fresh, dict):
    return {k: merge_params(v, loaded[k]) if k in loaded else v for k, v in fresh.items()}
  if fresh.shape != loaded.shape:
    raise ValueError(f"teacher parameter of shape {loaded.shape} does not fit student shape {fresh.shape}")
  return jnp.asarray(loaded)


def abstract_params(model: UNet, image_shape: tuple):
  """The shapes and dtypes of `init_params(model, image_shape, ·)` (jax.ShapeDtypeStruct leaves), without
  computing anything: what a checkpoint must hold to be loaded into `model`."""
  w = jnp.zeros((1,)) if model.w_embedding else None
  steps = jnp.ones((1,), jnp.int32) if model.step_embedding else None
  init = lambda key: model.init(key, jnp.zeros((1,) + tuple(image_shape)), jnp.zeros((1,)),  # noqa: E731
                                example_condition(model, image_shape), w, steps, train=False)["params"]
  return jax.eval_shape(init, jax.random.PRNGKey(0))


def param_shapes(tree) -> dict[str, tuple]:
  """{'a/b/kernel': shape} of every leaf with a shape (arrays, ShapeDtypeStructs, Orbax's array metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
          for path, leaf in leaves if hasattr(leaf, "shape")}


def params_mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str | None:
  """The first parameter of `expected` ({path: shape}, the model's) that `found` (a checkpoint's) lacks or holds
  at another shape, in words; None when every one fits. The model may sit under a prefix of the checkpoint (a
  consistency student's 'online/…' beside its target network), and entries only `found` has (a student's w or
  step embedding over its teacher's architecture) are allowed."""
  first = next(iter(expected), None)
  if first is None:
    return None
  prefixes = [p[:len(p) - len(first)] for p in found if p == first or p.endswith("/" + first)] or [""]

  def mismatch(prefix):
    for path, shape in expected.items():
      if prefix + path not in found:
        return f"parameter {prefix + path} {shape} of the model is not in the checkpoint"
      if found[prefix + path] != shape:
        return f"parameter {prefix + path} has shape {found[prefix + path]} in the checkpoint, {shape} in the model"
    return None

  problems = [mismatch(prefix) for prefix in sorted(prefixes)]
  return None if None in problems else problems[0]
