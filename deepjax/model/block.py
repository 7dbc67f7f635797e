"""One decoder layer, built from its per-layer kinds (`ModelConfig.attention_kind`,
`mlp_kind`, `residual_kind`): with the `plain` residual, h += Attn(norm(h)); h += FFN(norm(h)).

V2 and V3 are configurations of this one layer: attention `mla`, MLP `dense` (the first
`first_k_dense_replace` layers) or `moe`. V3.2 swaps in attention `dsa` (MLA with the lightning
indexer). V4 will add its kinds to these tables.
"""

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from deepjax.config import ModelConfig
from deepjax.model.dsa import DeepSeekSparseAttention
from deepjax.model.indexer import IndexerStats
from deepjax.model.mla import MultiHeadLatentAttention
from deepjax.model.mlp import MLP
from deepjax.model.moe import MoE, RouterStats
from deepjax.model.norm import RMSNorm

# attention kind -> module; each takes (x, positions, segment_ids, cache, prefill=) and returns
# (output, updated cache, auxiliary training statistics or None), and names its per-layer
# cache as `cache_type`.
ATTENTION_MODULES = {"mla": MultiHeadLatentAttention, "dsa": DeepSeekSparseAttention}
MLP_MODULES = {"dense": lambda cfg, rngs: MLP(cfg, cfg.intermediate_size, rngs=rngs),
        "moe": lambda cfg, rngs: MoE(cfg, rngs=rngs)}


@flax.struct.dataclass
class LayerStats:
  """What a layer reports beside its output: the MoE's routing statistics (None for a dense
  MLP) and the attention's auxiliary statistics (V3.2's indexer in training; else None)."""
  router: RouterStats | None
  indexer: IndexerStats | None


def layer_cache(cfg: ModelConfig, layer: int, batch: int, max_len: int, dtype):
  """Zeros of layer `layer`'s cache (its attention kind's), for `max_len` positions."""
  return ATTENTION_MODULES[cfg.attention_kind(layer)].cache_type.zeros(cfg, batch, max_len, dtype)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
    self.self_attn = ATTENTION_MODULES[cfg.attention_kind(layer_idx)](cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                            param_dtype=pdt)
    self.is_moe = cfg.mlp_kind(layer_idx) == "moe"
    self.mlp = MLP_MODULES[cfg.mlp_kind(layer_idx)](cfg, rngs)

  def __call__(self, x: jax.Array, positions, segment_ids=None, cache=None, *,
               prefill: bool = False) -> tuple[jax.Array, LayerStats, object]:
    """-> (x, the layer's LayerStats, the attention's updated cache)."""
    y, cache, indexer = self.self_attn(self.input_layernorm(x), positions, segment_ids, cache,
                                       prefill=prefill)
    x = x + y
    if self.is_moe:
      token_mask = None if segment_ids is None else segment_ids != 0
      y, stats = self.mlp(self.post_attention_layernorm(x), token_mask,
                          decoding=cache is not None and not prefill)
    else:
      y, stats = self.mlp(self.post_attention_layernorm(x)), None
    return x + y, LayerStats(router=stats, indexer=indexer), cache
