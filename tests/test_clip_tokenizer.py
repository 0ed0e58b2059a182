"""CLIP's tokenizer from the user's files (distill/models/clip_tokenizer.py), on a tiny vocabulary and merges
written here: ids spelled out by hand (BOS, words, EOS, padding to 77, truncation keeping EOS), the pad token from
the folder's files, tokenizer.json, wrong files as one line; with the reference extra, the same ids as
transformers' CLIPTokenizer and CLIPTokenizerFast."""
import json

import numpy as np
import pytest

import sd_reference
from distill.models import clip_tokenizer

pytest.importorskip("tokenizers", reason="the `tokenizers` package is not installed")

# Byte-level symbols (ASCII letters and punctuation stand for themselves), each alone and ending a word, then the
# merges' results, then CLIP's specials last, as CLIP's vocabulary orders them.
CHARS = "acfhopst,!"
MERGES = [("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("c", "a"), ("ca", "t</w>"), ("o", "f</w>"),
          ("ca", "t"), ("cat", "s</w>")]
VOCAB = {}
for symbol in [*CHARS, *(c + "</w>" for c in CHARS), *("".join(m) for m in MERGES), clip_tokenizer.BOS,
               clip_tokenizer.EOS]:
  VOCAB.setdefault(symbol, len(VOCAB))
BOS, EOS = VOCAB[clip_tokenizer.BOS], VOCAB[clip_tokenizer.EOS]
A, PHOTO, OF, CAT, CATS = (VOCAB[w] for w in ("a</w>", "photo</w>", "of</w>", "cat</w>", "cats</w>"))
COMMA, BANG = VOCAB[",</w>"], VOCAB["!</w>"]
TEXTS = ["a photo of a cat", "A  Photo, of\tCATS!", "a " * 100, "", "cats of a photo a dog"]


def write_files(folder, pad_token=None, config_name="special_tokens_map.json"):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "vocab.json").write_text(json.dumps(VOCAB))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES) + "\n")
  if pad_token is not None:
    (folder / config_name).write_text(json.dumps({"pad_token": pad_token}))
  return folder


def row(*ids, pad=None):
  pad = EOS if pad is None else pad
  return list(ids) + [pad] * (77 - len(ids))


def test_ids_spelled_out(tmp_path):
  tok = clip_tokenizer.load_clip_tokenizer(write_files(tmp_path / "tokenizer"))
  ids = tok(TEXTS[:4])
  assert ids.shape == (4, 77) and ids.dtype == np.int32
  assert ids[0].tolist() == row(BOS, A, PHOTO, OF, A, CAT, EOS)
  assert ids[1].tolist() == row(BOS, A, PHOTO, COMMA, OF, CATS, BANG, EOS)  # lowercased, whitespace runs, marks
  assert ids[2].tolist() == [BOS] + [A] * 75 + [EOS]  # cut to 77 with BOS and EOS kept
  assert ids[3].tolist() == row(BOS, EOS)  # the empty prompt: the null condition of guidance
  assert tok("a cat").tolist() == [row(BOS, A, CAT, EOS)]
  np.testing.assert_array_equal(tok.attention_mask(ids[:1]), [[1] * 7 + [0] * 70])


def test_the_pipeline_folder_and_the_pad_token(tmp_path):
  write_files(tmp_path / "pipe" / "tokenizer", pad_token={"content": "!", "lstrip": False})  # SD 2.x's
  tok = clip_tokenizer.load_clip_tokenizer(tmp_path / "pipe")
  assert tok.pad_token == "!" and tok("a cat")[0].tolist() == row(BOS, A, CAT, EOS, pad=VOCAB["!"])
  write_files(tmp_path / "t2", pad_token="!", config_name="tokenizer_config.json")
  assert clip_tokenizer.load_clip_tokenizer(tmp_path / "t2").pad_token == "!"
  assert clip_tokenizer.load_clip_tokenizer(tmp_path / "t2", pad_token="c").pad_id == VOCAB["c"]
  assert clip_tokenizer.load_clip_tokenizer(tmp_path / "t2" / "merges.txt", max_length=8)("a")[0].tolist() == [
      BOS, A, EOS] + [VOCAB["!"]] * 5


def test_tokenizer_json(tmp_path):
  built = clip_tokenizer.clip_bpe(VOCAB, MERGES)
  (tmp_path / "tok").mkdir()
  built.save(str(tmp_path / "tok" / "tokenizer.json"))
  from_json = clip_tokenizer.load_clip_tokenizer(tmp_path / "tok" / "tokenizer.json")
  from_files = clip_tokenizer.load_clip_tokenizer(write_files(tmp_path / "files"))
  np.testing.assert_array_equal(from_json(TEXTS), from_files(TEXTS))


BAD = {
    "no_files": (lambda d: d, "no tokenizer.json, nor vocab.json and merges.txt"),
    "bad_vocab": (lambda d: (write_files(d) / "vocab.json").write_text("{not json"), "vocab.json: not JSON"),
    "vocab_of_lists": (lambda d: (write_files(d) / "vocab.json").write_text("[1, 2]"),
                       "not an object of token → integer id"),
    "merge_of_three": (lambda d: (write_files(d) / "merges.txt").write_text("#version: 0.2\np h o\n"),
                       "merges.txt: line 2 is not two tokens: 'p h o'"),
    "no_bos": (lambda d: (write_files(d) / "vocab.json").write_text(json.dumps({"a": 0, clip_tokenizer.EOS: 1})),
               "the vocabulary has no '<|startoftext|>'"),
    "pad_not_in_vocab": (lambda d: write_files(d, pad_token="<pad>"), "the pad token '<pad>' is not in the vocabulary"),
    "bad_tokenizer_json": (lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer.json: not a tokenizers"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_wrong_files_are_one_line(tmp_path, case):
  make, needle = BAD[case]
  folder = tmp_path / "t"
  folder.mkdir()
  make(folder)
  with pytest.raises(ValueError) as error:
    clip_tokenizer.load_clip_tokenizer(folder)
  assert "\n" not in str(error.value) and needle in str(error.value), str(error.value)


def test_same_ids_as_transformers(tmp_path):
  transformers = sd_reference.transformers()
  folder = write_files(tmp_path / "tokenizer")
  ours = clip_tokenizer.load_clip_tokenizer(folder)(TEXTS)
  slow = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
  fast = transformers.CLIPTokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))
  for reference in (slow, fast):
    theirs = reference(TEXTS, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ours, np.asarray(theirs))
  fast.save_pretrained(str(tmp_path / "saved"))  # tokenizer.json, vocab/merges, special_tokens_map.json
  np.testing.assert_array_equal(clip_tokenizer.load_clip_tokenizer(tmp_path / "saved")(TEXTS), ours)
