"""moe_route Pallas kernel (interpret mode) against pallas_kernels.reference.moe_route.

Every case mixes random rows with tied rows (few distinct values, a constant row, tied group
scores), so each compiled kernel is checked on its tie breaking: the chosen experts must be
identical to the reference's (lowest index first, as jax.lax.top_k), the weights within 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepjax as dj
from deepjax.model.router import SCORE_FNS, route
from pallas_kernels import reference
from pallas_kernels.moe_route import BlockSizes, moe_route

BLOCK = BlockSizes(block_n=16)   # N = 37 leaves a tail block
# Four groups of 8: group 1 repeats its max (its top-2 sum counts it twice); groups 0 and 2
# score exactly the same.
_TIED_GROUPS = jnp.array([0.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0,
                          2.0, 2.0, -3.0, -3.0, -3.0, -3.0, -3.0, -3.0,
                          1.0, 0.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0,
                          -2.0, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0])


def _logits(n, e, seed=0):
  """Random rows, then rows with few distinct values (ties everywhere), a constant row and,
  for 32 experts, the tied-group rows."""
  x = jax.random.normal(jax.random.key(seed), (n, e))
  tied = jnp.round(x[n // 2:] * 2) / 2
  x = x.at[n // 2:].set(tied).at[-1].set(0.25)
  if e == 32:
    x = x.at[-3].set(_TIED_GROUPS).at[-2].set(_TIED_GROUPS[::-1])
  return x


def _route(logits, bias, block_sizes=BLOCK, **kw):
  """Checks the kernel against the reference; returns the experts."""
  weights, experts = jax.jit(lambda l, b: moe_route(l, b, block_sizes=block_sizes, **kw))(
      logits, bias)
  ref_weights, ref_experts = jax.jit(lambda l, b: reference.moe_route(l, b, **kw))(logits, bias)
  assert weights.shape == experts.shape == (logits.shape[0], kw["top_k"])
  assert weights.dtype == jnp.float32 and experts.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(experts), np.asarray(ref_experts))
  np.testing.assert_allclose(np.asarray(weights), np.asarray(ref_weights), rtol=1e-6, atol=1e-6)
  return np.asarray(experts)


def test_sigmoid_groups_bias_changes_selection():
  # V3 form (eqs. 12-16): sigmoid, top-2 group sums, choice on s + b, weights from s.
  logits = _logits(37, 32, seed=1)
  bias = jnp.zeros(32).at[jnp.array([3, 17, 30])].set(1.0)
  kw = dict(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
  biased = _route(logits, bias, **kw)
  unbiased = _route(logits, None, **kw)
  assert np.any(biased != unbiased)


def test_sigmoid_greedy_unnormalised_bf16():
  _route(_logits(37, 32, seed=2).astype(jnp.bfloat16), None, top_k=6, norm_topk_prob=False,
         routed_scaling_factor=2.5)


def test_softmax_group_limited():
  # V2 group-limited greedy: a group scores its max; weights scaled, not normalised.
  bias = 0.01 * jax.random.normal(jax.random.key(3), (32,))
  _route(_logits(37, 32, seed=3), bias, top_k=6, n_group=4, topk_group=3, score_fn="softmax",
         norm_topk_prob=False, routed_scaling_factor=16.0)


def test_softmax_greedy_normalised():
  _route(_logits(37, 32, seed=4), None, top_k=4, score_fn="softmax")


def test_v3_shape():
  # DeepSeek-V3: 256 experts, 8 groups, top-4 groups, top-8, bias, scale 2.5.
  bias = 0.05 * jax.random.normal(jax.random.key(5), (256,))
  _route(_logits(300, 256, seed=5), bias, block_sizes=None, top_k=8, n_group=8, topk_group=4,
         routed_scaling_factor=2.5)


def test_v2_lite_shape():
  # DeepSeek-V2-Lite: 64 experts, softmax, greedy top-6, no normalisation.
  _route(_logits(300, 64, seed=6), None, block_sizes=None, top_k=6, score_fn="softmax",
         norm_topk_prob=False)


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="score_fn"):
    moe_route(jnp.zeros((4, 8)), None, top_k=2, score_fn="relu")
  with pytest.raises(ValueError, match="groups"):
    moe_route(jnp.zeros((4, 10)), None, top_k=2, n_group=4)


@pytest.mark.parametrize("score_fn, norm, groups", [("sigmoid", True, (4, 2)),
                                                    ("softmax", False, (1, 1))])
def test_gradient_matches_reference(score_fn, norm, groups):
  logits = jax.random.normal(jax.random.key(7), (37, 16), jnp.float32)
  bias = 0.1 * jax.random.normal(jax.random.key(8), (16,)) if score_fn == "sigmoid" else None
  kw = dict(top_k=3, n_group=groups[0], topk_group=groups[1], score_fn=score_fn,
            norm_topk_prob=norm, routed_scaling_factor=2.5)
  cot = jax.random.normal(jax.random.key(9), (37, 3))
  loss = lambda fn: lambda x: jnp.sum(fn(x, bias, **kw)[0] * cot)  # noqa: E731
  with jax.default_matmul_precision("highest"):
    got = jax.grad(loss(moe_route))(logits)
    want = jax.grad(loss(reference.moe_route))(logits)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fields", [
    dict(model_type="deepseek_v3", n_group=4, topk_group=2, num_experts_per_tok=4,
         routed_scaling_factor=2.5),                                  # V3: top-2 group sums
    dict(model_type="deepseek_v3", n_group=1, topk_group=1, num_experts_per_tok=3,
         norm_topk_prob=False),
    dict(model_type="deepseek_v2", topk_method="greedy", num_experts_per_tok=6),
    dict(model_type="deepseek_v2", topk_method="group_limited_greedy", n_group=8, topk_group=3,
         num_experts_per_tok=4, routed_scaling_factor=1.5),           # V2: group max
])
def test_model_router_equations_match_the_kernel_oracle(fields):
  """deepjax.model.router.route (router_impl="xla", the equations in the model) chooses the
  same experts as pallas_kernels.reference.moe_route, with the same gates, ties included."""
  cfg = dj.ModelConfig(**dict(fields, n_routed_experts=32, hidden_size=16))
  logits = _logits(37, 32, seed=3)
  bias = 0.1 * jax.random.normal(jax.random.key(4), (32,)) if cfg.uses_correction_bias else None
  weights, experts = route(SCORE_FNS[cfg.scoring_func](logits), bias, cfg)
  want_weights, want_experts = reference.moe_route(
      logits, bias, top_k=cfg.num_experts_per_tok,
      n_group=cfg.n_group if cfg.uses_groups else 1,
      topk_group=cfg.topk_group if cfg.uses_groups else 1, score_fn=cfg.scoring_func,
      norm_topk_prob=cfg.normalizes_topk, routed_scaling_factor=cfg.routed_scaling_factor)
  np.testing.assert_array_equal(experts, want_experts)
  np.testing.assert_allclose(weights, want_weights, rtol=1e-6)
