"""Axis-aligned box geometry in JAX: format conversion, area, IoU and generalised IoU.

Boxes are `(cx, cy, w, h)` ("cxcywh", HIPIE's normalised prediction format) or
`(x0, y0, x1, y1)` ("xyxy"). Pairwise functions compare every box of one set with
every box of another (`[..., N, 4] x [..., M, 4] -> [..., N, M]`); aligned ones
compare boxes position by position (`[..., 4] x [..., 4] -> [...]`).

The generalised IoU is `iou - (hull - union) / (hull + hull_eps)` with
`iou = inter / (union + union_eps)`. The reference uses three variants, all
expressible with the two epsilons: HIPIE's `util.box_ops.generalized_box_iou`
(union_eps 0, hull_eps 1e-7; thing matching costs), MaskDINO's
(union_eps 0, hull_eps 1e-6; stuff costs and losses) and fvcore's `giou_loss`
(both 1e-7; thing losses).
"""

from typing import Tuple

import jax
import jax.numpy as jnp


def box_cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """Converts `(cx, cy, w, h)` boxes to `(x0, y0, x1, y1)`.

  Args:
    boxes: `[..., 4]` boxes.

  Returns:
    `[..., 4]` corner boxes.
  """
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)  # [...] each
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)  # [..., 4]


def box_xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """Converts `(x0, y0, x1, y1)` boxes to `(cx, cy, w, h)`.

  Args:
    boxes: `[..., 4]` corner boxes.

  Returns:
    `[..., 4]` centre boxes.
  """
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)  # [...] each
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)  # [..., 4]


def box_area(boxes: jax.Array) -> jax.Array:
  """Area of `(x0, y0, x1, y1)` boxes (negative for inverted boxes, as torchvision).

  Args:
    boxes: `[..., 4]` corner boxes.

  Returns:
    `[...]` areas.
  """
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # [...]


def _check_pairwise(name: str, boxes1: jax.Array, boxes2: jax.Array) -> None:
  if (boxes1.ndim < 2 or boxes2.ndim != boxes1.ndim or boxes1.shape[-1] != 4
      or boxes2.shape[-1] != 4 or boxes1.shape[:-2] != boxes2.shape[:-2]):
    raise ValueError(f'{name}: expected boxes1 [..., N, 4] and boxes2 [..., M, 4] with equal '
                     f'leading dims; got {boxes1.shape} and {boxes2.shape}')


def _check_aligned(name: str, boxes1: jax.Array, boxes2: jax.Array) -> None:
  if boxes1.shape != boxes2.shape or boxes1.shape[-1:] != (4,):
    raise ValueError(f'{name}: expected two [..., 4] box arrays of one shape; got '
                     f'{boxes1.shape} and {boxes2.shape}')


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Pairwise IoU of corner boxes (torchvision / DETR `box_iou`).

  Args:
    boxes1: `[..., N, 4]` corner boxes.
    boxes2: `[..., M, 4]` corner boxes.

  Returns:
    `(iou [..., N, M], union [..., N, M])`.

  Raises:
    ValueError: on inconsistent shapes.
  """
  _check_pairwise('box_iou', boxes1, boxes2)
  area1 = box_area(boxes1)  # [..., N]
  area2 = box_area(boxes2)  # [..., M]
  lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # [..., N, M, 2]
  rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])  # [..., N, M, 2]
  wh = jnp.clip(rb - lt, 0.0, None)  # [..., N, M, 2]
  inter = wh[..., 0] * wh[..., 1]  # [..., N, M]
  union = area1[..., :, None] + area2[..., None, :] - inter  # [..., N, M]
  return inter / union, union


def generalized_box_iou(boxes1: jax.Array,
                        boxes2: jax.Array,
                        union_eps: float = 0.0,
                        hull_eps: float = 1e-7) -> jax.Array:
  """Pairwise generalised IoU of corner boxes.

  Args:
    boxes1: `[..., N, 4]` corner boxes.
    boxes2: `[..., M, 4]` corner boxes.
    union_eps: added to the union in the IoU denominator.
    hull_eps: added to the enclosing-box area in the penalty denominator.

  Returns:
    `[..., N, M]` generalised IoU in `[-1, 1]`.

  Raises:
    ValueError: on inconsistent shapes.
  """
  _check_pairwise('generalized_box_iou', boxes1, boxes2)
  area1 = box_area(boxes1)  # [..., N]
  area2 = box_area(boxes2)  # [..., M]
  lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # [..., N, M, 2]
  rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])  # [..., N, M, 2]
  wh = jnp.clip(rb - lt, 0.0, None)  # [..., N, M, 2]
  inter = wh[..., 0] * wh[..., 1]  # [..., N, M]
  union = area1[..., :, None] + area2[..., None, :] - inter  # [..., N, M]
  iou = inter / (union + union_eps)  # [..., N, M]
  lt = jnp.minimum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # [..., N, M, 2]
  rb = jnp.maximum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])  # [..., N, M, 2]
  wh = jnp.clip(rb - lt, 0.0, None)  # [..., N, M, 2]
  hull = wh[..., 0] * wh[..., 1]  # [..., N, M]
  return iou - (hull - union) / (hull + hull_eps)  # [..., N, M]


def aligned_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """IoU of corresponding corner boxes (the diagonal of `box_iou`).

  Args:
    boxes1: `[..., 4]` corner boxes.
    boxes2: `[..., 4]` corner boxes of the same shape.

  Returns:
    `[...]` IoU, `inter / union`.

  Raises:
    ValueError: on different shapes.
  """
  _check_aligned('aligned_box_iou', boxes1, boxes2)
  lt = jnp.maximum(boxes1[..., :2], boxes2[..., :2])  # [..., 2]
  rb = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])  # [..., 2]
  wh = jnp.clip(rb - lt, 0.0, None)  # [..., 2]
  inter = wh[..., 0] * wh[..., 1]  # [...]
  union = box_area(boxes1) + box_area(boxes2) - inter  # [...]
  return inter / union  # [...]


def aligned_generalized_box_iou(boxes1: jax.Array,
                                boxes2: jax.Array,
                                union_eps: float = 0.0,
                                hull_eps: float = 1e-7) -> jax.Array:
  """Generalised IoU of corresponding corner boxes (the diagonal of `generalized_box_iou`).

  Args:
    boxes1: `[..., 4]` corner boxes.
    boxes2: `[..., 4]` corner boxes of the same shape.
    union_eps: added to the union in the IoU denominator.
    hull_eps: added to the enclosing-box area in the penalty denominator.

  Returns:
    `[...]` generalised IoU.

  Raises:
    ValueError: on different shapes.
  """
  _check_aligned('aligned_generalized_box_iou', boxes1, boxes2)
  lt = jnp.maximum(boxes1[..., :2], boxes2[..., :2])  # [..., 2]
  rb = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])  # [..., 2]
  wh = jnp.clip(rb - lt, 0.0, None)  # [..., 2]
  inter = wh[..., 0] * wh[..., 1]  # [...]
  union = box_area(boxes1) + box_area(boxes2) - inter  # [...]
  iou = inter / (union + union_eps)  # [...]
  lt = jnp.minimum(boxes1[..., :2], boxes2[..., :2])  # [..., 2]
  rb = jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])  # [..., 2]
  wh = jnp.clip(rb - lt, 0.0, None)  # [..., 2]
  hull = wh[..., 0] * wh[..., 1]  # [...]
  return iou - (hull - union) / (hull + hull_eps)  # [...]


def box_l1_distance(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Pairwise L1 distance between box parameter vectors (`torch.cdist(p=1)`).

  Args:
    boxes1: `[..., N, 4]` boxes (any parameterisation, usually cxcywh).
    boxes2: `[..., M, 4]` boxes in the same parameterisation.

  Returns:
    `[..., N, M]` sum over the 4 coordinates of `|b1 - b2|`.

  Raises:
    ValueError: on inconsistent shapes.
  """
  _check_pairwise('box_l1_distance', boxes1, boxes2)
  return jnp.abs(boxes1[..., :, None, :] - boxes2[..., None, :, :]).sum(-1)  # [..., N, M]
