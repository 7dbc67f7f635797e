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


@pytest.mark.parametrize("impl", ["xla", "pallas"])
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
