"""Train-step throughput on CPU: deepjax's jitted step against transformers' DeepseekV3 (torch).

  python experiments/benchmarks/train_throughput.py                        # tiny, 16 x 256
  python experiments/benchmarks/train_throughput.py --moe_impls=blocked,dense,ragged_dot
  python experiments/benchmarks/train_throughput.py --bf16_row --profile  # + bf16, op profile
  python experiments/benchmarks/train_throughput.py --loop       # the whole loop vs its step

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
MTP out, and its tokens/s are for the smaller job; so deepjax also runs once without its MTP
module (`--no_mtp_row`, on by default), the same job as transformers'.

The matmul peak is a 1024^3 matmul; the model's own matmuls are far smaller (hidden 128 in the
tiny preset), so the run also measures the rate of its two dominant matmul shapes (a token
projection [B*T, H] x [H, H] and the blocked experts' batched [blocks, b, H] x [blocks, H, 2I])
and prints them against the peak: the ceiling any MFU at this size is bounded by. Each of
these matmuls is also timed in torch (same threads): the two CPU backends' matmul speeds, which
bound the ratio between the two train steps. `--bf16_row` adds deepjax with bfloat16 compute;
`--profile` ends with where deepjax's step spends its op time (`op_profile`). Prints markdown
tables.

`--loop` instead times the whole training loop, `deepjax.train.loop.train` (data loading
through the Grain pipeline on the synthetic corpus, host transfers, loss checks, logging),
against its bare jitted step on one fixed batch, both over `--loop_steps` steps after the
compiling one (`loop_throughput`); no transformers, no eval.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import deepjax as dj
from deepjax import data
from deepjax.accounting import flops_per_token
from deepjax.model.dispatch import block_size_for, padded_rows
from deepjax.parallel import make_mesh
from deepjax.train import default_config, resolve, train
from deepjax.train.metrics import read_metrics
from deepjax.train.mfu import measured_matmul_flops, median_seconds
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
  p.add_argument("--no_mtp_row", default=True, action=argparse.BooleanOptionalAction,
                 help="also time deepjax without its MTP module (transformers' job)")
  p.add_argument("--bf16_row", action="store_true",
                 help="also time deepjax with bfloat16 compute (float32 parameters)")
  p.add_argument("--loop", action="store_true",
                 help="time deepjax.train.loop.train against its bare step (loop_throughput)")
  p.add_argument("--loop_steps", type=int, default=12, help="--loop: timed steps of each")
  p.add_argument("--log_every", type=int, default=6, help="--loop: the loop's log_every")
  p.add_argument("--profile", action="store_true",
                 help="after the tables, profile the first deepjax step: op time by kind and "
                      "the costliest ops (jax.profiler, XLA:CPU thunk trace events)")
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


def matmul_rates(a_shape: tuple[int, ...], b_shape: tuple[int, ...], seconds: float = 1.0
                 ) -> tuple[float, float]:
  """FLOP/s of a float32 matmul of these shapes (batched when 3-d) in XLA (jnp.matmul under
  jax.jit) and in torch (torch.matmul, the benchmark's thread count)."""
  import torch
  flop = 2 * math.prod(a_shape) * b_shape[-1]
  a = jax.random.normal(jax.random.key(0), a_shape, jnp.float32)
  b = jax.random.normal(jax.random.key(1), b_shape, jnp.float32)
  matmul = jax.jit(jnp.matmul)
  xla = median_seconds(lambda: jax.block_until_ready(matmul(a, b)), seconds)
  ta, tb = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
  with torch.no_grad():
    eager = median_seconds(lambda: torch.matmul(ta, tb), seconds)
  return flop / xla, flop / eager


def model_matmul_shapes(cfg: dj.ModelConfig, tokens: int) -> dict[str, tuple]:
  """The two matmul shapes that dominate a train step of `cfg` on `tokens` tokens."""
  h, k, e = cfg.hidden_size, cfg.num_experts_per_tok, cfg.n_routed_experts
  b = block_size_for(tokens * k, e)
  blocks = padded_rows(tokens * k, e, b) // b
  return {f"token projection [{tokens}, {h}] x [{h}, {h}]": ((tokens, h), (h, h)),
          f"blocked experts [{blocks}, {b}, {h}] x [{blocks}, {h}, {2 * cfg.moe_intermediate_size}]":
              ((blocks, b, h), (blocks, h, 2 * cfg.moe_intermediate_size))}


NO_SOURCE = "(made by XLA, no jax op)"


def op_profile(runner: DeepjaxRunner, steps: int = 3, top: int = 12) -> None:
  """Op time of the runner's jitted step under jax.profiler (needs XLA:CPU's traceme events,
  which main switches on), summed over `steps` steps: by kind (matmuls, transposing copies,
  gathers, ...) and the `top` costliest ops with the jax op they come from. Ops run
  concurrently, so op time adds up to more than the step's wall time."""
  hlo = runner.step_fn.lower(runner.state, runner.batch).compile().as_text()
  source = dict(re.findall(r'%([\w.-]+) = [^\n]*?op_name="([^"]+)"', hlo))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        runner.step()
    trace, = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(trace) as f:
      events = json.load(f)["traceEvents"]
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and (e["name"] in source or re.match(r"(ynn_fusion|dot)\b", e["name"])):
      per_op[e["name"]] += e["dur"] / 1e3 / steps
  kind = lambda op: "matmul" if op.startswith("dot") or source.get(op, "").endswith(  # noqa: E731
      "dot_general") else re.sub(r"[._]\d+$", "", op)
  per_kind = collections.Counter()
  for op, ms in per_op.items():
    per_kind[kind(op)] += ms
  total = sum(per_op.values())
  table(f"Op time of one deepjax step by kind ({total:.0f} ms of op time per step)",
        ["kind", "ms", "share"], [[k, f"{ms:.1f}", f"{ms / total:.0%}"]
                                  for k, ms in per_kind.most_common(top)])
  table("Costliest ops of one deepjax step", ["op", "ms", "from"],
        [[op, f"{ms:.2f}", source.get(op, NO_SOURCE)] for op, ms in per_op.most_common(top)])


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


def loop_throughput(args) -> None:
  """Tokens/s of deepjax.train.loop.train over args.loop_steps steps after its first (which
  compiles), from the tokens/s it logs: each logged value covers the steps since the previous
  log, timed up to the logged step's result. Then the same config's bare jitted step, median
  of as many steps."""
  config = default_config(args.preset)
  config.update(dict(steps=1 + args.loop_steps, batch_size=args.batch_size,
                     seq_len=args.seq_len, seed=args.seed, log_every=args.log_every,
                     eval_every=0, checkpoint_every=1 + args.loop_steps, keep_checkpoints=1))
  config.model.update(dtype="float32", attention_impl=args.attention_impl)
  if args.moe_impls:
    config.model.moe_impl = args.moe_impls.split(",")[0]
  model_cfg, train_cfg = resolve(config)
  tokens_per_step = args.batch_size * args.seq_len
  print(f"{args.preset} preset (moe_impl={model_cfg.moe_impl}), batch {args.batch_size} x "
        f"{args.seq_len} tokens, {args.loop_steps} timed steps, log_every {args.log_every}; "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; CPU pressure (avg60) "
        f"{cpu_pressure()}", flush=True)
  batches = data.make_dataset(data.SyntheticCorpus("train", seed=args.seed), data.ByteTokenizer(),
                              seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                              vocab_size=model_cfg.vocab_size)
  with tempfile.TemporaryDirectory() as workdir:
    train(model_cfg, train_cfg, workdir, batches, log=lambda message: None)
    records = read_metrics(workdir)
  steps = np.diff([1] + [r["step"] for r in records])
  seconds = steps * tokens_per_step / np.array([r["tokens_per_sec"] for r in records])
  loop = steps.sum() * tokens_per_step / seconds.sum()

  tokens = np.random.default_rng(args.seed).integers(
      0, model_cfg.vocab_size, (args.batch_size, args.seq_len)).astype(np.int32)
  runner = DeepjaxRunner(model_cfg, tokens, train_cfg.optimizer, args.seed)
  runner.step()                                 # compiles
  step = tokens_per_step / statistics.median([runner.step() for _ in range(args.loop_steps)])
  table(f"Training loop against its step ({args.preset}, {args.batch_size} x {args.seq_len}, "
        f"{args.loop_steps} steps)", ["system", "ms/step", "tokens/s", "of the step's"],
        [["deepjax.train.loop.train", f"{tokens_per_step / loop * 1e3:.0f}", f"{loop:,.0f}",
          f"{loop / step:.0%}"],
         ["its jitted step alone", f"{tokens_per_step / step * 1e3:.0f}", f"{step:,.0f}",
          "100%"]])
  print(f"\nCPU pressure (avg60) at the end: {cpu_pressure()}.")


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.loop:
    loop_throughput(args)
    return
  if args.profile:   # read when the CPU backend starts, so before any jax computation
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_xprof_traceme=true"]).strip()
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
  variants = [(f"deepjax (moe_impl={impl})", base.replace(moe_impl=impl)) for impl in impls]
  if args.no_mtp_row and base.num_nextn_predict_layers:
    variants.append((f"deepjax (moe_impl={impls[0]}, no MTP)",
                     base.replace(moe_impl=impls[0], num_nextn_predict_layers=0)))
  if args.bf16_row:
    variants.append((f"deepjax (moe_impl={impls[0]}, compute bfloat16)",
                     base.replace(moe_impl=impls[0], dtype="bfloat16")))
  for name, cfg in variants:
    start = time.perf_counter()
    runners[name] = DeepjaxRunner(cfg, tokens, ocfg, args.seed)
    runners[name].step()
    flops[name] = flops_per_token(cfg, args.seq_len)
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
  shapes = {"peak shape [1024, 1024] x [1024, 1024]": ((1024, 1024), (1024, 1024)),
            **model_matmul_shapes(base, tokens_per_step)}
  rows = []
  for name, shape in shapes.items():
    xla, eager = matmul_rates(*shape)
    rows.append([name, f"{xla / 1e9:.1f}", f"{xla / peak:.0%}", f"{eager / 1e9:.1f}",
                 f"{xla / eager:.2f}x"])
  table("float32 matmul rate, XLA:CPU against torch, at the peak shape and at the model's own "
        "shapes (the ceiling on MFU at this size)",
        ["matmul", "XLA GFLOP/s", "of the peak", "torch GFLOP/s", "XLA / torch"], rows)
  if args.profile:
    op_profile(runners[variants[0][0]])

if __name__ == "__main__":
  main()
