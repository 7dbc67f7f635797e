"""Dispatch metadata for MoE on plain arrays of expert ids: the routed (token, slot) pairs sorted
by expert, and each pair's rank among the pairs of its expert (its slot in a per-expert buffer)."""

import jax
import jax.numpy as jnp


def sort_by_expert(experts: jax.Array, num_experts: int):
  """Orders the N*K routed pairs of `experts` [N,K] by expert id (stable).

  Returns (order [N*K] int32: flat pair index at each sorted position -- its token is
  order // K; group_sizes [E] int32: pairs per expert; inverse [N*K] int32: sorted position of
  each flat pair), so that `x[order // K]` are the grouped matmul's rows and
  `rows[inverse].reshape(N, K, ...)` puts the results back.
  """
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
  return order, group_sizes, inverse


# Up to this many M x E entries the ranks come from a one-hot running count (cheap on CPU);
# beyond it (V3-sized routing) from a stable sort, which needs no [M, E] array.
ONE_HOT_RANK_LIMIT = 1 << 22


def rank_within_group(flat: jax.Array, num_experts: int):
  """(rank of each entry of `flat` [M] among the earlier entries with its value, entries per
  value) for values in [0, num_experts)."""
  if flat.size * num_experts <= ONE_HOT_RANK_LIMIT:
    one_hot = (flat[:, None] == jnp.arange(num_experts, dtype=jnp.int32)[None, :]).astype(
        jnp.int32)
    rank = jnp.take_along_axis(jnp.cumsum(one_hot, axis=0), flat[:, None], axis=1)[:, 0] - 1
    return rank, jnp.sum(one_hot, axis=0)
  order = jnp.argsort(flat, stable=True)
  counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  starts = jnp.cumsum(counts) - counts
  ranks_sorted = jnp.arange(flat.size, dtype=jnp.int32) - starts[flat[order]]
  return jnp.zeros_like(flat).at[order].set(ranks_sorted, unique_indices=True), counts
