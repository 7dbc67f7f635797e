"""The optimizers: Muon's parameter split (matrices and each expert's matrix vs embedding, head,
norms), its orthogonalised, RMS-matched updates, and a sharded training run with it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deepjax as dj
from deepjax.train import TrainConfig, train
from deepjax.train.optimizer import OptimizerConfig, make_optimizer, muon_dimensions
from deepjax.train.metrics import read_metrics
from deepjax.train.run_config import resolve
from train_helpers import fast_config, synthetic_data

LR = 1e-2


def _params():
  """The tiny preset's parameters (with an MTP module) as zeros: shapes and paths are what
  the optimizer reads."""
  cfg = dj.ModelConfig.preset("tiny", num_nextn_predict_layers=1)
  abstract = nnx.state(nnx.eval_shape(lambda: dj.DeepSeek(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)


def _flat(tree):
  is_leaf = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)  # noqa: E731
  return {jax.tree_util.keystr(p): v for p, v in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def test_muon_takes_the_matrices_and_each_expert_and_leaves_the_rest_to_adamw():
  dims = _flat(muon_dimensions(_params()))
  adamw = {k for k, v in dims.items() if v is None}
  assert any("embed_tokens" in k for k in adamw) and any("lm_head" in k for k in adamw)
  assert all("norm" in k or "embed_tokens" in k or "lm_head" in k or "bias" in k
             for k in adamw), adamw
  experts = [v for k, v in dims.items() if "experts'][" in k and "shared" not in k]
  assert experts and all(v == (1, 2) for v in experts)             # [E, in, out]: E batched
  q_a = next(v for k, v in dims.items() if "q_a_proj" in k)
  assert tuple(q_a) == (0, 1)


def test_first_muon_step_is_orthogonal_per_expert_with_adamw_like_rms():
  """Step one (fresh momentum, constant learning rate): each matrix's update is its gradient
  orthogonalised (singular values near one, Newton-Schulz) and rescaled to RMS 0.2 x lr,
  whatever the gradient's scale: an expert whose gradient is 1000x another's moves the same
  amount. The embedding takes the first step of the Nesterov Adam that is optax's Muon's
  AdamW side: lr (1 + b1 / (1 + b1)) sign(gradient)."""
  params = _params()
  opt = OptimizerConfig(optimizer="muon", learning_rate=LR, warmup_steps=0, total_steps=10**6,
                        min_lr_ratio=1.0, grad_clip=1e9, weight_decay=0.0)
  tx = make_optimizer(opt)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  flat = dict(nnx.to_flat_state(grads))
  gate = next(path for path in flat if "experts" in path and path[-1] == "gate_proj")
  scaled = flat[gate][...].at[0].multiply(1000.0)
  flat[gate] = flat[gate].replace(scaled)
  grads = nnx.from_flat_state(flat)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  updates = dict(nnx.to_flat_state(updates))
  expert_update = np.asarray(updates[gate][...])                       # [E, in, out]
  rms = np.sqrt(np.mean(expert_update ** 2, axis=(1, 2)))
  np.testing.assert_allclose(rms, 0.2 * LR, rtol=0.35)
  assert rms.max() / rms.min() < 1.3
  singular = np.linalg.svd(expert_update[1] / (0.2 * LR * np.sqrt(max(expert_update.shape[1:]))),
                           compute_uv=False)
  assert 0.5 < singular.min() and singular.max() < 1.3, singular
  embed = next(path for path in updates if "embed_tokens" in path)
  np.testing.assert_allclose(np.abs(np.asarray(updates[embed][...])), LR * (1 + 0.9 / 1.9),
                             rtol=1e-3)


def test_optimizer_name_is_checked():
  with pytest.raises(ValueError, match="optimizer must be one of"):
    OptimizerConfig(optimizer="sgd")


@pytest.mark.parametrize("field, value", [
    ("learning_rate", -1.0), ("learning_rate", float("nan")),
    ("grad_clip", -1.0), ("grad_clip", 0.0), ("warmup_steps", -3), ("min_lr_ratio", 1.5),
    ("min_lr_ratio", -0.1), ("weight_decay", -0.1), ("b2", 1.2), ("muon_rms", 0.0)])
def test_optimizer_fields_out_of_range_are_refused_by_name(field, value):
  with pytest.raises(ValueError, match=rf"^{field} must be"):
    OptimizerConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", 0), ("seq_len", 1),
                                          ("log_every", 0), ("eval_every", -1),
                                          ("checkpoint_every", 0), ("keep_checkpoints", 0)])
def test_run_fields_out_of_range_are_refused_by_name(field, value):
  with pytest.raises(ValueError, match=rf"^{field} must be >= "):
    TrainConfig(**{field: value})


@pytest.mark.slow
def test_training_with_muon_on_a_sharded_mesh_lowers_the_loss(tmp_path):
  config = fast_config(steps=12, optimizer="muon", learning_rate=2e-2, batch_size=8,
                       eval_every=0, mesh={"data": 2, "fsdp": 2, "expert": 2, "tensor": 1})
  model_cfg, train_cfg = resolve(config)
  train(model_cfg, train_cfg, str(tmp_path), synthetic_data(config), log=lambda s: None)
  losses = [r["loss"] for r in read_metrics(str(tmp_path))]
  assert len(losses) == 12 and all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
