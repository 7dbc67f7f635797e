"""The train step: one jax.jit with explicit in/out shardings and the state donated.

forward -> losses (LM + lambda MTP + alpha balance) -> AdamW update of the parameters ->
aux-loss-free update of the routers' correction biases from the global batch's expert loads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepjax.parallel import batch_sharding
from deepjax.train.balance import expert_loads, max_violation, updated_biases
from deepjax.train.loss import BALANCE_LOSSES, prediction_counts, training_losses
from deepjax.train.state import TrainState, replicated, split_model

BATCH_KEYS = ("tokens", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  mtp_loss_weight: float = 0.3         # lambda (V3 §2.2: 0.3 then 0.1)
  balance_loss_weight: float = 1e-4    # alpha of the balance loss (V3 eq. 17)
  bias_update_speed: float = 1e-3      # gamma of aux-loss-free balancing (V3 §2.1.2)
  balance_loss_scope: str = "sequence"  # "sequence" (V3) or "batch" (expert-level aux loss)
  indexer_loss_weight: float = 1.0     # V3.2's indexer KL loss (eqs. 3-4)

  def __post_init__(self):
    if self.balance_loss_scope not in BALANCE_LOSSES:
      raise ValueError(f"balance_loss_scope must be one of {sorted(BALANCE_LOSSES)}, got "
                       f"{self.balance_loss_scope!r}")


def _forward(graphdef, params, biases, batch, mesh):
  """The model on the batch, traced with `mesh` current: MoE layers shard their experts over
  its `expert` axis and exchange tokens by all-to-all (deepjax.parallel.expert_parallel)."""
  model = nnx.merge(graphdef, params, biases)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    out = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
  return model, out


def _losses(model, out, batch, objective: ObjectiveConfig):
  return training_losses(out, batch["tokens"], batch["segment_ids"],
                         top_k=model.cfg.num_experts_per_tok,
                         mtp_weight=objective.mtp_loss_weight,
                         balance_weight=objective.balance_loss_weight,
                         balance_scope=objective.balance_loss_scope,
                         indexer_weight=objective.indexer_loss_weight)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, objective:
                    ObjectiveConfig, shardings: TrainState, mesh):
  def step(state: TrainState, batch):
    def loss_fn(params):
      model, out = _forward(graphdef, params, state.biases, batch, mesh)
      losses = _losses(model, out, batch, objective)
      return losses.total, (losses, out.router, out.indexer_recall)

    (_, (losses, router, recall)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    biases = state.biases
    metrics = dict(loss=losses.total, lm_loss=losses.lm, mtp_loss=losses.mtp,
                   balance_loss=losses.balance, lr=schedule(state.step),
                   grad_norm=optax.tree_utils.tree_norm(grads), tokens=losses.tokens)
    if losses.indexer_kl is not None:
      metrics["indexer_kl"] = losses.indexer_kl
    if recall is not None:
      metrics["indexer_recall"] = recall
    if router is not None:
      loads = expert_loads(router.counts)
      violation = max_violation(loads)
      metrics.update(max_vio=jnp.mean(violation), max_vio_per_layer=violation,
                     dropped_fraction=jnp.mean(router.dropped),
                     expert_load=loads / jnp.maximum(jnp.mean(loads, -1, keepdims=True), 1e-9))
      if objective.bias_update_speed and jax.tree.leaves(biases):
        model = nnx.merge(graphdef, params, biases)
        gates = model.routers()
        new = updated_biases([g.e_score_correction_bias[...] for g in gates], loads,
                             objective.bias_update_speed)
        for gate, value in zip(gates, new):
          gate.e_score_correction_bias[...] = value
        _, _, biases = split_model(model)
    new_state = state.replace(step=state.step + 1, params=params, biases=biases,
                              opt_state=opt_state)
    return new_state, metrics

  batch_shardings = {k: batch_sharding(mesh) for k in BATCH_KEYS}
  return jax.jit(step, in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))


def make_eval_step(graphdef, objective: ObjectiveConfig, shardings: TrainState, mesh):
  """Sums over one batch: losses times tokens, top-1 prediction counts (loss.prediction_counts)
  and, with MoE layers, expert loads [L, E] (for MaxVio_global)."""
  def evaluate(state: TrainState, batch):
    model, out = _forward(graphdef, state.params, state.biases, batch, mesh)
    losses = _losses(model, out, batch, objective)
    sums = dict(lm_loss=losses.lm * losses.tokens, mtp_loss=losses.mtp * losses.tokens,
                tokens=losses.tokens,
                **prediction_counts(out, batch["tokens"], batch["segment_ids"]))
    if out.router is not None:
      sums["loads"] = expert_loads(out.router.counts)
    return sums

  batch_shardings = {k: batch_sharding(mesh) for k in BATCH_KEYS}
  return jax.jit(evaluate, in_shardings=(shardings, batch_shardings),
                 out_shardings=replicated(mesh))
