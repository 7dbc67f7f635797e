"""A training run's model, restored from its workdir for generation or analysis, or as the
starting point of another run (`initialise_from`, --config.init_workdir)."""

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
from deepjax.train.state import TrainState, abstract_train_state, restore_target, split_model


def load_trained_model(workdir: str) -> tuple[DeepSeek, int]:
  """(The model of the run in `workdir` at its latest checkpoint, parameters and router biases
  on the first device; that checkpoint's step). Raises ValueError naming what is missing."""
  config_path = os.path.join(workdir, "config.json")
  checkpoints = os.path.join(workdir, "checkpoints")
  if not os.path.isfile(config_path):
    raise ValueError(f"{workdir} has no config.json: not a training workdir")
  with open(config_path) as f:
    run = json.load(f)
  model_fields = run.get("model", {})
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
    optimizer = OptimizerConfig(trainable=run.get("trainable", "all"))
    graphdef, abstract = abstract_train_state(cfg, make_optimizer(optimizer))
    one_device = make_mesh({"data": 1}, devices=jax.devices()[:1])
    state, _ = manager.restore(step, restore_target(abstract, one_device))
  finally:
    manager.close()
  return nnx.merge(graphdef, state.params, state.biases), step


def _take(target: nnx.State, source: nnx.State, workdir: str) -> tuple[nnx.State, int, list]:
  """target with source's value wherever both hold a tensor at the same path; -> (state,
  number taken, the target paths left as they were)."""
  given = dict(nnx.to_flat_state(source))
  merged, taken, kept = [], 0, []
  for path, variable in nnx.to_flat_state(target):
    if path not in given:
      kept.append(path)
      merged.append((path, variable))
      continue
    value = given[path].get_value()
    if value.shape != variable.shape:
      raise ValueError(f"{workdir}: {'.'.join(map(str, path))} is {value.shape} there and "
                       f"{variable.shape} here; --config.init_workdir needs the same sizes")
    merged.append((path, variable.replace(value.astype(variable.dtype))))
    taken += 1
  return nnx.from_flat_state(merged), taken, kept


def initialise_from(state: TrainState, shardings: TrainState, workdir: str):
  """A fresh run's state with the parameters and router biases of the run in `workdir` (its
  latest checkpoint) wherever both models have them; the rest keeps its initialisation. That
  starts V3.2's indexer warm-up from a trained V3 run (the indexers are new) and its sparse
  stage from the warm-up's run. The optimizer state and the step stay fresh.
  -> (state laid out in `shardings`, a one-line report)."""
  source, step = load_trained_model(workdir)
  _, params, biases = split_model(source)
  new_params, taken, kept = _take(state.params, params, workdir)
  new_biases, taken_biases, _ = _take(state.biases, biases, workdir)
  state = jax.device_put(state.replace(params=new_params, biases=new_biases), shardings)
  fresh = sorted({".".join(str(k) for k in path if not str(k).isdigit()) for path in kept})
  report = (f"initialised from {workdir} (step {step}): {taken} parameter and {taken_biases} "
            f"router-bias tensors taken")
  if fresh:
    report += f"; {len(kept)} left at initialisation ({', '.join(fresh[:4])}"
    report += ", ...)" if len(fresh) > 4 else ")"
  return state, report
