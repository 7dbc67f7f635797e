"""The operand contracts of the kernels, checked on shapes before anything is traced.

A kernel and its reference call the same check, so both reject bad input with one
`ValueError` that names the kernel, the operand and the shapes. A mismatched operand would
otherwise compute silently wrong numbers (Pallas reads blocks by the shapes it is given) or
fail deep inside a trace, and integer activations would come out as integer garbage. Only
static properties are checked. Values (lengths, group sizes) follow each kernel's documented
clamping. Floating operands may mix dtypes: the products run in their promoted dtype and the
output takes the first operand's (tgmm's is always float32).
"""

import jax.numpy as jnp


def _fail(kernel: str, problem: str):
  raise ValueError(f"{kernel}: {problem}")


def _ranks(kernel: str, **operands) -> None:
  """Each operand (array, expected layout such as "[B,T,H,D]") has that layout's rank."""
  for name, (x, layout) in operands.items():
    if x.ndim != layout.count(",") + 1:
      _fail(kernel, f"{name} must be {layout}; got shape {tuple(x.shape)}")


def _integer(kernel: str, name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.integer):
    _fail(kernel, f"{name} must be integers; got {x.dtype}")


def _floating(kernel: str, **operands) -> None:
  for name, x in operands.items():
    if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
      _fail(kernel, f"{name} must be floating point; got {x.dtype}")


def attention(q, k, v, segment_ids) -> None:
  """q [B,T,H,Dqk], k [B,S,H,Dqk], v [B,S,H,Dv], segment_ids None or [B,T] integers (T == S);
  T and S at least 1."""
  kernel = "mla_attention"
  _ranks(kernel, q=(q, "[B,T,H,Dqk]"), k=(k, "[B,S,H,Dqk]"), v=(v, "[B,S,H,Dv]"))
  _floating(kernel, q=q, k=k, v=v)
  b, t, h, d_qk = q.shape
  s = k.shape[1]
  if k.shape != (b, s, h, d_qk) or v.shape[:3] != (b, s, h):
    _fail(kernel, f"expected k [B,S,H,Dqk] and v [B,S,H,Dv] for q {q.shape}; got "
                  f"{k.shape} and {v.shape}")
  if t == 0 or s == 0:
    _fail(kernel, f"needs at least one query and one key; got T={t}, S={s}")
  if segment_ids is not None:
    if t != s:
      _fail(kernel, f"segment_ids need T == S (self-attention); got T={t}, S={s}")
    if segment_ids.shape != (b, t):
      _fail(kernel, f"segment_ids must be [B,T] = {(b, t)}; got {segment_ids.shape}")
    _integer(kernel, "segment_ids", segment_ids)


def decode(q_latent, q_rope, kv_latent, k_rope, lengths) -> None:
  """q_latent [B,H,Dc], q_rope [B,H,Dr], kv_latent [B,S,Dc], k_rope [B,S,Dr] with S >= 1,
  lengths [B] integers."""
  kernel = "mla_decode"
  _ranks(kernel, q_latent=(q_latent, "[B,H,Dc]"), q_rope=(q_rope, "[B,H,Dr]"),
         kv_latent=(kv_latent, "[B,S,Dc]"), k_rope=(k_rope, "[B,S,Dr]"),
         lengths=(lengths, "[B]"))
  b, h, dc = q_latent.shape
  s, dr = kv_latent.shape[1], q_rope.shape[2]
  want = {"q_rope": (q_rope, (b, h, dr)), "kv_latent": (kv_latent, (b, s, dc)),
          "k_rope": (k_rope, (b, s, dr)), "lengths": (lengths, (b,))}
  bad = [f"{name} must be {shape}, got {tuple(x.shape)}"
         for name, (x, shape) in want.items() if tuple(x.shape) != shape]
  if bad:
    _fail(kernel, f"for q_latent {q_latent.shape} and q_rope {q_rope.shape} (B={b}, H={h}, "
                  f"Dc={dc}, Dr={dr}): " + "; ".join(bad))
  if s == 0:
    _fail(kernel, f"needs a cache of at least one entry; kv_latent is {kv_latent.shape}")
  _floating(kernel, q_latent=q_latent, q_rope=q_rope, kv_latent=kv_latent, k_rope=k_rope)
  _integer(kernel, "lengths", lengths)


def route(logits, bias, *, top_k: int, n_group: int, topk_group: int, score_fn: str) -> None:
  """logits [N,E], bias None or [E]; E splits into n_group groups, topk_group of which hold
  at least top_k experts; V3's sigmoid groups score their top two, so hold two or more."""
  kernel = "moe_route"
  if score_fn not in ("sigmoid", "softmax"):
    _fail(kernel, f"score_fn must be 'sigmoid' or 'softmax', got {score_fn!r}")
  _ranks(kernel, logits=(logits, "[N,E]"))
  _floating(kernel, logits=logits, bias=bias)
  e = logits.shape[1]
  if bias is not None and bias.shape != (e,):
    _fail(kernel, f"bias must be [E] = ({e},) for logits {logits.shape}; got {bias.shape}")
  if n_group < 1 or e % n_group:
    _fail(kernel, f"{e} experts do not split into {n_group} groups")
  if not 1 <= topk_group <= n_group:
    _fail(kernel, f"topk_group must be in [1, n_group={n_group}]; got {topk_group}")
  per_group = e // n_group
  if n_group > 1 and score_fn == "sigmoid" and per_group < 2:
    _fail(kernel, f"sigmoid routing scores a group by its top two experts; {n_group} groups "
                  f"of {e} experts hold {per_group}")
  if not 1 <= top_k <= per_group * topk_group:
    _fail(kernel, f"top_k must be in [1, {per_group * topk_group}] (the experts of "
                  f"{topk_group} kept groups of {per_group}); got {top_k}")


def gmm(lhs, rhs, group_sizes) -> None:
  """lhs [M,K], rhs [G,K,N], group_sizes [G] integers."""
  kernel = "gmm"
  _ranks(kernel, lhs=(lhs, "[M,K]"), rhs=(rhs, "[G,K,N]"), group_sizes=(group_sizes, "[G]"))
  if rhs.shape[1] != lhs.shape[1] or group_sizes.shape != rhs.shape[:1]:
    _fail(kernel, f"expected rhs [G,K={lhs.shape[1]},N] and group_sizes [G] for lhs "
                  f"{lhs.shape}; got rhs {rhs.shape} and group_sizes {group_sizes.shape}")
  _floating(kernel, lhs=lhs, rhs=rhs)
  _integer(kernel, "group_sizes", group_sizes)


def tgmm(lhs, grad, group_sizes) -> None:
  """lhs [M,K], grad [M,N], group_sizes [G] integers."""
  kernel = "tgmm"
  _ranks(kernel, lhs=(lhs, "[M,K]"), grad=(grad, "[M,N]"), group_sizes=(group_sizes, "[G]"))
  if grad.shape[0] != lhs.shape[0]:
    _fail(kernel, f"grad must be [M={lhs.shape[0]},N] like lhs {lhs.shape}; got {grad.shape}")
  _floating(kernel, lhs=lhs, grad=grad)
  _integer(kernel, "group_sizes", group_sizes)


def sparse_attention(q, kv, indices, *, d_v: int, sink) -> None:
  """q [B,T,H,D], kv [B,S,D] with S >= 1, indices [B,T,K] int32, 1 <= d_v <= D, sink None or
  [H] floating."""
  kernel = "sparse_mqa_attention"
  _ranks(kernel, q=(q, "[B,T,H,D]"), kv=(kv, "[B,S,D]"), indices=(indices, "[B,T,K]"))
  _floating(kernel, q=q, kv=kv, sink=sink)
  b, t, h, d = q.shape
  if kv.shape[0] != b or kv.shape[2] != d:
    _fail(kernel, f"kv must be [B={b},S,D={d}] for q {q.shape}; got {kv.shape}")
  if kv.shape[1] == 0:
    _fail(kernel, f"needs at least one key; kv is {kv.shape}")
  if indices.shape[:2] != (b, t):
    _fail(kernel, f"indices must be [B={b},T={t},K] for q {q.shape}; got {indices.shape}")
  if indices.dtype != jnp.int32:
    _fail(kernel, f"indices must be int32; got {indices.dtype}")
  if not 1 <= d_v <= d:
    _fail(kernel, f"d_v must be in [1, D={d}] (values are kv[..., :d_v]); got {d_v}")
  if sink is not None and sink.shape != (h,):
    _fail(kernel, f"sink must be [H] = ({h},) for q {q.shape}; got {sink.shape}")


def indexer(q, k, w, *, top_k: int, q_positions, k_positions, q_segment_ids=None,
            k_segment_ids=None) -> None:
  """q [B,T,Hi,Di], k [B,S,Di], w [B,T,Hi], q_positions [B,T] and k_positions [B,S] integers,
  segment ids like the positions (both or neither), top_k >= 1."""
  kernel = "lightning_indexer"
  _ranks(kernel, q=(q, "[B,T,Hi,Di]"), k=(k, "[B,S,Di]"), w=(w, "[B,T,Hi]"),
         q_positions=(q_positions, "[B,T]"), k_positions=(k_positions, "[B,S]"))
  _floating(kernel, q=q, k=k, w=w)
  b, t, hi, di = q.shape
  s = k.shape[1]
  want = {"k": (k, (b, s, di)), "w": (w, (b, t, hi)), "q_positions": (q_positions, (b, t)),
          "k_positions": (k_positions, (b, s))}
  if (q_segment_ids is None) != (k_segment_ids is None):
    _fail(kernel, "q_segment_ids and k_segment_ids come together (both or neither)")
  if q_segment_ids is not None:
    want.update(q_segment_ids=(q_segment_ids, (b, t)), k_segment_ids=(k_segment_ids, (b, s)))
  bad = [f"{name} must be {shape}, got {tuple(x.shape)}"
         for name, (x, shape) in want.items() if tuple(x.shape) != shape]
  if bad:
    _fail(kernel, f"for q {q.shape} and k {k.shape} (B={b}, T={t}, Hi={hi}, Di={di}, S={s}): "
                  + "; ".join(bad))
  if s == 0:
    _fail(kernel, f"needs at least one key; k is {k.shape}")
  for name, x in (("q_positions", q_positions), ("k_positions", k_positions),
                  ("q_segment_ids", q_segment_ids), ("k_segment_ids", k_segment_ids)):
    if x is not None:
      _integer(kernel, name, x)
  if not isinstance(top_k, int) or top_k < 1:
    _fail(kernel, f"top_k must be a positive int; got {top_k!r}")
