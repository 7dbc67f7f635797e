"""Cache allocation for generation: one cache per layer, of the layer's attention kind.

For MLA (DeepSeek-V2 §2.1.2, Table 1) a layer caches only the compressed latent c^KV_t and the
decoupled rope key k^R_t (`deepjax.model.mla.MLACache`): (d_c + d_h^R) elements per token
instead of multi-head attention's 2 n_h d_h. Layers are separate buffers, as in DeepSeek's
inference/model.py: the main model's layers, then the blocks of the MTP modules that draft for
speculative decoding. The model's modules read and write them (`DeepSeek.forward`); this file
only sizes and allocates them.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from deepjax.config import ModelConfig
from deepjax.model import layer_cache


@flax.struct.dataclass
class LatentCache:
  """main[l]: layer l's cache; mtp[k]: MTP module k+1's block's. Row b's entries 0..p are
  valid once the token at position p has been run; later entries are masked by lengths."""
  main: tuple
  mtp: tuple

  @classmethod
  def create(cls, cfg: ModelConfig, batch: int, max_len: int, *, mtp_layers: int = 0,
             dtype=None) -> LatentCache:
    """Zeros for cfg.num_hidden_layers (+ mtp_layers MTP blocks) layers of `max_len` positions."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    zeros = lambda l: layer_cache(cfg, l, batch, max_len, dtype)  # noqa: E731
    return cls(main=tuple(zeros(l) for l in range(cfg.num_hidden_layers)),
               mtp=tuple(zeros(cfg.num_hidden_layers + k) for k in range(mtp_layers)))

  @property
  def num_layers(self) -> int:
    return len(self.main) + len(self.mtp)

  @property
  def max_len(self) -> int:
    return jax.tree.leaves(self.main)[0].shape[1]

  @property
  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self))
