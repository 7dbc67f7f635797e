"""pallas_kernels.xla_sparse (DSA's attention and indexer in XLA, a chunk of queries at a time)
against the references it chunks: values and gradients, with a chunk that does not divide T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference, xla_sparse

B, T, H, S, D, DV, K = 2, 11, 3, 11, 24, 16, 4
CHUNK = 4                                  # 3 chunks, the last one padded


def _operands(seed):
  keys = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(keys[0], (B, T, H, D))
  kv = jax.random.normal(keys[1], (B, S, D))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  # Causal slots, -1 past the visible keys, random earlier ones.
  idx = jax.random.randint(keys[2], (B, T, K), 0, 2**30) % (pos[..., None] + 1)
  idx = jnp.where(jnp.arange(K) <= pos[..., None], idx, -1).astype(jnp.int32)
  sink = jax.random.normal(keys[3], (H,))
  return q, kv, idx, sink, keys[4], keys[5]


@pytest.mark.parametrize("with_sink", [False, True])
def test_sparse_attention_equals_the_reference_in_values_and_gradients(with_sink):
  q, kv, idx, sink, ct_key, _ = _operands(0)
  sink = sink if with_sink else None
  ct = jax.random.normal(ct_key, (B, T, H, DV))

  def loss(fn, q, kv, sink):
    out = fn(q, kv, idx, d_v=DV, sm_scale=0.4, sink=sink)
    return jnp.sum(out * ct), out

  chunked = lambda *a, **k: xla_sparse.sparse_mqa_attention(*a, chunk=CHUNK, **k)  # noqa: E731
  argnums = (1, 2, 3) if with_sink else (1, 2)       # after the function
  (_, got), grads = jax.value_and_grad(loss, argnums, has_aux=True)(chunked, q, kv, sink)
  (_, want), want_grads = jax.value_and_grad(loss, argnums, has_aux=True)(
      reference.sparse_mqa_attention, q, kv, sink)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_indexer_selects_like_the_reference_and_its_scores_have_its_gradients():
  _, _, _, _, key, ct_key = _operands(1)
  kq, kk, kw = jax.random.split(key, 3)
  hi, di = 4, 8
  q = jax.random.normal(kq, (B, T, hi, di))
  k = jax.random.normal(kk, (B, S, di))
  w = jax.random.normal(kw, (B, T, hi))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  segments = jnp.asarray([[1] * 6 + [2] * 5, [1] * 11])        # row 0 packs two sequences
  ct = jax.random.normal(ct_key, (B, T, K))

  def run(fn, q, k, w):
    idx, scores = fn(q, k, w, top_k=K, q_positions=pos, k_positions=pos, q_segment_ids=segments,
                     k_segment_ids=segments)
    return jnp.sum(jnp.where(idx >= 0, scores, 0.0) * ct), (idx, scores)

  chunked = lambda *a, **kw: xla_sparse.lightning_indexer(*a, chunk=CHUNK, **kw)  # noqa: E731
  (_, (idx, scores)), grads = jax.value_and_grad(run, (1, 2, 3), has_aux=True)(chunked, q, k, w)
  (_, (want_idx, want_scores)), want_grads = jax.value_and_grad(run, (1, 2, 3), has_aux=True)(
      reference.lightning_indexer, q, k, w)
  np.testing.assert_array_equal(idx, want_idx)
  assert int(jnp.sum(idx[0, 6] >= 0)) == 1           # the second sequence's first query
  np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
  for g, want in zip(grads, want_grads):
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


def test_chunks_are_sized_by_bytes():
  assert xla_sparse.query_chunk(1 << 20, chunk_bytes=32 << 20) == 32
  assert xla_sparse.query_chunk(1 << 30) == 8                   # never fewer than 8 queries
  # V3.2's attention (K = 2048, D = 576, 128 heads): 6.8 MB per query, so the smallest chunk.
  assert xla_sparse.query_chunk(4 * 2048 * (576 + 2 * 128)) == 8


def test_selected_logits_are_the_dots_with_the_gathered_rows():
  q, kv, idx, _, _, _ = _operands(2)
  got = xla_sparse.selected_logits(q, kv, idx, chunk=CHUNK)
  want = np.zeros((B, T, H, K), np.float32)
  for b, t, slot in np.ndindex(B, T, K):
    if idx[b, t, slot] >= 0:
      want[b, t, :, slot] = np.asarray(q[b, t]) @ np.asarray(kv[b, idx[b, t, slot]])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
