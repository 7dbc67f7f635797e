"""Every kernel's TPU form on CPU: run in Pallas's TPU interpreter (`pltpu.InterpretParams`)
against its pure-jnp reference, and traced at production shapes for Mosaic's block rules and
the VMEM budget (tests/tpu_rules.py).

`interpret=pltpu.InterpretParams()` makes each kernel take the form it takes on a TPU: the TPU
block sizes, the sequential (in-order, VMEM-scratch) grids of attention and gmm, the SMEM
lengths of decode, Mosaic's compiler parameters. The interpreter simulates TPU memory spaces
and DMAs and fills uninitialised memory with NaN (scratch, and block tails past an array's
end), so a tail the kernel does not mask or a scratch it does not zero shows up as NaN.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels as pk
from pallas_kernels import reference
from pallas_kernels.gmm import BlockSizes as GmmBlockSizes
from pallas_kernels.mla_attention import BlockSizes as AttentionBlockSizes
from pallas_kernels.mla_decode import MlaDecodeBlockSizes
import tpu_rules

TPU = pltpu.InterpretParams()
BF16 = jnp.bfloat16


def _random(seed, *shapes, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return [jax.random.normal(k, s).astype(dtype) for k, s in zip(keys, shapes)]


def _close(actual, expected, tol, name=""):
  expected = np.asarray(expected, np.float32)
  np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=tol,
                             atol=tol * max(1.0, float(np.max(np.abs(expected)))), err_msg=name)


def _vjp_both(kernel, ref, args, cotangent):
  """(out, *grads) of kernel and of ref."""
  results = []
  for fn in (kernel, ref):
    out, vjp = jax.vjp(fn, *args)
    results.append((out, *vjp(cotangent)))
  return results


def test_tpu_interpreter_picks_the_tpu_forms():
  assert AttentionBlockSizes.for_backend(pk.platform.target(TPU)).sequential_grid
  assert GmmBlockSizes.for_platform(pk.platform.target(TPU)).sequential_grid
  assert MlaDecodeBlockSizes.get_default(pk.platform.target(TPU)).sequential_grid
  assert pk.platform.target(True) == "interpret" and pk.platform.resolve_interpret(TPU) is TPU


# -- The TPU forms, run in the TPU interpreter. -------------------------------------------------


@pytest.mark.parametrize(
    "t, s, causal, packed, dtype",
    [
        (300, 300, True, True, jnp.float32),    # 3 query/key blocks of 128, tails, 4 segments
        (130, 300, True, False, jnp.float32),   # T < S: bottom-right causal, key blocks skipped
        (300, 130, True, False, jnp.float32),   # T > S: the first rows see no key -> zeros
        (200, 200, False, True, BF16),          # non-causal packed, bfloat16
    ])
def test_attention(t, s, causal, packed, dtype):
  b, h = 2, 2
  q, k, v, do = _random(0, (b, t, h, 192), (b, s, h, 192), (b, s, h, 128), (b, t, h, 128),
                        dtype=dtype)
  seg = None
  if packed:
    seg = jnp.asarray(np.repeat(np.arange(4), -(-t // 4))[None, :t].repeat(b, 0), jnp.int32)
  kw = dict(segment_ids=seg, causal=causal)
  with jax.default_matmul_precision("highest"):
    got, want = _vjp_both(functools.partial(pk.mla_attention, interpret=TPU, **kw),
                          functools.partial(reference.mla_attention, **kw), (q, k, v), do)
  for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
    _close(x, y, 2e-2 if dtype == BF16 else 1e-5, name)


@pytest.mark.parametrize("b, h, lengths", [
    (4, 16, [0, 1, 999, 517]),   # empty row, one entry, block tails: steps past the length
    (1, 3, [1000]),              # the whole cache, its last block a tail; 3 heads pad to 8
])
def test_decode(b, h, lengths):
  lat, rope, cache, krope = _random(1, (b, h, 512), (b, h, 64), (b, 1000, 512), (b, 1000, 64))
  lengths = jnp.asarray(lengths, jnp.int32)
  with jax.default_matmul_precision("highest"):
    got = pk.mla_decode(lat, rope, cache, krope, lengths, sm_scale=0.05, interpret=TPU)
    want = reference.mla_decode(lat, rope, cache, krope, lengths, sm_scale=0.05)
  _close(got, want, 1e-5)


@pytest.mark.parametrize("k", [256, 200])   # 200: a k tail inside the last 128-block
def test_gmm(k):
  m, n = 300, 384
  lhs, rhs, cot = _random(2, (m, k), (8, k, n), (m, n))
  sizes = jnp.asarray([0, 100, 1, 0, 50, 60, 39, 30], jnp.int32)   # empty groups, rows past
  with jax.default_matmul_precision("highest"):
    got, want = _vjp_both(lambda a, w: pk.gmm(a, w, sizes, interpret=TPU),
                          lambda a, w: reference.gmm(a, w, sizes), (lhs, rhs), cot)
  for name, x, y in zip(("out", "d lhs", "d rhs"), got, want):
    _close(x, y, 1e-5, name)


@pytest.mark.parametrize("kw", [
    dict(top_k=8, n_group=8, topk_group=4, score_fn="sigmoid", routed_scaling_factor=2.5),
    dict(top_k=6, n_group=1, topk_group=1, score_fn="softmax", norm_topk_prob=False),
], ids=["v3", "v2"])
def test_moe_route(kw):
  (logits,) = _random(3, (300, 256))   # 300 tokens: a tail block of the 256-token default
  logits = logits.at[150:].set(jnp.round(logits[150:] * 2) / 2)   # ties
  bias = 0.1 * _random(4, (256,))[0] if kw["score_fn"] == "sigmoid" else None
  weights, experts = pk.moe_route(logits, bias, interpret=TPU, **kw)
  ref_weights, ref_experts = reference.moe_route(logits, bias, **kw)
  np.testing.assert_array_equal(np.asarray(experts), np.asarray(ref_experts))
  _close(weights, ref_weights, 1e-6)


# -- Mosaic's rules at production shapes (traced, not run). -------------------------------------


def _abstract(*shapes, dtype=BF16):
  return [jax.ShapeDtypeStruct(s, dtype) for s in shapes]


def _attention_train_step(**kw):
  """(q, k, v, segment_ids) -> gradients of the TPU form's output sum: forward and backward."""
  def loss(q, k, v, segment_ids):
    return jnp.sum(pk.mla_attention(q, k, v, segment_ids=segment_ids, interpret=TPU,
                                    **kw).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("t, h", [(4096, 128), (32768, 16)])
def test_attention_blocks_fit_at_long_sequences(t, h):
  args = _abstract((1, t, h, 192), (1, t, h, 192), (1, t, h, 128))
  segments = jax.ShapeDtypeStruct((1, t), jnp.int32)
  used = tpu_rules.assert_mosaic_blocks(_attention_train_step(), *args, segments)
  assert used < 2 * 2**20   # one block of each operand: independent of the length


def test_portable_attention_would_not_fit_tpu_vmem():
  """Why the TPU form exists: the portable form holds (b, h)'s whole K, V (and Q, dO for dk/dv)
  in VMEM, 28 MiB for dk/dv at 8k tokens."""
  portable = dataclasses.replace(AttentionBlockSizes.for_backend("tpu"), sequential_grid=False)
  calls = tpu_rules.pallas_calls(_attention_train_step(block_sizes=portable),
                                 *_abstract((1, 8192, 16, 192), (1, 8192, 16, 192),
                                            (1, 8192, 16, 128)), None)
  used = {tpu_rules.kernel_name(eqn): tpu_rules.vmem_bytes(eqn) for eqn in calls}
  assert used["mla_attention_dkv"] > tpu_rules.VMEM_BUDGET, used


@pytest.mark.parametrize("s", [4096, 32768])
def test_decode_blocks_fit(s):
  args = _abstract((64, 128, 512), (64, 128, 64), (64, s, 512), (64, s, 64))
  lengths = jax.ShapeDtypeStruct((64,), jnp.int32)
  used = tpu_rules.assert_mosaic_blocks(
      functools.partial(pk.mla_decode, sm_scale=0.05, interpret=TPU), *args, lengths)
  assert used < 4 * 2**20   # one cache block at a time: independent of the cache length


@pytest.mark.parametrize("m, k, n, g", [(32768, 7168, 2048, 32), (32768, 2048, 7168, 32)])
def test_gmm_blocks_fit_at_deepseek_v3_expert_shapes(m, k, n, g):
  def step(lhs, rhs, sizes):
    return jax.grad(lambda a, w: jnp.sum(pk.gmm(a, w, sizes, interpret=TPU).astype(jnp.float32)),
                    argnums=(0, 1))(lhs, rhs)
  tpu_rules.assert_mosaic_blocks(step, *_abstract((m, k), (g, k, n)),
                                 jax.ShapeDtypeStruct((g,), jnp.int32))


def test_moe_route_blocks_fit():
  tpu_rules.assert_mosaic_blocks(
      functools.partial(pk.moe_route, top_k=8, n_group=8, topk_group=4, interpret=TPU),
      *_abstract((16384, 256), (256,), dtype=jnp.float32))


def test_rules_catch_a_bad_block():
  """The checker itself: a (8, 64) block of a (16, 256) array breaks the 128-lane rule."""
  from jax.experimental import pallas as pl

  def copy(x):
    return pl.pallas_call(lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...]),
                          out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(2, 4),
                          in_specs=[pl.BlockSpec((8, 64), lambda i, j: (i, j))],
                          out_specs=pl.BlockSpec((8, 64), lambda i, j: (i, j)),
                          interpret=TPU)(x)
  with pytest.raises(AssertionError, match="multiple of 128"):
    tpu_rules.assert_mosaic_blocks(copy, jax.ShapeDtypeStruct((16, 256), jnp.float32))
