"""pallas_kernels.mla_attention against pallas_kernels.reference.mla_attention (interpret mode)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from pallas_kernels.mla_attention import mla_attention


def _inputs(seed, b, t, s, h, d_qk, d_v, dtype=jnp.float32):
  """q, k, v and an output cotangent."""
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(kq, (b, t, h, d_qk), dtype),
          jax.random.normal(kk, (b, s, h, d_qk), dtype),
          jax.random.normal(kv, (b, s, h, d_v), dtype),
          jax.random.normal(kd, (b, t, h, d_v), dtype))


def _segments(seed, b, t, n):
  """Sorted segment ids [B,T] with exactly n segments per row, random boundaries."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((b, t), np.int32)
  for row in ids:
    row[np.sort(rng.choice(np.arange(1, t), n - 1, replace=False))] = 1
  return jnp.asarray(np.cumsum(ids, axis=1, dtype=np.int32))


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale"))
def _out_and_grads(q, k, v, do, segment_ids, *, causal, sm_scale):
  """(out, dq, dk, dv) of the kernel and of the reference, in one compilation."""
  results = []
  for fn in (mla_attention, reference.mla_attention):
    out, vjp = jax.vjp(functools.partial(fn, segment_ids=segment_ids, causal=causal,
                                         sm_scale=sm_scale), q, k, v)
    results.append((out, *vjp(do)))
  return results


def _assert_matches(q, k, v, do, *, segment_ids=None, causal=True, sm_scale=None, tol=1e-5):
  got, want = _out_and_grads(q, k, v, do, segment_ids, causal=causal, sm_scale=sm_scale)
  for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
    assert x.shape == y.shape and x.dtype == y.dtype, name
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               atol=tol, rtol=tol, err_msg=name)


@pytest.mark.parametrize(
    "b, t, s, h, d_qk, d_v, causal",
    [
        (2, 37, 37, 2, 24, 16, True),     # lengths not block multiples
        (2, 37, 29, 2, 24, 16, False),    # non-causal, T != S
        (1, 21, 50, 2, 48, 32, True),     # causal cross lengths: T < S, bottom-right aligned
        (1, 50, 21, 2, 48, 32, True),     # T > S: the first rows see no key and give zeros
        (1, 20, 20, 2, 192, 128, True),   # DeepSeek MLA head dims (128 nope + 64 rope, 128)
    ])
def test_matches_reference(b, t, s, h, d_qk, d_v, causal):
  q, k, v, do = _inputs(0, b, t, s, h, d_qk, d_v)
  with jax.default_matmul_precision("highest"):
    _assert_matches(q, k, v, do, causal=causal)


def test_sm_scale():
  q, k, v, do = _inputs(1, 1, 24, 24, 1, 24, 16)
  with jax.default_matmul_precision("highest"):
    _assert_matches(q, k, v, do, causal=True, sm_scale=0.3)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_segments(causal):
  q, k, v, do = _inputs(2, 2, 70, 70, 2, 24, 16)
  segment_ids = _segments(0, 2, 70, 4)
  with jax.default_matmul_precision("highest"):
    _assert_matches(q, k, v, do, segment_ids=segment_ids, causal=causal)


def test_bfloat16():
  q, k, v, do = _inputs(3, 2, 45, 45, 2, 48, 32, jnp.bfloat16)
  _assert_matches(q, k, v, do, segment_ids=_segments(1, 2, 45, 3), causal=True, tol=2e-2)


def test_jit_and_grad():
  q, k, v, _ = _inputs(4, 1, 18, 18, 2, 24, 16)
  loss = lambda fn, q, k, v: jnp.sum(fn(q, k, v) ** 2)
  with jax.default_matmul_precision("highest"):
    out = jax.jit(mla_attention)(q, k, v)
    grads = jax.jit(jax.grad(functools.partial(loss, mla_attention), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(functools.partial(loss, reference.mla_attention), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out, reference.mla_attention(q, k, v), atol=1e-5, rtol=1e-5)
  for g, w in zip(grads, want):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_segment_ids_need_self_attention():
  q, k, v, _ = _inputs(5, 1, 8, 12, 1, 16, 16)
  with pytest.raises(ValueError, match="T == S"):
    mla_attention(q, k, v, segment_ids=jnp.zeros((1, 8), jnp.int32))
