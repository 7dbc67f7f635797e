"""Kernel correctness (compiled, not interpreted) and throughput against XLA, cuDNN, roofline.

  python experiments/benchmarks/kernel_bench.py            # on a GPU: full shapes
  python experiments/benchmarks/kernel_bench.py --smoke    # CPU interpret mode, tiny shapes

Every ratio is measured in this run: the device's bf16 matmul rate and copy bandwidth first,
then each kernel against its pure-jnp reference under jit (XLA). On a GPU also against cuDNN
attention (jax.nn.dot_product_attention, where it accepts the shapes) and JAX's own Mosaic GPU
kernels (jax.experimental.pallas.ops.gpu: the FA3 attention and the ragged dots), which show
what a Mosaic GPU form of these kernels could reach. DeepSeek Sparse Attention (V3.2, V4-Flash):
the top-k attention against our dense attention over the same T, and the lightning indexer
against XLA's dense scores + top_k. Prints markdown tables.
Imports only jax and pallas_kernels (the GPU machine has no grain).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels import reference as ref
from pallas_kernels import tgmm
from pallas_kernels.gmm import BlockSizes as GmmBlockSizes
from pallas_kernels.lightning_indexer import BlockSizes as IndexerBlockSizes
from pallas_kernels.mla_attention import BlockSizes as AttentionBlockSizes
from pallas_kernels.mla_decode import BlockSizes as DecodeBlockSizes
from pallas_kernels.sparse_mqa_attention import BlockSizes as SparseBlockSizes

BF16 = jnp.bfloat16


def timed(fn, *args, iters: int, sample_seconds: float = 0.02) -> float:
  """Median wall seconds of a compiled call (after one warm-up) over `iters` samples. A
  sample times back-to-back calls lasting about `sample_seconds`, so that launch and sync
  latency does not count against sub-millisecond kernels."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  calls = max(1, round(sample_seconds / (time.perf_counter() - start)))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times)


def table(title: str, header: list[str], rows: list[list]) -> None:
  print(f"\n### {title}\n")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    print("| " + " | ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in row) + " |")
  sys.stdout.flush()


def max_rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# --- ceilings -----------------------------------------------------------------------------


def warm_up(fn, *args, seconds: float) -> None:
  """Calls fn for about `seconds`, so that a GPU has left its idle clock before timing."""
  end = time.perf_counter() + seconds
  while time.perf_counter() < end:
    jax.block_until_ready(fn(*args))


def ceilings(n: int, copy_mib: int, iters: int, warm_seconds: float) -> tuple[float, float]:
  a = jax.random.normal(jax.random.key(0), (n, n), BF16)
  matmul = jax.jit(lambda x, y: x @ y)
  warm_up(matmul, a, a, seconds=warm_seconds)
  t = timed(matmul, a, a, iters=5 * iters)
  flops = 2 * n**3 / t
  x = jnp.ones((copy_mib * 2**20 // 4,), jnp.float32)
  copy = jax.jit(lambda v: v * 1.0)
  t = timed(copy, x, iters=5 * iters)
  bandwidth = 2 * x.nbytes / t                       # read + write
  table("Measured ceilings", ["what", "value"],
        [[f"bf16 matmul {n}^3", f"{flops / 1e12:.1f} TFLOP/s"],
         [f"copy {copy_mib} MiB (read+write)", f"{bandwidth / 1e9:.0f} GB/s"]])
  return flops, bandwidth


# --- correctness --------------------------------------------------------------------------


def check_correctness(interpret: bool) -> list[list]:
  rows = []
  k = iter(jax.random.split(jax.random.key(1), 64))
  rnd = lambda shape, dtype=jnp.float32: jax.random.normal(next(k), shape, dtype)  # noqa: E731
  with jax.default_matmul_precision("highest"):
    for dtype, tol in ((jnp.float32, 2e-3), (BF16, 3e-2)):
      b, t, h = 2, 200, 4
      q, kk = rnd((b, t, h, 192), dtype), rnd((b, t, h, 192), dtype)
      v, ct = rnd((b, t, h, 128), dtype), rnd((b, t, h, 128), dtype)
      seg = jnp.asarray(np.repeat(np.arange(4), 50)[None].repeat(b, 0), jnp.int32)
      fn = functools.partial(pk.mla_attention, segment_ids=seg, interpret=interpret)
      out, vjp = jax.vjp(fn, q, kk, v)
      r_out, r_vjp = jax.vjp(functools.partial(ref.mla_attention, segment_ids=seg), q, kk, v)
      errs = [max_rel_err(out, r_out)] + [max_rel_err(a, c) for a, c in zip(vjp(ct), r_vjp(ct))]
      rows.append(["mla_attention fwd/dq/dk/dv", dtype.__name__, max(errs), max(errs) < tol])

      lat, rope = rnd((8, 16, 512), dtype), rnd((8, 16, 64), dtype)
      cache, krope = rnd((8, 1000, 512), dtype), rnd((8, 1000, 64), dtype)
      lengths = jnp.asarray([0, 1, 999, 1000, 517, 64, 300, 128], jnp.int32)
      got = pk.mla_decode(lat, rope, cache, krope, lengths, sm_scale=0.07, interpret=interpret)
      want = ref.mla_decode(lat, rope, cache, krope, lengths, sm_scale=0.07)
      err = max_rel_err(got, want)
      rows.append(["mla_decode", dtype.__name__, err, err < tol])

      m, kd, n, g = 1000, 256, 384, 8
      lhs, rhs = rnd((m, kd), dtype), rnd((g, kd, n), dtype)
      sizes = jnp.asarray([0, 300, 1, 0, 250, 200, 99, 100], jnp.int32)
      out, vjp = jax.vjp(lambda a, w: pk.gmm(a, w, sizes, interpret=interpret), lhs, rhs)
      r_out, r_vjp = jax.vjp(lambda a, w: ref.gmm(a, w, sizes), lhs, rhs)
      ct = rnd((m, n), dtype)
      errs = [max_rel_err(out, r_out)] + [max_rel_err(a, c) for a, c in zip(vjp(ct), r_vjp(ct))]
      rows.append(["gmm fwd/dlhs/drhs", dtype.__name__, max(errs), max(errs) < tol])

      # Sparse attention: keys in pieces 64 | 16 (d_v 64 of 80), a window, empty slots, a sink.
      b, t, h = 2, 96, 4
      q, kv, sink = rnd((b, t, h, 80), dtype), rnd((b, t, 80), dtype), rnd((h,))
      idx, ct = sparse_indices(next(k), b, t, 40, window=8), rnd((b, t, h, 64), dtype)
      sparse = lambda f: lambda q, kv, sink: f(q, kv, idx, d_v=64, sm_scale=0.1, sink=sink)
      out, vjp = jax.vjp(sparse(functools.partial(pk.sparse_mqa_attention,
                                                  interpret=interpret)), q, kv, sink)
      r_out, r_vjp = jax.vjp(sparse(ref.sparse_mqa_attention), q, kv, sink)
      errs = [max_rel_err(out, r_out)] + [max_rel_err(a, c) for a, c in zip(vjp(ct), r_vjp(ct))]
      rows.append(["sparse_mqa_attention fwd/dq/dkv/dsink", dtype.__name__, max(errs),
                   max(errs) < tol])

      # Indexer: causal, top_k past the first queries' visible keys (-1 / -inf there).
      q, kk, w = rnd((b, t, 4, 32), dtype), rnd((b, t, 32), dtype), rnd((b, t, 4), dtype)
      pos = jnp.broadcast_to(jnp.arange(t), (b, t))
      indexer = lambda f: lambda q, kk, w: f(q, kk, w, top_k=24, q_positions=pos,
                                             k_positions=pos)[::-1]   # indices as aux
      (scores, vjp, got), (r_scores, r_vjp, want) = (
          jax.vjp(indexer(f), q, kk, w, has_aux=True)
          for f in (functools.partial(pk.lightning_indexer, interpret=interpret),
                    ref.lightning_indexer))
      ct = jnp.where(want >= 0, rnd((b, t, 24)), 0.0)
      finite = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)
      errs = [max_rel_err(finite(scores), finite(r_scores))]
      errs += [max_rel_err(a, c) for a, c in zip(vjp(ct), r_vjp(ct))]
      same = bool(jnp.all(got == want))
      rows.append(["lightning_indexer indices/scores/dq/dk/dw", dtype.__name__, max(errs),
                   same and max(errs) < tol])

    logits = rnd((4096, 256))
    bias = 0.1 * rnd((256,))
    kw = dict(top_k=8, n_group=8, topk_group=4, score_fn="sigmoid", routed_scaling_factor=2.5)
    w, e = pk.moe_route(logits, bias, interpret=interpret, **kw)
    rw, re = ref.moe_route(logits, bias, **kw)
    same = bool(jnp.all(jnp.sort(e, -1) == jnp.sort(re, -1)))
    err = max_rel_err(jnp.sort(w, -1), jnp.sort(rw, -1))
    rows.append(["moe_route (V3 256e, 8 groups)", "float32", err, same and err < 1e-5])
  table("Correctness against the pure-jnp references" + (" (interpret)" if interpret else ""),
        ["kernel", "dtype", "max rel err", "ok"], rows)
  return rows


# --- throughput ---------------------------------------------------------------------------


_DQK, _DV = 192, 128


def _attention_operands(b, t, h):
  """(q, k, v), the output cotangent, and the causal model FLOPs (FlashAttention-2's count)
  of (forward, forward + backward). Forward: s = q k^T (Dqk) and p v (Dv) per visible
  (query, key) pair. Backward: s recomputed, dv = p^T do and dp = do v^T (Dv), dq = ds k and
  dk = ds^T q (Dqk): 3 Dqk + 2 Dv, 2.6x the forward at 192 / 128 (2.5x at Dqk = Dv). Our
  split dq / dk-dv backward recomputes s and dp twice and is not credited for it."""
  keys = jax.random.split(jax.random.key(2), 4)
  q, kk = (jax.random.normal(x, (b, t, h, _DQK), BF16) for x in keys[:2])
  v, ct = (jax.random.normal(x, (b, t, h, _DV), BF16) for x in keys[2:])
  pairs = 2 * b * h * t * (t + 1) / 2
  return (q, kk, v), ct, (pairs * (_DQK + _DV), pairs * (4 * _DQK + 3 * _DV))


def train_step(attn, argnums=(0, 1, 2)):
  """jit of (*inputs, ct) -> the gradients in `argnums` (default dq, dk, dv) of
  sum(attn(*inputs) * ct): the forward and the backward. ct is an argument: closed over, it
  became a constant that XLA spent minutes folding."""
  def loss(*args):
    *inputs, ct = args
    return jnp.sum(attn(*inputs).astype(jnp.float32) * ct)
  return jax.jit(jax.grad(loss, argnums=argnums))


def _pad_v(v):
  """cuDNN and JAX's Mosaic GPU example want Dv == Dqk: v zero-padded to 192."""
  return jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, _DQK - _DV)))


def _optional_module(path: str):
  """The module at `path`, or None (reported) where this JAX lacks it: JAX's own GPU kernels
  and its internal cuDNN call are reference points, not dependencies."""
  try:
    return importlib.import_module(path)
  except Exception as e:  # noqa: BLE001 -- a missing reference is reported, not fatal
    print(f"  {path} is not available: {e}")
    return None


_JAX_GPU_KERNELS = "jax.experimental.pallas.ops.gpu"


def _gpu_attention_candidates():
  """Attention implementations only a GPU runs: name -> (attn (q, k, v) -> [B,T,H,Dv],
  whether it has a backward to time)."""
  def cudnn(q, k, v):
    out = jax.nn.dot_product_attention(q, k, _pad_v(v), is_causal=True,
                                       implementation="cudnn", scale=_DQK**-0.5)
    return out[..., :_DV]
  candidates = {"cudnn (v padded to 192)": (cudnn, True)}
  # JAX's internal cuDNN call takes Dv != Dqk on Hopper with cuDNN >= 9.10
  cudnn_mla = _optional_module("jax._src.cudnn.fused_attention_stablehlo")
  if cudnn_mla is not None:
    candidates["cudnn (internal API, Dv 128)"] = (
        lambda q, k, v: cudnn_mla.dot_product_attention(
            q, k, v, scale=_DQK**-0.5, mask_type=cudnn_mla.MaskType.CAUSAL), True)
  fa3 = _optional_module(f"{_JAX_GPU_KERNELS}.attention_mgpu")
  if fa3 is not None:   # FlashAttention-3 on Mosaic GPU: float16 tiles, q pre-scaled, and
    # (as of JAX 0.10.2) no causal backward
    config = fa3.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2, causal=True)

    def fa3_forward(q, k, v):
      f16 = jnp.float16
      out = fa3.attention((q * _DQK**-0.5).astype(f16), k.astype(f16),
                          _pad_v(v).astype(f16), config)
      return out[..., :_DV].astype(q.dtype)
    candidates["JAX's Mosaic GPU FA3 example (float16, v padded to 192)"] = (fa3_forward, False)
  return candidates


def bench_attention(shapes, peak: float, iters: int, interpret: bool) -> None:
  """Forward and forward + backward of each implementation; the speed-up is pallas's. A
  table per shape, printed as soon as it is measured."""
  for b, t, h in shapes:
    rows = []
    args, ct, (flops_fwd, flops_step) = _attention_operands(b, t, h)
    candidates = {"pallas": (functools.partial(pk.mla_attention, interpret=interpret), True),
                  "xla": (ref.mla_attention, True)}
    if jax.default_backend() == "gpu":
      candidates |= _gpu_attention_candidates()
    pallas = None
    for name, (attn, has_backward) in candidates.items():   # pallas first: the speed-ups
      what = f"{name} at B={b} T={t} H={h}"
      fwd = _rate(flops_fwd, jax.jit(attn), args, iters, what + " fwd")
      step = (_rate(flops_step, train_step(attn), (*args, ct), iters, what + " fwd+bwd")
              if has_backward else None)
      pallas = pallas or (fwd, step)
      cells = _rate_cells(fwd, pallas[0], peak)
      cells += _rate_cells(step, pallas[1], peak) if has_backward else ["n/a", "-", "-"]
      rows.append([name] + cells)
    table(f"MLA attention, causal, Dqk {_DQK} / Dv {_DV}, bf16, B={b} T={t} H={h}",
          ["impl", "fwd TFLOP/s", "fwd of matmul peak", "pallas fwd speed-up",
           "fwd+bwd TFLOP/s", "fwd+bwd of matmul peak", "pallas fwd+bwd speed-up"], rows)


def _rate_cells(rate, pallas_rate, peak):
  """TFLOP/s, fraction of the matmul peak and pallas's speed-up, or 'failed'."""
  if rate is None:
    return ["failed", "-", "-"]
  return [rate / 1e12, rate / peak, (pallas_rate or float("nan")) / rate]


def _rate(work, fn, args, iters, what):
  """work / median seconds of fn(*args), or None (reported) if it does not compile or run."""
  try:
    return work / timed(fn, *args, iters=iters)
  except Exception as e:  # noqa: BLE001 -- report what does not run, keep benchmarking
    print(f"  {what} failed: {type(e).__name__}: {str(e)[:200]}")
    return None


_LATENT, _ROPE = 512, 64


def _decode_operands(b, s, h):
  keys = jax.random.split(jax.random.key(3), 4)
  lat = jax.random.normal(keys[0], (b, h, _LATENT), BF16)
  rope = jax.random.normal(keys[1], (b, h, _ROPE), BF16)
  cache = jax.random.normal(keys[2], (b, s, _LATENT), BF16)
  krope = jax.random.normal(keys[3], (b, s, _ROPE), BF16)
  lengths = jnp.full((b,), s, jnp.int32)
  return (lat, rope, cache, krope, lengths), cache.nbytes + krope.nbytes


def decode_roofline(b: int, s: int, h: int, peak: float, bandwidth: float) -> tuple[float, str]:
  """(attainable cache GB/s, bound) of a full-cache decode: every head scores each entry
  against latent + rope (2 (Dc + Dr) FLOPs) and sums the latent (2 Dc), while the cache is
  read once (2 (Dc + Dr) bytes in bf16). Its arithmetic intensity grows with the heads: past
  the device's ridge (peak / bandwidth) decode is compute-bound and cannot stream the cache
  at the copy bandwidth."""
  cache_bytes = b * s * (_LATENT + _ROPE) * 2
  flops = 2 * b * s * h * (2 * _LATENT + _ROPE)
  seconds = max(cache_bytes / bandwidth, flops / peak)
  bound = "compute" if flops / peak > cache_bytes / bandwidth else "memory"
  return cache_bytes / seconds, f"{bound}-bound at {flops / cache_bytes:.0f} FLOP/B"


def bench_decode(shapes, peak: float, bandwidth: float, iters: int, interpret: bool) -> None:
  rows = []
  for b, s, h in shapes:
    args, nbytes = _decode_operands(b, s, h)
    attainable, bound = decode_roofline(b, s, h, peak, bandwidth)
    for name, fn in (("pallas", functools.partial(pk.mla_decode, interpret=interpret)),
                     ("xla", ref.mla_decode)):
      rate = _rate(nbytes, jax.jit(functools.partial(fn, sm_scale=0.07)), args, iters,
                   f"{name} at B={b} S={s} H={h}")
      if rate is not None:
        rows.append([f"B={b} S={s} H={h}", name, rate / 1e9, rate / bandwidth,
                     bound, attainable / 1e9, rate / attainable])
  table(f"MLA absorbed decode (latent {_LATENT} + rope {_ROPE}), bf16; the roofline is "
        f"min(copy bandwidth, matmul peak / FLOP per cache byte), ridge "
        f"{peak / bandwidth:.0f} FLOP/B",
        ["shape", "impl", "GB/s", "of copy bandwidth", "bound", "roofline GB/s",
         "of roofline"], rows)


def _gmm_operands(m, kd, n, g):
  keys = jax.random.split(jax.random.key(4), 3)
  lhs = jax.random.normal(keys[0], (m, kd), BF16)
  rhs = jax.random.normal(keys[1], (g, kd, n), BF16)
  grad = jax.random.normal(keys[2], (m, n), BF16)
  sizes = jnp.asarray(np.random.default_rng(0).multinomial(m, np.ones(g) / g), jnp.int32)
  return lhs, rhs, grad, sizes, 2 * m * kd * n


def gmm_rows_multiplied(group_sizes, block_m: int) -> tuple[int, int]:
  """Rows the gmm k loops multiply for these group sizes, as (tiles from each group's first
  row: the parallel GPU form; tiles aligned to block_m, straddling groups: the sequential TPU
  form). The routed rows are sum(group_sizes); the rest is masked work."""
  sizes = np.asarray(group_sizes, np.int64)
  ends = np.cumsum(sizes)
  starts = ends - sizes
  group_relative = int(np.sum(-(-sizes // block_m))) * block_m
  straddling = np.where(sizes > 0, (ends - 1) // block_m - starts // block_m + 1, 0)
  return group_relative, int(np.sum(straddling)) * block_m


def _gpu_gmm_candidates(lhs, rhs, grad, sizes):
  """JAX's Mosaic GPU ragged dots (gmm's and tgmm's products) at their example's tiling."""
  tiling = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
  cases = {}
  forward = _optional_module(f"{_JAX_GPU_KERNELS}.ragged_dot_mgpu")
  if forward is not None:
    cases["gmm: JAX's Mosaic GPU ragged_dot example"] = (
        jax.jit(lambda a, w, g: forward.ragged_dot(a, w, group_sizes=g, **tiling)),
        (lhs, rhs, sizes))
  transposed = _optional_module(f"{_JAX_GPU_KERNELS}.transposed_ragged_dot_mgpu")
  if transposed is not None:   # per group: lhs[rows]^T @ grad[rows], tgmm's product in bf16
    cases["tgmm: JAX's Mosaic GPU transposed_ragged_dot example (bf16 out)"] = (
        jax.jit(lambda a, d, g: transposed.transposed_ragged_dot(a, d, group_sizes=g,
                                                                 **tiling)),
        (lhs, grad, sizes))
  return cases


def bench_gmm(shapes, iters: int, interpret: bool) -> None:
  rows, work = [], []
  block_m = GmmBlockSizes.get_default("interpret" if interpret else None).block_m
  for m, kd, n, g in shapes:
    lhs, rhs, grad, sizes, flops = _gmm_operands(m, kd, n, g)
    work.append([f"M={m} K={kd} N={n} G={g}", block_m,
                 *(r / m for r in gmm_rows_multiplied(sizes, block_m))])
    dense = flops / timed(jax.jit(lambda a, w: a @ w), lhs, rhs[0], iters=iters)
    cases = {
        "gmm (pallas)": (jax.jit(functools.partial(pk.gmm, interpret=interpret)),
                         (lhs, rhs, sizes)),
        "tgmm (pallas, float32 out)": (jax.jit(functools.partial(tgmm, interpret=interpret)),
                          (lhs, grad, sizes)),
        "ragged_dot (xla)": (jax.jit(ref.gmm), (lhs, rhs, sizes)),
    }
    if jax.default_backend() == "gpu":
      cases |= _gpu_gmm_candidates(lhs, rhs, grad, sizes)
    for name, (fn, args) in cases.items():
      rate = _rate(flops, fn, args, iters, f"{name} at M={m} K={kd} N={n} G={g}")
      if rate is not None:
        rows.append([f"M={m} K={kd} N={n} G={g}", name, rate / 1e12, rate / dense])
    rows.append([f"M={m} K={kd} N={n} G={g}", "dense matmul, same FLOPs", dense / 1e12, 1.0])
  table("Grouped matmul, bf16", ["shape", "impl", "TFLOP/s", "of dense matmul"], rows)
  table("gmm rows multiplied per routed row (masked tiles included; TFLOP/s above count "
        "routed rows only)", ["shape", "block_m", "group-relative tiles (GPU form)",
                              "block_m-aligned tiles (TPU form)"], work)


# --- DeepSeek Sparse Attention: top-k attention and the lightning indexer ----------------


@dataclasses.dataclass(frozen=True)
class SparseModel:
  """A model's DSA shapes. Attention: H heads over one shared KV of width D (values: its first
  d_v), K slots per query (the `window` latest keys, then ones the indexer picked), a sink or
  not. Indexer: Hi heads of width Di, the top_k of S = T / compress key entries."""
  name: str
  h: int
  d: int
  d_v: int
  k: int
  window: int
  sink: bool
  hi: int
  di: int
  top_k: int
  compress: int

  @property
  def attention(self) -> str:
    return (f"{self.name} (H={self.h} D={self.d} d_v={self.d_v} K={self.k}"
            + (f", window {self.window}, sink)" if self.sink else ")"))

  @property
  def indexer(self) -> str:
    return f"{self.name} (Hi={self.hi} Di={self.di} top_k={self.top_k} S=T/{self.compress})"


SPARSE_MODELS = (SparseModel("V3.2", 128, 576, 512, 2048, 0, False, 64, 128, 2048, 1),
                 SparseModel("V4-Flash", 64, 512, 512, 640, 128, True, 64, 128, 512, 4))
SMOKE_SPARSE_MODELS = (SparseModel("V3.2", 4, 80, 64, 32, 0, False, 4, 32, 16, 1),
                       SparseModel("V4-Flash", 4, 64, 64, 24, 8, True, 4, 32, 8, 4))


def sparse_indices(key, b: int, t: int, k: int, window: int = 0) -> jax.Array:
  """[B,T,K] int32 slots of causal top-k attention over T keys: a query that sees at most K
  keys takes them all (-1 past them); a later one its `window` latest keys, then random
  earlier ones (repeats possible: for timing and checks, not a real selection)."""
  pos, slot = jnp.arange(t)[:, None], jnp.arange(k)[None, :]
  earlier = jax.random.randint(key, (b, t, k), 0, 2**30) % jnp.maximum(pos - window + 1, 1)
  latest = (slot < window) | (pos < k)
  return jnp.where(latest, jnp.maximum(pos - slot, -1), earlier).astype(jnp.int32)


def _fits(nbytes: float) -> bool:
  """Whether nbytes take at most 80% of the device's memory (the host's on a CPU)."""
  stats = jax.devices()[0].memory_stats()
  total = (stats["bytes_limit"] if stats else
           os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  return nbytes <= 0.8 * total


def _seconds(fn, args, iters, what):
  """Median seconds of fn(*args), or None (reported) if it does not compile or run."""
  rate = _rate(1.0, fn, args, iters, what)
  return 1 / rate if rate is not None else None


def _sparse_operands(b: int, t: int, m: SparseModel):
  """(q, kv, indices, sink), the output cotangent, and the model FLOPs of (forward,
  forward + backward) over K slots per query: forward 2 T H K (D + d_v); backward s
  recomputed, dp = do v^T (d_v), dq = ds k (D), per slot ds^T q (D) and p^T do (d_v), so
  2 T H K (4 D + 3 d_v) in all (2.5x the forward at 576 / 512)."""
  keys = jax.random.split(jax.random.key(5), 4)
  q = jax.random.normal(keys[0], (b, t, m.h, m.d), BF16)
  kv = jax.random.normal(keys[1], (b, t, m.d), BF16)
  ct = jax.random.normal(keys[2], (b, t, m.h, m.d_v), BF16)
  sink = jnp.zeros((m.h,), jnp.float32) if m.sink else None
  pairs = 2 * b * t * m.h * m.k
  return ((q, kv, sparse_indices(keys[3], b, t, m.k, m.window), sink), ct,
          (pairs * (m.d + m.d_v), pairs * (4 * m.d + 3 * m.d_v)))


# Dense attention at D = 512 / 576: the GPU defaults (64 x 64) overflow shared memory; these
# fit (ptxas, sm_90: forward and dq spill nothing, dk/dv 40 bytes).
_WIDE_HEAD_ATTENTION = AttentionBlockSizes(block_q=32, block_k=32, block_q_bwd=32,
                                           block_k_bwd=32, num_warps=8, num_stages=2)


def _dense_seconds(m: SparseModel, q, kv, ct, interpret) -> list:
  """Seconds of our dense causal attention (pk.mla_attention) over the same keys and head
  dims, kv broadcast to every head, forward and forward + backward, one sample each (calls
  of up to seconds); None where its operands and gradients (q, k, dq, dk of D; v, dv, out,
  ct of d_v; bf16) would not fit."""
  b, t = q.shape[:2]
  if not _fits(b * t * m.h * 8 * (m.d + m.d_v)):
    return [None, None]
  k = jnp.broadcast_to(kv[:, :, None], q.shape)
  v = jnp.broadcast_to(kv[:, :, None, :m.d_v], ct.shape)
  attn = functools.partial(pk.mla_attention, interpret=interpret, block_sizes=(
      _WIDE_HEAD_ATTENTION if jax.default_backend() == "gpu" else None))
  what = f"dense {m.name} at B={b} T={t}"
  return [_seconds(jax.jit(attn), (q, k, v), 1, what + " fwd"),
          _seconds(train_step(attn), (q, k, v, ct), 1, what + " fwd+bwd")]


def bench_sparse_attention(models, shapes, peak: float, iters: int, interpret: bool) -> None:
  """sparse_mqa_attention forward and forward + backward at each B x T (S = T) of each model,
  against dense causal attention over the same T. Skipped where they would not fit: the
  forward's q, output, cotangent and their pieces (about B T H (4 D + 6 d_v) bytes), the
  backward's dq and pieces as well (B T H (8 D + 6 d_v)) and one pass of per-slot rows
  (bwd_chunk H / block_h K D float32)."""
  blocks = SparseBlockSizes.get_default("interpret" if interpret else None)
  rows = []
  for m in models:
    for b, t in shapes:
      args, ct, (flops_fwd, flops_step) = _sparse_operands(b, t, m)
      attn = lambda q, kv, idx, sink, m=m: pk.sparse_mqa_attention(
          q, kv, idx, d_v=m.d_v, sm_scale=m.d**-0.5, sink=sink, interpret=interpret)
      what = f"sparse {m.name} at B={b} T={t}"
      fwd = (_rate(flops_fwd, jax.jit(attn), args, iters, what + " fwd")
             if _fits(b * t * m.h * (4 * m.d + 6 * m.d_v)) else None)
      h_pad, block_h = blocks.head_tiling(m.h)
      step_bytes = (b * t * m.h * (8 * m.d + 6 * m.d_v)
                    + min(blocks.bwd_chunk, t) * h_pad // block_h * m.k * m.d * 4)
      step = (_rate(flops_step, train_step(attn, argnums=(0, 1, 3) if m.sink else (0, 1)),
                    (*args, ct), iters, what + " fwd+bwd") if _fits(step_bytes) else None)
      dense = _dense_seconds(m, args[0], args[1], ct, interpret)
      cells = []
      for rate, work, dense_seconds in ((fwd, flops_fwd, dense[0]), (step, flops_step, dense[1])):
        if rate is None:
          cells += ["-", "-", "-", "-"]
        else:
          cells += [work / rate * 1e3, rate / 1e12, rate / peak,
                    dense_seconds * rate / work if dense_seconds else "-"]
      verdict = ", ".join(
          f"{name} " + ("not run" if rate is None else "met" if rate / peak >= target else "unmet")
          for name, rate, target in (("fwd", fwd, 0.35), ("fwd+bwd", step, 0.25)))
      rows.append([m.attention, f"B={b} T={t}"] + cells + [verdict])
  table("DeepSeek Sparse Attention (sparse_mqa_attention), bf16, S = T, dense: pk.mla_attention "
        "causal over the same T and head dims; targets: forward >= 35%, forward + backward >= "
        "25% of the matmul peak",
        ["model", "shape", "fwd ms", "fwd TFLOP/s", "fwd of matmul peak", "dense / sparse fwd",
         "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd of matmul peak", "dense / sparse fwd+bwd",
         "verdict"], rows)


def _indexer_operands(b: int, t: int, m: SparseModel):
  """(q, k, w, q_positions, k_positions): S = T / compress entries, entry j visible once its
  last token, compress (j + 1) - 1, is."""
  s = t // m.compress
  keys = jax.random.split(jax.random.key(6), 3)
  q = jax.random.normal(keys[0], (b, t, m.hi, m.di), BF16)
  k = jax.random.normal(keys[1], (b, s, m.di), BF16)
  w = jax.random.normal(keys[2], (b, t, m.hi), BF16)
  q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  k_pos = jnp.broadcast_to(m.compress * jnp.arange(1, s + 1, dtype=jnp.int32) - 1, (b, s))
  return q, k, w, q_pos, k_pos


def bench_indexer(models, shapes, iters: int, interpret: bool) -> None:
  """lightning_indexer (score tiles of `chunk` keys, a running top_k) against XLA's dense
  scores + top_k (the reference, [B,T,S] float32 summed head by head) at each B x T of each
  model; dense is skipped where its sum, a head's product and top_k's input would not fit."""
  chunk = IndexerBlockSizes.get_default("interpret" if interpret else None).chunk
  rows = []
  for m in models:
    for b, t in shapes:
      operands = _indexer_operands(b, t, m)
      s = operands[1].shape[1]
      dense_bytes, tile_bytes = b * t * s * 4, b * t * (min(chunk, s) + m.top_k) * 4
      seconds = []
      for name, fn, nbytes in (("pallas", functools.partial(pk.lightning_indexer,
                                                            interpret=interpret), tile_bytes),
                               ("xla dense", ref.lightning_indexer, 3 * dense_bytes)):
        fn = jax.jit(lambda q, k, w, qp, kp, fn=fn, m=m: fn(q, k, w, top_k=m.top_k,
                                                              q_positions=qp, k_positions=kp))
        seconds.append(_seconds(fn, operands, iters, f"{name} {m.name} indexer at B={b} T={t}")
                       if _fits(nbytes) else None)
      pallas, dense = seconds
      speedup = dense / pallas if pallas and dense else None
      rows.append([m.indexer, f"B={b} T={t} S={s}"]
                  + [x * 1e3 if x else "-" for x in seconds]
                  + [speedup or "-", tile_bytes / 2**20, dense_bytes / 2**20,
                     "-" if speedup is None else "met" if speedup >= 3 else "unmet"])
  table(f"Lightning indexer, bf16: Pallas score tiles of {chunk} keys + running top_k against "
        "XLA's dense scores + top_k; target: >= 3x faster than dense at T=32k",
        ["model", "shape", "pallas ms", "xla dense ms", "dense / pallas",
         "pallas tiles T (chunk + top_k) 4 B MiB", "dense scores T S 4 B MiB", "verdict"], rows)


# --- block-size sweeps: one run gives the data to pick each kernel's GPU defaults ----------


def _fields(bs, names):
  return " ".join(f"{n}={getattr(bs, n)}" for n in names)


def fastest(kernel: str, configs, seconds) -> None:
  """Prints the config with the least seconds (None: it failed) and its speed-up over the
  first, the default: the line to act on when choosing new defaults."""
  timed_configs = [(t, i) for i, t in enumerate(seconds) if t is not None]
  if not timed_configs:
    print(f"\nFastest {kernel}: none ran")
    return
  best_time, best = min(timed_configs)
  speedup = (f"{seconds[0] / best_time:.2f}x the default" if seconds[0] is not None
             else "the default failed")
  print(f"\nFastest {kernel}: {configs[best]!r} ({speedup})")


def sweep_attention(shape, configs, peak: float, iters: int, interpret: bool) -> None:
  b, t, h = shape
  args, ct, (flops_fwd, flops_step) = _attention_operands(b, t, h)
  rows, seconds = [], []
  for bs in configs:
    attn = functools.partial(pk.mla_attention, interpret=interpret, block_sizes=bs)
    what = _fields(bs, ("block_q", "block_k", "block_q_bwd", "block_k_bwd", "num_warps",
                        "num_stages"))
    fwd = _rate(flops_fwd, jax.jit(attn), args, iters, what + " fwd")
    step = _rate(flops_step, train_step(attn), (*args, ct), iters, what + " fwd+bwd")
    rows.append([what] + [x / 1e12 if x is not None else "failed" for x in (fwd, step)]
                + [step / peak if step is not None else "-"])
    seconds.append(flops_step / step if step is not None else None)
  table(f"Sweep: MLA attention blocks, B={b} T={t} H={h}, bf16 (first row: the default)",
        ["blocks", "fwd TFLOP/s", "fwd+bwd TFLOP/s", "fwd+bwd of matmul peak"], rows)
  fastest("attention (fwd+bwd)", configs, seconds)


def distinct_decode_tilings(configs, heads: int) -> list[DecodeBlockSizes]:
  """configs in order, less those that tile `heads` like an earlier one: with few heads,
  every block_h at or past the padded head count is one program per row's heads."""
  effective = {}
  for bs in configs:
    effective.setdefault(dataclasses.replace(bs, block_h=bs.head_tiling(heads)[1]), bs)
  return list(effective.values())


def sweep_decode(shape, configs, peak: float, bandwidth: float, iters: int,
                 interpret: bool) -> None:
  b, s, h = shape
  args, nbytes = _decode_operands(b, s, h)
  attainable, bound = decode_roofline(b, s, h, peak, bandwidth)
  configs = distinct_decode_tilings(configs, h)
  rows, seconds = [], []
  for bs in configs:
    what = _fields(bs, ("block_s", "block_h", "min_programs", "num_warps", "num_stages"))
    fn = jax.jit(functools.partial(pk.mla_decode, sm_scale=0.07, interpret=interpret,
                                   block_sizes=bs))
    rate = _rate(nbytes, fn, args, iters, what)
    rows.append([what] + ([rate / 1e9, rate / bandwidth, rate / attainable]
                          if rate is not None else ["failed", "-", "-"]))
    seconds.append(nbytes / rate if rate is not None else None)
  table(f"Sweep: MLA decode blocks, B={b} S={s} H={h}, bf16, {bound} (first row: the "
        "default)", ["blocks", "GB/s", "of copy bandwidth", "of roofline"], rows)
  fastest("decode", configs, seconds)


def sweep_gmm(shape, configs, iters: int, interpret: bool) -> None:
  m, kd, n, g = shape
  lhs, rhs, grad, sizes, flops = _gmm_operands(m, kd, n, g)
  dense = flops / timed(jax.jit(lambda a, w: a @ w), lhs, rhs[0], iters=iters)
  rows, seconds = [], []
  for bs in configs:
    what = _fields(bs, ("block_m", "block_k", "block_n", "tgmm_block_k", "num_warps",
                        "num_stages"))
    rates = [_rate(flops, jax.jit(functools.partial(fn, interpret=interpret, block_sizes=bs)),
                   args, iters, f"{name} {what}")
             for name, fn, args in (("gmm", pk.gmm, (lhs, rhs, sizes)),
                                    ("tgmm", tgmm, (lhs, grad, sizes)))]
    rows.append([what] + [f"{r / 1e12:.3g} ({r / dense:.0%})" if r is not None else "failed"
                          for r in rates])
    # A training step runs gmm twice (forward, and against rhs^T for d lhs) and tgmm once.
    gmm_rate, tgmm_rate = rates
    seconds.append(flops * (2 / gmm_rate + 1 / tgmm_rate) if None not in rates else None)
  table(f"Sweep: gmm / tgmm blocks, M={m} K={kd} N={n} G={g}, bf16 (first row: the default; "
        "% of a dense matmul)", ["blocks", "gmm TFLOP/s", "tgmm TFLOP/s"], rows)
  fastest("gmm (2 gmm + 1 tgmm, a training step's share)", configs, seconds)


def sweep_configs(backend: str, dtype=jnp.bfloat16):
  """(attention, decode, gmm) block sizes to sweep on 'gpu' (or tiny ones for 'interpret');
  the platform default for `dtype` first, then the alternatives (tuned around bfloat16)."""
  attention = AttentionBlockSizes.get_default(backend, dtype)
  decode = DecodeBlockSizes.get_default(backend, dtype)
  gmm = GmmBlockSizes.get_default(backend, dtype)
  if backend == "interpret":
    return ([attention, dataclasses.replace(attention, block_k=32, block_q_bwd=32)],
            [decode, dataclasses.replace(decode, block_s=32, min_programs=8)],
            [gmm, dataclasses.replace(gmm, block_m=32)])
  r = dataclasses.replace
  return (
      [attention,
       r(attention, block_q=128, num_warps=8, num_stages=2),
       r(attention, block_q=128, block_k=32, num_warps=4, num_stages=3),
       r(attention, block_k_bwd=64, num_stages=2),
       r(attention, block_q=128, block_q_bwd=128, num_warps=8, num_stages=2),
       r(attention, block_k=32, block_q_bwd=32, block_k_bwd=64)],
      [decode,
       r(decode, block_s=32), r(decode, block_h=32, block_s=32),
       r(decode, block_h=32, num_warps=4), r(decode, block_h=16, num_warps=4),
       r(decode, min_programs=264), r(decode, min_programs=1056), r(decode, block_h=32)],
      [gmm,
       r(gmm, block_k=128), r(gmm, block_k=128, num_stages=2),
       r(gmm, block_m=64, num_warps=4, num_stages=4),
       # tgmm's K tile follows block_k here: at 128, four stages or 256 rows overflow shared
       # memory.
       r(gmm, block_k=32, tgmm_block_k=None, num_warps=4, num_stages=4),
       r(gmm, block_m=256, block_k=32, tgmm_block_k=None), r(gmm, tgmm_block_k=None)])


def _shapes(text: str, rank: int) -> list[tuple[int, ...]]:
  """'4x4096x128,1x16384x16' -> [(4, 4096, 128), (1, 16384, 16)]; each of `rank` sizes."""
  shapes = []
  for item in filter(None, text.split(",")):
    dims = item.split("x")
    if len(dims) != rank or not all(d.isdigit() for d in dims):
      raise SystemExit(f"kernel_bench: a shape is {rank} whole numbers joined by 'x', "
                       f"got {item!r}")
    shapes.append(tuple(map(int, dims)))
  return shapes


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode on CPU")
  parser.add_argument("--skip", default="",
                      help="comma list of: correctness,attention,decode,gmm,sparse,indexer")
  for kernel, dims in (("attention", "BxTxH"), ("decode", "BxSxH"), ("gmm", "MxKxNxG"),
                       ("sparse", "BxT (S = T) for V3.2 and V4-Flash"),
                       ("indexer", "BxT for V3.2 and V4-Flash")):
    parser.add_argument(f"--{kernel}_shapes", default="",
                        help=f"comma list of {dims} to time instead of the built-in shapes")
  parser.add_argument("--sweep", action="store_true",
                      help="after the tables, block-size sweeps of the three kernels")
  parser.add_argument("--only_sweep", action="store_true",
                      help="ceilings and the block-size sweeps only")
  args = parser.parse_args()
  interpret = args.smoke or jax.default_backend() == "cpu"
  print(f"devices: {jax.devices()}  jax {jax.__version__}  interpret={interpret}")
  skip = set(filter(None, args.skip.split(",")))
  if args.smoke:
    iters, peak_n, copy_mib = 2, 256, 16
    attn_shapes, decode_shapes = [(1, 64, 2)], [(2, 160, 4)]
    gmm_shapes = [(96, 64, 64, 4)]
    sparse_models, sparse_shapes, indexer_shapes = SMOKE_SPARSE_MODELS, [(1, 64)], [(1, 64)]
  else:
    iters, peak_n, copy_mib = 10, 8192, 2048
    attn_shapes = [(4, 4096, 16), (4, 4096, 128), (1, 16384, 16)]
    # The 128 heads (compute-bound on an H200) and V2-Lite's 16 (memory-bound).
    decode_shapes = [(64, 4096, 128), (64, 16384, 128), (64, 32768, 128), (64, 16384, 16)]
    # V3 experts (32 per device: up and down projections; 8 per device), then V2-Lite's
    # (4096 tokens x top-6 of 64; see RESULTS.md, 2026-11-28).
    gmm_shapes = [(32768, 7168, 2048, 32), (32768, 2048, 7168, 32), (16384, 7168, 2048, 8),
                  (24576, 2048, 1408, 64)]
    # 128k tokens (--sparse_shapes=1x131072, --indexer_shapes=1x131072) would not fit
    # gpu_check's 5 minutes; dense attention is timed where it fits in memory.
    sparse_models, sparse_shapes = SPARSE_MODELS, [(1, 8192), (1, 32768)]
    indexer_shapes = sparse_shapes
  attn_shapes = _shapes(args.attention_shapes, 3) or attn_shapes
  decode_shapes = _shapes(args.decode_shapes, 3) or decode_shapes
  gmm_shapes = _shapes(args.gmm_shapes, 4) or gmm_shapes
  sparse_shapes = _shapes(args.sparse_shapes, 2) or sparse_shapes
  indexer_shapes = _shapes(args.indexer_shapes, 2) or indexer_shapes
  peak, bandwidth = ceilings(peak_n, copy_mib, iters, warm_seconds=0.0 if interpret else 2.0)
  ok = True
  if not args.only_sweep:
    if "correctness" not in skip:
      rows = check_correctness(interpret)
      ok = all(row[-1] for row in rows)
    # Attention last: it compiles the most, so a time limit cuts its last shapes only.
    if "decode" not in skip:
      bench_decode(decode_shapes, peak, bandwidth, iters, interpret)
    if "gmm" not in skip:
      bench_gmm(gmm_shapes, iters, interpret)
    # Calls of 10 ms to seconds: three samples each.
    if "sparse" not in skip:
      bench_sparse_attention(sparse_models, sparse_shapes, peak, min(iters, 3), interpret)
    if "indexer" not in skip:
      bench_indexer(sparse_models, indexer_shapes, min(iters, 3), interpret)
    if "attention" not in skip:
      bench_attention(attn_shapes, peak, iters, interpret)
  if args.sweep or args.only_sweep:
    # Attention last again: its configs compile the longest.
    attention, decode, gmm = sweep_configs("interpret" if interpret else jax.default_backend())
    if "decode" not in skip:   # compute-bound 128 heads, then memory-bound 16 heads
      for shape in dict.fromkeys((decode_shapes[1 % len(decode_shapes)], decode_shapes[-1])):
        sweep_decode(shape, decode, peak, bandwidth, iters, interpret)
    if "gmm" not in skip:
      sweep_gmm(gmm_shapes[0], gmm, iters, interpret)
    if "attention" not in skip:
      sweep_attention(attn_shapes[0], attention, peak, iters, interpret)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
