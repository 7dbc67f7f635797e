"""Orbax checkpoints of a training run: train state plus the data iterator's position.

Saves are asynchronous and Orbax finalises a step directory only once every file is written, so
a save cut off by a crash or `kill -9` is never listed and never restored. Before restoring,
the stored shapes are compared with the model's: a checkpoint of another model (another expert
count, say) fails with a message naming the first mismatching tensors, and nothing in the
workdir is changed.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def _path_name(path) -> str:
  """'params/layers/1/mlp/...' for a pytree key path, however the tree spells its keys."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


class CheckpointMismatch(ValueError):
  """The checkpoint was written by a model with other shapes."""


class CheckpointManager:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, *, force: bool = True) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data_state)),
                       force=force)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def _check_shapes(self, step: int, stored_metadata, abstract_state) -> None:
    stored = {_path_name(p): tuple(m.shape) for p, m in
              jax.tree_util.tree_flatten_with_path(stored_metadata)[0] if hasattr(m, "shape")}
    wanted = {_path_name(p): tuple(np.shape(x))
              for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    problems = [f"{k}: checkpoint {stored.get(k, 'missing')}, model {v}"
                for k, v in wanted.items() if stored.get(k) != v]
    problems += [f"{k}: in the checkpoint, not in the model" for k in stored if k not in wanted]
    if problems:
      raise CheckpointMismatch(
          f"checkpoint {self.directory}/{step} does not fit this model ({len(problems)} "
          f"tensors differ), e.g. " + "; ".join(problems[:4]))

  def restore(self, step: int, abstract_state):
    """(state laid out like `abstract_state`'s shardings, data iterator state).

    Entries that the state's class lists in `removed_fields` and an older checkpoint still
    holds are read (unsharded) and dropped."""
    stored = self._manager.item_metadata(step)["state"]
    removed = {name: jax.ShapeDtypeStruct(stored[name].shape, stored[name].dtype)
               for name in getattr(abstract_state, "removed_fields", ()) if name in stored}
    target = abstract_state
    if removed:
      target = {**{f.name: getattr(abstract_state, f.name)
                   for f in dataclasses.fields(abstract_state)}, **removed}
    self._check_shapes(step, stored, target)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    state = restored.state
    if removed:
      state = type(abstract_state)(**{k: v for k, v in state.items() if k not in removed})
    return state, restored.data
