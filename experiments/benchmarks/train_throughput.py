"""Train-step throughput on CPU: deepjax's jitted step against transformers' DeepseekV3 (torch).

  python experiments/benchmarks/train_throughput.py                        # tiny, 16 x 256
  python experiments/benchmarks/train_throughput.py --moe_impls=blocked,dense,ragged_dot

Both sides train the same config (`ModelConfig.preset(...)`, transformers' through
`cfg.to_hf()`) on the same batch of random tokens, one full step each: forward, backward,
global-norm clipping and AdamW. deepjax runs `deepjax.train.step.make_train_step` on a
1-device mesh; transformers runs `DeepseekV3ForCausalLM` in float32 with eager attention, once
with `experts_implementation="eager"` and once with its default experts implementation when
that differs, under `torch.set_num_threads(--threads)`.

Everything is measured in this run: warm-up steps first, then `--rounds` rounds in which every
system runs `--steps` timed steps in turn (so a load change on a shared machine hits all of
them), and the median step time per system. MFU = tokens/s * FLOPs/token / the measured matmul
peak (deepjax.train.mfu.measured_matmul_flops, float32). FLOPs/token come from
deepjax.accounting.flops_per_token; transformers' model has no MTP module, so its count leaves
MTP out, and its tokens/s are for the smaller job. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import deepjax as dj
from deepjax.accounting import flops_per_token
from deepjax.parallel import make_mesh
from deepjax.train.mfu import measured_matmul_flops
from deepjax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from deepjax.train.state import init_train_state
from deepjax.train.step import ObjectiveConfig, make_train_step


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--moe_impls", default="",
                 help="comma-separated deepjax moe_impl values; default: the preset's")
  p.add_argument("--attention_impl", default="xla")
  p.add_argument("--hf_experts", default="eager,default",
                 help="transformers experts implementations; 'default' = its own choice")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps per system")
  p.add_argument("--steps", type=int, default=4, help="timed steps per system and round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


class DeepjaxRunner:
  """The library's own train step, state and optimizer on a 1-device mesh."""

  def __init__(self, cfg: dj.ModelConfig, tokens: np.ndarray, ocfg: OptimizerConfig, seed: int):
    tx = make_optimizer(ocfg)
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    graphdef, self.state, shardings = init_train_state(cfg, tx, mesh, seed=seed)
    self.step_fn = make_train_step(graphdef, tx, learning_rate_schedule(ocfg), ObjectiveConfig(),
                                   shardings, mesh)
    b, t = tokens.shape
    self.batch = {"tokens": jnp.asarray(tokens, jnp.int32),
                  "segment_ids": jnp.ones((b, t), jnp.int32),
                  "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}

  def step(self) -> float:
    start = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, self.batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start


class TransformersRunner:
  """transformers' DeepseekV3ForCausalLM (torch CPU, float32, eager attention) + AdamW."""

  def __init__(self, cfg: dj.ModelConfig, tokens: np.ndarray, ocfg: OptimizerConfig,
               experts: str, seed: int):
    import torch
    import transformers
    self.torch = torch
    cls = transformers.DeepseekV3ForCausalLM if cfg.is_v3 else transformers.DeepseekV2ForCausalLM
    config_cls = transformers.DeepseekV3Config if cfg.is_v3 else transformers.DeepseekV2Config
    kwargs = {k: v for k, v in cfg.to_hf().items() if k != "architectures"}
    kwargs["attn_implementation"] = "eager"
    if experts != "default":
      kwargs["experts_implementation"] = experts
    torch.manual_seed(seed)
    self.model = cls(config_cls(**kwargs)).float().train()
    self.experts = self.model.config._experts_implementation or "eager"
    decay = [p for p in self.model.parameters() if p.ndim >= 2]
    no_decay = [p for p in self.model.parameters() if p.ndim < 2]
    self.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": ocfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=ocfg.learning_rate, betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps)
    self.grad_clip = ocfg.grad_clip
    self.tokens = torch.as_tensor(tokens, dtype=torch.long)

  def step(self) -> float:
    start = time.perf_counter()
    loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def cpu_pressure() -> str:
  """Linux PSI: the share of the last minute in which runnable threads waited for a CPU
  (other processes on a shared machine slow both sides, torch's OpenMP threads the most)."""
  try:
    with open("/proc/pressure/cpu") as f:
      return f.readline().split()[2].split("=")[1] + "%"
  except (OSError, IndexError):
    return "n/a"


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
  print(f"\n### {title}\n")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    print("| " + " | ".join(row) + " |")
  sys.stdout.flush()


def main(argv=None) -> None:
  args = parse_args(argv)
  import torch
  torch.set_num_threads(args.threads)
  base = dj.ModelConfig.preset(args.preset, dtype="float32", param_dtype="float32",
                               attention_impl=args.attention_impl)
  impls = [s for s in args.moe_impls.split(",") if s] or [base.moe_impl]
  tokens = np.random.default_rng(args.seed).integers(
      0, base.vocab_size, (args.batch_size, args.seq_len)).astype(np.int32)
  ocfg = OptimizerConfig(total_steps=1000)
  # The peak is measured before, between and after the rounds and the best is kept: on a shared
  # machine one measurement can catch a busy moment, which would flatter every MFU.
  measure_peak = getattr(measured_matmul_flops, "__wrapped__", measured_matmul_flops)
  peaks = [measure_peak("float32")]
  peak = peaks[0]
  print(f"{args.preset} preset, batch {args.batch_size} x {args.seq_len} tokens, float32; "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
        f"({args.threads} threads); measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s; "
        f"CPU pressure (avg60) {cpu_pressure()}", flush=True)

  runners: dict[str, object] = {}
  flops: dict[str, float] = {}
  for impl in impls:
    name = f"deepjax (moe_impl={impl})"
    start = time.perf_counter()
    runners[name] = DeepjaxRunner(base.replace(moe_impl=impl), tokens, ocfg, args.seed)
    runners[name].step()
    flops[name] = flops_per_token(base, args.seq_len)
    print(f"  built + compiled {name} in {time.perf_counter() - start:.0f} s", flush=True)
  seen = set()
  for experts in [s for s in args.hf_experts.split(",") if s]:
    runner = TransformersRunner(base, tokens, ocfg, experts, args.seed)
    if runner.experts in seen:
      continue
    seen.add(runner.experts)
    label = runner.experts + (" (its default)" if experts == "default" else "")
    name = f"transformers (experts={label})"
    runners[name] = runner
    flops[name] = flops_per_token(base, args.seq_len, include_mtp=False)

  for runner in runners.values():
    for _ in range(args.warmup):
      runner.step()
  times = {name: [] for name in runners}
  for _ in range(args.rounds):
    for name, runner in runners.items():
      times[name] += [runner.step() for _ in range(args.steps)]
    peaks.append(measure_peak("float32"))
  peak = max(peaks)

  tokens_per_step = args.batch_size * args.seq_len
  results = {name: tokens_per_step / statistics.median(ts) for name, ts in times.items()}
  hf_names = [n for n in runners if n.startswith("transformers")]
  reference = results[hf_names[0]] if hf_names else float("nan")
  rows = []
  for name, tps in results.items():
    ts = times[name]
    rows.append([name, f"{statistics.median(ts) * 1e3:.0f}", f"{min(ts) * 1e3:.0f}",
                 f"{tps:,.0f}", f"{tps / reference:.2f}x", f"{flops[name] / 1e6:.2f}",
                 f"{tps * flops[name] / peak:.1%}"])
  table(f"Train step throughput ({args.preset}, {args.batch_size} x {args.seq_len}, "
        f"median of {args.rounds} x {args.steps} steps)",
        ["system", "ms/step", "min ms", "tokens/s", f"vs {hf_names[0] if hf_names else '-'}",
         "MFLOP/token", "MFU"], rows)
  print(f"\nMFU against the measured float32 matmul peak, best of {len(peaks)} measurements "
        f"in this run: {peak / 1e9:.1f} GFLOP/s (all: "
        f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)}). transformers' FLOPs/token leave out "
        f"the MTP module it does not have. CPU pressure (avg60) at the end: {cpu_pressure()}.")


if __name__ == "__main__":
  main()
