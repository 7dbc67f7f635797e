"""The training loop: resume, step, log, evaluate, checkpoint, stop cleanly on SIGTERM.

A workdir holds config.json (the resolved run config), metrics.jsonl, TensorBoard events and
checkpoints/. Running again on the same workdir resumes from the latest complete checkpoint,
data position included, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np

from deepjax import accounting
from deepjax.checkpoint.manager import CheckpointManager
from deepjax.config import ModelConfig
from deepjax.parallel import batch_sharding, check_divisibility, make_mesh
from deepjax.train.balance import max_violation
from deepjax.train.metrics import MetricsWriter, Progress
from deepjax.train.mfu import mfu, peak_flops_per_device
from deepjax.train.optimizer import (OptimizerConfig, check_range, learning_rate_schedule,
                                     make_optimizer)
from deepjax.train.restore import initialise_from
from deepjax.train.state import (abstract_train_state, init_train_state, restore_target,
                                 state_shardings)
from deepjax.train.step import BATCH_KEYS, ObjectiveConfig, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 300
  batch_size: int = 16           # global, in rows of seq_len tokens
  seq_len: int = 256
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  eval_steps: int = 4
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  init_workdir: str = ""         # a fresh run starts from that run's weights (restore.py)
  mesh: dict = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1, "expert": 1,
                                                           "tensor": 1})
  optimizer: OptimizerConfig = OptimizerConfig()
  objective: ObjectiveConfig = ObjectiveConfig()

  def __post_init__(self):
    for field, low in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("log_every", 1),
                       ("eval_every", 0), ("eval_steps", 0), ("checkpoint_every", 1),
                       ("keep_checkpoints", 1)):
      check_range(field, getattr(self, field), low)


class NonFiniteLoss(FloatingPointError):
  """The loss became NaN or Inf; the run stopped without saving that state."""


def check_model_unchanged(workdir: str, model_cfg: ModelConfig) -> None:
  """Refuses to resume a workdir that was trained with another model config (implementation
  choices such as attention_impl may change)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    previous = json.load(f).get("model", {})
  # As config.json holds it (tuples as lists); fields added since that run are not compared.
  current = json.loads(json.dumps(dataclasses.asdict(model_cfg), default=str))
  changed = {k: (previous[k], v) for k, v in current.items()
             if k in previous and previous[k] != v and k not in ModelConfig.impl_fields()}
  if changed:
    details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
    raise ValueError(f"{workdir} holds a run of another model ({details}); use a new workdir "
                     f"or the same model config")


class _StopFlag:
  """Turns SIGTERM (preemption) into a request to checkpoint and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:     # not the main thread: no signal handling
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _global_batch(batch: dict, sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
          for k in BATCH_KEYS}


def _check_vocabulary(batch: dict, vocab_size: int) -> None:
  tokens = np.asarray(batch["tokens"])
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    bad = tokens[(tokens < 0) | (tokens >= vocab_size)][:5]
    raise ValueError(f"the data yields token ids outside the model's vocabulary "
                     f"[0, {vocab_size}): e.g. {bad.tolist()}; check the tokenizer and vocab_size")


def _check_finite(step: int, loss: jax.Array, checkpoints: CheckpointManager) -> None:
  """Raises NonFiniteLoss if `step`'s loss (on device; reading it waits for that step) is NaN
  or Inf."""
  loss = float(jax.device_get(loss))
  if not math.isfinite(loss):
    checkpoints.wait()
    good = checkpoints.latest_step()
    raise NonFiniteLoss(f"loss is {loss} at step {step}; stopped without saving. The last "
                        f"good checkpoint (step {good}) is untouched in {checkpoints.directory}")


def evaluate(eval_step, state, batches: Iterator[dict], steps: int, sharding) -> dict:
  """Held-out LM and MTP loss and top-1 accuracy; with MTP the agreement of depth 1 with the
  main head; with MoE layers MaxVio_global: MaxVio of the loads summed over all eval batches
  (Wang et al. 2024 §4.1), averaged over layers like the training metric `max_vio`."""
  totals = {}
  for _, batch in zip(range(steps), batches):
    out = jax.device_get(eval_step(state, _global_batch(batch, sharding)))
    for key, value in out.items():
      totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
  tokens = max(float(totals.get("tokens", 0.0)), 1.0)
  record = {"eval_lm_loss": float(totals.get("lm_loss", 0.0)) / tokens,
            "eval_mtp_loss": float(totals.get("mtp_loss", 0.0)) / tokens,
            "eval_lm_accuracy": float(totals.get("lm_correct", 0.0)) / tokens}
  if "mtp_correct" in totals:
    record["eval_mtp_accuracy"] = (totals["mtp_correct"] /
                                   np.maximum(totals["mtp_tokens"], 1.0)).tolist()
    record["eval_mtp_agreement"] = float(totals["mtp_agree"]) / max(totals["mtp_tokens"][0], 1.0)
  if "loads" in totals:
    violation = np.asarray(max_violation(totals["loads"]))
    record["eval_max_vio"] = float(np.mean(violation))
    record["eval_max_vio_per_layer"] = violation.tolist()
  return record


def train(model_cfg: ModelConfig, cfg: TrainConfig, workdir: str, train_data,
          make_eval_data: Callable[[], Iterator[dict]] | None = None,
          resolved_config: dict | None = None, log: Callable[[str], None] = print,
          stop_at: int | None = None) -> dict:
  """Trains (or resumes) in `workdir`; returns a summary dict.

  train_data: a checkpointable iterator (grain DatasetIterator: get_state / set_state) of this
  process's batches {"tokens", "segment_ids", "positions"} [batch_size / processes, seq_len].
  make_eval_data: a fresh iterator of held-out batches each time it is called.
  stop_at: checkpoint and return after this step (a time-sliced job); the learning-rate
    schedule still spans cfg.steps, so a later call continues the same run.
  """
  check_model_unchanged(workdir, model_cfg)
  mesh = make_mesh(cfg.mesh)
  check_divisibility(mesh, batch_size=cfg.batch_size, n_routed_experts=model_cfg.n_routed_experts)
  opt_cfg = dataclasses.replace(cfg.optimizer, total_steps=cfg.steps)
  tx = make_optimizer(opt_cfg)
  schedule = learning_rate_schedule(opt_cfg)
  checkpoints = CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  keep=cfg.keep_checkpoints)
  latest = checkpoints.latest_step()
  if latest is not None and latest >= cfg.steps:     # nothing to do: touch nothing
    checkpoints.close()
    log(f"already at step {latest} of {cfg.steps} in {workdir}; raise --config.steps to "
        f"continue")
    return {"step": latest, "final_loss": None, "eval_lm_loss": None, "tokens_per_sec": None,
            "mfu": None, "checkpoints": checkpoints.directory, "preempted": False,
            "already_done": True}
  if latest is not None:
    graphdef, abstract = abstract_train_state(model_cfg, tx, cfg.seed)
    shardings = state_shardings(abstract, mesh)
    state, data_state = checkpoints.restore(latest, restore_target(abstract, mesh))
    train_data.set_state(data_state)
    log(f"resumed from {checkpoints.directory}/{latest}")
  else:
    graphdef, state, shardings = init_train_state(model_cfg, tx, mesh, cfg.seed)
    if cfg.init_workdir:
      state, report = initialise_from(state, shardings, cfg.init_workdir)
      log(report)

  lead = jax.process_index() == 0      # one process writes config, metrics and the console
  if not lead:
    log = lambda message: None  # noqa: E731
  os.makedirs(workdir, exist_ok=True)
  if resolved_config is not None and lead:
    resolved_config = {**resolved_config, "model": {**resolved_config.get("model", {}),
                                                    **dataclasses.asdict(model_cfg)}}
    with open(os.path.join(workdir, "config.json.tmp"), "w") as f:
      json.dump(resolved_config, f, indent=2, default=str)
    os.replace(os.path.join(workdir, "config.json.tmp"), os.path.join(workdir, "config.json"))

  objective = cfg.objective
  if opt_cfg.trainable != "all":   # a frozen model keeps its routing: no bias updates either
    objective = dataclasses.replace(objective, bias_update_speed=0.0)
  train_step = make_train_step(graphdef, tx, schedule, objective, shardings, mesh)
  eval_step = make_eval_step(graphdef, cfg.objective, shardings, mesh)
  sharding = batch_sharding(mesh)
  start = int(jax.device_get(state.step))
  writer = MetricsWriter(workdir, resume_step=start) if lead else None
  progress = Progress(cfg.steps, start)
  flops_per_token = accounting.flops_per_token(model_cfg, cfg.seq_len)
  peak = peak_flops_per_device(model_cfg.dtype)
  counts = accounting.param_counts(model_cfg)
  log(f"{model_cfg.model_type}: {counts.total:,} parameters ({counts.activated:,} activated), "
      f"mesh {dict(mesh.shape)}, {cfg.batch_size}x{cfg.seq_len} tokens/step, "
      f"steps {start}->{cfg.steps}")

  step, record, eval_record = start, {}, {}
  throughput = []
  window_start, window_steps = time.perf_counter(), 0
  # The host reads each loss one step late: reading step n's right after dispatching it would
  # wait for it, while reading step n - 1's lets the next batch load as step n runs (async
  # dispatch) and keeps at most two steps in flight. Log, eval and checkpoint steps read their
  # own loss too, so no checkpoint is saved before every loss up to its step is finite.
  pending_loss = None           # (step, loss on device) not yet read
  first = True
  with _StopFlag() as stop:
    try:
      last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
      while step < last:
        batch = next(train_data)
        if first:
          _check_vocabulary(batch, model_cfg.vocab_size)
          first = False
        state, metrics = train_step(state, _global_batch(batch, sharding))
        step += 1
        window_steps += 1
        if pending_loss is not None:
          _check_finite(*pending_loss, checkpoints)
        pending_loss = (step, metrics["loss"])
        if step == start + 1:            # leave compilation out of tokens/s
          jax.block_until_ready(metrics)
          window_start, window_steps = time.perf_counter(), 0
        stopping = stop.requested
        log_now = step % cfg.log_every == 0 or step == last or stopping
        eval_now = make_eval_data is not None and cfg.eval_every and (
            step % cfg.eval_every == 0 or step == cfg.steps)
        save_now = step % cfg.checkpoint_every == 0 or step == last or stopping
        if log_now or eval_now or save_now:
          _check_finite(*pending_loss, checkpoints)
          pending_loss = None
        if log_now:
          host = jax.device_get(metrics)   # this step is done: the window ends here
          seconds = time.perf_counter() - window_start
          tokens_per_sec = window_steps * cfg.batch_size * cfg.seq_len / max(seconds, 1e-9)
          if window_steps:
            throughput.append(tokens_per_sec)
        if eval_now:              # left out of tokens/s, which counts training only
          began = time.perf_counter()
          eval_record = evaluate(eval_step, state, make_eval_data(), cfg.eval_steps, sharding)
          window_start += time.perf_counter() - began
        if log_now:
          host.pop("tokens")
          record = {**host, **eval_record, "tokens_per_sec": tokens_per_sec,
                    "mfu": mfu(tokens_per_sec, flops_per_token, jax.device_count(), peak)}
          eval_record = {}
          if lead:
            record = writer.write(step, record)
            progress.update(step, record)
          window_start, window_steps = time.perf_counter(), 0
        if save_now:
          checkpoints.save(step, state, train_data.get_state())
        if stopping:
          checkpoints.wait()
          log(f"SIGTERM: saved step {step} to {checkpoints.directory}; rerun to continue")
          break
    finally:
      checkpoints.wait()
      checkpoints.close()
      if writer is not None:
        writer.close()

  summary = {"step": step, "final_loss": record.get("loss"),
             "eval_lm_loss": record.get("eval_lm_loss"),
             "tokens_per_sec": float(np.median(throughput)) if throughput else None,
             "mfu": record.get("mfu"), "checkpoints": checkpoints.directory,
             "preempted": stop.requested, "already_done": False}
  return summary
