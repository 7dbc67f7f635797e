"""Meshes and shardings: named mesh axes, logical-axis rules, one divisibility check, and the
expert-parallel exchange (all-to-all inside shard_map) on plain arrays. Knows no model."""

from deepjax.parallel import expert_parallel
from deepjax.parallel.mesh import (BATCH_AXES, MESH_AXES, batch_axes, batch_shards,
                                   check_divisibility, make_mesh)
from deepjax.parallel.sharding import LOGICAL_RULES, batch_sharding, logical_spec, tree_shardings
