"""Small, fast training set-ups shared by the training tests."""

import os
import subprocess
import sys

from deepjax import data
from deepjax.train import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny-preset-shaped model small enough that a step takes milliseconds.
FAST = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1)
FAST_FLAGS = [f"--config.model.{k}={v}" for k, v in FAST.items()] + [
    "--config.batch_size=4", "--config.seq_len=32", "--config.log_every=1",
    "--config.eval_every=4", "--config.eval_steps=1", "--config.warmup_steps=2"]


def fast_config(**overrides):
  config = default_config("tiny")
  config.model.update(FAST)
  config.update(dict(batch_size=4, seq_len=32, log_every=1, eval_every=4, eval_steps=1,
                     warmup_steps=2))
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def synthetic_data(config):
  return data.make_dataset(data.SyntheticCorpus("train", seed=config.seed),
                           data.ByteTokenizer(), seq_len=config.seq_len,
                           batch_size=config.batch_size, seed=config.seed,
                           vocab_size=config.model.vocab_size)


def run_train_py(workdir, *flags, timeout=600, background=False, devices=1):
  """Runs experiments/train.py in a subprocess (CPU, `devices` simulated devices); Popen if
  background."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}" if devices > 1 else "")
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "train.py"), f"--workdir={workdir}",
         *FAST_FLAGS, *flags]
  if background:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
