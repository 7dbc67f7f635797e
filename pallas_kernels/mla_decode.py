"""Absorbed MLA decode over the latent KV cache, flash-decoding style (Pallas).

One query token per batch row attends over its row's latent cache (DeepSeek-V2 §2.1.2 with
W^UK absorbed into the query and W^UV applied after the kernel):

  score[h, s] = (q_latent[h] . c[s] + q_rope[h] . k_rope[s]) * sm_scale,   s < lengths[b]
  out[h]      = softmax(score[h]) @ c

The latent c (Dc = 512) and the shared rope key (Dr = 64) stay separate operands so that every
tile loaded into a dot is a power of two (a split holds several block_s tiles). All heads of a
row form the M dimension of both dots (scores [H, block_s]). Flash-decoding (Dao et al., 2023):
when B * head blocks leaves the machine idle, the cache is also split into `num_splits` chunks;
each program runs the online softmax over its chunk and writes the unnormalised partial (acc,
max m, sum-exp l), and a jnp step rescales and combines the partials:

  m = max_j m_j,   out = sum_j exp(m_j - m) acc_j / sum_j exp(m_j - m) l_j.

Blocks at or past `lengths[b]` are never visited (the inner loop's trip count stops there).

Two grid forms, picked by `BlockSizes.sequential_grid`:

- portable (Triton on GPU, interpret mode on CPU): a program holds its split of the cache and
  loops over its blocks.
- sequential (Mosaic TPU): the cache blocks are the grid's last axis, run in order, with the
  running (acc, m, l) in float32 VMEM scratch and the lengths prefetched into SMEM. The block
  map sends every step at or past a row's length to the row's last valid block, which is
  already in VMEM, so the pipeline copies no cache block past the one holding the row's last
  entry.
"""

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import checks, platform, tiling
from pallas_kernels.platform import pltriton

_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of `mla_decode`.

  block_s: cache entries per inner step; a power of two (>= 16 on GPU, a multiple of 8 on TPU).
  block_h: most heads per program, a power of two (None: all heads of a row in one program).
  min_heads: heads are zero-padded to a power of two >= this, itself a power of two (Triton dots
    need M >= 16).
  min_programs: flash-decoding target for B * head blocks * num_splits; 1 never splits.
  max_split: most cache entries per program; None: no bound.
  num_warps, num_stages: Triton compiler parameters (GPU only).
  sequential_grid: cache blocks as an in-order grid axis (Mosaic TPU); splits do not apply.
  """
  block_s: int = 128
  block_h: int | None = None
  min_heads: int = 1
  min_programs: int = 1
  max_split: int | None = None
  num_warps: int = 4
  num_stages: int = 2
  sequential_grid: bool = False

  def __post_init__(self):
    # The padded head count is a power of two: block_h must divide it, or heads go uncomputed.
    platform.require_powers_of_two("mla_decode", block_s=self.block_s, block_h=self.block_h,
                                   min_heads=self.min_heads)

  def head_tiling(self, heads: int) -> tuple[int, int]:
    """(padded head count, heads per program) for `heads` query heads."""
    return tiling.head_tiling(heads, self.min_heads, self.block_h)

  @classmethod
  def get_default(cls, backend: str | None = None, dtype=jnp.bfloat16) -> "BlockSizes":
    backend = backend or platform.backend()
    if backend == "gpu":   # H200: 132 SMs; acc [block_h, 512] f32 must fit the registers
      if jnp.dtype(dtype).itemsize >= 4:   # float32: 16 x 16 heads on 8 warps spill nothing
        return cls(block_s=16, block_h=16, min_heads=16, min_programs=264, num_warps=8)
      # 4 programs per SM beat 2 (see RESULTS.md, 2026-12-04 sweep).
      return cls(block_s=64, block_h=64, min_heads=16, min_programs=528, num_warps=8)
    if backend == "tpu":   # kv block [512, 512] bf16, double-buffered in VMEM; not tuned
      return cls(block_s=512, min_heads=8, sequential_grid=True)
    return cls()


def _load_rows(ref, rows, valid, masked_load):
  """ref[rows, :] with invalid rows zeroed, so padding never reaches a dot.

  Interpret mode pads out-of-bounds reads with NaN and TPU with garbage: select them away.
  Triton does not clip block reads at the array end: mask the load itself.
  """
  if masked_load:
    return pltriton.load(ref.at[rows, :], mask=valid, other=0)
  return jnp.where(valid, ref[rows, :], 0)


def _online_step(ql, qr, kv, kr, start, length, carry, *, sm_scale):
  """Folds cache entries [start, start + block_s) (invalid rows already zeroed) into the
  running softmax (m, l, acc) of every head."""
  m_prev, l_prev, acc_prev = carry
  nt = (((1,), (1,)), ((), ()))                       # contract the last dims: a @ b^T
  scores = (lax.dot_general(ql, kv, nt, preferred_element_type=jnp.float32)
            + lax.dot_general(qr, kr, nt, preferred_element_type=jnp.float32)) * sm_scale
  cols = start + lax.broadcasted_iota(jnp.int32, (1, kv.shape[0]), 1)
  scores = jnp.where(cols < length, scores, _NEG_INF)
  # Online softmax (flash attention): rescale the running sums to the new row max.
  m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
  alpha = jnp.exp(m_prev - m_new)                    # 0 on the first visited block
  p = jnp.exp(scores - m_new)
  l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  acc_new = alpha * acc_prev + jnp.dot(p.astype(kv.dtype), kv, preferred_element_type=jnp.float32)
  return m_new, l_new, acc_new


def _init_state(block_h, dc):
  return (jnp.full((block_h, 1), _NEG_INF, jnp.float32), jnp.zeros((block_h, 1), jnp.float32),
          jnp.zeros((block_h, dc), jnp.float32))


def _decode_kernel(lengths_ref, ql_ref, qr_ref, kv_ref, kr_ref, acc_ref, m_ref, l_ref, *,
                   sm_scale, block_s, cache_size, masked_load):
  b, split = pl.program_id(0), pl.program_id(2)
  split_size = kv_ref.shape[0]
  split_start = split * split_size
  length = jnp.minimum(lengths_ref[b], cache_size)   # never read past the cache
  ql, qr = ql_ref[...], qr_ref[...]                   # [block_h, Dc], [block_h, Dr]
  rows_iota = lax.broadcasted_iota(jnp.int32, (block_s, 1), 0)

  def body(i, carry):
    start = pl.multiple_of(i * block_s, block_s)
    rows = pl.ds(start, block_s)
    valid = split_start + start + rows_iota < length  # [block_s, 1]
    kv = _load_rows(kv_ref, rows, valid, masked_load)  # [block_s, Dc]
    kr = _load_rows(kr_ref, rows, valid, masked_load)  # [block_s, Dr]
    return _online_step(ql, qr, kv, kr, split_start + start, length, carry,
                        sm_scale=sm_scale)

  # Only blocks that start before `length` hold valid entries; every visited block has at
  # least one, so m stays finite after the first step.
  num_blocks = jnp.clip(pl.cdiv(length - split_start, block_s), 0, split_size // block_s)
  m, l, acc = lax.fori_loop(0, num_blocks, body, _init_state(*acc_ref.shape))
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _decode_kernel_sequential(lengths_ref, ql_ref, qr_ref, kv_ref, kr_ref, acc_ref, m_ref,
                              l_ref, *state_refs, sm_scale, block_s, cache_size):
  b, j = pl.program_id(0), pl.program_id(2)
  length = jnp.minimum(lengths_ref[b], cache_size)
  start = j * block_s

  @pl.when(j == 0)
  def _init():
    for ref, value in zip(state_refs, _init_state(*acc_ref.shape)):
      ref[...] = value

  @pl.when(start < length)
  def _update():
    valid = start + lax.broadcasted_iota(jnp.int32, (block_s, 1), 0) < length
    kv = _load_rows(kv_ref, slice(None), valid, masked_load=False)
    kr = _load_rows(kr_ref, slice(None), valid, masked_load=False)
    carry = tuple(r[...] for r in state_refs)
    new = _online_step(ql_ref[...], qr_ref[...], kv, kr, start, length, carry,
                       sm_scale=sm_scale)
    for ref, value in zip(state_refs, new):
      ref[...] = value

  @pl.when(j == pl.num_programs(2) - 1)
  def _finish():
    m_ref[...], l_ref[...], acc_ref[...] = (r[...] for r in state_refs)


def _combine(acc, m, l):
  """Merges the per-split partials (acc [B,n,H,Dc], m and l [B,n,H,1]) into [B,H,Dc]."""
  m_max = jnp.max(m, axis=1, keepdims=True)
  scale = jnp.exp(m - jnp.where(jnp.isfinite(m_max), m_max, 0.0))   # empty splits weigh 0
  denom = jnp.sum(scale * l, axis=1)
  out = jnp.sum(scale * acc, axis=1)
  return out / jnp.where(denom == 0.0, 1.0, denom)                    # length 0 -> zeros


def _split_sizes(b, s, num_head_blocks, bs: BlockSizes):
  """(entries per split, number of splits): split until the grid reaches min_programs."""
  num_blocks = pl.cdiv(s, bs.block_s)
  wanted = pl.cdiv(bs.min_programs, b * num_head_blocks)
  blocks_per_split = pl.cdiv(num_blocks, min(wanted, num_blocks))
  if bs.max_split is not None:
    blocks_per_split = min(blocks_per_split, max(1, bs.max_split // bs.block_s))
  return blocks_per_split * bs.block_s, pl.cdiv(num_blocks, blocks_per_split)


def _lengths_spec(backend, b):
  if backend == "tpu":   # a scalar per row: SMEM (vector memory cannot index a scalar)
    return pl.BlockSpec(memory_space=pltpu.SMEM)
  return pl.BlockSpec((b,), lambda *_: (0,))


def mla_decode(q_latent, q_rope, kv_latent, k_rope, lengths, *, sm_scale, interpret=None,
               block_sizes: BlockSizes | None = None):
  """Absorbed MLA decode; the semantics of `pallas_kernels.reference.mla_decode`.

  q_latent [B,H,Dc], q_rope [B,H,Dr], kv_latent [B,S,Dc], k_rope [B,S,Dr], lengths [B] int32
  (valid cache entries per row) -> [B,H,Dc] in q_latent's dtype; float32 accumulation.
  """
  checks.decode(q_latent, q_rope, kv_latent, k_rope, lengths)
  b, h, dc = q_latent.shape
  s = kv_latent.shape[1]
  interpret = platform.resolve_interpret(interpret)
  backend = platform.target(interpret)
  bs = block_sizes or BlockSizes.get_default(backend, q_latent.dtype)

  h_pad, block_h = bs.head_tiling(h)
  num_head_blocks = h_pad // block_h
  if h_pad != h:
    q_latent = jnp.pad(q_latent, ((0, 0), (0, h_pad - h), (0, 0)))
    q_rope = jnp.pad(q_rope, ((0, 0), (0, h_pad - h), (0, 0)))
  operands = (lengths.astype(jnp.int32), q_latent, q_rope, kv_latent, k_rope)
  call = _call_sequential if bs.sequential_grid else _call_portable
  acc, m, l = call(operands, bs, backend, interpret, block_h, num_head_blocks,
                   sm_scale=sm_scale, block_s=bs.block_s, cache_size=s)
  return _combine(acc, m, l)[:, :h].astype(q_latent.dtype)


def _partials(b, num_splits, h_pad, dc):
  """Shapes of the per-split partials (acc, m, l)."""
  return [jax.ShapeDtypeStruct((b, num_splits, h_pad, width), jnp.float32)
          for width in (dc, 1, 1)]


def _call_portable(operands, bs, backend, interpret, block_h, num_head_blocks, **static):
  (b, h_pad, dc), (s, dr) = operands[1].shape, operands[4].shape[1:]
  split_size, num_splits = _split_sizes(b, s, num_head_blocks, bs)
  # A fresh partial per call: a kernel reused across grids may keep a stale num_programs.
  kernel = functools.partial(_decode_kernel, masked_load=backend == "gpu", **static)
  return pl.pallas_call(
      kernel,
      grid=(b, num_head_blocks, num_splits),
      in_specs=[
          _lengths_spec(backend, b),
          pl.BlockSpec((None, block_h, dc), lambda i, j, k: (i, j, 0)),
          pl.BlockSpec((None, block_h, dr), lambda i, j, k: (i, j, 0)),
          pl.BlockSpec((None, split_size, dc), lambda i, j, k: (i, k, 0)),
          pl.BlockSpec((None, split_size, dr), lambda i, j, k: (i, k, 0)),
      ],
      out_specs=[pl.BlockSpec((None, None, block_h, w), lambda i, j, k: (i, k, j, 0))
                 for w in (dc, 1, 1)],
      out_shape=_partials(b, num_splits, h_pad, dc),
      compiler_params=platform.compiler_params(interpret, ("parallel",) * 3,
                                              num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name="mla_decode",
  )(*operands)


def _call_sequential(operands, bs, backend, interpret, block_h, num_head_blocks, **static):
  (b, h_pad, dc), (s, dr) = operands[1].shape, operands[4].shape[1:]
  block_s = bs.block_s

  def kv_map(i, j, k, lengths):   # steps past the row's length stay on its last valid block
    valid_blocks = pl.cdiv(jnp.minimum(lengths[i], s), block_s)
    return i, jnp.clip(k, 0, jnp.maximum(valid_blocks - 1, 0)), 0

  kernel = functools.partial(_decode_kernel_sequential, **static)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, num_head_blocks, pl.cdiv(s, block_s)),
          in_specs=[
              pl.BlockSpec((None, block_h, dc), lambda i, j, k, lengths: (i, j, 0)),
              pl.BlockSpec((None, block_h, dr), lambda i, j, k, lengths: (i, j, 0)),
              pl.BlockSpec((None, block_s, dc), kv_map),
              pl.BlockSpec((None, block_s, dr), kv_map),
          ],
          out_specs=[pl.BlockSpec((None, None, block_h, w),
                                  lambda i, j, k, lengths: (i, 0, j, 0)) for w in (dc, 1, 1)],
          scratch_shapes=[pltpu.VMEM((block_h, w), jnp.float32) for w in (1, 1, dc)],
      ),
      out_shape=_partials(b, 1, h_pad, dc),
      compiler_params=platform.compiler_params(interpret, ("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="mla_decode",
  )(*operands)
