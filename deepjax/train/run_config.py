"""The ml_collections run config behind `experiments/train.py` and its resolution into typed
configs. Field names are the command line's: --config.steps, --config.mesh.expert,
--config.model.n_routed_experts (any ModelConfig field, HF names), --config.data.source, ...
"""

from __future__ import annotations

import dataclasses

import ml_collections

from deepjax.config import ModelConfig
from deepjax.train.loop import TrainConfig
from deepjax.train.optimizer import OptimizerConfig
from deepjax.train.step import ObjectiveConfig


# Not flat flags: the mesh is config.mesh.<axis>, the optimizer and objective are flattened
# into the top level, and total_steps is config.steps.
_NOT_FLAT = ("mesh", "optimizer", "objective", "total_steps")


def _flat_fields(cls) -> list[str]:
  """cls's fields that are top-level flags of the run config (--config.<field>)."""
  return [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_FLAT]


def default_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  train = TrainConfig()
  for config in (train, OptimizerConfig(), ObjectiveConfig()):
    for field in _flat_fields(type(config)):
      c[field] = getattr(config, field)
  c.mesh = ml_collections.ConfigDict(dict(train.mesh))
  c.data = ml_collections.ConfigDict({
      "source": "synthetic",      # "synthetic" | a glob of text files | a glob of *.arrayrecord
      "eval_source": "",          # "" -> the synthetic eval split, or a held-out glob
      "tokenizer": "byte",        # "byte" | path to a tokenizer.json
      "lines": False,             # text files: one document per non-empty line
      "pretokenized": False,      # ArrayRecord records are int32 token ids
  })
  model = dataclasses.asdict(ModelConfig.preset(preset))
  # Fields derived from others stay None so that overriding the others re-derives them.
  model.update(num_key_value_heads=None, scoring_func=None)
  model = {f.name: _overridable(f, model[f.name]) for f in dataclasses.fields(ModelConfig)}
  c.model = ml_collections.ConfigDict({"preset": preset, **model})
  return c


# An optional field left None becomes a typed placeholder, so the command line can set it
# (--config.model.moe_capacity_factor=1.25); ml_collections cannot override a plain None.
_OPTIONAL_TYPES = {"int | None": int, "float | None": float, "str | None": str}


def _overridable(field: dataclasses.Field, value):
  kind = _OPTIONAL_TYPES.get(field.type)
  return ml_collections.config_dict.placeholder(kind) if value is None and kind else value


def resolve(config: ml_collections.ConfigDict) -> tuple[ModelConfig, TrainConfig]:
  """Typed configs from a run config; ModelConfig validation errors name the field."""
  model_fields = {k: v for k, v in config.model.to_dict().items() if k != "preset"}
  model = ModelConfig(**model_fields)
  for name in ("steps", "batch_size", "seq_len", "log_every", "eval_steps",
               "checkpoint_every", "keep_checkpoints"):
    if config[name] < 1:
      raise ValueError(f"config.{name} must be positive, got {config[name]}")
  if config.seq_len > model.max_position_embeddings:
    raise ValueError(f"config.seq_len {config.seq_len} exceeds model.max_position_embeddings "
                     f"{model.max_position_embeddings}")
  optimizer = OptimizerConfig(**{k: config[k] for k in _flat_fields(OptimizerConfig)},
                              total_steps=config.steps)
  objective = ObjectiveConfig(**{k: config[k] for k in _flat_fields(ObjectiveConfig)})
  train = TrainConfig(**{k: config[k] for k in _flat_fields(TrainConfig)},
                      mesh=dict(config.mesh), optimizer=optimizer, objective=objective)
  return model, train
