"""Multi-process runs on JAX's own distributed runtime (the same on TPU pods and GPU clusters).

`initialize` starts jax.distributed from explicit arguments (a coordinator address, process
count and id, e.g. from flags), or lets JAX detect a cluster it knows (SLURM, Open MPI, TPU
pods, Kubernetes) from the usual environment variables; with neither it leaves a single
process alone. Each process then feeds its own data shard (jax.process_index()).
"""

from __future__ import annotations

import os

import jax

# Environment variables by which JAX's cluster detection recognises a multi-process launch.
_CLUSTER_VARIABLES = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                      "MEGASCALE_COORDINATOR_ADDRESS", "JOBSET_NAME")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts jax.distributed when asked to or when a known cluster launched us; True if so."""
  explicit = coordinator_address is not None
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("a coordinator address needs num_processes and process_id too")
  if not explicit and not any(v in os.environ for v in _CLUSTER_VARIABLES):
    return False
  # CPU collectives (ignored by GPU and TPU backends). Nothing may touch a backend before
  # jax.distributed.initialize, so no platform check here.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  return True
