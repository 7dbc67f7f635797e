"""ModelConfig: presets, HF round trips, validation errors that name the field and rule."""

import json

import pytest
import transformers

import deepjax as dj
from deepjax.config import ModelConfig
from hf_reference import HF_CLASSES, SMALL_V2, SMALL_V3, SMALL_V32


@pytest.mark.parametrize("name", ["tiny", "small", "v2-lite", "v3", "tiny-v3.2", "v3.2"])
def test_presets_round_trip_through_hf(name):
  cfg = dj.ModelConfig.preset(name)
  deepjax_fields = {f: getattr(cfg, f) for f in ModelConfig.deepjax_fields()}    # not in config.json
  again = dj.ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf())), **deepjax_fields)
  assert again == cfg and hash(again) == hash(cfg)


@pytest.mark.parametrize("base", [SMALL_V3, SMALL_V2, SMALL_V32], ids=["v3", "v2", "v3.2"])
def test_transformers_config_round_trip(base, tmp_path):
  """A config that transformers 5.x wrote (rope_parameters) reads back as the same config."""
  cfg = dj.ModelConfig(**dict(base, rope_scaling={
      "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}))
  hf_cls = getattr(transformers, HF_CLASSES[cfg.model_type][0])
  hf_cls(**cfg.to_hf()).save_pretrained(tmp_path)
  written = json.loads((tmp_path / "config.json").read_text())
  again = dj.ModelConfig.from_hf(written)
  assert again.rope_theta == cfg.rope_theta
  assert again.softmax_scale == pytest.approx(cfg.softmax_scale)
  for field in ("n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "q_lora_rank",
                "kv_lora_rank", "first_k_dense_replace", "routed_scaling_factor", "scoring_func",
                "model_type", "index_topk", "index_head_dim", "index_n_heads", "layer_types",
                "rope_interleave"):
    assert getattr(again, field) == getattr(cfg, field), field
  assert again.rope_scaling["factor"] == 4.0


def test_v3_hub_yarn_softmax_scale():
  # REFERENCES: V3 hub -> softmax scale 192^-0.5 * 1.3689^2 = 0.13523.
  assert dj.ModelConfig.preset("v3").softmax_scale == pytest.approx(0.13523, abs=1e-5)


@pytest.mark.parametrize("changes, field, rule", [
    (dict(n_routed_experts=10, n_group=4), "n_group", "divisible"),
    (dict(topk_group=5, n_group=4), "topk_group", "n_group=4"),
    (dict(num_experts_per_tok=5, n_group=4, topk_group=2), "num_experts_per_tok", "allow"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok", "exceeds n_routed_experts"),
    (dict(num_key_value_heads=2), "num_key_value_heads", "must equal num_attention_heads"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim", "even"),
    (dict(moe_impl="fast"), "moe_impl", "one of"),
    (dict(attention_impl="flash"), "attention_impl", "one of"),
    (dict(model_type="deepseek_v2", topk_method="noaux_tc"), "topk_method", "noaux_tc"),
    (dict(scoring_func="softmax"), "scoring_func", "sigmoid"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling", "yarn"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling",
     "original_max_position_embeddings"),
    (dict(hidden_size=0), "hidden_size", "positive"),
    (dict(hidden_act="gelu"), "hidden_act", "silu"),
    (dict(SMALL_V32, index_topk=0), "index_topk", "positive"),
    (dict(SMALL_V32, index_n_heads=-1), "index_n_heads", "positive"),
    (dict(SMALL_V32, index_head_dim=4), "index_head_dim", r">= qk_rope_head_dim \(8\)"),
    (dict(SMALL_V32, q_lora_rank=None), "q_lora_rank", "query latent"),
    (dict(SMALL_V32, rope_interleave=False), "rope_interleave", "interleaved"),
    (dict(SMALL_V32, dsa_attention="sparsest"), "dsa_attention", "one of"),
])
def test_validation_names_field_and_rule(changes, field, rule):
  with pytest.raises(ValueError, match=f"ModelConfig.{field}: .*{rule}"):
    dj.ModelConfig(**{**SMALL_V3, **changes})


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    dj.ModelConfig.preset("huge")


def test_v2_group_settings_ignored_when_greedy():
  cfg = dj.ModelConfig(**dict(SMALL_V2, n_group=3, topk_group=1))   # 8 % 3 != 0 but unused
  assert not cfg.uses_groups


def test_per_layer_kinds_follow_the_config():
  """V2 and V3 are configurations of one layer: MLA everywhere, dense MLPs for the first
  first_k_dense_replace layers, MoE after (MTP blocks included), a plain residual."""
  cfg = dj.ModelConfig.preset("v3")
  assert cfg.layer_types == ("mla",) * 62
  assert cfg.mlp_layer_types == ("dense",) * 3 + ("moe",) * 59
  assert cfg.residual_kind == "plain"
  v2 = dj.ModelConfig.preset("v2-lite")
  assert v2.mlp_layer_types == ("dense",) + ("moe",) * 26
  assert set(ModelConfig.impl_fields()) == {"attention_impl", "moe_impl", "router_impl"}
  assert not set(ModelConfig.deepjax_fields()) & set(cfg.to_hf())


def test_v32_hub_config_json():
  """DeepSeek-V3.2-Exp's hub config.json (legacy rope_scaling, V3's router fields) reads as the
  v3.2 preset: every layer `dsa`, the indexer sizes, V3's YaRN softmax scale."""
  hub = dict(ModelConfig.preset("v3").to_hf(), model_type="deepseek_v32",
             architectures=["DeepseekV32ForCausalLM"], index_topk=2048, index_head_dim=128,
             index_n_heads=64)
  del hub["rope_interleave"]
  cfg = ModelConfig.from_hf(hub, dtype="bfloat16", param_dtype="bfloat16")
  assert cfg == ModelConfig.preset("v3.2")
  assert set(cfg.layer_types) == {"dsa"} and len(cfg.layer_types) == 62   # + the MTP layer
  assert cfg.softmax_scale == pytest.approx(0.13523, abs=1e-5)
  assert cfg.to_hf()["architectures"] == ["DeepseekV32ForCausalLM"]
  assert "index_topk" not in ModelConfig.preset("v3").to_hf()
