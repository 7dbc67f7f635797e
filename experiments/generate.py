"""Generates text from a training run's latest checkpoint or from a transformers checkpoint.

  python experiments/generate.py --workdir=/tmp/tiny --prompt="The river"
  python experiments/generate.py --hf_dir=DIR --tokenizer=DIR/tokenizer.json \
      --prompt="Hello" --prompt="2 + 2 =" --temperature=0.8 --top_p=0.9 --seed=1
  python experiments/generate.py --workdir=DIR --speculative=mtp     # MTP drafts, greedy

Each prompt is encoded as BOS + text, as the training data's documents start; generation stops
at the tokenizer's EOS. Prints every prompt with its continuation, then throughput and, with
--speculative=mtp, the draft acceptance rate and the speed-up in decode steps.
"""

import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

import deepjax as dj
from deepjax.data import load_tokenizer
from deepjax.inference import generate_with_stats
from deepjax.train.restore import load_trained_model

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (config.json, "
                               "checkpoints/): its latest checkpoint is loaded.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "A transformers checkpoint directory "
                              "(config.json + *.safetensors), loaded with dj.load_hf.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "'byte' or a tokenizer.json path.")
_PROMPT = flags.DEFINE_multi_string("prompt", ["The"], "Prompt text; repeat for a batch.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_SPECULATIVE = flags.DEFINE_enum("speculative", "none", ["none", "mtp"],
                                 "'mtp': draft with the model's MTP module (greedy only).")


def load_model() -> dj.DeepSeek:
  if bool(_WORKDIR.value) == bool(_HF_DIR.value):
    raise ValueError("give exactly one of --workdir (a training run) or --hf_dir "
                     "(a transformers checkpoint)")
  if _WORKDIR.value:
    model, step = load_trained_model(_WORKDIR.value)
    print(f"loaded {_WORKDIR.value} at step {step}")
    return model
  return dj.load_hf(_HF_DIR.value)


def emitted(row: np.ndarray, eos_id: int | None) -> int:
  """How many tokens the row generated, its EOS included (the rest is EOS padding)."""
  if eos_id is not None and np.any(row == eos_id):
    return int(np.argmax(row == eos_id)) + 1
  return len(row)


def run():
  model = load_model()
  cfg = model.cfg
  tokenizer = load_tokenizer(_TOKENIZER.value)
  eos_id = tokenizer.eos_id if tokenizer.eos_id < cfg.vocab_size else None
  prompts = [np.concatenate([[tokenizer.bos_id], tokenizer.encode(text)]).astype(np.int32)
             for text in _PROMPT.value]
  speculative = None if _SPECULATIVE.value == "none" else _SPECULATIVE.value
  start = time.perf_counter()
  tokens, stats = generate_with_stats(
      model, prompts, max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
      top_p=_TOP_P.value, top_k=_TOP_K.value, seed=_SEED.value, eos_id=eos_id,
      speculative=speculative)
  tokens = np.asarray(jax.device_get(tokens))
  seconds = time.perf_counter() - start

  counts = [emitted(row, eos_id) for row in tokens]
  for text, row, n in zip(_PROMPT.value, tokens, counts):
    print(f"\n>>> {text}\n{text}{tokenizer.decode(row[:n])}")      # decode drops EOS
  generated = sum(counts)
  print(f"\n{generated} tokens in {seconds:.2f}s ({generated / seconds:.1f} tokens/s, "
        f"compilation included); {stats['steps']} decode steps; latent cache "
        f"{stats['cache_bytes'] / 2**10:.1f} KiB")
  if speculative:
    # Plain greedy decoding needs one step per token after the first, for the longest row.
    plain_steps = max(counts) - 1
    rate = stats["acceptance_rate"]
    print(f"MTP drafts: acceptance rate {'n/a' if rate is None else f'{rate:.2f}'}, "
          f"{stats['tokens_per_step']:.2f} tokens per step, {plain_steps} -> {stats['steps']} "
          f"decode steps ({plain_steps / max(stats['steps'], 1):.2f}x fewer)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # Orbax logs every restore at INFO
  try:
    run()
  except (ValueError, FileNotFoundError) as e:   # bad input: no traceback
    print(f"generate.py: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
