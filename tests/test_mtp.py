"""MTP module (V3 §2.2) against a torch composition of transformers' own V3 layers."""

import jax.numpy as jnp
import numpy as np
import torch
from safetensors.torch import save_file
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

import deepjax as dj
from hf_reference import SMALL_V3, hf_logits, hf_model, relative_error


def _torch_layers(model, h, positions):
  t = h.shape[1]
  mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
  rope = model.model.rotary_emb(h, positions)
  for layer in model.model.layers:
    h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=positions)
  return h, mask, rope


def test_mtp_logits_match_torch_composition(tmp_path):
  cfg = dj.ModelConfig(**dict(SMALL_V3, num_nextn_predict_layers=1))
  model = hf_model(cfg, seed=3)
  config, n = model.config, cfg.num_hidden_layers
  torch.manual_seed(4)
  mtp = torch.nn.ModuleDict({
      "enorm": hf_v3.DeepseekV3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
      "hnorm": hf_v3.DeepseekV3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
      "eh_proj": torch.nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False),
      "block": hf_v3.DeepseekV3DecoderLayer(config, layer_idx=n),
      "shared_norm": hf_v3.DeepseekV3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)}).eval()
  with torch.no_grad():
    for name, p in mtp.named_parameters():
      p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
    mtp["block"].mlp.gate.e_score_correction_bias.copy_(0.1 * torch.randn(cfg.n_routed_experts))

  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 17)).astype(np.int32)
  tt = torch.as_tensor(tokens, dtype=torch.long)
  with torch.no_grad():
    positions = torch.arange(tokens.shape[1])[None]
    h, mask, rope = _torch_layers(model, model.model.embed_tokens(tt), positions)
    shifted = torch.cat([tt[:, 1:], torch.zeros_like(tt[:, :1])], 1)   # Emb(t_{i+1})
    x = mtp["eh_proj"](torch.cat([mtp["enorm"](model.model.embed_tokens(shifted)),
                                  mtp["hnorm"](h)], -1))
    x = mtp["block"](x, attention_mask=mask, position_embeddings=rope, position_ids=positions)
    expected = model.lm_head(mtp["shared_norm"](x)).numpy()

  model.save_pretrained(tmp_path)                     # main model: hub per-expert layout
  prefix = f"model.layers.{n}."
  extra = {prefix + "enorm.weight": mtp["enorm"].weight, prefix + "hnorm.weight": mtp["hnorm"].weight,
           prefix + "eh_proj.weight": mtp["eh_proj"].weight,
           prefix + "shared_head.norm.weight": mtp["shared_norm"].weight,
           prefix + "embed_tokens.weight": model.model.embed_tokens.weight,
           prefix + "shared_head.head.weight": model.lm_head.weight}
  extra.update({prefix + k: v for k, v in mtp["block"].state_dict().items()})  # fused experts
  save_file({k: v.detach().contiguous() for k, v in extra.items()}, tmp_path / "mtp.safetensors")

  ours = dj.load_hf(str(tmp_path))(jnp.asarray(tokens))
  assert ours.mtp_logits.shape == (1,) + tokens.shape + (cfg.vocab_size,)
  # Positions whose input t_{i+1} exists (the last one is padding by construction).
  assert relative_error(ours.mtp_logits[0, :, :-1], expected[:, :-1]) < 1e-5
  assert relative_error(ours.logits, hf_logits(model, tokens)) < 1e-5
