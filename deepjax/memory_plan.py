"""Memory and communication plan of a training run, from abstract shapes only.

Nothing is allocated and no devices are needed: the model and optimizer state are traced with
`nnx.eval_shape`, sharded by the same logical-axis rules as training on an abstract mesh, and
counted per device. Assumptions, stated where they are used:
- parameters and gradients are in param_dtype; AdamW keeps two moments of the same shapes;
- activations: the inputs of every matmul of every layer are kept for the backward pass (no
  rematerialisation; attention probabilities are recomputed, as flash attention does);
- expert parallelism (deepjax.parallel.expert_parallel) exchanges a send buffer of `expert` x C
  slots of hidden values per MoE layer, four times (dispatch and combine, forward and
  backward), of which the fraction (expert - 1) / expert leaves the device. With a capacity
  factor c, C = c x tokens x top_k / expert; dropless (no factor), C = tokens x top_k, `expert`
  times more: set `moe_capacity_factor` for large expert axes. The int32 expert ids sent with
  the dispatch are left out.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh

from deepjax import accounting
from deepjax.config import ModelConfig
from deepjax.model import DeepSeek
from deepjax.parallel import expert_parallel
from deepjax.parallel.mesh import MESH_AXES, batch_shards, check_divisibility, mesh_shape
from deepjax.parallel.sharding import logical_spec


@dataclasses.dataclass(frozen=True)
class Plan:
  mesh: dict
  params_bytes: int           # per device
  grads_bytes: int
  optimizer_bytes: int
  activation_bytes: int
  all_to_all_bytes: int       # per device per step, leaving the device
  flops_per_step: float       # whole step, all devices
  tokens_per_device: int

  @property
  def total_bytes(self) -> int:
    return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activation_bytes


def abstract_mesh(sizes: dict, num_devices: int) -> AbstractMesh:
  shape = mesh_shape(sizes, num_devices)
  try:
    return AbstractMesh(shape, MESH_AXES)
  except TypeError:   # older JAX: AbstractMesh(((name, size), ...))
    return AbstractMesh(tuple(zip(MESH_AXES, shape)))


def _shard_elements(shape, spec, mesh) -> int:
  count = 1
  for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      count *= size
    else:
      axes = (axes,) if isinstance(axes, str) else axes
      count *= size // math.prod(mesh.shape[a] for a in axes)
  return count


@functools.lru_cache(maxsize=8)
def abstract_params(cfg: ModelConfig) -> tuple[tuple[tuple[int, ...], tuple], ...]:
  """(shape, logical axes) of every parameter, MTP modules included; nothing allocated."""
  abstract = nnx.eval_shape(lambda: DeepSeek(cfg, rngs=nnx.Rngs(0)))
  return tuple((tuple(v.shape), v.get_metadata().get("logical_axes") or (None,) * v.ndim)
               for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def param_bytes_per_device(cfg: ModelConfig, mesh) -> int:
  """Bytes of one device's shards of every parameter."""
  itemsize = np.dtype(cfg.param_dtype).itemsize
  return sum(_shard_elements(shape, logical_spec(axes, shape, mesh), mesh) * itemsize
             for shape, axes in abstract_params(cfg))


def _layer_activation_elements(cfg: ModelConfig, layer: int) -> int:
  """Per token: inputs of the layer's matmuls, kept for the backward pass."""
  h, nh = cfg.hidden_size, cfg.num_attention_heads
  q_in = h + (cfg.q_lora_rank or 0)                            # q_a / q_b (or q_proj) inputs
  attn = q_in + h + cfg.kv_lora_rank + nh * (2 * cfg.qk_head_dim + cfg.v_head_dim) + \
      nh * cfg.v_head_dim                                       # kv_a, kv_b, q k v, o_proj in
  if cfg.is_moe_layer(layer):
    shared = cfg.n_shared_experts * cfg.moe_intermediate_size
    routed = cfg.num_experts_per_tok * (h + 3 * cfg.moe_intermediate_size)
    ffn = h + 3 * shared + routed
  else:
    ffn = h + 3 * cfg.intermediate_size
  return attn + ffn + 2 * h                                     # + the two norms' inputs


def plan(cfg: ModelConfig, mesh_sizes: dict, num_devices: int, *, batch_size: int,
         seq_len: int) -> Plan:
  mesh = abstract_mesh(mesh_sizes, num_devices)
  check_divisibility(mesh, batch_size=batch_size, n_routed_experts=cfg.n_routed_experts)
  shards = batch_shards(mesh)
  params = param_bytes_per_device(cfg, mesh)
  compute_bytes = np.dtype(cfg.dtype).itemsize
  tokens = batch_size * seq_len // shards
  layers = list(range(cfg.num_hidden_layers)) + \
      [cfg.num_hidden_layers + k for k in range(cfg.num_nextn_predict_layers)]
  activations = tokens * compute_bytes * sum(_layer_activation_elements(cfg, l) for l in layers)
  activations //= mesh.shape["tensor"]                          # tensor-parallel matmuls split
  moe_layers = sum(cfg.is_moe_layer(l) for l in layers)
  expert = mesh.shape["expert"]
  slots = expert * expert_parallel.slots_per_device(tokens * cfg.num_experts_per_tok, expert,
                                                    cfg.moe_capacity_factor)
  all_to_all = 4 * moe_layers * slots * cfg.hidden_size * compute_bytes * (expert - 1) // expert
  return Plan(mesh=dict(mesh.shape), params_bytes=params, grads_bytes=params,
              optimizer_bytes=2 * params, activation_bytes=activations,
              all_to_all_bytes=all_to_all,
              flops_per_step=accounting.flops_per_token(cfg, seq_len) * batch_size * seq_len,
              tokens_per_device=tokens)
