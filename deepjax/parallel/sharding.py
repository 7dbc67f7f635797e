"""One rule table from the logical axis names on parameters to mesh axes, and its application.

A dimension whose size the mesh axes do not divide stays replicated rather than failing (small
vocabularies, odd head counts); the rules never use a mesh axis twice in one array.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepjax.parallel.mesh import BATCH_AXES

# logical axis -> mesh axes (None: replicated)
LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "q_lora": ("fsdp",),          # q_b / kv_b shard on their input dim under FSDP
    "kv_lora": ("fsdp",),
    "mtp_concat": ("fsdp",),
    "expert": ("expert",),
    "expert_mlp": ("tensor",),
}


def logical_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh,
                 rules=LOGICAL_RULES) -> P:
  used, spec = set(), []
  for name, size in zip(axes, shape):
    mesh_axes = tuple(a for a in (rules.get(name) or ()) if a not in used and mesh.shape[a] > 1)
    if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
      used.update(mesh_axes)
      spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    else:
      spec.append(None)
  return P(*spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh: Mesh):
  """NamedShardings for a pytree of nnx Variables (by their `logical_axes`) and plain arrays
  (replicated). Works for model state and for optimizer state that mirrors it."""
  def one(x):
    if _is_variable(x) and not jax.tree.leaves(x):
      return x     # holds no array: an optimizer's placeholder for a frozen parameter
    if _is_variable(x):
      axes = x.get_metadata().get("logical_axes")
      spec = logical_spec(axes, x.shape, mesh) if axes else P()
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, tree, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))
