"""The input pipeline: source -> process shard -> shuffle -> repeat -> encode -> pack -> batch.

Everything up to `encode` is a grain MapDataset (random access, so shuffling and resuming are
index arithmetic); packing and batching are IterDatasets. The returned iterator's state is a
small JSON-serialisable dict (document index plus packing counters), restored exactly by
`set_state`.
"""

import functools

import grain
import numpy as np

from deepjax.data.packing import pack_documents, pad_batch
from deepjax.data.tokenizer import Tokenizer


class EncodeDocument(grain.transforms.Map):
  """{"text"} or pre-tokenized {"tokens"} (+ "domain", "origin") ->
  {"tokens": [BOS, ..., EOS], "domains": [domain] * len} int32.

  Pre-tokenized ids are checked against `vocab_size` here, before they can reach the model.
  """

  def __init__(self, tokenizer: Tokenizer, vocab_size: int):
    self.tokenizer = tokenizer
    self.vocab_size = vocab_size

  def map(self, doc: dict) -> dict:
    if "tokens" in doc:
      ids = np.asarray(doc["tokens"], np.int32)
      bad = ids[(ids < 0) | (ids >= self.vocab_size)]
      if bad.size:
        raise ValueError(f"token id {bad[0]} from {doc.get('origin', 'a pre-tokenized document')} "
                         f"is outside the vocabulary (vocab_size={self.vocab_size})")
    else:
      ids = self.tokenizer.encode(doc["text"])
    bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
    tokens = np.concatenate([[bos], ids, [eos]]).astype(np.int32)
    return {"tokens": tokens, "domains": np.full(len(tokens), doc.get("domain", -1), np.int32)}


def check_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> None:
  """Rejects a tokenizer that can produce ids outside the model's vocabulary."""
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"{tokenizer!r} has {tokenizer.vocab_size} ids (up to "
                     f"{tokenizer.vocab_size - 1}), more than the model's vocab_size={vocab_size}")
  for role in ("bos_id", "eos_id", "pad_id"):
    token_id = getattr(tokenizer, role)
    if not 0 <= token_id < vocab_size:
      raise ValueError(f"{tokenizer!r} {role}={token_id} is outside the model's vocabulary "
                       f"(vocab_size={vocab_size})")


def make_dataset(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                 vocab_size: int, process_index: int = 0, process_count: int = 1,
                 num_epochs: int | None = None, shuffle: bool = True,
                 read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator of packed batches for this process.

  Args:
    source: random-access documents (`len`, `[i]` -> {"text" or "tokens", "domain"}), e.g.
      SyntheticCorpus, TextFileSource, ArrayRecordSource.
    tokenizer: ByteTokenizer, HFTokenizer or anything with the same interface.
    seq_len: tokens per row.
    batch_size: the global batch; each process yields batch_size // process_count rows.
    seed: shuffling seed (0 <= seed < 2**32); every epoch is shuffled differently.
    vocab_size: the model's vocabulary; ids outside it raise ValueError.
    process_index, process_count: this process's shard, documents process_index::process_count
      (jax.process_index() and jax.process_count() in multi-host runs).
    num_epochs: passes over the shard; None repeats forever. With a finite number the iterator
      ends with StopIteration, its last batch padded with empty rows (segment 0).
    shuffle: False reads documents in source order (e.g. for evaluation).
    read_options: grain's thread prefetch of documents (default: grain's).

  Returns:
    A grain DatasetIterator; next() gives {"tokens", "segment_ids", "positions", "domains"},
    each int32 [batch_size // process_count, seq_len]. get_state() is JSON-serialisable.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
  check_tokenizer(tokenizer, vocab_size)
  local_batch = batch_size // process_count

  docs = grain.MapDataset.source(source)[process_index::process_count]
  if not len(docs):
    raise ValueError(f"process {process_index} of {process_count} gets no documents from "
                     f"{source!r} ({len(source)} documents)")
  if shuffle:
    docs = docs.shuffle(seed)   # grain's shuffle reseeds with seed + epoch after `repeat`
  docs = docs.repeat(num_epochs).map(EncodeDocument(tokenizer, vocab_size))

  rows = pack_documents(docs.to_iter_dataset(read_options), seq_len=seq_len,
                        num_bins=local_batch, pad_id=tokenizer.pad_id)
  batches = rows.batch(local_batch).map(
      functools.partial(pad_batch, batch_size=local_batch, pad_id=tokenizer.pad_id))
  return iter(batches)
