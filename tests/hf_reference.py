"""transformers' DeepseekV2/V3/V32 (torch CPU, eager) as the reference for deepjax's logits."""

import numpy as np
import torch
import transformers

import deepjax as dj

SMALL_V3 = dict(
    model_type="deepseek_v3", vocab_size=97, hidden_size=48, intermediate_size=80,
    moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=24,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
    n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
    topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
    first_k_dense_replace=1, max_position_embeddings=256, rope_theta=10000.0)

SMALL_V2 = dict(SMALL_V3, model_type="deepseek_v2", topk_method="greedy", norm_topk_prob=False,
                routed_scaling_factor=1.0, n_group=1, topk_group=1)

# index_topk 6 < T so that the selection bites; 16 indexer heads keep exact score ties (all
# heads ReLU-clipped to 0) rare: torch's topk orders ties differently (DEEPSEEK-V32-V4.md §1.6).
SMALL_V32 = dict(SMALL_V3, model_type="deepseek_v32", index_topk=6, index_head_dim=16,
                 index_n_heads=16)

HF_CLASSES = {"deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
              "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
              "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM")}


def hf_model(cfg: dj.ModelConfig, seed: int = 0):
  """A transformers model of `cfg` with random weights, non-unit norms and non-zero biases."""
  hf_cfg = cfg.to_hf()
  config_cls, cls = (getattr(transformers, name) for name in HF_CLASSES[cfg.model_type])
  config = config_cls(**{k: v for k, v in hf_cfg.items() if k not in ("architectures",)},
                      attn_implementation="eager", experts_implementation="eager")
  torch.manual_seed(seed)
  model = cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.05 * torch.randn_like(p))
      else:
        p.copy_(0.08 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.1 * torch.randn_like(b))
  return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long))
  return out.logits.float().numpy()


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
