"""Model behaviour beyond HF parity: dispatch paths, packing, positions, dtypes, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepjax as dj
from hf_reference import SMALL_V2, SMALL_V3


def _loss(model, tokens):
  out = model(tokens)
  logp = jax.nn.log_softmax(out.logits[:, :-1])
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
  return nll + (0.0 if out.mtp_logits is None else out.mtp_logits.mean())


@pytest.mark.parametrize("base", [dict(SMALL_V3, num_nextn_predict_layers=1), SMALL_V2],
                         ids=["v3_mtp", "v2"])
def test_dense_and_ragged_dispatch_agree_with_gradients(base):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 15)), jnp.int32)
  results = []
  for impl in ("dense", "ragged_dot"):
    model = dj.DeepSeek(dj.ModelConfig(**dict(base, moe_impl=impl)), rngs=nnx.Rngs(5))
    loss, grads = nnx.value_and_grad(_loss)(model, tokens)
    results.append((loss, jax.tree.leaves(nnx.to_pure_dict(grads))))
  (l1, g1), (l2, g2) = results
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_packed_documents_do_not_see_each_other():
  model = dj.DeepSeek(dj.ModelConfig(**SMALL_V3), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  doc_a, doc_b = rng.integers(0, 97, 9), rng.integers(0, 97, 6)
  packed = jnp.asarray(np.concatenate([doc_a, doc_b])[None], jnp.int32)
  segments = jnp.asarray([[1] * 9 + [2] * 6], jnp.int32)
  positions = jnp.asarray([list(range(9)) + list(range(6))], jnp.int32)
  out = model(packed, positions=positions, segment_ids=segments).logits
  alone_a = model(jnp.asarray(doc_a[None], jnp.int32)).logits
  alone_b = model(jnp.asarray(doc_b[None], jnp.int32)).logits
  np.testing.assert_allclose(out[:, :9], alone_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[:, 9:], alone_b, rtol=1e-5, atol=1e-6)


def test_router_stats_count_every_choice():
  cfg = dj.ModelConfig(**dict(SMALL_V3, num_nextn_predict_layers=1))
  out = dj.DeepSeek(cfg, rngs=nnx.Rngs(0))(jnp.zeros((3, 10), jnp.int32))
  layers = cfg.num_moe_layers + cfg.num_nextn_predict_layers
  assert out.router.counts.shape == (layers, 3, cfg.n_routed_experts)
  np.testing.assert_array_equal(out.router.counts.sum(-1), 10 * cfg.num_experts_per_tok)
  np.testing.assert_allclose(out.router.affinity.sum(-1), 10.0, rtol=1e-5)


def test_bfloat16_compute_tracks_float32():
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, 12)), jnp.int32)
  f32 = dj.DeepSeek(dj.ModelConfig(**SMALL_V3), rngs=nnx.Rngs(0))
  bf16 = dj.DeepSeek(dj.ModelConfig(**dict(SMALL_V3, dtype="bfloat16")), rngs=nnx.Rngs(0))
  a, b = f32(tokens).logits, bf16(tokens).logits
  assert b.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) < 5e-2


def test_jit_matches_eager():
  model = dj.DeepSeek(dj.ModelConfig(**SMALL_V3), rngs=nnx.Rngs(0))
  tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
  jitted = nnx.jit(lambda m, t: m(t).logits)(model, tokens)
  np.testing.assert_allclose(jitted, model(tokens).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens, message", [
    (np.array([[1, 2, 97]]), "outside the vocabulary"),
    (np.array([[-1, 2, 3]]), "outside the vocabulary"),
    (np.array([1, 2, 3]), r"\[batch, seq\]"),
    (np.array([[1.0, 2.0]]), "integers"),
])
def test_bad_tokens_raise(tokens, message):
  model = dj.DeepSeek(dj.ModelConfig(**SMALL_V3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=message):
    model(jnp.asarray(tokens))


def test_padding_is_left_out_of_router_stats():
  cfg = dj.ModelConfig(**SMALL_V3)
  model = dj.DeepSeek(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 10)), jnp.int32)
  segments = jnp.asarray([[1] * 10, [1] * 6 + [0] * 4], jnp.int32)
  out = model(tokens, segment_ids=segments)
  np.testing.assert_array_equal(out.router.counts.sum(-1),
                                [[10 * cfg.num_experts_per_tok, 6 * cfg.num_experts_per_tok]]
                                * cfg.num_moe_layers)
  np.testing.assert_allclose(out.router.affinity.sum(-1), [[10.0, 6.0]] * cfg.num_moe_layers,
                             rtol=1e-5)
  assert len(model.routers()) == cfg.num_moe_layers


@pytest.mark.parametrize("impls", [
    pytest.param(("pallas", "pallas", "pallas"), marks=pytest.mark.slow),
    ("pallas", "ragged_dot", "xla")])
def test_pallas_paths_give_the_same_loss_and_gradients(impls):
  base = dict(SMALL_V3, num_nextn_predict_layers=1)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 97, (2, 19)), jnp.int32)
  results = []
  for attention_impl, moe_impl, router_impl in (("xla", "dense", "xla"), impls):
    cfg = dj.ModelConfig(**dict(base, attention_impl=attention_impl, moe_impl=moe_impl,
                                router_impl=router_impl))
    model = dj.DeepSeek(cfg, rngs=nnx.Rngs(5))
    loss, grads = nnx.value_and_grad(_loss)(model, tokens)
    results.append((loss, nnx.to_flat_state(grads)))
  (l1, g1), (l2, g2) = results
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for (path, a), (_, b) in zip(g1, g2):
    np.testing.assert_allclose(a[...], b[...], rtol=1e-4, atol=1e-6, err_msg=str(path))
