"""Pallas kernels for DeepSeek-style models, each beside a pure-jnp reference of the same signature.

`interpret=None` means: interpret mode on CPU, compiled on GPU and TPU. `pallas_kernels.reference`
holds the references; `xla_attention` the attention for training in plain XLA (chunked, with a
hand-written backward); `xla_sparse` DSA's sparse attention and indexer in plain XLA (query
chunks); `sort_by_expert` and `rank_within_group` the MoE dispatch metadata. The
kernels' float32 dots follow `jax.default_matmul_precision`, as XLA's do: TF32 on a GPU unless it
is "highest".
"""

from pallas_kernels import reference, xla_attention, xla_sparse
from pallas_kernels.dispatch import rank_within_group, sort_by_expert
from pallas_kernels.gmm import gmm, tgmm
from pallas_kernels.lightning_indexer import lightning_indexer
from pallas_kernels.mla_attention import mla_attention
from pallas_kernels.mla_decode import mla_decode
from pallas_kernels.moe_route import moe_route
from pallas_kernels.sparse_mqa_attention import sparse_mqa_attention
