"""Kernel correctness (compiled, not interpreted) and throughput against XLA, cuDNN and the roofline.

  python experiments/benchmarks/kernel_bench.py            # on a GPU: full shapes
  python experiments/benchmarks/kernel_bench.py --smoke    # CPU interpret mode, tiny shapes

Every ratio is measured in this run: the device's bf16 matmul rate and copy bandwidth first,
then each kernel against its pure-jnp reference under jit (XLA) and, for attention, cuDNN
through jax.nn.dot_product_attention where it accepts the shapes. Prints markdown tables.
Imports only jax and pallas_kernels (the GPU machine has no grain).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels import reference as ref
from pallas_kernels import tgmm

BF16 = jnp.bfloat16


def timed(fn, *args, iters: int) -> float:
  """Median wall seconds of a compiled call (after one warm-up)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
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


def ceilings(n: int, copy_mib: int, iters: int) -> tuple[float, float]:
  a = jax.random.normal(jax.random.key(0), (n, n), BF16)
  matmul = jax.jit(lambda x, y: x @ y)
  t = timed(matmul, a, a, iters=iters)
  flops = 2 * n**3 / t
  x = jnp.ones((copy_mib * 2**20 // 4,), jnp.float32)
  copy = jax.jit(lambda v: v * 1.0)
  t = timed(copy, x, iters=iters)
  bandwidth = 2 * x.nbytes / t                       # read + write
  table("Measured ceilings", ["what", "value"],
        [[f"bf16 matmul {n}^3", f"{flops / 1e12:.1f} TFLOP/s"],
         [f"copy {copy_mib} MiB (read+write)", f"{bandwidth / 1e9:.0f} GB/s"]])
  return flops, bandwidth


# --- correctness --------------------------------------------------------------------------


def check_correctness(interpret: bool) -> list[list]:
  rows = []
  k = iter(jax.random.split(jax.random.key(1), 32))
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


def bench_attention(shapes, peak: float, iters: int, interpret: bool) -> None:
  rows = []
  for b, t, h in shapes:
    keys = jax.random.split(jax.random.key(2), 4)
    q, kk = (jax.random.normal(x, (b, t, h, 192), BF16) for x in keys[:2])
    v, ct = (jax.random.normal(x, (b, t, h, 128), BF16) for x in keys[2:])
    flops_fwd = 2 * b * h * (t * (t + 1) / 2) * (192 + 128)     # causal
    flops = 3 * flops_fwd                                      # fwd + bwd (dq, dk, dv)

    def step(attn):
      def loss(q, k, v):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * ct)
      return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    candidates = {
        "pallas": step(functools.partial(pk.mla_attention, interpret=interpret)),
        "xla": step(ref.mla_attention),
    }
    if jax.default_backend() == "gpu":
      def cudnn(q, k, v):     # cuDNN wants Dv == Dqk through this API: pad v, slice output
        vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, 64)))
        out = jax.nn.dot_product_attention(q, k, vp, is_causal=True, implementation="cudnn",
                                           scale=192**-0.5)
        return out[..., :128]
      candidates["cudnn (v padded to 192)"] = step(cudnn)
    results = {}
    for name, fn in candidates.items():
      try:
        results[name] = flops / timed(fn, q, kk, v, iters=iters)
      except Exception as e:  # noqa: BLE001 -- report what does not run, keep benchmarking
        print(f"  {name} at B={b} T={t} H={h} failed: {type(e).__name__}: {str(e)[:200]}")
    pallas = results.get("pallas", float("nan"))
    for name, rate in results.items():
      rows.append([f"B={b} T={t} H={h}", name, rate / 1e12, rate / peak,
                   pallas / rate if name != "pallas" else 1.0])
  table("MLA attention fwd+bwd, causal, Dqk 192 / Dv 128, bf16",
        ["shape", "impl", "TFLOP/s", "of matmul peak", "pallas speed-up"], rows)


def bench_decode(shapes, bandwidth: float, iters: int, interpret: bool) -> None:
  rows = []
  for b, s, h in shapes:
    keys = jax.random.split(jax.random.key(3), 4)
    lat = jax.random.normal(keys[0], (b, h, 512), BF16)
    rope = jax.random.normal(keys[1], (b, h, 64), BF16)
    cache = jax.random.normal(keys[2], (b, s, 512), BF16)
    krope = jax.random.normal(keys[3], (b, s, 64), BF16)
    lengths = jnp.full((b,), s, jnp.int32)
    nbytes = cache.nbytes + krope.nbytes
    for name, fn in (("pallas", functools.partial(pk.mla_decode, interpret=interpret)),
                     ("xla", ref.mla_decode)):
      f = jax.jit(functools.partial(fn, sm_scale=0.07))
      rate = nbytes / timed(f, lat, rope, cache, krope, lengths, iters=iters)
      rows.append([f"B={b} S={s} H={h}", name, rate / 1e9, rate / bandwidth])
  table("MLA absorbed decode (latent 512 + rope 64), bf16",
        ["shape", "impl", "GB/s", "of copy bandwidth"], rows)


def bench_gmm(shapes, iters: int, interpret: bool) -> None:
  rows = []
  for m, kd, n, g in shapes:
    keys = jax.random.split(jax.random.key(4), 3)
    lhs = jax.random.normal(keys[0], (m, kd), BF16)
    rhs = jax.random.normal(keys[1], (g, kd, n), BF16)
    grad = jax.random.normal(keys[2], (m, n), BF16)
    sizes = jnp.asarray(np.random.default_rng(0).multinomial(m, np.ones(g) / g), jnp.int32)
    flops = 2 * m * kd * n
    dense_lhs, dense_rhs = lhs, rhs[0]
    dense = flops / timed(jax.jit(lambda a, w: a @ w), dense_lhs, dense_rhs, iters=iters)
    cases = {
        "gmm (pallas)": (jax.jit(functools.partial(pk.gmm, interpret=interpret)),
                         (lhs, rhs, sizes)),
        "tgmm (pallas)": (jax.jit(functools.partial(tgmm, interpret=interpret)),
                          (lhs, grad, sizes)),
        "ragged_dot (xla)": (jax.jit(ref.gmm), (lhs, rhs, sizes)),
    }
    for name, (fn, args) in cases.items():
      rate = flops / timed(fn, *args, iters=iters)
      rows.append([f"M={m} K={kd} N={n} G={g}", name, rate / 1e12, rate / dense])
    rows.append([f"M={m} K={kd} N={n} G={g}", "dense matmul, same FLOPs", dense / 1e12, 1.0])
  table("Grouped matmul, bf16", ["shape", "impl", "TFLOP/s", "of dense matmul"], rows)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode on CPU")
  parser.add_argument("--skip", default="", help="comma list of: attention,decode,gmm")
  args = parser.parse_args()
  interpret = args.smoke or jax.default_backend() == "cpu"
  print(f"devices: {jax.devices()}  jax {jax.__version__}  interpret={interpret}")
  skip = set(filter(None, args.skip.split(",")))
  if args.smoke:
    iters, peak_n, copy_mib = 2, 256, 16
    attn_shapes, decode_shapes = [(1, 64, 2)], [(2, 160, 4)]
    gmm_shapes = [(96, 64, 64, 4)]
  else:
    iters, peak_n, copy_mib = 10, 8192, 2048
    attn_shapes = [(4, 4096, 16), (4, 4096, 128), (1, 16384, 16)]
    decode_shapes = [(64, 4096, 128), (64, 16384, 128), (64, 32768, 128)]
    gmm_shapes = [(32768, 7168, 2048, 32), (32768, 2048, 7168, 32), (16384, 7168, 2048, 8)]
  peak, bandwidth = ceilings(peak_n, copy_mib, iters)
  rows = check_correctness(interpret)
  if "attention" not in skip:
    bench_attention(attn_shapes, peak, iters, interpret)
  if "decode" not in skip:
    bench_decode(decode_shapes, bandwidth, iters, interpret)
  if "gmm" not in skip:
    bench_gmm(gmm_shapes, iters, interpret)
  return 0 if all(row[-1] for row in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
