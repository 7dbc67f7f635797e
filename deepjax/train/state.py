"""Train state: float32 master parameters, optimizer state, balance biases and step.

The model is split once into a static graph definition and three pieces of state: Params
(trained), RouterBias (V3's correction biases, updated by the balance rule, not the optimizer)
and nothing else. State is created directly in its shards (a jitted init with out_shardings),
so a model never has to fit on one device.
"""

from __future__ import annotations

from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepjax.config import ModelConfig
from deepjax.model import DeepSeek
from deepjax.model.router import RouterBias
from deepjax.parallel import tree_shardings


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32, optimizer steps taken
  params: nnx.State        # nnx.Param
  biases: nnx.State        # RouterBias (may be empty: V2 routers have none)
  opt_state: optax.OptState
  # Entries that older checkpoints hold and this state no longer has; restoring drops them
  # (deepjax.checkpoint.manager). rng: key data that nothing read.
  removed_fields: ClassVar[tuple[str, ...]] = ("rng",)


def split_model(model: DeepSeek):
  return nnx.split(model, nnx.Param, RouterBias)


def _create(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int):
  model = DeepSeek(cfg, rngs=nnx.Rngs(seed))
  graphdef, params, biases = split_model(model)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, biases=biases,
                     opt_state=tx.init(params))
  return graphdef, state


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
  """Parameters (and optimizer moments that mirror them) by logical axes; scalars replicated."""
  return tree_shardings(abstract_state, mesh)


def abstract_train_state(cfg: ModelConfig, tx, seed: int = 0):
  """(graphdef, TrainState of ShapeDtypeStructs) without allocating anything."""
  graphdef, state = nnx.eval_shape(lambda: _create(cfg, tx, seed))
  return graphdef, state


def restore_target(abstract_state: TrainState, mesh: Mesh) -> TrainState:
  """The abstract state with its shardings on `mesh` attached: what a checkpoint restores into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, state_shardings(abstract_state, mesh))


def init_train_state(cfg: ModelConfig, tx, mesh: Mesh, seed: int):
  """(graphdef, state laid out in its shards, shardings)."""
  graphdef, abstract = abstract_train_state(cfg, tx, seed)
  shardings = state_shardings(abstract, mesh)
  create = jax.jit(lambda: _create(cfg, tx, seed)[1], out_shardings=shardings)
  return graphdef, create(), shardings


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
