"""One pre-norm decoder layer: h += MLA(norm(h)); h += FFN(norm(h)), FFN dense or MoE."""

import jax
import jax.numpy as jnp
from flax import nnx

from deepjax.config import ModelConfig
from deepjax.model.mla import MultiHeadLatentAttention
from deepjax.model.mlp import MLP
from deepjax.model.moe import MoE, RouterStats
from deepjax.model.norm import RMSNorm


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
    self.self_attn = MultiHeadLatentAttention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                            param_dtype=pdt)
    self.is_moe = cfg.is_moe_layer(layer_idx)
    self.mlp = MoE(cfg, rngs=rngs) if self.is_moe else MLP(cfg, cfg.intermediate_size, rngs=rngs)

  def __call__(self, x: jax.Array, positions, segment_ids=None
               ) -> tuple[jax.Array, RouterStats | None]:
    x = x + self.self_attn(self.input_layernorm(x), positions, segment_ids)
    if self.is_moe:
      token_mask = None if segment_ids is None else segment_ids != 0
      y, stats = self.mlp(self.post_attention_layernorm(x), token_mask)
    else:
      y, stats = self.mlp(self.post_attention_layernorm(x)), None
    return x + y, stats
