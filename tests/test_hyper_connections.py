"""mHC (DeepSeek-V4 §2.2): deepjax.model.hyper_connections against transformers'
DeepseekV4HyperConnection and DeepseekV4HyperHead in float32, the decoder layer's residual
update (post * F(collapsed) + C^T X) against its formula, and the Sinkhorn projection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepjax.model.hyper_connections import HyperConnection, HyperHead, expand, sinkhorn

torch = pytest.importorskip("torch")
v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
from transformers import DeepseekV4Config  # noqa: E402

B, T, N, D = 2, 5, 4, 16
ITERS, HC_EPS, NORM_EPS = 20, 1e-6, 1e-6


def _hf_config():
  return DeepseekV4Config(hidden_size=D, hc_mult=N, hc_sinkhorn_iters=ITERS, hc_eps=HC_EPS,
                          rms_norm_eps=NORM_EPS, vocab_size=32, num_hidden_layers=1)


def _streams(seed):
  return np.random.default_rng(seed).normal(size=(B, T, N, D)).astype(np.float32)


def _randomise(module, seed):
  """Random values in every parameter (transformers' init leaves base zero, scale one)."""
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    for param in module.parameters():
      param.copy_(torch.from_numpy(rng.normal(size=param.shape).astype(np.float32) * 0.5))


def test_weights_and_residual_update_match_transformers():
  hf = v4.DeepseekV4HyperConnection(_hf_config()).float()
  _randomise(hf, 0)
  ours = HyperConnection(D, N, sinkhorn_iters=ITERS, hc_eps=HC_EPS, norm_eps=NORM_EPS,
                         rngs=nnx.Rngs(0))
  for name in ("fn", "base", "scale"):
    getattr(ours, name)[...] = jnp.asarray(getattr(hf, name).detach().numpy())
  x = _streams(1)
  with torch.no_grad():
    post, comb, collapsed = (t.numpy() for t in hf(torch.from_numpy(x)))
  pre, our_post, our_comb = ours.weights(jnp.asarray(x))
  np.testing.assert_allclose(our_post, post, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(our_comb, comb, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.sum(pre[..., None] * x, axis=2), collapsed, rtol=1e-5, atol=1e-5)
  # The decoder layer's update, with a sub-block F(z) = tanh(z W): post F + C^T X.
  w = np.random.default_rng(2).normal(size=(D, D)).astype(np.float32)
  y = np.tanh(collapsed @ w)
  expected = post[..., None] * y[:, :, None, :] + np.einsum("btjk,btjd->btkd", comb, x)
  got, extra = ours(jnp.asarray(x), lambda z: (jnp.tanh(z @ w), "aux"))
  assert extra == "aux"
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_head_matches_transformers():
  hf = v4.DeepseekV4HyperHead(_hf_config()).float()
  _randomise(hf, 3)
  ours = HyperHead(D, N, hc_eps=HC_EPS, norm_eps=NORM_EPS, rngs=nnx.Rngs(0))
  for name in ("hc_fn", "hc_base", "hc_scale"):
    getattr(ours, name)[...] = jnp.asarray(getattr(hf, name).detach().numpy())
  x = _streams(4)
  with torch.no_grad():
    expected = hf(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(ours(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_sinkhorn_is_doubly_stochastic_and_not_symmetric():
  logits = jnp.asarray(np.random.default_rng(5).normal(size=(3, N, N)) * 3, jnp.float32)
  c = sinkhorn(logits, ITERS, HC_EPS)
  np.testing.assert_allclose(jnp.sum(c, axis=-2), 1.0, atol=1e-5)      # ends on the columns
  np.testing.assert_allclose(jnp.sum(c, axis=-1), 1.0, atol=2e-2)     # 20 rounds: within 1%
  assert float(jnp.max(jnp.abs(c - jnp.swapaxes(c, -1, -2)))) > 1e-2
  one = sinkhorn(logits, 1, HC_EPS)              # one iteration: softmax, then the columns
  soft = jax.nn.softmax(logits, axis=-1) + HC_EPS
  np.testing.assert_allclose(one, soft / (jnp.sum(soft, -2, keepdims=True) + HC_EPS), rtol=1e-6)


def test_identical_streams_stay_a_convex_mix():
  """From the embedding's n copies, the mixed residual C^T X is the embedding again (columns
  of C sum to one): the streams only differ by what the sub-blocks write."""
  x = jnp.asarray(np.random.default_rng(6).normal(size=(B, T, D)), jnp.float32)
  hc = HyperConnection(D, N, sinkhorn_iters=ITERS, hc_eps=HC_EPS, norm_eps=NORM_EPS,
                       rngs=nnx.Rngs(1))
  out, = hc(expand(x, N), lambda z: (jnp.zeros_like(z),))
  np.testing.assert_allclose(out, np.broadcast_to(x[:, :, None], out.shape), rtol=1e-5,
                             atol=1e-5)


def test_gradients_through_sinkhorn_match_finite_differences():
  """d/d logits of sum(C * W) through the 20 normalisations, against central differences in
  float64."""
  jax.config.update("jax_enable_x64", True)
  try:
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(size=(N, N)), jnp.float64)
    weights = jnp.asarray(rng.normal(size=(N, N)), jnp.float64)
    f = lambda x: jnp.sum(sinkhorn(x, ITERS, HC_EPS) * weights)  # noqa: E731
    grad = np.asarray(jax.grad(f)(logits))
    h, numeric = 1e-6, np.zeros((N, N))
    for i, j in np.ndindex(N, N):
      step = jnp.zeros((N, N), jnp.float64).at[i, j].set(h)
      numeric[i, j] = (f(logits + step) - f(logits - step)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)
    assert np.abs(grad).max() > 1e-3
  finally:
    jax.config.update("jax_enable_x64", False)
