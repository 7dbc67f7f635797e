"""Grouped matmul (`gmm`) and its transpose (`tgmm`) in Pallas, after JAX's megablox.

lhs [M,K] holds rows sorted by group: group g owns rows [offsets[g], offsets[g+1]). Every
kernel masks the rows outside the group it is working on (with `where` or masked loads, never
trusting out-of-bounds padding). Two forms of each kernel, picked by `BlockSizes.sequential_grid`:

- parallel (Triton on GPU; the default under interpret mode on CPU): row tiles start at their
  group's first row, so no tile mixes groups and only a group's last tile is partly empty
  (block_m / 2 rows per group wasted on average, against a whole extra tile per boundary when
  tiles are aligned to block_m). gmm runs one program per (n tile, group tile), each a single
  loop over k; tgmm's (group, k tile, n tile) program loops over its group's row tiles.
  Operands stay whole in memory and are read with masked loads at any row offset (no scalar
  prefetch or scratch: Triton has neither), and no two programs write the same output rows.
- sequential (Mosaic TPU): megablox's form. Block indices must be multiples of the block, so
  row tiles are aligned to block_m and may straddle groups. Scalar-prefetched metadata maps
  each step of the grid axis `visits` to a (group, m tile) pair; the grid runs in order and
  accumulates in a float32 VMEM scratch, and each visit writes only its group's rows of the
  output block.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import checks, platform
from pallas_kernels.platform import pltriton


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and compiler settings of gmm / tgmm; `get_default` gives the defaults.

  Triton needs power-of-two blocks of at least 16 (dot dims); Mosaic TPU needs block_m a
  multiple of 8 and block_k, block_n multiples of 128.
  """
  block_m: int = 128
  block_k: int = 128
  block_n: int = 128
  # tgmm's K tile is an output tile (rows of the [K,N] weight gradient), gmm's a reduction
  # tile: they tune apart. None: block_k.
  tgmm_block_k: int | None = None
  sequential_grid: bool = False   # megablox's in-order grid (Mosaic TPU) vs one program per tile
  num_warps: int | None = None    # Triton only
  num_stages: int | None = None   # Triton only

  def for_tgmm(self) -> "BlockSizes":
    """The tiling tgmm runs with: its K tile from tgmm_block_k when set."""
    return dataclasses.replace(self, block_k=self.tgmm_block_k or self.block_k)

  @classmethod
  def get_default(cls, name: str | None = None, dtype=jnp.bfloat16) -> "BlockSizes":
    name = name or platform.backend()
    if name == "gpu":   # tuned on an H200 (see RESULTS.md, 2026-12-04)
      if jnp.dtype(dtype).itemsize >= 4:   # float32: tgmm's 3 stages of 64-wide k fit no SM
        return cls(128, 32, 128, num_warps=8, num_stages=3)
      # tgmm is faster at a K tile of 128, gmm at 64 (see RESULTS.md, 2026-12-04 sweep).
      return cls(128, 64, 128, tgmm_block_k=128, num_warps=8, num_stages=3)
    if name == "tpu":
      return cls(128, 128, 128, sequential_grid=True)
    return cls(16, 16, 16)     # CPU interpret mode: small blocks, fast tests that hit the tails


def _compiler_params(bs: BlockSizes, interpret, semantics: tuple[str, ...]):
  return platform.compiler_params(interpret, semantics, num_warps=bs.num_warps,
                                  num_stages=bs.num_stages)


def _gmm_name(transpose_rhs: bool) -> str:
  """The pallas_call's name: gmm, or gmm_rhs_t for the input gradient (rhs read transposed)."""
  return "gmm_rhs_t" if transpose_rhs else "gmm"


def _group_offsets(group_sizes, m):
  """[G+1] int32 row offsets of the groups; groups are cut off at row m."""
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends]).astype(jnp.int32)


def _group_tiles(offsets, block_m, num_tiles):
  """Parallel form's metadata: program -> (group, first row, end row) of its row tile.

  Group g's rows are cut into cdiv(size_g, block_m) tiles from offsets[g] on. Programs past the
  last tile get group G - 1 and an empty row range, so they load and store nothing.
  """
  sizes = offsets[1:] - offsets[:-1]
  count = (sizes + block_m - 1) // block_m
  cum = jnp.cumsum(count)
  tile = jnp.arange(num_tiles, dtype=jnp.int32)
  group = jnp.minimum(jnp.searchsorted(cum, tile, side="right"), sizes.shape[0] - 1)
  start = offsets[group] + (tile - (cum - count)[group]) * block_m
  start = jnp.where(tile < cum[-1], start, 0)
  end = jnp.where(tile < cum[-1], jnp.minimum(start + block_m, offsets[group + 1]), 0)
  return group.astype(jnp.int32), start.astype(jnp.int32), end.astype(jnp.int32)


def _visits(offsets, m, block_m, num_visits, *, visit_empty):
  """Sequential form's metadata: grid step -> (group, m tile), in row order.

  Each group visits every m tile its rows touch; an empty group visits one tile if
  `visit_empty` (tgmm must zero its output), else none. Steps past the last real visit repeat
  it, so the output block stays put; `num` [1] counts the real ones.
  """
  tiles_m = pl.cdiv(m, block_m)
  starts, ends = offsets[:-1], offsets[1:]
  first = jnp.minimum(starts // block_m, tiles_m - 1)
  count = jnp.where(ends > starts, (ends - 1) // block_m - first + 1, int(visit_empty))
  cum = jnp.cumsum(count)
  step = jnp.minimum(jnp.arange(num_visits, dtype=jnp.int32), cum[-1] - 1)
  group_ids = jnp.searchsorted(cum, step, side="right").astype(jnp.int32)
  tile_ids = first[group_ids] + step - (cum - count)[group_ids]
  return group_ids, tile_ids.astype(jnp.int32), cum[-1:].astype(jnp.int32)


# ----------------------------------------------------------------------------------- gmm


def _gmm_parallel_kernel(group_ref, start_ref, end_ref, lhs_ref, rhs_ref, out_ref, *,
                         k, n, bm, bk, bn, num_groups, transpose_rhs, dtype):
  n_i, t = pl.program_id(0), pl.program_id(1)
  g, start = group_ref[t], start_ref[t]
  in_tile = start + jnp.arange(bm) < end_ref[t]   # this group's rows; the others load as zeros
  cols = n_i * bn + jnp.arange(bn)

  def k_step(k_i, acc):
    ks = k_i * bk + jnp.arange(bk)
    x = pltriton.load(lhs_ref.at[pl.ds(start, bm), pl.ds(k_i * bk, bk)],
                      mask=in_tile[:, None] & (ks < k)[None, :], other=0)
    if transpose_rhs:   # rhs [G,N,K]: both tiles contract on their last dim
      w = pltriton.load(rhs_ref.at[g, pl.ds(n_i * bn, bn), pl.ds(k_i * bk, bk)],
                        mask=(cols < n)[:, None] & (ks < k)[None, :], other=0)
    else:               # rhs [G,K,N]
      w = pltriton.load(rhs_ref.at[g, pl.ds(k_i * bk, bk), pl.ds(n_i * bn, bn)],
                        mask=(ks < k)[:, None] & (cols < n)[None, :], other=0)
    dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
    return acc + jax.lax.dot_general(x.astype(dtype), w.astype(dtype), dims,
                                     preferred_element_type=jnp.float32)

  # The tail group (rows past the last real group) does no k steps and stores zeros.
  # (Arithmetic, not `where` on literals, which Triton's select lowering mistypes.)
  num_k = (g < num_groups).astype(jnp.int32) * pl.cdiv(k, bk)
  acc = jax.lax.fori_loop(0, num_k, k_step, jnp.zeros((bm, bn), jnp.float32))
  pltriton.store(out_ref.at[pl.ds(start, bm), pl.ds(n_i * bn, bn)], acc.astype(out_ref.dtype),
                 mask=in_tile[:, None] & (cols < n)[None, :])


def _gmm_parallel(lhs, rhs, offsets, bs, interpret, transpose_rhs):
  (m, k), n = lhs.shape, rhs.shape[1 if transpose_rhs else 2]
  bm, bk, bn = bs.block_m, bs.block_k, bs.block_n
  g = rhs.shape[0]
  # Rows past the last group form a tail group G, whose tiles store zeros. G + 1 groups cut
  # into group-relative tiles need at most cdiv(m, bm) + G of them.
  offsets = jnp.concatenate([offsets, jnp.full((1,), m, jnp.int32)])
  num_tiles = pl.cdiv(m, bm) + g
  kernel = functools.partial(_gmm_parallel_kernel, k=k, n=n, bm=bm, bk=bk, bn=bn,
                             num_groups=g, transpose_rhs=transpose_rhs,
                             dtype=jnp.promote_types(lhs.dtype, rhs.dtype))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), lhs.dtype),
      grid=(pl.cdiv(n, bn), num_tiles),
      compiler_params=_compiler_params(bs, interpret, ("parallel",) * 2),
      interpret=interpret,
      name=_gmm_name(transpose_rhs),
  )(*_group_tiles(offsets, bm, num_tiles), lhs, rhs)


def _zero_past(x, dim, limit):
  """x with the entries at index >= limit along dim set to zero (masked in float32)."""
  keep = jax.lax.broadcasted_iota(jnp.int32, x.shape, dim) < limit
  return jnp.where(keep, x.astype(jnp.float32), 0).astype(x.dtype)


def _gmm_sequential_kernel(offsets_ref, group_ids_ref, tile_ids_ref, num_ref,
                           lhs_ref, rhs_ref, out_ref, acc_ref, *,
                           k, bm, bk, tiles_k, num_groups, transpose_rhs, dtype):
  v, k_i = pl.program_id(1), pl.program_id(2)
  g = group_ids_ref[v]
  rows = tile_ids_ref[v] * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
  in_group = (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])
  real = v < num_ref[0]   # steps past the last visit do nothing

  @pl.when(k_i == 0)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  # Group `num_groups` is the tail of rows past the last group: nothing to multiply. Rows of
  # other groups are multiplied too but never stored.
  @pl.when(real & (g < num_groups))
  def _accumulate():
    x, w = lhs_ref[...], rhs_ref[...]
    if k % bk:   # zero the k tail of both tiles: reads past K are garbage
      x = _zero_past(x, 1, k - k_i * bk)
      w = _zero_past(w, 1 if transpose_rhs else 0, k - k_i * bk)
    dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
    acc_ref[...] += jax.lax.dot_general(x.astype(dtype), w.astype(dtype), dims,
                                        preferred_element_type=jnp.float32)

  # Write this group's rows; rows of other groups keep what their own visits wrote.
  @pl.when(real & (k_i == tiles_k - 1))
  def _store():
    out_ref[...] = jnp.where(in_group, acc_ref[...],
                             out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def _gmm_sequential(lhs, rhs, offsets, bs, interpret, transpose_rhs):
  (m, k), n = lhs.shape, rhs.shape[1 if transpose_rhs else 2]
  bm, bk, bn = bs.block_m, bs.block_k, bs.block_n
  g = rhs.shape[0]
  tiles_m, tiles_k = pl.cdiv(m, bm), pl.cdiv(k, bk)
  # Rows past the last group form a tail group G, whose visits write zeros.
  offsets = jnp.concatenate([offsets, jnp.full((1,), m, jnp.int32)])
  group_ids, tile_ids, num = _visits(offsets, m, bm, tiles_m + g, visit_empty=False)
  rhs_block = (None, bn, bk) if transpose_rhs else (None, bk, bn)

  def rhs_map(n_i, v, k_i, offsets, group_ids, tile_ids, num):
    group = jnp.minimum(group_ids[v], g - 1)
    return (group, n_i, k_i) if transpose_rhs else (group, k_i, n_i)

  kernel = functools.partial(_gmm_sequential_kernel, k=k, bm=bm, bk=bk, tiles_k=tiles_k,
                             num_groups=g, transpose_rhs=transpose_rhs,
                             dtype=jnp.promote_types(lhs.dtype, rhs.dtype))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), lhs.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(pl.cdiv(n, bn), tiles_m + g, tiles_k),
          in_specs=[
              pl.BlockSpec((bm, bk), lambda n_i, v, k_i, o, gi, ti, nv: (ti[v], k_i)),
              pl.BlockSpec(rhs_block, rhs_map),
          ],
          out_specs=pl.BlockSpec((bm, bn), lambda n_i, v, k_i, o, gi, ti, nv: (ti[v], n_i)),
          scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      ),
      compiler_params=_compiler_params(bs, interpret, ("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name=_gmm_name(transpose_rhs),
  )(offsets, group_ids, tile_ids, num, lhs, rhs)


def _gmm(lhs, rhs, group_sizes, bs, interpret, transpose_rhs=False):
  offsets = _group_offsets(group_sizes, lhs.shape[0])
  impl = _gmm_sequential if bs.sequential_grid else _gmm_parallel
  return impl(lhs, rhs, offsets, bs, interpret, transpose_rhs)


# ---------------------------------------------------------------------------------- tgmm


def _tgmm_parallel_kernel(offsets_ref, lhs_ref, grad_ref, out_ref, *, k, n, bm, bk, bn, dtype):
  g, k_i, n_i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = offsets_ref[g], offsets_ref[g + 1]
  ks = k_i * bk + jnp.arange(bk)
  ns = n_i * bn + jnp.arange(bn)

  def m_step(t, acc):
    # Row tile t of group g, from the group's first row; rows of the next group load as zeros.
    first = start + t * bm
    in_group = (first + jnp.arange(bm) < end)[:, None]
    x = pltriton.load(lhs_ref.at[pl.ds(first, bm), pl.ds(k_i * bk, bk)],
                      mask=in_group & (ks < k)[None, :], other=0)
    y = pltriton.load(grad_ref.at[pl.ds(first, bm), pl.ds(n_i * bn, bn)],
                      mask=in_group & (ns < n)[None, :], other=0)
    return acc + jax.lax.dot_general(x.astype(dtype), y.astype(dtype), (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  # The group's row tiles; an empty group runs none and stores zeros.
  acc = jax.lax.fori_loop(0, pl.cdiv(end - start, bm), m_step, jnp.zeros((bk, bn), jnp.float32))
  pltriton.store(out_ref.at[g, pl.ds(k_i * bk, bk), pl.ds(n_i * bn, bn)], acc,
                 mask=(ks < k)[:, None] & (ns < n)[None, :])


def _tgmm_parallel(lhs, grad, offsets, bs, interpret):
  (_, k), n, g = lhs.shape, grad.shape[1], offsets.shape[0] - 1
  bm, bk, bn = bs.block_m, bs.block_k, bs.block_n
  kernel = functools.partial(_tgmm_parallel_kernel, k=k, n=n, bm=bm, bk=bk, bn=bn,
                             dtype=jnp.promote_types(lhs.dtype, grad.dtype))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((g, k, n), jnp.float32),
      grid=(g, pl.cdiv(k, bk), pl.cdiv(n, bn)),
      compiler_params=_compiler_params(bs, interpret, ("parallel",) * 3),
      interpret=interpret,
      name="tgmm",
  )(offsets, lhs, grad)


def _tgmm_sequential_kernel(offsets_ref, group_ids_ref, tile_ids_ref, num_ref,
                            lhs_ref, grad_ref, out_ref, acc_ref, *, bm, num_visits, dtype):
  v = pl.program_id(2)
  g = group_ids_ref[v]
  start, end = offsets_ref[g], offsets_ref[g + 1]
  prev_g = group_ids_ref[jnp.maximum(v - 1, 0)]
  next_g = group_ids_ref[jnp.minimum(v + 1, num_visits - 1)]

  @pl.when((v == 0) | (prev_g != g))
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when((end > start) & (v < num_ref[0]))
  def _accumulate():
    rows = tile_ids_ref[v] * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    in_group = (rows >= start) & (rows < end)
    x = jnp.where(in_group, lhs_ref[...].astype(jnp.float32), 0)
    y = jnp.where(in_group, grad_ref[...].astype(jnp.float32), 0)
    acc_ref[...] += jax.lax.dot(x.T.astype(dtype), y.astype(dtype),
                                preferred_element_type=jnp.float32)

  # The group's last visit writes its block (zeros for an empty group).
  @pl.when((v == num_visits - 1) | (next_g != g))
  def _store():
    out_ref[...] = acc_ref[...]


def _tgmm_sequential(lhs, grad, offsets, bs, interpret):
  (m, k), n, g = lhs.shape, grad.shape[1], offsets.shape[0] - 1
  bm, bk, bn = bs.block_m, bs.block_k, bs.block_n
  num_visits = pl.cdiv(m, bm) + g - 1
  group_ids, tile_ids, num = _visits(offsets, m, bm, num_visits, visit_empty=True)
  kernel = functools.partial(_tgmm_sequential_kernel, bm=bm, num_visits=num_visits,
                             dtype=jnp.promote_types(lhs.dtype, grad.dtype))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((g, k, n), jnp.float32),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(pl.cdiv(k, bk), pl.cdiv(n, bn), num_visits),
          in_specs=[
              pl.BlockSpec((bm, bk), lambda k_i, n_i, v, o, gi, ti, nv: (ti[v], k_i)),
              pl.BlockSpec((bm, bn), lambda k_i, n_i, v, o, gi, ti, nv: (ti[v], n_i)),
          ],
          out_specs=pl.BlockSpec((None, bk, bn),
                                 lambda k_i, n_i, v, o, gi, ti, nv: (gi[v], k_i, n_i)),
          scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
      ),
      compiler_params=_compiler_params(bs, interpret, ("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="tgmm",
  )(offsets, group_ids, tile_ids, num, lhs, grad)


# -------------------------------------------------------------------------------- public


def tgmm(lhs, grad, group_sizes, *, interpret=None, block_sizes: BlockSizes | None = None):
  """Transposed grouped matmul, the rhs gradient of `gmm`: out[g] = lhs_g^T grad_g.

  lhs [M,K], grad [M,N], group_sizes [G] int32 -> [G,K,N] float32; empty groups give zeros.
  """
  checks.tgmm(lhs, grad, group_sizes)
  bs = block_sizes or BlockSizes.get_default(platform.target(interpret), lhs.dtype)
  bs = bs.for_tgmm()
  offsets = _group_offsets(group_sizes, lhs.shape[0])
  impl = _tgmm_sequential if bs.sequential_grid else _tgmm_parallel
  return impl(lhs, grad, offsets, bs, platform.resolve_interpret(interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm_vjp(lhs, rhs, group_sizes, bs, interpret):
  return _gmm(lhs, rhs, group_sizes, bs, interpret)


def _gmm_vjp_fwd(lhs, rhs, group_sizes, bs, interpret):
  return _gmm(lhs, rhs, group_sizes, bs, interpret), (lhs, rhs, group_sizes)


def _gmm_vjp_bwd(bs, interpret, residuals, grad):
  lhs, rhs, group_sizes = residuals
  # d lhs = grad rhs_g^T per group (rhs read transposed in place); d rhs = tgmm.
  d_lhs = _gmm(grad, rhs, group_sizes, bs, interpret, transpose_rhs=True)
  d_rhs = tgmm(lhs, grad, group_sizes, interpret=interpret, block_sizes=bs)
  return d_lhs, d_rhs.astype(rhs.dtype), None


_gmm_vjp.defvjp(_gmm_vjp_fwd, _gmm_vjp_bwd)


def gmm(lhs, rhs, group_sizes, *, interpret=None, block_sizes: BlockSizes | None = None):
  """Grouped matmul: rows of lhs [M,K], sorted by group, times rhs[g] [K,N] of their group.

  group_sizes [G] int32 with sum <= M; rows past the sum produce zeros. -> [M,N] in lhs's dtype,
  accumulated in float32. Differentiable in lhs and rhs.
  """
  checks.gmm(lhs, rhs, group_sizes)
  bs = block_sizes or BlockSizes.get_default(platform.target(interpret), lhs.dtype)
  return _gmm_vjp(lhs, rhs, group_sizes.astype(jnp.int32), bs,
                  platform.resolve_interpret(interpret))
