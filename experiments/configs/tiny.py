"""Run config: the `tiny` preset, or another CPU-sized one given after a colon
(--config=experiments/configs/tiny.py:tiny-v3.2: tiny with DeepSeek Sparse Attention). Override
fields with --config.<field>=value."""

from deepjax.train import default_config


def get_config(preset: str = "tiny"):
  config = default_config(preset)
  # Trains on a laptop CPU in a few minutes on the embedded synthetic corpus.
  config.steps = 200
  config.batch_size = 8
  config.seq_len = 256
  config.learning_rate = 3e-3
  config.warmup_steps = 20
  config.eval_every = 50
  config.checkpoint_every = 100
  return config
