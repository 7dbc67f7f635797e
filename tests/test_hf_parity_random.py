"""Parity with transformers on randomly drawn configs: beyond the hand-picked ones."""

import jax.numpy as jnp
import numpy as np
import pytest

import deepjax as dj
from hf_reference import hf_logits, hf_model, relative_error


def random_config(seed: int) -> dj.ModelConfig:
  r = np.random.default_rng(seed)
  v3 = bool(r.integers(2))
  heads = int(r.choice([1, 2, 4]))
  n_group = int(r.choice([1, 2, 4]))
  experts = n_group * int(r.choice([2, 3, 4]))
  limited = v3 or bool(r.integers(2))
  topk_group = int(r.integers(1, n_group + 1)) if limited else 1
  allowed = topk_group * experts // n_group if limited else experts
  yarn = None
  if r.integers(2):
    m = float(r.choice([0.707, 1.0]))
    yarn = {"type": "yarn", "factor": float(r.choice([2.0, 4.0, 16.0])),
            "original_max_position_embeddings": int(r.choice([8, 16, 64])),
            "beta_fast": 32, "beta_slow": 1, "mscale": m, "mscale_all_dim": m}
  return dj.ModelConfig(
      model_type="deepseek_v3" if v3 else "deepseek_v2",
      vocab_size=int(r.integers(50, 130)), hidden_size=int(r.choice([32, 40, 64])),
      intermediate_size=int(r.choice([48, 96])), moe_intermediate_size=int(r.choice([8, 16, 24])),
      num_hidden_layers=int(r.integers(1, 4)), num_attention_heads=heads,
      q_lora_rank=None if r.integers(2) else int(r.choice([16, 24])),
      kv_lora_rank=int(r.choice([8, 16, 32])), qk_nope_head_dim=int(r.choice([0, 8, 16])),
      qk_rope_head_dim=int(r.choice([4, 8, 16])), v_head_dim=int(r.choice([8, 12, 16])),
      n_shared_experts=int(r.integers(1, 3)), n_routed_experts=experts,
      num_experts_per_tok=int(r.integers(1, min(allowed, 4) + 1)),
      n_group=n_group, topk_group=topk_group,
      topk_method="noaux_tc" if v3 else ("group_limited_greedy" if limited else "greedy"),
      norm_topk_prob=bool(r.integers(2)), routed_scaling_factor=float(r.choice([1.0, 2.5])),
      first_k_dense_replace=int(r.integers(0, 2)), rope_theta=float(r.choice([1e4, 5e5])),
      rope_scaling=yarn, rope_interleave=bool(r.integers(2)) if v3 else True,
      attention_bias=bool(r.integers(2)), tie_word_embeddings=bool(r.integers(2)),
      rms_norm_eps=float(r.choice([1e-6, 1e-5])), max_position_embeddings=512)


def _check(seed, tmp_path):
  cfg = random_config(seed)
  reference = hf_model(cfg, seed=seed)
  reference.save_pretrained(tmp_path)
  tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 19)).astype(np.int32)
  ours = dj.load_hf(str(tmp_path))(jnp.asarray(tokens)).logits
  assert relative_error(ours, hf_logits(reference, tokens)) < 1e-5, cfg


@pytest.mark.parametrize("seed", range(4))
def test_random_config_parity(seed, tmp_path):
  _check(seed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4, 24))
def test_random_config_parity_many(seed, tmp_path):
  _check(seed, tmp_path)
