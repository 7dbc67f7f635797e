"""The device mesh: named axes data, fsdp, expert, tensor; -1 fills with the remaining devices."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Axes a batch is split over: outside MoE layers, `expert` acts as a data axis.
BATCH_AXES = ("data", "fsdp", "expert")


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry so the product equals num_devices; names the problem otherwise."""
  unknown = [a for a in MESH_AXES if sizes.get(a, 1) == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {unknown}")
  for axis in MESH_AXES:
    size = sizes.get(axis, 1)
    if size != -1 and size < 1:
      raise ValueError(f"mesh.{axis} must be positive or -1, got {size}")
  known = math.prod(sizes.get(a, 1) for a in MESH_AXES if a not in unknown)
  if num_devices % known:
    raise ValueError(f"mesh sizes {dict(sizes)} (product {known}) do not divide the "
                     f"{num_devices} devices")
  if not unknown and known != num_devices:
    raise ValueError(f"mesh sizes {dict(sizes)} use {known} of the {num_devices} devices; "
                     f"set one axis to -1 to fill")
  return tuple(num_devices // known if a in unknown else sizes.get(a, 1) for a in MESH_AXES)


def make_mesh(sizes: dict[str, int] | None = None, devices=None) -> Mesh:
  """A Mesh over `devices` (default: all) with axes MESH_AXES; default all devices on data."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(sizes or {"data": -1}, len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, AssertionError, NotImplementedError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def batch_axes(mesh) -> tuple[str, ...]:
  """The axes of BATCH_AXES that `mesh` has (a batch's leading dimension splits over them)."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_shards(mesh) -> int:
  """How many shards a batch splits into: the product of its batch axes."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def check_divisibility(mesh, *, batch_size: int, n_routed_experts: int,
                       batch_name: str = "batch_size") -> None:
  """The batch (`batch_name`: the training batch's sequences, or the tokens of an expert-parallel
  exchange) splits over data x fsdp x expert; the routed experts over `expert`."""
  shards = batch_shards(mesh)
  if batch_size % shards:
    raise ValueError(f"{batch_name} {batch_size} is not divisible by the data-parallel size "
                     f"{shards} (mesh data x fsdp x expert = {dict(mesh.shape)})")
  expert_size = mesh.shape.get("expert", 1)
  if n_routed_experts and n_routed_experts % expert_size:
    raise ValueError(f"n_routed_experts {n_routed_experts} is not divisible by the expert axis "
                     f"({expert_size})")
