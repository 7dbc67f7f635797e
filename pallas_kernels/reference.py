"""Pure jax.numpy references for every kernel in this package, with the same signatures.

They define the semantics the Pallas kernels and `xla_attention` are tested against, and several
are deepjax's `xla` paths. `interpret` is accepted and ignored so that a reference can stand in
for its kernel anywhere.
"""

import jax
import jax.numpy as jnp

from pallas_kernels import checks

_NEG_INF = float("-inf")


def attention_mask(t: int, s: int, *, causal: bool, segment_ids=None) -> jax.Array | None:
  """Boolean mask [B or 1, T, S] of the keys each query may attend to, or None for all.

  Causal masking is aligned bottom-right: query i sits at key position i + (S - T), so a
  query block that continues a cache of S - T keys sees all of them. segment_ids [B,T] need
  T == S (`checks.attention` refuses anything else).
  """
  mask = None
  if causal:
    q_pos = jnp.arange(t)[:, None] + (s - t)
    mask = (jnp.arange(s)[None, :] <= q_pos)[None]
  if segment_ids is not None:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = same if mask is None else mask & same
  return mask


def mla_attention(q, k, v, *, segment_ids=None, causal=True, sm_scale=None, interpret=None):
  """softmax(q k^T * scale + mask) v with float32 softmax.

  q [B,T,H,Dqk], k [B,S,H,Dqk], v [B,S,H,Dv] -> [B,T,H,Dv] in q's dtype. Rows whose keys are
  all masked out produce zeros.
  """
  del interpret
  checks.attention(q, k, v, segment_ids)
  _, t, _, d_qk = q.shape
  s = k.shape[1]
  if sm_scale is None:
    sm_scale = d_qk**-0.5
  scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * sm_scale
  mask = attention_mask(t, s, causal=causal, segment_ids=segment_ids)
  if mask is not None:
    scores = jnp.where(mask[:, None], scores, _NEG_INF)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(scores - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("bhts,bshd->bthd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def mla_decode(q_latent, q_rope, kv_latent, k_rope, lengths, *, sm_scale, interpret=None):
  """Absorbed MLA decode over the latent cache (DeepSeek-V2 §2.1.2, weights absorbed).

  score[b,h,s] = (q_latent[b,h] . kv_latent[b,s] + q_rope[b,h] . k_rope[b,s]) * sm_scale for
  s < lengths[b]; out[b,h] = softmax(score[b,h]) @ kv_latent[b]. q_latent [B,H,Dc],
  q_rope [B,H,Dr], kv_latent [B,S,Dc], k_rope [B,S,Dr], lengths [B] -> [B,H,Dc] in q's dtype.
  A row with length 0 produces zeros.
  """
  del interpret
  checks.decode(q_latent, q_rope, kv_latent, k_rope, lengths)
  f32 = jnp.float32
  scores = jnp.einsum("bhc,bsc->bhs", q_latent, kv_latent, preferred_element_type=f32)
  scores += jnp.einsum("bhr,bsr->bhs", q_rope, k_rope, preferred_element_type=f32)
  scores *= sm_scale
  valid = jnp.arange(kv_latent.shape[1])[None, None, :] < lengths[:, None, None]
  scores = jnp.where(valid, scores, _NEG_INF)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  p = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("bhs,bsc->bhc", p.astype(kv_latent.dtype), kv_latent,
                   preferred_element_type=f32)
  return out.astype(q_latent.dtype)


def moe_route(logits, bias, *, top_k, n_group=1, topk_group=1, score_fn="sigmoid",
              norm_topk_prob=True, routed_scaling_factor=1.0, interpret=None):
  """DeepSeekMoE routing, exactly as transformers' DeepseekV3 / DeepseekV2 routers.

  logits [N,E] (cast to float32), bias [E] or None -> (weights [N,K] float32, experts [N,K]
  int32). score_fn "sigmoid" (V3 eqs. 15-16): s = sigmoid(logits); experts are chosen on
  s + bias; a group scores the sum of its top-2 biased scores. score_fn "softmax" (V2 eq. 11):
  s = softmax(logits); a group scores its max. Only the best `topk_group` of `n_group` groups
  keep their experts (V2 device/group-limited routing). Weights are gathered from the unbiased
  s, normalised over the chosen k when `norm_topk_prob` (+1e-20), then scaled.
  Ties are broken towards the lower index, as jax.lax.top_k does.
  """
  del interpret
  checks.route(logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
               score_fn=score_fn)
  n, e = logits.shape
  logits = logits.astype(jnp.float32)
  scores = jax.nn.sigmoid(logits) if score_fn == "sigmoid" else jax.nn.softmax(logits, axis=-1)
  choice = scores if bias is None else scores + bias.astype(jnp.float32)[None, :]
  if n_group > 1:
    grouped = choice.reshape(n, n_group, e // n_group)
    if score_fn == "sigmoid":
      group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)   # V3: sum of top-2
    else:
      group_scores = jnp.max(grouped, axis=-1)                         # V2: group max
    _, kept = jax.lax.top_k(group_scores, topk_group)
    group_mask = jnp.zeros((n, n_group), bool).at[jnp.arange(n)[:, None], kept].set(True)
    choice = jnp.where(group_mask[:, :, None], grouped, _NEG_INF).reshape(n, e)
  _, experts = jax.lax.top_k(choice, top_k)
  weights = jnp.take_along_axis(scores, experts, axis=-1)
  if norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return weights * routed_scaling_factor, experts.astype(jnp.int32)


def gmm(lhs, rhs, group_sizes, *, interpret=None):
  """Grouped matmul: rows of lhs [M,K], sorted by group, times rhs[g] [K,N] of their group.

  group_sizes [G] int32 with sum <= M; rows past the sum produce zeros. -> [M,N] in lhs's dtype,
  accumulated in float32.
  """
  del interpret
  checks.gmm(lhs, rhs, group_sizes)
  out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                           preferred_element_type=jnp.float32)
  return out.astype(lhs.dtype)


def tgmm(lhs, grad, group_sizes, *, interpret=None):
  """Transposed grouped matmul, the weight gradient of `gmm`: out[g] = lhs_g^T grad_g.

  lhs [M,K], grad [M,N], group_sizes [G] -> [G,K,N] float32; empty groups give zeros.
  """
  del interpret
  checks.tgmm(lhs, grad, group_sizes)
  m = lhs.shape[0]
  g = group_sizes.shape[0]
  ends = jnp.cumsum(group_sizes)
  group_of_row = jnp.searchsorted(ends, jnp.arange(m), side="right")       # G for pad rows
  one_hot = (group_of_row[:, None] == jnp.arange(g)[None, :]).astype(jnp.float32)
  return jnp.einsum("mg,mk,mn->gkn", one_hot, lhs.astype(jnp.float32),
                    grad.astype(jnp.float32))


def sparse_mqa_attention(q, kv, indices, *, d_v, sm_scale, sink=None, interpret=None):
  """Top-k sparse attention with one shared KV head (DSA's MQA form, V3.2 §2; V4's CSA/HCA).

  q [B,T,H,D], kv [B,S,D]: keys are kv, values kv[..., :d_v]. indices [B,T,K] int32 into S;
  -1 (or anything outside [0, S)) is an empty slot. For each query row,
  p = softmax over its valid slots of sm_scale * q . kv[idx], with the optional sink [H] joining
  the denominator as a logit whose value is zero (V4's attention sink):
  out = sum_k p_k kv[idx_k, :d_v] -> [B,T,H,d_v] in q's dtype. A row with no valid slot and no
  sink gives zeros. Gathers [B,T,K,D]: memory O(T K D), never O(T S).
  """
  del interpret
  checks.sparse_attention(q, kv, indices, d_v=d_v, sink=sink)
  s = kv.shape[1]
  valid = (indices >= 0) & (indices < s)                               # [B,T,K]
  rows = jax.vmap(lambda x, i: x[i])(kv, jnp.where(valid, indices, 0))  # [B,T,K,D]
  scores = jnp.einsum("bthd,btkd->bthk", q, rows, preferred_element_type=jnp.float32)
  scores = jnp.where(valid[:, :, None, :], scores * sm_scale, _NEG_INF)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  if sink is not None:
    sink = sink.astype(jnp.float32)[None, None, :, None]
    row_max = jnp.maximum(row_max, sink)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  p = jnp.exp(scores - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  if sink is not None:
    denom += jnp.exp(sink - row_max)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("bthk,btkd->bthd", p.astype(kv.dtype), rows[..., :d_v],
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def indexer_scores(q, k, w):
  """The lightning indexer's scores (V3.2 eq. 1): I[b,t,s] = sum_h w[b,t,h] relu(q[b,t,h] . k[b,s]),
  float32, [B,T,S]. One head at a time: memory [B,T,S], never [B,T,S,Hi]."""
  def head(scores, qw):
    q_h, w_h = qw
    dots = jnp.einsum("btd,bsd->bts", q_h, k, preferred_element_type=jnp.float32)
    return scores + jax.nn.relu(dots) * w_h.astype(jnp.float32)[..., None], None

  init = jnp.zeros(q.shape[:2] + k.shape[1:2], jnp.float32)
  scores, _ = jax.lax.scan(head, init, (jnp.moveaxis(q, 2, 0), jnp.moveaxis(w, 2, 0)))
  return scores


def lightning_indexer(q, k, w, *, top_k, q_positions, k_positions, q_segment_ids=None,
                      k_segment_ids=None, interpret=None):
  """The top_k keys of each query by indexer score, among the keys it can see.

  q [B,T,Hi,Di], k [B,S,Di], w [B,T,Hi] (scales folded in by the caller); key s is visible from
  query t iff k_positions[b,s] <= q_positions[b,t] (and, when given, q_segment_ids[b,t] ==
  k_segment_ids[b,s]: packed sequences). -> (indices [B,T,top_k] int32, scores
  [B,T,top_k] float32), highest score first, ties to the lower s, -1 and -inf past the visible
  keys. Differentiable in q, k and w through the selected scores (the indexer's KL loss).
  Materialises [B,T,S]: the dense stage's form, and the oracle of the kernel.
  """
  del interpret
  checks.indexer(q, k, w, top_k=top_k, q_positions=q_positions, k_positions=k_positions,
                 q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids)
  s = k.shape[1]
  visible = k_positions[:, None, :] <= q_positions[:, :, None]
  if q_segment_ids is not None:
    visible &= k_segment_ids[:, None, :] == q_segment_ids[:, :, None]
  scores = jnp.where(visible, indexer_scores(q, k, w), _NEG_INF)
  if top_k > s:
    scores = jnp.pad(scores, ((0, 0), (0, 0), (0, top_k - s)), constant_values=_NEG_INF)
  top, indices = jax.lax.top_k(scores, top_k)
  return jnp.where(top > _NEG_INF, indices, -1).astype(jnp.int32), top
