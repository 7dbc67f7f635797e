"""RMSNorm computed in float32, cast back, then scaled (transformers' DeepseekV3RMSNorm); the
affine LayerNorm of V3.2's indexer keys."""

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


class LayerNorm(nnx.Module):
  """(x - mean) / sqrt(var + eps) * weight + bias over the last dim, in float32 (torch's
  nn.LayerNorm: V3.2's indexer `k_norm`)."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, axis_name="embed"):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=(axis_name,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.weight[...].astype(jnp.float32)
            + self.bias[...].astype(jnp.float32)).astype(x.dtype)
