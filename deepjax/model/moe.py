"""DeepSeekMoE layer (V2 eq. 5, V3 eq. 12): shared experts + top-k of fine-grained routed experts.

Also returns the per-row routing statistics the balance losses and the bias update need.
"""

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from deepjax.config import ModelConfig
from deepjax.model.experts import RoutedExperts
from deepjax.model.mlp import MLP
from deepjax.model.router import Router


@flax.struct.dataclass
class RouterStats:
  """Per MoE layer and batch row (stacked [L, B, E] by the model).

  counts: how many of the row's tokens chose each expert (load; sums to T*K per row).
  affinity: sum over the row's tokens of s_{i,t} / sum_j s_{j,t} (V3 eq. 19's numerator terms).
  Padding tokens (segment id 0) are left out of both.
  dropped: the share of the layer's N*K routed copies that an expert-parallel capacity limit
  dropped (scalar per layer; [L] stacked).
  """
  counts: jax.Array
  affinity: jax.Array
  dropped: jax.Array


class MoE(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.gate = Router(cfg, rngs=rngs)
    self.experts = RoutedExperts(cfg, rngs=rngs)
    self.shared_experts = MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts,
                              rngs=rngs) if cfg.n_shared_experts > 0 else None

  def __call__(self, x: jax.Array, token_mask: jax.Array | None = None, *,
               decoding: bool = False) -> tuple[jax.Array, RouterStats]:
    """x [B, T, H]; token_mask [B, T] (False on padding) only affects the statistics;
    decoding: a step over the few new tokens of generation (see RoutedExperts)."""
    b, t, h = x.shape
    flat = x.reshape(b * t, h)
    routing = self.gate(flat)
    y, dropped = self.experts(flat, routing.weights, routing.experts, decoding=decoding)
    y = y.reshape(b, t, h).astype(x.dtype)
    if self.shared_experts is not None:
      y = y + self.shared_experts(x)
    e, k = routing.scores.shape[-1], routing.experts.shape[-1]
    valid = jnp.ones((b, t), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    rows = jnp.repeat(jnp.arange(b), t * k)
    counts = jnp.zeros((b, e), jnp.float32).at[rows, routing.experts.reshape(-1)].add(
        jnp.repeat(valid.reshape(-1), k))
    normalised = routing.scores / jnp.sum(routing.scores, axis=-1, keepdims=True)
    affinity = jnp.einsum("bte,bt->be", normalised.reshape(b, t, e), valid)
    return y, RouterStats(counts=counts, affinity=affinity, dropped=dropped / (b * t * k))
