"""The model over the generation cache: prefill and decode steps are the model's own forward
(`DeepSeek.forward`, `DeepSeek.mtp_forward`) given the layers' caches.

prefill: the cache is empty and the tokens are whole right-padded prompts at positions 0..T-1;
each layer runs as in training and fills its cache. Otherwise the new tokens attend over the
cache (MLA in its absorbed form, DeepSeek-V2 §2.1.2) and the MoE layers run only the experts
the few new tokens chose. Both functions are pure in the cache: they return the updated one.
"""

from __future__ import annotations

from deepjax.inference.cache import LatentCache
from deepjax.model import DeepSeek


def forward(model: DeepSeek, tokens, positions, cache: LatentCache, *, prefill: bool = False):
  """The main model on tokens [B, T] at positions [B, T].

  -> (h [B, T, hidden], the last layer's output before the final norm: `model.logits(h)`, and
  what MTP module 1 takes; the cache).
  """
  h, _, main = model.forward(tokens, positions, caches=cache.main, prefill=prefill)
  return h, cache.replace(main=main)


def mtp_forward(model: DeepSeek, h, next_tokens, positions, cache: LatentCache, *,
                prefill: bool = False):
  """MTP module 1 (V3 §2.2, eq. 21) on the main model's pre-norm output h [B, T, hidden] and
  next_tokens [B, T], the token after each position.

  -> (final-normed h'_i [B, T, hidden]: `model.head` of it predicts t_{i+2}; the cache).
  """
  _, normed, _, block = model.mtp_forward(1, h, next_tokens, positions, cache=cache.mtp[0],
                                          prefill=prefill)
  return normed, cache.replace(mtp=(block,) + cache.mtp[1:])
