"""DeepSeek Sparse Attention's promise, measured on a CPU: top-k attention costs O(T K), dense
causal attention O(T^2).

  python experiments/benchmarks/sparse_scaling.py           # T = 512 ... 4096, < 3 min, 2 cores
  python experiments/benchmarks/sparse_scaling.py --smoke   # T = 128, 256, seconds
  python experiments/benchmarks/sparse_scaling.py --log     # also under logs/, dated

Plain XLA, float32, no Pallas interpret mode: the sparse path is
`pallas_kernels.reference.sparse_mqa_attention` (each query gathers its K rows of the one
shared KV head), the dense one `pallas_kernels.xla_attention.mla_attention` (chunked causal
attention with a hand-written backward) over the same heads and head dims, the KV broadcast to
every head. The indexer's dense form (`reference.lightning_indexer`: [T, S] float32 scores
summed head by head, then top_k) is timed; its chunked Pallas form runs only interpreted on a
CPU, so for it only the memory argument is printed: the [T, S] float32 dense scores against
T (chunk + top_k) float32 of score tiles and running top-k.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import io
import os
import sys

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels import reference as ref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_bench import (  # noqa: E402 pylint: disable=wrong-import-position
    sparse_indices, table, timed, train_step)

LOGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "logs")


def _operands(t: int, args):
  """q [1,T,H,D], kv [1,T,D], indices [1,T,K], the cotangent [1,T,H,d_v], and the dense
  form's k, v (kv broadcast to every head)."""
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (1, t, args.heads, args.d))
  kv = jax.random.normal(keys[1], (1, t, args.d))
  ct = jax.random.normal(keys[2], (1, t, args.heads, args.d_v))
  idx = sparse_indices(keys[3], 1, t, args.k)
  k = jnp.broadcast_to(kv[:, :, None], q.shape)
  v = jnp.broadcast_to(kv[:, :, None, :args.d_v], ct.shape)
  return q, kv, idx, ct, k, v


def _indexer_operands(t: int, args):
  keys = jax.random.split(jax.random.key(1), 3)
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  return (jax.random.normal(keys[0], (1, t, args.indexer_heads, args.indexer_dim)),
          jax.random.normal(keys[1], (1, t, args.indexer_dim)),
          jax.random.normal(keys[2], (1, t, args.indexer_heads)), pos, pos)


def measure(t: int, args) -> list[float]:
  """Milliseconds of sparse and dense attention, forward and forward + backward, and of the
  dense indexer, at T = S."""
  q, kv, idx, ct, k, v = _operands(t, args)
  sparse = lambda q, kv, idx: ref.sparse_mqa_attention(q, kv, idx, d_v=args.d_v,
                                                       sm_scale=args.d**-0.5)
  dense = functools.partial(pk.xla_attention.mla_attention, sm_scale=args.d**-0.5)
  indexer = jax.jit(lambda q, k, w, qp, kp: ref.lightning_indexer(
      q, k, w, top_k=args.k, q_positions=qp, k_positions=kp))
  calls = [(jax.jit(sparse), (q, kv, idx)), (jax.jit(dense), (q, k, v)),
           (train_step(sparse, argnums=(0, 1)), (q, kv, idx, ct)),
           (train_step(dense), (q, k, v, ct)), (indexer, _indexer_operands(t, args))]
  return [timed(fn, *operands, iters=args.iters) * 1e3 for fn, operands in calls]


def report(args) -> None:
  lengths = [int(x) for x in args.lengths.split(",")]
  ms = {}
  for t in lengths:
    ms[t] = measure(t, args)
    print(f"  T={t}: " + ", ".join(f"{x:.1f}" for x in ms[t]) + " ms", file=sys.stderr,
          flush=True)
  rows = []
  for t in lengths:
    s_fwd, d_fwd, s_step, d_step, index = ms[t]
    rows.append([t, s_fwd, d_fwd, d_fwd / s_fwd, s_step, d_step, d_step / s_step, index,
                 t * t * 4 / 2**20, t * (min(args.chunk, t) + args.k) * 4 / 2**20])
  table(f"Sparse (K={args.k}) against dense causal attention, float32 on {jax.devices()[0]}, "
        f"H={args.heads} D={args.d} d_v={args.d_v}, B=1, S=T; indexer Hi={args.indexer_heads} "
        f"Di={args.indexer_dim} top_k={args.k}",
        ["T", "sparse fwd ms", "dense fwd ms", "dense / sparse fwd", "sparse fwd+bwd ms",
         "dense fwd+bwd ms", "dense / sparse fwd+bwd", "dense indexer ms",
         "dense scores T S 4 B MiB", f"chunked indexer T ({args.chunk} + top_k) 4 B MiB"], rows)
  growth = [[f"{prev} -> {t}"] + [now / before for now, before in zip(ms[t], ms[prev])]
            for prev, t in zip(lengths, lengths[1:])]
  table("Time growth per step of T (x; linear in T doubles, quadratic quadruples)",
        ["T", "sparse fwd", "dense fwd", "sparse fwd+bwd", "dense fwd+bwd", "dense indexer"],
        growth)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="T = 128, 256 and one sample")
  parser.add_argument("--lengths", default="512,1024,2048,4096",
                      help="comma list of sequence lengths T = S")
  parser.add_argument("--k", type=int, default=128, help="slots per query, and indexer top_k")
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--d", type=int, default=96, help="key width (latent + rope)")
  parser.add_argument("--d_v", type=int, default=64, help="value width (the latent)")
  parser.add_argument("--indexer_heads", type=int, default=4)
  parser.add_argument("--indexer_dim", type=int, default=32)
  parser.add_argument("--chunk", type=int, default=1024,
                      help="keys per score tile of the chunked indexer (memory column only)")
  parser.add_argument("--iters", type=int, default=2, help="timed samples per call")
  parser.add_argument("--log", action="store_true",
                      help="also write the tables to logs/<date>-cpu-sparse-scaling.md")
  args = parser.parse_args()
  if args.smoke:
    args.lengths, args.k, args.iters = "128,256", 32, 1
  header = f"devices: {jax.devices()}  jax {jax.__version__}  {vars(args)}"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print(header)
    report(args)
  print(out.getvalue(), end="")
  if args.log:
    name = f"{datetime.date.today().isoformat()}-cpu-sparse-scaling.md"
    with open(os.path.join(LOGS, name), "w", encoding="utf-8") as f:
      f.write(out.getvalue())
    print(f"\nwritten to {os.path.join(LOGS, name)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
