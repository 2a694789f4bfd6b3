"""AIMS cross-level association recall AR@100 (AR_ep for entity–part, AR_re for relation–entity).

Definition (AIMS Sec. 4 gives only the name; this is ours, stated precisely):
  * A ground-truth association is a pair (h, l) of a higher-level mask h and a lower-level mask l:
    (entity, one of its parts) for AR_ep, (relation, one of its two entities) for AR_re.
  * A prediction is a set of scored pairs (i, j) of a predicted higher-level mask i and a
    predicted lower-level mask j. By default (`pair_scores`) every (i, j) is a candidate with score
    A[i, j] · s_i · s_j, the association probability times both mask scores; callers may pass any
    pair list and scores instead. Per image only the `max_pairs` (100) highest-scoring pairs are
    kept (stable sort: ties keep the given order).
  * At IoU threshold t a ground-truth pair (h, l) is recalled when some kept pair (i, j) has
    IoU(h, i) ≥ t and IoU(l, j) ≥ t. A kept pair may recall several ground-truth pairs (no
    one-to-one assignment, unlike COCO AR; the association, not the masks, is what is measured).
  * Recall@t = Σ_images recalled pairs / Σ_images ground-truth pairs (micro average over all
    ground-truth pairs; images without ground-truth pairs add nothing).
  * AR@100 = mean of Recall@t over t = 0.50, 0.55, ..., 0.95, as a percentage.
With no ground-truth pair at all AR is 0 and `num_gt` 0. Mask IoU is |a ∩ b| / |a ∪ b| (0 for two
empty masks).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())


@dataclasses.dataclass
class AssociationImage:
  """Ground truth and prediction of one image for one pair of levels.

  Attributes:
    gt_high: bool [Gh, H, W] ground-truth higher-level masks (entities or relations).
    gt_low: bool [Gl, H, W] ground-truth lower-level masks (parts or entities).
    gt_pairs: int [K, 2] (index into gt_high, index into gt_low).
    pred_high: bool [Ph, H, W] predicted higher-level masks.
    pred_low: bool [Pl, H, W] predicted lower-level masks.
    pred_pairs: int [Q, 2] (index into pred_high, index into pred_low).
    pred_scores: float [Q] pair scores.
  """

  gt_high: np.ndarray
  gt_low: np.ndarray
  gt_pairs: np.ndarray
  pred_high: np.ndarray
  pred_low: np.ndarray
  pred_pairs: np.ndarray
  pred_scores: np.ndarray


def pair_scores(assoc: np.ndarray, score_high: np.ndarray,
                score_low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Default pair scores: association probability × both mask scores, for every pair.

  Args:
    assoc: float [Ph, Pl] association probabilities (e.g. sigmoid of A_EP or A_RE).
    score_high: float [Ph] higher-level mask scores.
    score_low: float [Pl] lower-level mask scores.

  Returns:
    (pairs int [Ph·Pl, 2], scores float [Ph·Pl]), row-major over (i, j).
  """
  assoc = np.asarray(assoc, np.float64)  # [Ph, Pl]
  scores = assoc * np.asarray(score_high, np.float64)[:, None] * np.asarray(
      score_low, np.float64)[None, :]  # [Ph, Pl]
  ii, jj = np.meshgrid(np.arange(assoc.shape[0]), np.arange(assoc.shape[1]), indexing="ij")
  pairs = np.stack([ii.reshape(-1), jj.reshape(-1)], axis=1)  # [Ph*Pl, 2]
  return pairs, scores.reshape(-1)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU between every mask of `a` [A, H, W] and `b` [B, H, W] -> [A, B]."""
  fa = a.reshape(a.shape[0], -1).astype(np.float32)  # [A, HW]
  fb = b.reshape(b.shape[0], -1).astype(np.float32)  # [B, HW]
  inter = (fa @ fb.T).astype(np.float64)  # [A, B]
  union = fa.sum(1, dtype=np.float64)[:, None] + fb.sum(1, dtype=np.float64)[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)  # [A, B]


def image_recalled(image: AssociationImage, max_pairs: int = 100,
                   thresholds: Sequence[float] = THRESHOLDS) -> np.ndarray:
  """Which ground-truth pairs of one image are recalled at each threshold.

  Args:
    image: one image's ground truth and prediction.
    max_pairs: predicted pairs kept (by score).
    thresholds: IoU thresholds.

  Returns:
    bool [T, K].

  Raises:
    ValueError: for pair indices out of range, mismatched score counts or mask sizes.
  """
  gt_pairs = np.asarray(image.gt_pairs, np.int64).reshape(-1, 2)  # [K, 2]
  pred_pairs = np.asarray(image.pred_pairs, np.int64).reshape(-1, 2)  # [Q, 2]
  scores = np.asarray(image.pred_scores, np.float64).reshape(-1)  # [Q]
  if len(scores) != len(pred_pairs):
    raise ValueError(f"{len(scores)} scores for {len(pred_pairs)} predicted pairs")
  for name, pairs, hi, lo in (("ground-truth", gt_pairs, image.gt_high, image.gt_low),
                              ("predicted", pred_pairs, image.pred_high, image.pred_low)):
    if len(pairs) and (pairs.min() < 0 or pairs[:, 0].max() >= len(hi)
                       or pairs[:, 1].max() >= len(lo)):
      raise ValueError(f"a {name} pair indexes a mask that does not exist ({len(hi)} higher, "
                       f"{len(lo)} lower masks)")
  out = np.zeros([len(thresholds), len(gt_pairs)], bool)  # [T, K]
  if len(gt_pairs) == 0 or len(pred_pairs) == 0:
    return out
  for a, b in ((image.gt_high, image.pred_high), (image.gt_low, image.pred_low)):
    if a.shape[1:] != b.shape[1:]:
      raise ValueError(f"predicted masks {b.shape[1:]} differ in size from ground truth "
                       f"{a.shape[1:]}")
  keep = np.argsort(-scores, kind="stable")[:max_pairs]  # [Q']
  pred_pairs = pred_pairs[keep]  # [Q', 2]
  iou_high = _mask_iou(np.asarray(image.gt_high, bool), np.asarray(image.pred_high, bool))
  iou_low = _mask_iou(np.asarray(image.gt_low, bool), np.asarray(image.pred_low, bool))
  both = np.minimum(iou_high[gt_pairs[:, 0]][:, pred_pairs[:, 0]],
                    iou_low[gt_pairs[:, 1]][:, pred_pairs[:, 1]])  # [K, Q']
  best = both.max(1)  # [K]
  for ti, t in enumerate(thresholds):
    out[ti] = best >= t
  return out


def association_recall(images: Sequence[AssociationImage], max_pairs: int = 100,
                       thresholds: Sequence[float] = THRESHOLDS) -> dict:
  """AR@max_pairs over images (see the module docstring).

  Args:
    images: per image ground truth and prediction.
    max_pairs: predicted pairs kept per image.
    thresholds: IoU thresholds averaged over.

  Returns:
    {"AR": percent, "recall@t": {t: percent}, "num_gt": ground-truth pairs}.
  """
  recalled = np.zeros([len(thresholds)], np.int64)  # [T]
  num_gt = 0
  for image in images:
    r = image_recalled(image, max_pairs, thresholds)  # [T, K]
    recalled += r.sum(1)
    num_gt += r.shape[1]
  if num_gt == 0:
    return {"AR": 0.0, "recall@t": {t: 0.0 for t in thresholds}, "num_gt": 0}
  per_t = 100.0 * recalled / num_gt  # [T]
  return {"AR": float(per_t.mean()), "recall@t": dict(zip(thresholds, per_t.tolist())),
          "num_gt": num_gt}
