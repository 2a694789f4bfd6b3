"""Mask2Former-style matching costs for class-agnostic (objectness) mask sets.

`C = class_weight * (-sigmoid(objectness)) + mask_weight * BCE + dice_weight * dice`,
with BCE and dice computed on `K` points drawn uniformly at random and shared by all
predictions and ground truths of one image (Mask2Former draws 12,544). Restriction to
the supervised region: the `K` points are drawn uniformly *inside* the image's region
(`sample_uniform_points` with the region), so pixels outside it never enter a cost. With
`K = 0` the costs compare every cell of the prediction grid instead, with the area-averaged
targets and region weights of `hiseg_jax.losses.grid_targets` (the dense mask losses' terms).
Costs are computed on device and carry no gradient.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from hiseg_jax.losses.grid_targets import grid_targets
from hiseg_jax.losses.point_sampling import point_sample
from hiseg_jax.losses.point_sampling import sample_uniform_points


def objectness_cost(logits: jax.Array) -> jax.Array:
  """Objectness cost `-sigmoid(logit)` (Mask2Former's `-prob[target class]`).

  Args:
    logits: `[..., N]` objectness logits of the predictions.

  Returns:
    `[..., N]` cost, the same for every ground-truth column.
  """
  return -jax.nn.sigmoid(logits.astype(jnp.float32))  # [..., N]


def batch_sigmoid_ce_cost(logits: jax.Array, targets: jax.Array,
                          weights: Optional[jax.Array] = None) -> jax.Array:
  """Pairwise BCE-with-logits averaged over points (Mask2Former `batch_sigmoid_ce_loss`).

  Args:
    logits: `[..., N, K]` predicted mask logits at K points.
    targets: `[..., M, K]` targets in `[0, 1]` at the same points.
    weights: optional `[..., K]` point weights; the mean is then weighted (0 when all are 0).

  Returns:
    `[..., N, M]` mean BCE of prediction n against target m.
  """
  logits = logits.astype(jnp.float32)  # [..., N, K]
  targets = targets.astype(jnp.float32)  # [..., M, K]
  pos = jax.nn.softplus(-logits)  # [..., N, K]  BCE against 1
  neg = jax.nn.softplus(logits)  # [..., N, K]  BCE against 0
  if weights is None:
    norm = jnp.float32(logits.shape[-1])  # []
  else:
    pos = pos * weights[..., None, :]  # [..., N, K]
    neg = neg * weights[..., None, :]  # [..., N, K]
    norm = jnp.maximum(weights.sum(-1), 1e-12)[..., None, None]  # [..., 1, 1]
  cost = (jnp.einsum("...nk,...mk->...nm", pos, targets)
          + jnp.einsum("...nk,...mk->...nm", neg, 1 - targets))  # [..., N, M]
  return cost / norm  # [..., N, M]


def batch_dice_cost(logits: jax.Array, targets: jax.Array,
                    weights: Optional[jax.Array] = None) -> jax.Array:
  """Pairwise smoothed dice loss (Mask2Former `batch_dice_loss`).

  Args:
    logits: `[..., N, K]` predicted mask logits at K points.
    targets: `[..., M, K]` targets in `[0, 1]` at the same points.
    weights: optional `[..., K]` point weights.

  Returns:
    `[..., N, M]` `1 - (2 Σ w p t + 1) / (Σ w p + Σ w t + 1)` (w = 1 by default).
  """
  w = 1.0 if weights is None else weights[..., None, :]  # [..., 1, K] or scalar
  probs = w * jax.nn.sigmoid(logits.astype(jnp.float32))  # [..., N, K]
  targets = targets.astype(jnp.float32)  # [..., M, K]
  numerator = 2 * jnp.einsum("...nk,...mk->...nm", probs, targets)  # [..., N, M]
  target_sums = (w * targets).sum(-1)  # [..., M]
  denominator = probs.sum(-1)[..., :, None] + target_sums[..., None, :]  # [..., N, M]
  return 1 - (numerator + 1) / (denominator + 1)  # [..., N, M]


def mask_matching_cost(
    rng: jax.Array,
    pred_logits: jax.Array,
    pred_masks: jax.Array,
    gt_masks: jax.Array,
    num_points: int,
    class_weight: float,
    mask_weight: float,
    dice_weight: float,
    region: Optional[jax.Array] = None,
) -> jax.Array:
  """Full matching cost between predicted and ground-truth masks of each image.

  Args:
    rng: PRNG key for the shared points.
    pred_logits: `[B, N]` objectness logits.
    pred_masks: `[B, N, h, w]` predicted mask logits.
    gt_masks: `[B, M, hg, wg]` ground-truth masks in `[0, 1]` (any resolution;
      padded slots are allowed, the matcher ignores them).
    num_points: K, points shared by all masks of an image; 0 compares every cell of the
      prediction grid (`gt_masks` and `region` must tile it).
    class_weight: weight of the objectness cost (AIMS/Mask2Former: 2).
    mask_weight: weight of the BCE cost (5).
    dice_weight: weight of the dice cost (5).
    region: optional `[B, Hr, Wr]` supervised region; points are drawn inside it.

  Returns:
    `[B, N, M]` float32 cost, gradient stopped.

  Raises:
    ValueError: on inconsistent shapes.
  """
  if (pred_logits.ndim != 2 or pred_masks.ndim != 4 or gt_masks.ndim != 4
      or pred_masks.shape[:2] != pred_logits.shape or gt_masks.shape[0] != pred_logits.shape[0]):
    raise ValueError(
        f"mask_matching_cost: expected pred_logits [B, N], pred_masks [B, N, h, w], "
        f"gt_masks [B, M, hg, wg]; got {pred_logits.shape}, {pred_masks.shape}, "
        f"{gt_masks.shape}")
  pred_logits = jax.lax.stop_gradient(pred_logits)  # [B, N]
  pred_masks = jax.lax.stop_gradient(pred_masks).astype(jnp.float32)  # [B, N, h, w]
  # Read at the points in their own dtype: converting full-resolution bool targets to float
  # first costs more than the sampling.
  gt_masks = jax.lax.stop_gradient(gt_masks)  # [B, M, hg, wg]
  if num_points == 0:
    b, n, h, w = pred_masks.shape
    gt_points, weights = grid_targets(gt_masks, region, (h, w))  # [B, M, h*w], [B, h*w]
    pred_points = pred_masks.reshape(b, n, h * w)  # [B, N, h*w]
  else:
    coords = sample_uniform_points(rng, num_points, pred_logits.shape[:1], region)  # [B, K, 2]
    pred_points = point_sample(pred_masks, coords)  # [B, N, K]
    gt_points = point_sample(gt_masks, coords)  # [B, M, K]
    weights = None
  cost = (mask_weight * batch_sigmoid_ce_cost(pred_points, gt_points, weights)
          + class_weight * objectness_cost(pred_logits)[:, :, None]
          + dice_weight * batch_dice_cost(pred_points, gt_points, weights))  # [B, N, M]
  return cost
