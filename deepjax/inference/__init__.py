"""Inference: cache allocation, the compiled prefill/decode loop, sampling, MTP speculative
decoding. The model's own modules do the computing (`DeepSeek.forward` with per-layer caches).

`generate(model, prompts, ...)` is the entry point (exported as `deepjax.generate`); the pieces
it is built from are public for research use: `LatentCache`, `forward` / `mtp_forward` (the
model over the cache, prefill or decode), `sample`.
"""

from deepjax.inference.cache import LatentCache
from deepjax.inference.decode import forward, mtp_forward
from deepjax.inference.generate import generate, generate_with_stats
from deepjax.inference.sampling import filter_logits, greedy, sample
from deepjax.inference.speculative import mtp_speculative_generate

__all__ = ["LatentCache", "forward", "mtp_forward", "generate", "generate_with_stats",
           "filter_logits", "greedy", "sample", "mtp_speculative_generate"]
