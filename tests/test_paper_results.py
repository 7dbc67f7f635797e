"""experiments/paper_results: each script end to end at --scale=test (subprocesses started
together, checked one by one), and the library pieces they rely on."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepjax.model import ModelOutput
from deepjax.parallel import batch_sharding, make_mesh
from deepjax.train.balance import max_violation
from deepjax.train.loop import evaluate
from deepjax.train.loss import batch_balance_loss, prediction_counts, training_losses
from deepjax.train.step import ObjectiveConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("kv_cache", "aux_loss_free", "moe_ablation", "mtp", "dsa")
MAX_PNG_BYTES = 200_000


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
  """Starts every script at --scale=test at once (unoptimised XLA: compiling dominates)."""
  root = tmp_path_factory.mktemp("paper_results")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  procs = {}
  for name in SCRIPTS:
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "paper_results", f"{name}.py"),
           "--scale=test", f"--out_dir={root / name}"]
    procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
  return {name: (root / name, proc) for name, proc in procs.items()}


def finished(outputs, name) -> tuple[dict, str]:
  folder, proc = outputs[name]
  log, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, log[-3000:]
  table = (folder / "results.md").read_text()
  results = json.loads((folder / "results.json").read_text())
  meta = results["meta"]
  assert meta["scale"] == "test" and f"{name}.py" in meta["command"] and meta["jax"]
  assert meta["command"] in table and meta["cpu"] in table
  pngs = sorted(folder.glob("*.png"))
  assert pngs, f"no plots in {folder}"
  for png in pngs:
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < MAX_PNG_BYTES
  return results, table


def test_kv_cache(outputs):
  results, table = finished(outputs, "kv_cache")
  models = {m["model"]: m for m in results["models"]}
  v3, v2 = models["V3"], models["V2"]
  assert v3["formula"]["mla"] == v3["measured_elements"] == 35_136      # (512 + 64) x 61
  assert v3["measured_bf16_bytes"] == v3["bf16_bytes"]["mla"] == 70_272
  assert v2["formula"] == {"mha": 2 * 128 * 128 * 60, "gqa": 2 * 8 * 128 * 60,
                           "mqa": 2 * 128 * 60, "mla": 576 * 60, "own": 576 * 60}
  assert v2["mla_over_d_h_l"] == 4.5 and v2["mla_equivalent_gqa_groups"] == 2.25
  assert models["V2-Lite"]["measured_elements"] == 576 * 27
  v32 = models["V3.2"]
  assert v32["attention"] == "dsa" and v32["formula"]["mla"] == 35_136
  assert v32["formula"]["own"] == v32["measured_elements"] == 704 * 61 == 42_944
  tiny = models["tiny"]
  assert tiny["method"] == "prefill, real arrays" and tiny["measured_elements"] == 48 * 4
  assert "35,136" in table and "70,272" in table and "42,944" in table


def test_aux_loss_free(outputs):
  results, table = finished(outputs, "aux_loss_free")
  runs = {r["name"]: r for r in results["runs"]}
  assert set(runs) == {"aux loss α=1e-3", "loss-free γ=1e-3"}
  assert (runs["aux loss α=1e-3"]["alpha"], runs["aux loss α=1e-3"]["gamma"]) == (1e-3, 0.0)
  top_vio = 8 / 2 - 1        # every token on the same 2 of 8 experts
  for r in runs.values():
    assert abs(r["eval_loss"] - math.log(272)) < 0.5           # 6 steps: still near uniform
    for key in ("max_vio_global", "max_vio_batch_mean", "max_vio_batch_last_quarter"):
      assert 0 <= r[key] <= top_vio, (key, r[key])
  curves = results["curves"]["loss-free γ=1e-3"]
  assert [c["step"] for c in curves] == list(range(1, 7))
  assert all("max_vio" in c for c in curves) and "eval_max_vio" in curves[-1]
  assert "MaxVio_global" in table


def test_moe_ablation(outputs):
  results, table = finished(outputs, "moe_ablation")
  runs = {r["name"]: r for r in results["runs"]}
  assert list(runs) == ["dense", "GShard top-2", "DeepSeekMoE"]
  dense, gshard, ds = runs["dense"], runs["GShard top-2"], runs["DeepSeekMoE"]
  hidden, layers = 32, 1               # the test model: only the routers' sizes differ
  assert gshard["activated_params"] - dense["activated_params"] == 16 * hidden * layers
  assert ds["activated_params"] - dense["activated_params"] == 63 * hidden * layers
  assert ds["total_params"] - gshard["total_params"] == (63 - 16) * hidden * layers
  assert dense["max_vio_global"] is None and ds["max_vio_global"] >= 0
  assert dense["vs_dense"] == 0.0
  for r in runs.values():
    assert math.isfinite(r["eval_loss"]) and 0 <= r["eval_accuracy"] <= 1
  assert "1 shared + 63 routed, top-7" in table


def test_mtp(outputs):
  results, table = finished(outputs, "mtp")
  base, mtp = results["runs"]
  assert base["main_params"] == mtp["main_params"]
  assert base["mtp_params"] == 0 < mtp["mtp_params"]
  assert mtp["train_flops_per_token"] > base["train_flops_per_token"]
  assert base["mtp_accuracy"] is None and base["mtp_agreement"] is None
  assert 0 <= mtp["mtp_accuracy"] <= 1 and 0 <= mtp["mtp_agreement"] <= 1
  assert math.isfinite(mtp["mtp_loss"])
  assert "MTP accuracy (t+2)" in table


def test_dsa(outputs):
  results, table = finished(outputs, "dsa")
  runs = {r["name"]: r for r in results["runs"]}
  assert list(runs) == ["V3 (dense MLA)", "dense warm-up (indexer only)", "sparse stage (DSA)",
                        "dense continuation"]
  v3, warm = runs["V3 (dense MLA)"], runs["dense warm-up (indexer only)"]
  assert warm["total_params"] > v3["total_params"]                # the indexers are new
  gap = runs["sparse stage (DSA)"]["final"]["eval_lm_loss"] - \
      runs["dense continuation"]["final"]["eval_lm_loss"]
  assert results["sparse_minus_dense_loss"] == pytest.approx(gap)
  assert [r["when"] for r in results["recall"]] == [
      "before warm-up (fresh indexers)", "after warm-up", "after the sparse stage"]
  for r in results["recall"]:
    assert 0 < r["random_recall"] <= 1 and 0 < r["recall"] <= 1 + 1e-6
    assert r["indexer_kl"] >= 0 and r["tokens"] == 2 * 32     # one held-out batch of 2 x 32
  # The random choice's recall: each query sees min(k, t + 1) of its t + 1 keys (one document
  # per row or several: at least the single-document value).
  assert results["recall"][0]["random_recall"] >= np.mean(
      [min(8, t + 1) / (t + 1) for t in range(32)]) - 1e-9
  warm_curve = results["curves"]["dense warm-up (indexer only)"]
  assert all("indexer_recall" in c and "indexer_kl" in c for c in warm_curve)
  assert all("indexer_kl" in c and "indexer_recall" not in c
             for c in results["curves"]["sparse stage (DSA)"])
  measured = results["cost"]["measured"]
  assert {(r["kind"], r["length"]) for r in measured} == {("dense", 64), ("dsa", 64)}
  for r in measured:
    assert r["prefill_seconds"] > 0 and r["decode_seconds"] > 0 and r["train_seconds"] > 0
    assert r["train_bytes"] > 0
  flops = {f["length"]: f for f in results["cost"]["v32_flops"]}
  assert flops[131072]["dense_decode"] / flops[131072]["dsa_decode"] > 13
  assert flops[4096]["dsa_prefill"] > flops[4096]["dense_prefill"]   # the indexer's overhead
  assert "Recall" in table and "dense/DSA" in table


# --- library pieces the scripts need -------------------------------------------------------

def test_batch_balance_loss_counts_over_the_whole_batch():
  rng = np.random.default_rng(0)
  layers, rows, experts, k = 2, 3, 4, 2
  counts = rng.integers(0, 5, (layers, rows, experts)).astype(np.float32)
  affinity = rng.random((layers, rows, experts)).astype(np.float32)
  tokens = np.array([5.0, 7.0, 3.0], np.float32)
  total = tokens.sum()
  expected = np.mean([sum(experts / (k * total) * counts[l, :, i].sum() *
                          affinity[l, :, i].sum() / total for i in range(experts))
                      for l in range(layers)])
  got = batch_balance_loss(jnp.asarray(counts), jnp.asarray(affinity), jnp.asarray(tokens), k)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_balance_loss_scope_is_checked():
  with pytest.raises(ValueError, match="balance_loss_scope"):
    ObjectiveConfig(balance_loss_scope="token")


def test_prediction_counts_score_mtp_on_the_token_two_ahead():
  tokens = jnp.asarray([[5, 6, 7, 8, 9, 3, 4, 0]], jnp.int32)
  segments = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 0]], jnp.int32)
  onehot = lambda ids: jnp.where(jnp.eye(12)[jnp.asarray([ids])] > 0, 9.0, -9.0)  # noqa: E731
  main = onehot([6, 7, 1, 9, 0, 4, 0, 0])           # 4 of the 5 targets right (t_{i+1})
  mtp = onehot([7, 1, 9, 0, 0, 0, 0, 0])            # 2 of the 3 valid t_{i+2} targets right
  out = ModelOutput(logits=main, mtp_logits=mtp[None], router=None, hidden=None)
  counts = {k: np.asarray(v) for k, v in prediction_counts(out, tokens, segments).items()}
  assert counts["lm_correct"] == 4 and counts["mtp_tokens"].tolist() == [3]
  assert counts["mtp_correct"].tolist() == [2]
  # MTP at i vs main at i+1 (both guess t_{i+2}): i=0: 7 vs 7, i=1: 1 vs 1, i=2: 9 vs 9.
  assert counts["mtp_agree"] == 3
  losses = training_losses(out, tokens, segments, top_k=1, mtp_weight=0.3, balance_weight=0.0)
  assert int(losses.tokens) == 5


def test_evaluate_reports_global_max_violation_and_accuracy():
  loads = [np.array([[4.0, 0.0, 2.0, 2.0]]), np.array([[0.0, 4.0, 2.0, 2.0]])]
  outs = iter([{"lm_loss": 2.0, "mtp_loss": 0.0, "tokens": 4.0, "lm_correct": 1.0, "loads": l}
               for l in loads])
  batches = iter([{k: np.zeros((1, 4), np.int32) for k in ("tokens", "segment_ids",
                                                             "positions")}] * 2)
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  record = evaluate(lambda state, batch: next(outs), None, batches, 2, batch_sharding(mesh))
  assert record["eval_lm_loss"] == 0.5 and record["eval_lm_accuracy"] == 0.25
  # Each batch alone is unbalanced (MaxVio 1); the eval set as a whole is balanced.
  assert [float(max_violation(l)[0]) for l in loads] == [1.0, 1.0]
  assert record["eval_max_vio"] == 0.0 and "eval_mtp_accuracy" not in record
