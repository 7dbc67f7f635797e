"""Where a kernel runs: interpret mode on CPU, compiled Pallas on GPU and TPU."""

import jax


def backend() -> str:
  """The default JAX backend: 'cpu', 'gpu' or 'tpu'."""
  return jax.default_backend()


def resolve_interpret(interpret: bool | None) -> bool:
  """`interpret=None` means: interpret on CPU, compile everywhere else."""
  if interpret is None:
    return backend() == "cpu"
  return bool(interpret)
