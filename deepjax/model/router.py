"""DeepSeekMoE gate: token-to-expert affinities and top-k selection, in float32.

V3 (eqs. 13-16): s = sigmoid(u W^T); experts are chosen on s + b, b the aux-loss-free
correction bias (state updated by training, not by gradients), within the topk_group groups
whose top-2 biased scores sum highest; gates are the unbiased s of the chosen experts,
normalised. V2 (eqs. 9-11, §2.2.2): softmax affinities, greedy or group-limited selection (a
group scores its max), never normalised. Both scale by routed_scaling_factor.

`route` is that math in plain XLA (router_impl="xla"); router_impl="pallas" runs the fused
kernel `pallas_kernels.moe_route` for the selection, with the same semantics
(`pallas_kernels.reference.moe_route` is its test oracle).
"""

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from deepjax.config import ModelConfig

# s_{i,t} from the router logits u_t^T e_i.
SCORE_FNS = {
    "sigmoid": jax.nn.sigmoid,                                  # V3 eq. 15
    "softmax": lambda logits: jax.nn.softmax(logits, axis=-1),  # V2 eq. 11
}


class RouterBias(nnx.Variable):
  """V3's e_score_correction_bias: selection-only bias, excluded from the optimizer."""


@flax.struct.dataclass
class Routing:
  weights: jax.Array   # [N, K] float32, gate values g_{i,t} of the chosen experts
  experts: jax.Array   # [N, K] int32
  scores: jax.Array    # [N, E] float32, unbiased affinities s_{i,t}


def route(scores: jax.Array, bias: jax.Array | None, cfg: ModelConfig
          ) -> tuple[jax.Array, jax.Array]:
  """Top-k selection and gates from the affinities scores [N, E] -> (weights, experts) [N, K].

  The kernel's oracle `pallas_kernels.reference.moe_route` states the same math over plain
  arguments (kernels know no config); tests/test_moe_route.py holds the two equal."""
  n, e = scores.shape
  choice = scores if bias is None else scores + bias[None, :]   # V3 eq. 16: b selects only
  if cfg.uses_groups:
    grouped = choice.reshape(n, cfg.n_group, e // cfg.n_group)
    if cfg.scoring_func == "sigmoid":
      group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)   # V3: sum of the top 2
    else:
      group_scores = jnp.max(grouped, axis=-1)                         # V2: the group's max
    _, kept = jax.lax.top_k(group_scores, cfg.topk_group)
    keep = jnp.zeros((n, cfg.n_group), bool).at[jnp.arange(n)[:, None], kept].set(True)
    choice = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(n, e)
  _, experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)         # V3 eq. 14, V2 eq. 10
  weights = jnp.take_along_axis(scores, experts, axis=-1)             # unbiased s_{i,t}
  if cfg.normalizes_topk:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)   # V3 eq. 13
  return weights * cfg.routed_scaling_factor, experts.astype(jnp.int32)


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
    scores = SCORE_FNS[cfg.scoring_func](logits)
    if cfg.router_impl == "pallas":
      weights, experts = pk.moe_route(
          logits, bias, top_k=cfg.num_experts_per_tok,
          n_group=cfg.n_group if cfg.uses_groups else 1,
          topk_group=cfg.topk_group if cfg.uses_groups else 1, score_fn=cfg.scoring_func,
          norm_topk_prob=cfg.normalizes_topk, routed_scaling_factor=cfg.routed_scaling_factor)
    else:
      weights, experts = route(scores, bias, cfg)
    return Routing(weights=weights, experts=experts, scores=scores)
