"""Rotary position embedding with YaRN context extension (DeepSeek-V2 §B.1, YaRN paper).

The frequencies follow transformers' `_compute_yarn_parameters` exactly (beta_fast, beta_slow,
truncate, attention_factor), computed in float32 like the reference.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from deepjax.config import ModelConfig, rope_type, yarn_mscale


@functools.lru_cache(maxsize=None)
def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """(inv_freq [qk_rope_head_dim // 2] float32, attention_factor applied to cos and sin)."""
  dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  pos_freqs = np.power(np.float32(base), exponents, dtype=np.float32)
  rs = cfg.rope_scaling
  if rs is None or rope_type(rs) != "yarn":
    return (1.0 / pos_freqs).astype(np.float32), 1.0

  factor = rs["factor"]
  original = rs["original_max_position_embeddings"]
  attention_factor = rs.get("attention_factor")
  if attention_factor is None:
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all_dim:
      attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
      attention_factor = yarn_mscale(factor)
  beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

  def correction_dim(rotations):   # the dimension whose wavelength fits `rotations` times
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if rs.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp.astype(np.float32)     # 1: keep the original frequency
  inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
  return inv_freq.astype(np.float32), float(attention_factor)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig,
               interleave: bool | None = None) -> jax.Array:
  """Rotates x [B, T, ..., d] at positions [B, T].

  Interleaved (V2, V3 with rope_interleave): pairs (x[2j], x[2j+1]) rotate by angle j and the
  result is written de-interleaved, as transformers' V3 does; q and k get the same permutation,
  so q.k equals the complex-pair form. Otherwise pairs are (x[j], x[j + d/2]) (rotate_half).
  `interleave` overrides cfg.rope_interleave (V3.2's indexer: always rotate_half).
  """
  inv_freq, attention_factor = rope_frequencies(cfg)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)    # [B, T, d/2]
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
  cos = (jnp.cos(angles) * attention_factor).astype(x.dtype)
  sin = (jnp.sin(angles) * attention_factor).astype(x.dtype)
  if cfg.rope_interleave if interleave is None else interleave:
    x1, x2 = x[..., 0::2], x[..., 1::2]
  else:
    x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
