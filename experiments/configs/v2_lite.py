"""Run config: the `v2-lite` preset. Override fields with --config.<field>=value."""

from deepjax.train import default_config


def get_config():
  config = default_config("v2-lite")
  # DeepSeek-V2-Lite (15.7B): a multi-host run; set the mesh for your slice.
  config.steps = 100_000
  config.batch_size = 512
  config.seq_len = 4096
  config.learning_rate = 4.2e-4
  config.warmup_steps = 2000
  config.mesh.data, config.mesh.fsdp, config.mesh.expert = 1, -1, 8
  config.data.source = ""        # a glob of your tokenized ArrayRecord shards
  config.data.pretokenized = True
  return config
