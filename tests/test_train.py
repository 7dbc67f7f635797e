"""Training: objective pieces against hand computations, balancing, sharding, resume, errors."""

import dataclasses
import functools
import io
import json
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepjax as dj
from deepjax import data
from deepjax.model import ModelOutput
from deepjax.parallel import make_mesh
from deepjax.train import resolve, train
from deepjax.train.balance import expert_loads, max_violation
from deepjax.train.loop import check_model_unchanged
from deepjax.train.loss import next_token_targets, sequence_balance_loss, training_losses
from deepjax.train.metrics import Progress, read_metrics
from deepjax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from deepjax.train.state import init_train_state
from deepjax.train.step import ObjectiveConfig, make_train_step
from train_helpers import ROOT, fast_config, run_train_py, synthetic_data


def test_balance_loss_matches_hand_computation():
  rng = np.random.default_rng(0)
  layers, rows, experts, k = 2, 3, 4, 2
  counts = rng.integers(0, 5, (layers, rows, experts)).astype(np.float32)
  affinity = rng.random((layers, rows, experts)).astype(np.float32)
  tokens = np.array([5.0, 7.0, 3.0], np.float32)
  expected = 0.0
  for l in range(layers):
    for b in range(rows):
      for i in range(experts):   # V3 eqs. 18-20
        f = experts / (k * tokens[b]) * counts[l, b, i]
        p = affinity[l, b, i] / tokens[b]
        expected += f * p
  expected /= layers * rows
  got = sequence_balance_loss(jnp.asarray(counts), jnp.asarray(affinity), jnp.asarray(tokens), k)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_next_token_targets_mask_document_boundaries_and_padding():
  tokens = np.array([[10, 11, 12, 13, 14, 258]])
  segments = np.array([[1, 1, 2, 2, 2, 0]])
  targets, mask = next_token_targets(tokens, segments)
  np.testing.assert_array_equal(mask, [[True, False, True, True, False, False]])
  np.testing.assert_array_equal(targets, [[11, 0, 13, 14, 0, 0]])
  targets, mask = jax.jit(next_token_targets, static_argnames="k")(tokens, segments, k=2)
  np.testing.assert_array_equal(mask, [[False, False, True, False, False, False]])
  assert targets[0, 2] == 14
  assert not next_token_targets(tokens, segments, k=9)[1].any()
  b = next(synthetic_data(fast_config()))
  targets, mask = next_token_targets(b["tokens"], b["segment_ids"])
  documents = sum(len(np.unique(row[row > 0])) for row in b["segment_ids"])
  assert mask.sum() == (b["segment_ids"] > 0).sum() - documents   # one less per document


def test_mtp_targets_are_tokens_two_ahead_within_documents():
  tokens = jnp.asarray([[5, 6, 7, 8, 9, 3, 4, 0]], jnp.int32)
  segments = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 0]], jnp.int32)
  vocab = 12
  onehot = lambda ids: jnp.where(jax.nn.one_hot(ids, vocab) > 0, 30.0, -30.0)  # noqa: E731
  lm_ok = onehot(jnp.asarray([[6, 7, 8, 9, 0, 4, 0, 0]]))
  # Depth 1 predicts t_{i+2}; positions whose t_{i+2} is in another document are not scored.
  mtp_ok = onehot(jnp.asarray([[7, 8, 9, 0, 0, 0, 0, 0]]))
  mtp_shifted_wrong = onehot(jnp.asarray([[6, 7, 8, 9, 0, 0, 0, 0]]))
  def losses(mtp):
    out = ModelOutput(logits=lm_ok, mtp_logits=mtp[None], router=None, hidden=None)
    return training_losses(out, tokens, segments, top_k=1, mtp_weight=0.3, balance_weight=0.0)
  good, bad = losses(mtp_ok), losses(mtp_shifted_wrong)
  assert float(good.lm) < 1e-6 and float(good.mtp) < 1e-6
  assert float(bad.mtp) > 10
  assert int(good.tokens) == 5           # 4 targets in doc 1, 1 in doc 2


def test_packed_loss_is_the_token_weighted_loss_of_each_document():
  cfg = dj.ModelConfig.preset("tiny", num_nextn_predict_layers=0)
  model = dj.DeepSeek(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 256, 9), rng.integers(0, 256, 6)
  packed = jnp.asarray(np.concatenate([a, b, [0, 0]])[None], jnp.int32)
  segments = jnp.asarray([[1] * 9 + [2] * 6 + [0] * 2], jnp.int32)
  positions = jnp.asarray([list(range(9)) + list(range(6)) + [0, 0]], jnp.int32)
  kw = dict(top_k=cfg.num_experts_per_tok, mtp_weight=0.0, balance_weight=0.0)
  forward = nnx.jit(lambda model, *args: model(*args))    # eager dispatch takes a minute
  packed_loss = training_losses(forward(model, packed, positions, segments), packed, segments,
                                **kw)
  single = [training_losses(forward(model, jnp.asarray(d[None], jnp.int32)), jnp.asarray(d[None]),
                            jnp.ones((1, len(d)), jnp.int32), **kw) for d in (a, b)]
  expected = (8 * single[0].lm + 5 * single[1].lm) / 13
  np.testing.assert_allclose(packed_loss.lm, expected, rtol=1e-5)
  assert int(packed_loss.tokens) == 13


def _steps(config, mesh_sizes, n, devices=None):
  model_cfg, train_cfg = resolve(config)
  devices = devices or jax.devices()[:int(np.prod(list(mesh_sizes.values())))]
  mesh = make_mesh(mesh_sizes, devices=devices)
  opt = OptimizerConfig(learning_rate=1e-2, total_steps=n, warmup_steps=1)
  tx = make_optimizer(opt)
  graphdef, state, shardings = init_train_state(model_cfg, tx, mesh, 0)
  step = make_train_step(graphdef, tx, learning_rate_schedule(opt), train_cfg.objective,
                         shardings, mesh)
  batches = synthetic_data(config)
  history = []
  for _ in range(n):
    batch = next(batches)
    state, metrics = step(state, {k: jnp.asarray(batch[k]) for k in
                                  ("tokens", "segment_ids", "positions")})
    history.append({k: np.asarray(v) for k, v in metrics.items()})
  return state, history


@functools.cache
def _single_device_steps():
  return _steps(fast_config(batch_size=8), {"data": 1}, 3)


@pytest.mark.parametrize("mesh_sizes", [
    pytest.param({"data": 2, "fsdp": 4}, marks=pytest.mark.slow),
    {"data": 2, "expert": 4},
    pytest.param({"fsdp": 2, "tensor": 4}, marks=pytest.mark.slow),
    pytest.param({"fsdp": 2, "expert": 4}, marks=pytest.mark.slow),
    pytest.param({"data": 2, "fsdp": 2, "expert": 2}, marks=pytest.mark.slow),
    {"fsdp": 2, "expert": 2, "tensor": 2}],
                         ids=lambda m: "_".join(m))
def test_sharded_step_matches_single_device(mesh_sizes):
  """Meshes with `expert` > 1 run expert parallelism (all-to-all); the loss trajectory must
  equal the single-device one to 1e-3. Sharded contractions sum in another order, so a
  near-tie in routing may flip one token's expert (seen on fsdp x tensor at step 3); where
  every step's expert loads agree, routing was identical and parameters must agree closely."""
  state1, single = _single_device_steps()
  state8, sharded = _steps(fast_config(batch_size=8), mesh_sizes, 3)
  for a, b in zip(single, sharded):
    for key in ("loss", "lm_loss", "mtp_loss"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-3, err_msg=key)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-2)
    assert b["dropped_fraction"] == 0.0                     # dropless
  if all(np.array_equal(a["expert_load"], b["expert_load"]) for a, b in zip(single, sharded)):
    for x, y in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.slow   # 95 s; the in-process sharded-step tests cover each axis by default
def test_train_py_on_all_four_mesh_axes_matches_one_device(tmp_path):
  """data x fsdp x expert x tensor = 2 x 2 x 2 x 2 (16 simulated devices) through
  experiments/train.py, against the same run on one device."""
  flags = ["--config.steps=3", "--config.batch_size=8", "--config.eval_every=0",
           "--config.checkpoint_every=3"]
  one = run_train_py(tmp_path / "one", *flags)
  mesh = [f"--config.mesh.{axis}=2" for axis in ("data", "fsdp", "expert", "tensor")]
  four = run_train_py(tmp_path / "four", *flags, *mesh, devices=16)
  assert one.returncode == 0 and four.returncode == 0, (one.stdout + four.stdout)[-3000:]
  assert "'expert': 2, 'tensor': 2" in four.stdout
  losses = [[r["loss"] for r in read_metrics(str(tmp_path / run))] for run in ("one", "four")]
  assert len(losses[0]) == 3
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)


def test_bias_update_moves_a_skewed_router_toward_balance():
  """Only the aux-loss-free bias learns here (lr 0): load must even out."""
  config = fast_config(learning_rate=0.0, bias_update_speed=0.02, balance_loss_weight=0.0,
                       mtp_loss_weight=0.0)
  config.model.num_nextn_predict_layers = 0
  model_cfg, train_cfg = resolve(config)
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  opt = OptimizerConfig(learning_rate=0.0, total_steps=40, warmup_steps=1)
  tx = make_optimizer(opt)
  graphdef, state, shardings = init_train_state(model_cfg, tx, mesh, 0)
  bias = state.biases["layers"][1]["mlp"]["gate"]["e_score_correction_bias"]
  bias[...] = jnp.zeros(bias.shape).at[:2].set(0.3)        # experts 0, 1 chosen by every token
  step = make_train_step(graphdef, tx, learning_rate_schedule(opt), train_cfg.objective,
                         shardings, mesh)
  batches = synthetic_data(config)
  violations = []
  for _ in range(40):
    batch = next(batches)
    state, metrics = step(state, {k: jnp.asarray(batch[k]) for k in
                                  ("tokens", "segment_ids", "positions")})
    violations.append(float(metrics["max_vio"]))
  assert violations[0] > 2.5, violations[0]                # top-2 of 8 all on two: MaxVio 3
  assert np.mean(violations[-5:]) < 0.5 * violations[0], violations
  bias = np.asarray(state.biases["layers"][1]["mlp"]["gate"]["e_score_correction_bias"][...])
  assert bias[:2].mean() - bias[2:].mean() < 0.15          # the favoured experts' edge shrank


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
  config = fast_config(batch_size=4)          # 8 simulated devices on the data axis
  model_cfg, train_cfg = resolve(config)
  with pytest.raises(ValueError, match="batch_size 4 is not divisible by the data-parallel size 8"):
    train(model_cfg, train_cfg, str(tmp_path), synthetic_data(config), log=lambda s: None)


def test_max_violation_definition():
  loads = jnp.asarray([[10.0, 10.0, 10.0, 10.0], [20.0, 10.0, 5.0, 5.0]])
  np.testing.assert_allclose(max_violation(loads), [0.0, 1.0])
  counts = jnp.ones((2, 3, 4))
  np.testing.assert_array_equal(expert_loads(counts), 3 * jnp.ones((2, 4)))


def test_train_writes_workdir_and_loss_falls(tmp_path):
  config = fast_config(steps=24, checkpoint_every=8, learning_rate=1e-2, batch_size=8)
  model_cfg, train_cfg = resolve(config)
  summary = train(model_cfg, train_cfg, str(tmp_path), synthetic_data(config),
                  resolved_config=config.to_dict(), log=lambda s: None)
  records = read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == list(range(1, 25))
  for key in ("step", "loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm",
              "tokens_per_sec", "mfu", "max_vio", "expert_load"):
    assert key in records[-1], key
  assert np.mean([r["lm_loss"] for r in records[-4:]]) < records[0]["lm_loss"] - 1.0
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["16", "24", "8"]
  assert json.loads((tmp_path / "config.json").read_text())["model"]["hidden_size"] == 32
  assert os.listdir(tmp_path / "tensorboard")
  assert summary["step"] == 24 and not summary["preempted"]


def test_restore_into_other_model_fails_and_keeps_workdir(tmp_path):
  config = fast_config(steps=4, checkpoint_every=4, batch_size=8)
  model_cfg, train_cfg = resolve(config)
  train(model_cfg, train_cfg, str(tmp_path), synthetic_data(config),
        resolved_config=config.to_dict(), log=lambda s: None)
  before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(tmp_path)
            for p in fs}
  # The same run again: already finished, it says so and writes nothing.
  said = []
  summary = train(model_cfg, train_cfg, str(tmp_path), synthetic_data(config),
                  resolved_config=config.to_dict(), log=said.append)
  assert summary["already_done"] and summary["step"] == 4
  assert said == [f"already at step 4 of 4 in {tmp_path}; raise --config.steps to continue"]
  assert {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(tmp_path)
          for p in fs} == before
  other = fast_config(steps=8, batch_size=8)
  other.model.n_routed_experts = 4
  other_model, other_train = resolve(other)
  with pytest.raises(ValueError, match="n_routed_experts: 8 -> 4"):
    train(other_model, other_train, str(tmp_path), synthetic_data(other), log=lambda s: None)
  os.remove(tmp_path / "config.json")        # even without config.json: shapes are checked
  with pytest.raises(ValueError, match=r"does not fit this model.*gate"):
    train(other_model, other_train, str(tmp_path), synthetic_data(other), log=lambda s: None)
  after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(tmp_path)
           for p in fs}
  assert {k: v for k, v in after.items() if k != "config.json"} == \
      {k: v for k, v in before.items() if k != "config.json"}


def test_resume_check_ignores_impl_fields_and_fields_added_since(tmp_path):
  cfg = dj.ModelConfig.preset("tiny")
  previous = json.loads(json.dumps(dataclasses.asdict(cfg)))
  del previous["router_impl"]                              # a field added after that run
  previous["moe_impl"] = "dense" if cfg.moe_impl != "dense" else "blocked"
  (tmp_path / "config.json").write_text(json.dumps({"model": previous}))
  check_model_unchanged(str(tmp_path), cfg)
  with pytest.raises(ValueError, match="n_routed_experts"):
    check_model_unchanged(str(tmp_path), cfg.replace(n_routed_experts=cfg.n_routed_experts * 2))


def _diverge(workdir, **overrides):
  """Trains at a huge learning rate until the loss stops being finite; (the step named by
  NonFiniteLoss, the checkpoints kept)."""
  config = fast_config(steps=30, learning_rate=1e12, grad_clip=1e30, warmup_steps=1,
                       batch_size=8, eval_every=0, **overrides)
  model_cfg, train_cfg = resolve(config)
  with pytest.raises(FloatingPointError, match=r"at step (\d+)") as info:
    train(model_cfg, train_cfg, str(workdir), synthetic_data(config), log=lambda s: None)
  bad_step = int(info.value.args[0].split("at step ")[1].split(";")[0])
  return bad_step, sorted(int(s) for s in os.listdir(workdir / "checkpoints"))


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  """Losses are read one step late and at log and checkpoint steps: with log_every > 1 the run
  still names the first non-finite step (the one found reading every step's loss) and never
  saves a checkpoint at or after it."""
  bad_step, kept = _diverge(tmp_path / "every", log_every=1, checkpoint_every=1)
  assert kept and max(kept) == bad_step - 1
  assert bad_step > 2
  every = bad_step - 1                         # the bad step lies between checkpoint steps
  named, kept = _diverge(tmp_path / "sparse", log_every=bad_step + 3, checkpoint_every=every,
                         keep_checkpoints=30)
  assert named == bad_step
  assert kept == list(range(every, bad_step, every))


def test_workdir_of_the_code_before_one_model_path_resumes(tmp_path):
  """A workdir trained before the refactor (its checkpoint holds TrainState.rng, since removed)
  resumes and continues the uninterrupted run's losses."""
  fixture = os.path.join(ROOT, "tests", "fixtures", "workdir_before_one_model_path")
  with open(fixture + ".expected.json") as f:
    expected = json.load(f)["uninterrupted_losses"]
  workdir = tmp_path / "w"
  shutil.copytree(fixture, workdir)
  result = run_train_py(workdir, "--config.eval_every=0", "--config.steps=6")
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  assert f"resumed from {workdir}/checkpoints/4" in result.stdout
  losses = _losses(workdir)
  np.testing.assert_allclose([losses[5], losses[6]], [expected["5"], expected["6"]], rtol=1e-5)


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir)}


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted(tmp_path):
  flags = ["--config.steps=16", "--config.checkpoint_every=4"]
  straight = run_train_py(tmp_path / "straight", *flags)
  assert straight.returncode == 0, straight.stdout + straight.stderr

  workdir = tmp_path / "interrupted"
  proc = run_train_py(workdir, *flags, background=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and (not metrics.exists() or
                                    len(metrics.read_text().splitlines()) < 6):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, output
  assert "SIGTERM: saved step" in output
  stopped = max(int(s) for s in os.listdir(workdir / "checkpoints"))
  assert 6 <= stopped < 16
  resumed = run_train_py(workdir, *flags)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert f"resumed from" in resumed.stdout
  a, b = _losses(tmp_path / "straight"), _losses(workdir)
  assert sorted(a) == sorted(b) == list(range(1, 17))
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-6)


@pytest.mark.slow
def test_kill_during_async_save_restarts_from_last_complete_checkpoint(tmp_path):
  flags = ["--config.steps=14", "--config.checkpoint_every=1", "--config.keep_checkpoints=20"]
  straight = run_train_py(tmp_path / "straight", *flags)
  assert straight.returncode == 0, straight.stdout + straight.stderr
  workdir = tmp_path / "killed"
  proc = run_train_py(workdir, *flags, background=True)
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and not (
      checkpoints.exists() and any(".orbax-checkpoint-tmp" in p for p in os.listdir(checkpoints))
      and len(os.listdir(checkpoints)) > 4):
    time.sleep(0.01)
  proc.kill()                                  # SIGKILL, most likely mid-save
  proc.communicate(timeout=60)
  # Whatever was cut off is not a checkpoint; a half-written directory also never counts.
  complete = max(int(p) for p in os.listdir(checkpoints) if p.isdigit())
  partial = checkpoints / f"{complete + 100}.orbax-checkpoint-tmp-1"
  partial.mkdir()
  (partial / "state").mkdir()
  resumed = run_train_py(workdir, *flags)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert f"resumed from {checkpoints}/{complete}" in resumed.stdout
  a, b = _losses(tmp_path / "straight"), _losses(workdir)
  np.testing.assert_allclose([b[s] for s in range(1, 15)], [a[s] for s in range(1, 15)],
                             rtol=1e-6)


@pytest.mark.parametrize("flag, message", [
    ("--config.not_a_field=1", "not_a_field"),
    ("--config.steps=many", "steps"),
    ("--config.model.n_group=3", "ModelConfig.n_group"),
    ("--config.model.vocab_size=200", "vocab_size=200"),
    ("--config.seq_len=5000", "max_position_embeddings"),
    ("--config.data.source=/nonexistent/*.txt", "/nonexistent"),
])
def test_bad_flags_fail_with_a_clear_message(flag, message, tmp_path):
  result = run_train_py(tmp_path / "w", flag, "--config.steps=2")
  assert result.returncode != 0
  output = result.stdout + result.stderr
  assert message in output
  assert "Traceback" not in output


@pytest.mark.slow
def test_checkpoint_restores_on_another_mesh(tmp_path):
  def run(workdir, mesh, stop_at=None):
    config = fast_config(steps=8, checkpoint_every=4, batch_size=8, eval_every=1000)
    config.mesh.update(mesh)
    model_cfg, train_cfg = resolve(config)
    train(model_cfg, train_cfg, str(workdir), synthetic_data(config), log=lambda s: None,
          stop_at=stop_at)
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}

  straight = run(tmp_path / "a", {"data": -1})
  run(tmp_path / "b", {"data": -1}, stop_at=4)
  resumed = run(tmp_path / "b", {"data": 2, "fsdp": 2, "tensor": 2})   # Orbax reshards
  assert sorted(resumed) == list(range(1, 9))
  np.testing.assert_allclose([resumed[s] for s in range(1, 9)],
                             [straight[s] for s in range(1, 9)], rtol=1e-4)


def test_eta_leaves_compilation_out_once_steady_steps_are_seen(monkeypatch):
  """The first update's window holds compilation (100 s here): its ETA is an overestimate;
  from the second update on the ETA counts only the steps after the first (1 s each)."""
  clock = iter([0.0, 100.0, 101.0])
  monkeypatch.setattr("deepjax.train.metrics.time.perf_counter", lambda: next(clock))
  stream = io.StringIO()
  progress = Progress(total_steps=10, start_step=0, stream=stream)
  record = dict(loss=2.5, tokens_per_sec=1000.0, mfu=0.1)
  progress.update(1, record)
  progress.update(2, record)
  first, second = stream.getvalue().splitlines()
  assert first.endswith("ETA 15:00") and second.endswith("ETA 0:08")


def test_progress_line_shows_balance_and_dropped_copies():
  stream = io.StringIO()
  progress = Progress(total_steps=10, start_step=0, stream=stream)
  record = dict(loss=2.5, max_vio=0.4, tokens_per_sec=1000.0, mfu=0.1)
  progress.update(5, record)
  progress.update(6, dict(record, dropped_fraction=0.125, eval_lm_loss=2.25))
  first, second = stream.getvalue().splitlines()
  assert "step 5/10" in first and "maxvio 0.40" in first and "dropped" not in first
  assert "eval 2.2500" in second and "dropped 12.5%" in second
