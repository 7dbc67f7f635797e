"""Sizes a training run before renting it: per-device memory, all-to-all volume and FLOPs.

  python experiments/plan.py --config=experiments/configs/v3.py --config.mesh.expert=64 \
      --devices=2048

Nothing is allocated: shapes are traced abstractly and sharded on an abstract mesh by the
same rules as training.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from deepjax.memory_plan import plan
from deepjax.train import resolve

_DEVICES = flags.DEFINE_integer("devices", 256, "Number of accelerator chips in the run.")
try:
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
except (AttributeError, KeyError) as unknown:
  sys.exit(f"plan.py: error: the config has no field {str(unknown).strip(chr(34) + chr(39))!r}")
flags.mark_flags_as_required(["config"])

GiB = 2**30


def main(argv):
  del argv
  try:
    model_cfg, train_cfg = resolve(_CONFIG.value)
    p = plan(model_cfg, train_cfg.mesh, _DEVICES.value, batch_size=train_cfg.batch_size,
             seq_len=train_cfg.seq_len)
  except ValueError as e:
    sys.exit(f"plan.py: error: {e}")
  print(f"{model_cfg.model_type}, {_DEVICES.value} devices, mesh {p.mesh}, "
        f"{train_cfg.batch_size} x {train_cfg.seq_len} tokens/step "
        f"({p.tokens_per_device:,} per device)\n")
  rows = [("parameters", p.params_bytes), ("gradients", p.grads_bytes),
          ("optimizer (AdamW m, v)", p.optimizer_bytes),
          ("activations (no remat, estimate)", p.activation_bytes),
          ("total", p.total_bytes)]
  print("| per device | GiB |\n|---|---|")
  for name, value in rows:
    print(f"| {name} | {value / GiB:,.2f} |")
  capacity = model_cfg.moe_capacity_factor
  print(f"\nall-to-all per step (leaving each device): {p.all_to_all_bytes / GiB:,.2f} GiB "
        f"({'dropless' if capacity is None else f'capacity factor {capacity}'}; "
        f"--config.model.moe_capacity_factor sets it)")
  print(f"FLOPs per step: {p.flops_per_step:.3e} ({p.flops_per_step / _DEVICES.value:.3e} "
        f"per device)")


if __name__ == "__main__":
  app.run(main)
