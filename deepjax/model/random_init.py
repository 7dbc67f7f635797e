"""Random weights spread wide enough for numerics checks and benchmarks.

A freshly initialised model (std 0.02, unit norms, zero router biases) has nearly flat logits:
greedy tokens then hinge on float noise and routing on ties. These weights, drawn with numpy
into an abstractly built module (nothing runs eagerly op by op), give well separated logits,
varied norms and correction biases that change expert selection.
"""

import jax
import numpy as np
from flax import nnx

from deepjax.config import ModelConfig
from deepjax.model.transformer import DeepSeek


def randomized(make, seed: int = 0):
  """make() built abstractly, then matrices ~ N(0, 0.08^2), vectors (norm scales) 1 + N(0, 0.2^2)
  and router correction biases N(0, 0.1^2)."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    noise = rng.standard_normal(x.shape).astype(x.dtype)
    if "e_score_correction_bias" in jax.tree_util.keystr(path):
      return 0.1 * noise
    return 1.0 + 0.2 * noise if x.ndim == 1 else 0.08 * noise

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def random_model(cfg: ModelConfig, seed: int = 0) -> DeepSeek:
  """A `DeepSeek` of `cfg` with `randomized` weights."""
  return randomized(lambda: DeepSeek(cfg, rngs=nnx.Rngs(0)), seed)
