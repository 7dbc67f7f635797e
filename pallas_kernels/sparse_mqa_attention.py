"""Top-k sparse attention with one shared KV head, in Pallas: the attention of DeepSeek Sparse
Attention (V3.2 §2.1: MLA in its absorbed MQA form over the indexer's top-k keys) and of V4's
compressed attention (sliding window and selected compressed entries, with an attention sink).

For query row (b, t) with its own slots idx = indices[b, t, :] (-1: empty) and every head h:

  s_hk = sm_scale * q[b,t,h] . kv[b, idx_k]                         (valid slots only)
  p_hk = exp(s_hk - lse_h),  lse_h = log(sum_k exp(s_hk) + exp(sink_h))
  out[b,t,h] = sum_k p_hk kv[b, idx_k, :d_v]

All heads of a row share its keys, so they form the M dimension of both dots (scores
[block_h, block_k], as in FlashMLA's sparse kernel): a program owns one row and one block of
heads, gathers block_k key rows per step and folds them into an online softmax (FlashAttention-2
Algorithm 1); it saves the logsumexp. Work and memory follow K, not S.

Backward (Algorithm 2 with P recomputed from the logsumexp), in the same per-row programs:
  dS = P (dP - D) sm_scale,  dP = dO V^T,  D = rowsum(dO * O)
  dq = dS K;   per slot: dkv_slot = dS^T q (+ P^T dO on the value columns);   dsink = -P_sink D.
A key row is gathered by many queries, so dkv is a scatter-add of the per-slot rows. The kernel
writes them (float32, for `bwd_chunk` queries at a time, so memory stays O(chunk K D)) and XLA
adds them into dkv by index: deterministic on CPU and TPU; on a GPU XLA's scatter-add uses
atomics, so dkv's float32 summation order may vary between runs unless
`--xla_gpu_deterministic_ops=true` (the tests hold it to the reference's tolerance).

Layout, done once in the wrapper: the features split into power-of-two pieces that never
straddle d_v (V3.2: 512 | 64; V4: 512), each zero padded, so Triton sees power-of-two dots and
the value pieces are the leading key pieces; heads are zero padded to a power of two; the slots
are padded with -1 to a multiple of block_k.

Two ways of fetching the gathered rows, picked by `BlockSizes.dma_gather`:
- portable (Triton on GPU, interpret mode on CPU): the row's kv stays whole in the program's
  view and block_k rows are read with one gathered load.
- DMA (Mosaic TPU): kv stays in HBM; the row's slots are copied into SMEM, and each step starts
  one DMA per slot into a VMEM buffer [block_k, w] and waits for them. The slots cannot be
  scalar-prefetched as a whole (T K int32 would not fit SMEM at long context).
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
from pallas_kernels.tiling import QueryChunks, head_tiling, pieces, round_up


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of `sparse_mqa_attention`.

  block_k: slots per inner step, a power of two (a multiple of 8 for the DMA form).
  block_h: most heads per program, a power of two (None: all heads of a row in one program).
  min_heads: heads are zero-padded to a power of two >= this (Triton dots need M >= 16).
  bwd_chunk: queries per backward pass; the per-slot dkv rows of one pass take
    bwd_chunk * K * D float32.
  num_warps, num_stages: Triton's launch parameters (GPU only).
  dma_gather: rows fetched by DMA from HBM (Mosaic TPU) instead of a gathered load.
  """
  block_k: int = 16
  block_h: int | None = None
  min_heads: int = 1
  bwd_chunk: int = 1024
  num_warps: int = 4
  num_stages: int = 2
  dma_gather: bool = False

  def __post_init__(self):
    platform.require_powers_of_two("sparse_mqa_attention", block_k=self.block_k,
                                   block_h=self.block_h, min_heads=self.min_heads)
    if self.bwd_chunk < 1:
      raise ValueError(f"sparse_mqa_attention: bwd_chunk must be >= 1, got {self.bwd_chunk}")

  def head_tiling(self, heads: int) -> tuple[int, int]:
    """(padded head count, heads per program) for `heads` query heads."""
    return head_tiling(heads, self.min_heads, self.block_h)

  @classmethod
  def get_default(cls, backend: str | None = None, dtype=jnp.bfloat16) -> "BlockSizes":
    backend = backend or platform.backend()
    if backend == "gpu":   # not yet timed on a GPU; the largest tiles whose backward fits an
      # SM (ptxas, sm_90, V3.2's D 576: 64 x 64 takes 408 KiB of shared memory). bwd_chunk
      # keeps a pass's per-slot rows (bwd_chunk x heads / block_h x K x D f32) near 5 GB.
      if jnp.dtype(dtype).itemsize >= 4:
        return cls(block_k=16, block_h=16, min_heads=16, bwd_chunk=128, num_warps=8)
      return cls(block_k=32, block_h=32, min_heads=16, bwd_chunk=256, num_warps=8)
    if backend == "tpu":   # not tuned on a TPU
      return cls(block_k=128, min_heads=8, bwd_chunk=512, dma_gather=True)
    return cls()


@dataclasses.dataclass(frozen=True)
class _Config:
  s: int                      # keys
  k: int                      # true slots per row
  sm_scale: float
  value_widths: tuple         # pieces of kv[..., :d_v]
  rest_widths: tuple          # pieces of kv[..., d_v:]
  h_pad: int
  block_h: int
  blocks: BlockSizes
  interpret: platform.Interpret

  @property
  def widths(self):
    return self.value_widths + self.rest_widths

  @property
  def k_pad(self):
    return round_up(self.k, self.blocks.block_k)

  @property
  def dma(self):
    return self.blocks.dma_gather


def sparse_mqa_attention(q, kv, indices, *, d_v, sm_scale, sink=None, interpret=None,
                         block_sizes: BlockSizes | None = None):
  """Sparse attention over each row's own slots; the semantics of
  `pallas_kernels.reference.sparse_mqa_attention`. Differentiable in q, kv and sink.

  q [B,T,H,D], kv [B,S,D] (keys kv, values kv[..., :d_v]), indices [B,T,K] int32 (-1 empty),
  sink [H] or None -> [B,T,H,d_v] in q's dtype; float32 softmax and accumulation.
  """
  checks.sparse_attention(q, kv, indices, d_v=d_v, sink=sink)
  h, d = q.shape[2], q.shape[3]
  blocks = block_sizes or BlockSizes.get_default(platform.target(interpret), q.dtype)
  h_pad, block_h = blocks.head_tiling(h)
  c = _Config(s=kv.shape[1], k=indices.shape[2], sm_scale=float(sm_scale),
              value_widths=pieces(d_v), rest_widths=pieces(d - d_v) if d > d_v else (),
              h_pad=h_pad, block_h=block_h, blocks=blocks,
              interpret=platform.resolve_interpret(interpret))
  sink_in = jnp.full((h,), -jnp.inf, jnp.float32) if sink is None else sink
  return _sparse(c, d_v, q, kv, indices, sink_in)


def _split(x, d_v, c: _Config):
  """[..., D] -> zero-padded pieces: value_widths over x[..., :d_v], rest_widths over the rest."""
  parts = []
  for part, widths in ((x[..., :d_v], c.value_widths), (x[..., d_v:], c.rest_widths)):
    if not widths:
      continue
    pad = [(0, 0)] * (x.ndim - 1) + [(0, sum(widths) - part.shape[-1])]
    part = jnp.pad(part, pad)
    starts = np.cumsum((0,) + widths)
    parts += [part[..., a:a + w] for a, w in zip(starts, widths)]
  return parts


def _join(pieces, d_v, d, c: _Config):
  """Inverse of _split: value pieces -> [..., :d_v], rest pieces -> [..., d_v:d]."""
  n_v = len(c.value_widths)
  out = jnp.concatenate(pieces[:n_v], axis=-1)[..., :d_v]
  if c.rest_widths:
    rest = jnp.concatenate(pieces[n_v:], axis=-1)[..., :d - d_v]
    out = jnp.concatenate([out, rest], axis=-1)
  return out


def _pad_heads(x, c: _Config, value=0.0):
  """[B,T,H,...] -> [B,T,h_pad,...]."""
  pad = [(0, 0), (0, 0), (0, c.h_pad - x.shape[2])] + [(0, 0)] * (x.ndim - 3)
  return jnp.pad(x, pad, constant_values=value)


def _slots(indices, c: _Config):
  """[B,T,K] -> [B,T,1,k_pad] int32, -1 in the padding slots and wherever idx is not in [0, S)."""
  valid = (indices >= 0) & (indices < c.s)
  indices = jnp.where(valid, indices, -1)
  return jnp.pad(indices, ((0, 0), (0, 0), (0, c.k_pad - c.k)), constant_values=-1)[:, :, None]


# -- The arithmetic of one (row, slot block), shared by the forward and the backward. ------------


def _dot(a, b, contract=(1, 0)):
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _scores(c: _Config, qs, rows, valid):
  """sm_scale * q . kv over the pieces [block_h, block_k]; -inf at empty slots."""
  scores = _dot(qs[0], rows[0], (1, 1))
  for q, r in zip(qs[1:], rows[1:]):
    scores += _dot(q, r, (1, 1))
  return jnp.where(valid, scores * c.sm_scale, -jnp.inf)


def _fwd_step(c: _Config, qs, rows, valid, carry):
  """Folds one block of slots into the running (acc pieces, m, l) of every head."""
  accs, m, l = carry
  scores = _scores(c, qs, rows, valid)
  m_new = jnp.maximum(m, scores.max(axis=1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # no valid slot yet
  p = jnp.exp(scores - m_safe)
  alpha = jnp.exp(m - m_safe)
  l = alpha * l + p.sum(axis=1, keepdims=True)
  n_v = len(c.value_widths)
  accs = tuple(alpha * acc + _dot(p.astype(r.dtype), r) for acc, r in zip(accs, rows[:n_v]))
  return accs, m_new, l


def _fwd_finish(accs, m, l, sink):
  """The sink joins the denominator with a zero value (V4: softmax over [s_h, sink_h]). A row
  with nothing to attend gives zeros and lse = +inf, so that the backward's P is 0 there."""
  m_all = jnp.maximum(m, sink)
  m_safe = jnp.where(m_all == -jnp.inf, 0.0, m_all)
  alpha = jnp.exp(m - m_safe)
  l = alpha * l + jnp.exp(sink - m_safe)
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  return [alpha * acc / l_safe for acc in accs], jnp.where(empty, jnp.inf, m_safe + jnp.log(l_safe))


def _bwd_step(c: _Config, qs, dos, lse, delta, rows, valid):
  """One block of slots: (dq increments, per-slot dkv rows) for every piece."""
  p = jnp.exp(_scores(c, qs, rows, valid) - lse)                   # [bh, bk]; 0 at empty slots
  n_v = len(c.value_widths)
  dp = _dot(dos[0], rows[0], (1, 1))
  for do, r in zip(dos[1:], rows[1:n_v]):
    dp += _dot(do, r, (1, 1))
  ds = p * (dp - delta) * c.sm_scale
  ds_in = ds.astype(rows[0].dtype)
  dqs = [_dot(ds_in, r) for r in rows]                              # dS K: [bh, w]
  slot_rows = [_dot(ds.astype(q.dtype), q, (0, 0)) for q in qs]     # dS^T q: [bk, w]
  for i, do in enumerate(dos):
    slot_rows[i] += _dot(p.astype(do.dtype), do, (0, 0))            # P^T dO on the values
  return dqs, slot_rows


# -- Fetching a block of gathered rows. ----------------------------------------------------------


def _fetch_portable(c: _Config, idx_ref, kv_refs, start):
  """valid [1, block_k] and the gathered rows [block_k, w] of each piece (a gathered load)."""
  idx = idx_ref[0, pl.ds(start, c.blocks.block_k)]
  valid = idx >= 0
  safe = jnp.where(valid, idx, 0)
  return valid[None, :], [ref[safe, :] for ref in kv_refs]


def _fetch_dma(c: _Config, idx_ref, kv_hbm, idx_smem, bufs, sems, b, start):
  """The DMA form of _fetch_portable: one copy per slot from HBM into the VMEM buffers."""
  bk = c.blocks.block_k

  def copies(r):
    row = jnp.maximum(idx_smem[start + r], 0)   # empty slots fetch row 0, masked below
    return [pltpu.make_async_copy(src.at[b, pl.ds(row, 1), :], buf.at[pl.ds(r, 1), :], sem)
            for src, buf, sem in zip(kv_hbm, bufs, sems)]

  def start_row(r, _):
    for copy in copies(r):
      copy.start()

  def wait_row(r, _):
    for copy in copies(r):
      copy.wait()

  lax.fori_loop(0, bk, start_row, None)
  lax.fori_loop(0, bk, wait_row, None)
  valid = idx_ref[:, pl.ds(start, bk)] >= 0
  return valid, [buf[...] for buf in bufs]


def _load_slots_to_smem(idx_hbm, idx_smem, sem, b, t):
  copy = pltpu.make_async_copy(idx_hbm.at[b, t, 0], idx_smem, sem)
  copy.start()
  copy.wait()


# -- Kernels. -------------------------------------------------------------------------------------


def _unpack(refs, counts):
  out, i = [], 0
  for n in counts:
    out.append(list(refs[i:i + n]))
    i += n
  return out


def _fwd_kernel(*refs, c: _Config):
  n, n_v = len(c.widths), len(c.value_widths)
  b, t = pl.program_id(0), pl.program_id(1)
  if c.dma:
    ((idx_ref, idx_hbm, sink_ref), q_refs, kv_refs, o_refs, (lse_ref, idx_smem), bufs,
     sems) = _unpack(refs, (3, n, n, n_v, 2, n, 1))
    sems = [sems[0].at[i] for i in range(n + 1)]
    _load_slots_to_smem(idx_hbm, idx_smem, sems[n], b, t)
    fetch = lambda start: _fetch_dma(c, idx_ref, kv_refs, idx_smem, bufs, sems, b, start)
  else:
    (idx_ref, sink_ref), q_refs, kv_refs, o_refs, (lse_ref,) = _unpack(refs, (2, n, n, n_v, 1))
    fetch = lambda start: _fetch_portable(c, idx_ref, kv_refs, start)
  qs = [r[...] for r in q_refs]
  bh = qs[0].shape[0]

  def body(j, carry):
    valid, rows = fetch(pl.multiple_of(j * c.blocks.block_k, c.blocks.block_k))
    return _fwd_step(c, qs, rows, valid, carry)

  init = (tuple(jnp.zeros((bh, w), jnp.float32) for w in c.value_widths),
          jnp.full((bh, 1), -jnp.inf, jnp.float32), jnp.zeros((bh, 1), jnp.float32))
  accs, m, l = lax.fori_loop(0, c.k_pad // c.blocks.block_k, body, init)
  outs, lse = _fwd_finish(accs, m, l, sink_ref[...])
  for ref, out in zip(o_refs, outs):
    ref[...] = out.astype(ref.dtype)
  lse_ref[...] = lse


def _bwd_kernel(*refs, c: _Config):
  n, n_v = len(c.widths), len(c.value_widths)
  b, t = pl.program_id(0), pl.program_id(1)
  head = ((3, n, n, n_v, 2) if c.dma else (2, n, n, n_v, 2))
  if c.dma:
    ((idx_ref, idx_hbm, sink_ref), q_refs, kv_refs, do_refs, (lse_ref, delta_ref), dq_refs,
     slot_refs, (dsink_ref, idx_smem), bufs, sems) = _unpack(refs, head + (n, n, 2, n, 1))
    sems = [sems[0].at[i] for i in range(n + 1)]
    _load_slots_to_smem(idx_hbm, idx_smem, sems[n], b, t)
    fetch = lambda start: _fetch_dma(c, idx_ref, kv_refs, idx_smem, bufs, sems, b, start)
  else:
    ((idx_ref, sink_ref), q_refs, kv_refs, do_refs, (lse_ref, delta_ref), dq_refs, slot_refs,
     (dsink_ref,)) = _unpack(refs, head + (n, n, 1))
    fetch = lambda start: _fetch_portable(c, idx_ref, kv_refs, start)
  qs, dos = [r[...] for r in q_refs], [r[...] for r in do_refs]
  lse, delta = lse_ref[...], delta_ref[...]
  bk = c.blocks.block_k

  def body(j, dqs):
    start = pl.multiple_of(j * bk, bk)
    valid, rows = fetch(start)
    increments, slot_rows = _bwd_step(c, qs, dos, lse, delta, rows, valid)
    for ref, value in zip(slot_refs, slot_rows):
      ref[pl.ds(start, bk), :] = value
    return tuple(dq + inc for dq, inc in zip(dqs, increments))

  init = tuple(jnp.zeros((qs[0].shape[0], w), jnp.float32) for w in c.widths)
  dqs = lax.fori_loop(0, c.k_pad // bk, body, init)
  for ref, dq in zip(dq_refs, dqs):
    ref[...] = dq.astype(ref.dtype)
  # dL/dsink = sum over rows of -P_sink D, P_sink = exp(sink - lse) (0 where lse = +inf).
  dsink_ref[...] = -jnp.exp(sink_ref[...] - lse) * delta


# -- Calls. ---------------------------------------------------------------------------------------


def _row_spec(c: _Config, width):
  """[B,T,h_pad,w]: the program's row and head block."""
  return pl.BlockSpec((None, None, c.block_h, width), lambda b, t, hb: (b, t, hb, 0))


def _inputs(c: _Config, slots, sink, qs, kvs):
  """BlockSpecs and operands shared by the forward and the backward: slots, sink, q, kv."""
  slot_spec = pl.BlockSpec((None, None, 1, c.k_pad), lambda b, t, hb: (b, t, 0, 0))
  sink_spec = pl.BlockSpec((c.block_h, 1), lambda b, t, hb: (hb, 0))
  if c.dma:
    kv_specs = [pl.BlockSpec(memory_space=pl.ANY) for _ in kvs]
    specs = [slot_spec, pl.BlockSpec(memory_space=pl.ANY), sink_spec]
    operands = [slots, slots, sink]
  else:
    kv_specs = [pl.BlockSpec((None,) + kv.shape[1:], lambda b, t, hb: (b, 0, 0)) for kv in kvs]
    specs, operands = [slot_spec, sink_spec], [slots, sink]
  specs += [_row_spec(c, q.shape[-1]) for q in qs] + kv_specs
  return specs, operands + list(qs) + list(kvs)


def _scratch(c: _Config, kvs):
  if not c.dma:
    return []
  return ([pltpu.SMEM((c.k_pad,), jnp.int32)]
          + [pltpu.VMEM((c.blocks.block_k, kv.shape[-1]), kv.dtype) for kv in kvs]
          + [pltpu.SemaphoreType.DMA((len(kvs) + 1,))])


def _call(kernel, c, grid, in_specs, out_specs, out_shape, operands, scratch, name):
  params = platform.compiler_params(c.interpret, ("parallel",) * 3,
                                    num_warps=c.blocks.num_warps,
                                    num_stages=c.blocks.num_stages)
  return pl.pallas_call(functools.partial(kernel, c=c), grid=grid, in_specs=in_specs,
                        out_specs=out_specs, out_shape=out_shape, scratch_shapes=scratch,
                        compiler_params=params, interpret=c.interpret, name=name)(*operands)


def _forward(c: _Config, slots, sink, qs, kvs):
  """-> (output pieces [B,T,h_pad,w] for the value widths, lse [B,T,h_pad,1])."""
  b, t = slots.shape[:2]
  specs, operands = _inputs(c, slots, sink, qs, kvs)
  out_shape = [jax.ShapeDtypeStruct((b, t, c.h_pad, w), qs[0].dtype) for w in c.value_widths]
  out_shape.append(jax.ShapeDtypeStruct((b, t, c.h_pad, 1), jnp.float32))
  out_specs = [_row_spec(c, w) for w in c.value_widths] + [_row_spec(c, 1)]
  outs = _call(_fwd_kernel, c, (b, t, c.h_pad // c.block_h), specs, out_specs, out_shape,
               operands, _scratch(c, kvs), "sparse_mqa_attention_fwd")
  return outs[:-1], outs[-1]


def _backward_chunk(c: _Config, slots, sink, qs, kvs, dos, lse, delta):
  """One chunk of rows -> (dq pieces, per-slot dkv rows [B,T,n_hb,k_pad,w] f32, dsink rows)."""
  b, t = slots.shape[:2]
  n_hb = c.h_pad // c.block_h
  specs, operands = _inputs(c, slots, sink, qs, kvs)
  specs += [_row_spec(c, do.shape[-1]) for do in dos] + [_row_spec(c, 1)] * 2
  operands += list(dos) + [lse, delta]
  out_shape = ([jax.ShapeDtypeStruct((b, t, c.h_pad, w), qs[0].dtype) for w in c.widths]
               + [jax.ShapeDtypeStruct((b, t, n_hb, c.k_pad, w), jnp.float32)
                  for w in c.widths]
               + [jax.ShapeDtypeStruct((b, t, c.h_pad, 1), jnp.float32)])
  slot_spec = lambda w: pl.BlockSpec((None, None, None, c.k_pad, w),
                                     lambda b, t, hb: (b, t, hb, 0, 0))
  out_specs = ([_row_spec(c, w) for w in c.widths] + [slot_spec(w) for w in c.widths]
               + [_row_spec(c, 1)])
  outs = _call(_bwd_kernel, c, (b, t, n_hb), specs, out_specs, out_shape, operands,
               _scratch(c, kvs), "sparse_mqa_attention_bwd")
  n = len(c.widths)
  return outs[:n], outs[n:2 * n], outs[-1]


def _layout(c: _Config, d_v, q, kv, indices, sink):
  slots = _slots(indices, c)
  sink = _pad_heads(sink.astype(jnp.float32)[None, None, :, None], c, -jnp.inf)[0, 0]
  return slots, sink, _split(_pad_heads(q, c), d_v, c), _split(kv, d_v, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sparse(c: _Config, d_v, q, kv, indices, sink):
  return _sparse_fwd(c, d_v, q, kv, indices, sink)[0]


def _sparse_fwd(c: _Config, d_v, q, kv, indices, sink):
  h = q.shape[2]
  slots, sink_p, qs, kvs = _layout(c, d_v, q, kv, indices, sink)
  outs, lse = _forward(c, slots, sink_p, qs, kvs)
  out = jnp.concatenate(outs, axis=-1)[:, :, :h, :d_v]
  return out, (q, kv, indices, sink, out, lse)


def _sparse_bwd(c: _Config, d_v, res, d_out):
  q, kv, indices, sink, out, lse = res
  b, t, h, d = q.shape
  slots, sink_p, qs, kvs = _layout(c, d_v, q, kv, indices, sink)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  delta = _pad_heads(delta[..., None], c)
  dos = _split(_pad_heads(d_out.astype(q.dtype), c), d_v, c)[:len(c.value_widths)]

  # Rows in chunks of bwd_chunk (padded rows have no valid slot and add nothing).
  chunks = QueryChunks.of(t, c.blocks.bwd_chunk)
  xs = (chunks.split(slots, -1), [chunks.split(x) for x in qs],
        [chunks.split(x) for x in dos], chunks.split(lse, jnp.inf), chunks.split(delta))

  def step(dkvs, x):
    slots_c, qs_c, dos_c, lse_c, delta_c = x
    dqs, slot_rows, dsink = _backward_chunk(c, slots_c, sink_p, qs_c, kvs, dos_c, lse_c,
                                            delta_c)
    # dkv[b, idx] += the per-slot rows (summed over head blocks); empty slots are dropped.
    idx = slots_c[:, :, 0, :]
    idx = jnp.where(idx >= 0, idx, c.s)
    batch = jnp.arange(b)[:, None, None]
    dkvs = [acc.at[batch, idx].add(rows.sum(axis=2), mode="drop")
            for acc, rows in zip(dkvs, slot_rows)]
    return dkvs, (dqs, dsink.sum(axis=(0, 1)))

  init = [jnp.zeros((b, c.s, w), jnp.float32) for w in c.widths]
  dkvs, (dqs, dsinks) = lax.scan(step, init, xs)
  dq = _join([chunks.join(x) for x in dqs], d_v, d, c)[:, :, :h]
  dkv = _join(dkvs, d_v, d, c)
  dsink = dsinks.sum(axis=0)[:h, 0]
  return dq.astype(q.dtype), dkv.astype(kv.dtype), None, dsink.astype(sink.dtype)


_sparse.defvjp(_sparse_fwd, _sparse_bwd)
