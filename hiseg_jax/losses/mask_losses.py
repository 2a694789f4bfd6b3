"""Mask losses: sigmoid cross-entropy and dice, on sampled points or on the whole prediction grid.

`sampled_mask_losses` is Mask2Former's: per mask, the losses are computed on `P` points chosen by
uncertainty sampling on the (detached) predicted mask; targets are the bilinearly sampled
ground-truth masks at the same points. With a supervised region every point lies inside it, so
pixels outside the region never count. `dense_mask_losses` uses every cell of the prediction grid
with the area-averaged targets and region weights of `grid_targets`.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from hiseg_jax.losses.grid_targets import grid_targets
from hiseg_jax.losses.point_sampling import get_uncertain_point_coords_with_randomness
from hiseg_jax.losses.point_sampling import point_sample


def sigmoid_ce_loss(logits: jax.Array, targets: jax.Array,
                    weights: Optional[jax.Array] = None) -> jax.Array:
  """Binary cross-entropy with logits, averaged over the point axis.

  Args:
    logits: `[..., P]` mask logits at points.
    targets: `[..., P]` targets in `[0, 1]` at the same points.
    weights: optional point weights broadcastable to `[..., P]`; the mean is then weighted (0
      when all weights are 0).

  Returns:
    `[...]` mean BCE per mask (Mask2Former `sigmoid_ce_loss` before the sum).
  """
  logits = logits.astype(jnp.float32)  # [..., P]
  targets = targets.astype(jnp.float32)  # [..., P]
  loss = targets * jax.nn.softplus(-logits) + (1 - targets) * jax.nn.softplus(logits)  # [..., P]
  if weights is None:
    return loss.mean(axis=-1)  # [...]
  weights = jnp.broadcast_to(weights, loss.shape)  # [..., P]
  return (loss * weights).sum(axis=-1) / jnp.maximum(weights.sum(axis=-1), 1e-12)  # [...]


def dice_loss(logits: jax.Array, targets: jax.Array,
              weights: Optional[jax.Array] = None) -> jax.Array:
  """Smoothed dice loss `1 - (2 Σ w p t + 1) / (Σ w p + Σ w t + 1)` per mask (w = 1 by default).

  Args:
    logits: `[..., P]` mask logits at points.
    targets: `[..., P]` targets in `[0, 1]` at the same points.
    weights: optional point weights broadcastable to `[..., P]`.

  Returns:
    `[...]` dice loss per mask (Mask2Former `dice_loss` before the sum).
  """
  probs = jax.nn.sigmoid(logits.astype(jnp.float32))  # [..., P]
  targets = targets.astype(jnp.float32)  # [..., P]
  w = 1.0 if weights is None else weights  # [..., P] or scalar
  numerator = 2 * (w * probs * targets).sum(axis=-1)  # [...]
  denominator = (w * probs).sum(axis=-1) + (w * targets).sum(axis=-1)  # [...]
  return 1 - (numerator + 1) / (denominator + 1)  # [...]


def sampled_mask_losses(
    rng: jax.Array,
    pred_masks: jax.Array,
    gt_masks: jax.Array,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    region: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array]:
  """Point-sampled BCE and dice between aligned predicted and target masks.

  Args:
    rng: PRNG key for the point sampling.
    pred_masks: `[B, M, h, w]` predicted mask logits, already aligned with the
      targets (slot `j` is the prediction matched to ground truth `j`).
    gt_masks: `[B, M, hg, wg]` target masks in `[0, 1]` (any resolution).
    num_points: points per mask (Mask2Former: 12,544).
    oversample_ratio: Mask2Former's oversampling ratio (3).
    importance_sample_ratio: Mask2Former's importance ratio (0.75).
    region: optional `[B, Hr, Wr]` supervised region; points are drawn in it.

  Returns:
    `(ce [B, M], dice [B, M])` per-mask losses; the caller masks unmatched
    slots and normalises.

  Raises:
    ValueError: when the mask shapes disagree on `[B, M]`.
  """
  if pred_masks.ndim != 4 or gt_masks.ndim != 4 or pred_masks.shape[:2] != gt_masks.shape[:2]:
    raise ValueError(
        f"sampled_mask_losses: pred_masks {pred_masks.shape} and gt_masks "
        f"{gt_masks.shape} must both be [B, M, h, w] with equal B, M")
  coords = get_uncertain_point_coords_with_randomness(
      rng, pred_masks, num_points, oversample_ratio, importance_sample_ratio,
      region=region)  # [B, M, P, 2]
  # Targets are read at the points in their own (e.g. bool) dtype, without a float copy.
  point_labels = point_sample(
      jax.lax.stop_gradient(gt_masks)[:, :, None], coords)[:, :, 0]  # [B, M, P]
  pred_masks = pred_masks.astype(jnp.float32)  # [B, M, h, w]
  point_logits = point_sample(pred_masks[:, :, None], coords)[:, :, 0]  # [B, M, P]
  return sigmoid_ce_loss(point_logits, point_labels), dice_loss(point_logits, point_labels)


def dense_mask_losses(
    pred_masks: jax.Array,
    gt_masks: jax.Array,
    region: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array]:
  """BCE and dice between aligned predicted and target masks on every prediction cell.

  Args:
    pred_masks: `[B, M, h, w]` predicted mask logits, aligned with the targets.
    gt_masks: `[B, M, Hg, Wg]` target masks in `[0, 1]`, `Hg, Wg` a multiple of `h, w`.
    region: optional `[B, Hr, Wr]` supervised region, `Hr, Wr` a multiple of `Hg, Wg`.

  Returns:
    `(ce [B, M], dice [B, M])` per-mask losses with the cell targets and weights of
    `grid_targets`; the caller masks unmatched slots and normalises.

  Raises:
    ValueError: when the shapes disagree on `[B, M]` or the resolutions do not tile.
  """
  if pred_masks.ndim != 4 or gt_masks.ndim != 4 or pred_masks.shape[:2] != gt_masks.shape[:2]:
    raise ValueError(
        f"dense_mask_losses: pred_masks {pred_masks.shape} and gt_masks "
        f"{gt_masks.shape} must both be [B, M, h, w] with equal B, M")
  b, m, h, w = pred_masks.shape
  targets, weights = grid_targets(gt_masks, region, (h, w))  # [B, M, h*w], [B, h*w]
  logits = pred_masks.reshape(b, m, h * w)  # [B, M, h*w]
  return (sigmoid_ce_loss(logits, targets, weights[:, None]),
          dice_loss(logits, targets, weights[:, None]))
