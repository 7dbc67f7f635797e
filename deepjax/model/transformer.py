"""DeepSeek: the full V2/V3 language model (embedding, decoder layers, norm, head, MTP)."""

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

  def __call__(self, tokens, positions=None, segment_ids=None) -> ModelOutput:
    check_tokens(tokens, self.cfg.vocab_size)
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    stats = []
    h = self.embed_tokens(tokens)
    for layer in self.layers:
      h, s = layer(h, positions, segment_ids)
      if s is not None:
        stats.append(s)
    normed = self.norm(h)
    logits = self.head(normed)

    mtp_logits = []
    for k, module in enumerate(self.mtp, start=1):       # V3 eq. 21: Emb(t_{i+k})
      shifted = jnp.concatenate([tokens[:, k:], jnp.zeros((b, min(k, t)), tokens.dtype)], 1)
      h, mtp_normed, s = module(h, self.embed_tokens(shifted), positions, segment_ids)
      mtp_logits.append(self.head(mtp_normed))
      if s is not None:
        stats.append(s)

    router = None
    if stats:
      router = jax.tree.map(lambda *layers: jnp.stack(layers), *stats)
    return ModelOutput(logits=logits, mtp_logits=jnp.stack(mtp_logits) if mtp_logits else None,
                       router=router, hidden=normed)


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
