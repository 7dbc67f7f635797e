"""Absorbed MLA decode over the latent KV cache, flash-decoding style (Pallas).

One query token per batch row attends over its row's latent cache (DeepSeek-V2 §2.1.2 with
W^UK absorbed into the query and W^UV applied after the kernel):

  score[h, s] = (q_latent[h] . c[s] + q_rope[h] . k_rope[s]) * sm_scale,   s < lengths[b]
  out[h]      = softmax(score[h]) @ c

The latent c (Dc = 512) and the shared rope key (Dr = 64) stay separate operands so that
every block is a power of two. All heads of a row form the M dimension of both dots
(scores [H, block_s]). Flash-decoding (Dao et al., 2023): when B * head blocks leaves the
machine idle, the cache is also split into `num_splits` chunks; each program runs the online
softmax over its chunk and writes the unnormalised partial (acc, max m, sum-exp l), and a jnp
step rescales and combines the partials:

  m = max_j m_j,   out = sum_j exp(m_j - m) acc_j / sum_j exp(m_j - m) l_j.

Blocks at or past `lengths[b]` are never visited (the inner loop's trip count stops there).
"""

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import platform

try:  # Triton: the portable GPU lowering of pallas_call (deprecated in JAX 0.11, still there).
  from jax.experimental.pallas import triton as _pltriton
except ImportError:  # pragma: no cover
  _pltriton = None

_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class MlaDecodeBlockSizes:
  """Tiling of `mla_decode`.

  block_s: cache entries per inner step; a power of two (>= 16 on GPU, a multiple of 8 on TPU).
  block_h: most heads per program (None: all heads of a row in one program).
  min_heads: heads are zero-padded to a power of two >= this (Triton dots need M >= 16).
  min_programs: flash-decoding target for B * head blocks * num_splits; 1 never splits.
  max_split: most cache entries per program (bounds the TPU VMEM block); None: no bound.
  num_warps, num_stages: Triton compiler parameters (GPU only).
  """
  block_s: int = 128
  block_h: int | None = None
  min_heads: int = 1
  min_programs: int = 1
  max_split: int | None = None
  num_warps: int = 4
  num_stages: int = 2

  @classmethod
  def get_default(cls, backend: str | None = None) -> "MlaDecodeBlockSizes":
    backend = backend or platform.backend()
    if backend == "gpu":   # H200: 132 SMs; acc [block_h, 512] f32 must fit the registers
      return cls(block_s=64, block_h=64, min_heads=16, min_programs=264, num_warps=8)
    if backend == "tpu":   # kv block [max_split, 512] bf16, double-buffered in VMEM
      return cls(block_s=512, min_heads=8, min_programs=2, max_split=4096)
    return cls()


def _load_rows(ref, rows, valid, masked_load):
  """ref[rows, :] with invalid rows zeroed, so padding never reaches a dot.

  Interpret mode pads out-of-bounds reads with NaN and TPU with garbage: select them away.
  Triton does not clip block reads at the array end: mask the load itself.
  """
  if masked_load:
    return _pltriton.load(ref.at[rows, :], mask=valid, other=0)
  return jnp.where(valid, ref[rows, :], 0)


def _decode_kernel(lengths_ref, ql_ref, qr_ref, kv_ref, kr_ref, acc_ref, m_ref, l_ref, *,
                   sm_scale, block_s, cache_size, precision, masked_load):
  b, split = pl.program_id(0), pl.program_id(2)
  split_size = kv_ref.shape[0]
  split_start = split * split_size
  length = jnp.minimum(lengths_ref[b], cache_size)   # never read past the cache
  ql, qr = ql_ref[...], qr_ref[...]                   # [block_h, Dc], [block_h, Dr]
  nt = (((1,), (1,)), ((), ()))                       # contract the last dims: a @ b^T
  rows_iota = lax.broadcasted_iota(jnp.int32, (block_s, 1), 0)
  cols_iota = lax.broadcasted_iota(jnp.int32, (1, block_s), 1)

  def body(i, carry):
    m_prev, l_prev, acc_prev = carry
    start = pl.multiple_of(i * block_s, block_s)
    rows = pl.ds(start, block_s)
    valid = split_start + start + rows_iota < length  # [block_s, 1]
    kv = _load_rows(kv_ref, rows, valid, masked_load)  # [block_s, Dc]
    kr = _load_rows(kr_ref, rows, valid, masked_load)  # [block_s, Dr]
    scores = (lax.dot_general(ql, kv, nt, precision=precision, preferred_element_type=jnp.float32)
              + lax.dot_general(qr, kr, nt, precision=precision,
                                preferred_element_type=jnp.float32)) * sm_scale
    scores = jnp.where(split_start + start + cols_iota < length, scores, _NEG_INF)
    # Online softmax (flash attention): rescale the running sums to the new row max.
    m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)                    # 0 on the first visited block
    p = jnp.exp(scores - m_new)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc_prev + jnp.dot(p.astype(kv.dtype), kv, precision=precision,
                                         preferred_element_type=jnp.float32)
    return m_new, l_new, acc_new

  # Only blocks that start before `length` hold valid entries; every visited block has at
  # least one, so m stays finite after the first step.
  num_blocks = jnp.clip(pl.cdiv(length - split_start, block_s), 0, split_size // block_s)
  block_h = ql.shape[0]
  init = (jnp.full((block_h, 1), _NEG_INF, jnp.float32), jnp.zeros((block_h, 1), jnp.float32),
          jnp.zeros(acc_ref.shape, jnp.float32))
  m, l, acc = lax.fori_loop(0, num_blocks, body, init)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _combine(acc, m, l):
  """Merges the per-split partials (acc [B,n,H,Dc], m and l [B,n,H,1]) into [B,H,Dc]."""
  m_max = jnp.max(m, axis=1, keepdims=True)
  scale = jnp.exp(m - jnp.where(jnp.isfinite(m_max), m_max, 0.0))   # empty splits weigh 0
  denom = jnp.sum(scale * l, axis=1)
  out = jnp.sum(scale * acc, axis=1)
  return out / jnp.where(denom == 0.0, 1.0, denom)                    # length 0 -> zeros


def _split_sizes(b, s, num_head_blocks, bs: MlaDecodeBlockSizes):
  """(entries per split, number of splits): split until the grid reaches min_programs."""
  num_blocks = pl.cdiv(s, bs.block_s)
  wanted = pl.cdiv(bs.min_programs, b * num_head_blocks)
  blocks_per_split = pl.cdiv(num_blocks, min(wanted, num_blocks))
  if bs.max_split is not None:
    blocks_per_split = min(blocks_per_split, max(1, bs.max_split // bs.block_s))
  return blocks_per_split * bs.block_s, pl.cdiv(num_blocks, blocks_per_split)


def _lengths_spec(backend, b):
  if backend == "tpu":   # a scalar per row: SMEM (vector memory cannot index a scalar)
    from jax.experimental.pallas import tpu as pltpu
    return pl.BlockSpec(memory_space=pltpu.SMEM)
  return pl.BlockSpec((b,), lambda *_: (0,))


def _compiler_params(backend, bs: MlaDecodeBlockSizes, grid_rank):
  if backend == "gpu":   # Triton params select the Triton lowering (not Mosaic GPU)
    if hasattr(_pltriton, "CompilerParams"):
      return _pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)
    from jax.experimental.pallas import gpu as plgpu   # older JAX
    return plgpu.TritonCompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_rank)
  return None


def mla_decode(q_latent, q_rope, kv_latent, k_rope, lengths, *, sm_scale, interpret=None,
               block_sizes: MlaDecodeBlockSizes | None = None):
  """Absorbed MLA decode; the semantics of `pallas_kernels.reference.mla_decode`.

  q_latent [B,H,Dc], q_rope [B,H,Dr], kv_latent [B,S,Dc], k_rope [B,S,Dr], lengths [B] int32
  (valid cache entries per row) -> [B,H,Dc] in q_latent's dtype; float32 accumulation.
  """
  b, h, dc = q_latent.shape
  s, dr = kv_latent.shape[1], k_rope.shape[2]
  interpret = platform.resolve_interpret(interpret)
  backend = platform.target(interpret)
  bs = block_sizes or MlaDecodeBlockSizes.get_default(backend)

  h_pad = max(pl.next_power_of_2(h), bs.min_heads)
  block_h = min(h_pad, bs.block_h or h_pad)
  num_head_blocks = h_pad // block_h
  if h_pad != h:
    q_latent = jnp.pad(q_latent, ((0, 0), (0, h_pad - h), (0, 0)))
    q_rope = jnp.pad(q_rope, ((0, 0), (0, h_pad - h), (0, 0)))
  split_size, num_splits = _split_sizes(b, s, num_head_blocks, bs)

  precision = lax.Precision.HIGHEST if q_latent.dtype == jnp.float32 else None
  # A fresh partial per call: a kernel reused across grids may keep a stale num_programs.
  kernel = functools.partial(_decode_kernel, sm_scale=sm_scale, block_s=bs.block_s,
                             cache_size=s, precision=precision, masked_load=backend == "gpu")
  partial_shape = (b, num_splits, h_pad)
  acc, m, l = pl.pallas_call(
      kernel,
      grid=(b, num_head_blocks, num_splits),
      in_specs=[
          _lengths_spec(backend, b),
          pl.BlockSpec((None, block_h, dc), lambda i, j, k: (i, j, 0)),
          pl.BlockSpec((None, block_h, dr), lambda i, j, k: (i, j, 0)),
          pl.BlockSpec((None, split_size, dc), lambda i, j, k: (i, k, 0)),
          pl.BlockSpec((None, split_size, dr), lambda i, j, k: (i, k, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, block_h, dc), lambda i, j, k: (i, k, j, 0)),
          pl.BlockSpec((None, None, block_h, 1), lambda i, j, k: (i, k, j, 0)),
          pl.BlockSpec((None, None, block_h, 1), lambda i, j, k: (i, k, j, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((*partial_shape, dc), jnp.float32),
          jax.ShapeDtypeStruct((*partial_shape, 1), jnp.float32),
          jax.ShapeDtypeStruct((*partial_shape, 1), jnp.float32),
      ],
      compiler_params=_compiler_params(backend, bs, 3),
      interpret=interpret,
      name="mla_decode",
  )(lengths.astype(jnp.int32), q_latent, q_rope, kv_latent, k_rope)
  return _combine(acc, m, l)[:, :h].astype(q_latent.dtype)
