"""Next-token targets for packed rows: the model never predicts across documents."""

import jax.numpy as jnp


def next_token_targets(tokens, segment_ids, k: int = 1):
  """Targets k steps ahead within the same document, and where they are valid.

  tokens, segment_ids: [..., T] int, usually [B, T] (numpy or jax; works under jit).
  Returns (targets int32, mask bool) of the same shape: targets[..., i] = tokens[..., i + k] and
  mask[..., i] is true iff segment_ids[..., i + k] == segment_ids[..., i] != 0. Positions whose
  target lies in another document, in padding or past the row end are masked (target 0).
  k = 1 gives the LM targets, k = 2 .. D + 1 those of the D MTP depths.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  tokens = jnp.asarray(tokens, jnp.int32)
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  shift = min(k, tokens.shape[-1])

  def ahead(x):  # x[..., i + k], 0 past the end of the row
    return jnp.pad(x[..., shift:], [(0, 0)] * (x.ndim - 1) + [(0, shift)])

  future_segments = ahead(segment_ids)
  mask = (future_segments == segment_ids) & (segment_ids != 0)
  return jnp.where(mask, ahead(tokens), 0), mask
