"""Pallas kernels for DeepSeek-style models, each beside a pure-jnp reference of the same signature.

`interpret=None` means: interpret mode on CPU, compiled on GPU and TPU.
"""

from pallas_kernels import reference
from pallas_kernels.dispatch import sort_by_expert
