"""Meshes and shardings: named mesh axes, logical-axis rules."""

from deepjax.parallel.mesh import (BATCH_AXES, MESH_AXES, batch_size_per_shard,
                                   check_divisibility, make_mesh)
from deepjax.parallel.sharding import LOGICAL_RULES, batch_sharding, logical_spec, tree_shardings
