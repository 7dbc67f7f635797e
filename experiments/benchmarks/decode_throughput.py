"""Greedy generation throughput on CPU: deepjax's latent-cache decoding against transformers.

  python experiments/benchmarks/decode_throughput.py                 # tiny preset, ~1-2 min
  python experiments/benchmarks/decode_throughput.py --preset=small --batch=8

One model with random weights: deepjax builds it, `dj.save_hf` writes it, and transformers'
DeepseekV3ForCausalLM loads it with `from_pretrained` (torch CPU, eager attention). Both then
generate greedily from the same prompts (same batch, same lengths, no EOS), in one run:
deepjax's `generate` is one compiled program (prefill, then a `while_loop` over an absorbed-MLA
step on the latent cache); transformers' `generate` runs a Python step per token over its
per-head KV cache. Reported: end-to-end tokens/s (prefill included), decode tokens/s (the time
of N new tokens minus that of 1, over N - 1 steps), the ratios against transformers, and how
many greedy tokens the two agree on. An extra row decodes with speculative="mtp": with random
weights its drafts are accepted at chance level, so that row shows the cost of drafting, not
the speed-up a trained MTP module brings (V3 reports 85-90% acceptance).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

import deepjax as dj
from deepjax import accounting
from deepjax.inference import generate_with_stats
from deepjax.model.random_init import random_model


def timed(fn, repeats: int) -> tuple[float, object]:
  """(median wall seconds over `repeats` calls after one warm-up, the last result)."""
  result = fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), result


def deepjax_run(model, prompts, new_tokens, **kw):
  def run():
    tokens, stats = generate_with_stats(model, prompts, max_new_tokens=new_tokens, **kw)
    return np.asarray(jax.block_until_ready(tokens)), stats
  return run


def hf_run(model, prompts, new_tokens):
  input_ids = torch.as_tensor(prompts, dtype=torch.long)

  def run():
    with torch.no_grad():
      out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                           max_new_tokens=new_tokens, do_sample=False)
    return out[:, input_ids.shape[1]:].numpy(), None
  return run


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="tiny", help="deepjax preset (V3-shaped)")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=1,
                      help="CPU threads for both (torch's OpenMP threads spin-wait and slow "
                           "down many-fold when the cores are shared; 0: each library's default)")
  args = parser.parse_args()
  if args.threads:   # read when the JAX backend starts, i.e. before the first computation
    torch.set_num_threads(args.threads)
    if args.threads == 1:
      os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + \
          " --xla_cpu_multi_thread_eigen=false"

  cfg = dj.ModelConfig.preset(args.preset, dtype="float32", param_dtype="float32",
                              moe_impl="blocked", num_nextn_predict_layers=1)
  model = random_model(cfg)
  transformers.logging.set_verbosity_error()       # it ignores the MTP layer's tensors
  with tempfile.TemporaryDirectory() as path:
    dj.save_hf(model, path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32).eval()
  hf.generation_config.eos_token_id = None            # always generate the full length
  hf.generation_config.pad_token_id = 0
  prompts = np.random.default_rng(0).integers(
      0, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
  n, b = args.new_tokens, args.batch
  print(f"{args.preset}: {accounting.param_counts(cfg).total:,} parameters, batch {b}, "
        f"prompt {args.prompt_len}, {n} new tokens, greedy, float32; jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), transformers {transformers.__version__}", flush=True)

  runs = [("transformers (torch, eager attention, KV cache)",
           lambda k: hf_run(hf, prompts, k), True),
          ("deepjax (latent cache, absorbed MLA, one jit)",
           lambda k: deepjax_run(model, prompts, k), True),
          ("deepjax, MTP speculative", lambda k: deepjax_run(model, prompts, k, speculative="mtp"),
           False)]   # (each max_new_tokens compiles a program: the decode-only split is skipped)
  rows, reference = [], None
  for name, make, split in runs:
    start = time.perf_counter()
    full, (tokens, stats) = timed(make(n), args.repeats)
    single = timed(make(1), args.repeats)[0] if split else None
    reference = tokens if reference is None else reference
    note = "" if stats is None or stats["acceptance_rate"] is None else \
        f"draft acceptance {stats['acceptance_rate']:.2f}, {stats['steps']} steps"
    decode = None if single is None else b * (n - 1) / (full - single)
    rows.append((name, b * n / full, decode, float(np.mean(tokens == reference)), note))
    print(f"  {name}: {full:.3f} s for {n} tokens" +
          ("" if single is None else f", {single:.3f} s for 1") +
          f" ({time.perf_counter() - start:.0f} s with warm-up and compilation)", flush=True)

  hf_e2e, hf_decode = rows[0][1], rows[0][2]
  print("\n| implementation | tokens/s (end to end) | decode tokens/s | ratio (end to end) | "
        "ratio (decode) | tokens equal to transformers' | note |")
  print("|---|---|---|---|---|---|---|")
  for name, e2e, decode, agree, note in rows:
    decode_cells = "- | -" if decode is None else f"{decode:,.0f} | {decode / hf_decode:.1f}x"
    decode_rate, decode_ratio = decode_cells.split(" | ")
    print(f"| {name} | {e2e:,.0f} | {decode_rate} | {e2e / hf_e2e:.1f}x | {decode_ratio} | "
          f"{100 * agree:.0f}% | {note} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
