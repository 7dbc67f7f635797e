"""DeepSeek Sparse Attention (V3.2 report §2): the indexer's warm-up, sparse training against
dense, and attention cost against context length.

  python experiments/paper_results/dsa.py [--scale=smoke|full] [--out_dir=DIR]

The report's continued training (§2.1), from a V3 checkpoint:
  1. a V3 model (dense MLA) trains from scratch: the checkpoint DSA starts from;
  2. dense warm-up: V3.2's lightning indexers are added and trained alone by L_I (eq. 3), the
     model frozen and attention dense;
  3. from the warm-up's checkpoint, two continuations with the same data and steps: the sparse
     stage (every parameter trains, each query attends to its index_topk selected keys, L_I
     over them, eq. 4) and a dense-attention continuation.
(a) recall, on held-out data: the share of the main attention's mass (eq. 3's p_t, the
    L1-normalised sum over heads) on the indexer's top-k keys, before the warm-up (fresh
    indexers), after it and after the sparse stage, against a random choice of k keys;
(b) the sparse stage's validation loss against the dense continuation's (the report: no
    substantial degradation);
(c) one attention layer's cost against context length, V3's dense MLA against DSA: forward
    FLOPs per token from deepjax.accounting (prefill and decode, at the measured shape and at
    V3.2's), and prefill, decode and training time and XLA's buffer memory measured on this
    machine up to the longest length whose buffers fit in a quarter of its memory.
"""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx

import common
import deepjax as dj
from deepjax import accounting
from deepjax.model.dsa import DeepSeekSparseAttention
from deepjax.model.mla import MultiHeadLatentAttention
from deepjax.train import ObjectiveConfig, TrainConfig
from deepjax.train.restore import load_trained_model

# V3.2's indexer beside each scale's model: index_topk well under seq_len so the selection bites.
INDEXER = {"test": dict(index_topk=8, index_head_dim=8, index_n_heads=4),
           "smoke": dict(index_topk=16, index_head_dim=16, index_n_heads=8),
           "full": dict(index_topk=2048, index_head_dim=128, index_n_heads=64)}
# Steps and learning rates of the three stages (the report's warm-up: 1000 steps at 1e-3, 16
# sequences of 128K tokens; its sparse stage: 15,000 steps at 7.3e-6, 480 sequences).
STAGES = {
    "test": dict(base=(6, 3e-3), warm_up=(4, 1e-3), continuation=(4, 1e-3)),
    "smoke": dict(base=(300, 3e-3), warm_up=(100, 1e-3), continuation=(200, 1e-3)),
    "full": dict(base=(100_000, 4.2e-4), warm_up=(1000, 1e-3), continuation=(15_000, 7.3e-6)),
}
RUN = {
    "test": dict(common.TEST_RUN, eval_every=2),
    "smoke": dict(common.SMOKE_RUN, eval_every=25),
    # V2-Lite's shape as a V3.2 model (with a query latent for the indexer) at 32K context,
    # parameters sharded over every device.
    "full": dict(model=dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                            moe_intermediate_size=1408, num_hidden_layers=27,
                            num_attention_heads=16, q_lora_rank=768, kv_lora_rank=512,
                            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                            n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
                            n_group=1, topk_group=1, first_k_dense_replace=1,
                            max_position_embeddings=32768, num_nextn_predict_layers=0),
                 batch_size=64, seq_len=32768, warmup_steps=2000, eval_every=500,
                 eval_steps=20, log_every=50, mesh={"data": 1, "fsdp": -1, "expert": 1,
                                                    "tensor": 1}),
}
HELD_OUT_BATCHES = {"test": 1, "smoke": 16, "full": 20}
# (c): V3.2's attention layer. On a CPU its heads are cut 16-fold and index_topk 8-fold, and
# hidden_size to 1024 so that the projections do not hide attention: the FLOP crossover of
# dense and sparse prefill moves from 17K tokens to 2.2K.
V32_LAYER = dict(num_hidden_layers=1, num_nextn_predict_layers=0, first_k_dense_replace=1)
CPU_LAYER = dict(V32_LAYER, hidden_size=1024, q_lora_rank=384, num_attention_heads=8,
                 index_n_heads=4, index_topk=256)
COST = {
    "test": dict(layer=dict(CPU_LAYER, hidden_size=64, q_lora_rank=32, kv_lora_rank=32,
                            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                            num_attention_heads=2, index_n_heads=2, index_head_dim=16,
                            index_topk=16),
                 lengths=(64,), impl="xla"),
    "smoke": dict(layer=CPU_LAYER, lengths=(256, 512, 1024, 2048, 4096, 8192), impl="xla"),
    "full": dict(layer=V32_LAYER, lengths=(4096, 8192, 16384, 32768, 65536, 131072),
                 impl="pallas"),
}
V32_CONTEXTS = (4096, 8192, 16384, 32768, 65536, 131072)


def stage_config(run: dict, stage: str, **changes) -> TrainConfig:
  steps, learning_rate = STAGES[common.SCALE.value][stage]
  run = {k: v for k, v in run.items() if k != "model"}
  train = common.train_config(**{**run, "learning_rate": learning_rate}, steps=steps,
                              objective=ObjectiveConfig(mtp_loss_weight=0.0))
  return dataclasses.replace(train, **changes)


def stages(root: str) -> tuple[dj.ModelConfig, list[common.Run]]:
  """(the V3.2 model config, the four runs in order, each starting from its predecessor)."""
  scale = common.SCALE.value
  run = dict(RUN[scale])
  run.pop("steps", None)
  run.pop("learning_rate", None)
  v3 = dj.ModelConfig.preset("tiny", **run["model"])
  v32 = v3.replace(model_type="deepseek_v32", **INDEXER[scale])
  workdir = lambda name: os.path.join(root, name)  # noqa: E731
  base = common.Run("V3 (dense MLA)", v3, stage_config(run, "base"))
  warm = stage_config(run, "warm_up", init_workdir=workdir(base.name))
  warm = common.Run("dense warm-up (indexer only)", v32.replace(dsa_attention="dense"),
                    dataclasses.replace(warm, optimizer=dataclasses.replace(
                        warm.optimizer, trainable="indexer")))
  after_warm = stage_config(run, "continuation", init_workdir=workdir(warm.name))
  return v32, [base, warm,
               common.Run("sparse stage (DSA)", v32, after_warm),
               common.Run("dense continuation", v32.replace(dsa_attention="dense"), after_warm)]


# --- (a) recall on held-out data -----------------------------------------------------------

def dense_mode_model(v32: dj.ModelConfig, workdir: str) -> dj.DeepSeek:
  """V3.2 with dense attention, holding the weights of the run in `workdir` wherever it has
  them: a V3 run's model gets fresh indexers, initialised as the warm-up's are (same seed)."""
  model = dj.DeepSeek(v32.replace(dsa_attention="dense"), rngs=nnx.Rngs(common.SEED.value))
  trained, _ = load_trained_model(workdir)
  nnx.update(model, nnx.state(trained))
  return model


@nnx.jit
def _indexer_stats(model, tokens, positions, segment_ids):
  out = model(tokens, positions=positions, segment_ids=segment_ids)
  return out.indexer_recall, out.indexer_kl


def held_out_indexer(model: dj.DeepSeek, run: common.Run) -> dict:
  """Recall and L_I (eq. 3) on held-out batches, means over their tokens, and the recall of k
  keys drawn at random from each query's visible ones: the mean of min(k, visible) / visible."""
  make_eval = common.eval_data(run)
  k = model.cfg.index_topk
  totals = np.zeros(4)
  for _, batch in zip(range(HELD_OUT_BATCHES[common.SCALE.value]), make_eval()):
    recall, kl = _indexer_stats(model, *(jnp.asarray(batch[key]) for key in
                                         ("tokens", "positions", "segment_ids")))
    real = batch["segment_ids"] != 0
    visible = batch["positions"][real] + 1
    tokens = real.sum()
    totals += [float(recall) * tokens, float(kl) * tokens,
               np.sum(np.minimum(k, visible) / visible), tokens]
  return {"recall": totals[0] / totals[3], "indexer_kl": totals[1] / totals[3],
          "random_recall": totals[2] / totals[3], "tokens": int(totals[3])}


# --- (c) attention cost against context length -----------------------------------------------

def _memory_bytes(compiled) -> int | None:
  stats = compiled.memory_analysis()
  return None if stats is None else int(stats.temp_size_in_bytes + stats.argument_size_in_bytes)


def _timed(compiled, *args, budget: float = 1.0, most: int = 5) -> float:
  """Median seconds per call after one warm-up call, repeated up to `most` times or `budget`."""
  jax.block_until_ready(compiled(*args))
  times = []
  while len(times) < most and sum(times) < budget:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def layer_cost(cfg: dj.ModelConfig, kind: str, length: int, memory_limit: float) -> dict | None:
  """One attention layer ("dense": V3's MLA; "dsa": V3.2's) on one sequence of `length`
  tokens: prefill (forward filling the cache), one decode step at that context and a training
  step (forward and backward; DSA's with the indexer loss of eq. 4): seconds and XLA's buffer
  bytes. None when the training step's buffers exceed memory_limit."""
  layer_type = MultiHeadLatentAttention if kind == "dense" else DeepSeekSparseAttention
  graphdef, state = nnx.split(layer_type(cfg, rngs=nnx.Rngs(0)))
  keys = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(keys[0], (1, length, cfg.hidden_size), cfg.dtype)
  positions = jnp.arange(length)[None]
  empty = layer_type.cache_type.zeros(cfg, 1, length, cfg.dtype)

  def prefill(state, x):
    return nnx.merge(graphdef, state)(x, positions, cache=empty, prefill=True)[:2]

  def train(state, x):
    def loss(state):
      out, _, stats = nnx.merge(graphdef, state)(x, positions)
      return jnp.mean(out ** 2) + (0.0 if stats is None else stats.kl)
    return jax.grad(loss)(state)

  def decode(state, token, cache):
    return nnx.merge(graphdef, state)(token, positions[:, -1:], cache=cache)[:2]

  train_step = jax.jit(train).lower(state, x).compile()
  train_bytes = _memory_bytes(train_step)
  if train_bytes is not None and train_bytes > memory_limit:
    return None
  prefill_step = jax.jit(prefill).lower(state, x).compile()
  _, cache = prefill_step(state, x)
  token = jax.random.normal(keys[1], (1, 1, cfg.hidden_size), cfg.dtype)
  decode_step = jax.jit(decode).lower(state, token, cache).compile()
  return {"kind": kind, "length": length,
          "prefill_seconds": _timed(prefill_step, state, x),
          "prefill_bytes": _memory_bytes(prefill_step),
          "decode_seconds": _timed(decode_step, state, token, cache, most=9),
          "train_seconds": _timed(train_step, state, x, most=3),
          "train_bytes": train_bytes,
          "prefill_flops_per_token": accounting.attention_flops_per_token(cfg, length),
          "decode_flops_per_token": accounting.attention_flops_per_token(
              cfg, length, causal=False, absorbed=True)}


def attention_costs() -> tuple[dj.ModelConfig, list[dict]]:
  setting = COST[common.SCALE.value]
  cfg = dj.ModelConfig.preset("v3.2", **setting["layer"], attention_impl=setting["impl"])
  memory_limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4
  rows, fits = [], {"dense": True, "dsa": True}
  for length in setting["lengths"]:
    for kind in fits:
      if fits[kind]:
        kind_cfg = cfg.replace(dsa_attention="dense") if kind == "dense" else cfg
        row = layer_cost(kind_cfg, kind, length, memory_limit)
        fits[kind] = row is not None
        if row:
          rows.append(row)
          print(f"{kind:5s} T={length:6d}: prefill {row['prefill_seconds'] * 1e3:9.1f} ms, "
                f"decode {row['decode_seconds'] * 1e3:7.2f} ms, "
                f"train {row['train_seconds'] * 1e3:9.1f} ms")
  return cfg, rows


def v32_flops() -> list[dict]:
  """Forward attention FLOPs per token of one V3.2 layer (published shape), dense MLA vs DSA."""
  v32 = dj.ModelConfig.preset("v3.2")
  dense = v32.replace(dsa_attention="dense")
  return [{"length": t,
           "dense_prefill": accounting.attention_flops_per_token(dense, t),
           "dsa_prefill": accounting.attention_flops_per_token(v32, t),
           "dense_decode": accounting.attention_flops_per_token(dense, t, causal=False,
                                                                absorbed=True),
           "dsa_decode": accounting.attention_flops_per_token(v32, t, causal=False)}
          for t in V32_CONTEXTS]


# --- plots and tables ------------------------------------------------------------------------

def plot_costs(costs: list[dict], flops: list[dict]) -> None:
  from matplotlib.figure import Figure
  fig = Figure(figsize=(11, 4))
  panels = fig.subplots(1, 3)
  for kind, style in (("dense", "o-"), ("dsa", "s-")):
    rows = [r for r in costs if r["kind"] == kind]
    lengths = [r["length"] for r in rows]
    label = "dense MLA (V3)" if kind == "dense" else "DSA (V3.2)"
    panels[0].plot(lengths, [r["prefill_seconds"] / r["length"] * 1e6 for r in rows], style,
                   label=f"{label}, prefill")
    panels[0].plot(lengths, [r["decode_seconds"] * 1e6 for r in rows], style, alpha=0.5,
                   label=f"{label}, decode")
    panels[1].plot(lengths, [r["train_bytes"] / 2**20 for r in rows], style, label=label)
    panels[2].plot([f["length"] for f in flops], [f[f"{kind}_prefill"] / 1e6 for f in flops],
                   style, label=f"{label}, prefill")
    panels[2].plot([f["length"] for f in flops], [f[f"{kind}_decode"] / 1e6 for f in flops],
                   style, alpha=0.5, label=f"{label}, decode")
  titles = ("measured µs per token, one layer", "training step buffers (MiB), one layer",
            "V3.2 layer: attention MFLOPs per token")
  for ax, title in zip(panels, titles):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(common.out_dir(), "attention_cost.png"), dpi=90)


def cost_table(costs: list[dict]) -> str:
  by = {(r["kind"], r["length"]): r for r in costs}
  rows = []
  for length in sorted({r["length"] for r in costs}):
    dense, dsa = by.get(("dense", length)), by.get(("dsa", length))
    ratio = lambda key: (dense[key] / dsa[key] if dense and dsa else None)  # noqa: E731
    mib = lambda row: None if row is None or row["train_bytes"] is None else \
        row["train_bytes"] / 2**20  # noqa: E731
    rows.append([length, ratio("prefill_flops_per_token"), ratio("prefill_seconds"),
                 ratio("decode_flops_per_token"), ratio("decode_seconds"),
                 ratio("train_seconds"), mib(dense), mib(dsa)])
  return common.markdown_table(
      ["context", "prefill FLOPs dense/DSA", "prefill time dense/DSA", "decode FLOPs dense/DSA",
       "decode time dense/DSA", "training time dense/DSA", "training buffers dense (MiB)",
       "training buffers DSA (MiB)"], rows)


def main(argv):
  del argv
  started = common.start()
  with common.workdir_root() as root:
    v32, runs = stages(root)
    base, warm, sparse, dense = runs
    trained = [common.train_run(base, root)]
    before = held_out_indexer(dense_mode_model(v32, os.path.join(root, base.name)), base)
    trained.append(common.train_run(warm, root))
    after = held_out_indexer(dense_mode_model(v32, os.path.join(root, warm.name)), base)
    trained += [common.train_run(sparse, root), common.train_run(dense, root)]
    after_sparse = held_out_indexer(dense_mode_model(v32, os.path.join(root, sparse.name)),
                                    base)
  recall = [dict(when="before warm-up (fresh indexers)", **before),
            dict(when="after warm-up", **after),
            dict(when="after the sparse stage", **after_sparse)]
  cost_cfg, costs = attention_costs()
  flops = v32_flops()
  final = {r["name"]: r["final"]["eval_lm_loss"] for r in trained}
  gap = final[sparse.name] - final[dense.name]

  recall_table = common.markdown_table(
      ["indexer", "recall of its top-k", "random k keys", "L_I (KL, nats)"],
      [[r["when"], r["recall"], r["random_recall"], r["indexer_kl"]] for r in recall])
  loss_table = common.markdown_table(
      ["run", "steps", "from", "validation loss", "tokens/s (median)"],
      [[r["name"], run.train.steps, os.path.basename(run.train.init_workdir) or "scratch",
        r["final"]["eval_lm_loss"],
        round(float(np.median([x["tokens_per_sec"] for x in r["records"][1:]] or [0.0])))]
       for r, run in zip(trained, runs)])
  v32_table = common.markdown_table(
      ["context", "dense prefill", "DSA prefill", "dense decode", "DSA decode"],
      [[f["length"], *(f"{f[key] / 1e6:,.0f} M" for key in
                       ("dense_prefill", "dsa_prefill", "dense_decode", "dsa_decode"))]
       for f in flops])
  body = f"""
V3.2's continued training at this scale: a V3 model trained from scratch, the dense warm-up
(indexers alone, model frozen), then from the warm-up's checkpoint the sparse stage and a
dense-attention continuation with the same data and steps. index_topk = {v32.index_topk} at
{runs[0].train.seq_len} tokens per row, {v32.index_n_heads} indexer heads of {v32.index_head_dim}.

**(a) Recall** on {recall[0]['tokens']:,} held-out tokens: the share of the main attention's mass
(p_t of eq. 3, summed over heads and L1-normalised) on the indexer's top-{v32.index_topk}, mean
over tokens and layers; the model runs with dense attention to measure it.

{recall_table}

**(b) Sparse against dense attention** from the same warm-up checkpoint: validation loss of the
sparse stage minus the dense continuation's: {gap:+.4f} nats per token.

{loss_table}

**(c) Cost of one attention layer against context length.** Measured here: V3.2's layer shape
with {cost_cfg.num_attention_heads} heads, {cost_cfg.index_n_heads} indexer heads and
index_topk {cost_cfg.index_topk} (`attention_impl={cost_cfg.attention_impl}`), float32, one
sequence; ratios over 1 favour DSA. Prefill fills the cache (forward), decode is one token at
that context, training is forward and backward (DSA's with the indexer loss); buffers are
XLA's compiled temporaries and arguments of the training step.

{cost_table(costs)}

Forward attention FLOPs per token of one layer at V3.2's published shape (index_topk 2048,
64 indexer heads of 128; `deepjax.accounting`):

{v32_table}

Paper: V3.2 §2.2 and Figure 3: with DSA, the per-token cost of prefilling and decoding grows
far more slowly with the token's position than V3.1's; §4 reports no substantial degradation
against V3.1-Terminus on short- or long-context tasks after the sparse stage.
"""
  common.plot_curves(trained[2:], "eval_lm_loss", "validation_loss.png",
                     ylabel="validation loss (nats/token)",
                     title="Sparse stage vs dense continuation from the warm-up checkpoint")
  common.plot_curves(trained[1:2], "indexer_recall", "warm_up_recall.png",
                     ylabel="recall of the indexer's top-k (training batches)",
                     title="Dense warm-up: attention mass on the indexer's top-k")
  plot_costs(costs, flops)
  common.write_results(
      "DeepSeek Sparse Attention", body,
      {"recall": recall, "sparse_minus_dense_loss": gap,
       "runs": [{k: v for k, v in r.items() if k != "records"} for r in trained],
       "curves": common.curves(trained, ("lm_loss", "indexer_kl", "indexer_recall",
                                         "eval_lm_loss")),
       "cost": {"layer": dataclasses.asdict(cost_cfg), "measured": costs, "v32_flops": flops}},
      started)


if __name__ == "__main__":
  app.run(main)
