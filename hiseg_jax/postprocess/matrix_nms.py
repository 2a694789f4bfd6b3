"""Matrix NMS (SOLOv2, Wang et al. 2020): parallel soft suppression of duplicate masks.

With the masks sorted by descending score, mask j is decayed by every higher-scored mask i by

    decay_j = min_{i < j} f(IoU_ij) / f(comp_i),   comp_i = max_{k < i} IoU_ki,

with the Gaussian kernel f(x) = exp(-sigma x^2) (SOLOv2's default, sigma = 2): a mask that
overlaps a higher-scored mask is suppressed, unless that mask is itself suppressed (its own
largest overlap with a better mask, comp_i, compensates). The first mask keeps its score. Scores
become score_j * decay_j; nothing is removed, the caller re-sorts. Class-agnostic (every mask
competes with every other), as the AIMS levels have no classes.

Our addition to AIMS inference (`config.eval.mask_nms = "matrix"`): the paper scores one-step
predictions as Mask2Former does, without suppression.
"""

import jax.numpy as jnp

SIGMA = 2.0


def matrix_nms_decay(masks: jnp.ndarray, scores: jnp.ndarray,
                     sigma: float = SIGMA) -> jnp.ndarray:
  """Decayed scores of masks sorted by descending score.

  Args:
    masks: bool [B, K, H, W] binary masks, sorted by `scores` (descending).
    scores: [B, K] their scores, descending.
    sigma: the Gaussian kernel's sigma.

  Returns:
    [B, K] float32 decayed scores, in the input order (no longer sorted).

  Raises:
    ValueError: when the shapes disagree.
  """
  if masks.ndim != 4 or scores.shape != masks.shape[:2]:
    raise ValueError(f'matrix_nms_decay: masks {masks.shape} must be [B, K, H, W] and scores '
                     f'{scores.shape} [B, K]')
  b, k = scores.shape
  flat = masks.reshape(b, k, -1).astype(jnp.float32)  # [B, K, HW]
  inter = jnp.einsum('bip,bjp->bij', flat, flat)  # [B, K, K]
  area = flat.sum(axis=-1)  # [B, K]
  union = area[:, :, None] + area[:, None, :] - inter  # [B, K, K]
  iou = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)  # [B, K, K]
  iou = jnp.triu(iou, k=1)  # [B, K, K] iou[i, j] for i scored above j
  compensate = iou.max(axis=1)  # [B, K] largest overlap of mask i with a better mask
  # [B, K(i), K(j)]: f(IoU_ij) / f(comp_i); below the diagonal IoU is 0 and the ratio is >= 1,
  # so the min over i is decided by the masks scored above j (row 0 gives <= 1).
  ratio = jnp.exp(-sigma * iou ** 2) / jnp.exp(-sigma * compensate ** 2)[:, :, None]
  return scores.astype(jnp.float32) * ratio.min(axis=1)  # [B, K]
