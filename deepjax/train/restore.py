"""A training run's model, restored from its workdir for generation or analysis."""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from deepjax.checkpoint.manager import CheckpointManager
from deepjax.config import ModelConfig
from deepjax.model import DeepSeek
from deepjax.parallel import make_mesh
from deepjax.train.optimizer import OptimizerConfig, make_optimizer
from deepjax.train.state import abstract_train_state, restore_target


def load_trained_model(workdir: str) -> tuple[DeepSeek, int]:
  """(The model of the run in `workdir` at its latest checkpoint, parameters and router biases
  on the first device; that checkpoint's step). Raises ValueError naming what is missing."""
  config_path = os.path.join(workdir, "config.json")
  checkpoints = os.path.join(workdir, "checkpoints")
  if not os.path.isfile(config_path):
    raise ValueError(f"{workdir} has no config.json: not a training workdir")
  with open(config_path) as f:
    model_fields = json.load(f).get("model", {})
  cfg = ModelConfig(**{k: v for k, v in model_fields.items() if k in ModelConfig.fields()})
  if not os.path.isdir(checkpoints):
    raise ValueError(f"{workdir} has no checkpoints (nothing under {checkpoints}); train first "
                     f"with experiments/train.py --workdir={workdir}")
  manager = CheckpointManager(checkpoints, async_save=False)
  try:
    step = manager.latest_step()
    if step is None:
      raise ValueError(f"{workdir} has no complete checkpoint under {checkpoints}; train "
                       f"first with experiments/train.py --workdir={workdir}")
    # The optimizer state's structure (not its hyper-parameters) shapes the checkpoint.
    graphdef, abstract = abstract_train_state(cfg, make_optimizer(OptimizerConfig()))
    one_device = make_mesh({"data": 1}, devices=jax.devices()[:1])
    state, _ = manager.restore(step, restore_target(abstract, one_device))
  finally:
    manager.close()
  return nnx.merge(graphdef, state.params, state.biases), step
