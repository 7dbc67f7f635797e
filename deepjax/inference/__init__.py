"""Inference: latent KV cache, prefill and absorbed-MLA decode, sampling, MTP speculative decoding.

`generate(model, prompts, ...)` is the entry point (exported as `deepjax.generate`); the pieces
it is built from are public for research use: `LatentCache`, `forward` / `mtp_forward` (the
model with the cache, prefill or decode), `lm_logits`, `absorbed_attention`, `sample`.
"""

from deepjax.inference.cache import LatentCache
from deepjax.inference.decode import absorbed_attention, forward, lm_logits, mtp_forward
from deepjax.inference.generate import generate, generate_with_stats
from deepjax.inference.sampling import filter_logits, greedy, sample
from deepjax.inference.speculative import mtp_speculative_generate

__all__ = ["LatentCache", "absorbed_attention", "forward", "lm_logits", "mtp_forward",
           "generate", "generate_with_stats", "filter_logits", "greedy", "sample",
           "mtp_speculative_generate"]
