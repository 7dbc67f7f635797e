"""pallas_kernels.xla_attention (deepjax's attention_impl="xla" training path, chunked with a
hand-written backward pass) against pallas_kernels.reference.mla_attention: outputs and
gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference, xla_attention
from test_mla_attention import _inputs


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "rows", "blocks"))
def _out_and_grads(q, k, v, do, segment_ids, *, causal, sm_scale, rows, blocks):
  """(out, dq, dk, dv) of xla_attention (chunks of `rows` batch rows, `blocks` causal
  query blocks) and of the reference."""
  ours = functools.partial(xla_attention._attention, segment_ids=segment_ids, causal=causal,
                           sm_scale=sm_scale, rows=rows, blocks=blocks)
  ref = functools.partial(reference.mla_attention, segment_ids=segment_ids, causal=causal,
                          sm_scale=sm_scale)
  results = []
  for fn in (ours, ref):
    out, vjp = jax.vjp(fn, q, k, v)
    results.append((out, *vjp(do)))
  return results


@pytest.mark.parametrize("b, t, s, h, d_qk, d_v, causal, segments, rows, blocks", [
    (4, 16, 16, 2, 12, 8, True, True, 1, 1),     # chunked one row at a time, packed documents
    (4, 16, 16, 2, 12, 8, True, True, 2, 4),     # + causal query blocks
    (3, 9, 9, 3, 8, 8, True, False, 3, 3),       # one chunk, Dqk == Dv
    (2, 10, 10, 2, 6, 10, False, True, 1, 2),    # bidirectional within segments (no blocks)
    (2, 6, 12, 2, 8, 4, True, False, 1, 3),      # queries continuing a cache (T < S)
    (2, 8, 4, 2, 8, 4, True, False, 2, 4),       # T > S: the first rows see no key -> zeros
])
def test_matches_reference_with_gradients(b, t, s, h, d_qk, d_v, causal, segments, rows,
                                          blocks):
  q, k, v, do = _inputs(b * t + s, b, t, s, h, d_qk, d_v)
  segment_ids = None
  if segments:
    rng = np.random.default_rng(t)
    segment_ids = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1), jnp.int32)
    segment_ids = segment_ids.at[0].set(jnp.arange(t) % 3)     # interleaved: tiny segments
  with jax.default_matmul_precision("highest"):
    got, want = _out_and_grads(q, k, v, do, segment_ids, causal=causal, sm_scale=0.37,
                               rows=rows, blocks=blocks)
  for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5, err_msg=name)
  if t > s:
    np.testing.assert_array_equal(got[0][:, : t - s], 0.0)


def test_public_entry_point_and_bfloat16():
  q, k, v, do = _inputs(0, 2, 12, 12, 2, 16, 8, jnp.bfloat16)
  segment_ids = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12], jnp.int32)
  kw = dict(segment_ids=segment_ids, causal=True, sm_scale=0.25)
  out, vjp = jax.vjp(functools.partial(xla_attention.mla_attention, **kw), q, k, v)
  ref_out, ref_vjp = jax.vjp(functools.partial(reference.mla_attention, **kw), q, k, v)
  assert out.dtype == jnp.bfloat16
  for a, e in zip((out, *vjp(do)), (ref_out, *ref_vjp(do))):
    a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
    assert np.max(np.abs(a - e)) / np.max(np.abs(e)) < 2e-2


def test_query_blocks_cover_every_query_and_visible_key():
  assert xla_attention._query_blocks(256, 256, True, 4) == [
      (0, 64, 64), (64, 128, 128), (128, 192, 192), (192, 256, 256)]
  assert xla_attention._query_blocks(4, 10, True, 2) == [(0, 2, 8), (2, 4, 10)]
  assert xla_attention._query_blocks(8, 8, False, 4) == [(0, 8, 8)]
  assert xla_attention._query_blocks(9, 9, True, 4) == [(0, 9, 9)]


def test_chunk_rows_divide_the_batch_and_fit():
  assert xla_attention.rows_per_chunk(16, 4, 256, 256) == 2      # tiny preset: 1 MiB per row
  assert xla_attention.rows_per_chunk(6, 16, 1024, 1024) == 1
  assert xla_attention.rows_per_chunk(12, 2, 8, 8) == 12         # small: one chunk
  assert xla_attention.rows_per_chunk(7, 4, 256, 256) == 1       # prime batch
  with pytest.raises(ValueError, match="T == S"):
    q, k, v, _ = _inputs(0, 1, 3, 5, 1, 4, 4)
    xla_attention.mla_attention(q, k, v, segment_ids=jnp.ones((1, 3), jnp.int32))
