"""Multi-head Latent Attention (DeepSeek-V2 §2.1, eqs. 9-19).

Keys and values are compressed into one latent c_kv (kv_lora_rank) plus one rope key shared by
all heads; queries are optionally compressed through q_lora_rank. Only c_kv and k_rope need to
be cached (see deepjax.inference); training expands them per head and runs ordinary attention.
"""

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from deepjax.config import ModelConfig
from deepjax.model import attention
from deepjax.model.layers import Dense
from deepjax.model.norm import RMSNorm
from deepjax.model.rope import apply_rope

# transformers builds q_a_layernorm and kv_a_layernorm without an eps argument.
LATENT_NORM_EPS = 1e-6


def attention_fn(impl: str):
  """The attention implementation behind `attention_impl`: the Pallas kernel, or plain XLA
  (deepjax.model.attention: chunked, with a hand-written backward pass)."""
  return pk.mla_attention if impl == "pallas" else attention.mla_attention


class MultiHeadLatentAttention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    dense = lambda i, o, axes, bias=False: Dense(  # noqa: E731
        i, o, axes, use_bias=bias, dtype=dt, param_dtype=pdt, std=cfg.initializer_range,
        rngs=rngs)
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
      self.q_proj = dense(h, nh * cfg.qk_head_dim, ("embed", "heads"))
    else:                                                    # V2 eqs. 12-13
      self.q_a_proj = dense(h, cfg.q_lora_rank, ("embed", "q_lora"), cfg.attention_bias)
      self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS, param_dtype=pdt,
                                   axis_name="q_lora")
      self.q_b_proj = dense(cfg.q_lora_rank, nh * cfg.qk_head_dim, ("q_lora", "heads"))
    self.kv_a_proj_with_mqa = dense(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                    ("embed", "kv_lora"), cfg.attention_bias)   # V2 eqs. 9, 14
    self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=LATENT_NORM_EPS, param_dtype=pdt,
                                  axis_name="kv_lora")
    self.kv_b_proj = dense(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                           ("kv_lora", "heads"))                              # V2 eqs. 10-11
    self.o_proj = dense(nh * cfg.v_head_dim, h, ("heads", "embed"), cfg.attention_bias)

  def query(self, x, positions):
    """Per-head query parts (q_nope [B,T,H,nope], q_rope [B,T,H,rope]), rope applied."""
    cfg = self.cfg
    if cfg.q_lora_rank is None:
      q = self.q_proj(x)
    else:
      q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
    q = q.reshape(*x.shape[:2], cfg.num_attention_heads, cfg.qk_head_dim)
    q_nope, q_rope = jnp.split(q, [cfg.qk_nope_head_dim], axis=-1)
    return q_nope, apply_rope(q_rope, positions, cfg)

  def latent(self, x, positions):
    """What the cache holds: normalised c_kv [B,T,kv_lora] and the shared k_rope [B,T,rope]."""
    c_kv, k_rope = jnp.split(self.kv_a_proj_with_mqa(x), [self.cfg.kv_lora_rank], axis=-1)
    return self.kv_a_layernorm(c_kv), apply_rope(k_rope[:, :, None, :], positions, self.cfg)[:, :, 0]

  def __call__(self, x, positions, segment_ids=None):
    cfg = self.cfg
    b, t, _ = x.shape
    nh = cfg.num_attention_heads
    q_nope, q_rope = self.query(x, positions)
    c_kv, k_rope = self.latent(x, positions)
    kv = self.kv_b_proj(c_kv).reshape(b, t, nh, cfg.qk_nope_head_dim + cfg.v_head_dim)
    k_nope, v = jnp.split(kv, [cfg.qk_nope_head_dim], axis=-1)
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], q_rope.shape)], axis=-1)
    out = attention_fn(cfg.attention_impl)(q, k, v, segment_ids=segment_ids, causal=True,
                                           sm_scale=cfg.softmax_scale)
    return self.o_proj(out.reshape(b, t, nh * cfg.v_head_dim))
