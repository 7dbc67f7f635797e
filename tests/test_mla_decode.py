"""mla_decode Pallas kernel (interpret mode, both grid forms) against
pallas_kernels.reference.mla_decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from pallas_kernels.mla_decode import BlockSizes, _split_sizes, mla_decode

S, DC, DR = 37, 32, 16   # S is not a multiple of block_s; Dc != Dr
NO_SPLIT = BlockSizes(block_s=8)
SPLIT = BlockSizes(block_s=8, min_programs=64)   # flash-decoding: 5 splits of 8
HEAD_BLOCKS = BlockSizes(block_s=16, block_h=2, min_heads=4, min_programs=32)
SEQUENTIAL = BlockSizes(block_s=8, sequential_grid=True)   # the Mosaic TPU form
SEQUENTIAL_HEAD_BLOCKS = BlockSizes(block_s=16, block_h=2, min_heads=4, sequential_grid=True)
# Empty row, one entry, the full cache, a block end, a length inside a block, random ones.
LENGTHS = [0, 1, S, 8, 17] + np.random.default_rng(0).integers(0, S + 1, size=3).tolist()
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _check(h, lengths, dtype, block_sizes, s=S, seed=0):
  b = len(lengths)
  ks = jax.random.split(jax.random.key(seed), 4)
  operands = [jax.random.normal(k, shape).astype(dtype) for k, shape in
              zip(ks, [(b, h, DC), (b, h, DR), (b, s, DC), (b, s, DR)])]
  lengths = jnp.asarray(lengths, jnp.int32)
  scale = (DC + DR) ** -0.5
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda *a: mla_decode(*a, sm_scale=scale, block_sizes=block_sizes))(
        *operands, lengths)
    expected = jax.jit(lambda *a: reference.mla_decode(*a, sm_scale=scale))(*operands, lengths)
  assert out.shape == (b, h, DC) and out.dtype == dtype
  out = np.asarray(out, np.float32)
  tol = TOL[dtype]
  np.testing.assert_allclose(out, np.asarray(expected, np.float32), rtol=tol, atol=tol)
  assert not np.any(out[np.asarray(lengths) == 0])   # length 0 -> exact zeros


@pytest.mark.parametrize("block_sizes", [NO_SPLIT, SPLIT, SEQUENTIAL],
                         ids=["one_split", "split", "sequential"])
def test_matches_reference(block_sizes):
  _check(3, LENGTHS, jnp.float32, block_sizes)


@pytest.mark.parametrize("block_sizes", [SPLIT, SEQUENTIAL], ids=["split", "sequential"])
def test_bfloat16(block_sizes):
  _check(3, LENGTHS, jnp.bfloat16, block_sizes, seed=1)


def test_single_head():
  _check(1, [S, 23], jnp.float32, SPLIT, seed=2)


@pytest.mark.parametrize("block_sizes", [HEAD_BLOCKS, SEQUENTIAL_HEAD_BLOCKS],
                         ids=["split", "sequential"])
def test_head_blocks(block_sizes):
  # 6 heads padded to 8, two heads per program: 4 head blocks (x 2 splits per row when split).
  _check(6, LENGTHS[:4], jnp.float32, block_sizes, seed=3)


def test_default_block_sizes():
  # The CPU default block (128) is longer than the whole cache; a length past S means S.
  _check(4, [0, 5, 30, S + 9], jnp.float32, None, seed=4)


def test_split_choice():
  # Flash-decoding splits the cache only while the grid is below min_programs.
  assert _split_sizes(5, S, 1, NO_SPLIT) == (40, 1)
  assert _split_sizes(5, S, 1, SPLIT) == (8, 5)                  # one block per split
  assert _split_sizes(64, S, 1, SPLIT)[1] == 1                   # enough rows: no split
  assert _split_sizes(4, S, 4, HEAD_BLOCKS) == (32, 2)           # head blocks count too
  bounded = BlockSizes(block_s=8, max_split=16)
  assert _split_sizes(1, S, 1, bounded) == (16, 3)


@pytest.mark.parametrize("field", ["block_s", "block_h", "min_heads"])
def test_block_sizes_must_be_powers_of_two(field):
  # block_h=3 of 8 padded heads used to leave heads 6 and 7 unwritten (NaN, or garbage).
  with pytest.raises(ValueError, match=f"powers of two.*{field}"):
    BlockSizes(**{field: 6})


def test_empty_cache_is_refused():
  q = jnp.zeros((2, 4, DC))
  with pytest.raises(ValueError, match="at least one entry"):
    mla_decode(q, q[..., :DR], jnp.zeros((2, 0, DC)), jnp.zeros((2, 0, DR)),
               jnp.zeros((2,), jnp.int32), sm_scale=1.0)
