"""Routed experts stored stacked as [E, ...] arrays, and the ways to dispatch to them.

A generation step that routes no more copies than there are experts runs only the chosen
experts, gathering their weights, whatever `moe_impl` says. `dense`: every expert on every
token, combined by the (mostly zero) gate matrix; simple, exact, for tiny configs.
`ragged_dot` / `pallas`: dropless sort-by-expert dispatch; the N*K routed copies of the
tokens are sorted by expert and run through grouped matmuls (jax.lax.ragged_dot, or
pallas_kernels.gmm), then put back in token order and summed with their gates. `blocked`:
dropless too, the routed copies grouped by expert in equal blocks and run as one batched matmul
(deepjax.model.dispatch); its cost follows the active FLOPs on every backend, the fast path on
CPU, where ragged_dot costs as much as `dense`. Under a mesh whose `expert` axis is > 1, the
experts are sharded and tokens reach them by all-to-all (deepjax.parallel.expert_parallel), with
the grouped matmul of `moe_impl` (ragged_dot unless `pallas`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from deepjax.config import ModelConfig
from deepjax.model.dispatch import block_size_for, blocked_experts, padded_rows
from deepjax.model.layers import param
from deepjax.parallel import expert_parallel


def grouped_matmul_fn(impl: str):
  return pk.gmm if impl == "pallas" else pk.reference.gmm


class RoutedExperts(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    pdt, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
    self.gate_proj = param(rngs, (e, h, i), ("expert", "embed", "expert_mlp"), pdt, std)
    self.up_proj = param(rngs, (e, h, i), ("expert", "embed", "expert_mlp"), pdt, std)
    self.down_proj = param(rngs, (e, i, h), ("expert", "expert_mlp", "embed"), pdt, std)

  def __call__(self, x: jax.Array, weights: jax.Array, experts: jax.Array, *,
               decoding: bool = False) -> tuple[jax.Array, jax.Array]:
    """x [N, H], gates weights [N, K] and expert ids [N, K] -> (sum_k g_k FFN_{e_k}(x) [N, H],
    the number of routed copies dropped by a capacity limit: only expert parallelism has one).
    decoding: a generation step; with no more routed copies than experts it gathers only the
    chosen experts' weights (`_gather_chosen`) whatever `moe_impl` says."""
    dt = jnp.dtype(self.cfg.dtype)
    x = x.astype(dt)
    wg, wu, wd = (w[...].astype(dt) for w in (self.gate_proj, self.up_proj, self.down_proj))
    mesh = jax.sharding.get_abstract_mesh()
    if expert_parallel.is_active(mesh):
      return expert_parallel.routed_experts(
          x, weights, experts, wg, wu, wd, mesh=mesh, gmm=grouped_matmul_fn(self.cfg.moe_impl),
          capacity_factor=self.cfg.moe_capacity_factor, check_vma=self.cfg.moe_impl != "pallas")
    if decoding and experts.size <= wg.shape[0]:
      return self._gather_chosen(x, weights, experts, wg, wu, wd), jnp.zeros((), jnp.int32)
    return self._local(x, weights, experts, wg, wu, wd), jnp.zeros((), jnp.int32)

  def _local(self, x, weights, experts, wg, wu, wd):
    """Every expert on this device: the dispatch `moe_impl` names."""
    if self.cfg.moe_impl == "blocked":
      n, k = experts.shape
      e = wg.shape[0]
      block = block_size_for(n * k, e)
      if padded_rows(n * k, e, block) < n * e:
        return blocked_experts(x, weights, experts, wg, wu, wd, block)
      # So few tokens (e.g. a short prompt) that the padded blocks hold more rows than computing
      # every expert on every token: the dense form is then the cheaper exact one.
      return self._dense(x, weights, experts, wg, wu, wd)
    if self.cfg.moe_impl == "dense":
      return self._dense(x, weights, experts, wg, wu, wd)
    return self._sorted(x, weights, experts, wg, wu, wd)

  def _gather_chosen(self, x, weights, experts, wg, wu, wd):
    """Each (token, expert) pair gathers its expert's matrices and runs a batched
    matrix-vector product: a step that routes a handful of tokens is bound by reading expert
    weights, so it reads only those chosen, as DeepSeek's inference/model.py runs only the
    experts that received tokens."""
    n, k = experts.shape
    take = lambda w: jnp.take(w, experts.reshape(-1), axis=0)                # noqa: E731
    rows = jnp.repeat(x, k, axis=0)                                         # [N*K, H]
    h = jax.nn.silu(jnp.einsum("ph,phi->pi", rows, take(wg))) * \
        jnp.einsum("ph,phi->pi", rows, take(wu))
    y = jnp.einsum("pi,pih->ph", h, take(wd)).reshape(n, k, -1)
    return jnp.einsum("nkh,nk->nh", y, weights.astype(y.dtype))

  def _dense(self, x, weights, experts, wg, wu, wd):
    n, e = x.shape[0], wg.shape[0]
    gates = jnp.zeros((n, e), weights.dtype).at[jnp.arange(n)[:, None], experts].add(weights)
    h = jax.nn.silu(jnp.einsum("nd,edi->nei", x, wg)) * jnp.einsum("nd,edi->nei", x, wu)
    y = jnp.einsum("nei,eid->ned", h, wd)
    return jnp.einsum("ned,ne->nd", y, gates.astype(y.dtype))

  def _sorted(self, x, weights, experts, wg, wu, wd):
    n, k = experts.shape
    gmm = grouped_matmul_fn(self.cfg.moe_impl)
    order, group_sizes, inverse = pk.sort_by_expert(experts, wg.shape[0])
    rows = x[order // k]                                       # [N*K, H], grouped by expert
    h = jax.nn.silu(gmm(rows, wg, group_sizes)) * gmm(rows, wu, group_sizes)
    y = gmm(h, wd, group_sizes)[inverse].reshape(n, k, -1)    # back to (token, slot) order
    return jnp.einsum("nkd,nk->nd", y, weights.astype(y.dtype))
