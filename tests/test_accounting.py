"""Accounting against the published figures and against real (tiny) model arrays."""

import jax
import numpy as np
import pytest
from flax import nnx

import deepjax as dj
from deepjax import accounting
from hf_reference import SMALL_V2, SMALL_V3, SMALL_V32


def test_v3_published_sizes():
  counts = accounting.param_counts(dj.ModelConfig.preset("v3"))
  assert abs(counts.total / 671e9 - 1) < 0.005                 # 671B total
  assert abs(counts.activated / 37e9 - 1) < 0.02               # 37B activated
  # The hub's MTP layer (~14B) also stores copies of the embedding and head.
  assert abs((counts.mtp + 2 * counts.embedding) / 14e9 - 1) < 0.05


def test_v2_lite_published_sizes():
  counts = accounting.param_counts(dj.ModelConfig.preset("v2-lite"))
  assert abs(counts.total / 15.7e9 - 1) < 0.005                # 15.7B total
  assert abs(counts.activated / 2.4e9 - 1) < 0.03              # 2.4B activated


def test_v3_mla_cache_per_token():
  cfg = dj.ModelConfig.preset("v3")
  assert accounting.kv_cache_elements_per_token(cfg) == 576 * 61 == 35136
  assert accounting.kv_cache_bytes_per_token(cfg) == 70272
  mha = accounting.kv_cache_elements_per_token(cfg, "mha")
  assert mha == 2 * 128 * 128 * 61
  assert accounting.kv_cache_elements_per_token(cfg, "mqa") == 2 * 128 * 61
  assert accounting.kv_cache_elements_per_token(cfg, "gqa", n_groups=8) == 2 * 8 * 128 * 61
  # V2 Table 1: MLA ~ 4.5 d_h l (d_c = 4 d_h, d_h^R = d_h / 2).
  assert accounting.kv_cache_elements_per_token(cfg) == 4.5 * 128 * 61


def test_v32_indexer_and_cache_per_token():
  """DEEPSEEK-V32-V4.md §1.3-1.4: 13.96M indexer parameters per layer, 704 cached elements per
  token and layer (42,944 over 61 layers against V3's 35,136)."""
  v3, v32 = dj.ModelConfig.preset("v3"), dj.ModelConfig.preset("v3.2")
  assert accounting.indexer_params(v32) == 12_582_912 + 917_504 + 458_752 + 256
  per_layer = accounting.indexer_params(v32)
  assert accounting.param_counts(v32).total == accounting.param_counts(v3).total + 61 * per_layer
  assert accounting.kv_cache_elements_per_token(v32) == 704 * 61 == 42944
  assert accounting.kv_cache_elements_per_token(v32, "mla") == 35136


def test_v32_sparse_attention_flops_follow_index_topk():
  """Sparse: each query costs min(index_topk, visible) absorbed-form keys plus the indexer's
  dots over every visible key, so at 128k tokens attention costs under a third of dense MLA's
  (the indexer's O(T) dots are then two thirds of what remains)."""
  v32 = dj.ModelConfig.preset("v3.2")
  dense = v32.replace(dsa_attention="dense")
  short, long = 2048, 131072
  # Up to index_topk tokens nothing is left out: the absorbed form over every visible key.
  sparse_short = accounting.attention_flops_per_token(v32, short)
  width = 2 * 512 + 64
  assert sparse_short == pytest.approx(2 * 128 * width * (short + 1) / 2
                                       + 2 * 64 * 128 * (short + 1) / 2)
  ratio = (accounting.attention_flops_per_token(v32, long)
           / accounting.attention_flops_per_token(dense, long))
  assert 0.25 < ratio < 0.33, ratio
  assert accounting.attention_flops_per_token(dense, long) == pytest.approx(
      accounting.attention_flops_per_token(dj.ModelConfig.preset("v3"), long))
  # Decoding at 128k: dense MLA runs absorbed over all 131,072 keys, DSA over 2048 plus the
  # indexer's dots: 1/13.4 of the work. The expanded form would need 3.4x fewer FLOPs than the
  # absorbed one (d_h + d_h^R + d_h = 320 against 2 d_c + d_h^R = 1088 per head and key).
  dense_step = accounting.attention_flops_per_token(dense, long, causal=False, absorbed=True)
  assert dense_step == 2 * 128 * width * long
  sparse_step = accounting.attention_flops_per_token(v32, long, causal=False, absorbed=True)
  assert sparse_step == 2 * 128 * width * 2048 + 2 * 64 * 128 * long
  assert 13 < dense_step / sparse_step < 14
  assert dense_step / accounting.attention_flops_per_token(dense, long, causal=False) == \
      pytest.approx(width / 320)


def test_small_preset_is_about_100m():
  assert 90e6 < accounting.param_counts(dj.ModelConfig.preset("small")).total < 110e6


@pytest.mark.parametrize("overrides", [
    dict(SMALL_V3, num_nextn_predict_layers=2),
    dict(SMALL_V3, q_lora_rank=None, attention_bias=True, tie_word_embeddings=True),
    dict(SMALL_V2, mlp_bias=True, first_k_dense_replace=2, moe_layer_freq=1),
    dict(SMALL_V32, num_nextn_predict_layers=1),
], ids=["v3_mtp2", "v3_bias_tied", "v2_mlp_bias", "v32_mtp"])
def test_counts_match_model_arrays(overrides):
  cfg = dj.ModelConfig(**overrides)
  model = dj.DeepSeek(cfg, rngs=nnx.Rngs(0))
  sizes = {path: v.size for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  counts = accounting.param_counts(cfg)
  mtp = sum(n for path, n in sizes.items() if path[0] == "mtp")
  assert counts.total == sum(sizes.values()) - mtp
  assert counts.mtp == mtp
  expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
  inactive = cfg.num_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
  assert counts.activated == counts.total - counts.embedding - inactive


def test_flops_per_token_is_6n_plus_attention():
  cfg = dj.ModelConfig.preset("tiny", num_nextn_predict_layers=0)
  counts = accounting.param_counts(cfg)
  t = 128
  attention = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * \
      (cfg.qk_head_dim + cfg.v_head_dim) * (t + 1) / 2
  assert accounting.flops_per_token(cfg, t) == pytest.approx(6 * counts.activated + 3 * attention)
  assert accounting.flops_per_token(cfg, t, training=False) == pytest.approx(
      2 * counts.activated + attention)
