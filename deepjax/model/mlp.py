"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)); dense layers and shared experts."""

import jax
import jax.numpy as jnp
from flax import nnx

from deepjax.config import ModelConfig
from deepjax.model.layers import Dense


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, intermediate_size: int, *, rngs: nnx.Rngs):
    kw = dict(use_bias=cfg.mlp_bias, dtype=jnp.dtype(cfg.dtype),
              param_dtype=jnp.dtype(cfg.param_dtype), std=cfg.initializer_range, rngs=rngs)
    self.gate_proj = Dense(cfg.hidden_size, intermediate_size, ("embed", "mlp"), **kw)
    self.up_proj = Dense(cfg.hidden_size, intermediate_size, ("embed", "mlp"), **kw)
    self.down_proj = Dense(intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
