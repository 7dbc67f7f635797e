"""Plots of a training run from its metrics.jsonl: loss curves and expert load (matplotlib)."""

from __future__ import annotations

import os

import numpy as np


def _figure(**kwargs):
  """A figure outside pyplot: drawing it to a file neither needs nor changes the process's
  matplotlib backend (a notebook keeps its inline plots)."""
  from matplotlib.figure import Figure
  return Figure(**kwargs)


def loss_curves(records: list[dict], path: str) -> str:
  """Train LM / MTP / total loss and eval LM loss against step."""
  fig = _figure(figsize=(7, 4))
  ax = fig.subplots()
  steps = [r["step"] for r in records]
  for key, label in (("loss", "total"), ("lm_loss", "LM"), ("mtp_loss", "MTP")):
    if all(key in r for r in records):
      ax.plot(steps, [r[key] for r in records], label=f"train {label}")
  evals = [(r["step"], r["eval_lm_loss"]) for r in records if r.get("eval_lm_loss") is not None]
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval LM")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def expert_load(records: list[dict], path: str) -> str | None:
  """Heatmap of the last logged expert loads (MoE layer x expert, load / mean) and MaxVio."""
  loads = [r for r in records if r.get("expert_load") is not None]
  if not loads:
    return None
  last = np.asarray(loads[-1]["expert_load"])
  fig = _figure(figsize=(11, 3.8))
  ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
  image = ax.imshow(last, aspect="auto", cmap="viridis")
  ax.set_xlabel("expert")
  ax.set_yticks(range(last.shape[0]))
  ax.set_ylabel("MoE layer (last rows: MTP)")
  ax.set_title(f"expert load / mean, step {loads[-1]['step']}")
  fig.colorbar(image, ax=ax)
  ax2.plot([r["step"] for r in loads], [r["max_vio"] for r in loads])
  ax2.set_xlabel("step")
  ax2.set_ylabel("MaxVio (batch)")
  ax2.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def run_plots(workdir: str, records: list[dict]) -> list[str]:
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  paths = [loss_curves(records, os.path.join(workdir, "plots", "loss.png")),
           expert_load(records, os.path.join(workdir, "plots", "expert_load.png"))]
  return [p for p in paths if p]
