"""Trains a DeepSeek-style MoE model.

  python experiments/train.py --workdir=/tmp/tiny                       # tiny preset, CPU
  python experiments/train.py --workdir=DIR --config=experiments/configs/small.py \
      --config.steps=5000 --config.mesh.expert=4 --config.model.n_routed_experts=64

Rerunning on the same workdir resumes from its latest checkpoint (data position included).
SIGTERM saves a checkpoint and exits 0.
"""

import glob
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from deepjax import data, plots
from deepjax.parallel import distributed
from deepjax.train import resolve, train
from deepjax.train.metrics import read_metrics

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints.",
                               required=True)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process run (otherwise "
    "SLURM / MPI / TPU-pod environments are detected, or the run is single-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
try:   # config_flags applies --config.<field> overrides while defining the flag
  _CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Run config file.",
                                            lock_config=True)
except (AttributeError, KeyError) as unknown:
  sys.exit(f"train.py: error: the config has no field {str(unknown).strip(chr(34) + chr(39))!r} "
           f"(check the --config.<field> flags; model fields are --config.model.<field>)")


def make_source(spec: str, split: str, config):
  """'synthetic' or a glob of text / ArrayRecord files."""
  if spec == "synthetic":
    return data.SyntheticCorpus(split, seed=config.seed)
  if not spec:
    raise ValueError(f"config.data.{'source' if split == 'train' else 'eval_source'} is empty: "
                     f"give 'synthetic' or a glob of text or ArrayRecord files")
  if any(p.endswith((".arrayrecord", ".array_record")) for p in glob.glob(spec)) or \
      spec.endswith((".arrayrecord", ".array_record")):
    return data.ArrayRecordSource(spec, pretokenized=config.data.pretokenized)
  return data.TextFileSource(spec, lines=config.data.lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    run()
  except (ValueError, FileNotFoundError, FloatingPointError) as e:   # bad input: no traceback
    print(f"train.py: error: {e}", file=sys.stderr)
    sys.exit(1)


def run():
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # Orbax logs every save at INFO
  config = _CONFIG.value
  model_cfg, train_cfg = resolve(config)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  tokenizer = data.load_tokenizer(config.data.tokenizer)
  dataset = lambda source, seed, shuffle, epochs: data.make_dataset(  # noqa: E731
      source, tokenizer, seq_len=config.seq_len, batch_size=config.batch_size, seed=seed,
      vocab_size=model_cfg.vocab_size, process_index=jax.process_index(),
      process_count=jax.process_count(), shuffle=shuffle, num_epochs=epochs)
  train_data = dataset(make_source(config.data.source, "train", config), config.seed, True, None)
  eval_spec = config.data.eval_source or \
      ("synthetic" if config.data.source == "synthetic" else "")
  make_eval = None
  if eval_spec:
    eval_source = make_source(eval_spec, "eval", config)
    make_eval = lambda: dataset(eval_source, 0, False, None)  # noqa: E731
  else:
    print("no held-out data (config.data.eval_source): eval loss is not reported")

  summary = train(model_cfg, train_cfg, _WORKDIR.value, train_data, make_eval,
                  resolved_config=config.to_dict())
  if jax.process_index() == 0 and not summary["already_done"]:
    records = read_metrics(_WORKDIR.value)
    figures = plots.run_plots(_WORKDIR.value, records) if records else []
    loss = lambda value: "–" if value is None else f"{value:.4f}"  # noqa: E731
    print(f"\ndone at step {summary['step']}: final loss {loss(summary['final_loss'])}, eval LM "
          f"loss {loss(summary['eval_lm_loss'])}, {summary['tokens_per_sec'] or 0:,.0f} "
          f"tokens/s, MFU {100 * (summary['mfu'] or 0):.1f}%")
    print(f"checkpoints: {summary['checkpoints']}")
    print(f"metrics: {os.path.join(_WORKDIR.value, 'metrics.jsonl')}, TensorBoard: "
          f"{os.path.join(_WORKDIR.value, 'tensorboard')}, plots: {', '.join(figures)}")


if __name__ == "__main__":
  app.run(main)
