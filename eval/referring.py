"""Referring segmentation and comprehension metrics.

Masks (one prediction per expression; LAVT / HIPIE conventions):
  * oIoU = Σ_i |P_i ∩ G_i| / Σ_i |P_i ∪ G_i| over all expressions (overall IoU);
  * mIoU = mean_i |P_i ∩ G_i| / |P_i ∪ G_i|, an expression with an empty union scoring 0;
  * Prec@t = fraction of expressions with mask IoU ≥ t, t in 0.5, 0.6, 0.7, 0.8, 0.9.
Boxes: P@0.5 = fraction of expressions whose predicted box has IoU ≥ 0.5 with the ground-truth
box (boxes COCO [x, y, w, h] in continuous pixel coordinates, IoU = area(∩) / area(∪)).
All values are percentages. No expression gives 0 everywhere.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def referring_masks(gt_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray]) -> dict:
  """oIoU, mIoU and Prec@t of referring segmentation.

  Args:
    gt_masks: per expression, bool [H_i, W_i].
    pred_masks: per expression, bool [H_i, W_i] (same sizes).

  Returns:
    {"oIoU", "mIoU", "Prec@0.5", ..., "Prec@0.9", "num_expressions"}.

  Raises:
    ValueError: naming the expression index for a count or size mismatch.
  """
  if len(gt_masks) != len(pred_masks):
    raise ValueError(f"{len(pred_masks)} predicted masks for {len(gt_masks)} expressions")
  inter_sum = union_sum = 0
  ious = []
  for i, (g, p) in enumerate(zip(gt_masks, pred_masks)):
    g = np.asarray(g, bool)  # [H, W]
    p = np.asarray(p, bool)  # [H, W]
    if g.shape != p.shape:
      raise ValueError(f"expression {i}: predicted mask {p.shape} differs from ground truth "
                       f"{g.shape}")
    inter = int(np.count_nonzero(g & p))
    union = int(np.count_nonzero(g | p))
    inter_sum += inter
    union_sum += union
    ious.append(inter / union if union > 0 else 0.0)
  out = {"num_expressions": len(ious)}
  out["oIoU"] = 100.0 * inter_sum / union_sum if union_sum > 0 else 0.0
  out["mIoU"] = 100.0 * float(np.mean(ious)) if ious else 0.0
  for t in PREC_THRESHOLDS:
    out[f"Prec@{t}"] = 100.0 * float(np.mean([iou >= t for iou in ious])) if ious else 0.0
  return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Element-wise IoU of COCO boxes.

  Args:
    a: float [N, 4] boxes [x, y, w, h].
    b: float [N, 4] boxes [x, y, w, h].

  Returns:
    float64 [N] IoUs (0 where the union is empty).
  """
  a = np.asarray(a, np.float64).reshape(-1, 4)  # [N, 4]
  b = np.asarray(b, np.float64).reshape(-1, 4)  # [N, 4]
  lt = np.maximum(a[:, :2], b[:, :2])  # [N, 2]
  rb = np.minimum(a[:, :2] + a[:, 2:], b[:, :2] + b[:, 2:])  # [N, 2]
  wh = np.clip(rb - lt, 0, None)  # [N, 2]
  inter = wh[:, 0] * wh[:, 1]  # [N]
  union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter  # [N]
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)  # [N]


def referring_boxes(gt_boxes: np.ndarray, pred_boxes: np.ndarray) -> dict:
  """P@0.5 of referring expression comprehension.

  Args:
    gt_boxes: float [N, 4] ground-truth boxes [x, y, w, h].
    pred_boxes: float [N, 4] predicted boxes [x, y, w, h].

  Returns:
    {"P@0.5", "num_expressions"}.

  Raises:
    ValueError: for a count mismatch.
  """
  gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)  # [N, 4]
  pred_boxes = np.asarray(pred_boxes, np.float64).reshape(-1, 4)  # [N, 4]
  if gt_boxes.shape != pred_boxes.shape:
    raise ValueError(f"{len(pred_boxes)} predicted boxes for {len(gt_boxes)} expressions")
  if len(gt_boxes) == 0:
    return {"P@0.5": 0.0, "num_expressions": 0}
  hits = box_iou(gt_boxes, pred_boxes) >= 0.5  # [N]
  return {"P@0.5": 100.0 * float(hits.mean()), "num_expressions": int(len(gt_boxes))}
