"""Objectness (part-/entity-/relation-ness) loss with a no-object weight.

A class-agnostic transcription of Mask2Former's `loss_labels`: matched queries
have target 1 and weight 1, unmatched queries target 0 and weight
`no_object_weight` (0.1); the loss is the weighted mean of the per-query
sigmoid BCE, like `F.cross_entropy(..., weight=empty_weight)`, taken over all
queries of the samples that supervise this level.
"""

import jax
import jax.numpy as jnp


def objectness_loss(
    logits: jax.Array,
    query_matched: jax.Array,
    sample_weight: jax.Array,
    no_object_weight: float,
) -> jax.Array:
  """Weighted-mean sigmoid BCE of the objectness logits.

  Args:
    logits: `[B, Q]` objectness logits.
    query_matched: `[B, Q]` bool, True for queries matched to a ground truth.
    sample_weight: `[B]` 1 for samples supervising this level, 0 otherwise.
    no_object_weight: weight of unmatched queries (AIMS/Mask2Former: 0.1).

  Returns:
    Scalar loss; 0 when no sample is supervised.
  """
  logits = logits.astype(jnp.float32)  # [B, Q]
  target = query_matched.astype(jnp.float32)  # [B, Q]
  bce = target * jax.nn.softplus(-logits) + (1 - target) * jax.nn.softplus(logits)  # [B, Q]
  weight = jnp.where(query_matched, 1.0, no_object_weight)  # [B, Q]
  weight = weight * sample_weight.astype(jnp.float32)[:, None]  # [B, Q]
  total = weight.sum()  # []
  return jnp.where(total > 0, (weight * bce).sum() / jnp.where(total > 0, total, 1.0), 0.0)  # []
