"""Parameter-holding building blocks: dense projections and the token embedding.

Every parameter carries `logical_axes` metadata (e.g. ("embed", "vocab")); deepjax.parallel maps
those names to mesh axes with one rule table.
"""

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, shape, axes, dtype, std: float | None = 0.02) -> nnx.Param:
  """A Param drawn from N(0, std^2) (transformers' init), or ones when std is None."""
  if std is None:
    value = jnp.ones(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


class Dense(nnx.Module):
  """y = x W (+ b), W stored [in, out] (transformers stores W^T)."""

  def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, use_bias=False,
               dtype=jnp.float32, param_dtype=jnp.float32, std=0.02, rngs: nnx.Rngs):
    self.kernel = param(rngs, (d_in, d_out), axes, param_dtype, std)
    self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype), logical_axes=axes[1:]) \
        if use_bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding [vocab, hidden]; `attend` reuses it as a tied LM head."""

  def __init__(self, vocab: int, hidden: int, *, dtype, param_dtype, std=0.02, rngs: nnx.Rngs):
    self.embedding = param(rngs, (vocab, hidden), ("vocab", "embed"), param_dtype, std)
    self.dtype = dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)
