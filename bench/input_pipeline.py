r"""Host input throughput of the grain pipeline against the train step's consumption, side by side in one run.

The input side reads a TFDS data set of the config's data (`imagenet_resized/64x64` for configs/imagenet64.py)
in array_record format, written by the script into a temporary directory (`distill.testing.write_tfds_array_record`:
the real ImageNet 64 cannot be downloaded here), through the pipeline training uses: `data.make_source` and
`data.Batches` (grain read-ahead, `data.num_workers` worker processes, `data.prefetch`). The images are PNGs
of the data's shape whose compressed size is near a photograph's (a smooth random field plus noise), since
decoding is most of the cost.

  images/s (input)     host batch × batches / seconds, after a first batch that starts the stream (and its
                       workers); median over repeats, measured before and after the train step (pooled)
  per core             the in-process reader with no read-ahead (`data.prefetch=0`): one thread, one core
  images/s (train)     `bench/train_throughput.py`'s measurement of the config's train step (`--kind`, batch
                       `--train_batch`) on this machine: what one host's devices consume here
  input / train        supply over consumption; > 1: the input pipeline keeps up

docs/projection.md scales the per-core rate to a TPU host's cores and compares it with the step rate per host
projected there. The figures there come from (also in bench/run_all.sh):
  python bench/input_pipeline.py --config=configs/imagenet64.py --config.model.ch=32 \
      --config.model.num_res_blocks=1 --config.model.emb_ch=128 --json=bench/results/input_imagenet64.json
Quick check (< 60 s on 2 idle cores):
  python bench/input_pipeline.py --quick
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as `python bench/input_pipeline.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from bench import common


def synthetic_images(n: int, shape, seed: int = 0) -> np.ndarray:
  """uint8 [n, H, W, C]: a bilinearly upsampled 8×8 random field plus ±8 of noise, so that PNG compresses them
  about as much as photographs (a photograph's 64×64 PNG is ~8–10 kB; pure noise would be 12 kB and decode
  differently)."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  h, w, c = shape
  out = np.empty((n, h, w, c), np.uint8)
  for i in range(n):
    coarse = rng.integers(0, 256, (8, 8, c), dtype=np.uint8)
    smooth = np.stack([np.asarray(Image.fromarray(coarse[..., k]).resize((w, h), Image.BILINEAR))
                       for k in range(c)], -1).astype(np.int16)
    out[i] = np.clip(smooth + rng.integers(-8, 9, (h, w, c)), 0, 255).astype(np.uint8)
  return out


def write_data(config, directory: str, num_examples: int, seed: int = 0) -> dict:
  """Writes `num_examples` synthetic examples of config.data's TFDS data set into `directory`; returns what
  was written (the TFDS name, bytes per example)."""
  from distill import data, testing
  if config.data.name not in data._TFDS:  # noqa: SLF001 — the name table is the data module's
    raise ValueError(f"data.name={config.data.name!r}: the input benchmark reads a TFDS data set "
                     f"({', '.join(data._TFDS)})")  # noqa: SLF001
  tfds_name, test_split, shape, num_classes = data._TFDS[config.data.name]  # noqa: SLF001
  images = synthetic_images(num_examples, shape, seed)
  labels = np.arange(num_examples) % num_classes
  version_dir = testing.write_tfds_array_record(tfds_name, directory, {"train": (images, labels),
                                                                       test_split: (images[:8], labels[:8])})
  size = sum(os.path.getsize(os.path.join(version_dir, f)) for f in os.listdir(version_dir) if "-train." in f)
  return {"tfds_name": tfds_name, "examples": num_examples, "bytes_per_example": size / num_examples}


def measure_input(config, data_dir: str, *, num_workers: int, prefetch: int, host_batch: int, batches: int,
                  repeats: int, seed: int = 0) -> dict:
  """images/s of `data.Batches` over the TFDS source in `data_dir` with this read-ahead: the stream is started
  by one batch, then `repeats` runs of `batches` consecutive batches are timed."""
  from distill import data
  cfg = config.data.copy_and_resolve_references()
  cfg.data_dir, cfg.num_workers, cfg.prefetch = data_dir, num_workers, prefetch
  source = data.make_source(cfg, "train")
  stream = data.Batches(source, host_batch, seed, drop_remainder=False)
  try:
    start = time.perf_counter()
    first = next(stream)
    startup = time.perf_counter() - start
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(batches):
        batch = next(stream)
      times.append(time.perf_counter() - start)
  finally:
    stream.close()
  assert batch["image"].shape == first["image"].shape == (host_batch,) + source.image_shape
  return {"num_workers": num_workers, "prefetch": prefetch, "host_batch": host_batch, "batches": batches,
          "startup_seconds": startup, "times": times,
          "rates": [host_batch * batches / t for t in times]}


def run(config, *, workers=(0, 2), prefetch: int = 2, host_batch: int = 256, batches: int = 8, repeats: int = 3,
        num_examples: int = 2048, train_batch: int = 8, kind: str = "round", train_steps: int = 2,
        train_repeats: int = 2, label: str = "") -> dict:
  """Input images/s for each setting (the synchronous one-core reader first), the train step's images/s, and
  their ratios. Input is measured before and after the train step, and the two passes pooled."""
  from bench import train_throughput
  settings = [(0, 0)] + [(w, prefetch) for w in workers]
  with tempfile.TemporaryDirectory() as directory:
    written = write_data(config, directory, num_examples)

    def measure_all():
      return [measure_input(config, directory, num_workers=w, prefetch=p, host_batch=host_batch, batches=batches,
                            repeats=repeats) for w, p in settings]

    before = measure_all()
    train_config = config.copy_and_resolve_references()
    train_config.teacher.batch_size = train_config.distill.batch_size = train_batch
    step = train_throughput.measure_step(train_config, train_throughput.step_spec(train_config, kind),
                                         steps=train_steps, repeats=train_repeats)
    after = measure_all()
  consumption = step["images_per_sec"]
  rows = []
  for b, a in zip(before, after):
    rate = common.median(b["rates"] + a["rates"])
    rows.append({"config": label, "setting": _setting_name(b["num_workers"], b["prefetch"]),
                 "num_workers": b["num_workers"], "prefetch": b["prefetch"], "host_batch": host_batch,
                 "images_per_sec": rate, "startup_seconds": max(b["startup_seconds"], a["startup_seconds"]),
                 "train_images_per_sec": consumption, "ratio": rate / consumption, "before": b, "after": a})
  per_core = rows[0]["images_per_sec"]
  return {"machine": common.machine(), "config": label, "data": written, "rows": rows,
          "per_core_images_per_sec": per_core,
          "train": {k: step[k] for k in ("kind", "batch", "params", "images_per_sec", "step_seconds", "flops_per_image",
                                         "compile_seconds", "devices")}}


def _setting_name(num_workers: int, prefetch: int) -> str:
  if num_workers:
    return f"{num_workers} worker process{'es' if num_workers > 1 else ''}, prefetch {prefetch}"
  return "in-process, no read-ahead (one core)" if prefetch == 0 else f"in-process, {prefetch} read-ahead threads"


COLUMNS = [("setting", "input pipeline", ""), ("host_batch", "host batch", "d"),
           ("images_per_sec", "input images/s", ".4g"), ("startup_seconds", "first batch s", ".2f"),
           ("train_images_per_sec", "train images/s", ".4g"), ("ratio", "input / train", ".4g")]


def print_report(report: dict):
  m, d, t = report["machine"], report["data"], report["train"]
  print(f"\n## input pipeline ({m['date']}, {m['device_count']} × {m['device_kind']}, {m['cpu_count']} CPUs, "
        f"jax {m['jax']})\n")
  print(f"data: {d['examples']} synthetic {d['tfds_name']} examples in array_record, "
        f"{d['bytes_per_example'] / 1e3:.1f} kB each; train: the {t['kind']} step of {report['config'] or 'the config'}"
        f" at batch {t['batch']} ({t['params']:,} parameters, {t['flops_per_image'] / 1e9:.3g} GFLOP/image)\n")
  common.print_table(report["rows"], COLUMNS)
  print(f"\nper core (one thread, no read-ahead): {report['per_core_images_per_sec']:.4g} images/s")


def main():
  from absl import app, flags
  from ml_collections import config_flags
  config_flag = config_flags.DEFINE_config_file("config", os.path.join(common.ROOT, "configs/imagenet64.py"),
                                                "Config file (with :variant) and --config.x=y overrides.")
  workers = flags.DEFINE_list("workers", ["0", "2"], "data.num_workers settings to measure (with --prefetch), "
                              "besides the synchronous one-core reader.")
  prefetch = flags.DEFINE_integer("prefetch", 2, "data.prefetch of those settings.")
  host_batch = flags.DEFINE_integer("host_batch", 256, "Images per host batch (a v4-64 host's share of 2048: 256).")
  batches = flags.DEFINE_integer("batches", 8, "Consecutive batches per timed repeat.")
  repeats = flags.DEFINE_integer("repeats", 3, "Timed repeats per setting and pass (medians reported).")
  examples = flags.DEFINE_integer("examples", 2048, "Synthetic examples written.")
  train_batch = flags.DEFINE_integer("train_batch", 8, "Batch of the timed train step.")
  kind = flags.DEFINE_enum("kind", "round", ["teacher", "stage_one", "round"], "The train step timed.")
  quick = flags.DEFINE_bool("quick", False, "Smoke mode (< 60 s on 2 idle cores): the tiny U-Net of "
                            "common.TINY_MODEL at train batch 4, host batch 64, 256 examples, 2 repeats of 4 batches, 1 worker.")
  json_path = flags.DEFINE_string("json", None, "Also write the report here.")

  def _main(argv):
    del argv
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # TFDS warns, in every process, that OpenCV would decode faster
    from distill import configuration
    config = config_flag.value
    label = common.config_label(sys.argv[1:]) if any(a.startswith("--config") for a in sys.argv[1:]) else (
        "configs/imagenet64.py")
    try:
      worker_counts = tuple(int(w) for w in workers.value)
    except ValueError:
      raise app.UsageError(f"--workers={','.join(workers.value)}: worker counts must be integers")
    kwargs = dict(workers=worker_counts, prefetch=prefetch.value, host_batch=host_batch.value,
                  batches=batches.value, repeats=repeats.value, num_examples=examples.value,
                  train_batch=train_batch.value, kind=kind.value)
    if quick.value:
      for field, value in common.TINY_MODEL.items():
        config.model[field.split(".", 1)[1]] = value
      label += " (quick: tiny U-Net)"
      kwargs.update(workers=(1,), host_batch=64, batches=4, repeats=2, num_examples=256, train_batch=4)
    configuration.validate(config)
    report = run(config, label=label, **kwargs)
    print_report(report)
    common.write_json(json_path.value, report)

  app.run(_main)


if __name__ == "__main__":
  main()
