"""Parameter counts, training FLOPs per token and KV-cache sizes, from the config alone.

Nothing is allocated, so the numbers hold for V3-sized configs on a laptop. Conventions:
- `total` and `activated` exclude the MTP modules (as V3's "671B total / 37B activated");
  `mtp` counts what MTP adds beyond the shared embedding and head. The aux-loss-free
  correction bias is state, not a parameter, and is not counted.
- `activated` counts the parameters one token passes through: embedding row excluded (a lookup),
  routed experts only top-k of them, the LM head included.
- FLOPs: 2 per multiply-add; training = forward + backward = 3x forward.
- KV cache: elements per token over all layers (DeepSeek-V2 Table 1), d_h = v_head_dim.
"""

from __future__ import annotations

import dataclasses

from deepjax.config import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
  h, nh = cfg.hidden_size, cfg.num_attention_heads
  bias = int(cfg.attention_bias)
  if cfg.q_lora_rank is None:
    q = h * nh * cfg.qk_head_dim
  else:
    q = (h + bias) * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * nh * cfg.qk_head_dim
  kv_a = (h + bias) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
  kv_b = cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)
  o = nh * cfg.v_head_dim * h + bias * h
  return q + kv_a + kv_b + o


def mlp_params(cfg: ModelConfig, width: int) -> int:
  return 3 * cfg.hidden_size * width + int(cfg.mlp_bias) * (2 * width + cfg.hidden_size)


@dataclasses.dataclass(frozen=True)
class LayerParams:
  total: int
  activated: int


def layer_params(cfg: ModelConfig, layer: int) -> LayerParams:
  """One decoder layer (MTP blocks use layer = num_hidden_layers + k)."""
  common = attention_params(cfg) + 2 * cfg.hidden_size
  if not cfg.is_moe_layer(layer):
    dense = mlp_params(cfg, cfg.intermediate_size)
    return LayerParams(common + dense, common + dense)
  shared = mlp_params(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts) \
      if cfg.n_shared_experts else 0
  expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
  router = cfg.hidden_size * cfg.n_routed_experts
  fixed = common + shared + router
  return LayerParams(fixed + cfg.n_routed_experts * expert,
                     fixed + cfg.num_experts_per_tok * expert)


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  total: int          # main model, MTP excluded
  activated: int      # per token, main model
  embedding: int
  mtp: int            # all MTP modules, shared embedding/head not counted again


def param_counts(cfg: ModelConfig) -> ParamCounts:
  vh = cfg.vocab_size * cfg.hidden_size
  head = 0 if cfg.tie_word_embeddings else vh
  layers = [layer_params(cfg, i) for i in range(cfg.num_hidden_layers)]
  total = vh + head + cfg.hidden_size + sum(p.total for p in layers)
  activated = head + cfg.hidden_size + sum(p.activated for p in layers)
  mtp = 0
  for k in range(cfg.num_nextn_predict_layers):
    block = layer_params(cfg, cfg.num_hidden_layers + k).total
    mtp += 2 * cfg.hidden_size * cfg.hidden_size + 3 * cfg.hidden_size + block
  return ParamCounts(total=total, activated=activated, embedding=vh, mtp=mtp)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
  """Forward FLOPs of q.k and p.v per token per layer, averaged over a sequence."""
  keys = (seq_len + 1) / 2 if causal else seq_len
  return 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * keys


def flops_per_token(cfg: ModelConfig, seq_len: int, *, training: bool = True,
                    include_mtp: bool = True) -> float:
  """Matmul + attention FLOPs per token: 2 x activated params (embedding lookup excluded)
  plus attention, times 3 for training (forward + backward)."""
  counts = param_counts(cfg)
  matmul_params = counts.activated
  layers = cfg.num_hidden_layers
  if include_mtp and cfg.num_nextn_predict_layers:
    for k in range(cfg.num_nextn_predict_layers):
      block = layer_params(cfg, cfg.num_hidden_layers + k).activated
      matmul_params += 2 * cfg.hidden_size * cfg.hidden_size + block + \
          (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    layers += cfg.num_nextn_predict_layers
  forward = 2 * matmul_params + layers * attention_flops_per_token(cfg, seq_len)
  return 3 * forward if training else forward


def kv_cache_elements_per_token(cfg: ModelConfig, kind: str = "mla", n_groups: int = 1) -> int:
  """DeepSeek-V2 Table 1: elements cached per token across all layers.

  mla: (d_c + d_h^R) l; mha: 2 n_h d_h l; gqa: 2 n_g d_h l; mqa: 2 d_h l.
  """
  l, d_h, n_h = cfg.num_hidden_layers, cfg.v_head_dim, cfg.num_attention_heads
  per_layer = {"mla": cfg.kv_lora_rank + cfg.qk_rope_head_dim, "mha": 2 * n_h * d_h,
               "gqa": 2 * n_groups * d_h, "mqa": 2 * d_h}
  if kind not in per_layer:
    raise ValueError(f"kind must be one of {sorted(per_layer)}, got {kind!r}")
  return per_layer[kind] * l


def kv_cache_bytes_per_token(cfg: ModelConfig, kind: str = "mla", n_groups: int = 1,
                             bytes_per_element: int = 2) -> int:
  return kv_cache_elements_per_token(cfg, kind, n_groups) * bytes_per_element
