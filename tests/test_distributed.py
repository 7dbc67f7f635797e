"""Two processes on loopback (CPU collectives) train together like one process does."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from deepjax import data
from deepjax.train import resolve, train
from deepjax.train.metrics import read_metrics
from train_helpers import FAST_FLAGS, ROOT, fast_config


class _Concatenated:
  """The global batch of a 2-process run, read by one process: both shards side by side."""

  def __init__(self, iterators):
    self.iterators = iterators

  def __next__(self):
    batches = [next(it) for it in self.iterators]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self):
    return [it.get_state() for it in self.iterators]

  def set_state(self, state):
    for it, s in zip(self.iterators, state):
      it.set_state(s)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  steps = 6
  flags = ["--config.batch_size=8", f"--config.steps={steps}", "--config.eval_every=1000",
           "--config.checkpoint_every=3"]
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
       f"--workdir={tmp_path / 'multi'}", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", *FAST_FLAGS, *flags],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs

  config = fast_config(batch_size=8, steps=steps, eval_every=1000, checkpoint_every=3)
  model_cfg, train_cfg = resolve(config)
  shards = [data.make_dataset(data.SyntheticCorpus("train", seed=config.seed),
                              data.ByteTokenizer(), seq_len=config.seq_len, batch_size=8,
                              seed=config.seed, vocab_size=model_cfg.vocab_size,
                              process_index=i, process_count=2) for i in range(2)]
  train(model_cfg, train_cfg, str(tmp_path / "single"), _Concatenated(shards),
        log=lambda s: None)
  multi = [r["loss"] for r in read_metrics(str(tmp_path / "multi"))]
  single = [r["loss"] for r in read_metrics(str(tmp_path / "single"))]
  assert len(multi) == len(single) == steps
  np.testing.assert_allclose(multi, single, rtol=1e-4)
