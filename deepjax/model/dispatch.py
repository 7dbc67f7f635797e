"""Block-padded dropless MoE dispatch: routed rows grouped by expert in blocks of equal size.

The N*K routed (token, slot) pairs are laid out expert by expert, each expert's rows padded up
to a multiple of the block size b, so that every block of b rows belongs to one expert. The
experts then run as one batched matmul over blocks, [blocks, b, H] x [blocks, H, I], against
each block's expert weights. Nothing is dropped, and the padded row count has a static bound,
N*K + E*(b-1), so the layout is jit-able: the cost follows the active FLOPs (plus at most
E*(b-1) padding rows), unlike a dense all-experts einsum, or jax.lax.ragged_dot, which XLA:CPU
computes densely.

Moving rows in and out of the layout are gathers in both directions: each is the exact
transpose of the other (a permutation plus zero padding), so their gradients are gathers too
(custom VJPs) rather than XLA scatter-adds.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels import rank_within_group


@flax.struct.dataclass
class BlockLayout:
  """Where each routed pair sits in the block-padded layout of `block_layout`.

  position: [N*K] int32, the padded row of flat pair n*K + k.
  pair: [P] int32, the flat pair in each padded row; N*K marks a padding row.
  block_expert: [P // b] int32, the expert of each block (trailing empty blocks: E - 1).
  """
  position: jax.Array
  pair: jax.Array
  block_expert: jax.Array


def padded_rows(num_pairs: int, num_experts: int, block_size: int) -> int:
  """Static bound on the padded row count: N*K + E*(b-1), rounded up to whole blocks."""
  bound = num_pairs + num_experts * (block_size - 1)
  return -(-bound // block_size) * block_size


def block_size_for(num_pairs: int, num_experts: int, max_block: int = 128) -> int:
  """Blocks as large as possible (batched matmuls run best on big blocks) while the padding
  bound E*(b-1) stays within ~1/8 of the N*K routed rows: a power of two in [8, max_block]."""
  b = 8
  while b < max_block and num_experts * (2 * b) * 8 <= num_pairs:
    b *= 2
  return b


def block_layout(experts: jax.Array, num_experts: int, block_size: int) -> BlockLayout:
  """Layout of the routed pairs `experts` [N, K] (expert ids), grouped by expert in pair order:
  a pair's padded row is its expert's (block-aligned) start plus its rank within the expert."""
  num_pairs = experts.size
  flat = experts.reshape(-1).astype(jnp.int32)
  rank, counts = rank_within_group(flat, num_experts)
  padded = (counts + block_size - 1) // block_size * block_size
  ends = jnp.cumsum(padded)
  position = (ends - padded)[flat] + rank
  rows = padded_rows(num_pairs, num_experts, block_size)
  pair = jnp.full((rows,), num_pairs, jnp.int32).at[position].set(
      jnp.arange(num_pairs, dtype=jnp.int32), unique_indices=True)
  block_start = jnp.arange(rows // block_size, dtype=jnp.int32) * block_size
  block_expert = jnp.sum(block_start[:, None] >= ends[None, :], axis=1, dtype=jnp.int32)
  return BlockLayout(position=position, pair=pair,
                     block_expert=jnp.minimum(block_expert, num_experts - 1))


# --- moving rows between token order and the layout (gathers both ways) -----------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_rows(src, index, inverse, group):
  """out[i] = src[index[i] // group], zero where index[i] is out of range.

  `inverse` maps back: the rows of out that come from src row j are inverse[j*group : (j+1)*group]
  (every in-range index appears exactly once), so the transpose is a gather as well.
  """
  del inverse
  return jnp.take(src, index // group, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(src, index, inverse, group):
  return _gather_rows(src, index, inverse, group), (index, inverse, src.shape[0])


def _gather_rows_bwd(group, residuals, grad):
  index, inverse, n = residuals
  back = jnp.take(grad, inverse, axis=0, mode="fill", fill_value=0)
  return back.reshape(n, group, -1).sum(axis=1), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def dispatch(x: jax.Array, layout: BlockLayout, top_k: int) -> jax.Array:
  """Tokens x [N, H] -> their routed copies in the layout [P, H] (padding rows zero)."""
  return _gather_rows(x, layout.pair, layout.position, top_k)


def collect(rows: jax.Array, layout: BlockLayout, top_k: int) -> jax.Array:
  """Layout rows [P, H] -> [N, K, H], the row of each (token, slot) pair."""
  pairs = _gather_rows(rows, layout.position, layout.pair, 1)
  return pairs.reshape(-1, top_k, rows.shape[-1])


def blocked_experts(x, weights, experts, w_gate, w_up, w_down, block_size: int):
  """sum_k g_{n,k} FFN_{e_{n,k}}(x_n) (V3 eq. 12's routed term) over block-padded groups.

  x [N, H]; weights, experts [N, K]; w_gate, w_up [E, H, I]; w_down [E, I, H] -> [N, H].
  """
  k = experts.shape[1]
  num_experts, hidden = w_gate.shape[0], x.shape[-1]
  layout = block_layout(experts, num_experts, block_size)
  rows = dispatch(x, layout, k).reshape(-1, block_size, hidden)       # [blocks, b, H]
  per_block = lambda w: jnp.take(w, layout.block_expert, axis=0, mode="clip")  # noqa: E731
  # gate and up projections as one matmul against [E, H, 2I]: one pass over the rows.
  gate_up = jnp.einsum("bmh,bhi->bmi", rows, per_block(jnp.concatenate([w_gate, w_up], -1)))
  gate, up = jnp.split(gate_up, 2, axis=-1)
  y = jnp.einsum("bmi,bih->bmh", jax.nn.silu(gate) * up, per_block(w_down))
  return jnp.einsum("nkh,nk->nh", collect(y.reshape(-1, hidden), layout, k),
                    weights.astype(y.dtype))
