"""Per-box regression losses of HIPIE: L1, generalised IoU and the IoU-head BCE.

All take boxes aligned position by position (prediction i with its matched
target i) and return one value per box; the criterion masks unmatched
positions and normalises. Boxes are normalised `(cx, cy, w, h)`.

* `l1_box_loss`: `F.l1_loss(..., reduction="none")` summed over the 4 coordinates.
* `giou_loss`: `1 - GIoU` of the boxes in corner form. The thing criterion uses
  fvcore's `giou_loss` (both epsilons 1e-7), the stuff (MaskDINO) criterion
  `1 - diag(generalized_box_iou)` with MaskDINO's box ops (union_eps 0,
  hull_eps 1e-6).
* `box_iou_bce_loss`: BCE-with-logits of the IoU head against the IoU of the
  predicted and target boxes, the target computed without gradient
  (`SetCriterion.loss_boxes`'s `loss_boxiou`).
"""

import jax
import jax.numpy as jnp

from hiseg_jax.boxes import aligned_box_iou
from hiseg_jax.boxes import aligned_generalized_box_iou
from hiseg_jax.boxes import box_cxcywh_to_xyxy


def _check(name: str, pred: jax.Array, target: jax.Array) -> None:
  if pred.shape != target.shape or pred.shape[-1:] != (4,):
    raise ValueError(f'{name}: expected pred and target boxes [..., 4] of one shape; got '
                     f'{pred.shape} and {target.shape}')


def l1_box_loss(pred_boxes: jax.Array, target_boxes: jax.Array) -> jax.Array:
  """L1 distance of aligned boxes.

  Args:
    pred_boxes: `[..., 4]` predicted boxes.
    target_boxes: `[..., 4]` target boxes.

  Returns:
    `[...]` sum over the 4 coordinates of `|pred - target|`.

  Raises:
    ValueError: on different shapes.
  """
  _check('l1_box_loss', pred_boxes, target_boxes)
  return jnp.abs(pred_boxes.astype(jnp.float32) - target_boxes.astype(jnp.float32)).sum(-1)


def giou_loss(pred_boxes: jax.Array,
              target_boxes: jax.Array,
              union_eps: float = 1e-7,
              hull_eps: float = 1e-7) -> jax.Array:
  """`1 - GIoU` of aligned `(cx, cy, w, h)` boxes.

  Args:
    pred_boxes: `[..., 4]` predicted boxes.
    target_boxes: `[..., 4]` target boxes.
    union_eps: added to the union (fvcore 1e-7, MaskDINO 0).
    hull_eps: added to the enclosing area (fvcore 1e-7, MaskDINO 1e-6).

  Returns:
    `[...]` loss in `[0, 2]`.

  Raises:
    ValueError: on different shapes.
  """
  _check('giou_loss', pred_boxes, target_boxes)
  pred = box_cxcywh_to_xyxy(pred_boxes.astype(jnp.float32))  # [..., 4]
  target = box_cxcywh_to_xyxy(target_boxes.astype(jnp.float32))  # [..., 4]
  return 1.0 - aligned_generalized_box_iou(pred, target, union_eps, hull_eps)  # [...]


def box_iou_bce_loss(iou_logits: jax.Array,
                     pred_boxes: jax.Array,
                     target_boxes: jax.Array) -> jax.Array:
  """BCE of the IoU head against the (gradient-free) IoU of predicted and target boxes.

  Args:
    iou_logits: `[...]` IoU-head logits.
    pred_boxes: `[..., 4]` predicted boxes (cxcywh).
    target_boxes: `[..., 4]` target boxes (cxcywh).

  Returns:
    `[...]` `BCEWithLogits(iou_logit, IoU(pred, target))`.

  Raises:
    ValueError: on inconsistent shapes.
  """
  _check('box_iou_bce_loss', pred_boxes, target_boxes)
  if iou_logits.shape != pred_boxes.shape[:-1]:
    raise ValueError(f'box_iou_bce_loss: iou_logits must be {pred_boxes.shape[:-1]}, got '
                     f'{iou_logits.shape}')
  iou = aligned_box_iou(box_cxcywh_to_xyxy(pred_boxes.astype(jnp.float32)),
                        box_cxcywh_to_xyxy(target_boxes.astype(jnp.float32)))  # [...]
  iou = jax.lax.stop_gradient(iou)  # [...]
  logits = iou_logits.astype(jnp.float32)  # [...]
  return iou * jax.nn.softplus(-logits) + (1.0 - iou) * jax.nn.softplus(logits)  # [...]
