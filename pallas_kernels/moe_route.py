"""Fused DeepSeekMoE router (Pallas): scores, group-limited top-k, gather and normalise.

One kernel per block of tokens [block_n, E], the whole routing of DeepSeek-V3 §2.1.2:

  s_i  = sigmoid(u^T e_i)                                  (V3 eq. 15; V2 eq. 11: softmax)
  g'_i = s_i  if s_i + b_i in TopK({s_j + b_j}, K), else 0 (V3 eq. 13 with the eq. 16 bias)
  g_i  = g'_i / sum_j g'_j                                 (V3 eq. 12, when norm_topk_prob)
  out  = g_i * routed_scaling_factor

restricted to the best `topk_group` of `n_group` expert groups (group score: the sum of the
top-2 biased scores for sigmoid, as in transformers' DeepseekV3; the max for softmax, V2's
group-limited greedy). Top-k is k rounds of (max, lowest index attaining it, take it out),
so ties break towards the lower index exactly as jax.lax.top_k does. In interpret mode every
comparison runs on the same float32 values as the reference, so the chosen experts are
identical; compiled, the kernel's exp/sigmoid may differ from XLA's by an ulp, which can flip
a near-tie (none did on an H200: see RESULTS.md, 2026-11-28).

Differentiable in the logits (custom VJP): for the chosen experts, the weights are a smooth
function of the scores, so the backward pass differentiates that function in plain jnp.
"""

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import checks, platform
from pallas_kernels.platform import pltriton

_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of `moe_route`.

  block_n: tokens per program; a power of two on GPU, a multiple of 8 on TPU.
  num_warps, num_stages: Triton compiler parameters (GPU only).
  """
  block_n: int = 256
  num_warps: int = 4
  num_stages: int = 1

  @classmethod
  def get_default(cls, backend: str | None = None) -> "BlockSizes":
    backend = backend or platform.backend()
    if backend == "gpu":   # several [block_n, 256] float32 tiles live in registers
      return cls(block_n=8, num_warps=2)
    return cls()


def _load(ref, valid, masked_load):
  """ref[...] as float32 with invalid entries zeroed (tail rows, padded experts).

  Interpret mode pads out-of-bounds reads with NaN and TPU with garbage: select them away.
  Triton does not clip block reads at the array end: mask the load itself.
  """
  if masked_load:
    x = pltriton.load(ref, mask=valid, other=0)
  else:
    x = jnp.where(valid, ref[...], 0)
  return x.astype(jnp.float32)


def _argmax_lowest(x, candidates, cols):
  """Per row, the lowest column index among `candidates` where x is maximal (as float32)."""
  best = jnp.max(jnp.where(candidates, x, _NEG_INF), axis=1, keepdims=True)
  hit = candidates & (x == best)
  return best, jnp.min(jnp.where(hit, cols, float(x.shape[1])), axis=1, keepdims=True)


def _route_kernel(*refs, n, e, top_k, n_group, topk_group, score_fn, norm_topk_prob,
                  routed_scaling_factor, has_bias, masked_load):
  if has_bias:
    logits_ref, bias_ref, weights_ref, experts_ref = refs
  else:
    logits_ref, weights_ref, experts_ref = refs
  block_n, e_pad = logits_ref.shape
  rows = pl.program_id(0) * block_n + lax.broadcasted_iota(jnp.int32, (block_n, 1), 0)
  cols_i = lax.broadcasted_iota(jnp.int32, (1, e_pad), 1)
  cols = cols_i.astype(jnp.float32)   # indices as float32: float reductions lower everywhere
  real = cols_i < e                    # padded experts (GPU: E rounded up to a power of two)

  logits = _load(logits_ref, (rows < n) & real, masked_load)
  logits = jnp.where(real, logits, _NEG_INF)
  if score_fn == "sigmoid":                                     # V3 eq. 15
    scores = jax.nn.sigmoid(logits)
  else:                                                         # V2 eq. 11, as jax.nn.softmax
    unnormalized = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
    scores = unnormalized / jnp.sum(unnormalized, axis=1, keepdims=True)
  choice = scores
  if has_bias:                                                  # V3 eq. 16: choose on s + b
    choice = scores + _load(bias_ref, real, masked_load)
  choice = jnp.where(real, choice, _NEG_INF)

  if n_group > 1:   # keep the experts of the best topk_group groups only
    size = e // n_group
    members = [(cols_i >= g * size) & (cols_i < (g + 1) * size) for g in range(n_group)]
    group_scores = []
    for member in members:
      top1, first = _argmax_lowest(choice, member, cols)
      if score_fn == "sigmoid":   # sum of the group's top-2 (a repeated max counts twice)
        top2, _ = _argmax_lowest(choice, member & (cols != first), cols)
        group_scores.append(top1 + top2)
      else:                       # the group's max
        group_scores.append(top1)
    kept = [jnp.zeros((block_n, 1), jnp.bool_) for _ in range(n_group)]
    for _ in range(topk_group):   # top-k over groups, lowest group index on ties
      best = functools.reduce(jnp.maximum, [jnp.where(k, _NEG_INF, s)
                                            for k, s in zip(kept, group_scores)])
      found = jnp.zeros((block_n, 1), jnp.bool_)
      for g in range(n_group):
        pick = ~kept[g] & ~found & (group_scores[g] == best)
        kept[g] |= pick
        found |= pick
    keep = functools.reduce(jnp.logical_or, [k & m for k, m in zip(kept, members)])
    choice = jnp.where(keep, choice, _NEG_INF)

  # Top-k (V3 eq. 13): k rounds of max, lowest index attaining it, take it out.
  k_pad = weights_ref.shape[1]
  slot = lax.broadcasted_iota(jnp.int32, (1, k_pad), 1)
  taken = jnp.zeros((block_n, e_pad), jnp.bool_)
  weights = jnp.zeros((block_n, k_pad), jnp.float32)
  experts = jnp.zeros((block_n, k_pad), jnp.float32)
  for r in range(top_k):
    _, idx = _argmax_lowest(choice, ~taken, cols)
    hit = cols == idx
    weight = jnp.sum(jnp.where(hit, scores, 0.0), axis=1, keepdims=True)   # gather s_idx
    taken |= hit
    weights = jnp.where(slot == r, weight, weights)
    experts = jnp.where(slot == r, idx, experts)
  if norm_topk_prob:                                            # V3 eq. 12
    weights = weights / (jnp.sum(weights, axis=1, keepdims=True) + 1e-20)
  weights_ref[...] = weights * routed_scaling_factor
  experts_ref[...] = experts.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Routing:
  """The static arguments of one routing call."""
  top_k: int
  n_group: int
  topk_group: int
  score_fn: str
  norm_topk_prob: bool
  routed_scaling_factor: float
  interpret: platform.Interpret
  block_sizes: BlockSizes | None


def moe_route(logits, bias, *, top_k, n_group=1, topk_group=1, score_fn="sigmoid",
              norm_topk_prob=True, routed_scaling_factor=1.0, interpret=None,
              block_sizes: BlockSizes | None = None):
  """DeepSeekMoE routing; the semantics of `pallas_kernels.reference.moe_route`.

  logits [N,E], bias [E] or None -> (weights [N,K] float32, experts [N,K] int32). Gradients
  flow to the logits through the weights; the bias only selects and gets none.
  """
  checks.route(logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
               score_fn=score_fn)
  routing = _Routing(top_k, n_group, topk_group, score_fn, norm_topk_prob,
                     float(routed_scaling_factor), interpret, block_sizes)
  return _route(routing, logits, bias)


def _gate_values(routing: _Routing, logits, experts):
  """The weights as a function of the logits for a fixed choice of experts (V3 eqs. 12-13)."""
  logits = logits.astype(jnp.float32)
  scores = jax.nn.sigmoid(logits) if routing.score_fn == "sigmoid" else \
      jax.nn.softmax(logits, axis=-1)
  weights = jnp.take_along_axis(scores, experts, axis=-1)
  if routing.norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return weights * routing.routed_scaling_factor


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _route(routing: _Routing, logits, bias):
  return _route_pallas(routing, logits, bias)


def _route_fwd(routing, logits, bias):
  weights, experts = _route_pallas(routing, logits, bias)
  return (weights, experts), (logits, experts, bias)


def _route_bwd(routing, residuals, cotangents):
  logits, experts, bias = residuals
  d_weights, _ = cotangents
  _, vjp = jax.vjp(lambda x: _gate_values(routing, x, experts), logits)
  d_bias = None if bias is None else jnp.zeros_like(bias)
  return vjp(d_weights)[0], d_bias


_route.defvjp(_route_fwd, _route_bwd)


def _route_pallas(routing: _Routing, logits, bias):
  top_k, n_group, topk_group = routing.top_k, routing.n_group, routing.topk_group
  score_fn, norm_topk_prob = routing.score_fn, routing.norm_topk_prob
  routed_scaling_factor, block_sizes = routing.routed_scaling_factor, routing.block_sizes
  n, e = logits.shape
  interpret = platform.resolve_interpret(routing.interpret)
  backend = platform.target(interpret)
  bs = block_sizes or BlockSizes.get_default(backend)

  # Triton needs power-of-two blocks: round E up (masked in the kernel) and K up (sliced off).
  e_pad = pl.next_power_of_2(e) if backend == "gpu" else e
  k_pad = pl.next_power_of_2(top_k)
  grid = pl.cdiv(n, bs.block_n)
  n_pad = grid * bs.block_n   # whole output blocks: Triton would store past the end otherwise

  operands = [logits]
  in_specs = [pl.BlockSpec((bs.block_n, e_pad), lambda i: (i, 0))]
  if bias is not None:
    operands.append(bias.astype(jnp.float32).reshape(1, e))
    in_specs.append(pl.BlockSpec((1, e_pad), lambda i: (0, 0)))
  # A fresh partial per call: a kernel reused across grids may keep a stale num_programs.
  kernel = functools.partial(
      _route_kernel, n=n, e=e, top_k=top_k, n_group=n_group, topk_group=topk_group,
      score_fn=score_fn, norm_topk_prob=norm_topk_prob,
      routed_scaling_factor=routed_scaling_factor, has_bias=bias is not None,
      masked_load=backend == "gpu")
  weights, experts = pl.pallas_call(
      kernel,
      grid=(grid,),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((bs.block_n, k_pad), lambda i: (i, 0))] * 2,
      out_shape=[jax.ShapeDtypeStruct((n_pad, k_pad), jnp.float32),
                 jax.ShapeDtypeStruct((n_pad, k_pad), jnp.int32)],
      compiler_params=platform.compiler_params(interpret, ("parallel",), num_warps=bs.num_warps,
                                              num_stages=bs.num_stages),
      interpret=interpret,
      name="moe_route",
  )(*operands)
  return weights[:n, :top_k], experts[:n, :top_k]
