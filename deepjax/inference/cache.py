"""The latent KV cache of Multi-head Latent Attention (DeepSeek-V2 §2.1.2, Table 1).

Per layer and token MLA caches only the compressed latent c^KV_t (kv_lora_rank, after
kv_a_layernorm; V2 eq. 9) and the decoupled rope key k^R_t shared by all heads (qk_rope_head_dim,
RoPE applied; V2 eq. 14): (d_c + d_h^R) elements instead of multi-head attention's 2 n_h d_h.
The per-head keys and values are never materialised while decoding: their up-projections W^UK
and W^UV are absorbed into the query and the output (deepjax.inference.decode).

Layers are separate buffers, as in DeepSeek's inference/model.py (`kv_cache`, `pe_cache` per
MLA module): the main model's layers first, then the blocks of the MTP modules that draft for
speculative decoding.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from deepjax.config import ModelConfig


@flax.struct.dataclass
class LatentCache:
  """latent[l]: [B, S, kv_lora_rank] normalised c^KV; rope[l]: [B, S, qk_rope_head_dim] k^R.

  Row b's entries 0..p are valid once the token at position p has been run; entries past a
  row's position may hold stale values and are masked by the decode attention's lengths.
  """
  latent: tuple[jax.Array, ...]
  rope: tuple[jax.Array, ...]

  @classmethod
  def create(cls, cfg: ModelConfig, batch: int, max_len: int, *, mtp_layers: int = 0,
             dtype=None) -> LatentCache:
    """Zeros for cfg.num_hidden_layers (+ mtp_layers MTP blocks) layers of `max_len` positions."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    layers = cfg.num_hidden_layers + mtp_layers
    zeros = lambda d: tuple(jnp.zeros((batch, max_len, d), dtype)  # noqa: E731
                            for _ in range(layers))
    return cls(latent=zeros(cfg.kv_lora_rank), rope=zeros(cfg.qk_rope_head_dim))

  @property
  def num_layers(self) -> int:
    return len(self.latent)

  @property
  def max_len(self) -> int:
    return self.latent[0].shape[1]

  @property
  def nbytes(self) -> int:
    return sum(x.nbytes for x in self.latent + self.rope)

  def layer(self, l: int) -> tuple[jax.Array, jax.Array]:
    return self.latent[l], self.rope[l]

  def replace_layer(self, l: int, latent: jax.Array, rope: jax.Array) -> LatentCache:
    return self.replace(latent=_set(self.latent, l, latent), rope=_set(self.rope, l, rope))


def _set(items: tuple, i: int, value) -> tuple:
  return items[:i] + (value,) + items[i + 1:]


def write(buffer: jax.Array, values: jax.Array, positions: jax.Array) -> jax.Array:
  """buffer [B, S, D] with values [B, T, D] written at positions [B, T] of each row.

  Positions >= S are dropped: rows that finished early keep stepping (their results unused)
  and may run one position past the cache.
  """
  rows = jnp.arange(buffer.shape[0])[:, None]
  return buffer.at[rows, positions].set(values.astype(buffer.dtype), mode="drop",
                                        unique_indices=True)
