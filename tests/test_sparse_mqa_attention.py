"""sparse_mqa_attention (Pallas, interpret mode) against pallas_kernels.reference and against a
dense-mask formulation: forward and the gradients in q, kv and sink, on shapes that are no block
multiples, with every row pattern (no slot, one slot, a partial random set, all K slots, K >= S)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from pallas_kernels.sparse_mqa_attention import BlockSizes, sparse_mqa_attention

B, T, H, S, D, DV = 2, 5, 3, 23, 40, 24     # D = 32 + 16 pieces around d_v = 24 (+8 zero pad)
SCALE = 0.3
PORTABLE = BlockSizes(block_k=4, bwd_chunk=2)              # 2 slot blocks; 3 backward chunks
HEAD_BLOCKS = BlockSizes(block_k=8, block_h=2, min_heads=4)  # 3 heads -> 4, two programs a row
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _indices(k, seed):
  """[B,T,k] int32, row patterns in turn: no slot, one slot, a random partial set with -1 in
  between, every slot filled; indices distinct within a row."""
  rng = np.random.default_rng(seed)
  out = -np.ones((B, T, k), np.int64)
  for row, (b, t) in enumerate(np.ndindex(B, T)):
    n = [0, 1, int(rng.integers(2, k)) if k > 2 else k, k][row % 4]
    n = min(n, S)
    slots = rng.permutation(k)[:n]
    out[b, t, slots] = rng.choice(S, n, replace=False)
  return jnp.asarray(out, jnp.int32)


def dense_masked(q, kv, indices, *, d_v, sm_scale, sink=None):
  """The same attention as a dense [T, S] mask: the formulation the sparse kernel replaces."""
  valid = (indices >= 0) & (indices < S)
  one_hot = jax.nn.one_hot(jnp.where(valid, indices, S), S, dtype=bool)    # [B,T,K,S]
  mask = one_hot.any(axis=2)[:, :, None, :]                                # [B,T,1,S]
  scores = jnp.einsum("bthd,bsd->bths", q, kv, preferred_element_type=jnp.float32) * sm_scale
  scores = jnp.where(mask, scores, -jnp.inf)
  if sink is not None:
    sinks = jnp.broadcast_to(sink.astype(jnp.float32)[None, None, :, None], scores.shape[:3] + (1,))
    scores = jnp.concatenate([scores, sinks], axis=-1)
  top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  p = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = (p / jnp.where(denom == 0, 1.0, denom))[..., :S]
  return jnp.einsum("bths,bsd->bthd", p, kv[..., :d_v].astype(jnp.float32)).astype(q.dtype)


def _operands(dtype, seed, k):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (B, T, H, D)).astype(dtype)
  kv = jax.random.normal(keys[1], (B, S, D)).astype(dtype)
  sink = jax.random.normal(keys[2], (H,))
  cotangent = jax.random.normal(keys[3], (B, T, H, DV)).astype(dtype)
  return q, kv, _indices(k, seed), sink, cotangent


def _close(actual, expected, tol, what):
  expected = np.asarray(expected, np.float32)
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=tol,
                             atol=tol * scale, err_msg=what)


def _check(dtype, with_sink, blocks, k=7, seed=0):
  q, kv, indices, sink, cotangent = _operands(dtype, seed, k)
  sink = sink if with_sink else None
  kw = dict(d_v=DV, sm_scale=SCALE)
  fns = {"kernel": lambda q, kv, s: sparse_mqa_attention(q, kv, indices, sink=s,
                                                         block_sizes=blocks, **kw),
         "reference": lambda q, kv, s: reference.sparse_mqa_attention(q, kv, indices, sink=s,
                                                                      **kw),
         "dense mask": lambda q, kv, s: dense_masked(q, kv, indices, sink=s, **kw)}
  results = {}
  with jax.default_matmul_precision("highest"):
    for name, fn in fns.items():
      out, vjp = jax.vjp(jax.jit(fn), q, kv, sink)
      results[name] = (out, *vjp(cotangent))
  out = results["kernel"][0]
  assert out.shape == (B, T, H, DV) and out.dtype == dtype
  for name in ("reference", "dense mask"):
    for what, a, e in zip(("out", "dq", "dkv", "dsink"), results["kernel"], results[name]):
      if e is not None:
        _close(a, e, TOL[dtype], f"{what} against the {name}")
  empty = np.asarray((indices < 0).all(axis=-1))
  assert empty.any()
  if not with_sink:   # a row with nothing to attend gives exact zeros, and no gradient
    assert not np.any(np.asarray(out)[empty])
    assert not np.any(np.asarray(results["kernel"][1])[empty])
  return results


@pytest.mark.parametrize("with_sink, blocks", [
    (False, PORTABLE), (True, PORTABLE), (True, HEAD_BLOCKS),
    pytest.param(False, HEAD_BLOCKS, marks=pytest.mark.slow)],
    ids=["portable-no_sink", "portable-sink", "head_blocks-sink", "head_blocks-no_sink"])
def test_matches_reference_and_dense_mask(with_sink, blocks):
  _check(jnp.float32, with_sink, blocks)


def test_bfloat16():
  _check(jnp.bfloat16, True, PORTABLE, seed=1)


def test_k_at_least_s_attends_every_key():
  """K = S + 3: every key in some slot of every full row, the rest empty; a full row equals
  dense attention over all S keys."""
  results = _check(jnp.float32, True, PORTABLE, k=S + 3, seed=2)
  assert results["kernel"][0].shape == (B, T, H, DV)


def test_backward_is_deterministic():
  """dkv is a scatter-add of the per-slot rows; on CPU two runs give the same bits."""
  q, kv, indices, sink, cotangent = _operands(jnp.float32, 3, 7)
  grad = jax.jit(jax.grad(lambda q, kv, s: jnp.sum(sparse_mqa_attention(
      q, kv, indices, d_v=DV, sm_scale=SCALE, sink=s, block_sizes=PORTABLE) * cotangent),
      argnums=(0, 1, 2)))
  first, second = grad(q, kv, sink), grad(q, kv, sink)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_indices_outside_the_cache_are_empty_slots():
  """Anything outside [0, S) is an empty slot, as -1 is, in the kernel and the reference."""
  q, kv, indices, sink, _ = _operands(jnp.float32, 4, 7)
  wild = jnp.where(indices < 0, jnp.asarray([-5, S, S + 100, -1])[jnp.arange(7) % 4], indices)
  kw = dict(d_v=DV, sm_scale=SCALE, sink=sink)
  with jax.default_matmul_precision("highest"):
    expected = reference.sparse_mqa_attention(q, kv, indices, **kw)
    for fn in (reference.sparse_mqa_attention,
               lambda *a, **k: sparse_mqa_attention(*a, block_sizes=PORTABLE, **k)):
      _close(fn(q, kv, wild.astype(jnp.int32), **kw), expected, 2e-5, "out-of-range slots")
