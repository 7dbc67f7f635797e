"""Run config: the `tiny-v3.2` preset, tiny with DeepSeek Sparse Attention (each token attends
to its indexer's top 64 keys). Override fields with --config.<field>=value; the indexer warm-up
(dense attention) is --config.model.dsa_attention=dense."""

from deepjax.train import default_config


def get_config():
  config = default_config("tiny-v3.2")
  # The tiny run's schedule: trains on a laptop CPU in a few minutes on the embedded corpus.
  config.steps = 200
  config.batch_size = 8
  config.seq_len = 256
  config.learning_rate = 3e-3
  config.warmup_steps = 20
  config.eval_every = 50
  config.checkpoint_every = 100
  return config
