"""Generation: cached greedy == full recompute, absorbed decode numerics, MTP speculation,
cache size, sampling, EOS, input errors, and experiments/generate.py end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepjax as dj
from deepjax import accounting
from deepjax.inference import (LatentCache, forward, generate, generate_with_stats, mtp_forward,
                               sample)
from deepjax.model.mla import MLACache, MultiHeadLatentAttention
from deepjax.model.random_init import random_model, randomized
from deepjax.train.restore import load_trained_model
from train_helpers import FAST, ROOT, run_train_py

_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
         "beta_slow": 1}
CONFIGS = {
    # V3: sigmoid router, groups, non-zero correction biases, an MTP module; no query
    # compression; rotate-half RoPE; YaRN (mscale = mscale_all_dim: softmax scale changes).
    "v3": dict(model_type="deepseek_v3", vocab_size=97, hidden_size=48, intermediate_size=80,
               moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
               q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
               v_head_dim=12, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
               n_group=4, topk_group=2, topk_method="noaux_tc", norm_topk_prob=True,
               routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=64,
               num_nextn_predict_layers=1, rope_interleave=False,
               rope_scaling=dict(_YARN, mscale=1.0, mscale_all_dim=1.0)),
}
# V2: softmax router, group-limited greedy, never normalised, no MTP; query LoRA; interleaved
# RoPE; YaRN as V2-Lite's (0.707). One MoE layer: each config compiles its own programs.
CONFIGS["v2"] = dict(CONFIGS["v3"], model_type="deepseek_v2", q_lora_rank=24,
                     rope_interleave=True, topk_method="group_limited_greedy",
                     norm_topk_prob=False, routed_scaling_factor=1.0, num_hidden_layers=1,
                     first_k_dense_replace=0, num_nextn_predict_layers=0,
                     rope_scaling=dict(_YARN, mscale=0.707, mscale_all_dim=0.707))
# V3.2: V3 with DeepSeek Sparse Attention, index_topk 4 so that decoding steps select among
# the cached keys; 16 indexer heads (few exact score ties); the MTP block has its own indexer.
CONFIGS["v3.2"] = dict(CONFIGS["v3"], model_type="deepseek_v32", q_lora_rank=24,
                       rope_interleave=True, index_topk=4, index_head_dim=16, index_n_heads=16)
V3 = CONFIGS["v3"]
# Right-padded prompts of different lengths in one batch; every test uses these shapes so that
# the compiled programs are shared.
LENGTHS = np.array([5, 9, 2], np.int32)
NEW = 10


def prompts_for(cfg, seed=0):
  rng = np.random.default_rng(seed)
  prompts = rng.integers(0, cfg.vocab_size, (len(LENGTHS), LENGTHS.max())).astype(np.int32)
  prompts[np.arange(LENGTHS.max())[None, :] >= LENGTHS[:, None]] = -1   # padding is ignored
  return prompts


# The reference: the model's own forward pass (one compiled program per model structure).
_full_forward = nnx.jit(lambda model, tokens: (model(tokens).logits, model(tokens).mtp_logits))


def recompute_greedy(model, prompts, lengths, max_new_tokens):
  """Greedy tokens from full forward passes over each growing sequence (no cache). The
  sequences sit right-padded in one fixed-width buffer: causal attention makes the logits at
  a row's last token those of the row alone."""
  b = len(lengths)
  buf = np.zeros((b, lengths.max() + max_new_tokens), np.int32)
  buf[:, :prompts.shape[1]] = np.maximum(prompts, 0)
  cur, out = lengths.copy(), np.zeros((b, max_new_tokens), np.int32)
  for i in range(max_new_tokens):
    logits = np.asarray(_full_forward(model, jnp.asarray(buf))[0])
    out[:, i] = logits[np.arange(b), cur - 1].argmax(-1)
    buf[np.arange(b), cur] = out[:, i]
    cur += 1
  return out


@pytest.fixture(scope="module")
def v3():
  cfg = dj.ModelConfig(**V3)
  model = random_model(cfg)
  prompts = prompts_for(cfg)
  greedy = np.asarray(generate(model, prompts, prompt_lengths=LENGTHS, max_new_tokens=NEW))
  return model, prompts, greedy


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_greedy_equals_full_recompute(name, v3):
  if name == "v3":
    model, prompts, tokens = v3
  else:
    model = random_model(dj.ModelConfig(**CONFIGS[name]), seed=1)
    prompts = prompts_for(model.cfg, seed=1)
    tokens = np.asarray(generate(model, prompts, prompt_lengths=LENGTHS, max_new_tokens=NEW))
  assert tokens.shape == (len(LENGTHS), NEW) and tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens, recompute_greedy(model, prompts, LENGTHS, NEW))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_absorbed_form_equals_the_expanded_form(impl):
  """W^UK folded into the query, W^UV into the output, over the latent cache: the same
  attention output as the module's expanded per-head form, for 2 new tokens after 5 cached."""
  cfg = dj.ModelConfig(**dict(V3, attention_impl=impl))
  attn = randomized(lambda: MultiHeadLatentAttention(cfg, rngs=nnx.Rngs(0)), seed=4)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 7, cfg.hidden_size)),
                  jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(7), (2, 7))

  @nnx.jit
  def cached(attn, x):
    cache = MLACache.zeros(cfg, 2, 8, jnp.float32)
    _, cache, _ = attn(x[:, :5], positions[:, :5], cache=cache, prefill=True)
    return attn(x[:, 5:], positions[:, 5:], cache=cache)[0]        # the absorbed form

  expected = nnx.jit(lambda attn, x: attn(x, positions)[0])(attn, x)
  np.testing.assert_allclose(cached(attn, x), expected[:, 5:], rtol=1e-5, atol=1e-6)


def test_decode_logits_match_the_full_forward():
  """Prefill 15 tokens, decode 1 (a plain step: only the chosen experts run), then 2 at once
  (a speculative verify step: the model's own expert dispatch): main and MTP logits equal the
  model's own forward at the same positions."""
  cfg = dj.ModelConfig(**V3)
  model = random_model(cfg, seed=2)
  b, n = len(LENGTHS), LENGTHS.max() + NEW - 4       # the reference's shapes, compiled once
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, (b, n + 4)), jnp.int32)

  @jax.jit
  def cached(state, tokens):
    model = nnx.merge(graphdef, state)
    cache = LatentCache.create(cfg, b, n + 3, mtp_layers=1)
    logits, mtp_logits = [], []
    for start, end in ((0, n), (n, n + 1), (n + 1, n + 3)):
      pos = jnp.broadcast_to(jnp.arange(start, end), (b, end - start))
      h, cache = forward(model, tokens[:, start:end], pos, cache, prefill=start == 0)
      h_mtp, cache = mtp_forward(model, h, tokens[:, start + 1:end + 1], pos, cache,
                                 prefill=start == 0)
      logits.append(model.logits(h))
      mtp_logits.append(model.head(h_mtp))
    return jnp.concatenate(logits, 1), jnp.concatenate(mtp_logits, 1)

  graphdef, state = nnx.split(model)
  logits, mtp_logits = cached(state, tokens)
  full_logits, full_mtp_logits = _full_forward(model, tokens)
  np.testing.assert_allclose(logits, full_logits[:, :n + 3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mtp_logits, full_mtp_logits[0, :, :n + 3], rtol=1e-5, atol=1e-5)


def mtp_drafting_model(cfg, alpha=0.2):
  """A model whose MTP module is a good draft: the main layers add only alpha-scaled updates
  to the token embedding (so the next token depends mostly, not only, on the current one), and
  the MTP block passes Emb(t_{i+1}) straight to the head (eh_proj = [I; 0], block outputs 0):
  it predicts t_{i+2} as the main model would from t_{i+1} without context."""
  model = random_model(cfg, seed=3)
  h = cfg.hidden_size
  for layer in model.layers:
    layer.self_attn.o_proj.kernel[...] *= alpha
    if layer.is_moe:
      layer.mlp.experts.down_proj[...] *= alpha
      layer.mlp.shared_experts.down_proj.kernel[...] *= alpha
    else:
      layer.mlp.down_proj.kernel[...] *= alpha
  mtp = model.mtp[0]
  mtp.eh_proj.kernel[...] = jnp.concatenate([jnp.eye(h), jnp.zeros((h, h))])
  mtp.enorm.weight[...] = jnp.ones((h,))
  mtp.final_norm.weight[...] = model.norm.weight[...]
  mtp.block.self_attn.o_proj.kernel[...] *= 0.0
  mtp.block.mlp.experts.down_proj[...] *= 0.0
  mtp.block.mlp.shared_experts.down_proj.kernel[...] *= 0.0
  return model


def test_mtp_speculative_equals_greedy_and_reports_acceptance(v3):
  model, prompts, plain = v3
  tokens, stats = generate_with_stats(model, prompts, prompt_lengths=LENGTHS,
                                      max_new_tokens=NEW, speculative="mtp")
  np.testing.assert_array_equal(tokens, plain)                 # random MTP: drafts rejected
  assert 0.0 <= stats["acceptance_rate"] <= 1.0

  drafting = mtp_drafting_model(model.cfg)
  plain, plain_stats = generate_with_stats(drafting, prompts, prompt_lengths=LENGTHS,
                                           max_new_tokens=NEW)
  tokens, stats = generate_with_stats(drafting, prompts, prompt_lengths=LENGTHS,
                                      max_new_tokens=NEW, speculative="mtp")
  np.testing.assert_array_equal(tokens, plain)
  assert 0.0 < stats["acceptance_rate"] < 1.0, stats          # both branches taken
  assert stats["tokens_per_step"] > 1.0
  assert stats["steps"] < plain_stats["steps"] == NEW - 1
  np.testing.assert_array_equal(tokens, recompute_greedy(drafting, prompts, LENGTHS, NEW))


def test_latent_cache_size_matches_accounting(v3):
  model, prompts, _ = v3
  cfg = model.cfg
  _, stats = generate_with_stats(model, prompts, prompt_lengths=LENGTHS, max_new_tokens=NEW)
  positions = len(LENGTHS) * stats["cache_len"]
  assert stats["cache_len"] == LENGTHS.max() + NEW - 1
  per_token = accounting.kv_cache_elements_per_token(cfg)           # (d_c + d_h^R) l
  assert stats["cache_bytes"] == per_token * 4 * positions
  cache = LatentCache.create(cfg, 2, 16, dtype=jnp.bfloat16)
  assert cache.nbytes == per_token * 2 * 2 * 16
  mha = accounting.kv_cache_elements_per_token(cfg, "mha")           # 2 n_h d_h l
  expected = 2 * cfg.num_attention_heads * cfg.v_head_dim / (cfg.kv_lora_rank +
                                                              cfg.qk_rope_head_dim)
  assert mha * 2 * 2 * 16 / cache.nbytes == pytest.approx(expected) == 4.0
  with_mtp = LatentCache.create(cfg, 2, 16, mtp_layers=1)
  assert with_mtp.num_layers == cfg.num_hidden_layers + 1


def test_sampling_seeded_and_restricted_by_top_k_top_p(v3):
  model, prompts, greedy = v3
  kw = dict(prompt_lengths=LENGTHS, max_new_tokens=NEW, temperature=1.0)
  a = np.asarray(generate(model, prompts, seed=1, **kw))
  np.testing.assert_array_equal(a, generate(model, prompts, seed=1, **kw))
  assert not np.array_equal(a, generate(model, prompts, seed=2, **kw))
  assert not np.array_equal(a, greedy)
  np.testing.assert_array_equal(generate(model, prompts, seed=1, top_k=1, **kw), greedy)
  np.testing.assert_array_equal(generate(model, prompts, seed=1, top_p=1e-6, **kw), greedy)


def test_sample_support():
  logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.1, 0.3, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 2000)
  draw = jax.jit(jax.vmap(lambda k, top_k, top_p: sample(logits, k, temperature=1.0,
                                                         top_k=top_k, top_p=top_p)[0],
                          in_axes=(0, None, None)))
  assert set(np.unique(draw(keys, 0, 1.0))) == {0, 1, 2, 3, 4}
  assert set(np.unique(draw(keys, 2, 1.0))) == {1, 3}
  assert set(np.unique(draw(keys, 0, 0.6))) == {1, 3}         # 0.5 < 0.6 <= 0.5 + 0.3
  assert set(np.unique(draw(keys, 0, 0.85))) == {1, 2, 3}
  assert set(np.unique(draw(keys, 0, 0.4))) == {1}
  counts = np.bincount(draw(keys, 0, 1.0), minlength=5) / 2000
  np.testing.assert_allclose(counts, [0.05, 0.5, 0.1, 0.3, 0.05], atol=0.04)


def test_eos_stops_rows_and_the_loop(v3):
  model, prompts, plain = v3
  eos = int(plain[0, 3])
  expected = plain.copy()
  for row in expected:
    hits = np.flatnonzero(row == eos)
    if hits.size:
      row[hits[0]:] = eos
  for speculative in (None, "mtp"):
    tokens = generate(model, prompts, prompt_lengths=LENGTHS, max_new_tokens=NEW, eos_id=eos,
                      speculative=speculative)
    np.testing.assert_array_equal(tokens, expected)
  # Rows all alike: every row ends at the same step, and the loop exits there.
  first_hit = int(np.flatnonzero(plain[0] == eos)[0])
  same = np.repeat(prompts[:1], 3, axis=0)
  lengths = np.repeat(LENGTHS[:1], 3)
  tokens, stats = generate_with_stats(model, same, prompt_lengths=lengths, max_new_tokens=NEW,
                                      eos_id=eos)
  np.testing.assert_array_equal(tokens, np.repeat(expected[:1], 3, axis=0))
  assert stats["steps"] == first_hit < NEW - 1


@pytest.mark.parametrize("change, message", [
    (dict(prompts=np.zeros((0, 4), np.int32), prompt_lengths=None), "prompts are empty"),
    (dict(prompts=np.zeros((2, 0), np.int32), prompt_lengths=None), "prompts are empty"),
    (dict(prompt_lengths=[3, 4]), "3 integers"),
    (dict(prompt_lengths=[3, 0, 2]), "must be >= 1"),
    (dict(prompt_lengths=[3, 10, 2]), "exceed the prompts' width 9"),
    (dict(max_new_tokens=60), "exceeds max_position_embeddings"),
    (dict(prompts=np.full((3, 9), 97, np.int32)), r"outside the vocabulary \[0, 97\)"),
    (dict(prompts=np.full((3, 9), -2, np.int32), prompt_lengths=None), "outside the vocab"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(top_p=0.0), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(eos_id=97), "eos_id"),
    (dict(speculative="eagle"), "speculative must be one of"),
    (dict(speculative="mtp", temperature=0.7), "greedily"),
])
def test_bad_arguments_raise_clear_errors(change, message):
  model = random_model(dj.ModelConfig(**V3))
  kw = dict(prompts=prompts_for(model.cfg), prompt_lengths=LENGTHS, max_new_tokens=4)
  kw.update(change)
  with pytest.raises(ValueError, match=message):
    generate(model, kw.pop("prompts"), **kw)


def test_speculative_needs_an_mtp_module():
  model = random_model(dj.ModelConfig(**CONFIGS["v2"]))
  with pytest.raises(ValueError, match="needs a model with an MTP module"):
    generate(model, [[1, 2, 3]], speculative="mtp")


# --- experiments/generate.py ----------------------------------------------------------------

GENERATE_PY = os.path.join(ROOT, "experiments", "generate.py")


def run_generate_py(*flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, GENERATE_PY, *flags], env=env, capture_output=True,
                        text=True, timeout=600)


def test_load_trained_model_names_what_the_workdir_lacks(tmp_path):
  with pytest.raises(ValueError, match="no config.json: not a training workdir"):
    load_trained_model(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model": FAST}))
  with pytest.raises(ValueError, match="has no checkpoints"):
    load_trained_model(str(tmp_path))
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(ValueError, match="has no complete checkpoint"):
    load_trained_model(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json"]   # nothing created
  assert os.listdir(tmp_path / "checkpoints") == []


def test_generate_py_on_a_trained_workdir(tmp_path):
  one_layer = ["--config.model.num_hidden_layers=1", "--config.model.first_k_dense_replace=0"]
  trained = run_train_py(tmp_path, "--config.steps=2", "--config.checkpoint_every=2",
                         "--config.eval_every=0", *one_layer)
  assert trained.returncode == 0, trained.stdout[-2000:]
  result = run_generate_py(f"--workdir={tmp_path}", "--prompt=Once upon", "--prompt=a",
                           "--max_new_tokens=6", "--temperature=0.8", "--top_k=20", "--seed=3")
  assert result.returncode == 0, result.stderr
  assert f"loaded {tmp_path} at step 2" in result.stdout
  assert ">>> Once upon\nOnce upon" in result.stdout and ">>> a\na" in result.stdout
  assert "tokens/s" in result.stdout


def test_generate_py_on_an_hf_dir_with_mtp_drafts(tmp_path):
  cfg = dj.ModelConfig.preset("tiny", **FAST)                  # byte vocabulary (272)
  dj.save_hf(random_model(cfg), str(tmp_path))
  result = run_generate_py(f"--hf_dir={tmp_path}", "--prompt=Hi", "--max_new_tokens=6",
                           "--speculative=mtp")
  assert result.returncode == 0, result.stderr
  assert ">>> Hi\nHi" in result.stdout and "MTP drafts: acceptance rate" in result.stdout
