"""moe_route Pallas kernel (interpret mode) against pallas_kernels.reference.moe_route."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from pallas_kernels.moe_route import MoeRouteBlockSizes, moe_route

BLOCK = MoeRouteBlockSizes(block_n=16)


def _logits(n, e, seed=0, ties=False):
  x = jax.random.normal(jax.random.key(seed), (n, e))
  if ties:   # few distinct values: ties inside and across groups, and one constant row
    x = (jnp.round(x * 2) / 2).at[0].set(0.25)
  return x


def _route(logits, bias, block_sizes=BLOCK, **kw):
  """(kernel result, reference result); experts must be identical, weights ~1e-6."""
  weights, experts = jax.jit(lambda l, b: moe_route(l, b, block_sizes=block_sizes, **kw))(
      logits, bias)
  ref_weights, ref_experts = reference.moe_route(logits, bias, **kw)
  assert weights.dtype == jnp.float32 and experts.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(experts), np.asarray(ref_experts))
  np.testing.assert_allclose(np.asarray(weights), np.asarray(ref_weights), rtol=1e-6, atol=1e-6)
  return experts


@pytest.mark.parametrize("score_fn", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)], ids=["greedy", "groups"])
@pytest.mark.parametrize("norm_topk_prob,scale", [(True, 1.0), (False, 2.5)],
                         ids=["norm", "scaled"])
def test_matches_reference(score_fn, n_group, topk_group, norm_topk_prob, scale):
  # N = 37 is not a multiple of block_n = 16: the tail rows are masked.
  _route(_logits(37, 32), None, top_k=4, n_group=n_group, topk_group=topk_group,
         score_fn=score_fn, norm_topk_prob=norm_topk_prob, routed_scaling_factor=scale)


@pytest.mark.parametrize("score_fn", ["sigmoid", "softmax"])
def test_bias_changes_selection(score_fn):
  logits = _logits(37, 32, seed=1)
  bias = jnp.zeros(32).at[jnp.array([3, 17, 30])].set(1.0)   # V3 eq. 16: choose on s + b
  kw = dict(top_k=4, n_group=4, topk_group=2, score_fn=score_fn)
  biased = _route(logits, bias, **kw)
  unbiased = _route(logits, None, **kw)
  assert np.any(np.asarray(biased) != np.asarray(unbiased))


@pytest.mark.parametrize("score_fn", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)], ids=["greedy", "groups"])
def test_ties_break_towards_lower_index(score_fn, n_group, topk_group):
  _route(_logits(37, 32, seed=2, ties=True), None, top_k=6, n_group=n_group,
         topk_group=topk_group, score_fn=score_fn)


def test_tied_group_scores():
  # Group 1 repeats its max (top-2 sum counts it twice); groups 0 and 2 tie exactly.
  row = jnp.array([0.0, 1.0, -1.0, -1.0,  2.0, 2.0, -3.0, -3.0,
                   1.0, 0.0, -1.0, -1.0,  -2.0, -2.0, -2.0, -2.0])
  logits = jnp.stack([row, row[::-1], jnp.zeros(16)])
  _route(logits, None, top_k=4, n_group=4, topk_group=2)
  _route(logits, None, top_k=4, n_group=4, topk_group=2, score_fn="softmax")


def test_v3_shape():
  # DeepSeek-V3: 256 experts, 8 groups, top-4 groups, top-8, bias, scale 2.5.
  bias = 0.05 * jax.random.normal(jax.random.key(4), (256,))
  _route(_logits(300, 256, seed=3), bias, block_sizes=None, top_k=8, n_group=8,
         topk_group=4, routed_scaling_factor=2.5)


def test_v2_lite_shape():
  # DeepSeek-V2-Lite: 64 experts, softmax, greedy top-6, no normalisation.
  _route(_logits(300, 64, seed=5), None, block_sizes=None, top_k=6, score_fn="softmax",
         norm_topk_prob=False)


def test_bfloat16_logits():
  _route(_logits(37, 32, seed=6).astype(jnp.bfloat16), None, top_k=4, n_group=4, topk_group=2)
