"""DeepSeekMoE gate: token-to-expert affinities and top-k selection, in float32.

V3 (eqs. 13-16): s = sigmoid(u W^T); experts chosen on s + b, b the aux-loss-free correction bias
(state updated by training, not by gradients); top-2 group sums limit the groups. V2 (eq. 11):
softmax affinities, greedy or group-limited (group max) selection, never normalised.
"""

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from deepjax.config import ModelConfig


class RouterBias(nnx.Variable):
  """V3's e_score_correction_bias: selection-only bias, excluded from the optimizer."""


@flax.struct.dataclass
class Routing:
  weights: jax.Array   # [N, K] float32, gate values g_{i,t} of the chosen experts
  experts: jax.Array   # [N, K] int32
  scores: jax.Array    # [N, E] float32, unbiased affinities s_{i,t}


def route_fn(impl: str):
  """The routing implementation behind `moe_impl`: the fused Pallas router or plain jnp."""
  return pk.moe_route if impl == "pallas" else pk.reference.moe_route


class Router(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    e, h = cfg.n_routed_experts, cfg.hidden_size
    w = cfg.initializer_range * jax.random.normal(rngs.params(), (h, e), jnp.float32)
    self.kernel = nnx.Param(w, logical_axes=("embed", "expert"))
    self.e_score_correction_bias = RouterBias(jnp.zeros((e,), jnp.float32),
                                              logical_axes=("expert",)) \
        if cfg.uses_correction_bias else None

  def __call__(self, x: jax.Array) -> Routing:
    cfg = self.cfg
    logits = jnp.dot(x.astype(jnp.float32), self.kernel[...])
    bias = None if self.e_score_correction_bias is None else self.e_score_correction_bias[...]
    weights, experts = route_fn(cfg.moe_impl)(
        logits, bias, top_k=cfg.num_experts_per_tok,
        n_group=cfg.n_group if cfg.uses_groups else 1,
        topk_group=cfg.topk_group if cfg.uses_groups else 1,
        score_fn=cfg.scoring_func, norm_topk_prob=cfg.normalizes_topk,
        routed_scaling_factor=cfg.routed_scaling_factor)
    scores = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else \
        jax.nn.softmax(logits, axis=-1)
    return Routing(weights=weights, experts=experts, scores=scores)
