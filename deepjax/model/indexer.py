"""DeepSeek-V3.2's lightning indexer (V3.2 report §2.1, eq. 1): which keys each query attends.

  q^I_{t,j} = W^IQ_j c^Q_t            (from MLA's query latent c^Q, reused)
  k^I_s     = LayerNorm(W^IK h_s)      (one key per token, shared by the indexer heads)
  w_{t,j}   = W^w_j h_t
  I_{t,s}   = sum_j w_{t,j} ReLU(q^I_{t,j} . k^I_s)

RoPE covers the first qk_rope_head_dim dims of q^I and k^I in the rotate_half layout, with MLA's
(YaRN) frequencies; MLA itself rotates interleaved pairs. transformers scales the dots by
D_I^-1/2 and w by H_I^-1/2; both are positive, so they are folded into w here (the kernel's
contract). Scores are float32, as in transformers' DeepseekV32Indexer (DeepSeek's own code
scores in FP8 after a Hadamard rotation, which changes near-ties only).
"""

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from deepjax.config import ModelConfig
from deepjax.model.layers import Dense
from deepjax.model.norm import LayerNorm
from deepjax.model.rope import apply_rope

K_NORM_EPS = 1e-6   # transformers' nn.LayerNorm(index_head_dim, eps=1e-6)


@flax.struct.dataclass
class IndexerStats:
  """One DSA layer's indexer in training: its loss L_I and, over every visible key (the dense
  mode), its recall: the share of the main attention's mass p_t on its top index_topk keys."""
  kl: jax.Array
  recall: jax.Array | None


def indexer_stats(main_scores, index_scores, valid, token_mask=None, top_k=None):
  """The indexer's training loss (V3.2 eqs. 3-4) and recall, means over query tokens:

    L_I = KL(p_t || softmax(I_t)),   p_t = L1-normalised sum over heads of softmax(main scores)

  over each query's key set: every visible key in the dense warm-up (eq. 3), the selected
  keys S_t in the sparse stage (eq. 4). main_scores [B,T,H,N] (the main attention's scaled
  logits; a target, so no gradient flows back), index_scores [B,T,N], valid [B,T,N] bool,
  token_mask [B,T] (False: padding, left out). recall when top_k is given (the key set is every
  visible key).
  """
  return mean_stats(*per_query_stats(main_scores, index_scores, valid, token_mask, top_k))


def mean_stats(kl, recall, rows) -> IndexerStats:
  """IndexerStats of per-query KL and recall [B,T] (recall may be None): means over the
  queries that count, rows [B,T]."""
  mean = lambda x: jnp.sum(jnp.where(rows, x, 0.0)) / jnp.maximum(jnp.sum(rows), 1)  # noqa: E731
  return IndexerStats(kl=mean(kl), recall=None if recall is None else mean(recall))


def per_query_stats(main_scores, index_scores, valid, token_mask=None, top_k=None):
  """`indexer_stats` per query: (KL [B,T], recall [B,T] or None, the queries that count
  [B,T])."""
  kl, target, rows = _kl(main_scores, index_scores, valid, token_mask)
  recall = None
  if top_k is not None:
    picked, where = jax.lax.top_k(jnp.where(valid, index_scores, -jnp.inf),
                                  min(top_k, index_scores.shape[-1]))
    mass = jnp.take_along_axis(target, where, axis=-1)
    recall = jnp.sum(jnp.where(picked > -jnp.inf, mass, 0.0), axis=-1)
  return kl, recall, rows


def _kl(main_scores, index_scores, valid, token_mask):
  """(KL per query [B,T], the target p [B,T,N], the queries that count [B,T])."""
  main = jnp.where(valid[:, :, None], main_scores.astype(jnp.float32), -jnp.inf)
  target = jax.lax.stop_gradient(jnp.mean(jax.nn.softmax(main, axis=-1), axis=2))  # [B,T,N]
  log_q = jax.nn.log_softmax(jnp.where(valid, index_scores, -jnp.inf), axis=-1)
  terms = jnp.where(valid & (target > 0), target * (jnp.log(target) - log_q), 0.0)
  rows = jnp.any(valid, axis=-1)
  if token_mask is not None:
    rows &= token_mask
  return jnp.sum(terms, axis=-1), target, rows


def indexer_fn(impl: str):
  """The top-k selection behind `attention_impl`: Pallas score tiles with a running top-k, or
  XLA's top-k over query chunks' scores [B, chunk, S]."""
  return pk.lightning_indexer if impl == "pallas" else pk.xla_sparse.lightning_indexer


class LightningIndexer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    heads, dim = cfg.index_n_heads, cfg.index_head_dim
    self.wq_b = Dense(cfg.q_lora_rank, heads * dim, ("q_lora", "heads"), dtype=dt,
                      param_dtype=pdt, std=cfg.initializer_range, rngs=rngs)
    self.wk = Dense(cfg.hidden_size, dim, ("embed", "index_dim"), dtype=dt, param_dtype=pdt,
                    std=cfg.initializer_range, rngs=rngs)
    self.k_norm = LayerNorm(dim, eps=K_NORM_EPS, param_dtype=pdt, axis_name="index_dim")
    # Head weights stay float32 (transformers keeps weights_proj in float32).
    self.weights_proj = Dense(cfg.hidden_size, heads, ("embed", "index_heads"),
                              dtype=jnp.float32, param_dtype=jnp.float32,
                              std=cfg.initializer_range, rngs=rngs)

  def _rope(self, x, positions):
    """RoPE on the first qk_rope_head_dim dims, rotate_half layout."""
    r = self.cfg.qk_rope_head_dim
    rotated = apply_rope(x[..., :r], positions, self.cfg, interleave=False)
    return jnp.concatenate([rotated, x[..., r:]], axis=-1)

  def keys(self, h, positions):
    """k^I [B, T, D_I]: what the cache keeps per token."""
    k = self.k_norm(self.wk(h))
    return self._rope(k[:, :, None, :], positions)[:, :, 0]

  def queries(self, h, c_q, positions):
    """(q^I [B, T, H_I, D_I], w [B, T, H_I] float32 with both scales folded in)."""
    cfg = self.cfg
    q = self.wq_b(c_q).reshape(*c_q.shape[:2], cfg.index_n_heads, cfg.index_head_dim)
    scale = (cfg.index_n_heads * cfg.index_head_dim) ** -0.5
    return self._rope(q, positions), self.weights_proj(h) * scale

  def __call__(self, h, c_q, positions, keys, key_positions, segment_ids=None):
    """The top index_topk keys of each query among keys [B, S, D_I] at key_positions [B, S]:
    (indices [B, T, k] int32, -1 past the visible keys; scores [B, T, k] float32).

    A key is visible when its position is at most the query's (and, for packed sequences
    with segment_ids [B, T], T == S, in the query's segment). The selection is top-k among
    the visible keys, which is what transformers' (top-k over the causally masked scores) ∩
    causal mask attends to.
    """
    q, w = self.queries(h, c_q, positions)
    segments = {} if segment_ids is None else dict(q_segment_ids=segment_ids,
                                                   k_segment_ids=segment_ids)
    return indexer_fn(self.cfg.attention_impl)(
        q, keys.astype(q.dtype), w, top_k=self.cfg.index_topk, q_positions=positions,
        k_positions=key_positions, **segments)
