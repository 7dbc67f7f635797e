"""Registers, spills and shared memory of every Pallas kernel's GPU form, measured without a GPU.

  pip install triton==3.9.0                                    # the compiler and its ptxas
  python experiments/benchmarks/triton_resources.py            # the GPU default block sizes
  python experiments/benchmarks/triton_resources.py --sweep    # and every config gpu_check sweeps
  python experiments/benchmarks/triton_resources.py --precision=highest   # float32 dots in IEEE

Each kernel is traced in its GPU form (`platform.lowering_for("gpu")`) and lowered for CUDA on
this machine. Every Triton module in the lowered program is compiled for sm_90 (H100/H200) by
the `triton` package, with the num_warps and num_stages that Pallas put beside it. `ptxas -v`
then reports the registers per thread, the bytes spilled to local memory, and the shared
memory. A kernel that spills, or that needs more shared memory than an SM has, is marked.
XLA embeds its own Triton, so on the GPU machine the numbers can differ by a few registers.
Timing still needs the GPU (`gpu_check.sh`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels import platform
from pallas_kernels.lightning_indexer import BlockSizes as IndexerBlockSizes
from pallas_kernels.sparse_mqa_attention import BlockSizes as SparseBlockSizes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_bench import sweep_configs  # pylint: disable=wrong-import-position

TRITON_TARGET = "__gpu$xla.gpu.triton"
SHARED_PER_BLOCK = 227 * 1024     # Hopper: the most dynamic shared memory one block may use
MAX_REGISTERS = 255               # per thread; the compiler spills beyond
_S = jax.ShapeDtypeStruct


@dataclasses.dataclass(frozen=True)
class TritonCall:
  """One Triton kernel of a lowered program: its module as text and its launch parameters."""
  name: str
  module: str
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class Resources:
  registers: int
  spill_stores: int     # bytes per thread
  spill_loads: int
  shared: int           # bytes per block

  @property
  def verdict(self) -> str:
    problems = [p for p, bad in (("spills", self.spill_stores or self.spill_loads),
                                 ("shared memory over 227 KiB", self.shared > SHARED_PER_BLOCK))
                if bad]
    return ", ".join(problems) or "ok"


LOWERING_PLATFORM = {"gpu": "cuda", "tpu": "tpu"}


def lower(form: str, fn, *args) -> jax.stages.Lowered:
  """`fn(*args)` (arrays or ShapeDtypeStructs) lowered for a GPU or TPU on this machine, with
  the kernels traced in that form ('gpu' or 'tpu')."""
  with platform.lowering_for(form):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(LOWERING_PLATFORM[form],))


def triton_calls(fn, *args) -> list[TritonCall]:
  """The Triton kernels in `fn(*args)` lowered for CUDA, traced in the GPU form.

  Reads the modules from the lowered StableHLO custom calls; parsing them needs the Triton
  dialect that jaxlib registers (a private JAX module).
  """
  from jax._src.interpreters import mlir          # pylint: disable=import-outside-toplevel
  from jax._src.lib.mlir import ir                # pylint: disable=import-outside-toplevel
  from jax._src.lib.triton import dialect as tt   # pylint: disable=import-outside-toplevel

  lowered = lower("gpu", fn, *args)
  ops = []

  def walk(op):
    if (op.name == "stablehlo.custom_call"
        and ir.StringAttr(op.attributes["call_target_name"]).value == TRITON_TARGET):
      ops.append(op)
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          walk(child.operation)

  walk(lowered.compiler_ir("stablehlo").operation)
  ctx = mlir.make_ir_context()
  tt.register_dialect(ctx)
  calls = []
  for op in ops:
    config = ir.DictAttr(op.attributes["mhlo.backend_config"])
    with ctx:
      module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
    calls.append(TritonCall(name=ir.StringAttr(config["name"]).value, module=str(module),
                            num_warps=ir.IntegerAttr(config["num_warps"]).value,
                            num_stages=ir.IntegerAttr(config["num_stages"]).value))
  return calls


def compile_for_sm(call: TritonCall, arch: int = 90) -> Resources:
  """Compiles one Triton module to a cubin for sm_`arch` and reads ptxas's report."""
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # XLA's Triton fuses multiply-adds
  import triton                                           # pylint: disable=import-outside-toplevel
  from triton import knobs                                # pylint: disable=import-outside-toplevel
  from triton.backends.compiler import GPUTarget          # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f"{call.name}.ttir")
    with open(path, "w", encoding="utf-8") as f:
      f.write(call.module)
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.cache.scope(), contextlib.redirect_stdout(log):
      knobs.nvidia.dump_ptxas_log = True    # print ptxas -v's report (no cached cubin: fresh)
      knobs.cache.dir = tmp
      kernel = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": call.num_warps,
                                       "num_stages": call.num_stages})
  report = log.getvalue()

  def number(pattern):
    found = re.search(pattern, report)
    if found is None:
      raise RuntimeError(f"ptxas printed no '{pattern}' for {call.name}:\n{report}")
    return int(found.group(1))

  return Resources(registers=number(r"Used (\d+) registers"),
                   spill_stores=number(r"(\d+) bytes spill stores"),
                   spill_loads=number(r"(\d+) bytes spill loads"),
                   shared=kernel.metadata.shared)


# --- the kernels at the benchmark's shapes ------------------------------------------------


def _loss(fn):
  """Sum of fn's (first) output as float32: its gradient runs the kernels' backward."""
  def loss(*args):
    out = fn(*args)
    return jnp.sum((out[0] if isinstance(out, tuple) else out).astype(jnp.float32))
  return loss


def kernel_cases(attention=None, decode=None, gmm=None, sparse=None, indexer=None,
                 dtype=jnp.bfloat16):
  """[(label, fn, abstract args)]: every kernel, forward and backward, at gpu_check's shapes
  (attention 4 x 4096 tokens x 128 heads, decode B=64 over 4k entries x 128 heads, DeepSeek-V3
  expert gmm, V3.2's sparse attention over 2048 of 4096 keys and its indexer over 16k keys,
  two chunks; a 16k x 256 router, last). None block sizes: the platform's default."""
  b, t, h = 4, 4096, 128
  attention_fn = lambda q, k, v: pk.mla_attention(q, k, v, block_sizes=attention)
  decode_fn = lambda *a: pk.mla_decode(*a, sm_scale=0.07, block_sizes=decode)
  gmm_fn = lambda x, w, sizes: pk.gmm(x, w, sizes, block_sizes=gmm)
  sparse_fn = lambda q, kv, idx: pk.sparse_mqa_attention(q, kv, idx, d_v=512, sm_scale=0.07,
                                                         block_sizes=sparse)
  indexer_fn = lambda q, k, w, pos: pk.lightning_indexer(q, k, w, top_k=2048, q_positions=pos,
                                                         k_positions=pos,
                                                         block_sizes=indexer)[1]
  route_fn = lambda logits, bias: pk.moe_route(logits, bias, top_k=8, n_group=8, topk_group=4,
                                               routed_scaling_factor=2.5)
  m, k, n, g = 32768, 7168, 2048, 32
  ti = 16384
  return [
      ("mla_attention", jax.grad(_loss(attention_fn), argnums=(0, 1, 2)),
       (_S((b, t, h, 192), dtype), _S((b, t, h, 192), dtype), _S((b, t, h, 128), dtype))),
      ("mla_decode", decode_fn,
       (_S((64, h, 512), dtype), _S((64, h, 64), dtype), _S((64, 4096, 512), dtype),
        _S((64, 4096, 64), dtype), _S((64,), jnp.int32))),
      ("gmm", jax.grad(_loss(gmm_fn), argnums=(0, 1)),
       (_S((m, k), dtype), _S((g, k, n), dtype), _S((g,), jnp.int32))),
      ("sparse_mqa_attention", jax.grad(_loss(sparse_fn), argnums=(0, 1)),
       (_S((1, t, h, 576), dtype), _S((1, t, 576), dtype), _S((1, t, 2048), jnp.int32))),
      ("lightning_indexer", jax.grad(_loss(indexer_fn), argnums=(0, 1, 2)),
       (_S((1, ti, 64, 128), dtype), _S((1, ti, 128), dtype), _S((1, ti, 64), dtype),
        _S((1, ti), jnp.int32))),
      ("moe_route", jax.grad(_loss(route_fn)), (_S((16384, 256), jnp.float32), None)),
  ]


def _config_text(bs) -> str:
  if bs is None:
    return "default"     # moe_route: one program per token block, nothing swept
  return " ".join(f"{f.name}={getattr(bs, f.name)}" for f in dataclasses.fields(bs)
                  if f.name != "sequential_grid")


def report(cases, arch: int) -> list[list]:
  rows = []
  for label, config, fn, args in cases:
    for call in triton_calls(fn, *args):
      r = compile_for_sm(call, arch)
      rows.append([label, call.name, config, call.num_warps, call.num_stages, r.registers,
                   f"{r.spill_stores}/{r.spill_loads}", f"{r.shared / 1024:.0f}", r.verdict])
      print("  " + " | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
  return rows


def resource_cases(sweep: bool) -> list[tuple]:
  """[(label, block sizes as text, fn, abstract args)]: each kernel at its bfloat16 and float32
  GPU defaults, then (sweep) every other bfloat16 config that gpu_check.sh times."""
  cases = []
  for dtype in (jnp.bfloat16, jnp.float32):
    defaults = [configs[0] for configs in sweep_configs("gpu", dtype)]
    defaults += [SparseBlockSizes.get_default("gpu", dtype),
                 IndexerBlockSizes.get_default("gpu", dtype)]
    for (label, fn, operands), bs in zip(kernel_cases(*defaults, dtype=dtype), [*defaults, None]):
      if label != "moe_route" or dtype == jnp.float32:     # the router takes float32 logits
        cases.append((f"{label} {jnp.dtype(dtype).name}", _config_text(bs), fn, operands))
  if sweep:
    for index, configs in enumerate(sweep_configs("gpu")):   # attention, decode, gmm
      for bs in configs[1:]:
        sizes = [None, None, None]
        sizes[index] = bs
        label, fn, operands = kernel_cases(*sizes)[index]
        cases.append((f"{label} bfloat16", _config_text(bs), fn, operands))
  return cases


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sweep", action="store_true",
                      help="also every block-size config that gpu_check.sh sweeps")
  parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
  parser.add_argument("--precision", default="default", choices=("default", "high", "highest"),
                      help="jax.default_matmul_precision while tracing: float32 dots in TF32 "
                           "(default), 3xTF32 or IEEE float32 (highest)")
  args = parser.parse_args()
  with jax.default_matmul_precision(args.precision):
    rows = report(resource_cases(args.sweep), args.arch)
  print(f"\n### Triton kernels compiled for sm_{args.arch}, matmul precision {args.precision} "
        f"(jax {jax.__version__}, triton {__import__('triton').__version__})\n")
  header = ["kernel", "pallas_call", "block sizes", "warps", "stages", "registers",
            "spill B stored/loaded", "shared KiB", "verdict"]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    print("| " + " | ".join(map(str, row)) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
