"""Expert parallelism: routed experts sharded over the `expert` mesh axis, tokens exchanged
with all-to-all inside `shard_map` (GShard-style dispatch/combine, DeepSeek-V3 §3.2.2).

Every device holds N tokens (the batch splits over data x fsdp x expert) and E/P experts (P the
size of `expert`). Per MoE layer, on each device:

  1. dispatch: the N*K routed copies are grouped by destination device (expert // (E/P)) into
     a send buffer [P, C, H] of C slots per destination, in token order within a destination;
  2. all-to-all over `expert`: device p receives, from every peer, the copies for its experts;
  3. the SwiGLU experts on the received rows, sorted by local expert, by the grouped matmul;
     empty slots sort after every expert's rows, past the group sizes, so they cost no FLOPs;
  4. all-to-all back, and the combine y_t = sum_k g_{t,k} FFN_{e_{t,k}}(x_t) (V3 eq. 12).

Dropless (capacity_factor None): C = N*K, room for every copy even if all go to one device.
With a capacity factor c: C = ceil(c * N*K / P); copies past a destination's C slots are
dropped (they add nothing to y) and counted. The experts' intermediate dimension may also be
split over `tensor`: each shard then holds a partial down projection, summed with psum.
Gradients flow through both exchanges (the transpose of an all-to-all is the reverse one).

Plain arrays in and out (tokens, gates, expert ids, the stacked expert weights) and the grouped
matmul as a function: no model is imported here.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from deepjax.parallel.mesh import batch_axes, check_divisibility

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


def is_active(mesh) -> bool:
  """Expert parallelism runs under a mesh (jax.set_mesh) whose `expert` axis is > 1."""
  return (mesh is not None and not mesh.empty and EXPERT_AXIS in mesh.axis_names
          and mesh.shape[EXPERT_AXIS] > 1)


def slots_per_device(num_pairs: int, devices: int, capacity_factor: float | None) -> int:
  """C, the send-buffer slots per destination device (see the module doc)."""
  if capacity_factor is None:
    return num_pairs
  return min(num_pairs, max(1, math.ceil(capacity_factor * num_pairs / devices)))


def routed_experts(x, weights, experts, w_gate, w_up, w_down, *, mesh, gmm: Callable,
                   capacity_factor: float | None = None, check_vma: bool = True):
  """x [N, H], gates weights [N, K], expert ids experts [N, K] (global arrays, N split over the
  batch axes); w_gate, w_up [E, H, I], w_down [E, I, H]; gmm(rows, w, group_sizes), the grouped
  matmul (pallas_kernels.gmm or its reference) -> (y [N, H], dropped copies []).

  check_vma: False only for a Pallas gmm, whose pallas_call out_shape sets no manual_axis_type
  (how the output varies over the mesh axes), which shard_map's check requires."""
  num_experts, _, inter = w_gate.shape
  check_divisibility(mesh, batch_size=x.shape[0], n_routed_experts=num_experts,
                     batch_name="expert parallelism: tokens")
  batch = batch_axes(mesh)
  tensor = (TENSOR_AXIS if mesh.shape.get(TENSOR_AXIS, 1) > 1
            and inter % mesh.shape[TENSOR_AXIS] == 0 else None)
  tokens = P(batch, None)
  local = functools.partial(_local_experts, devices=mesh.shape[EXPERT_AXIS],
                            capacity_factor=capacity_factor, gmm=gmm, batch_axes=batch,
                            tensor_axis=tensor)
  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(tokens, tokens, tokens, P(EXPERT_AXIS, None, tensor),
                P(EXPERT_AXIS, None, tensor), P(EXPERT_AXIS, tensor, None)),
      out_specs=(tokens, P()), check_vma=check_vma)(x, weights, experts, w_gate, w_up, w_down)


def _local_experts(x, weights, experts, w_gate, w_up, w_down, *, devices, capacity_factor, gmm,
                   batch_axes, tensor_axis):
  """One device's part: its N tokens' copies out, its E/P experts' rows in, and back."""
  n, k = experts.shape
  hidden, local_experts = x.shape[-1], w_gate.shape[0]
  slots = slots_per_device(n * k, devices, capacity_factor)
  flat = experts.reshape(-1)
  destination = flat // local_experts
  rank, _ = pk.rank_within_group(destination, devices)
  kept = rank < slots
  # A copy's slot in the send buffer; dropped copies point past its end and are not written.
  slot = jnp.where(kept, destination * slots + rank, devices * slots)
  send_rows = jnp.zeros((devices * slots, hidden), x.dtype).at[slot].set(
      jnp.repeat(x, k, axis=0), mode="drop")
  # Local expert id of each slot; `local_experts` marks an empty slot (sorted last below).
  send_ids = jnp.full((devices * slots,), local_experts, jnp.int32).at[slot].set(
      flat % local_experts, mode="drop")

  exchange = functools.partial(jax.lax.all_to_all, axis_name=EXPERT_AXIS, split_axis=0,
                               concat_axis=0, tiled=True)
  rows, ids = exchange(send_rows), exchange(send_ids)

  order, group_sizes, inverse = pk.sort_by_expert(ids[:, None], local_experts + 1)
  group_sizes = group_sizes[:local_experts]                  # empty slots: past every group
  sorted_rows = rows[order]
  h = jax.nn.silu(gmm(sorted_rows, w_gate, group_sizes)) * gmm(sorted_rows, w_up, group_sizes)
  out = exchange(gmm(h, w_down, group_sizes)[inverse])       # back to the senders' slots

  per_copy = out.at[slot].get(mode="fill", fill_value=0).reshape(n, k, hidden)
  y = jnp.einsum("nkh,nk->nh", per_copy, weights.astype(per_copy.dtype))
  if tensor_axis is not None:
    y = jax.lax.psum(y, tensor_axis)                         # partial sums over I shards
  dropped = jax.lax.psum(jnp.sum(~kept), batch_axes)
  return y, dropped
