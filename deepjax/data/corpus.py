"""The embedded default corpus: synthetic multi-domain documents, generated on demand.

Six domains with clearly different token statistics, so that expert specialisation in the
MoE router becomes visible after a short run:

  arithmetic  "37+845=882"                  digits and + - * =
  brackets    "([]{<>})"                    balanced Dyck words over ()[]{}<>
  copy        "qhzkx>qhzkx"                 a random string, '>', the same string
  reverse     "qhzkx|xkzhq"                 a random string, '|', its reverse
  kv_recall   "k3=v9;k1=v4;k7=v2?k1=v4"     key-value pairs, then a query and its answer
  english     "The quiet cat sees a bird."  templated sentences from small word lists

A document is several items of one domain, one per line. Document i of a split is a pure
function of (seed, split, i): its generator is numpy's PCG64 seeded with the entropy
[seed, split id, i], so any index is regenerated without reading the others, and the eval split
(split id 1) draws from a stream disjoint from train's (split id 0).
"""

import operator

import numpy as np

DOMAINS = ("arithmetic", "brackets", "copy", "reverse", "kv_recall", "english")

# split name -> (stream id, default number of documents)
SPLITS = {"train": (0, 10**7), "eval": (1, 10**4)}

_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))
_BRACKETS = ("()", "[]", "{}", "<>")
_ADJECTIVES = ("quiet", "red", "old", "happy", "small", "bright", "tired", "clever", "cold",
               "brave")
_NOUNS = ("cat", "dog", "bird", "teacher", "river", "child", "farmer", "robot", "garden", "song")
_VERBS = ("sees", "follows", "likes", "finds", "paints", "hears", "helps", "watches")
_ADVERBS = ("slowly", "today", "again", "at night", "with care", "in the rain")


def _arithmetic(rng: np.random.Generator) -> str:
  lines = []
  for _ in range(rng.integers(2, 9)):
    a, b = rng.integers(0, 10 ** rng.integers(1, 5, size=2))
    op = "+-*"[rng.integers(3)]
    c = a + b if op == "+" else a - b if op == "-" else a * b
    lines.append(f"{a}{op}{b}={c}")
  return "\n".join(lines)


def _dyck_word(rng: np.random.Generator, pairs: int) -> str:
  """A uniformly-typed random balanced word with `pairs` bracket pairs."""
  out, stack, opened = [], [], 0
  while opened < pairs or stack:
    if opened < pairs and (not stack or rng.random() < 0.5):
      kind = _BRACKETS[rng.integers(len(_BRACKETS))]
      out.append(kind[0])
      stack.append(kind[1])
      opened += 1
    else:
      out.append(stack.pop())
  return "".join(out)


def _brackets(rng: np.random.Generator) -> str:
  return "\n".join(_dyck_word(rng, int(rng.integers(1, 13))) for _ in range(rng.integers(2, 7)))


def _random_word(rng: np.random.Generator) -> str:
  return "".join(rng.choice(_LETTERS, size=rng.integers(3, 13)))


def _copy(rng: np.random.Generator) -> str:
  return "\n".join(f"{w}>{w}" for w in (_random_word(rng) for _ in range(rng.integers(2, 7))))


def _reverse(rng: np.random.Generator) -> str:
  return "\n".join(f"{w}|{w[::-1]}" for w in (_random_word(rng) for _ in range(rng.integers(2, 7))))


def _kv_recall(rng: np.random.Generator) -> str:
  lines = []
  for _ in range(rng.integers(2, 5)):
    keys = rng.permutation(10)[: rng.integers(2, 9)]   # distinct keys, so the answer is unique
    values = rng.integers(0, 10, size=len(keys))
    query = rng.integers(len(keys))
    pairs = ";".join(f"k{k}=v{v}" for k, v in zip(keys, values))
    lines.append(f"{pairs}?k{keys[query]}=v{values[query]}")
  return "\n".join(lines)


def _english(rng: np.random.Generator) -> str:
  pick = lambda words: words[rng.integers(len(words))]  # noqa: E731
  sentences = []
  for _ in range(rng.integers(2, 6)):
    subject = f"{pick(('the', 'this', 'my'))} {pick(_ADJECTIVES)} {pick(_NOUNS)}"
    sentence = f"{subject} {pick(_VERBS)} the {pick(_NOUNS)}"
    if rng.random() < 0.5:
      sentence += f" {pick(_ADVERBS)}"
    sentences.append(sentence[0].upper() + sentence[1:] + ".")
  return " ".join(sentences)


_GENERATORS = (_arithmetic, _brackets, _copy, _reverse, _kv_recall, _english)


class SyntheticCorpus:
  """Random-access source of synthetic documents: `corpus[i] -> {"text": str, "domain": int}`.

  `domain` indexes `DOMAINS`. The domain is drawn from the document's own generator (not i mod 6),
  so every process shard and every slice of the corpus sees all domains.
  """

  domains = DOMAINS

  def __init__(self, split: str = "train", *, seed: int = 0, num_docs: int | None = None):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    if seed < 0:
      raise ValueError(f"seed must be non-negative, got {seed}")
    self.split = split
    self.seed = seed
    self._stream, default_docs = SPLITS[split]
    self._num_docs = default_docs if num_docs is None else num_docs

  def __len__(self) -> int:
    return self._num_docs

  def __getitem__(self, index: int) -> dict:
    index = operator.index(index)
    if not 0 <= index < self._num_docs:
      raise IndexError(f"document {index} out of range for {self!r}")
    rng = np.random.default_rng([self.seed, self._stream, index])
    domain = int(rng.integers(len(DOMAINS)))
    return {"text": _GENERATORS[domain](rng), "domain": domain}

  def __repr__(self) -> str:
    return f"SyntheticCorpus(split={self.split!r}, seed={self.seed}, num_docs={self._num_docs})"
