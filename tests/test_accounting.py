"""Accounting against the published figures and against real (tiny) model arrays."""

import jax
import numpy as np
import pytest
from flax import nnx

import deepjax as dj
from deepjax import accounting
from hf_reference import SMALL_V2, SMALL_V3


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


def test_small_preset_is_about_100m():
  assert 90e6 < accounting.param_counts(dj.ModelConfig.preset("small")).total < 110e6


@pytest.mark.parametrize("overrides", [
    dict(SMALL_V3, num_nextn_predict_layers=2),
    dict(SMALL_V3, q_lora_rank=None, attention_bias=True, tie_word_embeddings=True),
    dict(SMALL_V2, mlp_bias=True, first_k_dense_replace=2, moe_layer_freq=1),
], ids=["v3_mtp2", "v3_bias_tied", "v2_mlp_bias"])
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
