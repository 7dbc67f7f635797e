"""AdamW or Muon, with linear warmup + cosine decay and global-norm clipping (V3 §4.2 recipe
shape).

AdamW: weight decay applies to matrices only; norms' scales and biases (1-D parameters) are
exempt. Muon (`optimizer="muon"`, as DeepSeek-V4 trained; optax's `contrib.muon`): the
weight matrices, and each expert's matrix in the stacked expert weights, take Muon's
orthogonalised momentum (Newton-Schulz, Nesterov, beta 0.95) with weight decay; the embedding,
the output head, norms and biases take optax's AdamW side of Muon (Nesterov moments, no weight
decay: optax would decay the norms too). Each matrix's update is rescaled to RMS
`muon_rms` (0.2, Moonlight's convention: Liu et al. 2025, "Muon is Scalable for LLM
Training"), about an AdamW update's, so AdamW's learning rate and weight decay carry over.
`trainable="indexer"` trains V3.2's lightning indexers alone and leaves every other parameter
as it is, with no optimizer state (the dense warm-up stage, V3.2 §2.1).
"""

import dataclasses

import jax
import optax

TRAINABLE = ("all", "indexer")
OPTIMIZERS = ("adamw", "muon")
# Parameters Muon leaves to its AdamW side although they are matrices: the token embedding (a
# lookup table) and the output head.
ADAMW_MATRICES = ("embed_tokens", "lm_head")


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
  optimizer: str = "adamw"        # "adamw", or "muon" for the weight matrices (V4)
  muon_beta: float = 0.95         # Muon's momentum
  muon_rms: float = 0.2           # RMS of each matrix's Muon update (AdamW-like scale)

  def __post_init__(self):
    if self.trainable not in TRAINABLE:
      raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    # (field, lowest, highest, whether the lowest itself is allowed)
    for field, low, high, closed in (
        ("learning_rate", 0.0, None, True), ("warmup_steps", 0, None, True),
        ("total_steps", 1, None, True), ("min_lr_ratio", 0.0, 1.0, True),
        ("b1", 0.0, 1.0, True), ("b2", 0.0, 1.0, True), ("eps", 0.0, None, True),
        ("weight_decay", 0.0, None, True), ("grad_clip", 0.0, None, False),
        ("muon_beta", 0.0, 1.0, True), ("muon_rms", 0.0, None, False)):
      check_range(field, getattr(self, field), low, high, closed)


def check_range(field: str, value, low, high=None, closed: bool = True) -> None:
  """Raises ValueError naming `field` unless low <= value (low < value when not closed) and
  value <= high (when given); NaN fails."""
  ok = (value >= low if closed else value > low) and (high is None or value <= high)
  if not ok:   # also NaN
    bound = f"{'>=' if closed else '>'} {low}" + (f" and <= {high}" if high is not None else "")
    raise ValueError(f"{field} must be {bound}, got {value!r}")


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
  return "indexer" in _names(path)


def _names(path) -> set:
  return {str(getattr(key, "key", getattr(key, "name", key))) for key in path}


def muon_dimensions(params):
  """Per parameter, Muon's axes (the last two: [..., in, out], leading axes batched, so each
  expert of a stacked [E, in, out] weight is its own matrix), or None for the AdamW side:
  vectors, the embedding and the head."""
  def axes(path, p):
    if p.ndim < 2 or _names(path) & set(ADAMW_MATRICES):
      return None
    return optax.contrib.MuonDimensionNumbers(reduction_axis=p.ndim - 2, output_axis=p.ndim - 1)
  return jax.tree_util.tree_map_with_path(axes, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(cfg)
  if cfg.optimizer == "muon":
    update = optax.contrib.muon(
        schedule, beta=cfg.muon_beta, weight_decay=cfg.weight_decay, adam_b1=cfg.b1,
        adam_b2=cfg.b2, eps=cfg.eps, muon_weight_dimension_numbers=muon_dimensions,
        consistent_rms=cfg.muon_rms)
  else:
    update = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                         weight_decay=cfg.weight_decay, mask=decay_mask)
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), update)
  if cfg.trainable == "all":
    return tx
  labels = lambda params: jax.tree_util.tree_map_with_path(   # noqa: E731
      lambda path, _: "train" if in_indexer(path) else "frozen", params)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
