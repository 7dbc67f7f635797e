"""gmm / tgmm Pallas kernels (interpret mode, both grid forms) against pallas_kernels.reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from pallas_kernels.gmm import BlockSizes, _group_offsets, _group_tiles, gmm, tgmm
import tpu_rules

M, K, N, G = 50, 40, 24, 6   # with 16-blocks every dim has a tail


def _random_sizes(seed):
  """Random group sizes with sum <= M; a skewed split leaves some groups empty."""
  rng = np.random.default_rng(seed)
  return rng.multinomial(rng.integers(M // 2, M + 1), rng.dirichlet(np.full(G, 0.5))).tolist()


FORMS = {
    "parallel": None,        # the CPU default: BlockSizes(16, 16, 16), one program per tile
    "sequential": BlockSizes(16, 16, 16, sequential_grid=True),   # megablox / Mosaic TPU form
}
GROUP_SIZES = [
    [0, 7, 1, 0, 20, 0],     # empty first, middle and last groups; rows past the sum
    [1, 1, 13, 1, 16, 1],    # single-row groups
    [0, 0, 50, 0, 0, 0],     # one group holds everything
    [9, 3, 14, 8, 10, 6],    # sum == M
    [0, 0, 0, 0, 0, 0],      # nothing routed: all zeros
] + [_random_sizes(seed) for seed in range(4)]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _operands(m, k, n, g, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(ks[0], (m, k)) / np.sqrt(k)
  rhs = jax.random.normal(ks[1], (g, k, n)) / np.sqrt(k)
  cot = jax.random.normal(ks[2], (m, n))
  return lhs.astype(dtype), rhs.astype(dtype), cot.astype(dtype)


def _close(actual, expected, tol):
  expected = np.asarray(expected, np.float32)
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=tol, atol=tol * scale)


@functools.cache
def _fwd_and_vjp(fn):
  """jit(lhs, rhs, sizes, cot -> out, d lhs, d rhs, d sizes), cached per fn: one compile per
  shape, whatever the group sizes."""
  @jax.jit
  def run(lhs, rhs, group_sizes, cot):
    out, vjp = jax.vjp(fn, lhs, rhs, group_sizes)
    return out, *vjp(cot)
  return run


def _check_fwd_and_vjp(block_sizes, lhs, rhs, cot, sizes_list):
  kernel = _fwd_and_vjp(functools.partial(gmm, block_sizes=block_sizes))
  ref = _fwd_and_vjp(reference.gmm)
  tol = TOL[lhs.dtype.type]
  for sizes in sizes_list:
    group_sizes = jnp.array(sizes, jnp.int32)
    out, d_lhs, d_rhs, d_sizes = kernel(lhs, rhs, group_sizes, cot)
    ref_out, ref_d_lhs, ref_d_rhs, _ = ref(lhs, rhs, group_sizes, cot)
    assert out.dtype == lhs.dtype and d_lhs.dtype == lhs.dtype and d_rhs.dtype == rhs.dtype
    assert d_sizes.dtype == jax.dtypes.float0
    _close(out, ref_out, tol)
    _close(d_lhs, ref_d_lhs, tol)
    _close(d_rhs, ref_d_rhs, tol)
    # Rows past the routed ones are exactly zero, forward and backward.
    assert not np.any(np.asarray(out[sum(sizes):], np.float32))
    assert not np.any(np.asarray(d_lhs[sum(sizes):], np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("form", FORMS)
def test_gmm_forward_and_gradients(form, dtype):
  lhs, rhs, cot = _operands(M, K, N, G, dtype)
  with jax.default_matmul_precision("highest"):
    _check_fwd_and_vjp(FORMS[form], lhs, rhs, cot, GROUP_SIZES)


@pytest.mark.parametrize("form", FORMS)
def test_gmm_fewer_rows_than_a_block(form):
  lhs, rhs, cot = _operands(5, 16, 16, 3, jnp.float32, seed=1)
  with jax.default_matmul_precision("highest"):
    _check_fwd_and_vjp(FORMS[form], lhs, rhs, cot, [[2, 0, 3], [0, 5, 0], [1, 0, 0], [0, 0, 1]])


@pytest.mark.parametrize("form", FORMS)
def test_tgmm(form):
  lhs, _, grad = _operands(M, K, N, G, jnp.float32, seed=2)
  kernel = jax.jit(functools.partial(tgmm, block_sizes=FORMS[form]))
  with jax.default_matmul_precision("highest"):
    for sizes in GROUP_SIZES:
      group_sizes = jnp.array(sizes, jnp.int32)
      out = kernel(lhs, grad, group_sizes)
      assert out.shape == (G, K, N) and out.dtype == jnp.float32
      _close(out, reference.tgmm(lhs, grad, group_sizes), TOL[jnp.float32])
      assert not np.any(np.asarray(out)[np.asarray(sizes) == 0])   # empty groups: zeros


def test_tgmm_k_tile_tunes_apart_from_gmm():
  """tgmm_block_k tiles tgmm's output rows (32 over K = 40: a tail) while gmm and its input
  gradient keep block_k 16; the gradient through gmm is still exact."""
  bs = BlockSizes(16, 16, 16, tgmm_block_k=32)
  lhs, rhs, cot = _operands(M, K, N, G, jnp.float32, seed=3)
  sizes = jnp.array(GROUP_SIZES[0], jnp.int32)
  grads = jax.grad(lambda a, w: jnp.sum(gmm(a, w, sizes, block_sizes=bs) * cot), argnums=(0, 1))
  grids = {tpu_rules.kernel_name(eqn): eqn.params["grid_mapping"].grid
           for eqn in tpu_rules.pallas_calls(grads, lhs, rhs)}
  assert grids["tgmm"] == (G, 2, 2)                   # K tiles of 32, N tiles of 16
  assert set(grids) == {"gmm", "gmm_rhs_t", "tgmm"}
  with jax.default_matmul_precision("highest"):
    _check_fwd_and_vjp(bs, lhs, rhs, cot, GROUP_SIZES[:2])


def test_block_sizes_per_platform():
  assert BlockSizes.get_default("cpu") == BlockSizes(16, 16, 16)
  for name in ("gpu", "tpu"):
    bs = BlockSizes.get_default(name)
    for b in (bs.block_m, bs.block_k, bs.block_n, bs.for_tgmm().block_k):
      assert b >= 16 and b & (b - 1) == 0   # Triton: powers of two, dot dims >= 16
  tpu = BlockSizes.get_default("tpu")
  assert tpu.sequential_grid and tpu.block_m % 8 == 0
  assert tpu.block_k % 128 == 0 and tpu.block_n % 128 == 0


@pytest.mark.parametrize("sizes", GROUP_SIZES)
def test_parallel_tiles_cover_every_row_once_within_one_group(sizes):
  """The GPU form's row tiles: each lies inside one group (the tail of unrouted rows is group
  G), together they cover the M rows exactly once (no two programs store the same row), and
  there is one per cdiv(size, block_m) of every group."""
  bm = 16
  offsets = _group_offsets(jnp.array(sizes, jnp.int32), M)
  offsets = jnp.concatenate([offsets, jnp.full((1,), M, jnp.int32)])
  num_tiles = -(-M // bm) + G
  group, start, end = map(np.asarray, _group_tiles(offsets, bm, num_tiles))
  offsets = np.asarray(offsets)
  covered = np.zeros(M, int)
  for g, lo, hi in zip(group, start, end):
    assert 0 <= g <= G and hi - lo <= bm
    if hi > lo:
      assert offsets[g] <= lo and hi <= offsets[g + 1]
      covered[lo:hi] += 1
  assert covered.tolist() == [1] * M
  real_sizes = np.diff(offsets)
  assert np.sum(end > start) == np.sum(-(-real_sizes // bm))
