"""The image-text source (distill/image_text.py, data.name='image_text') on tiny directories written here: both
caption layouts, both split layouts, center crop and resize, row order, and each bad input as one DataError line
naming the file."""
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from distill import data, image_text


def config(path, size=4, channels=3, **kw):
  return ml_collections.ConfigDict(dict(name="image_text", path=str(path), image_size=size, channels=channels,
                                        num_classes=1, num_workers=0, prefetch=2, **kw))


def write_image(path, value=0, shape=(6, 10, 3), fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full(shape, value, np.uint8)).save(path, format=fmt)
  return path


def write_txt_set(directory, n=10):
  for i in range(n):
    write_image(directory / f"img{i:02d}.png", 10 * i)
    (directory / f"img{i:02d}.txt").write_text(f"  caption {i}\n")
  return directory


def test_same_name_txt_captions_and_the_fixed_split(tmp_path):
  write_txt_set(tmp_path, 10)
  train, test = data.make_source(config(tmp_path), "train"), data.make_source(config(tmp_path), "test")
  assert (len(train), len(test)) == (9, 1) and train.num_classes == 1 and train.image_shape == (4, 4, 3)
  every = sorted(train.captions(np.arange(9)) + test.captions([0]))
  assert every == sorted(f"caption {i}" for i in range(10))
  batch = train.get_batch(np.array([0, 3]))
  assert batch["image"].shape == (2, 4, 4, 3) and batch["image"].dtype == np.float32
  assert batch["label"].tolist() == [0, 0]
  # row i's image is the one its caption belongs to (the fill value 10·k of img{k})
  for i in (0, 3):
    k = int(train.captions([i])[0].split()[1])
    np.testing.assert_allclose(train.get_batch(np.array([i]))["image"], 10 * k / 127.5 - 1, atol=1e-6)
  # the split is a fixed function of the listing
  again = data.make_source(config(tmp_path), "test")
  assert again.captions([0]) == test.captions([0])


def test_jsonl_captions_subdirectories_other_formats_and_the_crop(tmp_path):
  rows = []
  for i, (name, fmt) in enumerate([("a/x.jpg", "JPEG"), ("b/y.webp", "WEBP"), ("z.PNG", "PNG")]):
    image = np.zeros((8, 16, 3), np.uint8)
    image[:, 4:12] = 200  # the central square is bright, the sides dark: the crop keeps only the square
    (tmp_path / "train" / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(tmp_path / "train" / name, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    rows.append({"file": name, "caption": f"text {i}"})
  (tmp_path / "train" / "captions.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
  write_txt_set(tmp_path / "test", 2)
  train = data.make_source(config(tmp_path, size=4), "train")
  assert train.captions([0, 1, 2]) == ["text 0", "text 1", "text 2"]  # sorted paths: a/x.jpg, b/y.webp, z.PNG
  images = train.get_batch(np.arange(3))["image"]
  assert images.shape == (3, 4, 4, 3) and float(images.min()) > 0.3  # no dark side left after the central crop
  assert len(data.make_source(config(tmp_path), "test")) == 2
  grey = data.make_source(config(tmp_path, channels=1), "train")
  assert grey.get_batch([0])["image"].shape == (1, 4, 4, 1)


BAD = {
    "missing_dir": (lambda d: d / "none", "not a directory of captioned images"),
    "empty_path": (lambda d: "", "data.path is empty"),
    "no_images": (lambda d: d, "no images"),
    "no_caption": (lambda d: (write_image(d / "lonely.png"), d)[1], "lonely.png: image without a caption"),
    "jsonl_misses_one": (lambda d: (write_image(d / "a.png"), write_image(d / "b.png"),
                                    (d / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "x"})),
                                    d)[-1], "b.png: image without a caption in"),
    "jsonl_extra": (lambda d: (write_image(d / "a.png"), (d / "captions.jsonl").write_text(
        json.dumps({"file": "a.png", "caption": "x"}) + "\n" + json.dumps({"file": "gone.png", "caption": "y"})),
                               d)[-1], "captions 'gone.png', which is not an image"),
    "jsonl_bad_line": (lambda d: (write_image(d / "a.png"), (d / "captions.jsonl").write_text("{oops\n"), d)[-1],
                       "captions.jsonl:1: not JSON"),
    "jsonl_bad_row": (lambda d: (write_image(d / "a.png"), (d / "captions.jsonl").write_text('{"file": "a.png"}'),
                                 d)[-1], 'captions.jsonl:1: expected {"file"'),
    "jsonl_outside": (lambda d: (write_image(d / "a.png"), (d / "captions.jsonl").write_text(
        json.dumps({"file": "../a.png", "caption": "x"})), d)[-1], "is not inside"),
    "caption_not_utf8": (lambda d: (write_image(d / "a.png"), (d / "a.txt").write_bytes(b"\xff\xfe"), d)[-1],
                         "a.txt: caption is not UTF-8"),
    "one_image": (lambda d: (write_image(d / "a.png"), (d / "a.txt").write_text("x"), d)[-1],
                  "leave the 'test' split empty"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(tmp_path, case):
  make, needle = BAD[case]
  path = make(tmp_path)
  with pytest.raises(data.DataError) as error:
    data.make_source(config(path), "test")
  assert needle in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_an_unreadable_image_is_named_when_read(tmp_path):
  write_txt_set(tmp_path, 3)
  (tmp_path / "img01.png").write_bytes(b"not a png")
  source = image_text.ImageTextSource([str(tmp_path / f"img0{i}.png") for i in range(3)], ["a", "b", "c"], 4, 3)
  source.get_batch([0])
  with pytest.raises(data.DataError) as error:
    source.get_batch([0, 1])
  assert "img01.png: unreadable image" in str(error.value) and "\n" not in str(error.value)


def test_num_classes_must_be_one(tmp_path):
  write_txt_set(tmp_path, 3)
  with pytest.raises(data.DataError, match="set data.num_classes=1"):
    data.make_source(ml_collections.ConfigDict({**config(tmp_path).to_dict(), "num_classes": 10}), "train")
