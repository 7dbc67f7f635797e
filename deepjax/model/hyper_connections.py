"""Manifold-constrained hyper-connections (mHC; DeepSeek-V4 §2.2, Xie et al. 2026): the `mhc`
residual, where each token carries n = hc_mult residual streams X [B, T, n, d] instead of one.

Around every sub-block F (attention, then the MLP) the streams give, through one projection of
their flattened, RMS-normalised values v = vec(X) (float32):

  mix  = rsqrt(mean(v^2) + eps) * (W v)                              W [(2 + n) n, n d]
  pre  = sigmoid(mix[:n] s_0 + b[:n]) + hc_eps                       [n]
  post = 2 sigmoid(mix[n:2n] s_1 + b[n:2n])                          [n]
  C    = Sinkhorn(mix[2n:] s_2 + b[2n:])                             [n, n], doubly stochastic
  X'_k = post_k F(sum_j pre_j X_j) + sum_j C_jk X_j                  (C applied transposed)

so the residual map is a convex mix of streams: non-expansive however deep the stack. The
model's head collapses the streams once more with its own `pre` (`HyperHead`), no post or mix.
Parameter names and layout are transformers' `DeepseekV4HyperConnection` (fn, base, scale)
and `DeepseekV4HyperHead` (hc_fn, hc_base, hc_scale), the hub's `hc_attn_*` / `hc_ffn_*` /
`hc_head_*`; all float32.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
  """Logits [..., n, n] -> a near doubly-stochastic matrix: a softmax over each row (+ eps),
  then alternately columns and rows normalised to sum to one (each sum + eps), `iters`
  column normalisations in all, the last one last (V4's Sinkhorn-Knopp projection)."""
  c = jax.nn.softmax(logits, axis=-1) + eps
  c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)
  for _ in range(iters - 1):
    c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
    c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)
  return c


def _normalised_mix(streams: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """rsqrt(mean(v^2) + eps) * (weight v) for v = the flattened streams, float32 [B, T, m]."""
  v = streams.reshape(streams.shape[:2] + (-1,)).astype(jnp.float32)
  v = v * jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps)
  return jnp.einsum("btk,mk->btm", v, weight, precision=jax.lax.Precision.HIGHEST)


def _collapse(pre: jax.Array, streams: jax.Array) -> jax.Array:
  """sum_j pre_j X_j: [B, T, n] x [B, T, n, d] -> [B, T, d] in the streams' dtype."""
  return jnp.sum(pre[..., None] * streams.astype(jnp.float32), axis=2).astype(streams.dtype)


class HyperConnection(nnx.Module):
  """The mHC around one sub-block: `__call__(streams, sublayer)` collapses the streams into
  the sub-block's input, runs it and writes its output back into every stream beside the mixed
  residual."""

  def __init__(self, hidden_size: int, hc_mult: int, *, sinkhorn_iters: int, hc_eps: float,
               norm_eps: float, rngs: nnx.Rngs, init_std: float = 0.02):
    n = hc_mult
    self.hc_mult, self.sinkhorn_iters, self.hc_eps, self.norm_eps = n, sinkhorn_iters, hc_eps, \
        norm_eps
    self.fn = nnx.Param(init_std * jax.random.normal(rngs.params(), ((2 + n) * n, n * hidden_size),
                                                     jnp.float32))
    self.base = nnx.Param(jnp.zeros(((2 + n) * n,), jnp.float32))
    self.scale = nnx.Param(jnp.ones((3,), jnp.float32))

  def weights(self, streams: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """streams [B, T, n, d] -> (pre [B, T, n], post [B, T, n], C [B, T, n, n]), float32."""
    n = self.hc_mult
    mix = _normalised_mix(streams, self.fn[...], self.norm_eps)
    base, scale = self.base[...], self.scale[...]
    pre = jax.nn.sigmoid(mix[..., :n] * scale[0] + base[:n]) + self.hc_eps
    post = 2.0 * jax.nn.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    logits = mix[..., 2 * n:] * scale[2] + base[2 * n:]
    comb = sinkhorn(logits.reshape(logits.shape[:-1] + (n, n)), self.sinkhorn_iters, self.hc_eps)
    return pre, post, comb

  def __call__(self, streams: jax.Array, sublayer: Callable[[jax.Array], tuple]):
    """streams [B, T, n, d]; sublayer(x [B, T, d]) -> (y [B, T, d], *extras).
    -> (the new streams [B, T, n, d], *extras)."""
    pre, post, comb = self.weights(streams)
    y, *extras = sublayer(_collapse(pre, streams))
    dtype = streams.dtype
    mixed = jnp.einsum("btjk,btjd->btkd", comb.astype(dtype), streams)      # C^T X
    return (post.astype(dtype)[..., None] * y[:, :, None, :] + mixed, *extras)


class HyperHead(nnx.Module):
  """The head's collapse of the streams before the final norm: sum_j pre_j X_j with
  pre = sigmoid(mix s + b) + hc_eps, mix from its own projection [n, n d]."""

  def __init__(self, hidden_size: int, hc_mult: int, *, hc_eps: float, norm_eps: float,
               rngs: nnx.Rngs, init_std: float = 0.02):
    self.hc_eps, self.norm_eps = hc_eps, norm_eps
    self.hc_fn = nnx.Param(init_std * jax.random.normal(rngs.params(),
                                                        (hc_mult, hc_mult * hidden_size),
                                                        jnp.float32))
    self.hc_base = nnx.Param(jnp.zeros((hc_mult,), jnp.float32))
    self.hc_scale = nnx.Param(jnp.ones((1,), jnp.float32))

  def __call__(self, streams: jax.Array) -> jax.Array:
    """streams [B, T, n, d] -> [B, T, d]."""
    mix = _normalised_mix(streams, self.hc_fn[...], self.norm_eps)
    pre = jax.nn.sigmoid(mix * self.hc_scale[...] + self.hc_base[...]) + self.hc_eps
    return _collapse(pre, streams)


def expand(x: jax.Array, hc_mult: int) -> jax.Array:
  """The embedding [B, T, d] as hc_mult identical streams [B, T, n, d]."""
  return jnp.broadcast_to(x[:, :, None, :], x.shape[:2] + (hc_mult, x.shape[-1]))
