"""ModelConfig: every DeepseekV2 / V3 / V3.2 field under its transformers name, plus deepjax's own.

`ModelConfig.from_hf(config_json)` reads a hub or transformers `config.json` (legacy
`rope_theta` + `rope_scaling`, or transformers 5.x `rope_parameters`); `to_hf()` writes one that
transformers' DeepseekV2/V3/V32 classes load. `ModelConfig.preset(name)` gives tiny / small /
v2-lite / v3 / tiny-v3.2 / v3.2. Construction validates: an inconsistent config raises ValueError
naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
# Per-layer kinds the model is built from (deepjax.model.block); V2 and V3 are configurations of
# one model: every layer `mla`, its MLP `dense` or `moe`, a `plain` residual. V3.2 is V3 with
# `dsa` attention (MLA plus the lightning indexer) in every layer. V4 will add `sliding` / `csa` /
# `hca` attention, `hash_moe` and the `mhc` residual.
ATTENTION_KINDS = ("mla", "dsa")
# V3.2's DeepSeek Sparse Attention: "sparse" attends only to the indexer's top-k keys (the
# sparse stage, post-training, inference); "dense" attends to every key (the indexer warm-up).
DSA_ATTENTION = ("sparse", "dense")
MLP_KINDS = ("dense", "moe")
RESIDUAL_KINDS = ("plain",)
ATTENTION_IMPLS = ("xla", "pallas")
ROUTER_IMPLS = ("xla", "pallas")
# moe_impl: "blocked" is the fast exact path on CPU (block-padded batched matmuls; the tiny and
# small presets use it); ragged_dot and pallas use grouped matmuls (XLA:CPU runs ragged_dot as
# densely as "dense"); dense runs every expert on every token.
MOE_IMPLS = ("dense", "ragged_dot", "pallas", "blocked")
DTYPES = ("float32", "bfloat16", "float16")


def deepjax_field(default, *, impl: bool = False):
  """A deepjax field: not part of transformers' config.json. impl: it picks how the model is
  computed, not what it computes (a workdir may resume under another choice)."""
  return dataclasses.field(default=default, metadata={"deepjax": True, "impl": impl})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  model_type: str = "deepseek_v3"
  vocab_size: int = 129280
  hidden_size: int = 7168
  intermediate_size: int = 18432
  moe_intermediate_size: int = 2048
  num_hidden_layers: int = 61
  num_attention_heads: int = 128
  num_key_value_heads: int | None = None       # must equal num_attention_heads (MLA)
  q_lora_rank: int | None = 1536               # None: q = q_proj(x), no query compression
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  n_shared_experts: int = 1
  n_routed_experts: int = 256
  num_experts_per_tok: int = 8
  n_group: int = 8
  topk_group: int = 4
  topk_method: str = "noaux_tc"
  scoring_func: str | None = None              # None: sigmoid for V3, softmax for V2
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 2.5
  first_k_dense_replace: int = 3
  moe_layer_freq: int = 1
  hidden_act: str = "silu"
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None             # YaRN: {"type": "yarn", "factor", ...}
  rope_interleave: bool = True                 # V2 always rotates interleaved pairs
  attention_bias: bool = False
  mlp_bias: bool = False
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096
  num_nextn_predict_layers: int = 0            # D, the number of MTP modules (V3 §2.2)
  initializer_range: float = 0.02
  bos_token_id: int | None = 0
  eos_token_id: int | None = 1
  pad_token_id: int | None = None
  # DeepSeek-V3.2's lightning indexer (deepseek_v32 only)
  index_topk: int = 2048
  index_head_dim: int = 128
  index_n_heads: int = 64
  # deepjax
  dtype: str = deepjax_field("float32")        # compute; norms, softmax, router stay float32
  param_dtype: str = deepjax_field("float32")
  attention_impl: str = deepjax_field("xla", impl=True)
  moe_impl: str = deepjax_field("ragged_dot", impl=True)      # the experts' dispatch
  router_impl: str = deepjax_field("xla", impl=True)          # xla: model/router.py; pallas: fused
  # Expert parallelism only: None exchanges tokens dropless; c > 0 gives each device pair
  # c * (its fair share) slots per step and drops the copies beyond
  # (deepjax.parallel.expert_parallel).
  moe_capacity_factor: float | None = deepjax_field(None)
  dsa_attention: str = deepjax_field("sparse")                 # V3.2: sparse or dense (warm-up)

  def __hash__(self):
    return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.scoring_func is None:
      default = "sigmoid" if self.is_v3 else "softmax"
      object.__setattr__(self, "scoring_func", default)
    if self.rope_scaling is not None:
      object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
    self.validate()

  # --- derived sizes -----------------------------------------------------------------------

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def is_v3(self) -> bool:
    """V3 and its sequel V3.2 (V3 with the indexer): V3's router, MTP and checkpoint layout."""
    return self.model_type in ("deepseek_v3", "deepseek_v32")

  @property
  def is_v32(self) -> bool:
    return self.model_type == "deepseek_v32"

  def is_moe_layer(self, layer: int) -> bool:
    """MoE from `first_k_dense_replace` on, every `moe_layer_freq`-th layer (MTP blocks too)."""
    return (self.n_routed_experts > 0 and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0)

  # --- per-layer kinds (layer index l: main layers 0..L-1, then MTP block k at L + k - 1) ----

  def attention_kind(self, layer: int) -> str:
    del layer
    return "dsa" if self.is_v32 else "mla"

  def mlp_kind(self, layer: int) -> str:
    return "moe" if self.is_moe_layer(layer) else "dense"

  @property
  def residual_kind(self) -> str:
    return "plain"

  @property
  def num_layers_with_mtp(self) -> int:
    return self.num_hidden_layers + self.num_nextn_predict_layers

  @property
  def layer_types(self) -> tuple[str, ...]:
    """Attention kind per layer, MTP blocks included (transformers' `layer_types`)."""
    return tuple(self.attention_kind(l) for l in range(self.num_layers_with_mtp))

  @property
  def mlp_layer_types(self) -> tuple[str, ...]:
    """MLP kind per layer, MTP blocks included (transformers' `mlp_layer_types`)."""
    return tuple(self.mlp_kind(l) for l in range(self.num_layers_with_mtp))

  @property
  def num_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

  @property
  def uses_correction_bias(self) -> bool:
    """V3's e_score_correction_bias (aux-loss-free balancing) exists with sigmoid scoring."""
    return self.scoring_func == "sigmoid"

  @property
  def uses_groups(self) -> bool:
    """V3 always scores groups; V2 only with group_limited_greedy."""
    return self.scoring_func == "sigmoid" or self.topk_method == "group_limited_greedy"

  @property
  def normalizes_topk(self) -> bool:
    """transformers' DeepseekV2 router never normalises; V3 does when norm_topk_prob."""
    return self.norm_topk_prob and self.scoring_func == "sigmoid"

  @property
  def softmax_scale(self) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (V2 §B.1)."""
    scale = self.qk_head_dim**-0.5
    rs = self.rope_scaling
    if rs and rope_type(rs) == "yarn" and rs.get("mscale_all_dim"):
      m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
      scale *= m * m
    return scale

  # --- validation --------------------------------------------------------------------------

  def validate(self) -> None:
    def fail(field, rule):
      raise ValueError(f"ModelConfig.{field}: {rule}")

    def choice(field, options):
      if getattr(self, field) not in options:
        fail(field, f"must be one of {options}, got {getattr(self, field)!r}")

    choice("model_type", MODEL_TYPES)
    choice("topk_method", TOPK_METHODS)
    choice("scoring_func", ("sigmoid", "softmax"))
    choice("attention_impl", ATTENTION_IMPLS)
    choice("moe_impl", MOE_IMPLS)
    choice("router_impl", ROUTER_IMPLS)
    choice("dsa_attention", DSA_ATTENTION)
    for field, kinds, known in (("layer_types", self.layer_types, ATTENTION_KINDS),
                                ("mlp_layer_types", self.mlp_layer_types, MLP_KINDS),
                                ("residual_kind", (self.residual_kind,), RESIDUAL_KINDS)):
      if not set(kinds) <= set(known):
        fail(field, f"kinds {sorted(set(kinds) - set(known))} are not among {known}")
    choice("dtype", DTYPES)
    choice("param_dtype", DTYPES)
    if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
      fail("moe_capacity_factor", f"must be positive or None, got {self.moe_capacity_factor}")
    if self.hidden_act != "silu":
      fail("hidden_act", f"only 'silu' (SwiGLU experts) is supported, got {self.hidden_act!r}")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
                  "max_position_embeddings", "moe_layer_freq"):
      if getattr(self, field) <= 0:
        fail(field, f"must be positive, got {getattr(self, field)}")
    for field in ("qk_nope_head_dim", "n_shared_experts", "n_routed_experts",
                  "first_k_dense_replace", "num_nextn_predict_layers"):
      if getattr(self, field) < 0:
        fail(field, f"must be >= 0, got {getattr(self, field)}")
    if self.q_lora_rank is not None and self.q_lora_rank <= 0:
      fail("q_lora_rank", f"must be positive or None, got {self.q_lora_rank}")
    if self.qk_rope_head_dim % 2:
      fail("qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
    if self.num_key_value_heads != self.num_attention_heads:
      fail("num_key_value_heads", f"must equal num_attention_heads ({self.num_attention_heads}) "
           f"in MLA, got {self.num_key_value_heads}")
    if self.is_v3 and self.scoring_func != "sigmoid":
      fail("scoring_func", "deepseek_v3 routers score with 'sigmoid'")
    if not self.is_v3 and self.scoring_func != "softmax":
      fail("scoring_func", "deepseek_v2 routers score with 'softmax'")
    if not self.is_v3 and self.topk_method == "noaux_tc":
      fail("topk_method", "'noaux_tc' is DeepSeek-V3's; deepseek_v2 uses 'greedy' or "
           "'group_limited_greedy'")
    if self.n_routed_experts > 0:
      self._validate_routing(fail)
    if self.num_nextn_predict_layers > 0 and self.n_routed_experts > 0 and \
        not self.is_moe_layer(self.num_hidden_layers):
      fail("moe_layer_freq", "MTP blocks sit at layer index num_hidden_layers and must be MoE "
           "layers like DeepSeek-V3's")
    if self.rope_scaling is not None:
      self._validate_rope_scaling(fail)
    if self.is_v32:
      self._validate_indexer(fail)

  def _validate_indexer(self, fail) -> None:
    if self.q_lora_rank is None:
      fail("q_lora_rank", "deepseek_v32's indexer reads the query latent: q_lora_rank is needed")
    for field in ("index_topk", "index_n_heads"):
      if getattr(self, field) <= 0:
        fail(field, f"must be positive, got {getattr(self, field)}")
    if not self.qk_rope_head_dim <= self.index_head_dim:
      fail("index_head_dim", f"must be >= qk_rope_head_dim ({self.qk_rope_head_dim}): the "
           f"indexer ropes its first qk_rope_head_dim dims; got {self.index_head_dim}")
    if not self.rope_interleave:
      fail("rope_interleave", "deepseek_v32's MLA always rotates interleaved pairs")

  def _validate_routing(self, fail) -> None:
    e, k = self.n_routed_experts, self.num_experts_per_tok
    if k <= 0:
      fail("num_experts_per_tok", f"must be positive, got {k}")
    if self.moe_intermediate_size <= 0:
      fail("moe_intermediate_size", f"must be positive, got {self.moe_intermediate_size}")
    if k > e:
      fail("num_experts_per_tok", f"top-k {k} exceeds n_routed_experts {e}")
    if self.uses_groups:
      if self.n_group <= 0 or e % self.n_group:
        fail("n_group", f"n_routed_experts ({e}) must be divisible by n_group ({self.n_group})")
      if not 1 <= self.topk_group <= self.n_group:
        fail("topk_group", f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
      allowed = self.topk_group * (e // self.n_group)
      if k > allowed:
        fail("num_experts_per_tok", f"top-k {k} exceeds the {allowed} experts that topk_group "
             f"({self.topk_group}) groups of {e // self.n_group} allow")
      if self.scoring_func == "sigmoid" and e // self.n_group < 2:
        fail("n_group", "V3 group scores sum the top-2 experts of a group: each group needs "
             f">= 2 experts, got {e // self.n_group}")

  def _validate_rope_scaling(self, fail) -> None:
    rs = self.rope_scaling
    kind = rope_type(rs)
    if kind == "default":
      return
    if kind != "yarn":
      fail("rope_scaling", f"only 'yarn' scaling is supported, got {kind!r}")
    if not rs.get("factor") or rs["factor"] < 1:
      fail("rope_scaling", f"yarn needs factor >= 1, got {rs.get('factor')!r}")
    if not rs.get("original_max_position_embeddings"):
      fail("rope_scaling", "yarn needs original_max_position_embeddings")

  # --- conversions -------------------------------------------------------------------------

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def deepjax_fields(cls) -> tuple[str, ...]:
    """deepjax's own fields, left out of transformers' config.json."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("deepjax"))

  @classmethod
  def impl_fields(cls) -> tuple[str, ...]:
    """Fields that choose an implementation (kernel or XLA path), not the model."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("impl"))

  @classmethod
  def from_hf(cls, config: dict[str, Any], **overrides) -> ModelConfig:
    """Reads a DeepseekV2/V3 `config.json` dict; unknown keys are ignored, deepjax fields kept."""
    c = dict(config)
    model_type = c.get("model_type", "deepseek_v3")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"ModelConfig.model_type: must be one of {MODEL_TYPES}, got {model_type!r}")
    aliases = {"num_local_experts": "n_routed_experts", "num_experts": "n_routed_experts",
               "num_mtp_layers": "num_nextn_predict_layers"}
    for alias, name in aliases.items():
      if alias in c and name not in c:
        c[name] = c[alias]
    rope = c.get("rope_parameters")
    if isinstance(rope, dict):                   # transformers 5.x: theta inside the dict
      c.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
      scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
      c["rope_scaling"] = scaling if rope_type(scaling) != "default" else None
    elif c.get("rope_scaling") is not None and rope_type(c["rope_scaling"]) == "default":
      c["rope_scaling"] = None
    if model_type in ("deepseek_v2", "deepseek_v32"):
      c["rope_interleave"] = True                # V2 and V3.2's MLA rotate interleaved pairs
      c.setdefault("topk_method", "greedy")
      c.setdefault("norm_topk_prob", False)
      c.setdefault("routed_scaling_factor", 1.0)
      c.setdefault("first_k_dense_replace", 0)
      c.setdefault("bos_token_id", 1)
      c.setdefault("eos_token_id", 2)
    for key in ("n_group", "topk_group"):
      if c.get(key) is None:
        c[key] = 1
    if isinstance(c.get("eos_token_id"), list):
      c["eos_token_id"] = c["eos_token_id"][0]
    known = {k: v for k, v in c.items() if k in cls.fields()}
    known.update(overrides)
    return cls(**known)

  def to_hf(self) -> dict[str, Any]:
    """A config.json dict for transformers' DeepseekV2/V3/V32 (hub field names)."""
    out = {f: getattr(self, f) for f in self.fields() if f not in self.deepjax_fields()}
    out["architectures"] = [HF_ARCHITECTURES[self.model_type]]
    out["torch_dtype"] = self.param_dtype
    out["num_experts_per_tok"] = self.num_experts_per_tok
    if not self.is_v3:
      del out["rope_interleave"], out["num_nextn_predict_layers"]
    if not self.is_v32:
      for field in ("index_topk", "index_head_dim", "index_n_heads"):
        del out[field]
    return out

  @classmethod
  def preset(cls, name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
      raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return cls(**{**PRESETS[name], **overrides})


HF_ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                    "deepseek_v32": "DeepseekV32ForCausalLM"}


def rope_type(rope_scaling: dict) -> str:
  return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


_V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

_TINY = dict(
    model_type="deepseek_v3", vocab_size=272, hidden_size=128, intermediate_size=384,
    moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64,
    kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
    topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.0,
    first_k_dense_replace=1, max_position_embeddings=1024, num_nextn_predict_layers=1,
    bos_token_id=256, eos_token_id=257, pad_token_id=258, moe_impl="blocked")

_V3 = dict(
    model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8,
    n_group=8, topk_group=4, topk_method="noaux_tc", norm_topk_prob=True,
    routed_scaling_factor=2.5, first_k_dense_replace=3, max_position_embeddings=163840,
    rope_scaling=_V3_YARN, num_nextn_predict_layers=1, param_dtype="bfloat16",
    dtype="bfloat16")

PRESETS: dict[str, dict[str, Any]] = {
    # A V3-shaped MoE that trains on a laptop CPU in minutes (byte-level vocabulary).
    "tiny": _TINY,
    # tiny with DeepSeek Sparse Attention: each token attends to the indexer's top 64 keys, so
    # the selection bites from the 65th token of the default 256-token sequences.
    "tiny-v3.2": dict(_TINY, model_type="deepseek_v32", index_topk=64, index_head_dim=32,
                      index_n_heads=16),
    # ~100M total parameters: a research-scale V3 shape for single-host GPU/TPU runs.
    "small": dict(
        model_type="deepseek_v3", vocab_size=32768, hidden_size=512, intermediate_size=1536,
        moe_intermediate_size=160, num_hidden_layers=8, num_attention_heads=8, q_lora_rank=192,
        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_shared_experts=1, n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
        topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.0,
        first_k_dense_replace=1, max_position_embeddings=4096, num_nextn_predict_layers=1,
        moe_impl="blocked"),
    # deepseek-ai/DeepSeek-V2-Lite config.json (15.7B total, 2.4B activated).
    "v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        n_group=1, topk_group=1, topk_method="greedy", norm_topk_prob=False,
        routed_scaling_factor=1.0, first_k_dense_replace=1, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=100000, eos_token_id=100001, param_dtype="bfloat16", dtype="bfloat16"),
    # deepseek-ai/DeepSeek-V3 config.json (671B total, 37B activated, plus one MTP module).
    "v3": _V3,
    # deepseek-ai/DeepSeek-V3.2(-Exp) config.json: V3 plus the lightning indexer (V3.2 §1).
    "v3.2": dict(_V3, model_type="deepseek_v32", index_topk=2048, index_head_dim=128,
                 index_n_heads=64),
}
