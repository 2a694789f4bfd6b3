"""Semantic segmentation mIoU (detectron2 `SemSegEvaluator` semantics) and mIoU_PartS.

Confusion matrix C [K+1, K+1]: rows are predictions, columns ground truth, and the last column
collects ignored ground-truth pixels (so they never count). Per class k: TP = C[k, k],
|GT_k| = Σ_rows C[:K, k], |P_k| = Σ_cols C[k, :K], IoU_k = TP / (|GT_k| + |P_k| − TP).
mIoU = Σ_{k: |GT_k| > 0} IoU_k / #{k: |GT_k| + |P_k| > 0} (a class only predicted counts with IoU
0), fwIoU weights IoU_k by |GT_k|, mACC / pACC are the per-class / overall pixel accuracies.
Values are percentages, as detectron2 reports them.

Label conventions:
  * "ade20k": ADE20K's reduce_zero_label, ground-truth 0 (other) → ignored, label k → k − 1;
  * "pascal": labels as stored, 255 ignored (Pascal VOC / Pascal-Context training ids).
mIoU_PartS (de Geus et al., as HIPIE reports it) is this mIoU over the 58 labels 0 (background)
and 1..57 (the grouped part classes of `ppq_ppp_59_57_cvpr21_default`), 255 ignored.
"""

from __future__ import annotations

import functools
import json
from typing import Iterable

import numpy as np

from eval.part_pq import SPEC_PATH, decode_gt, load_spec

IGNORE = 255
NUM_PART_CLASSES = 58


def to_train_ids(gt: np.ndarray, convention: str) -> np.ndarray:
  """Applies a dataset's ground-truth label convention.

  Args:
    gt: int [H, W] ground-truth labels as stored in the dataset's PNG.
    convention: "ade20k" (0 → 255, k → k − 1) or "pascal" (unchanged, 255 ignored).

  Returns:
    int64 [H, W] training ids with 255 for ignored pixels.

  Raises:
    ValueError: for an unknown convention.
  """
  gt = np.asarray(gt, dtype=np.int64)  # [H, W]
  if convention == "ade20k":
    return np.where(gt == 0, IGNORE, gt - 1)  # [H, W]
  if convention == "pascal":
    return gt
  raise ValueError(f"unknown label convention {convention!r}; expected 'ade20k' or 'pascal'")


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int,
                     where: str = "prediction") -> np.ndarray:
  """Accumulates one image's confusion matrix.

  Args:
    gt: int [H, W] training ids, `IGNORE` for ignored pixels.
    pred: int [H, W] predicted ids in [0, num_classes).
    num_classes: K.
    where: the file or image, for error messages.

  Returns:
    int64 [K + 1, K + 1], rows predictions, columns ground truth (last column: ignored).

  Raises:
    ValueError: naming `where` for a size mismatch or out-of-range ids.
  """
  gt = np.asarray(gt, dtype=np.int64)  # [H, W]
  pred = np.asarray(pred, dtype=np.int64)  # [H, W]
  if gt.shape != pred.shape:
    raise ValueError(f"{where}: prediction size {pred.shape} differs from ground truth {gt.shape}")
  if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
    raise ValueError(f"{where}: predicted ids must lie in [0, {num_classes}), got "
                     f"[{pred.min()}, {pred.max()}]")
  bad = (gt != IGNORE) & ((gt < 0) | (gt >= num_classes))  # [H, W]
  if bad.any():
    raise ValueError(f"{where}: ground-truth id {int(gt[bad].flat[0])} is outside [0, "
                     f"{num_classes}) and is not the ignore label {IGNORE}")
  gt = np.where(gt == IGNORE, num_classes, gt)  # [H, W]
  flat = (num_classes + 1) * pred.reshape(-1) + gt.reshape(-1)  # [H*W]
  return np.bincount(flat, minlength=(num_classes + 1) ** 2).reshape(
      num_classes + 1, num_classes + 1)  # [K+1, K+1]


def miou_from_confusion(conf: np.ndarray) -> dict:
  """Computes mIoU, fwIoU, mACC, pACC and per-class IoU from a confusion matrix.

  Args:
    conf: int [K + 1, K + 1] from `confusion_matrix` (summed over images).

  Returns:
    {"mIoU", "fwIoU", "mACC", "pACC", "IoU": [K] (NaN for classes absent from the ground truth)},
    percentages. With no ground-truth pixel at all every value is 0.
  """
  k = conf.shape[0] - 1
  tp = np.diag(conf)[:-1].astype(np.float64)  # [K]
  pos_gt = conf[:-1, :-1].sum(0).astype(np.float64)  # [K]
  pos_pred = conf[:-1, :-1].sum(1).astype(np.float64)  # [K]
  valid = pos_gt > 0  # [K]
  iou = np.full([k], np.nan)  # [K]
  acc = np.full([k], np.nan)  # [K]
  union = pos_gt + pos_pred - tp  # [K]
  iou[valid] = tp[valid] / union[valid]
  acc[valid] = tp[valid] / pos_gt[valid]
  if not valid.any():
    return {"mIoU": 0.0, "fwIoU": 0.0, "mACC": 0.0, "pACC": 0.0, "IoU": iou.tolist()}
  weights = pos_gt / pos_gt.sum()  # [K]
  return {
      "mIoU": 100 * float(iou[valid].sum() / np.count_nonzero(pos_gt + pos_pred > 0)),
      "fwIoU": 100 * float((iou[valid] * weights[valid]).sum()),
      "mACC": 100 * float(acc[valid].sum() / np.count_nonzero(valid)),
      "pACC": 100 * float(tp.sum() / pos_gt.sum()),
      "IoU": (100 * iou).tolist(),
  }


def miou(pairs: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int,
         convention: str = "pascal") -> dict:
  """mIoU over images.

  Args:
    pairs: (ground truth as stored [H, W], prediction in training ids [H, W]) per image.
    num_classes: K.
    convention: "ade20k" or "pascal" (see `to_train_ids`).

  Returns:
    See `miou_from_confusion`.
  """
  conf = np.zeros([num_classes + 1, num_classes + 1], np.int64)  # [K+1, K+1]
  for i, (gt, pred) in enumerate(pairs):
    conf += confusion_matrix(to_train_ids(gt, convention), pred, num_classes, f"image {i}")
  return miou_from_confusion(conf)


@functools.lru_cache(maxsize=None)
def _flat_part_lookup() -> np.ndarray:
  """int32 [10000]: eval sid_pid -> flat grouped part id (1..57), 0 elsewhere."""
  with open(SPEC_PATH) as f:
    flat = json.load(f)["eval_sid_pid2eval_pid_flat"]
  lut = np.zeros([10000], np.int32)  # [10000]
  for k, v in flat.items():
    lut[int(k)] = v
  return lut


def ppp_part_labels(uids: np.ndarray, where: str = "ground truth") -> np.ndarray:
  """Grouped part label map of Pascal-Panoptic-Parts uids, for mIoU_PartS.

  Pixels of a grouped part get its flat id (1..57); pixels of scene classes evaluated without
  parts, unevaluated classes and unlabeled pixels are background 0; pixels of a class with parts
  that carry no part label are ignored (255).

  Args:
    uids: int [H, W] Pascal-Panoptic-Parts uids.
    where: the file, for error messages.

  Returns:
    int64 [H, W] labels in {0..57, 255}.
  """
  spec = load_spec()
  sids, _, pids = decode_gt(uids, spec, where)  # [H, W] each
  flat = _flat_part_lookup()[np.where(pids > 0, sids * 100 + pids, 0)]  # [H, W]
  has_parts = np.isin(sids, list(spec.parts))  # [H, W]
  return np.where(has_parts & (pids == 0), IGNORE, flat).astype(np.int64)  # [H, W]


def miou_parts(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict:
  """mIoU_PartS over images.

  Args:
    pairs: (ground-truth labels [H, W] in {0..57, 255} e.g. from `ppp_part_labels`, predicted
      labels [H, W] in 0..57) per image.

  Returns:
    See `miou_from_confusion`; "mIoU" is mIoU_PartS.
  """
  return miou(pairs, NUM_PART_CLASSES, convention="pascal")
