"""Builds a preset, runs one forward pass on CPU and reports its size and cost.

  python experiments/model_report.py [--preset=tiny] [--batch=2] [--seq_len=64]
"""

import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

import deepjax as dj
from deepjax import accounting
from deepjax.config import PRESETS

_PRESET = flags.DEFINE_enum("preset", "tiny", sorted(PRESETS), "Model preset.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size of the forward pass.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Sequence length of the forward pass.")
_FORWARD = flags.DEFINE_bool("forward", True, "Run a forward pass (off for v2-lite / v3 sizes).")


def main(argv):
  del argv
  cfg = dj.ModelConfig.preset(_PRESET.value)
  counts = accounting.param_counts(cfg)
  print(f"preset {_PRESET.value}: {cfg.model_type}, {cfg.num_hidden_layers} layers, "
        f"{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}), "
        f"{cfg.n_shared_experts} shared, {cfg.num_nextn_predict_layers} MTP module(s)")
  print(f"  parameters  total {counts.total:,}  activated/token {counts.activated:,}  "
        f"embedding {counts.embedding:,}  MTP {counts.mtp:,}")
  print(f"  training FLOPs/token at T={_SEQ_LEN.value}: "
        f"{accounting.flops_per_token(cfg, _SEQ_LEN.value):,.0f}")
  cached = accounting.kv_cache_elements_per_token(cfg)      # the config's own attention kind
  mha = accounting.kv_cache_elements_per_token(cfg, "mha")
  print(f"  KV cache elements/token: {cfg.attention_kind(0).upper()} {cached:,} vs MHA {mha:,} "
        f"({mha / cached:.1f}x smaller)")
  if not _FORWARD.value:
    return
  model = dj.DeepSeek(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (_BATCH.value, _SEQ_LEN.value), 0,
                              cfg.vocab_size)
  forward = nnx.jit(lambda m, t: m(t))
  out = jax.block_until_ready(forward(model, tokens))
  start = time.perf_counter()
  out = jax.block_until_ready(forward(model, tokens))
  seconds = time.perf_counter() - start
  loss = -jnp.take_along_axis(jax.nn.log_softmax(out.logits[:, :-1]), tokens[:, 1:, None], -1)
  print(f"  forward [{_BATCH.value}, {_SEQ_LEN.value}] on {jax.default_backend()}: "
        f"{seconds * 1e3:.1f} ms, logits {out.logits.shape}, initial loss {float(loss.mean()):.3f} "
        f"(ln vocab = {jnp.log(cfg.vocab_size):.3f})")
  load = out.router.counts.sum(1)
  print(f"  expert load per MoE layer (max/mean): "
        f"{[round(float(x), 2) for x in load.max(-1) / load.mean(-1)]}")


if __name__ == "__main__":
  app.run(main)
