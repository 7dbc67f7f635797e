"""RMSNorm computed in float32, cast back, then scaled (transformers' DeepseekV3RMSNorm)."""

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, axis_name="embed"):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)
