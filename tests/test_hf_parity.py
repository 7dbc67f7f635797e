"""Logits parity with transformers' DeepseekV3 / DeepseekV2 (torch CPU, eager), float32."""

import jax.numpy as jnp
import numpy as np
import pytest

import deepjax as dj
from hf_reference import SMALL_V2, SMALL_V3, hf_logits, hf_model, relative_error

YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
YARN_V2 = dict(YARN, mscale=0.707, mscale_all_dim=0.707)

CONFIGS = {
    "v3_groups_yarn": dict(SMALL_V3, rope_scaling=YARN),
    "v3_no_qlora_bias_tied": dict(SMALL_V3, q_lora_rank=None, attention_bias=True,
                                  tie_word_embeddings=True, n_group=1, topk_group=1),
    "v3_no_interleave_unnormed": dict(SMALL_V3, rope_interleave=False, norm_topk_prob=False,
                                      routed_scaling_factor=1.0, num_experts_per_tok=3,
                                      first_k_dense_replace=0, n_shared_experts=2),
    "v3_many_groups": dict(SMALL_V3, n_routed_experts=16, n_group=8, topk_group=3,
                           num_experts_per_tok=4),
    "v2_greedy_yarn": dict(SMALL_V2, q_lora_rank=None, rope_scaling=YARN_V2),
    "v2_group_limited": dict(SMALL_V2, topk_method="group_limited_greedy", n_group=4,
                             topk_group=2, attention_bias=True, routed_scaling_factor=1.5),
}


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(0).integers(0, 97, size=(2, 21)).astype(np.int32)


# (attention_impl, moe_impl, router_impl)
IMPLS = [("xla", "ragged_dot", "xla"), ("xla", "dense", "xla"), ("xla", "blocked", "xla"),
         ("pallas", "pallas", "pallas")]
SLOW_IMPLS = [("pallas", "dense", "xla"), ("pallas", "ragged_dot", "xla"),
              ("xla", "pallas", "xla"), ("xla", "blocked", "pallas")]


def _check(name, impls, tokens, tmp_path):
  cfg = dj.ModelConfig(**CONFIGS[name])
  reference = hf_model(cfg, seed=1)
  reference.save_pretrained(tmp_path)
  attention_impl, moe_impl, router_impl = impls
  model = dj.load_hf(str(tmp_path), dtype=jnp.float32, attention_impl=attention_impl,
                     moe_impl=moe_impl, router_impl=router_impl)
  ours = np.asarray(model(jnp.asarray(tokens)).logits)
  assert relative_error(ours, hf_logits(reference, tokens)) < 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("impls", IMPLS, ids="-".join)
def test_logits_match_transformers(name, impls, tokens, tmp_path):
  _check(name, impls, tokens, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("impls", SLOW_IMPLS, ids="-".join)
def test_logits_match_transformers_other_impls(name, impls, tokens, tmp_path):
  _check(name, impls, tokens, tmp_path)
