"""Packing tokenized documents into fixed-length rows with segment ids and positions.

A document arrives as {"tokens": [BOS, ..., EOS], "domains": [d, ..., d]}. Documents longer
than `seq_len` are first cut into `seq_len` pieces; each piece is packed as a document of its own
(its own segment id, positions restarting at 0, no BOS on the later pieces), so the model never
attends or predicts across a cut. Rows are then filled first-fit by grain's
`FirstFitPackIterDataset` (checkpointable: its state is the parent's plus two counters):

  tokens       the packed tokens; `pad_id` on padding
  segment_ids  1, 2, 3, ... per document within a row; 0 on padding
  positions    0, 1, ... within each document; 0 on padding
  domains      domain id of each token's document; -1 on padding or when unknown
"""

from collections.abc import Sequence

import grain
import numpy as np


class SplitLongDocuments(grain.experimental.FlatMapTransform):
  """{"tokens", "domains"} of any length -> pieces of at most `seq_len` tokens."""

  max_fan_out = 2**31  # only bounds FlatMapMapDataset; the IterDataset form here has no bound

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, doc: dict) -> Sequence[dict]:
    return [{k: v[start:start + self.seq_len] for k, v in doc.items()}
            for start in range(0, len(doc["tokens"]), self.seq_len)]


def _rename(row: dict) -> dict:
  return {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"],
          "positions": row["tokens_positions"], "domains": row["domains"]}


def pack_documents(docs: grain.IterDataset, *, seq_len: int, num_bins: int,
                   pad_id: int) -> grain.IterDataset:
  """Tokenized documents -> rows {tokens, segment_ids, positions, domains}, each [seq_len] int32.

  `num_bins` rows are filled at a time (first fit), so a document can go to any of the next
  `num_bins` rows; more bins means less padding.
  """
  pieces = grain.experimental.FlatMapIterDataset(docs, SplitLongDocuments(seq_len))
  rows = grain.experimental.FirstFitPackIterDataset(
      pieces,
      length_struct={"tokens": seq_len, "domains": seq_len},
      num_packing_bins=num_bins,
      padding_struct={"tokens": pad_id, "domains": -1},
      shuffle_bins=False,  # documents are shuffled upstream
  )
  return rows.map(_rename)


def pad_batch(batch: dict, batch_size: int, pad_id: int) -> dict:
  """Pads a short final batch (finite epochs) with empty rows, so every batch has one shape."""
  missing = batch_size - len(batch["tokens"])
  if not missing:
    return batch
  fill = {"tokens": pad_id, "segment_ids": 0, "positions": 0, "domains": -1}
  return {k: np.concatenate([v, np.full((missing, v.shape[1]), fill[k], v.dtype)])
          for k, v in batch.items()}
