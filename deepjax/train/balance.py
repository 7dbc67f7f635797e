"""Auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2) and load statistics.

After each step every MoE gate's correction bias moves by gamma towards balance:
b_i += gamma * sign(mean_load - load_i), loads counted over the global batch. The bias only
changes which experts are chosen, never the gate values, and is not touched by the optimizer.
"""

import jax
import jax.numpy as jnp


def expert_loads(counts):
  """[L, B, E] per-row counts -> [L, E] loads over the (global) batch."""
  return jnp.sum(counts, axis=1)


def updated_biases(biases: list[jax.Array], loads, gamma: float) -> list[jax.Array]:
  """One bias update per MoE layer; loads [L, E] in the same order as `biases`."""
  mean = jnp.mean(loads, axis=-1, keepdims=True)
  steps = gamma * jnp.sign(mean - loads)
  return [b + steps[i].astype(b.dtype) for i, b in enumerate(biases)]


def max_violation(loads):
  """MaxVio (Wang et al. 2024): max_i load_i / mean load - 1 per layer -> [L]."""
  mean = jnp.mean(loads, axis=-1)
  return jnp.max(loads, axis=-1) / jnp.maximum(mean, 1e-9) - 1.0
