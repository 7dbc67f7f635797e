"""Multi-token prediction module (DeepSeek-V3 §2.2, eqs. 21-23).

Module k combines the previous depth's hidden state h^{k-1}_i with the embedding of token
t_{i+k}: h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)] (embedding first, as in the
checkpoints), runs one transformer block, and predicts t_{i+k+1} through the shared output
head after its own final norm. Embedding and head are the main model's (shared).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from deepjax.config import ModelConfig
from deepjax.model.block import DecoderLayer, LayerStats
from deepjax.model.layers import Dense
from deepjax.model.norm import RMSNorm


class MTPModule(nnx.Module):

  def __init__(self, cfg: ModelConfig, depth: int, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    norm = lambda: RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)  # noqa: E731
    self.enorm = norm()
    self.hnorm = norm()
    self.eh_proj = Dense(2 * cfg.hidden_size, cfg.hidden_size, ("mtp_concat", "embed"),
                         dtype=jnp.dtype(cfg.dtype), param_dtype=pdt,
                         std=cfg.initializer_range, rngs=rngs)
    self.block = DecoderLayer(cfg, cfg.num_hidden_layers + depth - 1, rngs=rngs)
    self.final_norm = norm()        # checkpoint name: shared_head.norm

  def __call__(self, hidden: jax.Array, next_embedding: jax.Array, positions, segment_ids=None,
               cache=None, *, prefill: bool = False
               ) -> tuple[jax.Array, jax.Array, LayerStats, object]:
    """-> (h^k for the next depth, normed h^k for the head, the block's LayerStats, its
    updated cache)."""
    x = self.eh_proj(jnp.concatenate([self.enorm(next_embedding), self.hnorm(hidden)], -1))
    h, stats, cache = self.block(x, positions, segment_ids, cache, prefill=prefill)
    return h, self.final_norm(h), stats, cache
