"""Attention in plain XLA for training: softmax(q k^T * scale + mask) v with a hand-written VJP.

The XLA form beside the `mla_attention` kernel, with the signature, operand checks and masks
(`reference.attention_mask`) of `reference.mla_attention`: float32 softmax, causal mask aligned
bottom-right, segment ids, fully masked rows give zeros. It is computed for a few batch rows at
a time (`jax.lax.map`) so that each chunk's [H, T, S] scores stay in cache instead of streaming
[B, H, T, S] arrays through memory several times per layer; under a causal mask, query blocks
skip the keys after their last query. The backward pass recomputes the probabilities P from the
saved row maxima and normalisers (FlashAttention, Dao et al., 2022, Algorithm 4) and uses the
softmax gradient identity (s the softmax scale)

    dP = dO V^T,   dS = P * (dP - rowsum(dO * O)),   dQ = s dS K,   dK = s dS^T Q,   dV = P^T dO,

so autodiff never differentiates through the max, the mask or the normalisation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import checks, reference

# Aim for chunks whose float32 scores [rows, H, T, S] take about this many bytes.
CHUNK_BYTES = 2 << 20
# Causal attention splits the queries into blocks of this many (at most MAX_QUERY_BLOCKS) and
# skips the keys a block cannot see: 4 blocks do 5/8 of the work of the full [T, S] square.
QUERY_BLOCK = 64
MAX_QUERY_BLOCKS = 8


def rows_per_chunk(b: int, h: int, t: int, s: int, chunk_bytes: int = CHUNK_BYTES) -> int:
  """The largest divisor of the batch b whose chunk of scores fits in `chunk_bytes` (>= 1)."""
  fits = max(1, chunk_bytes // (h * t * s * 4))
  return max(d for d in range(1, b + 1) if b % d == 0 and d <= fits)


def _probabilities(q, k, mask, sm_scale):
  """Unnormalised e = exp(scores - row max) [r,H,T,S] float32, the row max and the row sum."""
  scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * sm_scale
  masked = scores if mask is None else jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(masked, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)   # fully masked rows
  e = jnp.exp(scores - row_max)
  if mask is not None:
    e = jnp.where(mask, e, 0.0)
  return e, row_max, jnp.sum(e, axis=-1, keepdims=True)


def _query_blocks(t: int, s: int, causal: bool, blocks: int):
  """Causal skipping: [(query start, query end, keys visible to the block)] for `blocks`
  equal query blocks (keys past the last query's position are never visible)."""
  if not causal or blocks <= 1 or t % blocks:
    return [(0, t, s)]
  c = t // blocks
  return [(i * c, (i + 1) * c, max(1, min(s, (i + 1) * c + s - t))) for i in range(blocks)]


def _masked_blocks(t: int, s: int, segment_ids, causal: bool, blocks: int):
  """[(query start, query end, keys, mask)] of `_query_blocks`, each mask [rows or 1, 1, queries,
  keys] (or None) sliced from the whole sequence's `reference.attention_mask`, so a block's
  queries keep their bottom-right aligned positions."""
  mask = reference.attention_mask(t, s, causal=causal, segment_ids=segment_ids)
  return [(start, end, keys, None if mask is None else mask[:, None, start:end, :keys])
          for start, end, keys in _query_blocks(t, s, causal, blocks)]


def _forward_block(q, k, v, mask, *, sm_scale):
  e, row_max, denom = _probabilities(q, k, mask, sm_scale)
  inv = 1.0 / jnp.where(denom == 0.0, 1.0, denom)           # rows with no key give zeros
  out = jnp.einsum("bhts,bshd->bthd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out * jnp.swapaxes(inv, 1, 2)                        # normalise [r,T,H,Dv], not [.., S]
  return out.astype(q.dtype), row_max, inv


def _forward_chunk(q, k, v, segment_ids, *, causal, sm_scale, blocks):
  parts = [_forward_block(q[:, start:end], k[:, :keys], v[:, :keys], mask, sm_scale=sm_scale)
           for start, end, keys, mask in _masked_blocks(q.shape[1], k.shape[1], segment_ids,
                                                        causal, blocks)]
  out, row_max, inv = (jnp.concatenate(x, axis) for x, axis in zip(zip(*parts), (1, 2, 2)))
  return out, row_max, inv


def _backward_block(q, k, v, mask, out, row_max, inv, d_out, *, sm_scale):
  scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * sm_scale
  p = jnp.exp(scores - row_max) * inv
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  d_out32 = d_out.astype(jnp.float32)
  dp = jnp.einsum("bthd,bshd->bhts", d_out, v, preferred_element_type=jnp.float32)
  delta = jnp.swapaxes(jnp.sum(d_out32 * out.astype(jnp.float32), axis=-1), 1, 2)[..., None]
  ds = (p * (dp - delta) * sm_scale).astype(q.dtype)
  dq = jnp.einsum("bhts,bshd->bthd", ds, k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bhts,bthd->bshd", ds, q, preferred_element_type=jnp.float32)
  dv = jnp.einsum("bhts,bthd->bshd", p.astype(v.dtype), d_out, preferred_element_type=jnp.float32)
  return dq, dk, dv


def _backward_chunk(q, k, v, segment_ids, out, row_max, inv, d_out, *, causal, sm_scale,
                    blocks):
  dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for start, end, keys, mask in _masked_blocks(q.shape[1], k.shape[1], segment_ids, causal,
                                               blocks):
    dq_b, dk_b, dv_b = _backward_block(
        q[:, start:end], k[:, :keys], v[:, :keys], mask, out[:, start:end],
        row_max[:, :, start:end], inv[:, :, start:end], d_out[:, start:end], sm_scale=sm_scale)
    dq.append(dq_b)
    dk, dv = dk.at[:, :keys].add(dk_b), dv.at[:, :keys].add(dv_b)
  dq = jnp.concatenate(dq, axis=1)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _chunked(fn, rows, *arrays):
  """fn over chunks of `rows` batch rows (arrays split on axis 0; None passes through)."""
  b = next(a for a in arrays if a is not None).shape[0]
  if rows >= b:
    return fn(*arrays)
  split = lambda a: None if a is None else a.reshape(b // rows, rows, *a.shape[1:])  # noqa: E731
  outs = jax.lax.map(lambda xs: fn(*xs), tuple(split(a) for a in arrays))
  return jax.tree.map(lambda a: a.reshape(b, *a.shape[2:]), outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, segment_ids, causal, sm_scale, rows, blocks=1):
  return _attention_fwd(q, k, v, segment_ids, causal, sm_scale, rows, blocks)[0]


def _attention_fwd(q, k, v, segment_ids, causal, sm_scale, rows, blocks=1):
  fwd = functools.partial(_forward_chunk, causal=causal, sm_scale=sm_scale, blocks=blocks)
  out, row_max, inv = _chunked(fwd, rows, q, k, v, segment_ids)
  return out, (q, k, v, segment_ids, out, row_max, inv)


def _attention_bwd(causal, sm_scale, rows, blocks, residuals, d_out):
  q, k, v, segment_ids, out, row_max, inv = residuals
  bwd = functools.partial(_backward_chunk, causal=causal, sm_scale=sm_scale, blocks=blocks)
  dq, dk, dv = _chunked(bwd, rows, q, k, v, segment_ids, out, row_max, inv, d_out)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def mla_attention(q, k, v, *, segment_ids=None, causal=True, sm_scale=None, interpret=None):
  """q [B,T,H,Dqk], k [B,S,H,Dqk], v [B,S,H,Dv] -> [B,T,H,Dv] in q's dtype (see module doc).

  segment_ids [B,T] (T == S): a query sees only keys of its own segment. `interpret` is
  accepted and ignored, so this stands in for `pallas_kernels.mla_attention`.
  """
  del interpret
  checks.attention(q, k, v, segment_ids)
  b, t, h, d_qk = q.shape
  s = k.shape[1]
  sm_scale = d_qk**-0.5 if sm_scale is None else float(sm_scale)
  blocks = min(MAX_QUERY_BLOCKS, t // QUERY_BLOCK) if causal and t % QUERY_BLOCK == 0 else 1
  return _attention(q, k, v, segment_ids, bool(causal), sm_scale, rows_per_chunk(b, h, t, s),
                    max(blocks, 1))
