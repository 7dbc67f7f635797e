"""DeepSeek Sparse Attention's two operations in plain XLA, a chunk of queries at a time.

The XLA forms beside the `sparse_mqa_attention` and `lightning_indexer` kernels, with their
signatures and operand checks: each runs the pure-jnp reference on chunks of queries under
`jax.lax.map`, every chunk rematerialised in the backward pass (`jax.checkpoint`). Memory is
then O(chunk · K · D) for the attention's gathered rows and O(chunk · S) for the indexer's
scores, where the references hold O(T · K · D) and O(T · S): at V3.2's K = 2048, D = 576 the
reference gathers 4.7 MB of float32 rows per query. Gradients flow where the references'
do (q, kv, sink; the indexer's selected scores into q, k, w); each query row is computed
alone either way, so the values are the references' up to float rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import checks, reference
from pallas_kernels.tiling import QueryChunks

# Aim for chunks whose largest float32 buffers take about this many bytes.
CHUNK_BYTES = 32 << 20


def query_chunk(bytes_per_query: int, chunk_bytes: int = CHUNK_BYTES) -> int:
  """Queries per chunk: as many as fit `chunk_bytes`, a multiple of 8 (at least 8)."""
  return max(8, chunk_bytes // max(bytes_per_query, 1) // 8 * 8)


def over_query_chunks(fn, chunks: QueryChunks, per_query: list, fills: list):
  """fn(*chunk of each per-query [B, T, ...] array; padding rows filled with `fills`) under
  `jax.lax.map`, each chunk rematerialised in the backward pass -> fn's outputs as
  [B, T, ...]."""
  body = jax.checkpoint(lambda args: fn(*args))
  out = jax.lax.map(body, [chunks.split(x, fill) for x, fill in zip(per_query, fills)])
  return jax.tree.map(chunks.join, out)


def sparse_mqa_attention(q, kv, indices, *, d_v, sm_scale, sink=None, chunk=None,
                         interpret=None):
  """`reference.sparse_mqa_attention` (same contract), `chunk` queries at a time (None: what
  fits CHUNK_BYTES)."""
  del interpret
  checks.sparse_attention(q, kv, indices, d_v=d_v, sink=sink)
  _, t, h, d = q.shape
  k = indices.shape[-1]
  chunks = QueryChunks.of(t, chunk or query_chunk(4 * k * (d + 2 * h)))
  attend = lambda q_c, idx_c: reference.sparse_mqa_attention(  # noqa: E731
      q_c, kv, idx_c, d_v=d_v, sm_scale=sm_scale, sink=sink)
  if chunks.count == 1:
    return attend(q, indices)
  return over_query_chunks(attend, chunks, [q, indices], [0, -1])


def selected_logits(q, kv, indices, *, chunk=None):
  """q . kv[indices] [B,T,H,K] float32 (0 in empty slots), `chunk` queries at a time: the
  sparse attention's unscaled logits, e.g. the target of the indexer's loss (V3.2 eq. 4)."""
  _, t, h, d = q.shape
  k = indices.shape[-1]
  chunks = QueryChunks.of(t, chunk or query_chunk(4 * k * (d + h)))

  def logits(q_c, idx_c):
    valid = idx_c >= 0
    rows = jax.vmap(lambda x, i: x[i])(kv, jnp.where(valid, idx_c, 0))          # [B,c,K,D]
    dots = jnp.einsum("bthd,btkd->bthk", q_c, rows, preferred_element_type=jnp.float32)
    return jnp.where(valid[:, :, None, :], dots, 0.0)

  if chunks.count == 1:
    return logits(q, indices)
  return over_query_chunks(logits, chunks, [q, indices], [0, -1])


def lightning_indexer(q, k, w, *, top_k, q_positions, k_positions, q_segment_ids=None,
                      k_segment_ids=None, chunk=None, interpret=None):
  """`reference.lightning_indexer` (same contract), `chunk` queries at a time (None: what fits
  CHUNK_BYTES)."""
  del interpret
  checks.indexer(q, k, w, top_k=top_k, q_positions=q_positions, k_positions=k_positions,
                 q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids)
  t, s = q.shape[1], k.shape[1]
  chunks = QueryChunks.of(t, chunk or query_chunk(4 * 3 * max(s, top_k)))

  def select(q_c, w_c, positions_c, *segments_c):
    return reference.lightning_indexer(
        q_c, k, w_c, top_k=top_k, q_positions=positions_c, k_positions=k_positions,
        q_segment_ids=segments_c[0] if segments_c else None, k_segment_ids=k_segment_ids)

  per_query = [q, w, q_positions] + ([] if q_segment_ids is None else [q_segment_ids])
  if chunks.count == 1:
    return select(*per_query)
  return over_query_chunks(select, chunks, per_query, [0] * len(per_query))
