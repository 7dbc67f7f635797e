"""The lightning indexer's top-k selection (DeepSeek-V3.2 §2.1 eq. 1; V4's CSA indexer), with
Pallas score tiles and a running top-k, so that memory stays O(T (top_k + chunk)).

  I[b,t,s] = sum_h w[b,t,h] relu(q[b,t,h] . k[b,s])     (scales folded into q and w by the caller)
  visible(t, s) = k_positions[b,s] <= q_positions[b,t]   (causal for V3.2; compressed units for V4)
                  and, for packed sequences, q_segment_ids[b,t] == k_segment_ids[b,s]
  -> the top_k visible s per query, highest score first, ties to the lower s, -1 / -inf past the
     visible keys.

Two levels. The keys are taken `chunk` at a time; for each chunk a Pallas kernel computes the
score tile [T, chunk] (a program owns a [block_t, block_s] tile and loops over the indexer
heads, one [block_s, Di] x [Di, block_t] dot per head, accumulating w * relu in float32), and
XLA's top_k keeps the best of the running top_k and the chunk's. The running set comes first
in that merge and holds only lower key indices, and top_k orders equal values by position, so
ties go to the lower s exactly as one top_k over all keys would. The full [T, S] matrix never
exists; only the tiles of one chunk do.

The selected scores are differentiable in q, k and w (what the indexer's KL loss needs in the
sparse stage, V3.2 eq. 4): the backward gathers the selected keys for `bwd_chunk` queries at a
time and never forms an O(T S) buffer either.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import checks, platform
from pallas_kernels.tiling import QueryChunks, round_up

_NEG_INF = float("-inf")
_INVISIBLE = jnp.iinfo(jnp.int32).max   # position of a padding key: seen by no query


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of `lightning_indexer`.

  block_t, block_s: the score tile of one program, powers of two (multiples of 8 and 128 on TPU).
  chunk: keys scored per level-one step, a multiple of block_s; the tile buffer is [T, chunk].
  bwd_chunk: queries per backward step (gathers bwd_chunk * top_k keys).
  num_warps, num_stages: Triton's launch parameters (GPU only).
  """
  block_t: int = 16
  block_s: int = 16
  chunk: int = 64
  bwd_chunk: int = 1024
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    platform.require_powers_of_two("lightning_indexer", block_t=self.block_t,
                                   block_s=self.block_s)
    if self.chunk % self.block_s or self.bwd_chunk < 1:
      raise ValueError(f"lightning_indexer: chunk ({self.chunk}) must be a multiple of "
                       f"block_s ({self.block_s}) and bwd_chunk >= 1 ({self.bwd_chunk})")

  @classmethod
  def get_default(cls, backend: str | None = None, dtype=jnp.bfloat16) -> "BlockSizes":
    backend = backend or platform.backend()
    if backend == "gpu":   # not yet measured on a GPU
      if jnp.dtype(dtype).itemsize >= 4:
        return cls(block_t=32, block_s=64, chunk=8192, bwd_chunk=512)
      return cls(block_t=64, block_s=64, chunk=8192, bwd_chunk=1024, num_warps=4)
    if backend == "tpu":   # not tuned on a TPU
      return cls(block_t=128, block_s=128, chunk=8192, bwd_chunk=512)
    return cls()


@dataclasses.dataclass(frozen=True)
class _Config:
  top_k: int
  blocks: BlockSizes
  interpret: platform.Interpret


def lightning_indexer(q, k, w, *, top_k, q_positions, k_positions, q_segment_ids=None,
                      k_segment_ids=None, interpret=None, block_sizes: BlockSizes | None = None):
  """The top_k visible keys of each query by indexer score; the semantics of
  `pallas_kernels.reference.lightning_indexer`.

  q [B,T,Hi,Di], k [B,S,Di], w [B,T,Hi], q_positions [B,T], k_positions [B,S] integers,
  optional q_segment_ids [B,T] and k_segment_ids [B,S] (both or neither) ->
  (indices [B,T,top_k] int32, scores [B,T,top_k] float32); scores differentiable in q, k, w.
  """
  checks.indexer(q, k, w, top_k=top_k, q_positions=q_positions, k_positions=k_positions,
                 q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids)
  blocks = block_sizes or BlockSizes.get_default(platform.target(interpret), q.dtype)
  c = _Config(top_k=top_k, blocks=blocks, interpret=platform.resolve_interpret(interpret))
  if q_segment_ids is None:   # one segment
    q_segment_ids, k_segment_ids = jnp.zeros_like(q_positions), jnp.zeros_like(k_positions)
  as_int = lambda x: x.astype(jnp.int32)
  return _indexer(c, q, k, w, *map(as_int, (q_positions, k_positions, q_segment_ids,
                                            k_segment_ids)))


def _score_kernel(q_ref, k_ref, w_ref, q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, out_ref):
  """One [block_t, block_s] tile: sum over heads of w * relu(q k^T), -inf where not visible.
  Built transposed, keys x queries, so that a head's weights are a row [1, block_t] (a column
  would take a whole 128-lane tile per query in TPU VMEM)."""
  keys = k_ref[...]                                                      # [bs, Di]

  def head(h, acc):
    dots = lax.dot_general(keys, q_ref[h], (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)           # [bs, bt]
    return acc + jnp.maximum(dots, 0.0) * w_ref[h].astype(jnp.float32)  # w [1, bt]

  scores = lax.fori_loop(0, q_ref.shape[0], head, jnp.zeros(out_ref.shape[::-1], jnp.float32))
  visible = (k_pos_ref[...] <= q_pos_ref[...]) & (k_seg_ref[...] == q_seg_ref[...])  # [bs, bt]
  scores = jnp.where(visible, scores, _NEG_INF)
  out_ref[...] = scores.T


def _score_tiles(c: _Config, q, k, w, q_pos, k_pos, q_seg, k_seg):
  """Scores [B, T_pad, S_chunk] of one chunk of keys. q [B,Hi,T_pad,Di], w [B,Hi,1,T_pad],
  q_pos and q_seg [B,1,T_pad], k [B,S_chunk,Di], k_pos and k_seg [B,S_chunk,1]."""
  b, hi, t_pad, di = q.shape
  s = k.shape[1]
  bt, bs = c.blocks.block_t, c.blocks.block_s
  return pl.pallas_call(
      _score_kernel,
      grid=(b, t_pad // bt, s // bs),
      in_specs=[
          pl.BlockSpec((None, hi, bt, di), lambda i, j, l: (i, 0, j, 0)),
          pl.BlockSpec((None, bs, di), lambda i, j, l: (i, l, 0)),
          pl.BlockSpec((None, hi, 1, bt), lambda i, j, l: (i, 0, 0, j)),
          pl.BlockSpec((None, 1, bt), lambda i, j, l: (i, 0, j)),
          pl.BlockSpec((None, bs, 1), lambda i, j, l: (i, l, 0)),
          pl.BlockSpec((None, 1, bt), lambda i, j, l: (i, 0, j)),
          pl.BlockSpec((None, bs, 1), lambda i, j, l: (i, l, 0)),
      ],
      out_specs=pl.BlockSpec((None, bt, bs), lambda i, j, l: (i, j, l)),
      out_shape=jax.ShapeDtypeStruct((b, t_pad, s), jnp.float32),
      compiler_params=platform.compiler_params(c.interpret, ("parallel",) * 3,
                                               num_warps=c.blocks.num_warps,
                                               num_stages=c.blocks.num_stages),
      interpret=c.interpret,
      name="lightning_indexer_scores",
  )(q, k, w, q_pos, k_pos, q_seg, k_seg)


def _select(c: _Config, q, k, w, q_positions, k_positions, q_segments, k_segments):
  """(indices, scores) of the top_k visible keys: score tiles chunk by chunk, merged into a
  running top_k."""
  b, t, _, _ = q.shape
  s = k.shape[1]
  bt, chunk = c.blocks.block_t, c.blocks.chunk
  chunk = min(chunk, round_up(s, c.blocks.block_s))
  t_pad, s_pad = round_up(t, bt), round_up(s, chunk)
  q_t = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  w_t = jnp.pad(w, ((0, 0), (0, t_pad - t), (0, 0))).transpose(0, 2, 1)[:, :, None]
  q_pos, q_seg = (jnp.pad(x, ((0, 0), (0, t_pad - t)))[:, None]
                  for x in (q_positions, q_segments))
  k_p = jnp.pad(k, ((0, 0), (0, s_pad - s), (0, 0)))
  k_pos = jnp.pad(k_positions, ((0, 0), (0, s_pad - s)), constant_values=_INVISIBLE)[..., None]
  k_seg = jnp.pad(k_segments, ((0, 0), (0, s_pad - s)))[..., None]
  kk = min(c.top_k, chunk)

  def chunk_top(start):
    keys = lambda x: lax.dynamic_slice_in_dim(x, start, chunk, 1)
    tile = _score_tiles(c, q_t, keys(k_p), w_t, q_pos, keys(k_pos), q_seg, keys(k_seg))
    values, ids = lax.top_k(tile, kk)
    return values, ids + start

  def merge(running, start):
    values, ids = chunk_top(start)
    values = jnp.concatenate([running[0], values], axis=-1)   # running first: lower indices
    ids = jnp.concatenate([running[1], ids], axis=-1)
    top, where = lax.top_k(values, c.top_k)
    return (top, jnp.take_along_axis(ids, where, axis=-1)), None

  starts = jnp.arange(s_pad // chunk, dtype=jnp.int32) * chunk
  if c.top_k <= chunk:   # the first chunk fills the running set
    running = chunk_top(starts[0])
    starts = starts[1:]
  else:
    running = (jnp.full((b, t_pad, c.top_k), _NEG_INF, jnp.float32),
               jnp.full((b, t_pad, c.top_k), s_pad, jnp.int32))
  (top, ids), _ = lax.scan(merge, running, starts)
  top, ids = top[:, :t], ids[:, :t]
  return jnp.where(top > _NEG_INF, ids, -1).astype(jnp.int32), top


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _indexer(c: _Config, q, k, w, *visibility):
  return _select(c, q, k, w, *visibility)


def _indexer_fwd(c: _Config, q, k, w, *visibility):
  indices, scores = _select(c, q, k, w, *visibility)
  return (indices, scores), (q, k, w, indices)


def _indexer_bwd(c: _Config, res, cotangents):
  """d scores -> dq, dk, dw through the selected keys, bwd_chunk queries at a time:
  dw = sum_k g relu(a), and with g' = g w [a > 0]: dq = sum_k g' k_sel, dk[sel] += sum_h g' q."""
  q, k, w, indices = res
  _, g = cotangents
  b, t, hi, di = q.shape
  s = k.shape[1]
  chunks = QueryChunks.of(t, c.blocks.bwd_chunk)
  batch = jnp.arange(b)[:, None, None]
  f32 = jnp.float32

  def step(dk, x):
    q_c, w_c, idx, g_c = x
    valid = idx >= 0
    g_c = jnp.where(valid, g_c.astype(f32), 0.0)                          # [b,c,K]
    keys = k[batch, jnp.where(valid, idx, 0)]                             # [b,c,K,Di]
    a = jnp.einsum("bthd,btkd->bthk", q_c, keys, preferred_element_type=f32)
    dw = jnp.einsum("btk,bthk->bth", g_c, jnp.maximum(a, 0.0))
    g_a = g_c[:, :, None, :] * w_c.astype(f32)[..., None] * (a > 0)      # [b,c,Hi,K]
    dq = jnp.einsum("bthk,btkd->bthd", g_a, keys.astype(f32))
    rows = jnp.einsum("bthk,bthd->btkd", g_a, q_c.astype(f32))
    dk = dk.at[batch, jnp.where(valid, idx, s)].add(rows, mode="drop")
    return dk, (dq, dw)

  xs = (chunks.split(q), chunks.split(w), chunks.split(indices, -1), chunks.split(g))
  dk, (dq, dw) = lax.scan(step, jnp.zeros((b, s, di), f32), xs)
  return (chunks.join(dq).astype(q.dtype), dk.astype(k.dtype), chunks.join(dw).astype(w.dtype),
          None, None, None, None)


_indexer.defvjp(_indexer_fwd, _indexer_bwd)
