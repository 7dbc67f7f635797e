"""DeepSeek: the full language model (embedding, decoder layers, norm, head, MTP modules).

One forward serves training, prefill and decode: `forward` runs the trunk with or without
per-layer caches (the way DeepSeek's inference/model.py runs one `Transformer.forward` with
`start_pos`), `mtp_forward` one MTP module, `logits` the head; `__call__` is the training and
evaluation pass over whole sequences. Allocating caches and driving the decode loop is
deepjax.inference's.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepjax.config import ModelConfig
from deepjax.model.block import DecoderLayer
from deepjax.model.layers import Dense, Embed
from deepjax.model.moe import RouterStats
from deepjax.model.mtp import MTPModule
from deepjax.model.norm import RMSNorm


@flax.struct.dataclass
class ModelOutput:
  logits: jax.Array                 # [B, T, vocab] float32, predicts t_{i+1}
  mtp_logits: jax.Array | None      # [D, B, T, vocab] float32, depth k predicts t_{i+k+1}
  router: RouterStats | None        # [L_moe, B, E]: main MoE layers, then each MTP block's
  hidden: jax.Array                 # [B, T, H] final-normed hidden states
  indexer_kl: jax.Array | None = None      # V3.2: the indexer's KL loss (eqs. 3-4) and, in
  indexer_recall: jax.Array | None = None  # the dense mode, its recall; means over the DSA
                                           # layers, main and MTP


class DeepSeek(nnx.Module):
  """`model(tokens, positions=None, segment_ids=None) -> ModelOutput`.

  tokens int32 [B, T]. positions default to 0..T-1. segment_ids [B, T] mark packed documents:
  a token attends only to earlier tokens of its own segment; segment 0 is padding, left out of
  the router statistics.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                              std=cfg.initializer_range, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs)
                            for i in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
    self.lm_head = None if cfg.tie_word_embeddings else Dense(
        cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), dtype=dt, param_dtype=pdt,
        std=cfg.initializer_range, rngs=rngs)
    self.mtp = nnx.List([MTPModule(cfg, k + 1, rngs=rngs)
                         for k in range(cfg.num_nextn_predict_layers)])

  def routers(self) -> list:
    """The MoE gates in the order of `ModelOutput.router`: main layers, then MTP blocks."""
    blocks = list(self.layers) + [module.block for module in self.mtp]
    return [block.mlp.gate for block in blocks if block.is_moe]

  def head(self, normed_hidden: jax.Array) -> jax.Array:
    if self.lm_head is None:
      logits = self.embed_tokens.attend(normed_hidden)
    else:
      logits = self.lm_head(normed_hidden)
    return logits.astype(jnp.float32)

  def logits(self, h: jax.Array) -> jax.Array:
    """float32 logits from the last layer's output h (the final norm, then the head)."""
    return self.head(self.norm(h))

  def forward(self, tokens, positions, segment_ids=None, caches=None, *, prefill: bool = False):
    """The embedding and the decoder layers: the trunk that training, prefill and decode share.

    caches: None (training), or one cache per main layer (`layer_cache`), updated and returned;
    prefill and the cached forward are as in the attention modules (e.g. MLA's).
    -> (h [B, T, hidden], the last layer's output before the final norm; every layer's
    LayerStats; the updated caches or None).
    """
    stats, new_caches = [], []
    h = self.embed_tokens(tokens)
    for i, layer in enumerate(self.layers):
      h, s, cache = layer(h, positions, segment_ids, None if caches is None else caches[i],
                          prefill=prefill)
      new_caches.append(cache)
      stats.append(s)
    return h, stats, None if caches is None else tuple(new_caches)

  def mtp_forward(self, depth: int, h, next_tokens, positions, segment_ids=None, cache=None, *,
                  prefill: bool = False):
    """MTP module `depth` (V3 eq. 21): h^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)].

    h: the previous depth's output (the main model's pre-norm output for depth 1);
    next_tokens [B, T]: t_{i+depth} at each position. -> (h^k, final-normed h^k: `head` of it
    predicts t_{i+depth+1}, the block's LayerStats, its updated cache).
    """
    return self.mtp[depth - 1](h, self.embed_tokens(next_tokens), positions, segment_ids, cache,
                               prefill=prefill)

  def __call__(self, tokens, positions=None, segment_ids=None) -> ModelOutput:
    check_tokens(tokens, self.cfg.vocab_size)
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, stats, _ = self.forward(tokens, positions, segment_ids)
    normed = self.norm(h)
    logits = self.head(normed)

    mtp_logits = []
    for k in range(1, len(self.mtp) + 1):                # V3 eq. 21: Emb(t_{i+k})
      shifted = jnp.concatenate([tokens[:, k:], jnp.zeros((b, min(k, t)), tokens.dtype)], 1)
      h, mtp_normed, s, _ = self.mtp_forward(k, h, shifted, positions, segment_ids)
      mtp_logits.append(self.head(mtp_normed))
      stats.append(s)

    routers = [s.router for s in stats if s.router is not None]
    router = jax.tree.map(lambda *layers: jnp.stack(layers), *routers) if routers else None
    indexers = [s.indexer for s in stats if s.indexer is not None]
    mean = lambda xs: jnp.mean(jnp.stack(xs)) if xs and xs[0] is not None else None  # noqa: E731
    return ModelOutput(logits=logits, mtp_logits=jnp.stack(mtp_logits) if mtp_logits else None,
                       router=router, hidden=normed,
                       indexer_kl=mean([i.kl for i in indexers]),
                       indexer_recall=mean([i.recall for i in indexers]))


def check_tokens(tokens, vocab_size: int) -> None:
  """Raises on token ids outside [0, vocab_size) when the ids are concrete (not under jit)."""
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be int32 [batch, seq], got shape {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integers, got {tokens.dtype}")
  if isinstance(tokens, jax.core.Tracer):
    return
  values = np.asarray(tokens)
  if values.size and (values.min() < 0 or values.max() >= vocab_size):
    bad = values[(values < 0) | (values >= vocab_size)]
    raise ValueError(f"token ids outside the vocabulary [0, {vocab_size}): e.g. {bad[:5].tolist()}")
