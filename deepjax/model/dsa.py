"""DeepSeek Sparse Attention (DeepSeek-V3.2 report §2): MLA whose queries attend only to the
keys their lightning indexer selects.

Every layer's indexer picks the top index_topk visible keys per query (`indexer.py`); MLA then
runs in its absorbed, MQA form (V2 §2.1.2; `mla.py`) over the selected latent entries only:

  score_{t,i,s} = (q^L_{t,i} . c^KV_s + q^R_{t,i} . k^R_s) * softmax_scale,   s in S_t
  o_{t,i} = W^UV_i sum_{s in S_t} softmax(score_{t,i,s}) c^KV_s

through `pk.sparse_mqa_attention` (one shared KV head of width d_c + d_R, values the d_c latent),
so work and memory follow index_topk, not T. Training, prefill and decoding run this same code;
only where the keys come from differs (this call's tokens, or the cache).
`dsa_attention="dense"` ignores the selection and runs MLA as V3 does: the indexer warm-up
stage (V3.2 §2.1), where only the indexer trains.

In training (no cache) the layer also returns the indexer's KL loss (V3.2 eqs. 3-4) against
its main attention: over every visible key in the dense mode, over the selected keys in the
sparse one. The indexer reads detached inputs, so it learns only from that loss and the model
only from the LM loss (V3.2 §2.1).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from pallas_kernels.tiling import QueryChunks
from deepjax.config import ModelConfig
from deepjax.model.indexer import (IndexerStats, LightningIndexer, indexer_stats, mean_stats,
                                   per_query_stats)
from deepjax.model.mla import MLACache, MultiHeadLatentAttention, write_rows


def sparse_attention_fn(impl: str):
  """Sparse MQA attention behind `attention_impl`: the Pallas kernel or the XLA gather form
  (query chunks)."""
  return pk.sparse_mqa_attention if impl == "pallas" else pk.xla_sparse.sparse_mqa_attention


@flax.struct.dataclass
class DSACache:
  """One DSA layer's cache: MLA's latent and rope key side by side, kv [B, S, d_c + d_R] (the
  rows sparse attention gathers, so decoding never copies the cache to join them), and the
  indexer key index_keys [B, S, D_I] (LayerNorm'd, RoPE'd; transformers' DynamicIndexedLayer)."""
  kv: jax.Array
  index_keys: jax.Array
  latent_dim: int = flax.struct.field(pytree_node=False)

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> DSACache:
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return cls(kv=jnp.zeros((batch, max_len, width), dtype),
               index_keys=jnp.zeros((batch, max_len, cfg.index_head_dim), dtype),
               latent_dim=cfg.kv_lora_rank)

  @property
  def latent(self) -> jax.Array:
    return self.kv[..., :self.latent_dim]

  @property
  def rope(self) -> jax.Array:
    return self.kv[..., self.latent_dim:]

  def write(self, kv, index_keys, positions) -> DSACache:
    return self.replace(kv=write_rows(self.kv, kv, positions),
                        index_keys=write_rows(self.index_keys, index_keys, positions))


class DeepSeekSparseAttention(MultiHeadLatentAttention):
  cache_type = DSACache

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.indexer = LightningIndexer(cfg, rngs=rngs)

  def __call__(self, x, positions, segment_ids=None, cache: DSACache | None = None, *,
               prefill: bool = False) -> tuple[jax.Array, DSACache | None, IndexerStats | None]:
    """x [B, T, hidden] at positions [B, T] -> (u [B, T, hidden], the updated cache, the
    indexer's IndexerStats in training, else None); the arguments mean what they mean for
    `MultiHeadLatentAttention`."""
    b, t, _ = x.shape
    c_q = self.query_latent(x)
    q_nope, q_rope = self.query_heads(c_q, positions)
    c_kv, k_rope = self.latent(x, positions)
    kv = jnp.concatenate([c_kv, k_rope.astype(c_kv.dtype)], axis=-1)   # one MQA head's rows
    h_index, c_q_index = jax.lax.stop_gradient((x, c_q))     # the indexer's detached input
    index_keys = self.indexer.keys(h_index, positions)
    if cache is not None:
      cache = cache.write(kv, index_keys, positions)
    from_cache = cache is not None and not prefill
    q = self.absorbed_query(q_nope, q_rope)                  # the MQA form's query
    selection = None
    if self.cfg.dsa_attention == "dense":
      o = (self.absorbed(q_nope, q_rope, cache, positions) if from_cache
           else self.expanded(q_nope, q_rope, c_kv, k_rope, segment_ids))
    elif from_cache:   # decoding: the keys are the cache's entries 0..S-1
      key_positions = jnp.broadcast_to(jnp.arange(cache.kv.shape[1]), cache.kv.shape[:2])
      indices, _ = self.indexer(h_index, c_q_index, positions, cache.index_keys, key_positions)
      o = self.sparse(q, cache.kv, indices)
    else:              # training and prefill: the keys are this call's tokens
      selection = self.indexer(h_index, c_q_index, positions, index_keys, positions, segment_ids)
      o = self.sparse(q, kv, selection[0])
    loss = None
    if cache is None:
      loss = self.indexer_loss(q, kv, h_index, c_q_index, positions, index_keys, segment_ids,
                               selection)
    return self.o_proj(o.reshape(b, t, -1)), cache, loss

  def absorbed_query(self, q_nope, q_rope):
    """[W^UK^T q^C; q^R] [B, T, H, d_c + d_R]: the query of the MQA form (V2 §2.1.2)."""
    w_uk, _ = self.absorbed_weights()
    q_latent = jnp.einsum("bthd,chd->bthc", q_nope, w_uk)
    return jnp.concatenate([q_latent, q_rope.astype(q_latent.dtype)], axis=-1)

  def sparse(self, q, kv, indices):
    """Absorbed MLA of q [B,T,H,d_c+d_R] over each query's selected rows of kv
    [B,S,d_c+d_R] (latent | rope key) -> [B, T, H, v_head_dim]."""
    o_latent = sparse_attention_fn(self.cfg.attention_impl)(
        q, kv.astype(q.dtype), indices, d_v=self.cfg.kv_lora_rank, sm_scale=self.cfg.softmax_scale)
    return jnp.einsum("bthc,chv->bthv", o_latent, self.absorbed_weights()[1])   # W^UV

  def indexer_loss(self, q, kv, h, c_q, positions, index_keys, segment_ids, selection):
    """IndexerStats by V3.2 eq. 3 (selection None: every visible key, the dense warm-up, with
    the recall of the indexer's top-k) or eq. 4 (the selected keys and their differentiable
    indexer scores), against this layer's main attention logits in the absorbed form."""
    kv = kv.astype(q.dtype)
    if selection is None:
      index_q, weights = self.indexer.queries(h, c_q, positions)
      return self.dense_indexer_stats(q, kv, index_q, weights, index_keys, positions,
                                      segment_ids)
    indices, scores = selection
    main = pk.xla_sparse.selected_logits(q, kv, indices)                    # [B,T,H,K]
    token_mask = None if segment_ids is None else segment_ids != 0
    return indexer_stats(main * self.cfg.softmax_scale, scores, indices >= 0, token_mask)

  def dense_indexer_stats(self, q, kv, index_q, weights, index_keys, positions, segment_ids):
    """Eq. 3's IndexerStats over every visible key, with the recall of the indexer's top-k, a
    chunk of queries at a time (each rematerialised in the backward pass): the main logits
    [B, chunk, H, S] and index scores [B, chunk, S] of one chunk live at once, never
    O(T · H · S)."""
    b, t, h, _ = q.shape
    s = kv.shape[1]
    chunks = QueryChunks.of(t, pk.xla_sparse.query_chunk(4 * s * (h + 4)))
    segments = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
    index_keys = index_keys.astype(index_q.dtype)

    def stats(q_c, index_q_c, weights_c, positions_c, segments_c):
      main = jnp.einsum("bthd,bsd->bths", q_c, kv, preferred_element_type=jnp.float32)
      valid = ((positions[:, None, :] <= positions_c[:, :, None])
               & (segments[:, None, :] == segments_c[:, :, None]))
      scores = pk.reference.indexer_scores(index_q_c, index_keys, weights_c)
      return per_query_stats(main * self.cfg.softmax_scale, scores, valid, segments_c != 0,
                             self.cfg.index_topk)

    return mean_stats(*pk.xla_sparse.over_query_chunks(
        stats, chunks, [q, index_q, weights, positions, segments], [0] * 5))
