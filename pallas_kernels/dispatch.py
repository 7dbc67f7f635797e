"""Dispatch metadata for dropless MoE: the routed (token, slot) pairs sorted by expert."""

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
