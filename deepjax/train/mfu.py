"""Model FLOPs utilisation: achieved training FLOPs over the device's matmul peak.

Accelerators use their published dense peak for the compute dtype; a CPU has no such number,
so its peak is measured once per process with a large matmul in the compute dtype.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip (vendor figures); float32 matmuls on TPU run at the bf16 rate
# with default precision, on GPU we use the TF32 rate, half the bf16 one.
_PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def median_seconds(run, seconds: float = 1.0) -> float:
  """Median wall time of `run()` (which must finish its work before returning) over at least
  `seconds` of repeated calls (3 at least), after one untimed call."""
  run()
  times, deadline = [], time.perf_counter() + seconds
  while time.perf_counter() < deadline or len(times) < 3:
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(dtype_name: str = "float32", n: int = 1024, seconds: float = 1.0) -> float:
  """FLOP/s of repeated n x n x n matmuls on the default device (median of timed calls)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype_name))
  matmul = jax.jit(lambda x: x @ x)
  return 2 * n**3 / median_seconds(lambda: jax.block_until_ready(matmul(a)), seconds)


def peak_flops_per_device(dtype_name: str = "float32") -> float:
  device = jax.devices()[0]
  if device.platform != "cpu":
    for name, peak in _PEAK_BF16.items():
      if name.lower() in device.device_kind.lower():
        if device.platform == "gpu" and dtype_name == "float32":
          return peak / 2
        return peak
  return measured_matmul_flops(dtype_name)


def mfu(tokens_per_sec: float, flops_per_token: float, num_devices: int, peak: float) -> float:
  return tokens_per_sec * flops_per_token / (num_devices * peak)
