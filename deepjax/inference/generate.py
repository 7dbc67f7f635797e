"""`generate`: batched autoregressive generation over the latent KV cache, one compiled program.

Prefill runs the right-padded prompts through the model and fills the cache with each layer's
latent c^KV and rope key; the first new token of row b comes from the logits at its own last
prompt position lengths[b] - 1. Decoding is one `jax.lax.while_loop` inside the same `jax.jit`
(no Python per token): each step feeds every row's last token at position lengths[b] + i - 1,
attends over the cache (MLA in absorbed form; deepjax.inference.decode), and picks the next token
greedily or by sampling. The cache buffers are donated to the program. The loop ends after
max_new_tokens or, with an eos_id, as soon as every row has emitted it; a finished row emits
eos_id from then on.

Greedy decoding gives the tokens that full forward passes over the growing sequence would pick
(the cached logits equal those of the full pass to float rounding). speculative="mtp" drafts
with the model's MTP module (deepjax.inference.speculative): the same greedy tokens, in fewer
decode steps when its drafts are accepted.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepjax.inference.cache import LatentCache
from deepjax.inference.decode import forward
from deepjax.inference.sampling import greedy, sample
from deepjax.inference.speculative import mtp_speculative_generate
from deepjax.model import DeepSeek

SPECULATIVE = (None, "mtp")


def generate(model: DeepSeek, prompts, *, prompt_lengths=None, max_new_tokens: int = 32,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             eos_id: int | None = None, speculative: str | None = None) -> jax.Array:
  """New tokens int32 [B, max_new_tokens] continuing each prompt.

  prompts: int token ids [B, W], right-padded when prompt_lengths [B] (each >= 1) is given
    (padding values are ignored), or a list of token sequences of different lengths.
  temperature: 0 picks the argmax (greedy); > 0 samples from softmax(logits / temperature)
    restricted to the top_k most likely tokens (0: no limit) and to the top_p nucleus, with a
    key derived from `seed`.
  eos_id: a row that emits it stops and emits eos_id from then on.
  speculative: None, or "mtp" (greedy only) to draft with the model's MTP module.
  """
  tokens, _ = generate_with_stats(
      model, prompts, prompt_lengths=prompt_lengths, max_new_tokens=max_new_tokens,
      temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, eos_id=eos_id,
      speculative=speculative)
  return tokens


def generate_with_stats(model: DeepSeek, prompts, *, prompt_lengths=None,
                        max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                        top_k: int = 0, seed: int = 0, eos_id: int | None = None,
                        speculative: str | None = None) -> tuple[jax.Array, dict]:
  """`generate`, plus a dict of what the run did:

  steps: decode passes of the main model after prefill (all rows step together);
  tokens_per_step: new tokens per row per pass while the row was generating (1 without
    speculation; 1 + the share of accepted drafts with it);
  acceptance_rate: accepted MTP drafts / drafts verified (speculative only, else None);
  cache_len, cache_bytes: positions per row and total bytes of the latent cache.
  """
  cfg = model.cfg
  tokens, lengths = check_inputs(cfg, prompts, prompt_lengths, max_new_tokens)
  check_options(model, temperature=temperature, top_p=top_p, top_k=top_k, eos_id=eos_id,
                speculative=speculative)
  b, w = tokens.shape
  mtp_layers = 1 if speculative == "mtp" else 0
  # Decoding runs positions up to lengths + max_new_tokens - 2; verifying a draft one further.
  cache = LatentCache.create(cfg, b, w + max_new_tokens - 1 + mtp_layers, mtp_layers=mtp_layers)
  cache_len, cache_bytes = cache.max_len, cache.nbytes
  graphdef, state = nnx.split(model)
  out, counters, _ = _generate(
      graphdef, state, cache, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
      jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
      jnp.int32(-1 if eos_id is None else eos_id), max_new_tokens=max_new_tokens,
      speculative=speculative)
  counters = {k: int(v) for k, v in jax.device_get(counters).items()}
  stats = dict(steps=counters["steps"], tokens_per_step=1.0, acceptance_rate=None,
               cache_len=cache_len, cache_bytes=cache_bytes)
  if speculative == "mtp" and counters["verified"]:
    stats.update(acceptance_rate=counters["accepted"] / counters["verified"],
                 tokens_per_step=counters["emitted"] / counters["verified"])
  return out, stats


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "speculative"),
                   donate_argnames=("cache",))
def _generate(graphdef, state, cache, prompts, lengths, key, temperature, top_k, top_p, eos_id,
              *, max_new_tokens: int, speculative: str | None):
  model = nnx.merge(graphdef, state)
  if speculative == "mtp":
    return mtp_speculative_generate(model, prompts, lengths, cache, eos_id,
                                    max_new_tokens=max_new_tokens)

  def choose(logits, i):
    # The sampling settings are traced: one program serves greedy and every temperature,
    # top-k and top-p, and only the branch taken runs.
    return jax.lax.cond(
        temperature == 0, lambda: greedy(logits),
        lambda: sample(logits, jax.random.fold_in(key, i), temperature=temperature,
                       top_k=top_k, top_p=top_p))

  return decode_loop(model, prompts, lengths, cache, choose, eos_id,
                     max_new_tokens=max_new_tokens)


def decode_loop(model: DeepSeek, prompts, lengths, cache: LatentCache, choose, eos_id, *,
                max_new_tokens: int):
  """Prefill, then one token per row per while_loop step; choose(logits [B, V], step) -> [B].

  -> (tokens [B, max_new_tokens], {"steps": decode passes}, cache).
  """
  b, w = prompts.shape
  positions = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))
  h, cache = forward(model, prompts, positions, cache, prefill=True)
  first = choose(model.logits(h[jnp.arange(b), lengths - 1]), 0)
  out = jnp.full((b, max_new_tokens), jnp.maximum(eos_id, 0), jnp.int32).at[:, 0].set(first)

  def running(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def step(carry):
    i, token, cache, out, done = carry
    h, cache = forward(model, token[:, None], (lengths + i - 1)[:, None], cache)
    token = jnp.where(done, eos_id, choose(model.logits(h[:, 0]), i))
    return i + 1, token, cache, out.at[:, i].set(token), done | (token == eos_id)

  i, _, cache, out, _ = jax.lax.while_loop(
      running, step, (jnp.int32(1), first, cache, out, first == eos_id))
  return out, {"steps": i - 1}, cache


# --- argument checks (host side, before anything is compiled) -------------------------------

def check_inputs(cfg, prompts, prompt_lengths, max_new_tokens: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [B, W] with padding set to 0, lengths int32 [B]); ValueError naming the
  problem for empty prompts, inconsistent lengths, ids outside the vocabulary, or a total
  length past max_position_embeddings."""
  if isinstance(prompts, Sequence) and prompts and prompt_lengths is None and \
      all(np.ndim(p) == 1 for p in prompts):              # a list of token sequences
    prompt_lengths = [len(p) for p in prompts]
    width = max(prompt_lengths)
    prompts = [np.pad(np.asarray(p), (0, width - len(p))) for p in prompts]
  tokens = np.asarray(prompts)
  if tokens.size == 0:
    raise ValueError(f"prompts are empty (shape {tokens.shape}); give at least one token per row")
  if tokens.ndim != 2:
    raise ValueError(f"prompts must be token ids [batch, length], got shape {tokens.shape}")
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"prompts must be integer token ids, got dtype {tokens.dtype}")
  b, w = tokens.shape
  if prompt_lengths is None:
    lengths = np.full((b,), w, np.int32)
  else:
    lengths = np.asarray(prompt_lengths)
    if lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer):
      raise ValueError(f"prompt_lengths must be {b} integers (one per prompt row), got "
                       f"{lengths.tolist()}")
    if np.any(lengths < 1):
      raise ValueError(f"prompt_lengths must be >= 1 (an empty prompt has nothing to continue), "
                       f"got {lengths.tolist()}")
    if np.any(lengths > w):
      raise ValueError(f"prompt_lengths {lengths.tolist()} exceed the prompts' width {w}")
  valid = np.arange(w)[None, :] < lengths[:, None]
  bad = tokens[valid & ((tokens < 0) | (tokens >= cfg.vocab_size))]
  if bad.size:
    raise ValueError(f"prompt token ids outside the vocabulary [0, {cfg.vocab_size}): "
                     f"e.g. {bad[:5].tolist()}")
  if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
  if lengths.max() + max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(f"the longest prompt ({lengths.max()} tokens) plus max_new_tokens "
                     f"({max_new_tokens}) exceeds max_position_embeddings "
                     f"({cfg.max_position_embeddings})")
  return np.where(valid, tokens, 0).astype(np.int32), lengths.astype(np.int32)


def check_options(model: DeepSeek, *, temperature, top_p, top_k, eos_id, speculative) -> None:
  vocab = model.cfg.vocab_size
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k must be an integer >= 0 (0: no limit), got {top_k}")
  if eos_id is not None and not 0 <= eos_id < vocab:
    raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab})")
  if speculative not in SPECULATIVE:
    raise ValueError(f"speculative must be one of {SPECULATIVE}, got {speculative!r}")
  if speculative == "mtp":
    if not len(model.mtp):
      raise ValueError("speculative='mtp' needs a model with an MTP module "
                       "(num_nextn_predict_layers >= 1)")
    if temperature != 0:
      raise ValueError(f"speculative='mtp' verifies drafts greedily: use temperature=0, got "
                       f"{temperature}")
