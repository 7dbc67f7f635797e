"""Mosaic TPU's rules for a kernel's blocks, checked on its traced pallas_calls (no TPU needed).

The TPU interpreter (`pltpu.InterpretParams`) runs a kernel's TPU form on CPU but accepts
blocks that Mosaic would refuse and VMEM use that no TPU has. Tracing the kernel and reading
its pallas_calls checks both at any shape, without running it:

- the last two dims of every VMEM block are multiples of (8, 128) or equal the array's dims
  (rank-1 blocks: the whole dim, a multiple of 1024 or a power of two >= 128 lanes x packing);
  SMEM blocks and blocks left in HBM are whole arrays; one dimension semantic per grid axis;
- the blocks, each double-buffered by the pipeline, plus the scratch buffers fit in the scoped
  VMEM budget, counted in whole (sublane, 128-lane) tiles.
"""

import math

import jax
import numpy as np

# The default scoped VMEM limit of TPU v4 and v5e (v6e: 32 MiB); a kernel may raise it with
# vmem_limit_bytes, but the defaults should compile without.
VMEM_BUDGET = 16 * 2**20


def pallas_calls(fn, *args):
  """The pallas_call equations of jax.make_jaxpr(fn)(*args), nested jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found.append(eqn)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def kernel_name(eqn) -> str:
  """The pallas_call's name (JAX 0.10: `name`; newer: `name_and_src_info`)."""
  name = eqn.params.get("name") or eqn.params.get("name_and_src_info")
  return str(name).split()[0] if name else "pallas_call"


def _dims(block_mapping):
  """A block's dims with squeezed dims as 1."""
  return tuple(getattr(d, "block_size", 1) for d in block_mapping.block_shape)


def _memory_space(block_mapping) -> str:
  """'vmem', 'smem' or 'any' (left in HBM): Pallas's default on a TPU core is VMEM."""
  space = str(getattr(block_mapping.block_aval, "memory_space", "default")).lower()
  return "vmem" if space in ("default", "none") else space


def _trivial_window(block_mapping) -> bool:
  """The block is the whole array at index 0 (Pallas's has_trivial_window)."""
  if _dims(block_mapping) != tuple(block_mapping.array_aval.shape):
    return False
  return all(getattr(v, "val", None) == 0 for v in block_mapping.index_map_jaxpr.jaxpr.outvars)


def _tile_bytes(shape, dtype) -> int:
  """Bytes of a VMEM buffer of this shape: the last two dims rounded up to whole tiles of
  (8 * 32-bit packing, 128) elements."""
  itemsize = np.dtype(dtype).itemsize
  shape = (1,) * max(0, 2 - len(shape)) + tuple(shape)
  sublanes = 8 * max(1, 4 // itemsize)
  rows = -(-shape[-2] // sublanes) * sublanes
  cols = -(-shape[-1] // 128) * 128
  return math.prod(shape[:-2]) * rows * cols * itemsize


def _block_violation(bm) -> str | None:
  """Why Mosaic would refuse this block, or None (the rules of Pallas's TPU lowering)."""
  space, block, array = _memory_space(bm), _dims(bm), tuple(bm.array_aval.shape)
  if space == "smem" and _trivial_window(bm):
    return None
  if space in ("any", "hbm"):
    return None if _trivial_window(bm) else "a block left in HBM must be the whole array"
  if not block:
    return "a block of rank 0"
  if len(block) == 1:   # whole, a multiple of 8 x 128, or a power of two >= 128 * packing
    b, a = block[0], array[0]
    min_tiling = 128 * max(1, 4 // np.dtype(bm.array_aval.dtype).itemsize)
    if b == a or b % 1024 == 0 or (b >= min_tiling and b & (b - 1) == 0):
      return None
    return f"rank-1 block {b}: not {a}, a multiple of 1024 or a power of two >= {min_tiling}"
  for rank_from_end, multiple in ((1, 128), (2, 8)):
    b, a = block[-rank_from_end], array[-rank_from_end]
    if b % multiple and b != a:
      return f"dim -{rank_from_end} is {b}, neither a multiple of {multiple} nor {a}"
  return None


def block_violations(eqn) -> list[str]:
  """The blocks of one pallas_call that Mosaic would refuse, and a grid whose dimension
  semantics do not give one entry per grid axis."""
  grid_mapping = eqn.params["grid_mapping"]
  bad = [f"{kernel_name(eqn)}: block {_dims(bm)} of array {bm.array_aval.shape} in "
         f"{_memory_space(bm)}: {why}"
         for bm in grid_mapping.block_mappings if (why := _block_violation(bm))]
  semantics = getattr(eqn.params.get("compiler_params"), "dimension_semantics", None)
  grid_rank = len(grid_mapping.grid) - len(grid_mapping.vmapped_dims)
  if semantics is not None and len(semantics) != grid_rank:
    bad.append(f"{kernel_name(eqn)}: {len(semantics)} dimension semantics for a grid of rank "
               f"{grid_rank}")
  return bad


def vmem_bytes(eqn) -> int:
  """VMEM one pallas_call needs: each VMEM block twice (the pipeline's double buffer) + the
  VMEM scratch. Mosaic's internal scratch for intermediates is not counted."""
  grid_mapping = eqn.params["grid_mapping"]
  total = sum(2 * _tile_bytes(_dims(bm), bm.array_aval.dtype)
              for bm in grid_mapping.block_mappings if _memory_space(bm) == "vmem")
  for aval in grid_mapping.scratch_avals:
    if str(getattr(aval, "memory_space", "vmem")).lower() == "vmem":
      total += _tile_bytes(aval.shape, aval.dtype)
  return total


def assert_mosaic_blocks(fn, *args, budget=VMEM_BUDGET):
  """Every pallas_call of fn(*args) has Mosaic-legal blocks within the VMEM budget; returns the
  largest VMEM use in bytes."""
  calls = pallas_calls(fn, *args)
  assert calls, "no pallas_call traced"
  bad = [v for eqn in calls for v in block_violations(eqn)]
  assert not bad, "\n".join(bad)
  uses = [(kernel_name(eqn), vmem_bytes(eqn)) for eqn in calls]
  over = [f"{name} {use / 2**20:.1f} MiB" for name, use in uses if use > budget]
  assert not over, f"VMEM over {budget / 2**20:.0f} MiB: " + ", ".join(over)
  return max(use for _, use in uses)
