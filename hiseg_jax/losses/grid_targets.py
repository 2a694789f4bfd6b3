"""Ground truth on the prediction grid, for dense (unsampled) mask losses and matching costs.

With `num_points` = 0 (loss) or `match_num_points` = 0 (matching) the AIMS criterion compares a
predicted mask with its target on every cell of the prediction grid instead of on sampled points
(MaskFormer's dense mask losses, evaluated on the prediction grid instead of an upsampled copy).
A cell's weight is the fraction of its pixels inside the supervised region, and its target the
fraction of those in-region pixels that the ground-truth mask covers. Because BCE is linear in
its target, the weighted BCE over cells equals the BCE of every supervised pixel against the logit
of the cell that contains it; the same weights enter the dice sums.

Targets and region must tile the prediction grid: their sides are integer multiples of the
prediction's (runlocal: 128 px targets, 64 or 32 px predictions).
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp


def area_pool(maps: jax.Array, grid_hw: Tuple[int, int], what: str) -> jax.Array:
  """Averages `[..., H, W]` maps over the cells of an `(h, w)` grid with `H = k h`, `W = l w`.

  Args:
    maps: `[..., H, W]` maps (bool or numeric).
    grid_hw: the grid `(h, w)`.
    what: the maps' name, for errors.

  Returns:
    `[..., h, w]` float32 cell means.

  Raises:
    ValueError: when `(H, W)` is not an integer multiple of `(h, w)`.
  """
  height, width = maps.shape[-2:]
  h, w = grid_hw
  if height % h or width % w:
    raise ValueError(f"dense mask losses: {what} {maps.shape} must be an integer multiple of the "
                     f"prediction grid {grid_hw} on each side")
  k, l = height // h, width // w
  cells = maps.reshape(maps.shape[:-2] + (h, k, w, l)).astype(jnp.float32)  # [..., h, k, w, l]
  return cells.mean(axis=(-3, -1))  # [..., h, w]


def grid_targets(gt_masks: jax.Array, region: Optional[jax.Array],
                 grid_hw: Tuple[int, int]) -> Tuple[jax.Array, jax.Array]:
  """Soft targets and cell weights of ground-truth masks on a prediction grid.

  Args:
    gt_masks: `[B, M, Hg, Wg]` masks in `[0, 1]`.
    region: optional `[B, Hr, Wr]` supervised region (a pixel counts where it is > 0.5); `Hr, Wr`
      a multiple of `Hg, Wg`. None supervises every pixel.
    grid_hw: the prediction grid `(h, w)`; `Hg, Wg` a multiple of it.

  Returns:
    `(targets [B, M, h*w], weights [B, h*w])`: per cell, the covered fraction of its supervised
    pixels (0 where it has none) and the supervised fraction of its pixels. Gradient stopped.

  Raises:
    ValueError: when the resolutions do not tile each other.
  """
  gt_masks = jax.lax.stop_gradient(gt_masks)  # [B, M, Hg, Wg]
  b, m = gt_masks.shape[:2]
  h, w = grid_hw
  if region is None:
    inside = jnp.ones((b,) + gt_masks.shape[-2:], jnp.float32)  # [B, Hg, Wg]
  else:
    inside = area_pool(jax.lax.stop_gradient(region) > 0.5, gt_masks.shape[-2:],
                       "the region")  # [B, Hg, Wg]
  covered = area_pool(gt_masks.astype(jnp.float32) * inside[:, None], grid_hw,
                      "the target masks")  # [B, M, h, w]
  weights = area_pool(inside, grid_hw, "the region")  # [B, h, w]
  targets = covered / jnp.maximum(weights, 1e-12)[:, None]  # [B, M, h, w]
  return targets.reshape(b, m, h * w), weights.reshape(b, h * w)
