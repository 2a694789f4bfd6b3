"""Splitting predicted masks into their connected components (host post-processing).

A query of a small or under-trained mask decoder can light up several separate instances that
look alike (both wheels of a car, a head and a lamp shade of the same colour), so its one mask
matches none of them. `split_components` turns every connected component (8-connectivity) of a
mask into a prediction of its own, scored by the mask's score times the component's share of the
mask's area, and remembers which mask each came from so that per-query outputs (association
maps) can follow. A mask with a single component keeps its score. Ground-truth instances that
are themselves in pieces (an occluded part) are then only found piecewise, so this is an option
for models whose queries merge instances, not part of either paper's inference.
"""

from typing import Tuple

import numpy as np
from scipy import ndimage

# 8-connectivity: pixels that touch at a corner belong to one component.
_EIGHT_CONNECTED = np.ones((3, 3), bool)


def split_components(masks: np.ndarray, scores: np.ndarray
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Every connected component of every mask as a prediction of its own.

  Args:
    masks: bool [K, H, W] binary masks.
    scores: float [K] their scores.

  Returns:
    (masks bool [K', H, W], scores float64 [K'], source int64 [K']): per mask in the input
    order, its components in scan order (an empty mask stays as it is), each scored
    `scores[k] * area(component) / area(mask k)`; `source[i]` is the input mask component `i`
    came from. K' >= K.

  Raises:
    ValueError: when `masks` is not [K, H, W] or `scores` is not [K].
  """
  masks = np.asarray(masks, bool)  # [K, H, W]
  scores = np.asarray(scores, np.float64)  # [K]
  if masks.ndim != 3 or scores.shape != masks.shape[:1]:
    raise ValueError(f'split_components: masks must be [K, H, W] and scores [K], got '
                     f'{masks.shape} and {scores.shape}')
  out_masks, out_scores, source = [], [], []
  for k, mask in enumerate(masks):
    labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)  # [H, W], int
    if count <= 1:
      out_masks.append(mask[None])  # [1, H, W]
      out_scores.append(scores[k:k + 1])
      source.append(np.full([1], k))
      continue
    areas = np.bincount(labels.reshape(-1), minlength=count + 1)[1:]  # [C]
    out_masks.append(labels[None] == np.arange(1, count + 1)[:, None, None])  # [C, H, W]
    out_scores.append(scores[k] * areas / areas.sum())  # [C]
    source.append(np.full([count], k))
  if not out_masks:
    return masks, scores, np.zeros([0], np.int64)
  return (np.concatenate(out_masks), np.concatenate(out_scores),
          np.concatenate(source).astype(np.int64))
