"""Bad operands are refused by every kernel and its reference alike, with a ValueError that
names the kernel and the operand, before anything is traced. Without the checks, several of
these computed silently wrong numbers (a decode cache narrower than the query, gmm weights
with the wrong K, fewer group sizes than groups), returned integer garbage for integer
activations, or failed deep inside a trace."""

import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from pallas_kernels import reference

B, T, H, S = 2, 16, 2, 32
Q, K, V = jnp.zeros((B, T, H, 192)), jnp.zeros((B, T, H, 192)), jnp.zeros((B, T, H, 128))
QL, QR = jnp.zeros((B, H, 512)), jnp.zeros((B, H, 64))
KV, KR = jnp.zeros((B, S, 512)), jnp.zeros((B, S, 64))
LENGTHS = jnp.array([3, 5], jnp.int32)
LOGITS = jnp.zeros((4, 8))
LHS, RHS, SIZES = jnp.zeros((10, 16)), jnp.zeros((3, 16, 8)), jnp.array([3, 3, 4], jnp.int32)
SQ, SKV, SIDX = jnp.zeros((B, T, H, 48)), jnp.zeros((B, S, 48)), jnp.zeros((B, T, 4), jnp.int32)
IQ, IK, IW = jnp.zeros((B, T, H, 16)), jnp.zeros((B, S, 16)), jnp.zeros((B, T, H))
QPOS = jnp.zeros((B, T), jnp.int32)
KPOS = jnp.zeros((B, S), jnp.int32)


def attention(k=K, v=V, q=Q, segment_ids=None):
  return dict(q=q, k=k, v=v, segment_ids=segment_ids)


def decode(q_latent=QL, q_rope=QR, kv_latent=KV, k_rope=KR, lengths=LENGTHS):
  return dict(q_latent=q_latent, q_rope=q_rope, kv_latent=kv_latent, k_rope=k_rope,
              lengths=lengths, sm_scale=1.0)


def route(bias=None, top_k=2, n_group=1, topk_group=1, score_fn="sigmoid", logits=LOGITS):
  return dict(logits=logits, bias=bias, top_k=top_k, n_group=n_group,
              topk_group=topk_group, score_fn=score_fn)


def sparse(q=SQ, kv=SKV, indices=SIDX, d_v=32, sink=None):
  return dict(q=q, kv=kv, indices=indices, d_v=d_v, sm_scale=1.0, sink=sink)


def indexer(q=IQ, k=IK, w=IW, top_k=4, q_positions=QPOS, k_positions=KPOS):
  return dict(q=q, k=k, w=w, top_k=top_k, q_positions=q_positions, k_positions=k_positions)


CASES = [
    ("mla_attention", attention(k=K[..., :128]), r"mla_attention: expected k \[B,S,H,Dqk\]"),
    ("mla_attention", attention(k=K[:, :, :1], v=V[:, :, :1]), r"mla_attention: expected k"),
    ("mla_attention", attention(v=V[:, :8]), r"mla_attention: expected k .* \(2, 8, 2, 128\)"),
    ("mla_attention", attention(q=Q[0]), r"mla_attention: q must be \[B,T,H,Dqk\]"),
    ("mla_attention", attention(segment_ids=jnp.zeros((B, 8), jnp.int32)),
     r"segment_ids must be \[B,T\] = \(2, 16\); got \(2, 8\)"),
    ("mla_attention", attention(segment_ids=jnp.zeros((B, T))), "segment_ids must be integers"),
    ("mla_attention", attention(k=K.astype(jnp.int32)), "k must be floating point; got int32"),
    ("mla_decode", decode(kv_latent=KV[..., :256]),
     r"mla_decode: .*kv_latent must be \(2, 32, 512\), got \(2, 32, 256\)"),
    ("mla_decode", decode(kv_latent=jnp.zeros((3, S, 512)), k_rope=jnp.zeros((3, S, 64))),
     r"kv_latent must be \(2, 32, 512\), got \(3, 32, 512\); k_rope must be"),
    ("mla_decode", decode(q_rope=QR[..., :32]), r"k_rope must be \(2, 32, 32\), got \(2, 32, 64\)"),
    ("mla_decode", decode(lengths=LENGTHS[:1]), r"lengths must be \(2,\), got \(1,\)"),
    ("mla_decode", decode(lengths=jnp.ones((B,))), "lengths must be integers"),
    ("mla_decode", decode(kv_latent=KV[None]), r"kv_latent must be \[B,S,Dc\]"),
    ("mla_decode", decode(q_rope=QR.astype(jnp.int8)), "q_rope must be floating point"),
    ("moe_route", route(bias=jnp.zeros((7,))), r"bias must be \[E\] = \(8,\) .* got \(7,\)"),
    ("moe_route", route(top_k=9), r"top_k must be in \[1, 8\]"),
    ("moe_route", route(top_k=5, n_group=4, topk_group=2), r"top_k must be in \[1, 4\]"),
    ("moe_route", route(n_group=2, topk_group=3), r"topk_group must be in \[1, n_group=2\]"),
    ("moe_route", route(n_group=8, topk_group=2), "scores a group by its top two experts"),
    ("moe_route", route(n_group=3), "8 experts do not split into 3 groups"),
    ("moe_route", route(score_fn="relu"), "score_fn must be 'sigmoid' or 'softmax'"),
    ("moe_route", route(logits=LOGITS[0]), r"logits must be \[N,E\]"),
    ("moe_route", route(bias=jnp.zeros((8,), jnp.int32)), "bias must be floating point"),
    ("gmm", dict(lhs=LHS, rhs=RHS[:, :8], group_sizes=SIZES), r"gmm: expected rhs \[G,K=16,N\]"),
    ("gmm", dict(lhs=LHS, rhs=RHS, group_sizes=SIZES[:2]), r"group_sizes \(2,\)"),
    ("gmm", dict(lhs=LHS, rhs=RHS, group_sizes=SIZES.astype(jnp.float32)),
     "group_sizes must be integers"),
    ("gmm", dict(lhs=LHS.astype(jnp.int32), rhs=RHS, group_sizes=SIZES),
     "gmm: lhs must be floating point; got int32"),
    ("tgmm", dict(lhs=LHS, grad=jnp.zeros((9, 8)), group_sizes=SIZES),
     r"tgmm: grad must be \[M=10,N\] .* got \(9, 8\)"),
    ("tgmm", dict(lhs=LHS, grad=jnp.zeros((10, 8)), group_sizes=SIZES[None]),
     r"group_sizes must be \[G\]"),
    ("tgmm", dict(lhs=LHS, grad=jnp.zeros((10, 8), jnp.int32), group_sizes=SIZES),
     "tgmm: grad must be floating point"),
    ("sparse_mqa_attention", sparse(indices=SIDX.astype(jnp.int16)),
     "indices must be int32; got int16"),
    ("sparse_mqa_attention", sparse(indices=SIDX.astype(jnp.float32)),
     "indices must be int32; got float32"),
    ("sparse_mqa_attention", sparse(indices=SIDX[:, :8]),
     r"indices must be \[B=2,T=16,K\] .* got \(2, 8, 4\)"),
    ("sparse_mqa_attention", sparse(indices=SIDX[0]), r"indices must be \[B,T,K\]"),
    ("sparse_mqa_attention", sparse(d_v=49), r"d_v must be in \[1, D=48\]"),
    ("sparse_mqa_attention", sparse(d_v=0), r"d_v must be in \[1, D=48\]"),
    ("sparse_mqa_attention", sparse(kv=SKV[..., :32]), r"kv must be \[B=2,S,D=48\]"),
    ("sparse_mqa_attention", sparse(kv=SKV[:, :0]), "needs at least one key"),
    ("sparse_mqa_attention", sparse(sink=jnp.zeros((3,))), r"sink must be \[H\] = \(2,\)"),
    ("sparse_mqa_attention", sparse(q=SQ.astype(jnp.int32)), "q must be floating point"),
    ("lightning_indexer", indexer(top_k=0), "top_k must be a positive int; got 0"),
    ("lightning_indexer", indexer(top_k=-3), "top_k must be a positive int"),
    ("lightning_indexer", indexer(q_positions=QPOS[:, :8]),
     r"q_positions must be \(2, 16\), got \(2, 8\)"),
    ("lightning_indexer", indexer(k_positions=KPOS[None]), r"k_positions must be \[B,S\]"),
    ("lightning_indexer", indexer(k_positions=KPOS.astype(jnp.float32)),
     "k_positions must be integers"),
    ("lightning_indexer", indexer() | dict(q_segment_ids=QPOS),
     "q_segment_ids and k_segment_ids come together"),
    ("lightning_indexer", indexer() | dict(q_segment_ids=QPOS, k_segment_ids=KPOS[:, :4]),
     r"k_segment_ids must be \(2, 32\), got \(2, 4\)"),
    ("lightning_indexer", indexer(w=IW[..., :1]), r"w must be \(2, 16, 2\), got \(2, 16, 1\)"),
    ("lightning_indexer", indexer(k=IK[..., :8]), r"k must be \(2, 32, 16\), got \(2, 32, 8\)"),
]


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("name, operands, message", CASES)
def test_bad_operands_are_refused_by_name(impl, name, operands, message):
  fn = getattr(pk if impl == "kernel" else reference, name)
  with pytest.raises(ValueError, match=message):
    fn(**operands)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_well_formed_operands_pass(impl):
  """The checks refuse only what is wrong: every base operand set above runs."""
  module = pk if impl == "kernel" else reference
  assert module.mla_attention(**attention()).shape == (B, T, H, 128)
  assert module.mla_decode(**decode()).shape == (B, H, 512)
  weights, experts = module.moe_route(**route(n_group=4, topk_group=2, top_k=3))
  assert weights.shape == experts.shape == (4, 3)
  assert module.gmm(LHS, RHS, SIZES).shape == (10, 8)
  assert module.tgmm(LHS, jnp.zeros((10, 8)), SIZES).shape == (3, 16, 8)
  assert module.sparse_mqa_attention(**sparse(sink=jnp.zeros((H,)))).shape == (B, T, H, 32)
  indices, scores = module.lightning_indexer(**indexer())
  assert indices.shape == scores.shape == (B, T, 4) and indices.dtype == jnp.int32
  # Floating dtypes may mix; the output takes the first operand's.
  assert module.gmm(LHS.astype(jnp.bfloat16), RHS, SIZES).dtype == jnp.bfloat16
  assert module.mla_attention(**attention(q=Q.astype(jnp.bfloat16))).dtype == jnp.bfloat16
