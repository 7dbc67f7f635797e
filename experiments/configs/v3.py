"""Run config: the `v3` preset. Override fields with --config.<field>=value."""

from deepjax.train import default_config


def get_config():
  config = default_config("v3")
  # DeepSeek-V3 (671B): pod scale; size it first with the memory planner.
  config.steps = 100_000
  config.batch_size = 4096
  config.seq_len = 4096
  config.learning_rate = 2.2e-4
  config.warmup_steps = 2000
  config.mtp_loss_weight = 0.3
  config.mesh.data, config.mesh.fsdp, config.mesh.expert = 1, -1, 64
  config.data.source = ""        # a glob of your tokenized ArrayRecord shards
  config.data.pretokenized = True
  return config
