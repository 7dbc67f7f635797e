"""Prefill and decode over the latent cache: the model's layers run with MLA in absorbed form.

Prefill runs the prompt through the model's own layers (per-head keys and values expanded, the
efficient form when many queries share the keys) and stores each layer's latent c^KV and rope
key k^R. Decode attends over the cache with W^UK and W^UV absorbed (DeepSeek-V2 §2.1.2: "we can
absorb W^UK into W^Q, and W^UV into W^O"), as DeepSeek's inference/model.py does with
attn_impl="absorb":

  q^C_{t,i} = W^UK_i^T q_{t,i}                          [kv_lora_rank] per head i
  score_{t,i,s} = (q^C_{t,i} . c^KV_s + q^R_{t,i} . k^R_s) * softmax_scale
  o^C_{t,i} = sum_s softmax_s(score_{t,i,s}) c^KV_s     (pallas_kernels.mla_decode)
  o_{t,i} = W^UV_i o^C_{t,i};  u_t = W^O [o_{t,1}; ...; o_{t,n_h}]     (V2 eqs. 17-19)

since q_{t,i} . k^C_{s,i} = q_{t,i} . W^UK_i c^KV_s and v^C_{s,i} = W^UV_i c^KV_s (V2 eqs. 10-11):
per step each layer reads (d_c + d_h^R) numbers per cached token, never 2 n_h d_h. The MoE
layers of a decode step run only the experts the few new tokens chose (`chosen_experts`).

All functions are pure in the cache: they return the updated LatentCache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from deepjax.inference.cache import LatentCache, write
from deepjax.model import DeepSeek
from deepjax.model.block import DecoderLayer
from deepjax.model.experts import RoutedExperts
from deepjax.model.mla import MultiHeadLatentAttention
from deepjax.model.mtp import MTPModule


def decode_attention_fn(impl: str):
  """The absorbed decode attention behind `attention_impl`: the Pallas kernel or plain XLA."""
  return pk.mla_decode if impl == "pallas" else pk.reference.mla_decode


def absorbed_weights(attn: MultiHeadLatentAttention) -> tuple[jax.Array, jax.Array]:
  """W^UK [d_c, n_h, d_h^nope] and W^UV [d_c, n_h, d_h^v], the two halves of kv_b_proj."""
  cfg = attn.cfg
  w = attn.kv_b_proj.kernel[...].astype(jnp.dtype(cfg.dtype))
  w = w.reshape(cfg.kv_lora_rank, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
  return w[..., :cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim:]


def absorbed_attention(attn: MultiHeadLatentAttention, x, positions, latent, rope):
  """MLA for new tokens x [B, T, hidden] at positions [B, T], attending over the cache.

  The tokens' c^KV and k^R are written at their positions first; query t of row b then sees
  cache entries 0..positions[b, t] (itself and every earlier token, the ones before it in this
  call included). -> (output [B, T, hidden], latent, rope).
  """
  cfg = attn.cfg
  b, t, _ = x.shape
  q_nope, q_rope = attn.query(x, positions)           # [B,T,H,nope], [B,T,H,rope] (eqs. 12-16)
  c_kv, k_rope = attn.latent(x, positions)            # [B,T,d_c], [B,T,rope]      (eqs. 9, 14)
  latent = write(latent, c_kv, positions)
  rope = write(rope, k_rope, positions)
  w_uk, w_uv = absorbed_weights(attn)
  q_latent = jnp.einsum("bthd,chd->bthc", q_nope, w_uk)          # W^UK absorbed into the query
  attend = decode_attention_fn(cfg.attention_impl)
  # One query per row per call: the kernel's lengths mask is per row, and query t must not
  # see the tokens after it that this call wrote (T > 1 only when verifying a draft).
  o_latent = jnp.stack([attend(q_latent[:, i], q_rope[:, i], latent, rope, positions[:, i] + 1,
                               sm_scale=cfg.softmax_scale) for i in range(t)], axis=1)
  o = jnp.einsum("bthc,chv->bthv", o_latent, w_uv)               # W^UV absorbed into the output
  return attn.o_proj(o.reshape(b, t, cfg.num_attention_heads * cfg.v_head_dim)), latent, rope


def chosen_experts(experts: RoutedExperts, x, weights, ids):
  """sum_k g_{t,k} FFN_{e_{t,k}}(x_t) (V3 eq. 12's routed term), reading only the chosen
  experts' weights: x [N, hidden], gates weights and expert ids [N, K] -> [N, hidden].

  Decoding routes a handful of tokens, so the step is bound by reading expert weights; like
  DeepSeek's inference/model.py, which runs only the experts that received tokens, each
  (token, expert) pair gathers its expert's matrices and runs a batched matrix-vector product.
  """
  dt = jnp.dtype(experts.cfg.dtype)
  n, k = ids.shape
  take = lambda w: jnp.take(w[...], ids.reshape(-1), axis=0).astype(dt)   # noqa: E731
  rows = jnp.repeat(x.astype(dt), k, axis=0)                                # [N*K, hidden]
  h = jax.nn.silu(jnp.einsum("ph,phi->pi", rows, take(experts.gate_proj))) * \
      jnp.einsum("ph,phi->pi", rows, take(experts.up_proj))
  y = jnp.einsum("pi,pih->ph", h, take(experts.down_proj)).reshape(n, k, -1)
  return jnp.einsum("nkh,nk->nh", y, weights.astype(dt))


def feed_forward(layer: DecoderLayer, x):
  """The layer's dense MLP or MoE on x [B, T, hidden]. An MoE whose routed (token, expert)
  pairs are no more than its experts (decoding) runs only the chosen experts; otherwise the
  model's own dispatch."""
  if not layer.is_moe:
    return layer.mlp(x)
  moe, cfg = layer.mlp, layer.mlp.experts.cfg
  b, t, hidden = x.shape
  if b * t * cfg.num_experts_per_tok > cfg.n_routed_experts:
    return moe(x)[0]
  flat = x.reshape(b * t, hidden)
  routing = moe.gate(flat)                                                  # V3 eqs. 13-16
  y = chosen_experts(moe.experts, flat, routing.weights, routing.experts)
  y = y.reshape(b, t, hidden).astype(x.dtype)
  if moe.shared_experts is not None:
    y = y + moe.shared_experts(x)
  return y


def decoder_layer(layer: DecoderLayer, h, positions, cache: LatentCache, index: int, *,
                  prefill: bool):
  """One decoder layer on h [B, T, hidden]; layer `index` of the cache. -> (h, cache).

  prefill: the cache is empty and h holds whole right-padded prompts at positions 0..T-1; the
  layer runs as in training (the model's own module) and its latents fill cache entries 0..T-1.
  Otherwise the new tokens attend over the cache in absorbed form.
  """
  latent, rope = cache.layer(index)
  if prefill:
    c_kv, k_rope = layer.self_attn.latent(layer.input_layernorm(h), positions)
    latent, rope = write(latent, c_kv, positions), write(rope, k_rope, positions)
    h, _ = layer(h, positions)
  else:
    y, latent, rope = absorbed_attention(layer.self_attn, layer.input_layernorm(h), positions,
                                         latent, rope)
    h = h + y
    h = h + feed_forward(layer, layer.post_attention_layernorm(h))
  return h, cache.replace_layer(index, latent, rope)


def forward(model: DeepSeek, tokens, positions, cache: LatentCache, *, prefill: bool = False):
  """The main model on tokens [B, T] at positions [B, T] with the cache.

  -> (h [B, T, hidden], the last layer's output before the final norm (what MTP module 1
  takes), cache). Logits: `lm_logits(model, h)`.
  """
  h = model.embed_tokens(tokens)
  for i, layer in enumerate(model.layers):
    h, cache = decoder_layer(layer, h, positions, cache, i, prefill=prefill)
  return h, cache


def lm_logits(model: DeepSeek, h) -> jax.Array:
  """float32 logits from the last layer's output h (final norm, then the output head)."""
  return model.head(model.norm(h))


def mtp_forward(model: DeepSeek, h, next_tokens, positions, cache: LatentCache, *,
                prefill: bool = False):
  """MTP module 1 (V3 §2.2, eq. 21): h'_i = M_1 [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)], one block.

  h [B, T, hidden]: the main model's pre-norm output at positions [B, T]; next_tokens [B, T]:
  the token after each position. Its block uses cache layer num_hidden_layers.
  -> (final-normed h'_i [B, T, hidden]: `model.head` of it predicts t_{i+2}, cache).
  """
  module: MTPModule = model.mtp[0]
  x = module.eh_proj(jnp.concatenate(
      [module.enorm(model.embed_tokens(next_tokens)), module.hnorm(h)], axis=-1))
  h_mtp, cache = decoder_layer(module.block, x, positions, cache, model.cfg.num_hidden_layers,
                               prefill=prefill)
  return module.final_norm(h_mtp), cache
