"""configs/sd_laion.py (App. C.2's text-guided runs): the paper's settings per resolution, the SD U-Net it describes,
validation, the proposed fields applied only where they exist, and its catalogue entries' Cloud TPU command."""
import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

from distill import configuration, models
from distill.models import sd_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import experiments  # noqa: E402 — launch/experiments.py


def module():
  spec = importlib.util.spec_from_file_location("sd_laion_config", os.path.join(ROOT, "configs", "sd_laion.py"))
  m = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(m)
  return m


def filled(arg=None):
  """The config with the two user paths set (what the catalogue entries pass)."""
  c = module().get_config(arg)
  c.autoencoder.weights, c.data.path = "/models/sd", "/data/laion"
  return c


@pytest.mark.parametrize("arg, size, batch", [(None, 512, 512), ("512", 512, 512), ("256", 256, 1024)])
def test_app_c2_settings(arg, size, batch):
  c = module().get_config(arg)
  d = c.distill
  assert (c.data.name, c.data.image_size, c.data.num_classes, c.latent.enabled) == ("image_text", size, 1, True)
  assert d.batch_size == batch and (d.w_min, d.w_max) == (2.0, 14.0)
  assert d.stage_one_weighting == "constant" and d.weighting == "truncated_snr"
  assert 2000 <= d.stage_one_steps - d.stage_one_warmup <= 5000 and 100 <= d.stage_one_warmup <= 1000
  assert 2000 <= d.round_steps - d.round_warmup <= 5000 and 10_000 <= d.final_round_steps - d.round_warmup <= 50_000
  assert tuple(d.final_rounds) == (4, 2, 1) and (d.start_steps, d.end_steps) == (512, 1)
  assert c.sample.num_steps == 512  # the 512-step DDIM teacher
  assert c.teacher.parameterization == "eps" and c.model.parameterization == "v"  # ε → v fine-tune first
  assert c.pipeline.index("teacher_v") < c.pipeline.index("stage_one")
  assert (c.model.kind, c.model.schedule, c.model.sd.dtype) == ("sd_unet", "scaled_linear_beta", "bfloat16")
  assert c.mesh.fsdp > 1 and c.sample.clip is False


def test_the_unet_is_sd1s():
  c = module().get_config()
  unet = models.sd_unet_from_config(c.model, in_channels=4, out_channels=4, context_dim=768)
  want = sd_unet.SDUNet(**sd_unet.SD1)
  for field in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "use_linear_projection", "norm_num_groups", "cross_attention_dim"):
    assert getattr(unet, field) == getattr(want, field), field
  assert unet.per_level(unet.num_attention_heads) == want.per_level(want.num_attention_heads)


def test_variants_combine_and_unknown_ones_are_refused():
  c = module().get_config("256,quick")
  assert c.data.image_size == 64 and c.distill.batch_size == 8 and c.mesh.fsdp == 1
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    module().get_config("huge")


def test_validates():
  """Every variant validates once the SD folder is named; without it the one line names the field."""
  for arg in (None, "256", "512,quick"):
    configuration.validate(filled(arg))
  with pytest.raises(configuration.ConfigError, match=r"(autoencoder|model\.sd)\.weights=None"):
    configuration.validate(module().get_config())  # the SD folder is required (model.sd.weights follows it)


def test_the_sd_fields_follow_the_sd_folder():
  c = module().get_config()
  c.autoencoder.weights = "/models/sd"
  assert (c.model.sd.weights, c.model.sd.remat, c.text.enabled, c.text.encoder_dir) == ("/models/sd", True, True,
                                                                                       "/models/sd")


def test_catalogue_entries_and_the_tpu_dry_run():
  for name, size in (("sd-laion-512", 512), ("sd-laion-256", 256)):
    flags = experiments.main_flags(name, "gs://bucket/runs")
    assert flags[0] == f"--config=configs/sd_laion.py:{size}" and flags[1] == f"--workdir=gs://bucket/runs/{name}"
    assert any(f.startswith("--config.autoencoder.weights=") for f in flags)
    assert any(f.startswith("--config.data.path=") for f in flags)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu.py"), "up", "--dry-run", "--name=distill-sd",
                         "--zone=us-central2-b", "--accelerator=v4-64", "--experiment=sd-laion-512",
                         "--root=gs://bucket/runs"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                        env={**os.environ, "PATH": "/nonexistent"})  # a dry run runs nothing (gcloud absent)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create distill-sd") and "--accelerator-type=v4-64" in lines[0]
  remote = shlex.split(lines[-1])[-1]
  run = shlex.split(remote.split("nohup ", 1)[1].split(" >>")[0])
  assert run[:3] == ["python3", "-m", "distill.main"]
  assert run[3:-1] == experiments.main_flags("sd-laion-512", "gs://bucket/runs")
