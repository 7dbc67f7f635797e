"""AdamW against Muon (DeepSeek-V4's optimizer) on the tiny preset: loss at equal steps and step
time, measured in one run.

  python experiments/benchmarks/optimizer_compare.py             # tiny, 200 steps of 8 x 256
  python experiments/benchmarks/optimizer_compare.py --smoke     # 4 steps each, seconds
  python experiments/benchmarks/optimizer_compare.py --log       # also under logs/, dated, + plot

Both runs train experiments/configs/tiny.py's set-up (same model initialisation, data order and
learning-rate schedule) through `deepjax.train.train`, one with `optimizer="adamw"` and one with
`optimizer="muon"` at the same peak learning rate and weight decay: Muon's updates are rescaled
to AdamW-like RMS (`muon_rms`, Moonlight's convention), which is the claim under test. Reported:
training loss averaged over the last tenth of the steps, held-out loss at the end, median step
time (the loop's tokens/s, compilation excluded; the two runs are sequential, so a load change
on a shared machine lands on one of them), and the optimizer state's size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import io
import os
import tempfile

import jax
import numpy as np

from deepjax import data
from deepjax.train import resolve, train
from deepjax.train.metrics import read_metrics
from deepjax.train.optimizer import OPTIMIZERS, make_optimizer
from deepjax.train.state import abstract_train_state

HERE = os.path.dirname(os.path.abspath(__file__))
LOGS = os.path.join(HERE, "logs")
TINY_CONFIG = os.path.join(os.path.dirname(HERE), "configs", "tiny.py")


def tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_config", TINY_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def optimizer_state_bytes(model_cfg, optimizer_cfg) -> int:
  _, abstract = abstract_train_state(model_cfg, make_optimizer(optimizer_cfg))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.opt_state))


def run(name: str, model_cfg, train_cfg, workdir: str) -> dict:
  train_cfg = dataclasses.replace(train_cfg, optimizer=dataclasses.replace(
      train_cfg.optimizer, optimizer=name))
  def dataset(split, seed, shuffle):
    return data.make_dataset(data.SyntheticCorpus(split, seed=train_cfg.seed),
                             data.ByteTokenizer(), seq_len=train_cfg.seq_len,
                             batch_size=train_cfg.batch_size, seed=seed,
                             vocab_size=model_cfg.vocab_size, shuffle=shuffle)
  print(f"== {name}")
  train(model_cfg, train_cfg, workdir, dataset("train", train_cfg.seed, True),
        lambda: dataset("eval", 0, False))
  records = read_metrics(workdir)
  losses = [r["lm_loss"] for r in records]        # the main head (MTP left out), as eval
  tail = max(1, len(losses) // 10)
  rates = [r["tokens_per_sec"] for r in records[1:] if r.get("tokens_per_sec")]
  tokens = train_cfg.batch_size * train_cfg.seq_len
  final_eval = next((r["eval_lm_loss"] for r in reversed(records) if "eval_lm_loss" in r), None)
  return {"optimizer": name, "steps": records[-1]["step"], "records": records,
          "train_loss_tail": float(np.mean(losses[-tail:])), "eval_loss": final_eval,
          "step_ms": 1e3 * tokens / float(np.median(rates)) if rates else None,
          "state_bytes": optimizer_state_bytes(model_cfg, train_cfg.optimizer)}


def table(rows: list[dict]) -> str:
  base = rows[0]
  lines = ["| optimizer | steps | training loss (logged steps, last 10%) | held-out loss | "
           "step time (ms) | vs AdamW | optimizer state (MB) |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    ratio = (f"{r['step_ms'] / base['step_ms']:.2f}x" if r["step_ms"] and base["step_ms"]
             else "–")
    step = f"{r['step_ms']:.1f}" if r["step_ms"] else "–"
    held_out = f"{r['eval_loss']:.3f}" if r["eval_loss"] is not None else "–"
    lines.append(f"| {r['optimizer']} | {r['steps']} | {r['train_loss_tail']:.3f} | {held_out} | "
                 f"{step} | {ratio} | {r['state_bytes'] / 1e6:.2f} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  for r in rows:
    ax.plot([x["step"] for x in r["records"]], [x["lm_loss"] for x in r["records"]],
            label=r["optimizer"])
  ax.set_xlabel("step")
  ax.set_ylabel("training LM loss (nats/token)")
  ax.set_title("tiny preset: AdamW vs Muon at the same learning rate")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=None, help="default: the tiny config's")
  parser.add_argument("--smoke", action="store_true", help="4 steps of 8 x 32 tokens each")
  parser.add_argument("--log", action="store_true", help="also write logs/<date>-optimizers.*")
  args = parser.parse_args()
  config = tiny_config()
  config.eval_steps = 4
  if args.smoke:
    # 8 rows: divisible by the 8 devices the test suite simulates.
    config.update(steps=4, batch_size=8, seq_len=32, eval_every=4, eval_steps=1, log_every=1,
                  warmup_steps=1)
  if args.steps:
    config.update(steps=args.steps, eval_every=args.steps)
  config.checkpoint_every = config.steps
  model_cfg, train_cfg = resolve(config)
  out = io.StringIO()
  with tempfile.TemporaryDirectory() as root:
    rows = [run(name, model_cfg, train_cfg, os.path.join(root, name)) for name in OPTIMIZERS]
  with contextlib.redirect_stdout(out):
    print(f"# AdamW vs Muon, {datetime.date.today()}: tiny preset, {train_cfg.steps} steps of "
          f"{train_cfg.batch_size} x {train_cfg.seq_len} tokens, peak learning rate "
          f"{train_cfg.optimizer.learning_rate}, weight decay {train_cfg.optimizer.weight_decay}, "
          f"JAX {jax.__version__} on {jax.devices()[0].device_kind}\n")
    print(table(rows))
  print("\n" + out.getvalue())
  if args.log:
    os.makedirs(LOGS, exist_ok=True)
    stem = os.path.join(LOGS, f"{datetime.date.today()}-optimizers")
    with open(stem + ".md", "w") as f:
      f.write(out.getvalue())
    plot(rows, stem + ".png")
    print(f"wrote {stem}.md, {stem}.png")


if __name__ == "__main__":
  main()
