"""Next-token choice from logits: greedy, or temperature sampling restricted by top-k and top-p."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def greedy(logits: jax.Array) -> jax.Array:
  """argmax over the vocabulary (ties to the lower id) -> int32 [B]."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def filter_logits(logits: jax.Array, *, top_k, top_p) -> jax.Array:
  """logits [B, V] with every token outside the top-k and outside the nucleus set to -inf.

  top_k: keep the k most likely tokens (0: all); ties at the k-th value are all kept.
  top_p: keep the smallest most-likely-first set whose probability reaches top_p (nucleus
  sampling, Holtzman et al. 2020); the most likely token is always kept. Both may be traced.
  """
  vocab = logits.shape[-1]
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]                          # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(ordered, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs                           # mass of better tokens
  in_nucleus = (before < top_p) | (top_p >= 1.0)
  in_nucleus = in_nucleus.at[:, 0].set(True)
  cutoff = jnp.min(jnp.where(in_nucleus, ordered, jnp.inf), axis=-1, keepdims=True)
  keep = (logits >= kth) & (logits >= cutoff)
  return jnp.where(keep, logits, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, *, temperature, top_k, top_p) -> jax.Array:
  """One token per row from softmax(logits / temperature) over the top-k / top-p set -> [B]."""
  logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
