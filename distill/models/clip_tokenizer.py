"""CLIP's byte-level BPE tokenizer from the user's files, through the `tokenizers` package (imported on first use).

Files (a diffusers pipeline's `tokenizer/` folder, the folder itself, or one file):
  tokenizer.json                  a whole `tokenizers` pipeline (transformers' CLIPTokenizerFast writes it); read as is
  vocab.json + merges.txt         CLIP's vocabulary and merges (transformers' CLIPTokenizer files), built into the
                                  pipeline transformers' CLIPConverter builds: NFC, whitespace runs → ' ', lowercase;
                                  CLIP's word split ('s|'t|'re|'ve|'m|'ll|'d|letters|a digit|other non-space runs),
                                  byte-level; BPE with '</w>' ending each word; <|startoftext|> … <|endoftext|>
                                  around every text. merges.txt's first line is its '#version' header; as CLIP does,
                                  at most 49152 − 256 − 2 merges are read.
  special_tokens_map.json or      optional: the pad token (SD 1.x pads with <|endoftext|>, SD 2.x with '!');
  tokenizer_config.json           <|endoftext|> when neither names one

`CLIPTokenizer(texts)` → ids [B, max_length] int32: BOS, the text's tokens, EOS, then the pad token to
max_length (77); a longer text is cut so that BOS and EOS stay (transformers' `padding="max_length",
truncation=True`, which SD's pipelines call).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from etils import epath

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
MAX_MERGES = 49152 - 256 - 2  # CLIPTokenizer's cap on merges.txt
# CLIP's word split, as transformers' CLIPConverter writes it.
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_MAX_FILE_BYTES = 64 * 2**20  # CLIP's files: vocab.json 1.6 MB, merges.txt 0.5 MB, tokenizer.json 2.2 MB


def tokenizers_package():
  """The `tokenizers` module; ImportError (one line) when it is not installed."""
  try:
    import tokenizers
  except ImportError:
    raise ImportError("the CLIP tokenizer needs the `tokenizers` package (pip install 'tokenizers>=0.22')") from None
  return tokenizers


def _read_text(path: epath.Path) -> str:
  size = path.stat().length
  if size > _MAX_FILE_BYTES:
    raise ValueError(f"{path}: {size} bytes, more than a tokenizer file's {_MAX_FILE_BYTES}")
  return path.read_text(encoding="utf-8")


def read_merges(text: str, where: str = "merges.txt") -> list[tuple[str, str]]:
  """merges.txt's text → [(left, right), …]: its first line (the '#version' header) skipped, at most
  MAX_MERGES read; ValueError (one line naming the line) for a line that is not two tokens."""
  lines = text.strip().split("\n")[1:MAX_MERGES + 1]
  merges = []
  for n, line in enumerate(lines, start=2):
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{where}: line {n} is not two tokens: {line[:80]!r}")
    merges.append((parts[0], parts[1]))
  return merges


def clip_bpe(vocab: dict[str, int], merges: Sequence[tuple[str, str]]):
  """A `tokenizers.Tokenizer` of CLIP's pipeline (the module docstring) over `vocab` and `merges`; BOS and EOS
  must be in the vocabulary (ValueError, one line, otherwise)."""
  tk = tokenizers_package()
  for token in (BOS, EOS):
    if token not in vocab:
      raise ValueError(f"the vocabulary has no {token!r}")
  bpe = tk.models.BPE(vocab=dict(vocab), merges=list(merges), dropout=None, continuing_subword_prefix="",
                      end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS)
  tokenizer = tk.Tokenizer(bpe)
  tokenizer.normalizer = tk.normalizers.Sequence(
      [tk.normalizers.NFC(), tk.normalizers.Replace(tk.Regex(r"\s+"), " "), tk.normalizers.Lowercase()])
  tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence(
      [tk.pre_tokenizers.Split(tk.Regex(WORD_PATTERN), behavior="removed", invert=True),
       tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tokenizer.decoder = tk.decoders.ByteLevel()
  tokenizer.post_processor = tk.processors.RobertaProcessing(sep=(EOS, vocab[EOS]), cls=(BOS, vocab[BOS]),
                                                             add_prefix_space=False, trim_offsets=False)
  tokenizer.add_special_tokens([BOS, EOS])
  return tokenizer


def _pad_token(folder: epath.Path) -> str | None:
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    if (folder / name).is_file():
      try:
        token = json.loads(_read_text(folder / name)).get("pad_token")
      except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{folder / name}: not a JSON object") from None
      token = token.get("content") if isinstance(token, dict) else token
      if token is not None:
        if not isinstance(token, str):
          raise ValueError(f"{folder / name}: pad_token {token!r} is not a string")
        return token
  return None


class CLIPTokenizer:
  """texts → ids [B, max_length] int32 (the module docstring). `tokenizer`: a `tokenizers.Tokenizer` whose post
  processor adds BOS and EOS; `pad_token` must be in its vocabulary."""

  def __init__(self, tokenizer, pad_token: str = EOS, max_length: int = MAX_LENGTH):
    self.pad_token, self.max_length = pad_token, int(max_length)
    self.pad_id = tokenizer.token_to_id(pad_token)
    if self.pad_id is None:
      raise ValueError(f"the pad token {pad_token!r} is not in the vocabulary")
    self.bos_id, self.eos_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    tokenizer.enable_truncation(self.max_length)
    tokenizer.enable_padding(length=self.max_length, pad_id=self.pad_id, pad_token=pad_token)
    self.tokenizer = tokenizer

  def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
    """A text or texts → ids [B, max_length] int32 (B = 1 for one text)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for text in texts:
      if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
    encodings = self.tokenizer.encode_batch(texts)
    return np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), self.max_length)

  def attention_mask(self, ids: np.ndarray) -> np.ndarray:
    """[B, L] int32: 1 up to and including each row's first EOS, 0 after (the padding). SD does not pass a mask
    to its text encoder (causal attention already keeps padding out of the tokens before it)."""
    ids = np.asarray(ids)
    is_eos = ids == self.eos_id
    first = np.where(is_eos.any(axis=-1), is_eos.argmax(axis=-1), ids.shape[-1] - 1)
    return (np.arange(ids.shape[-1])[None, :] <= first[:, None]).astype(np.int32)


def tokenizer_files(path: str | os.PathLike) -> dict[str, epath.Path]:
  """Where a tokenizer's files are: {'tokenizer.json'} or {'vocab.json', 'merges.txt'}, from a file, a tokenizer
  folder or a pipeline folder's tokenizer/ (tokenizer.json preferred). ValueError (one line) when none."""
  p = epath.Path(path)
  if p.is_file():
    if p.name == "tokenizer.json":
      return {"tokenizer.json": p}
    if p.name in ("vocab.json", "merges.txt") and (p.parent / "vocab.json").is_file() and (
        p.parent / "merges.txt").is_file():
      return {"vocab.json": p.parent / "vocab.json", "merges.txt": p.parent / "merges.txt"}
    raise ValueError(f"{path}: not tokenizer.json, nor vocab.json beside merges.txt")
  for folder in (p, p / "tokenizer"):
    if (folder / "tokenizer.json").is_file():
      return {"tokenizer.json": folder / "tokenizer.json"}
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
      return {"vocab.json": folder / "vocab.json", "merges.txt": folder / "merges.txt"}
  raise ValueError(f"{path}: no tokenizer.json, nor vocab.json and merges.txt, in it or in its tokenizer/")


def load_clip_tokenizer(path: str | os.PathLike, pad_token: str | None = None,
                        max_length: int = MAX_LENGTH) -> CLIPTokenizer:
  """The CLIP tokenizer of the files at `path` (`tokenizer_files`); pad_token: None reads it from the folder's
  special_tokens_map.json / tokenizer_config.json, else <|endoftext|>. ImportError (one line) without the
  `tokenizers` package; ValueError (one line naming the file) for files it cannot read."""
  tk = tokenizers_package()
  files = tokenizer_files(path)
  folder = next(iter(files.values())).parent
  if "tokenizer.json" in files:
    try:
      tokenizer = tk.Tokenizer.from_str(_read_text(files["tokenizer.json"]))
    except Exception as e:  # noqa: BLE001 — the package raises its own exception type for a bad file
      raise ValueError(f"{files['tokenizer.json']}: not a tokenizers pipeline ({str(e).splitlines()[0][:200]})") \
          from None
  else:
    try:
      vocab = json.loads(_read_text(files["vocab.json"]))
    except json.JSONDecodeError as e:
      raise ValueError(f"{files['vocab.json']}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and type(v) is int for k, v in vocab.items()):
      raise ValueError(f"{files['vocab.json']}: not an object of token → integer id")
    try:
      tokenizer = clip_bpe(vocab, read_merges(_read_text(files["merges.txt"]), str(files["merges.txt"])))
    except ValueError as e:
      raise ValueError(f"{folder}: {e}") from None
    except Exception as e:  # noqa: BLE001 — tokenizers refuses merges of tokens the vocabulary lacks
      raise ValueError(f"{files['merges.txt']}: {str(e).splitlines()[0][:200]}") from None
  return CLIPTokenizer(tokenizer, pad_token or _pad_token(folder) or EOS, max_length)
