"""Multi-head Latent Attention (DeepSeek-V2 §2.1, eqs. 9-19), in both of its forms.

Keys and values are compressed into one latent c^KV (kv_lora_rank) plus one rope key k^R shared
by all heads; queries are optionally compressed through q_lora_rank. Only c^KV and k^R are
cached (`MLACache`: d_c + d_h^R numbers per token and layer, V2 Table 1).

`expanded`: c^KV is up-projected to per-head keys and values (V2 eqs. 10-11) and ordinary
attention runs over them; the efficient form when many queries share the keys (training,
prefill). `absorbed`: W^UK is absorbed into the query and W^UV into the output (V2 §2.1.2),
so attention runs over the cached latents themselves; the form for decoding, as DeepSeek's
inference/model.py does with attn_impl="absorb":

  q^L_{t,i} = W^UK_i^T q^C_{t,i}                        [d_c] per head i (q^C: V2 eq. 13)
  score_{t,i,s} = (q^L_{t,i} . c^KV_s + q^R_{t,i} . k^R_s) * softmax_scale
  o_{t,i} = W^UV_i sum_s softmax_s(score_{t,i,s}) c^KV_s;  u_t = W^O [o_{t,1}; ...; o_{t,n_h}]

since q^C_{t,i} . k^C_{s,i} = q^C_{t,i} . W^UK_i c^KV_s and v^C_{s,i} = W^UV_i c^KV_s.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from deepjax.config import ModelConfig
from deepjax.model.layers import Dense
from deepjax.model.norm import RMSNorm
from deepjax.model.rope import apply_rope

# transformers builds q_a_layernorm and kv_a_layernorm without an eps argument.
LATENT_NORM_EPS = 1e-6


def write_rows(buffer: jax.Array, values: jax.Array, positions: jax.Array) -> jax.Array:
  """buffer [B, S, D] with values [B, T, D] written at positions [B, T] of each row.

  Positions >= S are dropped: rows that finished early keep stepping (their results unused)
  and may run one position past the cache.
  """
  rows = jnp.arange(buffer.shape[0])[:, None]
  return buffer.at[rows, positions].set(values.astype(buffer.dtype), mode="drop",
                                        unique_indices=True)


@flax.struct.dataclass
class MLACache:
  """One MLA layer's cache: latent [B, S, kv_lora_rank] normalised c^KV (V2 eq. 9) and rope
  [B, S, qk_rope_head_dim] k^R with RoPE applied (V2 eq. 14), as DeepSeek's `kv_cache` and
  `pe_cache`. Row b's entries 0..p are valid once the token at position p has run; later
  entries may hold stale values and are masked by the decode attention's lengths."""
  latent: jax.Array
  rope: jax.Array

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> MLACache:
    return cls(latent=jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype),
               rope=jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype))

  def write(self, c_kv: jax.Array, k_rope: jax.Array, positions: jax.Array) -> MLACache:
    return MLACache(latent=write_rows(self.latent, c_kv, positions),
                    rope=write_rows(self.rope, k_rope, positions))


def attention_fn(impl: str):
  """The expanded form's attention behind `attention_impl`: the Pallas flash kernel, or its
  XLA form (chunked, with a hand-written backward pass)."""
  return pk.mla_attention if impl == "pallas" else pk.xla_attention.mla_attention


def decode_attention_fn(impl: str):
  """The absorbed form's attention over the latent cache: the Pallas kernel or plain XLA."""
  return pk.mla_decode if impl == "pallas" else pk.reference.mla_decode


class MultiHeadLatentAttention(nnx.Module):
  cache_type = MLACache

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

  def __call__(self, x, positions, segment_ids=None, cache: MLACache | None = None, *,
               prefill: bool = False) -> tuple[jax.Array, MLACache | None, None]:
    """x [B, T, hidden] at positions [B, T] -> (u [B, T, hidden], the updated cache, None: MLA
    has no auxiliary loss).

    No cache: training; causal attention within each row (and segment). With a cache the
    tokens' c^KV and k^R are written at their positions first. prefill: the cache was empty
    and x holds whole prompts from position 0, so the expanded form over x itself is exact.
    Otherwise (decoding) the absorbed form attends over the cache: query t of row b sees
    entries 0..positions[b, t].
    """
    b, t, _ = x.shape
    q_nope, q_rope = self.query(x, positions)             # [B,T,H,nope], [B,T,H,rope]
    c_kv, k_rope = self.latent(x, positions)              # [B,T,d_c], [B,T,rope]
    if cache is not None:
      cache = cache.write(c_kv, k_rope, positions)
    if cache is None or prefill:
      o = self.expanded(q_nope, q_rope, c_kv, k_rope, segment_ids)
    else:
      o = self.absorbed(q_nope, q_rope, cache, positions)
    return self.o_proj(o.reshape(b, t, -1)), cache, None

  def query(self, x, positions):
    """Per-head query parts (q_nope [B,T,H,nope], q_rope [B,T,H,rope]), rope applied."""
    return self.query_heads(self.query_latent(x), positions)

  def query_latent(self, x):
    """The query latent c^Q = norm(W^DQ x) (V2 eq. 12), or x itself without q_lora_rank."""
    if self.cfg.q_lora_rank is None:
      return x
    return self.q_a_layernorm(self.q_a_proj(x))

  def query_heads(self, c_q, positions):
    """(q_nope, q_rope) from the query latent (V2 eq. 13), rope applied."""
    cfg = self.cfg
    q = self.q_proj(c_q) if cfg.q_lora_rank is None else self.q_b_proj(c_q)
    q = q.reshape(*c_q.shape[:2], cfg.num_attention_heads, cfg.qk_head_dim)
    q_nope, q_rope = jnp.split(q, [cfg.qk_nope_head_dim], axis=-1)
    return q_nope, apply_rope(q_rope, positions, cfg)

  def latent(self, x, positions):
    """What the cache holds: normalised c_kv [B,T,kv_lora] and the shared k_rope [B,T,rope]."""
    c_kv, k_rope = jnp.split(self.kv_a_proj_with_mqa(x), [self.cfg.kv_lora_rank], axis=-1)
    k_rope = apply_rope(k_rope[:, :, None, :], positions, self.cfg)[:, :, 0]     # one head
    return self.kv_a_layernorm(c_kv), k_rope

  def expanded(self, q_nope, q_rope, c_kv, k_rope, segment_ids):
    """Per-head keys [k^C; k^R] and values v^C from c^KV (V2 eqs. 10-11, 15-19) -> [B,T,H,v]."""
    cfg = self.cfg
    b, t, nh, _ = q_nope.shape
    kv = self.kv_b_proj(c_kv).reshape(b, t, nh, cfg.qk_nope_head_dim + cfg.v_head_dim)
    k_nope, v = jnp.split(kv, [cfg.qk_nope_head_dim], axis=-1)
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], q_rope.shape)], axis=-1)
    return attention_fn(cfg.attention_impl)(q, k, v, segment_ids=segment_ids, causal=True,
                                            sm_scale=cfg.softmax_scale)

  def absorbed_weights(self) -> tuple[jax.Array, jax.Array]:
    """W^UK [d_c, n_h, d_h^nope] and W^UV [d_c, n_h, d_h^v], the two halves of kv_b_proj."""
    cfg = self.cfg
    w = self.kv_b_proj.kernel[...].astype(jnp.dtype(cfg.dtype))
    w = w.reshape(cfg.kv_lora_rank, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
    return w[..., :cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim:]

  def absorbed(self, q_nope, q_rope, cache: MLACache, positions):
    """Attention over the latent cache with W^UK and W^UV absorbed (V2 §2.1.2) -> [B,T,H,v]."""
    w_uk, w_uv = self.absorbed_weights()
    q_latent = jnp.einsum("bthd,chd->bthc", q_nope, w_uk)          # W^UK into the query
    attend = decode_attention_fn(self.cfg.attention_impl)
    # One query per row per call: the kernel's lengths mask is per row, and query t must not
    # see the tokens after it that this call wrote (T > 1 only when verifying a draft).
    o_latent = jnp.stack([attend(q_latent[:, i], q_rope[:, i], cache.latent, cache.rope,
                                 positions[:, i] + 1, sm_scale=self.cfg.softmax_scale)
                          for i in range(q_nope.shape[1])], axis=1)
    return jnp.einsum("bthc,chv->bthv", o_latent, w_uv)             # W^UV into the output
