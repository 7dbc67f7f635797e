"""Block-padded MoE dispatch (moe_impl="blocked") against dense and ragged_dot: outputs and
gradients, the layout itself, experts that get no tokens and one expert that gets them all."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepjax as dj
import pallas_kernels.dispatch
from deepjax.model import dispatch
from deepjax.model.experts import RoutedExperts
from hf_reference import SMALL_V2, SMALL_V3


def _routing(rng, n, k, e, used=None):
  """Distinct expert ids per token drawn from `used` (default all e), and random gates."""
  pool = np.arange(e) if used is None else np.asarray(used)
  experts = np.stack([rng.choice(pool, k, replace=False) for _ in range(n)]).astype(np.int32)
  weights = rng.uniform(0.1, 1.0, (n, k)).astype(np.float32)
  return jnp.asarray(weights), jnp.asarray(experts)


@pytest.mark.parametrize("rank_by", ["one_hot", "sort"])
@pytest.mark.parametrize("n, k, e, block, used", [
    (37, 3, 8, 8, None),              # ragged loads, partial last blocks
    (64, 2, 16, 4, [0, 5, 6, 15]),    # 12 experts get no token
    (50, 1, 6, 16, [2]),              # every token on one expert: the padding bound is tight
    (9, 4, 4, 8, None),               # every token on every expert
])
def test_layout_places_every_pair_once_in_its_experts_blocks(n, k, e, block, used, rank_by,
                                                             monkeypatch):
  if rank_by == "sort":
    monkeypatch.setattr(pallas_kernels.dispatch, "ONE_HOT_RANK_LIMIT", 0)
  weights, experts = _routing(np.random.default_rng(n), n, k, e, used)
  del weights
  layout = dispatch.block_layout(experts, e, block)
  rows = dispatch.padded_rows(n * k, e, block)
  flat = np.asarray(experts).reshape(-1)
  position, pair = np.asarray(layout.position), np.asarray(layout.pair)
  block_expert = np.asarray(layout.block_expert)
  assert pair.shape == (rows,) and block_expert.shape == (rows // block,)
  assert len(set(position.tolist())) == n * k and position.max() < rows
  np.testing.assert_array_equal(pair[position], np.arange(n * k))          # inverse maps
  assert np.sum(pair == n * k) == rows - n * k                             # the rest is padding
  np.testing.assert_array_equal(block_expert[position // block], flat)     # right expert's block
  for x in range(e):                                                      # pair order kept
    assert np.all(np.diff(position[flat == x]) > 0)


@pytest.mark.parametrize("n, k, e, h, i, block, used", [
    (45, 2, 8, 12, 6, 8, None),
    (64, 4, 16, 16, 8, 4, [1, 3, 4, 9, 10, 14]),     # 10 experts with zero tokens
    (30, 1, 4, 8, 4, 8, [3]),                        # one expert takes every token
])
def test_blocked_experts_match_dense_and_ragged_with_gradients(n, k, e, h, i, block, used):
  rng = np.random.default_rng(e + n)
  weights, experts = _routing(rng, n, k, e, used)
  x = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
  ws = [jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32)
        for s in ((e, h, i), (e, h, i), (e, i, h))]
  cotangent = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
  cfg = dj.ModelConfig(**dict(SMALL_V3, n_routed_experts=e, num_experts_per_tok=k, n_group=1,
                              topk_group=1, hidden_size=h, moe_intermediate_size=i))
  dense = RoutedExperts(cfg.replace(moe_impl="dense"), rngs=nnx.Rngs(0))
  ragged = RoutedExperts(cfg.replace(moe_impl="ragged_dot"), rngs=nnx.Rngs(0))
  impls = {
      "dense": lambda x, w, *ws: dense._dense(x, w, experts, *ws),
      "ragged_dot": lambda x, w, *ws: ragged._sorted(x, w, experts, *ws),
      "blocked": lambda x, w, *ws: dispatch.blocked_experts(x, w, experts, *ws, block),
      # the decode-step dispatch: each (token, expert) pair gathers its expert's weights
      "chosen": lambda x, w, *ws: dense._gather_chosen(x, w, experts, *ws),
  }
  results = {name: jax.jit(jax.value_and_grad(lambda *a, f=f: jnp.vdot(f(*a), cotangent),
                                              argnums=(0, 1, 2, 3, 4)))(x, weights, *ws)
             for name, f in impls.items()}
  want_value, want_grads = results.pop("dense")
  for name, (value, grads) in results.items():
    np.testing.assert_allclose(value, want_value, rtol=1e-5, err_msg=name)
    for got, want in zip(grads, want_grads):
      # Sums of tens of float32 products in another order (the dense path sums over every
      # expert): entries near zero differ by ~1e-5 of the gradient's scale, not of their own.
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                 err_msg=name)
  unused = np.setdiff1d(np.arange(e), np.asarray(experts))
  if used is not None:
    assert unused.size == e - len(used)
  for g in results["blocked"][1][2:]:      # experts without tokens get exactly zero gradient
    assert not np.any(np.asarray(g)[unused])


def _loss(model, tokens):
  out = model(tokens)
  logp = jax.nn.log_softmax(out.logits[:, :-1])
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
  return nll + (0.0 if out.mtp_logits is None else out.mtp_logits.mean())


@pytest.mark.parametrize("base", [
    pytest.param(dict(SMALL_V3, num_nextn_predict_layers=1, n_routed_experts=16, n_group=8,
                      topk_group=3, num_experts_per_tok=4), marks=pytest.mark.slow),
    SMALL_V2,
], ids=["v3_mtp_many_groups", "v2"])
def test_model_blocked_matches_dense_and_ragged_logits_and_gradients(base):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 23)), jnp.int32)
  cfg = dj.ModelConfig(**base)
  n, k, e = tokens.size, cfg.num_experts_per_tok, cfg.n_routed_experts
  block = dispatch.block_size_for(n * k, e)
  assert dispatch.padded_rows(n * k, e, block) < n * e     # the blocked path, not its fallback
  results = {}
  for impl in ("dense", "ragged_dot", "blocked"):
    model = dj.DeepSeek(cfg.replace(moe_impl=impl), rngs=nnx.Rngs(5))
    logits = model(tokens).logits
    loss, grads = nnx.value_and_grad(_loss)(model, tokens)
    results[impl] = (logits, loss, jax.tree.leaves(nnx.to_pure_dict(grads)))
  want_logits, want_loss, want_grads = results["dense"]
  for impl in ("ragged_dot", "blocked"):
    logits, loss, grads = results[impl]
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for got, want in zip(grads, want_grads):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_blocked_falls_back_to_dense_for_few_tokens():
  """Decoding-sized inputs: the padded blocks would exceed N*E rows, so the dense form runs."""
  cfg = dj.ModelConfig(**SMALL_V3)
  tokens = jnp.asarray([[3], [7]], jnp.int32)
  n, k, e = 2, cfg.num_experts_per_tok, cfg.n_routed_experts
  assert dispatch.padded_rows(n * k, e, dispatch.block_size_for(n * k, e)) >= n * e
  blocked = dj.DeepSeek(cfg.replace(moe_impl="blocked"), rngs=nnx.Rngs(1))(tokens).logits
  dense = dj.DeepSeek(cfg.replace(moe_impl="dense"), rngs=nnx.Rngs(1))(tokens).logits
  np.testing.assert_allclose(blocked, dense, rtol=1e-6, atol=1e-7)


def test_block_size_keeps_padding_small():
  assert dispatch.block_size_for(16 * 256 * 4, 16) == 128          # tiny preset, 16 x 256
  for pairs, experts in [(100, 8), (4096, 64), (10**6, 256), (8, 256)]:
    b = dispatch.block_size_for(pairs, experts)
    assert 8 <= b <= 128 and b & (b - 1) == 0
    if b > 8:
      assert experts * (b - 1) <= pairs / 8
