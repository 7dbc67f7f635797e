"""mla_decode Pallas kernel (interpret mode) against pallas_kernels.reference.mla_decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from pallas_kernels.mla_decode import MlaDecodeBlockSizes, _split_sizes, mla_decode

S, DC, DR = 37, 32, 16   # S is not a multiple of block_s; Dc != Dr
NO_SPLIT = MlaDecodeBlockSizes(block_s=8)
SPLIT = MlaDecodeBlockSizes(block_s=8, min_programs=64)             # flash-decoding splits
HEAD_BLOCKS = MlaDecodeBlockSizes(block_s=16, block_h=2, min_heads=4, min_programs=8)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _operands(b, h, s, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q_latent = jax.random.normal(ks[0], (b, h, DC))
  q_rope = jax.random.normal(ks[1], (b, h, DR))
  kv_latent = jax.random.normal(ks[2], (b, s, DC))
  k_rope = jax.random.normal(ks[3], (b, s, DR))
  return [x.astype(dtype) for x in (q_latent, q_rope, kv_latent, k_rope)]


def _check(b, h, lengths, dtype, block_sizes, s=S, seed=0):
  operands = _operands(b, h, s, dtype, seed)
  lengths = jnp.asarray(lengths, jnp.int32)
  scale = (DC + DR) ** -0.5
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda *a: mla_decode(*a, sm_scale=scale, block_sizes=block_sizes))(
        *operands, lengths)
    expected = reference.mla_decode(*operands, lengths, sm_scale=scale)
  assert out.shape == (b, h, DC) and out.dtype == dtype
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32),
                             rtol=tol, atol=tol)
  zero_rows = np.asarray(lengths) == 0
  assert not np.any(np.asarray(out, np.float32)[zero_rows])   # length 0 -> exact zeros


@pytest.mark.parametrize("block_sizes", [NO_SPLIT, SPLIT], ids=["one_split", "split"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_lengths_edge_cases(dtype, block_sizes):
  # Empty row, a single entry, the full cache, and lengths inside / at the end of a block.
  _check(5, 3, [0, 1, S, 8, 17], dtype, block_sizes)


@pytest.mark.parametrize("block_sizes", [NO_SPLIT, SPLIT, HEAD_BLOCKS, None],
                         ids=["one_split", "split", "head_blocks", "default"])
def test_random_lengths(block_sizes):
  lengths = np.random.default_rng(0).integers(0, S + 1, size=4)
  _check(4, 4, lengths, jnp.float32, block_sizes, seed=1)


@pytest.mark.parametrize("block_sizes", [NO_SPLIT, SPLIT], ids=["one_split", "split"])
def test_single_head(block_sizes):
  _check(2, 1, [S, 23], jnp.float32, block_sizes, seed=2)


def test_larger_batch_bf16():
  lengths = np.random.default_rng(3).integers(1, 65, size=8)
  _check(8, 4, lengths, jnp.bfloat16, SPLIT, s=64, seed=3)


def test_split_choice():
  # Flash-decoding splits the cache only while the grid is below min_programs.
  assert _split_sizes(5, S, 1, NO_SPLIT) == (40, 1)
  assert _split_sizes(5, S, 1, SPLIT) == (8, 5)                  # one block per split
  assert _split_sizes(64, S, 1, SPLIT)[1] == 1                   # enough rows: no split
  bounded = MlaDecodeBlockSizes(block_s=8, max_split=16)
  assert _split_sizes(1, S, 1, bounded) == (16, 3)
