"""DeepSeek-V3.2's sparse attention in the model: logits parity with transformers'
DeepseekV32ForCausalLM (float32, the selection biting), the dense warm-up mode equal to V3's
MLA, packed sequences equal to separate ones, and the indexer module's pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepjax as dj
from deepjax.model.random_init import random_model
from hf_reference import SMALL_V32, hf_logits, hf_model, relative_error

YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
T = 21   # > index_topk (6): every query from the 7th on attends to a strict subset


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(0).integers(0, 97, size=(2, T)).astype(np.int32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """transformers' model of SMALL_V32 with YaRN, saved once for the tests below."""
  cfg = dj.ModelConfig(**dict(SMALL_V32, rope_scaling=YARN))
  model = hf_model(cfg, seed=3)
  path = tmp_path_factory.mktemp("v32")
  model.save_pretrained(path)
  return model, str(path)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_logits_match_transformers(impl, tokens, reference):
  model, path = reference
  ours = dj.load_hf(path, attention_impl=impl)
  assert set(ours.cfg.layer_types) == {"dsa"}
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(ours(jnp.asarray(tokens)).logits)
  assert relative_error(logits, hf_logits(model, tokens)) < 1e-5


def test_dense_mode_attends_to_every_key(tokens, reference):
  """The parity above is not dense attention's: the dense warm-up mode (selection ignored)
  gives other logits once T > index_topk, and exactly those of transformers' model whose
  index_topk covers every key (same weights, same seed)."""
  model, path = reference
  dense = dj.load_hf(path, dsa_attention="dense")
  with jax.default_matmul_precision("highest"):
    dense_logits = np.asarray(dense(jnp.asarray(tokens)).logits)
  assert relative_error(dense_logits, hf_logits(model, tokens)) > 1e-2
  everything = hf_model(dj.ModelConfig(**dict(SMALL_V32, rope_scaling=YARN, index_topk=T)),
                        seed=3)
  assert relative_error(dense_logits, hf_logits(everything, tokens)) < 1e-5


@pytest.mark.slow   # about a minute per path: three eager forwards
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_packed_sequences_equal_separate_ones(impl):
  """Two sequences packed in one row (segment ids, positions restarting) give each sequence's
  own logits: the indexer selects only within a segment."""
  cfg = dj.ModelConfig(**dict(SMALL_V32, attention_impl=impl))
  model = random_model(cfg, seed=4)
  rng = np.random.default_rng(4)
  a, b = rng.integers(0, 97, 13), rng.integers(0, 97, 9)
  packed = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
  segments = jnp.asarray([[1] * 13 + [2] * 9], jnp.int32)
  positions = jnp.asarray([list(range(13)) + list(range(9))], jnp.int32)
  with jax.default_matmul_precision("highest"):
    out = np.asarray(model(packed, positions=positions, segment_ids=segments).logits)[0]
    alone = [np.asarray(model(jnp.asarray(x[None], jnp.int32)).logits)[0] for x in (a, b)]
  np.testing.assert_allclose(out[:13], alone[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[13:], alone[1], rtol=1e-5, atol=1e-5)


def test_indexer_rope_is_half_split_on_the_first_dims():
  """k^I rotates its first qk_rope_head_dim dims as rotate_half pairs (x_j, x_{j+R/2}) and
  leaves the rest: V3.2 hub code (not the GitHub snapshot's interleaved pairs)."""
  cfg = dj.ModelConfig(**SMALL_V32)
  attention = dj.DeepSeek(cfg, rngs=nnx.Rngs(0)).layers[0].self_attn
  x = jax.random.normal(jax.random.key(0), (1, 5, cfg.hidden_size))
  positions = jnp.arange(5)[None]
  rotated = attention.indexer.keys(x, positions)
  plain = attention.indexer.k_norm(attention.indexer.wk(x))
  r = cfg.qk_rope_head_dim
  np.testing.assert_array_equal(rotated[..., r:], plain[..., r:])
  np.testing.assert_allclose(rotated[:, 0], plain[:, 0], atol=1e-6)    # position 0: no turn
  half = r // 2
  pair = lambda v: np.hypot(np.asarray(v)[..., :half], np.asarray(v)[..., half:r])
  np.testing.assert_allclose(pair(rotated), pair(plain), rtol=1e-5)    # rotate_half pairs


@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow), "pallas"])
def test_greedy_generate_matches_transformers(impl, reference):
  """Decoding from the cache (the indexer scoring the new query against every cached indexer
  key, sparse attention over the selected latent entries) gives transformers' greedy tokens."""
  import torch
  model, path = reference
  prompts = np.random.default_rng(5).integers(0, 97, size=(2, 9)).astype(np.int32)
  with torch.no_grad():
    expected = model.generate(torch.as_tensor(prompts, dtype=torch.long), max_new_tokens=12,
                              do_sample=False, min_new_tokens=12).numpy()[:, 9:]
  with jax.default_matmul_precision("highest"):
    ours = dj.generate(dj.load_hf(path, attention_impl=impl), prompts, max_new_tokens=12)
  np.testing.assert_array_equal(np.asarray(ours), expected)


# -- The indexer's training loss (V3.2 eqs. 3-4). -----------------------------------------------


def test_indexer_kl_matches_a_hand_written_loop():
  """The indexer's KL loss against a per-query numpy loop, and its gradient in the indexer
  scores against the closed form (softmax(I) - p) / rows."""
  from deepjax.model.indexer import indexer_stats
  rng = np.random.default_rng(6)
  b, t, h, n = 2, 5, 3, 7
  main = rng.normal(size=(b, t, h, n)).astype(np.float32)
  scores = rng.normal(size=(b, t, n)).astype(np.float32)
  valid = rng.random((b, t, n)) < 0.6
  valid[0, 0] = False                                   # a query with no key: left out
  valid[1, 2, :] = False
  valid[1, 2, 3] = True                                 # a single key: KL 0
  token_mask = np.ones((b, t), bool)
  token_mask[1, 4] = False                              # padding: left out

  expected, rows, grad = 0.0, 0, np.zeros_like(scores)
  for i, j in np.ndindex(b, t):
    keys = np.flatnonzero(valid[i, j])
    if not len(keys) or not token_mask[i, j]:
      continue
    logits = main[i, j][:, keys].astype(np.float64)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    p = (attn / attn.sum(-1, keepdims=True)).sum(0)
    p /= p.sum()                                        # L1-normalised over the key set
    s = scores[i, j, keys].astype(np.float64)
    q = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    expected += np.sum(p * (np.log(p) - np.log(q)))
    grad[i, j, keys] = q - p
    rows += 1
  args = (jnp.asarray(main), jnp.asarray(scores), jnp.asarray(valid), jnp.asarray(token_mask))
  value, got_grad = jax.value_and_grad(lambda *a: indexer_stats(*a).kl, argnums=1)(*args)
  np.testing.assert_allclose(float(value), expected / rows, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got_grad), grad / rows, rtol=1e-4, atol=1e-7)


def _split_grads(model, loss):
  """(max |grad| over indexer parameters, over all others) of loss(model)."""
  params = nnx.state(model, nnx.Param)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest)))(params)
  flat = nnx.to_flat_state(grads)
  biggest = lambda keep: max(float(jnp.max(jnp.abs(v[...]))) for path, v in flat
                             if ("indexer" in path) == keep)
  return biggest(True), biggest(False)


@pytest.mark.parametrize("mode", [pytest.param("sparse", marks=pytest.mark.slow), "dense"])
def test_indexer_learns_only_from_its_loss_and_the_model_only_from_lm(mode):
  """The indexer's input is detached (V3.2 §2.1): L_I moves only indexer parameters, and the
  LM loss none of them."""
  from deepjax.train.loss import cross_entropy, next_token_targets
  cfg = dj.ModelConfig(**dict(SMALL_V32, dsa_attention=mode))
  model = random_model(cfg, seed=7)
  tokens = jnp.asarray(np.random.default_rng(7).integers(0, 97, (2, 16)), jnp.int32)
  segments = jnp.ones_like(tokens)

  def lm(m):
    targets, mask = next_token_targets(tokens, segments)
    return cross_entropy(m(tokens).logits, targets, mask)[0]

  indexer, others = _split_grads(model, lambda m: m(tokens).indexer_kl)
  assert indexer > 0 and others == 0
  indexer, others = _split_grads(model, lm)
  assert indexer == 0 and others > 0


def test_sparse_loss_over_every_key_equals_the_dense_loss():
  """With index_topk >= T every visible key is selected: eq. 4 over S_t is eq. 3."""
  tokens = jnp.asarray(np.random.default_rng(8).integers(0, 97, (2, 12)), jnp.int32)
  sparse = random_model(dj.ModelConfig(**dict(SMALL_V32, index_topk=12)), seed=8)
  dense = random_model(dj.ModelConfig(**dict(SMALL_V32, index_topk=12, dsa_attention="dense")),
                       seed=8)
  with jax.default_matmul_precision("highest"):
    kl_sparse, kl_dense = sparse(tokens).indexer_kl, dense(tokens).indexer_kl
  assert float(kl_dense) > 1e-4
  np.testing.assert_allclose(float(kl_sparse), float(kl_dense), rtol=1e-5)


def test_warm_up_optimizer_moves_only_the_indexer():
  """trainable="indexer": every other parameter is left as it is, with no Adam state."""
  from deepjax.train.optimizer import OptimizerConfig, make_optimizer
  model = random_model(dj.ModelConfig(**SMALL_V32), seed=9)
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(jnp.ones_like, params)
  tx = make_optimizer(OptimizerConfig(trainable="indexer", warmup_steps=0, total_steps=10))
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  for path, update in nnx.to_flat_state(updates):
    moved = float(jnp.max(jnp.abs(update[...]))) > 0
    assert moved == ("indexer" in path), path
  with pytest.raises(ValueError, match="trainable must be one of"):
    OptimizerConfig(trainable="router")


# -- The two stages end to end (experiments/train.py). -------------------------------------------

V32_FLAGS = ["--config.model.model_type=deepseek_v32", "--config.model.index_topk=8",
             "--config.model.index_head_dim=16", "--config.model.index_n_heads=16"]


@pytest.mark.slow
def test_warm_up_from_a_v3_run_then_the_sparse_stage(tmp_path):
  """V3.2's recipe on train.py: a V3 run; the dense warm-up initialised from it
  (--config.init_workdir) trains the new indexers alone, every other tensor and the router
  biases left as the V3 run's; the sparse stage starts from the warm-up's run."""
  from deepjax.train.restore import load_trained_model
  from train_helpers import run_train_py
  v3, warm, sparse = (str(tmp_path / name) for name in ("v3", "warm", "sparse"))
  done = run_train_py(v3, "--config.steps=3", "--config.checkpoint_every=3")
  assert done.returncode == 0, done.stdout + done.stderr
  done = run_train_py(warm, *V32_FLAGS, "--config.model.dsa_attention=dense",
                      "--config.trainable=indexer", f"--config.init_workdir={v3}",
                      "--config.steps=3", "--config.checkpoint_every=3")
  assert done.returncode == 0, done.stdout + done.stderr
  assert f"initialised from {v3} (step 3)" in done.stdout
  assert "left at initialisation" in done.stdout and "indexer" in done.stdout
  assert "indexer_kl" in done.stdout
  before, _ = load_trained_model(v3)
  after, _ = load_trained_model(warm)
  old = dict(nnx.to_flat_state(nnx.state(before)))
  moved = []
  for path, value in nnx.to_flat_state(nnx.state(after)):
    if "indexer" in path:
      continue
    if not np.array_equal(np.asarray(value[...]), np.asarray(old[path][...])):
      moved.append(path)
  assert not moved, moved
  done = run_train_py(sparse, *V32_FLAGS, f"--config.init_workdir={warm}", "--config.steps=2")
  assert done.returncode == 0, done.stdout + done.stderr
  assert f"initialised from {warm} (step 3)" in done.stdout
  assert "left at initialisation" not in done.stdout


def test_recall_is_the_attention_mass_on_the_indexers_top_k():
  """indexer_stats' recall against a loop; 1 when index_topk covers every key."""
  from deepjax.model.indexer import indexer_stats
  rng = np.random.default_rng(10)
  main = rng.normal(size=(1, 4, 2, 6)).astype(np.float32)
  scores = rng.normal(size=(1, 4, 6)).astype(np.float32)
  valid = np.tril(np.ones((4, 6), bool), k=2)[None]                 # query t sees t + 3 keys
  stats = indexer_stats(jnp.asarray(main), jnp.asarray(scores), jnp.asarray(valid), top_k=2)
  expected = []
  for t in range(4):
    keys = np.flatnonzero(valid[0, t])
    attn = np.exp(main[0, t][:, keys]) / np.exp(main[0, t][:, keys]).sum(-1, keepdims=True)
    p = attn.mean(0)
    best = np.argsort(-scores[0, t, keys], kind="stable")[:2]
    expected.append(p[best].sum())
  np.testing.assert_allclose(float(stats.recall), np.mean(expected), rtol=1e-5)
  every = indexer_stats(jnp.asarray(main), jnp.asarray(scores), jnp.asarray(valid), top_k=6)
  np.testing.assert_allclose(float(every.recall), 1.0, rtol=1e-6)


def test_dense_mode_statistics_are_the_same_in_query_chunks(monkeypatch):
  """Eq. 3's KL and recall, and the KL's gradient in the indexer, computed 8 queries at a time
  (3 chunks, the last padded) equal the one-chunk values, packed sequences included."""
  import pallas_kernels as pk
  cfg = dj.ModelConfig(**dict(SMALL_V32, dsa_attention="dense"))
  model = dj.DeepSeek(cfg, rngs=nnx.Rngs(4))
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 97, (2, T)), jnp.int32)
  segments = jnp.asarray([[1] * 12 + [2] * 9, [1] * 18 + [0] * 3], jnp.int32)
  positions = jnp.asarray([list(range(12)) + list(range(9)), list(range(18)) + [0] * 3])

  def stats(model):
    params = nnx.state(model, nnx.Param)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    def kl(p):
      out = nnx.merge(graphdef, p, rest)(tokens, positions=positions, segment_ids=segments)
      return out.indexer_kl, out.indexer_recall
    (value, recall), grads = jax.value_and_grad(kl, has_aux=True)(params)
    return value, recall, [v[...] for path, v in nnx.to_flat_state(grads) if "indexer" in path]

  whole = stats(model)
  monkeypatch.setattr(pk.xla_sparse, "query_chunk", lambda *args, **kwargs: 8)
  chunked = stats(model)
  assert 0 < float(whole[1]) < 1
  np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-5)
  np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-5)
  assert max(float(jnp.max(jnp.abs(g))) for g in whole[2]) > 0
  for got, want in zip(chunked[2], whole[2]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
