"""Where a kernel runs: interpret mode on CPU, compiled Pallas on GPU and TPU.

`interpret` takes three kinds of value: None (interpret on CPU, compile elsewhere), a bool, or a
`pltpu.InterpretParams`, which runs the kernel's TPU form (Mosaic block sizes, grid form and
memory spaces) in Pallas's TPU interpreter on CPU: the tests' stand-in for a TPU.
"""

import contextlib
from collections.abc import Iterator, Sequence

import jax
from jax.experimental.pallas import tpu as pltpu

try:  # Pallas Triton: the portable GPU lowering's masked loads/stores and launch parameters
  from jax.experimental.pallas import triton as pltriton   # (deprecated since JAX 0.11)
except ImportError:  # a JAX without it still runs the TPU forms and interpret mode
  pltriton = None

Interpret = bool | pltpu.InterpretParams | None

_lowering_for: str | None = None


def backend() -> str:
  """The backend the kernels take their form for: 'cpu', 'gpu' or 'tpu'. The default JAX
  backend, unless inside `lowering_for`."""
  return _lowering_for or jax.default_backend()


@contextlib.contextmanager
def lowering_for(name: str) -> Iterator[None]:
  """Kernels traced inside take their compiled form for `name` ('gpu' or 'tpu') whatever this
  machine has, so that a program can be lowered here for another platform:

    with platform.lowering_for("gpu"):
      jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))

  The kernels' jitted pieces would otherwise reuse traces cached for the other form (their
  cache keys hold block sizes and flags, not the form), so JAX's caches are cleared on the way
  in and out: a tool's context, not one for a training loop.
  """
  global _lowering_for
  if name not in ("gpu", "tpu"):
    raise ValueError(f"lowering_for takes 'gpu' or 'tpu', got {name!r}")
  previous, _lowering_for = _lowering_for, name
  jax.clear_caches()
  try:
    yield
  finally:
    _lowering_for = previous
    jax.clear_caches()


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


def require_powers_of_two(kernel: str, **sizes: int | None) -> None:
  """Raises a ValueError naming the block sizes (None: unset) that are not powers of two."""
  bad = {k: v for k, v in sizes.items() if v is not None and (v < 1 or v & (v - 1))}
  if bad:
    raise ValueError(f"{kernel} block sizes must be powers of two, got {bad}")


def compiler_params(interpret: Interpret, semantics: Sequence[str], *,
                    num_warps: int | None = None, num_stages: int | None = None):
  """A pallas_call's compiler parameters for the form `target(interpret)` gives.

  GPU: Triton's launch parameters (passing them also selects the Triton lowering over Mosaic
  GPU). TPU, compiled or interpreted: Mosaic's `semantics` of the grid axes ('parallel' or
  'arbitrary', i.e. run in order). Plain interpret mode: none.
  """
  form = target(interpret)
  if form == "gpu":
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  if form == "tpu":
    return pltpu.CompilerParams(dimension_semantics=tuple(semantics))
  return None
