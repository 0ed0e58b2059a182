"""MetricWriter through the TensorBoard reader, image grids, and the progress line."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from distill import writers


def _accumulator(logdir):
  acc = event_accumulator.EventAccumulator(logdir,
                                           size_guidance={
                                               event_accumulator.IMAGES: 0,
                                               event_accumulator.TENSORS: 0
                                           })
  acc.Reload()
  return acc


def test_metric_writer_round_trip(tmp_path):
  logdir = str(tmp_path / "logs")
  writer = writers.MetricWriter(logdir)
  writer.write_hparams({"model": {"width": 32, "dropout": 0.1}, "name": "digits", "steps": (2, 4)})
  writer.write_scalars(1, {"loss": 0.5, "lr": np.float32(1e-3)})
  writer.write_scalars(2, {"loss": 0.25})
  writer.write_images(2, {"samples": writers.image_grid(np.zeros((4, 8, 8, 1)), 2)})
  writer.close()

  acc = _accumulator(logdir)
  losses = acc.Scalars("loss")
  assert [(e.step, e.value) for e in losses] == [(1, 0.5), (2, 0.25)]
  assert acc.Scalars("lr")[0].value == pytest.approx(1e-3)
  image = acc.Images("samples")[0]
  assert (image.step, image.height, image.width) == (2, 19, 19)
  text = acc.Tensors("hparams/text_summary")[0].tensor_proto.string_val[0].decode()
  assert "model.width" in text and "digits" in text

  with open(os.path.join(logdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert rows[0]["step"] == 1 and rows[0]["loss"] == 0.5
  assert rows[1] == {"step": 2, "loss": 0.25}
  with open(os.path.join(logdir, "hparams.json")) as f:
    assert json.load(f) == {"model.width": 32, "model.dropout": 0.1, "name": "digits", "steps": [2, 4]}


def test_disabled_writer_writes_nothing(tmp_path):
  logdir = tmp_path / "logs"
  writer = writers.MetricWriter(str(logdir), enabled=False)
  writer.write_hparams({"a": 1})
  writer.write_scalars(0, {"loss": 1.0})
  writer.write_images(0, {"x": np.zeros((4, 4, 1), np.uint8)})
  writer.flush()
  writer.close()
  assert not logdir.exists()


def test_writers_do_not_import_tensorflow():
  code = "import sys, distill.writers; assert 'tensorflow' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_image_grid_layout():
  # Five constant tiles with distinct values in a 2-column grid: 3 rows, last tile empty.
  values = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
  images = np.broadcast_to(values[:, None, None, None], (5, 3, 4, 1))
  grid = writers.image_grid(images, ncols=2)
  assert grid.shape == (3 * 4 + 1, 2 * 5 + 1, 1) and grid.dtype == np.uint8
  expected = np.round((values + 1) * 127.5).astype(np.uint8)
  for i, value in enumerate(expected):
    row, col = divmod(i, 2)
    tile = grid[1 + row * 4:1 + row * 4 + 3, 1 + col * 5:1 + col * 5 + 4]
    assert np.all(tile == value), i
  assert np.all(grid[9:12, 6:10] == 255)  # the missing sixth tile
  assert np.all(grid[0] == 255) and np.all(grid[:, 5] == 255)  # padding lines


def test_image_grid_keeps_rgb_and_clips():
  grid = writers.image_grid(np.full((2, 2, 2, 3), 3.0), ncols=2)
  assert grid.shape == (4, 7, 3)
  assert grid[1, 1].tolist() == [255, 255, 255]


def test_save_image_grid_upscales(tmp_path):
  images = np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 1))
  path = tmp_path / "grid.png"
  grid = writers.save_image_grid(str(path), images, ncols=4, upscale=None)
  with Image.open(path) as png:
    assert png.mode == "L"
    assert png.size == (grid.shape[1], grid.shape[0])
    assert png.size[0] >= 256
    pixels = np.asarray(png)
  factor = grid.shape[1] // 37
  assert grid.shape[1] == 37 * factor
  small = writers.image_grid(images, 4)[..., 0]
  np.testing.assert_array_equal(pixels[::factor, ::factor], small)


class FakeClock:

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_progress_reporter_eta_ignores_the_first_step():
  clock = FakeClock()
  lines = []
  reporter = writers.ProgressReporter(1000,
                                      prefix="distill round 2",
                                      batch_size=64,
                                      every_seconds=10.0,
                                      clock=clock,
                                      print_fn=lines.append)
  clock.now = 30.0  # the first step compiles: 30 s
  assert reporter.update(1, {"loss": 1.0}).endswith("ETA ?")
  clock.now = 31.0  # then 100 steps/s
  assert reporter.update(101, {"loss": 0.5}) is None  # under 10 s since the last line
  clock.now = 42.0
  line = reporter.update(901, {"loss": 0.123456})
  # 900 steps in 12 s after the first: 75 steps/s (not 901 / 42 s), 99 steps left.
  assert line == ("distill round 2 step 901/1000 (90.1%) | loss 0.1235 | 4800 img/s"
                  " | elapsed 42s | ETA 1s")
  assert len(lines) == 2


def test_progress_reporter_format():
  clock = FakeClock()
  lines = []
  reporter = writers.ProgressReporter(10_000,
                                      prefix="distill round 2",
                                      batch_size=64,
                                      every_seconds=None,
                                      every_steps=100,
                                      clock=clock,
                                      print_fn=lines.append)
  clock.now = 5.0
  reporter.update(1, {"loss": 2.0})
  clock.now = 67.0  # 99 steps in 62 s after the first
  assert reporter.update(99) is None
  clock.now = 67.5
  line = reporter.update(100, {"loss": 0.0123})
  # rate = 99 steps / 62.5 s = 1.584 steps/s; 9900 steps left -> 6250 s.
  assert line == ("distill round 2 step 100/10000 (1.0%) | loss 0.0123 | 101 img/s"
                  " | elapsed 1m08s | ETA 1h44m10s")
  assert lines == [lines[0], line]
  assert lines[0].startswith("distill round 2 step 1/10000 (0.0%) | loss 2.0000")


def test_progress_reporter_always_prints_last_step():
  clock = FakeClock()
  reporter = writers.ProgressReporter(3, every_seconds=1e9, clock=clock, print_fn=lambda _: 0)
  assert reporter.update(1) is not None
  clock.now = 1.0
  assert reporter.update(2) is None
  clock.now = 2.0
  assert reporter.update(3,
                         {"loss": 1e-5}) == ("step 3/3 (100.0%) | loss 1.000e-05 | 1.00 steps/s | elapsed 2s | ETA 0s")


def test_progress_reporter_first_update_at_the_last_step_says_eta_0s():
  clock = FakeClock()
  reporter = writers.ProgressReporter(48, every_seconds=1e9, clock=clock, print_fn=lambda _: 0)
  clock.now = 34.0
  assert reporter.update(48, {"loss": 0.5}) == "step 48/48 (100.0%) | loss 0.5000 | elapsed 34s | ETA 0s"


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (9.4, "9s"), (62, "1m02s"), (3725, "1h02m05s"),
                                           (float("inf"), "?")])
def test_format_duration(seconds, text):
  assert writers.format_duration(seconds) == text


def test_labelled_grid_adds_captions_around_the_tiles(tmp_path):
  from PIL import Image
  images = np.zeros((6, 8, 8, 1), np.float32)  # mid-grey tiles
  plain = writers.save_image_grid(str(tmp_path / "plain.png"), images, ncols=3, upscale=4)
  labelled = writers.save_image_grid(str(tmp_path / "l.png"), images, ncols=3, upscale=4,
                                     row_labels=["w = 0", "w = 1"], col_labels=["a", "b", "c"], title="title")
  assert labelled.shape[2] == 3 and labelled.shape[0] > plain.shape[0] and labelled.shape[1] > plain.shape[1]
  h, w = plain.shape[:2]
  # The tiles sit at the bottom right, unchanged; the margins hold dark caption pixels.
  np.testing.assert_array_equal(labelled[-h:, -w:, 0], plain[..., 0])
  assert labelled[:-h].min() < 100 and labelled[-h:, :-w].min() < 100
  with Image.open(tmp_path / "l.png") as image:
    assert image.size == (labelled.shape[1], labelled.shape[0])
  with pytest.raises(ValueError, match="row_labels has 1 entries for 2"):
    writers.save_image_grid(str(tmp_path / "bad.png"), images, ncols=3, row_labels=["x"])
