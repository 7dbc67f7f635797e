"""AdamW with linear warmup + cosine decay and global-norm clipping (V3 §4.2 recipe shape).

Weight decay applies to matrices only: norms' scales and biases (1-D parameters) are exempt.
`trainable="indexer"` trains V3.2's lightning indexers alone and leaves every other parameter
as it is, with no optimizer state (the dense warm-up stage, V3.2 §2.1).
"""

import dataclasses

import jax
import optax

TRAINABLE = ("all", "indexer")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  total_steps: int = 1000
  min_lr_ratio: float = 0.1       # cosine decays to learning_rate * min_lr_ratio
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  trainable: str = "all"          # "all", or "indexer": V3.2's indexer warm-up

  def __post_init__(self):
    if self.trainable not in TRAINABLE:
      raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(cfg.total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(cfg.total_steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.min_lr_ratio)


def decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def in_indexer(path) -> bool:
  """Whether a parameter's tree path runs through a lightning indexer (V3.2)."""
  return any(getattr(key, "key", getattr(key, "name", None)) == "indexer" for key in path)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  adamw = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=decay_mask))
  if cfg.trainable == "all":
    return adamw
  labels = lambda params: jax.tree_util.tree_map_with_path(   # noqa: E731
      lambda path, _: "train" if in_indexer(path) else "frozen", params)
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
