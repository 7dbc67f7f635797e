"""Flash attention whose query/key and value head dims differ (MLA), in Pallas.

Computes softmax(q k^T * sm_scale + mask) v for every batch element and head, exactly as
`pallas_kernels.reference.mla_attention`: the mask is causal, aligned bottom-right (query i sits
at key position i + S - T), and/or same-segment for packed sequences; rows that see no key give
zeros. q [B,T,H,Dqk], k [B,S,H,Dqk], v [B,S,H,Dv] -> [B,T,H,Dv].

Forward: FlashAttention-2 (Dao, 2023) Algorithm 1. A program owns one block of queries and
streams key/value blocks through an online softmax in float32, skipping the key blocks that
causality hides, and saves the logsumexp. Blocks that hold only padding (lengths round up to the
larger of the forward and backward block sizes) are skipped too. Backward: Algorithm 2 with P
recomputed from the logsumexp, split into a dq kernel (parallel over query blocks) and a dk/dv
kernel (parallel over key blocks, starting at the first query block that sees them) so that
neither needs atomics.

Two grid forms of each kernel, picked by `BlockSizes.sequential_grid`, share the arithmetic:

- portable (Triton on GPU, interpret mode on CPU): a program holds (b, h)'s whole K and V (or
  Q, dO for dk/dv) and loops over their blocks itself.
- sequential (Mosaic TPU): the streamed blocks are the grid's last axis, run in order, with the
  running sums in float32 VMEM scratch. Only one block of each operand (two, double-buffered) is
  in VMEM at a time, so VMEM use does not grow with the sequence (the portable form's dk/dv
  kernel needs 28 MiB of VMEM at 8k tokens, over the 16 MiB default of TPU v4/v5e). Steps whose
  block causality or padding hides compute nothing and map to a visible block, so the pipeline
  never fetches a block twice.

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

from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import checks, platform
from pallas_kernels.tiling import MIN_DIM, pieces, round_up


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the three kernels, the grid form and Triton's launch parameters.

  block_q/block_k tile the forward and the dq kernel; block_q_bwd/block_k_bwd the dk/dv kernel.
  All are powers of two (Triton) and, on TPU, multiples of 128 (`fit` shrinks them for a short
  sequence, where the block is then the whole padded length, which Mosaic also accepts). On GPU
  the tiles of q, k and v must fit shared memory (about 227 KiB on H100/H200): 64x128 bf16 key
  tiles of a 192-wide head with 3 stages do not. `sequential_grid`: the streamed blocks form an
  in-order grid axis (Mosaic TPU) instead of a loop inside each program.
  """
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  num_warps: int = 4
  num_stages: int = 2
  sequential_grid: bool = False

  def __post_init__(self):
    # The padded lengths are multiples of the larger block; the smaller must divide them.
    platform.require_powers_of_two("mla_attention", block_q=self.block_q, block_k=self.block_k,
                                   block_q_bwd=self.block_q_bwd, block_k_bwd=self.block_k_bwd)

  @classmethod
  def get_default(cls, backend: str, dtype=jnp.bfloat16) -> "BlockSizes":
    if backend == "gpu":  # Dqk/Dv 192/128, H200 (see RESULTS.md: 2026-12-04 sweep; f32: 12-03)
      if jnp.dtype(dtype).itemsize >= 4:   # float32: 32-row tiles, the largest that do not spill
        return cls(block_q=32, block_k=32, block_q_bwd=32, block_k_bwd=32, num_stages=2)
      return cls(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=32, num_stages=3)
    if backend == "tpu":  # not tuned on a TPU yet
      return cls(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128,
                 sequential_grid=True)
    return cls(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)  # interpret: many blocks

  def fit(self, t: int, s: int) -> "BlockSizes":
    """Shrinks blocks that exceed a (power-of-two rounded) short sequence."""
    fit_t = lambda b: min(b, max(MIN_DIM, pl.next_power_of_2(t)))
    fit_s = lambda b: min(b, max(MIN_DIM, pl.next_power_of_2(s)))
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
  interpret: platform.Interpret


def mla_attention(q, k, v, *, segment_ids=None, causal=True, sm_scale=None, interpret=None,
                  block_sizes: BlockSizes | None = None):
  """softmax(q k^T * sm_scale + mask) v with Dqk != Dv allowed; differentiable.

  q [B,T,H,Dqk], k [B,S,H,Dqk], v [B,S,H,Dv] -> [B,T,H,Dv] in q's dtype. `causal` masks keys
  after i + S - T for query i; `segment_ids` [B,T] int32 (T == S) keeps attention inside a
  segment. sm_scale defaults to Dqk**-0.5. `interpret=None`: interpret on CPU only; a
  `pltpu.InterpretParams` runs the TPU form in the TPU interpreter. `block_sizes` defaults to
  `BlockSizes.get_default` of the platform.
  """
  checks.attention(q, k, v, segment_ids)
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  blocks = block_sizes or BlockSizes.get_default(platform.target(interpret), q.dtype)
  return _attention(q, k, v, segment_ids, causal=bool(causal), sm_scale=float(sm_scale),
                    interpret=platform.resolve_interpret(interpret), blocks=blocks)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "interpret", "blocks"))
def _attention(q, k, v, segment_ids, *, causal, sm_scale, interpret, blocks):
  t, d_qk = q.shape[1], q.shape[3]
  s, d_v = k.shape[1], v.shape[-1]
  blocks = blocks.fit(t, s)
  t_pad = round_up(t, max(blocks.block_q, blocks.block_q_bwd))
  s_pad = round_up(s, max(blocks.block_k, blocks.block_k_bwd))
  widths = pieces(d_qk)
  qs = _to_kernel_layout(q, t_pad, widths)
  ks = _to_kernel_layout(k, s_pad, widths)
  (v,) = _to_kernel_layout(v, s_pad, (max(MIN_DIM, pl.next_power_of_2(d_v)),))
  q_seg = kv_seg = None
  if segment_ids is not None:
    seg = segment_ids.astype(jnp.int32)
    q_seg = jnp.pad(seg, ((0, 0), (0, t_pad - t)))[:, :, None]     # [B,T,1]: a column per block
    kv_seg = jnp.pad(seg, ((0, 0), (0, s_pad - s)))[:, None, :]    # [B,1,S]: a row per block
  c = _Config(t=t, s=s, causal=causal, sm_scale=sm_scale, blocks=blocks, interpret=interpret)
  out = _flash(c, qs, ks, v, q_seg, kv_seg)
  return out[:, :, :t, :d_v].transpose(0, 2, 1, 3)


def _to_kernel_layout(x, length, widths):
  """[B,L,H,D] -> one zero-padded [B,H,length,w] array per feature piece w."""
  _, l, _, d = x.shape
  x = jnp.pad(x, ((0, 0), (0, length - l), (0, 0), (0, sum(widths) - d))).transpose(0, 2, 1, 3)
  starts = np.cumsum((0,) + widths)
  return tuple(x[..., a:a + w] for a, w in zip(starts, widths))


# -- The arithmetic of one (query block, key block) pair, shared by both grid forms. ----------


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


@dataclasses.dataclass(frozen=True)
class _Blocks:
  """The tiles of one (query block, key block) pair: feature pieces of q and k, v, and for the
  backward dO with the rows' logsumexp L and D = rowsum(dO * O). Segment ids are None when
  unpacked; q_start and k_start are the blocks' first positions."""
  qs: list
  ks: list
  v: jax.Array
  q_seg: jax.Array | None
  kv_seg: jax.Array | None
  q_start: jax.Array
  k_start: jax.Array
  do: jax.Array | None = None
  lse: jax.Array | None = None
  delta: jax.Array | None = None


def _fwd_update(c, x: _Blocks, carry):
  """Algorithm 1's inner step: folds one key block into the running (O, m, l)."""
  acc, m, l = carry
  scores = _qk(x.qs, x.ks, c.sm_scale)
  visible = _visible(c, x.q_start, x.k_start, scores.shape, x.q_seg, x.kv_seg)
  scores = jnp.where(visible, scores, -jnp.inf)
  # m' = max(m, rowmax S); P = exp(S - m'); l' = exp(m - m') l + rowsum P;
  # O' = exp(m - m') O + P V. A row that has seen no key yet keeps m' = -inf: use 0 instead.
  m_new = jnp.maximum(m, scores.max(axis=1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp(scores - m_safe)  # masked entries: exactly 0
  alpha = jnp.exp(m - m_safe)
  l = alpha * l + p.sum(axis=1, keepdims=True)
  acc = alpha * acc + _dot(p.astype(x.v.dtype), x.v)
  return acc, m_new, l


def _fwd_init(bq, dv):
  return (jnp.zeros((bq, dv), jnp.float32), jnp.full((bq, 1), -jnp.inf, jnp.float32),
          jnp.zeros((bq, 1), jnp.float32))


def _fwd_finish(acc, m, l):
  """O = O / l and L = m + log(l). A row with no visible key gives zeros and L = +inf, so that
  the backward's P = exp(S - L) is 0 there."""
  empty = l == 0.0
  l = jnp.where(empty, 1.0, l)
  return acc / l, jnp.where(empty, jnp.inf, m + jnp.log(l))


def _probs_and_dscores(c, x: _Blocks):
  """Algorithm 2's recomputation: P = exp(S - L) and dS = P (dP - D) sm_scale, dP = dO V^T."""
  scores = _qk(x.qs, x.ks, c.sm_scale)
  visible = _visible(c, x.q_start, x.k_start, scores.shape, x.q_seg, x.kv_seg)
  p = jnp.exp(jnp.where(visible, scores, -jnp.inf) - x.lse)
  dp = _dot(x.do, x.v, (1, 1))
  return p, p * (dp - x.delta) * c.sm_scale


def _dq_update(c, x: _Blocks, dqs):
  """dQ += dS K, for each feature piece."""
  _, ds = _probs_and_dscores(c, x)
  ds = ds.astype(x.ks[0].dtype)
  return tuple(dq + _dot(ds, k) for dq, k in zip(dqs, x.ks))


def _dkv_update(c, x: _Blocks, carry):
  """dV += P^T dO and dK += dS^T Q, for each feature piece."""
  dks, dv = carry
  p, ds = _probs_and_dscores(c, x)
  dv = dv + _dot(p.astype(x.do.dtype), x.do, (0, 0))
  ds = ds.astype(x.qs[0].dtype)
  return tuple(dk + _dot(ds, q, (0, 0)) for dk, q in zip(dks, x.qs)), dv


def _kv_end(c, i, bq, bk):
  """Key blocks [0, end) hold every key visible to query block i: causality hides the rest, and
  a block of padding queries (t_pad rounds to the larger of two block sizes) sees none."""
  end = _k_end(c, bk)
  if c.causal:
    last = (i + 1) * bq + (c.s - c.t)  # keys before `last` are visible to the block's last row
    end = jnp.minimum(lax.div(jnp.maximum(last, 0) + bk - 1, bk), end)
  return jnp.where(i < _q_end(c, bq), end, 0)


def _q_begin(c, j, bq, bk):
  """First query block that sees a key of key block j; _q_end for a block of padding keys."""
  begin = 0
  if c.causal:
    begin = lax.div(jnp.maximum(j * bk - (c.s - c.t), 0), bq)
  return jnp.where(j < _k_end(c, bk), begin, _q_end(c, bq))


def _q_end(c, bq):
  """Query blocks [.., end) hold real queries; the rest is padding."""
  return pl.cdiv(c.t, bq)


def _k_end(c, bk):
  """Key blocks [.., end) hold real keys; the rest is padding."""
  return pl.cdiv(c.s, bk)


# -- BlockSpecs and the call. ------------------------------------------------------------------


def _block(size, j):
  return pl.ds(pl.multiple_of(j * size, size), size)


def _rows_spec(rows, width, row_block):
  """BlockSpec of rows [r*rows, (r+1)*rows) of (b, h)'s [L, width] matrix, r = row_block(grid)."""
  return pl.BlockSpec((None, None, rows, width),
                      lambda b, h, *ij: (b, h, row_block(*ij), 0))


def _whole(x):
  """BlockSpec of (b, h)'s whole [L, W] matrix of a [B,H,L,W] array."""
  return pl.BlockSpec((None, None) + x.shape[2:], lambda b, h, *ij: (b, h, 0, 0))


def _seg_specs(q_seg, kv_seg, q_rows, q_block, kv_cols, kv_block):
  """Segment-id BlockSpecs: a column block of query ids (or all, if q_rows is None), a row block
  of key ids (or all)."""
  if q_seg is None:
    return None, None
  t_pad, s_pad = q_seg.shape[1], kv_seg.shape[2]
  q_spec = (pl.BlockSpec((None, q_rows, 1), lambda b, h, *ij: (b, q_block(*ij), 0)) if q_rows
            else pl.BlockSpec((None, t_pad, 1), lambda b, h, *ij: (b, 0, 0)))
  kv_spec = (pl.BlockSpec((None, 1, kv_cols), lambda b, h, *ij: (b, 0, kv_block(*ij)))
             if kv_cols else pl.BlockSpec((None, 1, s_pad), lambda b, h, *ij: (b, 0, 0)))
  return q_spec, kv_spec


def _compiler_params(c):
  streamed = ("arbitrary",) if c.blocks.sequential_grid else ()   # runs in order
  return platform.compiler_params(c.interpret, ("parallel",) * 3 + streamed,
                                  num_warps=c.blocks.num_warps, num_stages=c.blocks.num_stages)


def _call(kernel, c, grid, in_specs, out_specs, out_shape, args, name, scratch_shapes=()):
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, scratch_shapes=scratch_shapes,
                        compiler_params=_compiler_params(c), interpret=c.interpret,
                        name=name)(*args)


def _seg(ref, index=...):
  return None if ref is None else ref[index]


def _by_axis2(block, *_):
  """The block that grid axis 2 owns (a query block, or a key block for dk/dv)."""
  return block


def _kv_block_map(c, bq, bk):
  """Sequential form: key block of grid step (i, j); steps that causality or padding hide stay
  on the last visible block (already in VMEM)."""
  return lambda i, j: jnp.clip(j, 0, jnp.maximum(_kv_end(c, i, bq, bk) - 1, 0))


def _q_block_map(c, bq, bk):
  """Sequential dk/dv: query block of grid step (j, i); steps before the first query block
  that sees key block j stay on that block."""
  return lambda j, i: jnp.minimum(jnp.maximum(i, _q_begin(c, j, bq, bk)), _q_end(c, bq) - 1)


# -- Forward. ----------------------------------------------------------------------------------


def _fwd_kernel(q_refs, k_refs, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *, c, bq, bk):
  i = pl.program_id(2)
  qs, q_seg = [r[...] for r in q_refs], _seg(q_seg_ref)

  def body(j, carry):  # Algorithm 1's inner loop over the key blocks
    kv = _block(bk, j)
    x = _Blocks(qs, [r[kv, :] for r in k_refs], v_ref[kv, :], q_seg,
                _seg(kv_seg_ref, (slice(None), kv)), i * bq, j * bk)
    return _fwd_update(c, x, carry)

  carry = lax.fori_loop(0, _kv_end(c, i, bq, bk), body, _fwd_init(bq, o_ref.shape[-1]))
  o, lse = _fwd_finish(*carry)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse


def _fwd_kernel_sequential(q_refs, k_refs, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref,
                           acc_ref, m_ref, l_ref, *, c, bq, bk):
  i, j = pl.program_id(2), pl.program_id(3)
  state = (acc_ref, m_ref, l_ref)

  @pl.when(j == 0)
  def _init():
    for ref, value in zip(state, _fwd_init(bq, o_ref.shape[-1])):
      ref[...] = value

  @pl.when(j < _kv_end(c, i, bq, bk))
  def _update():
    x = _Blocks([r[...] for r in q_refs], [r[...] for r in k_refs], v_ref[...],
                _seg(q_seg_ref), _seg(kv_seg_ref), i * bq, j * bk)
    for ref, value in zip(state, _fwd_update(c, x, tuple(r[...] for r in state))):
      ref[...] = value

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    o, lse = _fwd_finish(*(r[...] for r in state))
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _fwd(c, qs, ks, v, q_seg, kv_seg):
  b, h, t_pad, _ = qs[0].shape
  s_pad, d_v = ks[0].shape[2], v.shape[-1]
  bq, bk = c.blocks.block_q, c.blocks.block_k
  out_shape = [jax.ShapeDtypeStruct((b, h, t_pad, d_v), qs[0].dtype),
               jax.ShapeDtypeStruct((b, h, t_pad, 1), jnp.float32)]
  args = (qs, ks, v, q_seg, kv_seg)
  if not c.blocks.sequential_grid:
    return _call(
        functools.partial(_fwd_kernel, c=c, bq=bq, bk=bk), c, (b, h, t_pad // bq),
        in_specs=[tuple(_rows_spec(bq, x.shape[-1], _by_axis2) for x in qs),
                  tuple(_whole(x) for x in ks), _whole(v),
                  *_seg_specs(q_seg, kv_seg, bq, _by_axis2, None, None)],
        out_specs=[_rows_spec(bq, d_v, _by_axis2), _rows_spec(bq, 1, _by_axis2)],
        out_shape=out_shape, args=args, name="mla_attention_fwd")
  kv_block = _kv_block_map(c, bq, bk)
  return _call(
      functools.partial(_fwd_kernel_sequential, c=c, bq=bq, bk=bk), c,
      (b, h, t_pad // bq, s_pad // bk),
      in_specs=[tuple(_rows_spec(bq, x.shape[-1], _by_axis2) for x in qs),
                tuple(_rows_spec(bk, x.shape[-1], kv_block) for x in ks),
                _rows_spec(bk, d_v, kv_block),
                *_seg_specs(q_seg, kv_seg, bq, _by_axis2, bk, kv_block)],
      out_specs=[_rows_spec(bq, d_v, _by_axis2), _rows_spec(bq, 1, _by_axis2)],
      out_shape=out_shape, args=args, name="mla_attention_fwd",
      scratch_shapes=[pltpu.VMEM((bq, d_v), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, 1), jnp.float32)])


# -- Backward. ---------------------------------------------------------------------------------


def _dq_kernel(q_refs, k_refs, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
               dq_refs, *, c, bq, bk):
  i = pl.program_id(2)
  qs, q_seg = [r[...] for r in q_refs], _seg(q_seg_ref)
  do, lse, delta = do_ref[...], lse_ref[...], delta_ref[...]

  def body(j, dqs):  # Algorithm 2 over the key blocks
    kv = _block(bk, j)
    x = _Blocks(qs, [r[kv, :] for r in k_refs], v_ref[kv, :], q_seg,
                _seg(kv_seg_ref, (slice(None), kv)), i * bq, j * bk, do, lse, delta)
    return _dq_update(c, x, dqs)

  dqs = tuple(jnp.zeros(q.shape, jnp.float32) for q in qs)
  dqs = lax.fori_loop(0, _kv_end(c, i, bq, bk), body, dqs)
  for r, dq in zip(dq_refs, dqs):
    r[...] = dq.astype(r.dtype)


def _dq_kernel_sequential(q_refs, k_refs, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                          kv_seg_ref, dq_refs, dq_acc_refs, *, c, bq, bk):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    for r in dq_acc_refs:
      r[...] = jnp.zeros(r.shape, jnp.float32)

  @pl.when(j < _kv_end(c, i, bq, bk))
  def _update():
    x = _Blocks([r[...] for r in q_refs], [r[...] for r in k_refs], v_ref[...],
                _seg(q_seg_ref), _seg(kv_seg_ref), i * bq, j * bk,
                do_ref[...], lse_ref[...], delta_ref[...])
    for r, dq in zip(dq_acc_refs, _dq_update(c, x, tuple(r[...] for r in dq_acc_refs))):
      r[...] = dq

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    for r, acc in zip(dq_refs, dq_acc_refs):
      r[...] = acc[...].astype(r.dtype)


def _dkv_kernel(q_refs, k_refs, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
                dk_refs, dv_ref, *, c, bq, bk):
  j = pl.program_id(2)
  ks, v, kv_seg = [r[...] for r in k_refs], v_ref[...], _seg(kv_seg_ref)

  def body(i, carry):  # Algorithm 2 over the query blocks that see key block j
    rows = _block(bq, i)
    x = _Blocks([r[rows, :] for r in q_refs], ks, v, _seg(q_seg_ref, (rows, slice(None))),
                kv_seg, i * bq, j * bk, do_ref[rows, :], lse_ref[rows, :], delta_ref[rows, :])
    return _dkv_update(c, x, carry)

  init = (tuple(jnp.zeros(k.shape, jnp.float32) for k in ks), jnp.zeros(v.shape, jnp.float32))
  dks, dv = lax.fori_loop(_q_begin(c, j, bq, bk), _q_end(c, bq), body, init)
  for r, dk in zip(dk_refs, dks):
    r[...] = dk.astype(r.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkv_kernel_sequential(q_refs, k_refs, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                           kv_seg_ref, dk_refs, dv_ref, dk_acc_refs, dv_acc_ref, *, c, bq, bk):
  j, i = pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    for r in (*dk_acc_refs, dv_acc_ref):
      r[...] = jnp.zeros(r.shape, jnp.float32)

  @pl.when((i >= _q_begin(c, j, bq, bk)) & (i < _q_end(c, bq)))
  def _update():
    x = _Blocks([r[...] for r in q_refs], [r[...] for r in k_refs], v_ref[...],
                _seg(q_seg_ref), _seg(kv_seg_ref), i * bq, j * bk,
                do_ref[...], lse_ref[...], delta_ref[...])
    carry = (tuple(r[...] for r in dk_acc_refs), dv_acc_ref[...])
    dks, dv = _dkv_update(c, x, carry)
    for r, dk in zip(dk_acc_refs, dks):
      r[...] = dk
    dv_acc_ref[...] = dv

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    for r, acc in zip((*dk_refs, dv_ref), (*dk_acc_refs, dv_acc_ref)):
      r[...] = acc[...].astype(r.dtype)


def _bwd(c, qs, ks, v, q_seg, kv_seg, o, lse, do):
  b, h, t_pad, _ = qs[0].shape
  s_pad, d_v = ks[0].shape[2], v.shape[-1]
  # Algorithm 2's preprocessing: D = rowsum(dO * O) (the padded features are zeros).
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
  args = (qs, ks, v, do, lse, delta, q_seg, kv_seg)
  sequential = c.blocks.sequential_grid

  # dq: grid axis 2 owns a query block; key blocks stream (loop, or grid axis 3).
  bq, bk = c.blocks.block_q, c.blocks.block_k
  kv_block = _kv_block_map(c, bq, bk)
  kv_spec = ((lambda x: _rows_spec(bk, x.shape[-1], kv_block)) if sequential else _whole)
  q_part = [tuple(_rows_spec(bq, x.shape[-1], _by_axis2) for x in qs), tuple(map(kv_spec, ks)),
            kv_spec(v), _rows_spec(bq, d_v, _by_axis2), _rows_spec(bq, 1, _by_axis2),
            _rows_spec(bq, 1, _by_axis2),
            *_seg_specs(q_seg, kv_seg, bq, _by_axis2, bk if sequential else None, kv_block)]
  dq_out = dict(out_specs=(tuple(_rows_spec(bq, x.shape[-1], _by_axis2) for x in qs),),
                out_shape=(tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in qs),),
                args=args, name="mla_attention_dq")
  if sequential:
    (dqs,) = _call(functools.partial(_dq_kernel_sequential, c=c, bq=bq, bk=bk), c,
                   (b, h, t_pad // bq, s_pad // bk), in_specs=q_part, **dq_out,
                   scratch_shapes=[tuple(pltpu.VMEM((bq, x.shape[-1]), jnp.float32)
                                         for x in qs)])
  else:
    (dqs,) = _call(functools.partial(_dq_kernel, c=c, bq=bq, bk=bk), c, (b, h, t_pad // bq),
                   in_specs=q_part, **dq_out)

  # dk, dv: grid axis 2 owns a key block; query blocks stream.
  bq, bk = c.blocks.block_q_bwd, c.blocks.block_k_bwd
  q_block = _q_block_map(c, bq, bk)
  q_spec = ((lambda x: _rows_spec(bq, x.shape[-1], q_block)) if sequential else _whole)
  kv_part = [tuple(map(q_spec, qs)), tuple(_rows_spec(bk, x.shape[-1], _by_axis2) for x in ks),
             _rows_spec(bk, d_v, _by_axis2), q_spec(do), q_spec(lse), q_spec(delta),
             *_seg_specs(q_seg, kv_seg, bq if sequential else None, q_block, bk, _by_axis2)]
  dkv_out = dict(out_specs=(tuple(_rows_spec(bk, x.shape[-1], _by_axis2) for x in ks),
                            _rows_spec(bk, d_v, _by_axis2)),
                 out_shape=(tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in ks),
                            jax.ShapeDtypeStruct(v.shape, v.dtype)),
                 args=args, name="mla_attention_dkv")
  if sequential:
    dks, dv = _call(functools.partial(_dkv_kernel_sequential, c=c, bq=bq, bk=bk), c,
                    (b, h, s_pad // bk, t_pad // bq), in_specs=kv_part, **dkv_out,
                    scratch_shapes=[tuple(pltpu.VMEM((bk, x.shape[-1]), jnp.float32)
                                          for x in ks),
                                    pltpu.VMEM((bk, d_v), jnp.float32)])
  else:
    dks, dv = _call(functools.partial(_dkv_kernel, c=c, bq=bq, bk=bk), c, (b, h, s_pad // bk),
                    in_specs=kv_part, **dkv_out)
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
