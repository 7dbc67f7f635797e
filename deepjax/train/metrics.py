"""Metrics of a run: one JSON object per logged step in metrics.jsonl, TensorBoard events, and
a console progress line (step, loss, tokens/s, ETA)."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np


def _plain(value):
  array = np.asarray(value)
  if array.ndim == 0:
    return array.item()
  return array.tolist()


class MetricsWriter:
  """Appends to DIR/metrics.jsonl and DIR/tensorboard. On resume, lines of steps after the
  restored one (logged before a crash, about to be replayed) are dropped, atomically."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(self.path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(self.path + ".tmp", self.path)
    self._file = open(self.path, "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)
    except ImportError:   # metrics.jsonl still has everything
      self._tb = None

  def write(self, step: int, metrics: dict) -> dict:
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, step)
      self._tb.flush()
    return record

  def close(self):
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
  """Console progress: a bar with step, loss, tokens/s and ETA on every logged step."""

  def __init__(self, total_steps: int, start_step: int, stream=sys.stdout, width: int = 24):
    self.total, self.start = total_steps, start_step
    self.stream, self.width = stream, width
    self.started = time.perf_counter()
    self.first = None       # (time, step) of the first update: compilation lies before it

  def update(self, step: int, record: dict) -> None:
    now = time.perf_counter()
    if self.first is None or step <= self.first[1]:
      # Only the first window is known, compilation included: an overestimate.
      done = (step - self.start) / max(self.total - self.start, 1)
      eta = (now - self.started) / max(done, 1e-9) * (1 - done) if done > 0 else float("nan")
      self.first = self.first or (now, step)
    else:   # steady steps since the first update
      eta = (now - self.first[0]) / (step - self.first[1]) * (self.total - step)
    filled = int(self.width * step / max(self.total, 1))
    bar = "#" * filled + "." * (self.width - filled)
    parts = [f"[{bar}] step {step}/{self.total}", f"loss {record['loss']:.4f}"]
    if "eval_lm_loss" in record:
      parts.append(f"eval {record['eval_lm_loss']:.4f}")
    if "max_vio" in record:
      parts.append(f"maxvio {record['max_vio']:.2f}")
    if "indexer_kl" in record:                          # V3.2's indexer
      parts.append(f"indexer_kl {record['indexer_kl']:.4f}")
    if "indexer_recall" in record:                      # the warm-up's dense mode
      parts.append(f"recall {record['indexer_recall']:.3f}")
    if record.get("dropped_fraction"):                  # expert parallelism with a capacity
      parts.append(f"dropped {100 * record['dropped_fraction']:.1f}%")
    parts += [f"{record['tokens_per_sec']:,.0f} tok/s", f"mfu {100 * record['mfu']:.1f}%",
              f"ETA {_duration(eta) if math.isfinite(eta) else '?'}"]
    print("  ".join(parts), file=self.stream, flush=True)
