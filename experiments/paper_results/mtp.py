"""Multi-token prediction: the same main model trained with and without one MTP module
(DeepSeek-V3 §2.2, Table 4).

  python experiments/paper_results/mtp.py [--scale=smoke|full] [--out_dir=DIR]

Both runs have the same main model, data, seed and steps, and V3's balancing (gamma = 1e-3,
sequence-wise alpha = 1e-4); one adds an MTP module (D = 1, lambda = 0.3) that predicts t_{i+2}
from the main model's hidden state at i and the embedding of t_{i+1} (V3 eqs. 21-25). At
inference the module is dropped, so the comparison is the main head's validation loss. Also
reported: the MTP head's next-next-token accuracy, and how often its guess for t_{i+2} equals the
main head's own prediction at i+1, a teacher-forced proxy for the acceptance rate of MTP
speculative decoding (V3 §5.4.3: 85-90%).
"""

import math

from absl import app

import common
import deepjax as dj
from deepjax.train import ObjectiveConfig

SCALES = {
    "test": common.TEST_RUN,
    "smoke": dict(common.SMOKE_RUN, steps=500, eval_every=50),
    # V3 Table 4's small MoE: V2-Lite's shape (15.7B total, 2.4B activated) as a V3 model,
    # 1.33T tokens in 4M-token batches; parameters sharded over every device (FSDP).
    "full": dict(model=dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                            moe_intermediate_size=1408, num_hidden_layers=27,
                            num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
                            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                            n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
                            n_group=1, topk_group=1, first_k_dense_replace=1,
                            max_position_embeddings=4096, num_nextn_predict_layers=0),
                 steps=317_000, batch_size=1024, seq_len=4096, learning_rate=4.2e-4,
                 warmup_steps=2000, eval_every=10_000, eval_steps=100, log_every=100,
                 mesh={"data": 1, "fsdp": -1, "expert": 1, "tensor": 1}),
}


def runs() -> list[common.Run]:
  scale = dict(SCALES[common.SCALE.value])
  main_model = dj.ModelConfig.preset("tiny", **scale.pop("model"))
  train = common.train_config(**scale, objective=ObjectiveConfig(mtp_loss_weight=0.3))
  return [common.Run("no MTP", main_model, train),
          common.Run("1 MTP module (λ=0.3)", main_model.replace(num_nextn_predict_layers=1),
                     train)]


def main(argv):
  del argv
  started = common.start()
  planned = runs()
  trained = common.train_runs(planned)
  rows = []
  for result in trained:
    final = result["final"]
    mtp = "eval_mtp_accuracy" in final
    rows.append({"name": result["name"], "main_params": result["total_params"],
                 "mtp_params": result["mtp_params"],
                 "train_flops_per_token": result["train_flops_per_token"],
                 "eval_loss": final["eval_lm_loss"], "eval_accuracy": final["eval_lm_accuracy"],
                 "mtp_loss": final["eval_mtp_loss"] if mtp else None,
                 "mtp_accuracy": final["eval_mtp_accuracy"][0] if mtp else None,
                 "mtp_agreement": final["eval_mtp_agreement"] if mtp else None,
                 "seconds": result["seconds"]})
    for record in result["records"]:
      if "eval_mtp_accuracy" in record:
        record["eval_mtp_accuracy_1"] = record["eval_mtp_accuracy"][0]
  table = common.markdown_table(
      ["run", "main-model params", "MTP params", "train FLOPs/token", "validation loss (main)",
       "perplexity", "next-token accuracy", "MTP loss (t+2)", "MTP accuracy (t+2)",
       "MTP agrees with main head"],
      [[r["name"], r["main_params"], r["mtp_params"], f"{r['train_flops_per_token']:,.0f}",
        r["eval_loss"], f"{math.exp(r['eval_loss']):.3f}", r["eval_accuracy"], r["mtp_loss"],
        r["mtp_accuracy"], r["mtp_agreement"]] for r in rows])
  body = f"""
Each run: {trained[0]['tokens']:,} training tokens; validation on held-out data (loss in nats
per token). The main models are identical in size; the MTP module is extra and dropped at
inference.

{table}

Paper: V3 Table 4 compares MTP against no MTP on a 15.7B-total (2.4B activated) MoE trained on
1.33T tokens and a 228.7B one on 540B tokens: MTP improves most benchmarks at both scales, while
Pile-test bits per byte stay about the same. V3 §5.4.3: the second token predicted by MTP is
accepted 85-90% of the time in speculative decoding.
"""
  common.plot_curves(trained, "eval_lm_loss", "validation_loss.png",
                     ylabel="validation loss, main head (nats/token)",
                     title="Main-head validation loss with and without MTP")
  common.plot_curves(trained, "eval_mtp_accuracy_1", "mtp_accuracy.png",
                     ylabel="MTP next-next-token accuracy",
                     title="MTP head: top-1 accuracy on t+2 (held-out)")
  common.write_results("Multi-token prediction", body,
                       {"runs": rows, "curves": common.curves(
                           trained, ("lm_loss", "mtp_loss", "eval_lm_loss", "eval_lm_accuracy",
                                     "eval_mtp_accuracy_1", "eval_mtp_agreement"))}, started)


if __name__ == "__main__":
  app.run(main)
