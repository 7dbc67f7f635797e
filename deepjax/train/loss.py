"""Training objective (DeepSeek-V3 §2.2-2.3): next-token cross-entropy, the MTP losses and the
complementary sequence-wise balance loss. Targets never cross document boundaries."""

import flax.struct
import jax
import jax.numpy as jnp

from deepjax.data import next_token_targets
from deepjax.model import ModelOutput


@flax.struct.dataclass
class Losses:
  total: jax.Array
  lm: jax.Array          # mean next-token cross-entropy over valid targets
  mtp: jax.Array         # (1/D) sum_k L_MTP^k  (V3 eq. 25 without lambda)
  balance: jax.Array     # sum_i f_i P_i, averaged over rows and MoE layers (eq. 17 without alpha)
  tokens: jax.Array      # number of valid next-token targets


def cross_entropy(logits, targets, mask):
  """Mean -log p(target) over positions where mask is true (float32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  count = jnp.sum(mask)
  return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(count, 1), count


def sequence_balance_loss(counts, affinity, token_counts, top_k: int):
  """V3 eqs. 17-20 per row: sum_i f_i P_i with f_i = E/(K T) * #tokens choosing i and
  P_i = (1/T) sum_t s'_{i,t}; counts, affinity [L, B, E]; token_counts [B] valid tokens T."""
  experts = counts.shape[-1]
  t = jnp.maximum(token_counts, 1.0)[None, :, None]
  f = counts * experts / (top_k * t)
  p = affinity / t
  return jnp.mean(jnp.sum(f * p, axis=-1))


def training_losses(out: ModelOutput, tokens, segment_ids, *, top_k: int, mtp_weight: float,
                    balance_weight: float) -> Losses:
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
    balance = sequence_balance_loss(out.router.counts, out.router.affinity, valid, top_k)
  total = lm + mtp_weight * mtp + balance_weight * balance
  return Losses(total=total, lm=lm, mtp=mtp, balance=balance, tokens=count)
