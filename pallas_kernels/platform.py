"""Where a kernel runs: interpret mode on CPU, compiled Pallas on GPU and TPU.

`interpret` takes three kinds of value: None (interpret on CPU, compile elsewhere), a bool, or a
`pltpu.InterpretParams`, which runs the kernel's TPU form (Mosaic block sizes, grid form and
memory spaces) in Pallas's TPU interpreter on CPU: the tests' stand-in for a TPU.
"""

import jax
from jax.experimental.pallas import tpu as pltpu

Interpret = bool | pltpu.InterpretParams | None


def backend() -> str:
  """The default JAX backend: 'cpu', 'gpu' or 'tpu'."""
  return jax.default_backend()


def resolve_interpret(interpret: Interpret) -> bool | pltpu.InterpretParams:
  """`interpret=None` means: interpret on CPU, compile everywhere else."""
  if interpret is None:
    return backend() == "cpu"
  if isinstance(interpret, pltpu.InterpretParams):
    return interpret
  return bool(interpret)


def target(interpret: Interpret) -> str:
  """The form a kernel takes: 'gpu' or 'tpu' compiled, 'tpu' under the TPU interpreter,
  'interpret' under plain interpret mode."""
  interpret = resolve_interpret(interpret)
  if isinstance(interpret, pltpu.InterpretParams):
    return "tpu"
  return "interpret" if interpret else backend()
