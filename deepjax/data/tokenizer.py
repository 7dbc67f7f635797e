"""Tokenizers: UTF-8 bytes (the default, no files needed) and HuggingFace `tokenizer.json`.

Both expose the same small interface the pipeline uses: `vocab_size`, `bos_id`, `eos_id`,
`pad_id`, `encode(text) -> int32 array` (no specials added; the pipeline adds BOS/EOS) and
`decode(ids) -> str` (specials dropped).
"""

import os
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
  """What the pipeline needs of a tokenizer."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes 0..255 plus BOS=256, EOS=257, PAD=258 (vocab_size 259).

  These ids are the ones the model presets assume (the tiny preset's vocabulary of 272 leaves
  room). Decoding drops specials and replaces invalid UTF-8, so any id sequence decodes.
  """

  vocab_size = 259
  bos_id = 256
  eos_id = 257
  pad_id = 258

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in np.asarray(ids).ravel() if 0 <= i < 256).decode(
        "utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


# Special-token spellings of common tokenizers, tried in order when bos/eos/pad are not given.
_BOS_NAMES = ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>")
_EOS_NAMES = ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<｜end▁of▁sentence｜>",
              "<|endoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<｜▁pad▁｜>")


class HFTokenizer:
  """A HuggingFace `tokenizers` tokenizer loaded from a `tokenizer.json` file.

  `bos`, `eos`, `pad` are token strings or ids; when omitted they are looked up among the usual
  special-token spellings (<s>, </s>, <pad>, <|endoftext|>, ...). A tokenizer with an end token
  but no begin token (GPT-2 style) uses the end token for both; a missing pad falls back to the
  end token (padding is masked by segment id 0, so its value never reaches the loss).
  """

  def __init__(self, path: str | os.PathLike, *, bos: str | int | None = None,
               eos: str | int | None = None, pad: str | int | None = None):
    import tokenizers  # imported here so that the byte tokenizer needs no extra package

    self.path = os.fspath(path)
    try:
      self._tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # tokenizers raises a bare Exception for missing or malformed files
      raise ValueError(f"cannot load tokenizer file {self.path!r}: {e}") from e
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
    self.eos_id = self._special(eos, _EOS_NAMES, "eos")
    self.bos_id = self._special(bos, _BOS_NAMES, "bos", default=self.eos_id)
    self.pad_id = self._special(pad, _PAD_NAMES, "pad", default=self.eos_id)

  def _special(self, given, names, role, default=None) -> int:
    if given is None:
      found = [i for i in map(self._tok.token_to_id, names) if i is not None]
      if found:
        return found[0]
      if default is not None:
        return default
      raise ValueError(f"{self.path}: no {role} token among {names}; pass {role}= explicitly")
    token_id = given if isinstance(given, int) else self._tok.token_to_id(given)
    if token_id is None or not 0 <= token_id < self.vocab_size:
      raise ValueError(f"{self.path}: {role} token {given!r} is not in the vocabulary "
                       f"(size {self.vocab_size})")
    return token_id

  def encode(self, text: str) -> np.ndarray:
    # The tokenizer's own post-processor (which may add specials) is skipped: the pipeline adds
    # BOS/EOS itself, the same way for every tokenizer.
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    specials = (self.bos_id, self.eos_id, self.pad_id)
    ids = [int(i) for i in np.asarray(ids).ravel() if i not in specials]
    return self._tok.decode(ids, skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r})"


def load_tokenizer(spec: str | os.PathLike, **kwargs) -> Tokenizer:
  """"byte" -> ByteTokenizer(); a path to a tokenizer.json (or a directory holding one) ->
  HFTokenizer(path, **kwargs)."""
  if spec == "byte":
    return ByteTokenizer()
  path = os.fspath(spec)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer spec {spec!r} is neither 'byte' nor a tokenizer.json file")
  return HFTokenizer(path, **kwargs)
