"""Parameter counts, training FLOPs per token and KV-cache sizes, from the config alone.

Nothing is allocated, so the numbers hold for V3-sized configs on a laptop. Conventions:
- `total` and `activated` exclude the MTP modules (as V3's "671B total / 37B activated");
  `mtp` counts what MTP adds beyond the shared embedding and head. The aux-loss-free
  correction bias is state, not a parameter, and is not counted.
- `activated` counts the parameters one token passes through: embedding row excluded (a lookup),
  routed experts only top-k of them, the LM head included.
- FLOPs: 2 per multiply-add; training = forward + backward = 3x forward.
- KV cache: elements per token over all layers (DeepSeek-V2 Table 1), d_h = v_head_dim; V3.2's
  layers add the indexer key (d_c + d_h^R + D_I per layer: 42,944 per token against V3's 35,136).
- V3.2's sparse attention (dsa_attention="sparse") costs each query min(index_topk, visible)
  keys in the absorbed form, plus the indexer's scores over every visible key.
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


def indexer_params(cfg: ModelConfig) -> int:
  """V3.2's lightning indexer: wq_b, wk, k_norm (weight and bias), weights_proj (V3.2 §1.3:
  13.96M per layer at the published sizes)."""
  heads, dim = cfg.index_n_heads, cfg.index_head_dim
  return cfg.q_lora_rank * heads * dim + cfg.hidden_size * dim + 2 * dim + cfg.hidden_size * heads


def mlp_params(cfg: ModelConfig, width: int) -> int:
  return 3 * cfg.hidden_size * width + int(cfg.mlp_bias) * (2 * width + cfg.hidden_size)


@dataclasses.dataclass(frozen=True)
class LayerParams:
  total: int
  activated: int


def layer_params(cfg: ModelConfig, layer: int) -> LayerParams:
  """One decoder layer (MTP blocks use layer = num_hidden_layers + k)."""
  common = attention_params(cfg) + 2 * cfg.hidden_size
  if cfg.attention_kind(layer) == "dsa":
    common += indexer_params(cfg)
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


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True,
                              layer: int = 0, absorbed: bool = False) -> float:
  """Forward FLOPs of q.k and p.v per token in one layer, averaged over a sequence (causal)
  or for a query that sees all seq_len keys (a decoding step: causal=False). Dense MLA in its
  expanded form (q.k over d_h + d_h^R, p.v over d_h), or with `absorbed` in its absorbed form
  as decoding runs it (q.k over d_c + d_h^R, p.v over d_c; V2 §2.1.2). V3.2's sparse attention:
  the absorbed form on each query's min(index_topk, visible) keys, plus the indexer's H_I D_I
  dots over every visible key."""
  visible = (seq_len + 1) / 2 if causal else seq_len
  width = 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim          # the absorbed form's q.k + p.v
  if cfg.attention_kind(layer) != "dsa" or cfg.dsa_attention == "dense":
    if not absorbed:
      width = cfg.qk_head_dim + cfg.v_head_dim
    return 2 * cfg.num_attention_heads * width * visible
  k = cfg.index_topk
  if causal:   # mean over t = 1..T of min(t, k)
    n = min(k, seq_len)
    selected = (n * (n + 1) / 2 + (seq_len - n) * k) / seq_len
  else:
    selected = min(k, seq_len)
  return (2 * cfg.num_attention_heads * width * selected
          + 2 * cfg.index_n_heads * cfg.index_head_dim * visible)


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
  attention = sum(attention_flops_per_token(cfg, seq_len, layer=l) for l in range(layers))
  forward = 2 * matmul_params + attention
  return 3 * forward if training else forward


def kv_cache_elements_per_token(cfg: ModelConfig, kind: str | None = None,
                                n_groups: int = 1) -> int:
  """DeepSeek-V2 Table 1: elements cached per token across all layers.

  mla: (d_c + d_h^R) l; dsa (V3.2): (d_c + d_h^R + D_I) l; mha: 2 n_h d_h l; gqa: 2 n_g d_h l;
  mqa: 2 d_h l. kind None: the config's own (dsa for deepseek_v32, else mla).
  """
  l, d_h, n_h = cfg.num_hidden_layers, cfg.v_head_dim, cfg.num_attention_heads
  kind = kind or cfg.attention_kind(0)
  mla = cfg.kv_lora_rank + cfg.qk_rope_head_dim
  per_layer = {"mla": mla, "dsa": mla + cfg.index_head_dim, "mha": 2 * n_h * d_h,
               "gqa": 2 * n_groups * d_h, "mqa": 2 * d_h}
  if kind not in per_layer:
    raise ValueError(f"kind must be one of {sorted(per_layer)}, got {kind!r}")
  return per_layer[kind] * l


def kv_cache_bytes_per_token(cfg: ModelConfig, kind: str | None = None, n_groups: int = 1,
                             bytes_per_element: int = 2) -> int:
  return kv_cache_elements_per_token(cfg, kind, n_groups) * bytes_per_element
