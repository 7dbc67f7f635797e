"""pallas_kernels.mla_attention (interpret mode, both grid forms) against
pallas_kernels.reference.mla_attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from pallas_kernels.mla_attention import (BlockSizes, _Config, _kv_end, _q_begin, _q_end,
                                          mla_attention)

FORMS = {
    "portable": None,   # the CPU default: 16-blocks, each program loops over the streamed blocks
    # The Mosaic TPU form (streamed blocks on an in-order grid axis), with unequal blocks so the
    # causal skipping and the clamped block maps meet every alignment.
    "sequential": BlockSizes(block_q=16, block_k=32, block_q_bwd=32, block_k_bwd=16,
                             sequential_grid=True),
}


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


# Interpret mode compiles the kernels into one large XLA:CPU program; LLVM's optimisations take
# most of the test time and change no arithmetic.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "blocks"),
                   compiler_options=_FAST_COMPILE)
def _out_and_grads(q, k, v, do, segment_ids, *, causal, sm_scale, blocks):
  """(out, dq, dk, dv) of the kernel and of the reference, in one compilation."""
  results = []
  for fn in (functools.partial(mla_attention, block_sizes=blocks), reference.mla_attention):
    out, vjp = jax.vjp(functools.partial(fn, segment_ids=segment_ids, causal=causal,
                                         sm_scale=sm_scale), q, k, v)
    results.append((out, *vjp(do)))
  return results


def _assert_matches(q, k, v, do, *, segment_ids=None, causal=True, sm_scale=None, tol=1e-5,
                    blocks=None):
  got, want = _out_and_grads(q, k, v, do, segment_ids, causal=causal, sm_scale=sm_scale,
                             blocks=blocks)
  for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
    assert x.shape == y.shape and x.dtype == y.dtype, name
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               atol=tol, rtol=tol, err_msg=name)


@pytest.mark.parametrize(
    "b, t, s, h, d_qk, d_v, causal, sm_scale",
    [
        (2, 37, 29, 2, 24, 16, False, 0.3),    # lengths not block multiples, explicit scale
        (1, 21, 50, 2, 48, 32, True, None),    # causal cross lengths: T < S, bottom-right aligned
        (1, 50, 21, 2, 48, 32, True, None),    # T > S: the first rows see no key and give zeros
        (1, 20, 20, 2, 192, 128, True, None),  # DeepSeek MLA head dims (128 nope + 64 rope, 128)
    ])
@pytest.mark.parametrize("form", FORMS)
def test_matches_reference(b, t, s, h, d_qk, d_v, causal, sm_scale, form):
  q, k, v, do = _inputs(0, b, t, s, h, d_qk, d_v)
  with jax.default_matmul_precision("highest"):
    _assert_matches(q, k, v, do, causal=causal, sm_scale=sm_scale, blocks=FORMS[form])


def _random_case(seed):
  """A random problem: lengths 1-70 (T != S, or packed when equal), 1-3 heads, head dims not
  powers of two, causal or not, float32 or bfloat16."""
  rng = np.random.default_rng(seed)
  t = int(rng.integers(1, 71))
  s = t if rng.random() < 0.5 else int(rng.integers(1, 71))
  dims = dict(b=int(rng.integers(1, 3)), t=t, s=s, h=int(rng.integers(1, 4)),
              d_qk=int(rng.integers(1, 25)) * 8, d_v=int(rng.integers(1, 17)) * 8)
  segments = int(rng.integers(1, min(t, 4) + 1)) if t == s and t > 1 else 1
  return dims, bool(rng.random() < 0.7), segments, jnp.bfloat16 if seed % 3 == 2 else jnp.float32


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(seed, form):
  dims, causal, segments, dtype = _random_case(seed)
  q, k, v, do = _inputs(seed, dims["b"], dims["t"], dims["s"], dims["h"], dims["d_qk"],
                        dims["d_v"], dtype)
  seg = _segments(seed, dims["b"], dims["t"], segments) if segments > 1 else None
  with jax.default_matmul_precision("highest"):
    _assert_matches(q, k, v, do, segment_ids=seg, causal=causal, blocks=FORMS[form],
                    tol=2e-2 if dtype == jnp.bfloat16 else 1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_packed_segments(form):  # also causal self-attention with T = S not a block multiple
  q, k, v, do = _inputs(1, 2, 70, 70, 2, 24, 16)
  with jax.default_matmul_precision("highest"):
    _assert_matches(q, k, v, do, segment_ids=_segments(0, 2, 70, 4), causal=True,
                    blocks=FORMS[form])


@pytest.mark.parametrize("form", FORMS)
def test_bfloat16_packed_non_causal(form):
  q, k, v, do = _inputs(2, 2, 45, 45, 2, 48, 32, jnp.bfloat16)
  _assert_matches(q, k, v, do, segment_ids=_segments(1, 2, 45, 3), causal=False, tol=2e-2,
                  blocks=FORMS[form])


@pytest.mark.parametrize("causal", [True, False])
def test_padding_blocks_do_no_work(causal):
  """T = S = 40 pad to 64 for the 64-blocks; the 16-blocks past the real length are skipped:
  no key block for a padding query block, no query block for a padding key block."""
  c = _Config(t=40, s=40, causal=causal, sm_scale=1.0, blocks=None, interpret=True)
  assert _q_end(c, 16) == 3
  assert [int(_kv_end(c, i, 16, 16)) for i in range(4)] == ([1, 2, 3, 0] if causal else
                                                             [3, 3, 3, 0])
  assert [int(_q_begin(c, j, 16, 16)) for j in range(4)] == ([0, 1, 2, 3] if causal else
                                                             [0, 0, 0, 3])
  # Both grid forms stay exact with those padding blocks (the sequential form's clamped block
  # maps included).
  q, k, v, do = _inputs(6, 1, 40, 40, 2, 24, 16)
  for sequential in (False, True):
    blocks = BlockSizes(block_q=16, block_k=64, block_q_bwd=64, block_k_bwd=16,
                        sequential_grid=sequential)
    with jax.default_matmul_precision("highest"):
      _assert_matches(q, k, v, do, causal=causal, blocks=blocks)


def test_jit():
  q, k, v, _ = _inputs(3, 1, 18, 18, 2, 24, 16)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(functools.partial(mla_attention, causal=True),
                  compiler_options=_FAST_COMPILE)(q, k, v)
    np.testing.assert_allclose(got, reference.mla_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t, s", [(0, 8), (8, 0)])
def test_empty_lengths_are_refused(t, s):
  q, k, v, _ = _inputs(5, 1, t, s, 1, 16, 16)
  with pytest.raises(ValueError, match=f"T={t}, S={s}"):
    mla_attention(q, k, v, causal=False)


def test_block_sizes_must_be_powers_of_two():
  # A padded length is a multiple of the larger block; a non-power-of-two smaller block would
  # not divide it and drop rows.
  with pytest.raises(ValueError, match="powers of two.*block_k"):
    BlockSizes(block_q=16, block_k=48, block_q_bwd=16, block_k_bwd=16)


def test_segment_ids_need_self_attention():
  q, k, v, _ = _inputs(5, 1, 8, 12, 1, 16, 16)
  with pytest.raises(ValueError, match="T == S"):
    mla_attention(q, k, v, segment_ids=jnp.zeros((1, 8), jnp.int32))
