"""AIMS association loss (Eq. 8) on matched query pairs.

The model predicts similarity logits between every higher-level and every
lower-level query (`FC(E_e) · FC(E_p)ᵀ`, `[B, Q_hi, Q_lo]`); the ground truth
`G` is given between ground-truth slots (`[B, N_hi, N_lo]`). The two are put in
correspondence through the Hungarian matches of the two levels: for ground truth
i (higher level) matched to query a and ground truth j (lower level) matched to
query b, the logit `S[a, b]` is compared with `G[i, j]` by sigmoid BCE. Only
pairs whose both ends are matched and only samples whose annotations cover both
levels (`sample_valid`) count; the loss is the mean over those pairs. Query pairs
involving an unmatched query get no association target (the paper gives none).
"""

import jax
import jax.numpy as jnp


def association_loss(
    assoc_logits: jax.Array,
    gt_assoc: jax.Array,
    high_pred_idx: jax.Array,
    high_matched: jax.Array,
    low_pred_idx: jax.Array,
    low_matched: jax.Array,
    sample_valid: jax.Array,
) -> jax.Array:
  """Mean BCE between matched-pair similarity logits and the association ground truth.

  Args:
    assoc_logits: `[B, Q_hi, Q_lo]` similarity logits between queries.
    gt_assoc: `[B, N_hi, N_lo]` binary association between ground-truth slots.
    high_pred_idx: `[B, N_hi]` query matched to each higher-level ground truth.
    high_matched: `[B, N_hi]` bool, whether that ground truth is matched.
    low_pred_idx: `[B, N_lo]` query matched to each lower-level ground truth.
    low_matched: `[B, N_lo]` bool.
    sample_valid: `[B]` bool, whether the sample annotates both levels.

  Returns:
    Scalar loss; 0 when no pair is valid.

  Raises:
    ValueError: when the shapes are inconsistent.
  """
  if (assoc_logits.ndim != 3 or gt_assoc.shape != high_pred_idx.shape + low_pred_idx.shape[1:]
      or high_matched.shape != high_pred_idx.shape or low_matched.shape != low_pred_idx.shape
      or sample_valid.shape != assoc_logits.shape[:1]):
    raise ValueError(
        f"association_loss: inconsistent shapes: assoc_logits {assoc_logits.shape}, "
        f"gt_assoc {gt_assoc.shape}, high {high_pred_idx.shape}/{high_matched.shape}, "
        f"low {low_pred_idx.shape}/{low_matched.shape}, sample_valid {sample_valid.shape}")
  assoc_logits = assoc_logits.astype(jnp.float32)  # [B, Q_hi, Q_lo]
  rows = jnp.take_along_axis(assoc_logits, high_pred_idx[:, :, None], axis=1)  # [B, N_hi, Q_lo]
  pair_logits = jnp.take_along_axis(rows, low_pred_idx[:, None, :], axis=2)  # [B, N_hi, N_lo]
  target = gt_assoc.astype(jnp.float32)  # [B, N_hi, N_lo]
  bce = (target * jax.nn.softplus(-pair_logits)
         + (1 - target) * jax.nn.softplus(pair_logits))  # [B, N_hi, N_lo]
  pair_valid = (high_matched[:, :, None] & low_matched[:, None, :]
                & sample_valid.astype(jnp.bool_)[:, None, None])  # [B, N_hi, N_lo]
  count = pair_valid.sum()  # []
  summed = jnp.where(pair_valid, bce, 0.0).sum()  # []
  return jnp.where(count > 0, summed / jnp.maximum(count, 1), 0.0)  # []
