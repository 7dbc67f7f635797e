"""Shape arithmetic the kernels share: rounding, power-of-two feature pieces, padded head
counts, and the query chunks that bound a backward pass's memory."""

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MIN_DIM = 16  # Triton's smallest dot dimension


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def pieces(d: int) -> tuple[int, ...]:
  """Power-of-two widths (each >= 16) covering d: the binary digits of d rounded up to 16."""
  d = round_up(d, MIN_DIM)
  return tuple(1 << i for i in reversed(range(d.bit_length())) if d >> i & 1)


def head_tiling(heads: int, min_heads: int, block_h: int | None) -> tuple[int, int]:
  """(padded head count, heads per program): heads zero-padded to a power of two >= min_heads,
  at most block_h of them per program (None: all)."""
  h_pad = max(pl.next_power_of_2(heads), min_heads)
  return h_pad, min(h_pad, block_h or h_pad)


@dataclasses.dataclass(frozen=True)
class QueryChunks:
  """[B, T, ...] arrays as `count` chunks of `size` queries ([count, B, size, ...], T padded)
  and back: what a backward scans over so that its buffers hold one chunk at a time."""
  t: int
  size: int

  @classmethod
  def of(cls, t: int, most: int) -> "QueryChunks":
    return cls(t=t, size=min(most, t))

  @property
  def count(self) -> int:
    return -(-self.t // self.size)

  def split(self, x: jax.Array, fill=0) -> jax.Array:
    """[B, T, ...] -> [count, B, size, ...], padding rows filled with `fill`."""
    pad = self.count * self.size - self.t
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape((x.shape[0], self.count, self.size) + x.shape[2:]).swapaxes(0, 1)

  def join(self, x: jax.Array) -> jax.Array:
    """[count, B, size, ...] -> [B, T, ...]."""
    x = x.swapaxes(0, 1)
    return x.reshape((x.shape[0], self.count * self.size) + x.shape[3:])[:, :self.t]
