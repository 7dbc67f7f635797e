"""Training objective (DeepSeek-V3 §2.2-2.3): next-token cross-entropy, the MTP losses and a
balance loss, either V3's complementary sequence-wise loss or the classic expert-level auxiliary
loss over the batch; for V3.2, the indexer's KL loss (V3.2 eqs. 3-4, computed by the model).
Targets never cross document boundaries."""

import flax.struct
import jax
import jax.numpy as jnp

from deepjax.model import ModelOutput


@flax.struct.dataclass
class Losses:
  total: jax.Array
  lm: jax.Array          # mean next-token cross-entropy over valid targets
  mtp: jax.Array         # (1/D) sum_k L_MTP^k  (V3 eq. 25 without lambda)
  balance: jax.Array     # sum_i f_i P_i averaged over MoE layers (and rows if sequence-wise)
  tokens: jax.Array      # number of valid next-token targets
  indexer_kl: jax.Array | None   # V3.2's L_I, mean over DSA layers and tokens (None: no indexer)


def next_token_targets(tokens, segment_ids, k: int = 1):
  """Targets k steps ahead within the same document, and where they are valid.

  tokens, segment_ids: [..., T] int, usually [B, T] (numpy or jax; works under jit).
  Returns (targets int32, mask bool) of the same shape: targets[..., i] = tokens[..., i + k] and
  mask[..., i] is true iff segment_ids[..., i + k] == segment_ids[..., i] != 0. Positions whose
  target lies in another document, in padding or past the row end are masked (target 0).
  k = 1 gives the LM targets, k = 2 .. D + 1 those of the D MTP depths (V3 eq. 24: depth k
  predicts t_{i+k+1}).
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  tokens = jnp.asarray(tokens, jnp.int32)
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  shift = min(k, tokens.shape[-1])

  def ahead(x):  # x[..., i + k], 0 past the end of the row
    return jnp.pad(x[..., shift:], [(0, 0)] * (x.ndim - 1) + [(0, shift)])

  future_segments = ahead(segment_ids)
  mask = (future_segments == segment_ids) & (segment_ids != 0)
  return jnp.where(mask, ahead(tokens), 0), mask


def cross_entropy(logits, targets, mask):
  """Mean -log p(target) over positions where mask is true (float32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  count = jnp.sum(mask)
  return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(count, 1), count


def correct_predictions(logits, targets, mask):
  """Number of positions where mask is true and the argmax of logits is the target."""
  return jnp.sum((jnp.argmax(logits, axis=-1) == targets) & mask)


def prediction_counts(out: ModelOutput, tokens, segment_ids) -> dict:
  """Top-1 counts over a batch: lm_correct (main head on t_{i+1}); with MTP, mtp_correct and
  mtp_tokens per depth k (on t_{i+k+1}), and mtp_agree: positions where depth 1's argmax at i
  equals the main head's argmax at i+1. Both predict t_{i+2}, so mtp_agree / mtp_tokens[0] is a
  teacher-forced proxy for the acceptance rate of MTP speculative decoding (V3 §5.4.3)."""
  targets, mask = next_token_targets(tokens, segment_ids, 1)
  counts = {"lm_correct": correct_predictions(out.logits, targets, mask)}
  if out.mtp_logits is not None:
    depths = [next_token_targets(tokens, segment_ids, k + 2) for k in range(len(out.mtp_logits))]
    counts["mtp_correct"] = jnp.stack([correct_predictions(logits, t, m)
                                       for logits, (t, m) in zip(out.mtp_logits, depths)])
    counts["mtp_tokens"] = jnp.stack([jnp.sum(m) for _, m in depths])
    main_next = jnp.pad(jnp.argmax(out.logits, -1)[:, 1:], ((0, 0), (0, 1)))
    counts["mtp_agree"] = correct_predictions(out.mtp_logits[0], main_next, depths[0][1])
  return counts


def sequence_balance_loss(counts, affinity, token_counts, top_k: int):
  """V3 eqs. 17-20 per row: sum_i f_i P_i with f_i = E/(K T) * #tokens choosing i and
  P_i = (1/T) sum_t s'_{i,t}; counts, affinity [L, B, E]; token_counts [B] valid tokens T."""
  experts = counts.shape[-1]
  t = jnp.maximum(token_counts, 1.0)[None, :, None]
  f = counts * experts / (top_k * t)
  p = affinity / t
  return jnp.mean(jnp.sum(f * p, axis=-1))


def batch_balance_loss(counts, affinity, token_counts, top_k: int):
  """The expert-level auxiliary loss (DeepSeekMoE eqs. 12-14, GShard; Wang et al. 2024 eq. 3):
  sum_i f_i P_i with f_i and P_i counted over all tokens of the batch rather than per row."""
  return sequence_balance_loss(jnp.sum(counts, 1, keepdims=True),
                               jnp.sum(affinity, 1, keepdims=True),
                               jnp.sum(token_counts, keepdims=True), top_k)


BALANCE_LOSSES = {"sequence": sequence_balance_loss, "batch": batch_balance_loss}


def training_losses(out: ModelOutput, tokens, segment_ids, *, top_k: int, mtp_weight: float,
                    balance_weight: float, balance_scope: str = "sequence",
                    indexer_weight: float = 1.0) -> Losses:
  """balance_scope: "sequence" (V3 eq. 17, per row) or "batch" (the expert-level aux loss).
  indexer_weight scales V3.2's L_I; its gradient reaches only the indexer (whose input the
  model detaches), so the weight sets the indexer's step size against the model's."""
  targets, mask = next_token_targets(tokens, segment_ids, 1)
  lm, count = cross_entropy(out.logits, targets, mask)
  mtp = jnp.zeros((), jnp.float32)
  if out.mtp_logits is not None:               # depth k predicts t_{i+k+1} (V3 eq. 24)
    depths = out.mtp_logits.shape[0]
    for k in range(depths):
      targets_k, mask_k = next_token_targets(tokens, segment_ids, k + 2)
      mtp += cross_entropy(out.mtp_logits[k], targets_k, mask_k)[0] / depths
  balance = jnp.zeros((), jnp.float32)
  if out.router is not None:
    valid = jnp.sum(segment_ids != 0, axis=-1).astype(jnp.float32)
    balance = BALANCE_LOSSES[balance_scope](out.router.counts, out.router.affinity, valid, top_k)
  total = lm + mtp_weight * mtp + balance_weight * balance
  if out.indexer_kl is not None:
    total += indexer_weight * out.indexer_kl
  return Losses(total=total, lm=lm, mtp=mtp, balance=balance, tokens=count,
                indexer_kl=out.indexer_kl)
