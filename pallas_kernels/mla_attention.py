"""Flash attention whose query/key and value head dims differ (MLA), in Pallas.

Computes softmax(q k^T * sm_scale + mask) v for every batch element and head, exactly as
`pallas_kernels.reference.mla_attention`: the mask is causal, aligned bottom-right (query i sits
at key position i + S - T), and/or same-segment for packed sequences; rows that see no key give
zeros. q [B,T,H,Dqk], k [B,S,H,Dqk], v [B,S,H,Dv] -> [B,T,H,Dv].

Forward: FlashAttention-2 (Dao, 2023) Algorithm 1. A program owns one block of queries and
streams key/value blocks through an online softmax in float32, skipping the key blocks that
causality hides, and saves the logsumexp. Backward: Algorithm 2 with P recomputed from the
logsumexp, split into a dq kernel (parallel over query blocks) and a dk/dv kernel (parallel over
key blocks, starting at the first query block that sees them) so that neither needs atomics.

Layout, done once in the wrapper: heads go next to batch ([B,H,L,D]); lengths are zero padded to
block multiples (no block is read out of bounds; the padded keys are masked by position); Dqk is
split into power-of-two pieces (192 = 128 + 64; a last piece is zero padded, which leaves q.k
unchanged) and Dv is zero padded to a power of two, as Triton needs.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import platform

try:
  from jax.experimental.pallas import triton as pltriton
  _TritonParams = pltriton.CompilerParams
except (ImportError, AttributeError):  # newer JAX: only through the GPU module
  from jax.experimental.pallas import gpu as plgpu
  _TritonParams = plgpu.TritonCompilerParams
from jax.experimental.pallas import tpu as pltpu

_MIN_DIM = 16  # Triton's smallest dot dimension


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the three kernels and Triton's launch parameters.

  block_q/block_k tile the forward and the dq kernel; block_q_bwd/block_k_bwd the dk/dv kernel.
  All are powers of two (Triton) and, on TPU, multiples of 128. On GPU the tiles of q, k and v
  must fit shared memory (about 227 KiB on H100/H200): 64x128 bf16 key tiles of a 192-wide head
  with 3 stages do not.
  """
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  num_warps: int = 4
  num_stages: int = 2

  @classmethod
  def for_backend(cls, backend: str, dtype=jnp.bfloat16) -> "BlockSizes":
    if backend == "gpu":  # H200, Dqk/Dv 192/128; float32 tiles are smaller to fit shared memory
      if jnp.dtype(dtype).itemsize >= 4:
        return cls(block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=64, num_stages=2)
      return cls(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=32, num_stages=3)
    if backend == "tpu":
      return cls(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)
    return cls(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)  # interpret: many blocks

  def fit(self, t: int, s: int) -> "BlockSizes":
    """Shrinks blocks that exceed a (power-of-two rounded) short sequence."""
    fit_t = lambda b: min(b, max(_MIN_DIM, pl.next_power_of_2(t)))
    fit_s = lambda b: min(b, max(_MIN_DIM, pl.next_power_of_2(s)))
    return dataclasses.replace(self, block_q=fit_t(self.block_q), block_k=fit_s(self.block_k),
                               block_q_bwd=fit_t(self.block_q_bwd),
                               block_k_bwd=fit_s(self.block_k_bwd))


@dataclasses.dataclass(frozen=True)
class _Config:
  t: int              # true query length
  s: int              # true key length
  causal: bool
  sm_scale: float
  blocks: BlockSizes
  interpret: bool


def mla_attention(q, k, v, *, segment_ids=None, causal=True, sm_scale=None, interpret=None):
  """softmax(q k^T * sm_scale + mask) v with Dqk != Dv allowed; differentiable.

  q [B,T,H,Dqk], k [B,S,H,Dqk], v [B,S,H,Dv] -> [B,T,H,Dv] in q's dtype. `causal` masks keys
  after i + S - T for query i; `segment_ids` [B,T] int32 (T == S) keeps attention inside a
  segment. sm_scale defaults to Dqk**-0.5. `interpret=None`: interpret on CPU only.
  """
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  return _attention(q, k, v, segment_ids, causal=bool(causal), sm_scale=float(sm_scale),
                    interpret=platform.resolve_interpret(interpret),
                    blocks=BlockSizes.for_backend(platform.backend(), q.dtype))


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "interpret", "blocks"))
def _attention(q, k, v, segment_ids, *, causal, sm_scale, interpret, blocks):
  b, t, h, d_qk = q.shape
  s, d_v = k.shape[1], v.shape[-1]
  if k.shape != (b, s, h, d_qk) or v.shape != (b, s, h, d_v):
    raise ValueError(f"expected k [B,S,H,Dqk] and v [B,S,H,Dv] for q {q.shape}; "
                     f"got {k.shape} and {v.shape}")
  if segment_ids is not None and t != s:
    raise ValueError(f"segment_ids need T == S (self-attention); got T={t}, S={s}")
  blocks = blocks.fit(t, s)
  t_pad = _round_up(t, max(blocks.block_q, blocks.block_q_bwd))
  s_pad = _round_up(s, max(blocks.block_k, blocks.block_k_bwd))
  widths = _pieces(d_qk)
  qs = _to_kernel_layout(q, t_pad, widths)
  ks = _to_kernel_layout(k, s_pad, widths)
  (v,) = _to_kernel_layout(v, s_pad, (max(_MIN_DIM, pl.next_power_of_2(d_v)),))
  q_seg = kv_seg = None
  if segment_ids is not None:
    seg = segment_ids.astype(jnp.int32)
    q_seg = jnp.pad(seg, ((0, 0), (0, t_pad - t)))[:, :, None]     # [B,T,1]: a column per block
    kv_seg = jnp.pad(seg, ((0, 0), (0, s_pad - s)))[:, None, :]    # [B,1,S]: a row per block
  c = _Config(t=t, s=s, causal=causal, sm_scale=sm_scale, blocks=blocks, interpret=interpret)
  out = _flash(c, qs, ks, v, q_seg, kv_seg)
  return out[:, :, :t, :d_v].transpose(0, 2, 1, 3)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pieces(d: int) -> tuple[int, ...]:
  """Power-of-two widths (each >= 16) covering d: the binary digits of d rounded up to 16."""
  d = _round_up(d, _MIN_DIM)
  return tuple(1 << i for i in reversed(range(d.bit_length())) if d >> i & 1)


def _to_kernel_layout(x, length, widths):
  """[B,L,H,D] -> one zero-padded [B,H,length,w] array per feature piece w."""
  _, l, _, d = x.shape
  x = jnp.pad(x, ((0, 0), (0, length - l), (0, 0), (0, sum(widths) - d))).transpose(0, 2, 1, 3)
  starts = np.cumsum((0,) + widths)
  return tuple(x[..., a:a + w] for a, w in zip(starts, widths))


# -- Shared pieces of the three kernels. -------------------------------------------------------


def _dot(a, b, contract=(1, 0)):
  """a @ b contracting a's dim contract[0] with b's dim contract[1], accumulated in float32."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _qk(qs, ks, sm_scale):
  """Scaled scores q k^T [bq, bk] in float32, summed over the feature pieces."""
  scores = _dot(qs[0], ks[0], (1, 1))
  for q, k in zip(qs[1:], ks[1:]):
    scores += _dot(q, k, (1, 1))
  return scores * sm_scale


def _visible(c, q_start, k_start, shape, q_seg, kv_seg):
  """Which (query, key) pairs of a [bq, bk] block may attend: real keys, causal, same segment."""
  rows = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  mask = cols < c.s
  if c.causal:
    mask &= cols <= rows + (c.s - c.t)
  if q_seg is not None:
    mask &= q_seg == kv_seg
  return mask


def _kv_end(c, i, bq, bk):
  """Key blocks [0, end) hold every key visible to query block i; causality hides the rest."""
  n = pl.cdiv(c.s, bk)
  if not c.causal:
    return n
  last = (i + 1) * bq + (c.s - c.t)  # keys before `last` are visible to the block's last row
  return jnp.minimum(lax.div(jnp.maximum(last, 0) + bk - 1, bk), n)


def _q_begin(c, j, bq, bk):
  """First query block that sees a key of key block j."""
  if not c.causal:
    return 0
  return lax.div(jnp.maximum(j * bk - (c.s - c.t), 0), bq)


def _block(size, j):
  return pl.ds(pl.multiple_of(j * size, size), size)


def _by_block(rows, width):
  """BlockSpec of rows [i*rows, (i+1)*rows) of (b, h)'s [L, width] matrix."""
  return pl.BlockSpec((None, None, rows, width), lambda b, h, i: (b, h, i, 0))


def _whole(x):
  """BlockSpec of (b, h)'s whole [L, W] matrix of a [B,H,L,W] array."""
  return pl.BlockSpec((None, None) + x.shape[2:], lambda b, h, i: (b, h, 0, 0))


def _seg_specs(q_seg, kv_seg, q_rows, kv_cols):
  """Segment-id BlockSpecs: a query column block (or all), a key row block (or all)."""
  if q_seg is None:
    return None, None
  t_pad, s_pad = q_seg.shape[1], kv_seg.shape[2]
  q_spec = (pl.BlockSpec((None, q_rows, 1), lambda b, h, i: (b, i, 0)) if q_rows
            else pl.BlockSpec((None, t_pad, 1), lambda b, h, i: (b, 0, 0)))
  kv_spec = (pl.BlockSpec((None, 1, kv_cols), lambda b, h, i: (b, 0, i)) if kv_cols
             else pl.BlockSpec((None, 1, s_pad), lambda b, h, i: (b, 0, 0)))
  return q_spec, kv_spec


def _compiler_params(c):
  if c.interpret:
    return None
  if platform.backend() == "gpu":  # explicit Triton params select the Triton lowering
    return _TritonParams(num_warps=c.blocks.num_warps, num_stages=c.blocks.num_stages)
  if platform.backend() == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
  return None


def _call(kernel, c, grid, in_specs, out_specs, out_shape, args, name):
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, compiler_params=_compiler_params(c),
                        interpret=c.interpret, name=name)(*args)


# -- Forward. ----------------------------------------------------------------------------------


def _fwd_kernel(q_refs, k_refs, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *, c, bq, bk):
  i = pl.program_id(2)
  qs = [r[...] for r in q_refs]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]

  def body(j, carry):  # Algorithm 1's inner loop: fold key block j into the online softmax
    acc, m, l = carry
    kv = _block(bk, j)
    scores = _qk(qs, [r[kv, :] for r in k_refs], c.sm_scale)
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[:, kv]
    scores = jnp.where(_visible(c, i * bq, j * bk, scores.shape, q_seg, kv_seg), scores, -jnp.inf)
    # m' = max(m, rowmax S); P = exp(S - m'); l' = exp(m - m') l + rowsum P;
    # O' = exp(m - m') O + P V. A row that has seen no key yet keeps m' = -inf: use 0 instead.
    m_new = jnp.maximum(m, scores.max(axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(scores - m_safe)  # masked entries: exactly 0
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + p.sum(axis=1, keepdims=True)
    acc = alpha * acc + _dot(p.astype(v_ref.dtype), v_ref[kv, :])
    return acc, m_new, l

  acc = jnp.zeros((bq, o_ref.shape[-1]), jnp.float32)
  m = jnp.full((bq, 1), -jnp.inf, jnp.float32)
  l = jnp.zeros((bq, 1), jnp.float32)
  acc, m, l = lax.fori_loop(0, _kv_end(c, i, bq, bk), body, (acc, m, l))
  # O = O / l and L = m + log(l). A row with no visible key gives zeros and L = +inf, so that
  # the backward's P = exp(S - L) is 0 there.
  empty = l == 0.0
  l = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / l).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(l))


def _fwd(c, qs, ks, v, q_seg, kv_seg):
  b, h, t_pad, _ = qs[0].shape
  bq, bk = c.blocks.block_q, c.blocks.block_k
  q_seg_spec, kv_seg_spec = _seg_specs(q_seg, kv_seg, bq, None)
  return _call(
      functools.partial(_fwd_kernel, c=c, bq=bq, bk=bk), c, (b, h, t_pad // bq),
      in_specs=[tuple(_by_block(bq, x.shape[-1]) for x in qs), tuple(_whole(x) for x in ks),
                _whole(v), q_seg_spec, kv_seg_spec],
      out_specs=[_by_block(bq, v.shape[-1]), _by_block(bq, 1)],
      out_shape=[jax.ShapeDtypeStruct((b, h, t_pad, v.shape[-1]), qs[0].dtype),
                 jax.ShapeDtypeStruct((b, h, t_pad, 1), jnp.float32)],
      args=(qs, ks, v, q_seg, kv_seg), name="mla_attention_fwd")


# -- Backward. ---------------------------------------------------------------------------------


def _dq_kernel(q_refs, k_refs, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
               dq_refs, *, c, bq, bk):
  i = pl.program_id(2)
  qs = [r[...] for r in q_refs]
  do, lse, delta = do_ref[...], lse_ref[...], delta_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]

  def body(j, dqs):  # Algorithm 2 for key block j: P = exp(S - L), dS = P (dP - D), dQ += dS K
    kv = _block(bk, j)
    ks = [r[kv, :] for r in k_refs]
    scores = _qk(qs, ks, c.sm_scale)
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[:, kv]
    mask = _visible(c, i * bq, j * bk, scores.shape, q_seg, kv_seg)
    p = jnp.exp(jnp.where(mask, scores, -jnp.inf) - lse)
    dp = _dot(do, v_ref[kv, :], (1, 1))
    ds = (p * (dp - delta) * c.sm_scale).astype(ks[0].dtype)
    return tuple(dq + _dot(ds, k) for dq, k in zip(dqs, ks))

  dqs = tuple(jnp.zeros(q.shape, jnp.float32) for q in qs)
  dqs = lax.fori_loop(0, _kv_end(c, i, bq, bk), body, dqs)
  for r, dq in zip(dq_refs, dqs):
    r[...] = dq.astype(r.dtype)


def _dkv_kernel(q_refs, k_refs, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
                dk_refs, dv_ref, *, c, bq, bk):
  j = pl.program_id(2)
  ks = [r[...] for r in k_refs]
  v = v_ref[...]
  kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]

  def body(i, carry):  # Algorithm 2 for query block i: dV += P^T dO, dK += dS^T Q
    dks, dv = carry
    rows = _block(bq, i)
    qs = [r[rows, :] for r in q_refs]
    do = do_ref[rows, :]
    scores = _qk(qs, ks, c.sm_scale)
    q_seg = None if q_seg_ref is None else q_seg_ref[rows, :]
    mask = _visible(c, i * bq, j * bk, scores.shape, q_seg, kv_seg)
    p = jnp.exp(jnp.where(mask, scores, -jnp.inf) - lse_ref[rows, :])
    dv += _dot(p.astype(do.dtype), do, (0, 0))
    dp = _dot(do, v, (1, 1))
    ds = (p * (dp - delta_ref[rows, :]) * c.sm_scale).astype(qs[0].dtype)
    return tuple(dk + _dot(ds, q, (0, 0)) for dk, q in zip(dks, qs)), dv

  init = (tuple(jnp.zeros(k.shape, jnp.float32) for k in ks), jnp.zeros(v.shape, jnp.float32))
  dks, dv = lax.fori_loop(_q_begin(c, j, bq, bk), pl.cdiv(c.t, bq), body, init)
  for r, dk in zip(dk_refs, dks):
    r[...] = dk.astype(r.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd(c, qs, ks, v, q_seg, kv_seg, o, lse, do):
  b, h, t_pad, _ = qs[0].shape
  s_pad = ks[0].shape[2]
  # Algorithm 2's preprocessing: D = rowsum(dO * O) (the padded features are zeros).
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
  args = (qs, ks, v, do, lse, delta, q_seg, kv_seg)

  bq, bk = c.blocks.block_q, c.blocks.block_k
  (dqs,) = _call(
      functools.partial(_dq_kernel, c=c, bq=bq, bk=bk), c, (b, h, t_pad // bq),
      in_specs=[tuple(_by_block(bq, x.shape[-1]) for x in qs), tuple(_whole(x) for x in ks),
                _whole(v), _by_block(bq, do.shape[-1]), _by_block(bq, 1), _by_block(bq, 1),
                *_seg_specs(q_seg, kv_seg, bq, None)],
      out_specs=(tuple(_by_block(bq, x.shape[-1]) for x in qs),),
      out_shape=(tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in qs),),
      args=args, name="mla_attention_dq")

  bq, bk = c.blocks.block_q_bwd, c.blocks.block_k_bwd
  dks, dv = _call(
      functools.partial(_dkv_kernel, c=c, bq=bq, bk=bk), c, (b, h, s_pad // bk),
      in_specs=[tuple(_whole(x) for x in qs), tuple(_by_block(bk, x.shape[-1]) for x in ks),
                _by_block(bk, v.shape[-1]), _whole(do), _whole(lse), _whole(delta),
                *_seg_specs(q_seg, kv_seg, None, bk)],
      out_specs=(tuple(_by_block(bk, x.shape[-1]) for x in ks), _by_block(bk, v.shape[-1])),
      out_shape=(tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in ks),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)),
      args=args, name="mla_attention_dkv")
  return dqs, dks, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(c, qs, ks, v, q_seg, kv_seg):
  return _fwd(c, qs, ks, v, q_seg, kv_seg)[0]


def _flash_fwd(c, qs, ks, v, q_seg, kv_seg):
  o, lse = _fwd(c, qs, ks, v, q_seg, kv_seg)
  return o, (qs, ks, v, q_seg, kv_seg, o, lse)


def _flash_bwd(c, res, do):
  qs, ks, v, q_seg, kv_seg, o, lse = res
  dqs, dks, dv = _bwd(c, qs, ks, v, q_seg, kv_seg, o, lse, do)
  return dqs, dks, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
