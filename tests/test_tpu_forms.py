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
from pallas_kernels.mla_decode import BlockSizes as DecodeBlockSizes
from pallas_kernels.sparse_mqa_attention import BlockSizes as SparseBlockSizes
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
  assert AttentionBlockSizes.get_default(pk.platform.target(TPU)).sequential_grid
  assert GmmBlockSizes.get_default(pk.platform.target(TPU)).sequential_grid
  assert DecodeBlockSizes.get_default(pk.platform.target(TPU)).sequential_grid
  assert SparseBlockSizes.get_default(pk.platform.target(TPU)).dma_gather
  assert pk.platform.target(True) == "interpret" and pk.platform.resolve_interpret(TPU) is TPU


def test_compiler_params_follow_the_form(monkeypatch):
  """Triton's launch parameters compiled on a GPU, Mosaic's grid semantics on a TPU or in its
  interpreter, none in plain interpret mode."""
  semantics = ("parallel", "arbitrary")
  assert pk.platform.compiler_params(True, semantics, num_warps=4) is None
  tpu = pk.platform.compiler_params(TPU, semantics, num_warps=4)
  assert isinstance(tpu, pltpu.CompilerParams) and tpu.dimension_semantics == semantics
  monkeypatch.setattr(pk.platform, "backend", lambda: "gpu")
  gpu = pk.platform.compiler_params(False, semantics, num_warps=8, num_stages=3)
  assert isinstance(gpu, pk.platform.pltriton.CompilerParams)
  assert (gpu.num_warps, gpu.num_stages) == (8, 3)


# -- The TPU forms, run in the TPU interpreter. -------------------------------------------------


# Query and key blocks of different sizes, swapped between the forward and dk/dv kernels.
UNEQUAL = AttentionBlockSizes(block_q=128, block_k=256, block_q_bwd=256, block_k_bwd=128,
                              sequential_grid=True)


@pytest.mark.parametrize(
    "t, s, causal, packed, dtype, blocks",
    [
        (300, 300, True, True, jnp.float32, None),  # 3 query/key blocks of 128, tails, 4 segments
        (130, 300, True, False, jnp.float32, None),   # T < S: bottom-right causal, blocks skipped
        (300, 130, True, False, jnp.float32, None),   # T > S: the first rows see no key -> zeros
        (200, 200, False, True, BF16, None),          # non-causal packed, bfloat16
        (300, 300, True, True, jnp.float32, UNEQUAL),   # unequal blocks: packed,
        (300, 400, True, False, jnp.float32, UNEQUAL),  # T < S causal,
        (400, 300, False, False, jnp.float32, UNEQUAL),  # T > S non-causal
    ])
def test_attention(t, s, causal, packed, dtype, blocks):
  b, h = 2, 2
  q, k, v, do = _random(0, (b, t, h, 192), (b, s, h, 192), (b, s, h, 128), (b, t, h, 128),
                        dtype=dtype)
  seg = None
  if packed:
    seg = jnp.asarray(np.repeat(np.arange(4), -(-t // 4))[None, :t].repeat(b, 0), jnp.int32)
  kw = dict(segment_ids=seg, causal=causal)
  with jax.default_matmul_precision("highest"):
    got, want = _vjp_both(functools.partial(pk.mla_attention, interpret=TPU, block_sizes=blocks,
                                            **kw),
                          functools.partial(reference.mla_attention, **kw), (q, k, v), do)
  for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
    _close(x, y, 2e-2 if dtype == BF16 else 1e-5, name)


@pytest.mark.parametrize("b, h, lengths", [
    (4, 16, [0, 1, 999, 517]),   # empty row, one entry, block tails: steps past the length
    (1, 3, [1000]),              # the whole cache, its last block a tail; 3 heads pad to 8
    (3, 8, [-3, 1500, 512]),     # lengths out of range: none, and the whole cache; 512 = 1 block
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


# -- Megacore: the 'parallel' grid axes split over two cores, run with race detection. ---------

TWO_CORES = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)



def _sparse_operands(seed, b, t, h, s, d, k):
  q, kv, sink = _random(seed, (b, t, h, d), (b, s, d), (h,))
  rng = np.random.default_rng(seed)
  indices = np.stack([np.where(np.arange(k) < rng.integers(0, k + 1), rng.permutation(s)[:k], -1)
                      for _ in range(b * t)]).reshape(b, t, k)
  indices[0, 0] = -1                                     # a row with no slot at all
  return q, kv, jnp.asarray(indices, jnp.int32), sink


@pytest.mark.parametrize("d, k, with_sink", [
    (576, 136, False), pytest.param(512, 40, True, marks=pytest.mark.slow)],
    ids=["v3.2", "v4_sink"])
def test_sparse_mqa_attention(d, k, with_sink):
  """The DMA form: slots copied into SMEM, one DMA per gathered row. V3.2's 512 | 64 split
  with 136 slots (a tail in the second 128-slot block); V4's 512 = d_v with a sink. 3 heads
  padded to 8; one of the two rows has no slot."""
  q, kv, indices, sink = _sparse_operands(9, 1, 2, 3, 300, d, k)
  sink = sink if with_sink else None
  kw = dict(d_v=512, sm_scale=0.05, sink=sink)
  (cot,) = _random(10, (1, 2, 3, 512))
  with jax.default_matmul_precision("highest"):
    got, want = _vjp_both(lambda q, kv: pk.sparse_mqa_attention(q, kv, indices, interpret=TPU,
                                                                **kw),
                          lambda q, kv: reference.sparse_mqa_attention(q, kv, indices, **kw),
                          (q, kv), cot)
  for name, x, y in zip(("out", "dq", "dkv"), got, want):
    _close(x, y, 1e-5, name)


def test_lightning_indexer():
  """The score tiles in the TPU form (128 x 128 tiles, heads looped) and the running top-k."""
  q, k, w = _random(11, (1, 200, 4, 128), (1, 300, 128), (1, 200, 4))
  q_pos = jnp.arange(100, 300, dtype=jnp.int32)[None]
  k_pos = jnp.arange(300, dtype=jnp.int32)[None]
  kw = dict(top_k=64, q_positions=q_pos, k_positions=k_pos)
  with jax.default_matmul_precision("highest"):
    got = pk.lightning_indexer(q, k, w, interpret=TPU, **kw)
    want = reference.lightning_indexer(q, k, w, **kw)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  _close(got[1], want[1], 1e-5)

@pytest.fixture
def race_checks(monkeypatch):
  """The race-detection state of every kernel the TPU interpreter runs (it makes one per
  pallas_call and keeps only the last)."""
  interpreter = pytest.importorskip("jax._src.pallas.mosaic.interpret.interpret_pallas_call",
                                    reason="the TPU interpreter's race detector moved")
  states = []

  class Recorded(interpreter.RaceDetectionState):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      states.append(self)

  monkeypatch.setattr(interpreter, "RaceDetectionState", Recorded)
  return states


def test_race_detector_sees_two_cores_writing_one_block(race_checks):
  """The check below can fail: a 'parallel' axis whose programs share an output block races."""
  from jax.experimental import pallas as pl

  def kernel(x_ref, o_ref):
    o_ref[...] += x_ref[...]
  racy = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                        grid=(2,), in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
                        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
                        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
                        interpret=TWO_CORES)
  jax.block_until_ready(racy(jnp.ones((16, 128))))
  assert [state.races_found for state in race_checks] == [True]


def _attention_fwd_bwd():
  q, k, v = _random(5, (1, 300, 2, 192), (1, 300, 2, 192), (1, 300, 2, 128))
  out, vjp = jax.vjp(functools.partial(pk.mla_attention, interpret=TWO_CORES), q, k, v)
  return vjp(out)


def _decode():
  lat, rope, cache, krope = _random(6, (2, 8, 512), (2, 8, 64), (2, 1000, 512), (2, 1000, 64))
  return pk.mla_decode(lat, rope, cache, krope, jnp.asarray([700, 1000], jnp.int32),
                       sm_scale=0.05, interpret=TWO_CORES)


def _gmm_fwd_bwd():
  lhs, rhs = _random(7, (300, 256), (4, 256, 256))
  sizes = jnp.asarray([100, 0, 150, 50], jnp.int32)
  out, vjp = jax.vjp(lambda a, w: pk.gmm(a, w, sizes, interpret=TWO_CORES), lhs, rhs)
  return vjp(out)


def _route():
  (logits,) = _random(8, (600, 64))
  return pk.moe_route(logits, None, top_k=4, n_group=4, topk_group=2, interpret=TWO_CORES)


def _sparse_fwd_bwd():
  q, kv, indices, sink = _sparse_operands(12, 2, 2, 8, 100, 64, 24)
  blocks = SparseBlockSizes(block_k=8, min_heads=8, dma_gather=True)
  out, vjp = jax.vjp(lambda q, kv, sink: pk.sparse_mqa_attention(
      q, kv, indices, d_v=32, sm_scale=0.1, sink=sink, interpret=TWO_CORES,
      block_sizes=blocks), q, kv, sink)
  return vjp(out)


def _indexer():
  q, k, w = _random(13, (2, 256, 4, 128), (2, 256, 128), (2, 256, 4))
  positions = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (2, 256))
  return pk.lightning_indexer(q, k, w, top_k=16, q_positions=positions, k_positions=positions,
                              interpret=TWO_CORES)


@pytest.mark.parametrize("run, kernels", [
    (_attention_fwd_bwd, 3), (_decode, 1), (_gmm_fwd_bwd, 3), (_route, 1),
    (_sparse_fwd_bwd, 2), (_indexer, 1)],
    ids=["attention", "decode", "gmm", "moe_route", "sparse_mqa_attention",
         "lightning_indexer"])
def test_parallel_axes_are_race_free_on_two_cores(race_checks, run, kernels):
  jax.block_until_ready(run())
  assert len(race_checks) == kernels
  assert not any(state.races_found for state in race_checks)


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
  portable = dataclasses.replace(AttentionBlockSizes.get_default("tpu"), sequential_grid=False)
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


@pytest.mark.parametrize("h, d, d_v, k, sink", [(128, 576, 512, 2048, False),   # V3.2 DSA
                                                (64, 512, 512, 640, True)],       # V4-Flash CSA
                         ids=["v3.2", "v4-flash"])
def test_sparse_mqa_attention_blocks_fit(h, d, d_v, k, sink):
  """Forward and backward at production shapes: VMEM holds a row's q, its slots and one block
  of gathered rows (plus the backward's per-slot dkv rows), whatever the sequence length."""
  def step(q, kv, indices, sink):
    def loss(q, kv, sink):
      out = pk.sparse_mqa_attention(q, kv, indices, d_v=d_v, sm_scale=0.04, sink=sink,
                                    interpret=TPU)
      return jnp.sum(out.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2) if sink is not None else (0, 1))(q, kv, sink)
  t = 8192
  used = tpu_rules.assert_mosaic_blocks(
      step, *_abstract((1, t, h, d), (1, t, d)), jax.ShapeDtypeStruct((1, t, k), jnp.int32),
      jax.ShapeDtypeStruct((h,), jnp.float32) if sink else None)
  assert used < 12 * 2**20, used


@pytest.mark.parametrize("t, s", [(8192, 8192), (32768, 8192)])
def test_lightning_indexer_blocks_fit(t, s):
  positions = [jax.ShapeDtypeStruct((1, n), jnp.int32) for n in (t, s)]
  used = tpu_rules.assert_mosaic_blocks(
      lambda q, k, w, qp, kp: pk.lightning_indexer(q, k, w, top_k=2048, q_positions=qp,
                                                   k_positions=kp, interpret=TPU),
      *_abstract((1, t, 64, 128), (1, s, 128), (1, t, 64)), *positions)
  assert used < 8 * 2**20, used


def _copy(shape, block, semantics=None, dtype=jnp.float32):
  """A blocked copy of an array of `shape`, for the checker's own tests."""
  from jax.experimental import pallas as pl
  grid = tuple(-(-a // b) for a, b in zip(shape, block))
  index = lambda *ij: ij
  params = semantics and pltpu.CompilerParams(dimension_semantics=semantics)
  call = pl.pallas_call(lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...]),
                        out_shape=jax.ShapeDtypeStruct(shape, dtype), grid=grid,
                        in_specs=[pl.BlockSpec(block, index)],
                        out_specs=pl.BlockSpec(block, index), compiler_params=params,
                        interpret=TPU)
  return call, jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("shape, block, semantics, dtype, error", [
    ((16, 256), (8, 64), None, jnp.float32, "multiple of 128"),
    ((12, 256), (4, 128), None, jnp.float32, "multiple of 8"),
    ((1000,), (200,), None, jnp.float32, "rank-1 block 200"),
    ((1000,), (128,), None, BF16, "power of two >= 256"),   # bf16 packs 2 per 32-bit lane
    ((16, 256), (8, 128), ("parallel",), jnp.float32, "1 dimension semantics for a grid of "
                                                        "rank 2"),
])
def test_rules_catch_a_bad_block(shape, block, semantics, dtype, error):
  """The checker itself: each case breaks one of Mosaic's rules."""
  with pytest.raises(AssertionError, match=error):
    tpu_rules.assert_mosaic_blocks(*_copy(shape, block, semantics, dtype))


@pytest.mark.parametrize("shape, block", [
    ((12, 200), (12, 200)), ((16, 256), (8, 128)), ((1000,), (1000,)), ((4096,), (2048,)),
    ((1000,), (256,))])
def test_rules_pass_legal_blocks(shape, block):
  assert tpu_rules.assert_mosaic_blocks(*_copy(shape, block, ("parallel",) * len(shape))) > 0
