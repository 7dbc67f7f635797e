import time, traceback, sys, warnings
warnings.filterwarnings("ignore")
import jax, jax.numpy as jnp, numpy as np
print(jax.__version__, jax.devices(), flush=True)
from pallas_kernels import reference
from pallas_kernels.mla_decode import mla_decode, MlaDecodeBlockSizes
from pallas_kernels.moe_route import moe_route, MoeRouteBlockSizes

def bench(f, *a, n=20):
  jax.block_until_ready(f(*a))
  t = time.perf_counter()
  for _ in range(n): r = f(*a)
  jax.block_until_ready(r)
  return (time.perf_counter() - t) / n * 1e3

def dec_case(B, H, S, dtype, lengths=None, bs=None, timing=False):
  k = jax.random.split(jax.random.key(B * 7 + S), 5)
  Dc, Dr = 512, 64
  ql = jax.random.normal(k[0], (B, H, Dc), dtype); qr = jax.random.normal(k[1], (B, H, Dr), dtype)
  kv = jax.random.normal(k[2], (B, S, Dc), dtype); kr = jax.random.normal(k[3], (B, S, Dr), dtype)
  if lengths is None:
    lengths = jax.random.randint(k[4], (B,), 0, S + 1).at[0].set(S)
  scale = 0.1352
  f = jax.jit(lambda *a: mla_decode(*a, sm_scale=scale, block_sizes=bs))
  g = jax.jit(lambda *a: reference.mla_decode(*a, sm_scale=scale))
  args = (ql, qr, kv, kr, lengths)
  try:
    out = f(*args)
    with jax.default_matmul_precision("highest"):
      ref = jax.jit(lambda *a: reference.mla_decode(*a, sm_scale=scale))(*args)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
    msg = f"decode B={B} H={H} S={S} {jnp.dtype(dtype).name} bs={bs} err={err:.2e}"
    if timing:
      tk, tr = bench(f, *args), bench(g, *args)
      gb = (kv.nbytes + kr.nbytes) / 1e9
      msg += f" kernel {tk:.3f}ms ({gb/tk*1e3:.0f} GB/s) ref {tr:.3f}ms ratio {tr/tk:.2f}x"
    print(msg, flush=True)
  except Exception as ex:
    print(f"decode B={B} H={H} S={S} {dtype} FAILED: {type(ex).__name__}: {str(ex)[:1500]}", flush=True)

def route_case(N, E, K, G, TG, fn, bias, timing=False, bs=None):
  k = jax.random.split(jax.random.key(N + E), 2)
  lg = jax.random.normal(k[0], (N, E))
  b = jax.random.normal(k[1], (E,)) * 0.1 if bias else None
  kw = dict(top_k=K, n_group=G, topk_group=TG, score_fn=fn, routed_scaling_factor=2.5)
  try:
    f = jax.jit(lambda l, b: moe_route(l, b, block_sizes=bs, **kw))
    g = jax.jit(lambda l, b: reference.moe_route(l, b, **kw))
    w, e = f(lg, b); wr, er = g(lg, b)
    msg = (f"route N={N} E={E} K={K} G={G}/{TG} {fn} bias={bias} experts_equal={bool((e == er).all())}"
           f" frac={float((e == er).mean()):.5f} werr={float(jnp.max(jnp.abs(w - wr))):.2e}")
    if timing:
      tk, tr = bench(f, lg, b), bench(g, lg, b)
      msg += f" kernel {tk:.3f}ms ref {tr:.3f}ms ratio {tr/tk:.2f}x"
    print(msg, flush=True)
  except Exception as ex:
    print(f"route {N} {E} FAILED: {type(ex).__name__}: {str(ex)[:1500]}", flush=True)

which = sys.argv[1] if len(sys.argv) > 1 else "all"
if which in ("all", "route"):
  route_case(37, 16, 4, 1, 1, "sigmoid", False)
  route_case(300, 256, 8, 8, 4, "sigmoid", True)
  route_case(50, 64, 6, 1, 1, "softmax", False)
  route_case(77, 160, 6, 8, 3, "softmax", True)
  route_case(16384, 256, 8, 8, 4, "sigmoid", True, timing=True)
  route_case(16384, 256, 8, 8, 4, "sigmoid", True, timing=True, bs=MoeRouteBlockSizes(block_n=32, num_warps=8))
  route_case(16384, 64, 6, 1, 1, "softmax", False, timing=True)
if which in ("all", "decode"):
  dec_case(2, 16, 1000, jnp.bfloat16)
  dec_case(3, 3, 777, jnp.float32, lengths=jnp.array([0, 1, 777], jnp.int32))
  dec_case(1, 128, 4096, jnp.bfloat16)
  dec_case(1, 16, 32768, jnp.bfloat16, timing=True)
  dec_case(32, 16, 4096, jnp.bfloat16, timing=True)
  dec_case(1, 128, 32768, jnp.bfloat16, timing=True)
  dec_case(64, 128, 4096, jnp.bfloat16, timing=True)
  for bs in [MlaDecodeBlockSizes(block_s=32, block_h=64, min_heads=16, min_programs=264),
             MlaDecodeBlockSizes(block_s=64, block_h=32, min_heads=16, min_programs=264),
             MlaDecodeBlockSizes(block_s=64, block_h=64, min_heads=16, min_programs=264, num_warps=8),
             MlaDecodeBlockSizes(block_s=32, block_h=16, min_heads=16, min_programs=528)]:
    dec_case(1, 16, 32768, jnp.bfloat16, timing=True, bs=bs)
    dec_case(64, 128, 4096, jnp.bfloat16, timing=True, bs=bs)
