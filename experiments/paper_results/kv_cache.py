"""DeepSeek-V2 Table 1: KV-cache elements per token for MHA, GQA, MQA and MLA.

  python experiments/paper_results/kv_cache.py [--scale=smoke|full] [--out_dir=DIR]

Formula (deepjax.accounting, V2 Table 1), over l layers: MHA 2 n_h d_h l, GQA 2 n_g d_h l,
MQA 2 d_h l, MLA (d_c + d_h^R) l; V3.2's DSA layers add the indexer key, (d_c + d_h^R + D_I) l.
Each model's own cache is also measured: a deepjax model runs a prefill
(deepjax.inference.decode.forward) into a bfloat16 LatentCache, and the elements and bytes of the
cache arrays it returns are counted per cached position. The tiny and small presets run for real
on the host; V2-Lite, V2, V3 and V3.2 are traced with jax.eval_shape (same code, nothing
allocated).
Both scales give the same table; --scale=test runs only tiny for real and creates the other
caches abstractly (LatentCache.create) instead of tracing a prefill.
"""


import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx

import common
import deepjax as dj
from deepjax import accounting
from deepjax.inference import decode
from deepjax.inference.cache import LatentCache

GQA_GROUPS = 8       # Table 1 is symbolic in n_g; 8 groups (or n_h if fewer) is a common choice
PROMPT, CACHE_LEN = 8, 32

# deepseek-ai/DeepSeek-V2 config.json (236B total, 21B activated).
V2 = dj.ModelConfig.preset(
    "v2-lite", hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
    num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, n_routed_experts=160,
    n_group=8, topk_group=3, topk_method="group_limited_greedy", routed_scaling_factor=16.0)
MODELS = {"tiny": dj.ModelConfig.preset("tiny"), "small": dj.ModelConfig.preset("small"),
          "V2-Lite": dj.ModelConfig.preset("v2-lite"), "V2": V2, "V3": dj.ModelConfig.preset("v3"),
          "V3.2": dj.ModelConfig.preset("v3.2")}
REAL = {"test": ("tiny",), "smoke": ("tiny", "small"), "full": ("tiny", "small")}


def prefill_cache(cfg: dj.ModelConfig, real: bool) -> LatentCache:
  """The cache a prefill of a [1, PROMPT] prompt writes: real arrays, or their abstract shapes."""
  def run(state, tokens):
    model = nnx.merge(graphdef, state)
    cache = LatentCache.create(cfg, 1, CACHE_LEN, dtype=jnp.bfloat16)
    positions = jnp.arange(PROMPT, dtype=jnp.int32)[None]
    return decode.forward(model, tokens, positions, cache, prefill=True)[1]

  build = lambda: dj.DeepSeek(cfg, rngs=nnx.Rngs(0))  # noqa: E731
  graphdef, state = nnx.split(build() if real else nnx.eval_shape(build))
  tokens = jnp.full((1, PROMPT), 5, jnp.int32)
  if not real:
    return jax.eval_shape(run, state, jax.ShapeDtypeStruct(tokens.shape, tokens.dtype))
  cache = jax.jit(run)(state, tokens)
  written = np.any(np.asarray(cache.main[0].latent, np.float32) != 0, axis=-1)[0]
  assert written[:PROMPT].all() and not written[PROMPT:].any(), "prefill wrote other positions"
  return cache


def measure(name: str) -> dict:
  cfg = MODELS[name]
  real = name in REAL[common.SCALE.value]
  if common.SCALE.value == "test" and not real:
    cache = jax.eval_shape(lambda: LatentCache.create(cfg, 1, CACHE_LEN, dtype=jnp.bfloat16))
    method = "LatentCache.create (abstract)"
  else:
    cache = prefill_cache(cfg, real)
    method = "prefill, real arrays" if real else "prefill, jax.eval_shape"
  arrays = jax.tree.leaves(cache)
  positions = CACHE_LEN                          # batch 1
  groups = min(GQA_GROUPS, cfg.num_attention_heads)
  formula = {kind: accounting.kv_cache_elements_per_token(cfg, kind, groups)
             for kind in ("mha", "gqa", "mqa", "mla")}
  formula["own"] = accounting.kv_cache_elements_per_token(cfg)     # mla, or V3.2's dsa
  return {"model": name, "method": method, "layers": cfg.num_hidden_layers,
          "attention": cfg.attention_kind(0),
          "heads": cfg.num_attention_heads, "gqa_groups": groups, "d_h": cfg.v_head_dim,
          "d_c": cfg.kv_lora_rank, "d_rope": cfg.qk_rope_head_dim,
          "formula": formula, "bf16_bytes": {k: 2 * v for k, v in formula.items()},
          "measured_elements": sum(int(np.prod(a.shape)) for a in arrays) // positions,
          "measured_bf16_bytes": sum(int(np.prod(a.shape)) * a.dtype.itemsize
                                     for a in arrays) // positions,
          "mla_equivalent_gqa_groups": formula["mla"] / (2 * cfg.v_head_dim *
                                                         cfg.num_hidden_layers),
          "mla_over_d_h_l": formula["mla"] / (cfg.v_head_dim * cfg.num_hidden_layers)}


def main(argv):
  del argv
  started = common.start()
  rows = []
  for name in MODELS:
    rows.append(measure(name))
    print(f"{name}: {rows[-1]['attention']} {rows[-1]['formula']['own']:,} (formula), "
          f"{rows[-1]['measured_elements']:,} (measured) elements/token")
    if rows[-1]["measured_elements"] != rows[-1]["formula"]["own"]:
      raise AssertionError(f"{name}: measured cache differs from the formula")
  table = common.markdown_table(
      ["model", "l", "n_h", "d_h", "d_c + d_h^R", "MHA", "GQA (n_g)", "MQA",
       "MLA formula", "attention", "its cache formula", "measured", "measured bytes/token (bf16)",
       "MHA bytes/token (bf16)", "MLA / (d_h l)", "MLA as GQA groups", "measured by"],
      [[r["model"], r["layers"], r["heads"], r["d_h"], f"{r['d_c']} + {r['d_rope']}",
        r["formula"]["mha"], f"{r['formula']['gqa']:,} ({r['gqa_groups']})", r["formula"]["mqa"],
        r["formula"]["mla"], r["attention"], r["formula"]["own"],
        r["measured_elements"], r["measured_bf16_bytes"], r["bf16_bytes"]["mha"],
        f"{r['mla_over_d_h_l']:.2f}", f"{r['mla_equivalent_gqa_groups']:.2f}", r["method"]]
       for r in rows])
  paper = {r["model"]: r for r in rows}
  body = f"""
KV-cache elements per token, all layers (DeepSeek-V2 Table 1; d_h = v_head_dim; GQA with
n_g = min(8, n_h) groups). MHA, GQA and MQA come from the formula; "measured" counts the
bfloat16 cache arrays a deepjax prefill writes, per cached position, for the model's own
attention (MLA, or V3.2's DSA: MLA plus the indexer key).

{table}

| check | paper | deepjax |
|---|---|---|
| V3 MLA elements per token | (512 + 64) × 61 = 35,136 | {paper['V3']['measured_elements']:,} |
| V3 MLA bytes per token, bf16 | 70,272 | {paper['V3']['measured_bf16_bytes']:,} |
| V3.2 DSA elements per token | (512 + 64 + 128) × 61 = 42,944 | {paper['V3.2']['measured_elements']:,} |
| V3.2 over V3 | 1.22 | {paper['V3.2']['measured_elements'] / paper['V3']['measured_elements']:.2f} |
| V2 MLA ≈ 4.5 d_h l (d_c = 4 d_h, d_h^R = d_h / 2) | 4.5 | {paper['V2']['mla_over_d_h_l']:.2f} |
| V2 MLA as GQA with n_g groups | 2.25 | {paper['V2']['mla_equivalent_gqa_groups']:.2f} |
| V2 MLA vs MHA of the same shape | – | {paper['V2']['formula']['mha'] / paper['V2']['formula']['mla']:.1f}× smaller |
"""
  common.plot_bars(
      ["V2-Lite", "V2", "V3"],
      {kind: [paper[m]["formula"][key] for m in ("V2-Lite", "V2", "V3")]
       for kind, key in (("MHA", "mha"), (f"GQA-{GQA_GROUPS}", "gqa"), ("MQA", "mqa"),
                         ("MLA", "mla"))},
      "kv_cache_elements.png", ylabel="KV-cache elements per token", log_y=True,
      title="DeepSeek-V2 Table 1: KV cache per token, all layers")
  common.write_results("KV cache per token (DeepSeek-V2 Table 1)", body, {"models": rows},
                       started)


if __name__ == "__main__":
  app.run(main)
