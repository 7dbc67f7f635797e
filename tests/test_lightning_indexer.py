"""lightning_indexer (Pallas score tiles, interpret mode, + running top-k) against a numpy top-k
and pallas_kernels.reference: selections with exact zero ties, causal and compressed-unit
visibility, top_k below, across and above the chunk and the key count, and the gradients of the
selected scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from pallas_kernels.lightning_indexer import BlockSizes, lightning_indexer

B, T, S, HI, DI = 2, 37, 45, 2, 16
CHUNKED = BlockSizes(block_t=8, block_s=8, chunk=16, bwd_chunk=8)   # 3 chunks of 16 keys
ONE_CHUNK = BlockSizes(block_t=16, block_s=16, chunk=64)


def _problem(seed, s=S):
  """Two indexer heads of random sign: a key that both heads clip scores exactly 0, so about a
  quarter of the visible scores tie at 0; w > 0 as weights_proj's softplus-free output need not
  be, but a positive w keeps the zeros exact."""
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (B, T, HI, DI))
  k = jax.random.normal(keys[1], (B, s, DI))
  w = jax.random.uniform(keys[2], (B, T, HI), minval=0.5, maxval=1.5)
  return q, k, w


def _causal(s=S):
  """Queries continue the keys: query t sits at position t + S - T."""
  q_pos = jnp.broadcast_to(jnp.arange(T) + (s - T), (B, T))
  return q_pos.astype(jnp.int32), jnp.broadcast_to(jnp.arange(s), (B, s)).astype(jnp.int32)


def _compressed(s=S, ratio=4):
  """V4's CSA: entry w covers tokens [w m, (w+1) m) and is visible from token t iff
  w < floor((t+1)/m), i.e. iff its last token (w+1) m - 1 <= t."""
  q_pos = jnp.broadcast_to(jnp.arange(T) * 5, (B, T))       # tokens 0, 5, ..., 180
  k_pos = (jnp.arange(s) + 1) * ratio - 1
  return q_pos.astype(jnp.int32), jnp.broadcast_to(k_pos, (B, s)).astype(jnp.int32)


def numpy_top_k(q, k, w, top_k, q_pos, k_pos):
  """float64 scores, a stable sort (ties to the lower key), -1 / -inf past the visible keys."""
  q, k, w = (np.asarray(x, np.float64) for x in (q, k, w))
  scores = np.einsum("bth,btsh->bts", w, np.maximum(np.einsum("bthd,bsd->btsh", q, k), 0))
  visible = np.asarray(k_pos)[:, None, :] <= np.asarray(q_pos)[:, :, None]
  scores = np.where(visible, scores, -np.inf)
  order = np.argsort(-scores, axis=-1, kind="stable")[..., :top_k]
  top = np.take_along_axis(scores, order, axis=-1)
  pad = top_k - top.shape[-1]
  order = np.pad(order, ((0, 0), (0, 0), (0, pad)))
  top = np.pad(top, ((0, 0), (0, 0), (0, pad)), constant_values=-np.inf)
  return np.where(np.isfinite(top), order, -1), top


# top_k below a chunk (10), across chunks (20), above the key count (50), and 1; the full grid
# of top_k x tiling x visibility runs in the slow set.
_GRID = [(k, b, v) for v in (_causal, _compressed) for b in (CHUNKED, ONE_CHUNK)
         for k in (1, 10, 20, 50)]
_DEFAULT = {(10, CHUNKED, _causal), (50, CHUNKED, _causal), (20, CHUNKED, _compressed),
            (1, ONE_CHUNK, _compressed), (20, ONE_CHUNK, _causal)}


@pytest.mark.parametrize("top_k, blocks, visibility", [
    pytest.param(*case, marks=() if case in _DEFAULT else pytest.mark.slow,
                 id=f"{case[2].__name__[1:]}-{'chunked' if case[1] is CHUNKED else 'one_chunk'}"
                    f"-top{case[0]}") for case in _GRID])
def test_selection_matches_numpy_top_k_with_zero_ties(top_k, blocks, visibility):
  q, k, w = _problem(top_k)
  q_pos, k_pos = visibility()
  with jax.default_matmul_precision("highest"):
    indices, scores = jax.jit(lambda *a: lightning_indexer(
        *a, top_k=top_k, q_positions=q_pos, k_positions=k_pos, block_sizes=blocks))(q, k, w)
  want_indices, want_scores = numpy_top_k(q, k, w, top_k, q_pos, k_pos)
  assert indices.shape == scores.shape == (B, T, top_k) and indices.dtype == jnp.int32
  ties = np.asarray(want_scores == 0).sum()
  assert ties > 0 or top_k == 1                     # the problem really has zero ties
  np.testing.assert_array_equal(np.asarray(indices), want_indices)
  np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5, atol=1e-5)


def test_matches_reference_with_default_blocks():
  q, k, w = _problem(7)
  q_pos, k_pos = _causal()
  kw = dict(top_k=12, q_positions=q_pos, k_positions=k_pos)
  with jax.default_matmul_precision("highest"):
    got = lightning_indexer(q, k, w, **kw)
    want = reference.lightning_indexer(q, k, w, **kw)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks", [CHUNKED, ONE_CHUNK], ids=["chunked", "one_chunk"])
def test_selected_score_gradients_match_the_reference(blocks):
  """The KL loss's path: gradients of the selected scores in q, k and w (empty slots carry a
  zero cotangent), against autodiff of the dense reference."""
  q, k, w = _problem(11)
  q_pos, k_pos = _causal()
  kw = dict(top_k=20, q_positions=q_pos, k_positions=k_pos)
  cotangent = jax.random.normal(jax.random.key(12), (B, T, 20))

  def loss(fn):
    def value(q, k, w):
      indices, scores = fn(q, k, w, **kw)
      return jnp.sum(jnp.where(indices >= 0, scores * cotangent, 0.0))
    return jax.jit(jax.grad(value, argnums=(0, 1, 2)))

  with jax.default_matmul_precision("highest"):
    got = loss(lambda *a, **k: lightning_indexer(*a, block_sizes=blocks, **k))(q, k, w)
    want = loss(reference.lightning_indexer)(q, k, w)
  for name, a, e in zip(("dq", "dk", "dw"), got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5,
                               err_msg=name)


def test_bfloat16_inputs_select_like_float32_scores_of_the_same_values():
  """bf16 q, k, w: the kernel's dots accumulate in float32, so it selects what the reference
  selects on the same bf16 values."""
  q, k, w = (x.astype(jnp.bfloat16) for x in _problem(13))
  q_pos, k_pos = _causal()
  kw = dict(top_k=10, q_positions=q_pos, k_positions=k_pos)
  got = lightning_indexer(q, k, w, block_sizes=CHUNKED, **kw)
  want = reference.lightning_indexer(q, k, w, **kw)
  agree = np.mean(np.asarray(got[0]) == np.asarray(want[0]))
  assert agree > 0.98, agree
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=2e-2, atol=2e-2)


def test_packed_segments_see_only_their_own_keys():
  """Packed sequences: positions restart per segment and a key is visible only within its
  query's segment (padding, segment 0, is a segment of its own here)."""
  q, k, w = _problem(17, s=T)
  segments = jnp.asarray(np.repeat([[1, 2, 3, 0]], [12, 15, 6, 4], axis=1).repeat(B, 0),
                         jnp.int32)
  starts = np.concatenate([[0], np.flatnonzero(np.diff(np.asarray(segments[0]))) + 1])
  positions = np.arange(T) - starts[np.searchsorted(starts, np.arange(T), side="right") - 1]
  positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (B, T))
  kw = dict(top_k=8, q_positions=positions, k_positions=positions, q_segment_ids=segments,
            k_segment_ids=segments)
  with jax.default_matmul_precision("highest"):
    got = lightning_indexer(q, k, w, block_sizes=CHUNKED, **kw)
    want = reference.lightning_indexer(q, k, w, **kw)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  picked = np.asarray(got[0])
  seg = np.asarray(segments)
  for b, t, j in zip(*np.nonzero(picked >= 0)):
    assert seg[b, picked[b, t, j]] == seg[b, t] and picked[b, t, j] <= t
