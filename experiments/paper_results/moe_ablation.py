"""Dense vs GShard vs DeepSeekMoE at equal activated parameters and FLOPs (DeepSeekMoE §4.2,
Table 1).

  python experiments/paper_results/moe_ablation.py [--scale=smoke|full] [--out_dir=DIR]

Three feed-forward designs in the same model (MLA attention, softmax gating, same data, seed and
steps); with standard FFN width I:
- dense: one FFN of width 2I, the activated size of the MoE models;
- GShard-style: 16 experts of width I, top-2, no shared expert;
- DeepSeekMoE: each expert split into 4 (fine-grained, width I/4): 1 shared + 63 routed, top-7.
Both MoE models have 16I of expert width per layer and activate 2I per token; their router
sizes differ (16 vs 63 logits). MoE runs use the expert-level auxiliary loss with alpha = 0.01
(DeepSeekMoE §4.1.3). The table gives the sizes and FLOPs from deepjax.accounting.
"""

from absl import app

import common
import deepjax as dj
from deepjax.train import ObjectiveConfig

SCALES = {
    "test": dict(common.TEST_RUN, ffn=32),
    "smoke": dict(common.SMOKE_RUN, ffn=128, steps=300, eval_every=50),
    # DeepSeekMoE's 2B validation models: 9 layers, hidden 1280, 10 heads, ~2B total parameters,
    # 2K x 2K-token batches for 25K steps (~100B tokens); MLA here where the paper used MHA.
    "full": dict(model=dict(vocab_size=8192, hidden_size=1280, num_hidden_layers=9,
                            num_attention_heads=10, q_lora_rank=None, kv_lora_rank=512,
                            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                            max_position_embeddings=4096, first_k_dense_replace=0,
                            num_nextn_predict_layers=0),
                 ffn=3584, steps=25_000, batch_size=2048, seq_len=2048, learning_rate=1.08e-3,
                 warmup_steps=2000, eval_every=1000, eval_steps=100, log_every=100),
}
PAPER_LOSS = {"dense": 2.060, "GShard top-2": 1.867, "DeepSeekMoE": 1.808}   # Pile, 2B


def designs(base: dj.ModelConfig, ffn: int) -> dict[str, dj.ModelConfig]:
  return {
      "dense": base.replace(intermediate_size=2 * ffn, n_routed_experts=0, n_shared_experts=0),
      "GShard top-2": base.replace(moe_intermediate_size=ffn, n_routed_experts=16,
                                   num_experts_per_tok=2, n_shared_experts=0),
      "DeepSeekMoE": base.replace(moe_intermediate_size=ffn // 4, n_routed_experts=63,
                                  num_experts_per_tok=7, n_shared_experts=1),
  }


def runs() -> list[common.Run]:
  scale = dict(SCALES[common.SCALE.value])
  ffn = scale.pop("ffn")
  base = dj.ModelConfig.preset(
      "tiny", **{**scale.pop("model"), "first_k_dense_replace": 0}).replace(
          model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy",
          norm_topk_prob=False, n_group=1, topk_group=1)
  objective = lambda moe: ObjectiveConfig(  # noqa: E731
      mtp_loss_weight=0.0, balance_loss_weight=0.01 if moe else 0.0, bias_update_speed=0.0,
      balance_loss_scope="batch")
  return [common.Run(name, model, common.train_config(
      **scale, objective=objective(model.n_routed_experts > 0)))
          for name, model in designs(base, ffn).items()]


def main(argv):
  del argv
  started = common.start()
  planned = runs()
  trained = common.train_runs(planned)
  dense_loss = trained[0]["final"]["eval_lm_loss"]
  rows = []
  for run, result in zip(planned, trained):
    m = run.model
    loss = result["final"]["eval_lm_loss"]
    rows.append({
        "name": run.name, "experts": (f"{m.n_shared_experts} shared + {m.n_routed_experts} "
                                      f"routed, top-{m.num_experts_per_tok}"
                                      if m.n_routed_experts else "–"),
        "expert_width": m.moe_intermediate_size if m.n_routed_experts else m.intermediate_size,
        "total_params": result["total_params"], "activated_params": result["activated_params"],
        "train_flops_per_token": result["train_flops_per_token"], "eval_loss": loss,
        "eval_accuracy": result["final"]["eval_lm_accuracy"], "vs_dense": loss - dense_loss,
        "max_vio_global": result["final"].get("eval_max_vio"),
        "paper_loss": PAPER_LOSS[run.name], "seconds": result["seconds"]})
  table = common.markdown_table(
      ["model", "experts", "FFN / expert width", "total params", "activated params",
       "train FLOPs/token", "validation loss", "vs dense", "next-token accuracy",
       "MaxVio_global", "paper (Pile loss, 2B)"],
      [[r["name"], r["experts"], r["expert_width"], r["total_params"], r["activated_params"],
        f"{r['train_flops_per_token']:,.0f}", r["eval_loss"], f"{r['vs_dense']:+.3f}",
        r["eval_accuracy"], r["max_vio_global"], r["paper_loss"]] for r in rows])
  body = f"""
Each run: {trained[0]['tokens']:,} training tokens, the same data order and seed; validation
loss in nats per token on held-out data. Activated parameters exclude the embedding lookup.

{table}

Paper (DeepSeekMoE Table 1, 2B total, 100B tokens, Pile loss): dense 2.060 (its dense model
has one FFN, 0.2B activated, fewer than the MoE models' 0.3B; ours matches the MoE models'
activated size), GShard 1.867, DeepSeekMoE 1.808: DeepSeekMoE beats GShard at equal compute.
"""
  common.plot_curves(trained, "eval_lm_loss", "validation_loss.png",
                     ylabel="validation loss (nats/token)",
                     title="Dense vs GShard vs DeepSeekMoE, equal activated size")
  common.plot_curves(trained, "lm_loss", "train_loss.png", ylabel="training loss (nats/token)",
                     title="Training loss")
  common.write_results("DeepSeekMoE vs GShard vs dense", body,
                       {"runs": rows, "curves": common.curves(trained, ("lm_loss", "eval_lm_loss",
                                                                        "max_vio"))}, started)


if __name__ == "__main__":
  app.run(main)
