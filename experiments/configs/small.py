"""Run config: the `small` preset. Override fields with --config.<field>=value."""

from deepjax.train import default_config


def get_config():
  config = default_config("small")
  # ~100M parameters: one GPU or TPU host.
  config.steps = 20_000
  config.batch_size = 64
  config.seq_len = 1024
  config.learning_rate = 1e-3
  config.warmup_steps = 1000
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.model.dtype = "bfloat16"
  return config
