"""Box conversions, pairwise IoU and greedy (class-aware) NMS with static shapes.

HIPIE removes duplicate thing detections with torchvision's `batched_nms` at
IoU 0.7 on the predicted boxes (normalised xyxy), one class per query: the
class of its highest score. `nms` follows torchvision's rules: boxes are
visited by descending score (ties keep their input order), a box suppresses
every later box of the same class whose IoU with it is strictly greater than
the threshold, and the IoU is inter / (area_a + area_b - inter) without any
+1, so a pair of empty boxes (0 / 0) never suppresses. Class awareness is an
explicit same-class test, which is what torchvision's coordinate-offset trick
computes.

Everything has static shapes and runs under `jax.jit` (the greedy pass is a
`lax.fori_loop` over the boxes).
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp


def box_cxcywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
  """Centre-size boxes to corner boxes.

  Args:
    boxes: [..., 4] (cx, cy, w, h).

  Returns:
    [..., 4] (x1, y1, x2, y2).
  """
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)  # 4 x [...]
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)  # [..., 4]


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
  """Areas of corner boxes.

  Args:
    boxes: [..., 4] (x1, y1, x2, y2).

  Returns:
    [...] (x2 - x1) * (y2 - y1).
  """
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # [...]


def pairwise_box_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """IoU of every pair of corner boxes (torchvision's `box_iou` arithmetic).

  Args:
    a: [N, 4] (x1, y1, x2, y2).
    b: [M, 4] (x1, y1, x2, y2).

  Returns:
    [N, M] IoU; NaN where both boxes are empty (0 / 0).
  """
  lt = jnp.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
  rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2]
  wh = jnp.clip(rb - lt, 0.0, None)  # [N, M, 2]
  inter = wh[..., 0] * wh[..., 1]  # [N, M]
  union = box_area(a)[:, None] + box_area(b)[None, :] - inter  # [N, M]
  return inter / union  # [N, M]


def nms(boxes: jnp.ndarray, scores: jnp.ndarray, iou_threshold: float,
        classes: Optional[jnp.ndarray] = None) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Greedy non-maximum suppression, per class when `classes` is given.

  Args:
    boxes: [N, 4] corner boxes (any consistent scale).
    scores: [N] scores; higher is visited first.
    iou_threshold: a box is suppressed by a kept higher-scored box (of its class) when their IoU
      is strictly greater than this.
    classes: optional [N] int class of each box; boxes of different classes never suppress each
      other.

  Returns:
    order: int32 [N] box indices by descending score (stable).
    keep: bool [N], keep[i] is True when box order[i] survives.

  Raises:
    ValueError: when the shapes disagree.
  """
  n = scores.shape[0]
  if boxes.shape != (n, 4):
    raise ValueError(f'nms: boxes {boxes.shape} is not [{n}, 4] for scores {scores.shape}')
  if classes is not None and classes.shape != (n,):
    raise ValueError(f'nms: classes {classes.shape} is not [{n}]')
  order = jnp.argsort(-scores, stable=True).astype(jnp.int32)  # [N]
  sorted_boxes = boxes[order]  # [N, 4]
  over = pairwise_box_iou(sorted_boxes, sorted_boxes) > iou_threshold  # [N, N]
  if classes is not None:
    c = classes[order]  # [N]
    over = over & (c[:, None] == c[None, :])  # [N, N]
  over = jnp.triu(over, k=1)  # [N, N] box i only suppresses later boxes

  def visit(i, keep):
    return keep & ~(over[i] & keep[i])  # [N]

  keep = jax.lax.fori_loop(0, n, visit, jnp.ones((n,), bool))  # [N]
  return order, keep
