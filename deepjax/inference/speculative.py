"""Greedy speculative decoding with DeepSeek-V3's MTP module as the draft model (V3 §2.2, §5.4.3).

The main model's last-layer output h_p at position p and the embedding of the token it chose,
t_{p+1}, go through MTP module 1, which predicts t_{p+2}: a draft one token further ahead, for
the price of one extra block. Each step then verifies it:

  main model on [t_{p+1}, draft] at positions [p+1, p+2]   (one pass of 2 tokens, with the cache)
    -> g_{p+2} (the true next token), g_{p+3} (its successor, if draft == g_{p+2})
  accept the draft iff it equals g_{p+2}: emit g_{p+2}, and g_{p+3} too when accepted
  MTP module on (h_{p+1}, g_{p+2}), (h_{p+2}, g_{p+3}) -> predictions of t_{p+3}, t_{p+4}; the
  next draft is the one for the token after the last emitted (t_{p+3} if rejected, else t_{p+4})

so the output is exactly greedy decoding's and a step emits 1 + [accepted] tokens. The MTP block
attends over its own latent cache (`LatentCache.mtp`), which like the main model's
holds one entry per position. A rejected draft leaves entries at p+2 that the next step
overwrites before anything reads them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepjax.inference.cache import LatentCache
from deepjax.inference.decode import forward, mtp_forward
from deepjax.inference.sampling import greedy
from deepjax.model import DeepSeek


def mtp_speculative_generate(model: DeepSeek, prompts, lengths, cache: LatentCache, eos_id, *,
                             max_new_tokens: int):
  """Greedy generation with MTP drafts. prompts [B, W] right-padded, lengths [B] int32; the
  cache has the MTP layer and W + max_new_tokens positions.

  -> (tokens [B, max_new_tokens], counters {steps, verified, accepted, emitted}, cache).
  """
  b, w = prompts.shape
  rows = jnp.arange(b)
  positions = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))
  h, cache = forward(model, prompts, positions, cache, prefill=True)
  first = greedy(model.logits(h[rows, lengths - 1]))
  # MTP prefill: position i takes (h_i, t_{i+1}); a row's last prompt position takes the
  # first generated token. Entries past it are overwritten by the decode steps.
  next_tokens = jnp.roll(prompts, -1, axis=1).at[rows, lengths - 1].set(first)
  h_mtp, cache = mtp_forward(model, h, next_tokens, positions, cache, prefill=True)
  draft = greedy(model.head(h_mtp[rows, lengths - 1]))

  out = jnp.full((b, max_new_tokens), jnp.maximum(eos_id, 0), jnp.int32).at[:, 0].set(first)
  zero = jnp.zeros((), jnp.int32)
  carry = dict(cache=cache, out=out, count=jnp.ones((b,), jnp.int32), pos=lengths,
               pending=first, draft=draft, done=first == eos_id, steps=zero, verified=zero,
               accepted=zero, emitted=zero)

  def active(c):
    return ~c["done"] & (c["count"] < max_new_tokens)

  def step(c):
    act = active(c)
    count, pos = c["count"], c["pos"]          # pos: the position of `pending`, not yet run
    tokens = jnp.stack([c["pending"], c["draft"]], axis=1)
    positions = pos[:, None] + jnp.arange(2, dtype=jnp.int32)
    h, cache = forward(model, tokens, positions, c["cache"])
    target = greedy(model.logits(h))                       # [B, 2]
    accept = c["draft"] == target[:, 0]
    h_mtp, cache = mtp_forward(model, h, target, positions, cache)
    draft = greedy(model.head(h_mtp[rows, accept.astype(jnp.int32)]))
    # The draft's successor is emitted when the draft holds, the row did not just end, and
    # there is room for it.
    second = accept & (target[:, 0] != eos_id) & (count + 1 < max_new_tokens)
    out = c["out"].at[rows, jnp.where(act, count, max_new_tokens)].set(target[:, 0], mode="drop")
    out = out.at[rows, jnp.where(act & second, count + 1, max_new_tokens)].set(
        target[:, 1], mode="drop")
    last = jnp.where(second, target[:, 1], target[:, 0])
    emitted = jnp.where(act, 1 + second.astype(jnp.int32), 0)
    return dict(cache=cache, out=out, count=count + emitted, pos=pos + emitted,
                pending=jnp.where(act, last, c["pending"]),
                draft=jnp.where(act, draft, c["draft"]),
                done=c["done"] | (act & (last == eos_id)), steps=c["steps"] + 1,
                verified=c["verified"] + jnp.sum(act),
                accepted=c["accepted"] + jnp.sum(act & accept),
                emitted=c["emitted"] + jnp.sum(emitted))

  c = jax.lax.while_loop(lambda c: jnp.any(active(c)), step, carry)
  counters = {k: c[k] for k in ("steps", "verified", "accepted", "emitted")}
  return c["out"], counters, c["cache"]
