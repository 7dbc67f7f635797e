"""Plumbing shared by the paper-result scripts: flags, data, training runs, the results folder.

Every script takes --scale (smoke: a CPU in minutes; full: the papers' small-scale
experiments, for a pod; test: seconds, for the test suite), --out_dir and --seed, trains through
`deepjax.train.train` and writes into its output folder a markdown table (`results.md`, headed by
the command, date, JAX version and machine), `results.json` and PNG plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time

import jax
from absl import flags, logging

from deepjax import accounting, data
from deepjax.config import ModelConfig
from deepjax.train import TrainConfig, train
from deepjax.train.metrics import read_metrics
from deepjax.train.optimizer import OptimizerConfig
from deepjax.train.step import ObjectiveConfig

SCALES = ("test", "smoke", "full")
SCALE = flags.DEFINE_enum("scale", "smoke", SCALES,
                          "smoke: a CPU in minutes; full: paper-sized, for a pod; test: seconds.")
OUT_DIR = flags.DEFINE_string("out_dir", None, "Output folder (default: "
                              "experiments/paper_results/results/<script>).")
SEED = flags.DEFINE_integer("seed", 0, "Seed of model initialisation, data order and corpus.")
STEPS = flags.DEFINE_integer("steps", None, "Override the training steps of every run.")
WORKDIR_ROOT = flags.DEFINE_string(
    "workdir_root", None, "Keep each run's workdir (checkpoints, metrics.jsonl) under this "
    "folder, so that a rerun resumes; default: a temporary folder, deleted at the end.")
DATA = flags.DEFINE_string("data", "synthetic", "'synthetic' (the embedded corpus) or a glob of "
                           "text files for training.")
EVAL_DATA = flags.DEFINE_string("eval_data", "", "Held-out text files (glob); default: the "
                                "synthetic eval split when --data=synthetic.")
TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "'byte' or a tokenizer.json path.")

RESULTS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# The model all smoke-scale training runs start from: a 2-layer V3-shaped MoE (byte vocabulary)
# whose train step compiles in well under a minute on a shared 2-core CPU.
SMOKE_MODEL = dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_shared_experts=1, n_routed_experts=16,
    num_experts_per_tok=4, n_group=1, topk_group=1, first_k_dense_replace=0,
    num_nextn_predict_layers=0)
# The test scale: the smallest model that still has every part.
TEST_MODEL = dict(SMOKE_MODEL, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                  num_hidden_layers=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                  v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2)
# Run settings the training scripts share at each scale; a script adds its steps and eval
# cadence to SMOKE_RUN.
TEST_RUN = dict(model=TEST_MODEL, steps=6, batch_size=2, seq_len=32, learning_rate=3e-3,
                warmup_steps=2, eval_every=3, eval_steps=1, log_every=1)
SMOKE_RUN = dict(model=SMOKE_MODEL, batch_size=8, seq_len=128, learning_rate=3e-3,
                 warmup_steps=30, eval_steps=16, log_every=10)


def start() -> float:
  """Call first in main: quiets Orbax's per-save INFO logs (unless --verbosity is given) and
  returns the start time for write_results. Without --workdir_root the workdirs are temporary,
  so their TensorBoard events are skipped (tensorboardX imports torch: seconds per script)."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not WORKDIR_ROOT.value:
    sys.modules.setdefault("tensorboardX", None)    # MetricsWriter then writes metrics.jsonl only
  return time.perf_counter()


def script_name() -> str:
  return os.path.splitext(os.path.basename(sys.argv[0]))[0]


def out_dir() -> str:
  path = OUT_DIR.value or os.path.join(RESULTS_ROOT, script_name())
  os.makedirs(path, exist_ok=True)
  return path


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of an experiment: a name, the model and the run config."""
  name: str
  model: ModelConfig
  train: TrainConfig


def train_config(*, steps: int, batch_size: int, seq_len: int, learning_rate: float,
                 warmup_steps: int, eval_every: int, eval_steps: int, log_every: int,
                 objective: ObjectiveConfig, mesh: dict | None = None) -> TrainConfig:
  """A TrainConfig with the flags' seed and --steps override; one checkpoint, at the end."""
  steps = STEPS.value or steps
  return TrainConfig(
      steps=steps, batch_size=batch_size, seq_len=seq_len, seed=SEED.value,
      log_every=min(log_every, steps), eval_every=min(eval_every, steps), eval_steps=eval_steps,
      checkpoint_every=steps, keep_checkpoints=1,
      mesh=mesh or {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1},
      optimizer=OptimizerConfig(learning_rate=learning_rate,
                                warmup_steps=min(warmup_steps, steps // 2)),
      objective=objective)


def _source(spec: str, split: str):
  if spec == "synthetic":
    return data.SyntheticCorpus(split, seed=SEED.value)
  if spec.endswith((".arrayrecord", ".array_record")):
    return data.ArrayRecordSource(spec)
  return data.TextFileSource(spec)


def _dataset(run: Run, source, seed: int, shuffle: bool):
  return data.make_dataset(source, data.load_tokenizer(TOKENIZER.value),
                           seq_len=run.train.seq_len, batch_size=run.train.batch_size, seed=seed,
                           vocab_size=run.model.vocab_size, process_index=jax.process_index(),
                           process_count=jax.process_count(), shuffle=shuffle)


def eval_data(run: Run):
  """A function giving a fresh iterator of the held-out batches (unshuffled: every
  evaluation sees the same ones)."""
  eval_spec = EVAL_DATA.value or ("synthetic" if DATA.value == "synthetic" else "")
  if not eval_spec:
    raise ValueError("--eval_data is required with --data other than 'synthetic'")
  eval_source = _source(eval_spec, "eval")
  return lambda: _dataset(run, eval_source, 0, False)


def datasets(run: Run):
  """(run's training iterator, a function giving a fresh iterator of held-out batches)."""
  return _dataset(run, _source(DATA.value, "train"), SEED.value, True), eval_data(run)


def train_run(run: Run, root: str) -> dict:
  """Trains `run` in root/<name> (resuming if a checkpoint is there) and returns its record:
  sizes from deepjax.accounting, wall time, every logged metrics line, and the last eval."""
  workdir = os.path.join(root, run.name)
  train_data, make_eval = datasets(run)
  print(f"\n== {run.name}")
  start = time.perf_counter()
  # config.json as experiments/train.py writes it (the optimizer's fields at the top), so that
  # another run can start from this one (restore.initialise_from).
  resolved = {**dataclasses.asdict(run.train.optimizer),
              **{k: v for k, v in dataclasses.asdict(run.train).items() if k != "optimizer"}}
  train(run.model, run.train, workdir, train_data, make_eval, resolved_config=resolved)
  seconds = time.perf_counter() - start
  records = read_metrics(workdir)
  final = next(r for r in reversed(records) if "eval_lm_loss" in r)
  counts = accounting.param_counts(run.model)
  return {"name": run.name, "seconds": seconds, "total_params": counts.total,
          "activated_params": counts.activated, "mtp_params": counts.mtp,
          "train_flops_per_token": accounting.flops_per_token(run.model, run.train.seq_len),
          "tokens": run.train.steps * run.train.batch_size * run.train.seq_len,
          "final": {k: v for k, v in final.items() if k.startswith("eval_")},
          "records": records}


def curves(trained: list[dict], keys: tuple[str, ...]) -> dict:
  """Run name -> the logged steps' values of `keys` (for results.json)."""
  return {run["name"]: [{k: r[k] for k in ("step", *keys) if k in r} for r in run["records"]]
          for run in trained}


@contextlib.contextmanager
def workdir_root():
  """The folder the runs' workdirs go under: --workdir_root, or a temporary one deleted after."""
  if WORKDIR_ROOT.value:
    yield WORKDIR_ROOT.value
  else:
    with tempfile.TemporaryDirectory() as root:
      yield root


def train_runs(runs: list[Run]) -> list[dict]:
  """Trains the runs one after another, each in <workdir_root>/<name>."""
  with workdir_root() as root:
    return [train_run(run, root) for run in runs]


def _save(fig, ax, path: str, ylabel: str, title: str, log_y: bool) -> str:
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if log_y:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def plot_curves(runs: list[dict], key: str, filename: str, *, ylabel: str, title: str,
                log_y: bool = False) -> str:
  """One line per run of the metrics.jsonl field `key` against step, into the output folder."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  for run in runs:
    points = [(r["step"], r[key]) for r in run["records"] if r.get(key) is not None]
    if points:
      ax.plot(*zip(*points), marker="o" if len(points) < 8 else None, label=run["name"])
  ax.set_xlabel("step")
  return _save(fig, ax, os.path.join(out_dir(), filename), ylabel, title, log_y)


def plot_bars(groups: list[str], series: dict[str, list[float]], filename: str, *, ylabel: str,
              title: str, log_y: bool = False) -> str:
  """Side-by-side bars: one value per group for each series, into the output folder."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  width = 0.8 / len(series)
  for i, (name, values) in enumerate(series.items()):
    x = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
    ax.bar(x, values, width, label=name)
  ax.set_xticks(range(len(groups)), groups)
  return _save(fig, ax, os.path.join(out_dir(), filename), ylabel, title, log_y)


def fmt(value, digits: int = 3) -> str:
  """A table cell: numbers with `digits` decimals (thousands separators for integers)."""
  if value is None:
    return "–"
  if isinstance(value, int):
    return f"{value:,}"
  return f"{value:,.{digits}f}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |"
            for row in rows]
  return "\n".join(lines)


def machine() -> dict:
  device = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "device_kind": device.device_kind, "devices": jax.device_count(), "cpu": cpu,
          "cpu_cores": os.cpu_count(), "python": platform.python_version()}


def write_results(title: str, body: str, results: dict, started: float) -> str:
  """Writes results.md (title, provenance, body) and results.json into the output folder."""
  folder = out_dir()
  meta = {"command": "python " + " ".join(shlex.quote(a) for a in
                                          [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
          "scale": SCALE.value, "seed": SEED.value,
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "wall_seconds": round(time.perf_counter() - started, 1),
          "cpu_seconds": round(sum(os.times()[:2]), 1), **machine()}
  provenance = (f"`{meta['command']}`\n\n{meta['date']}, {meta['wall_seconds']:.0f} s wall, "
                f"{meta['cpu_seconds']:.0f} s CPU (the machine was shared with other jobs); "
                f"JAX {meta['jax']} on {meta['devices']} × {meta['device_kind']} "
                f"({meta['backend']}); CPU: {meta['cpu']}, {meta['cpu_cores']} cores.")
  with open(os.path.join(folder, "results.md"), "w") as f:
    f.write(f"# {title}\n\n{provenance}\n\n{body.strip()}\n")
  with open(os.path.join(folder, "results.json"), "w") as f:
    json.dump({"meta": meta, **results}, f, indent=1, default=float)
  print(f"\n{body}\n\nwrote {folder}/results.md, results.json")
  return folder
