"""Config checks that name the field they reject: one line `config.FIELD=VALUE: what is allowed`, raised as
ConfigError (the entry point prints it and exits 2). Used by the framework's schema and every method's own."""
from __future__ import annotations

import math


class ConfigError(ValueError):
  """A config value that is not allowed; the message is one line naming field, value and what is allowed."""


def fail(field, value, allowed):
  raise ConfigError(f"config.{field}={value!r}: {allowed}")


def positive_int(c, field):
  v = get(c, field)
  if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
    fail(field, v, "must be a positive integer")


def number(c, field, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
  v = get(c, field)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    fail(field, v, "must be a finite number")
  if (v < lo or (lo_open and v == lo)) or (v > hi or (hi_open and v == hi)):
    lb, hb = ("(" if lo_open else "["), (")" if hi_open else "]")
    fail(field, v, f"must lie in {lb}{lo}, {hi}{hb}")


def choice(c, field, allowed):
  v = get(c, field)
  if v not in allowed:
    fail(field, v, f"allowed: {', '.join(map(repr, allowed))}")


def get(c, field):
  node = c
  for part in field.split("."):
    if part not in node:
      raise ConfigError(f"config.{field} is missing")
    node = node[part]
  return node


def guidance_values(field: str, values) -> None:
  """Each entry a finite number >= 0 (a guidance strength)."""
  for w in values:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
      fail(field, w, "guidance strengths must be finite numbers >= 0")


def boolean(c, field) -> None:
  v = get(c, field)
  if not isinstance(v, bool):
    fail(field, v, "must be True or False")


def check_unet_size(c, size: int, what: str) -> None:
  """ConfigError unless model.ch_mult's levels halve `size` (the side of what the U-Net sees, named `what`)
  evenly and model.attn_resolutions are among its resolutions; for Stable Diffusion's U-Net (model.kind='sd_unet'),
  that model.sd.block_out_channels' levels halve it evenly."""
  if c.model.get("kind", "unet") == "sd_unet":
    levels = len(tuple(c.model.sd.block_out_channels))
    if size % 2 ** (levels - 1):
      fail("model.sd.block_out_channels", tuple(c.model.sd.block_out_channels), f"{levels} levels halve the "
           f"resolution {levels - 1} times; {what}={size} must divide by {2 ** (levels - 1)}")
    return
  mult = tuple(c.model.ch_mult)
  down = 2 ** (len(mult) - 1)
  if size % down:
    fail("model.ch_mult", mult, f"{len(mult)} levels halve the resolution {len(mult) - 1} times; "
          f"{what}={size} must divide by {down}")
  resolutions = [size // 2**i for i in range(len(mult))]
  for r in c.model.attn_resolutions:
    if r not in resolutions:
      fail("model.attn_resolutions", tuple(c.model.attn_resolutions), f"resolutions in this U-Net are {resolutions}")
