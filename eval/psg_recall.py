"""PSG triplet recall R@K and mean recall mR@K, as OpenPSG's `sgdet` evaluation with pan_seg.

OpenPSG rules (openpsg/evaluation/sgg_metrics.py, datasets/psg.py, tools/grade.py):
  * ground truth: images of the split with at least one relation; duplicated (subject, object,
    predicate) triplets are kept once; a segment's mask is `pan_seg == id`;
  * a prediction is a ranked list of triplets (subject index, object index, predicate) over its
    own segments; the order in the file is the ranking (no re-sorting, ties keep file order);
    with the graph constraint each (subject, object) pair carries one predicate, which our writer
    guarantees by writing the arg-max predicate per pair;
  * a predicted triplet hits a ground-truth triplet when subject class, predicate and object class
    are equal and both the subject and the object masks have IoU ≥ 0.5;
  * per image, R@K = |ground-truth triplets hit by the first K predictions| / |ground truth|;
    R@K is the mean over images;
  * mR@K: per image and predicate, hits / count among that predicate's ground truth; averaged per
    predicate over the images where it occurs, then over ALL predicate classes (a predicate that
    never occurs in the ground truth counts as 0, as in OpenPSG).
One deliberate difference: OpenPSG skips an image whose prediction has no triplet (it then does
not lower R@K); here such an image counts with recall 0, so an empty prediction set gives zero
recall instead of NaN.

File formats (OpenPSG's submission): `relation.json` is a list with one entry per image
{"image_id" (ours, optional), "relations": [[s, o, predicate]], "segments_info": [{"id",
"category_id"}], "pan_seg_file_name"}, and `panseg/<pan_seg_file_name>` a COCO panoptic PNG.
Submission category ids and predicates are 1-based (psg.json's 0-based ids + 1), as OpenPSG's
evaluator compares them; entries are matched to ground truth by `image_id`, or by order when no
entry has one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from eval.panoptic_png import read_id_png

KS = (20, 50, 100)


@dataclasses.dataclass
class PsgImage:
  """Ground truth or prediction of one image.

  Attributes:
    masks: bool [N, H, W] segment masks.
    labels: int [N] class ids (the same id space for ground truth and prediction).
    triplets: int [R, 3] (subject index, object index, predicate), ranked for predictions.
  """

  masks: np.ndarray
  labels: np.ndarray
  triplets: np.ndarray


def _mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU between every mask of `a` [A, H, W] and `b` [B, H, W] -> [A, B]."""
  fa = a.reshape(a.shape[0], -1).astype(np.float64)  # [A, HW]
  fb = b.reshape(b.shape[0], -1).astype(np.float64)  # [B, HW]
  inter = fa @ fb.T  # [A, B]
  union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter  # [A, B]
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)  # [A, B]


def image_hits(gt: PsgImage, pred: PsgImage, iou_threshold: float = 0.5) -> list[set[int]]:
  """For each predicted triplet, the ground-truth triplets it hits.

  Args:
    gt: ground truth.
    pred: prediction.
    iou_threshold: mask IoU needed for subject and object.

  Returns:
    list (one per predicted triplet) of sets of ground-truth triplet indices.
  """
  gt_t = np.asarray(gt.triplets, np.int64).reshape(-1, 3)  # [G, 3]
  pr_t = np.asarray(pred.triplets, np.int64).reshape(-1, 3)  # [P, 3]
  if len(pr_t) == 0 or len(gt_t) == 0:
    return [set() for _ in range(len(pr_t))]
  if pred.masks.shape[1:] != gt.masks.shape[1:]:
    raise ValueError(f"predicted masks {pred.masks.shape[1:]} differ in size from ground truth "
                     f"{gt.masks.shape[1:]}")
  iou = _mask_iou(np.asarray(gt.masks, bool), np.asarray(pred.masks, bool))  # [Ng, Np]
  gl, pl = np.asarray(gt.labels), np.asarray(pred.labels)
  same = ((gl[gt_t[:, 0]][:, None] == pl[pr_t[:, 0]][None, :])
          & (gt_t[:, 2][:, None] == pr_t[:, 2][None, :])
          & (gl[gt_t[:, 1]][:, None] == pl[pr_t[:, 1]][None, :]))  # [G, P]
  ok = (same & (iou[gt_t[:, 0]][:, pr_t[:, 0]] >= iou_threshold)
        & (iou[gt_t[:, 1]][:, pr_t[:, 1]] >= iou_threshold))  # [G, P]
  return [set(np.nonzero(ok[:, j])[0].tolist()) for j in range(len(pr_t))]


def psg_recall(gts: Sequence[PsgImage], preds: Sequence[PsgImage | None], num_predicates: int,
               ks: Sequence[int] = KS, iou_threshold: float = 0.5) -> dict:
  """R@K and mR@K over images.

  Args:
    gts: ground truth per image; predicates 1-based (1..num_predicates).
    preds: prediction per image (None: no prediction, recall 0), same predicate ids.
    num_predicates: number of predicate classes (56 for PSG).
    ks: the K values.
    iou_threshold: mask IoU needed for subject and object.

  Returns:
    {"R@K": percent, "mR@K": percent, for each K, "num_images"}.

  Raises:
    ValueError: for a count mismatch or a predicate outside 1..num_predicates.
  """
  if len(gts) != len(preds):
    raise ValueError(f"{len(preds)} predictions for {len(gts)} ground-truth images")
  recalls = {k: [] for k in ks}
  per_pred = {k: [[] for _ in range(num_predicates + 1)] for k in ks}
  for i, (gt, pred) in enumerate(zip(gts, preds)):
    gt_t = np.asarray(gt.triplets, np.int64).reshape(-1, 3)  # [G, 3]
    if len(gt_t) == 0:
      continue
    for t, name in ((gt_t, "ground truth"),
                    (np.asarray(pred.triplets if pred is not None else [], np.int64).reshape(-1, 3),
                     "prediction")):
      if len(t) and (t[:, 2].min() < 1 or t[:, 2].max() > num_predicates):
        raise ValueError(f"image {i}: {name} predicate ids must lie in 1..{num_predicates}")
    hits = image_hits(gt, pred, iou_threshold) if pred is not None else []
    counts = np.bincount(gt_t[:, 2], minlength=num_predicates + 1)  # [C+1]
    for k in ks:
      matched = set().union(*hits[:k]) if hits[:k] else set()
      recalls[k].append(len(matched) / len(gt_t))
      hit_counts = np.bincount(gt_t[sorted(matched), 2] if matched else np.zeros([0], np.int64),
                               minlength=num_predicates + 1)  # [C+1]
      for c in range(1, num_predicates + 1):
        if counts[c] > 0:
          per_pred[k][c].append(hit_counts[c] / counts[c])
  out = {"num_images": len(recalls[ks[0]])}
  for k in ks:
    out[f"R@{k}"] = 100.0 * float(np.mean(recalls[k])) if recalls[k] else 0.0
    means = [float(np.mean(v)) if v else 0.0 for v in per_pred[k][1:]]
    out[f"mR@{k}"] = 100.0 * float(np.mean(means))
  return out


def load_psg_ground_truth(psg_json: str, gt_folder: str, split: str = "test"):
  """Reads COCO-PSG ground truth as OpenPSG's evaluation sees it.

  Args:
    psg_json: psg.json (`data`, `test_image_ids`, `predicate_classes`).
    gt_folder: folder the entries' `pan_seg_file_name` are relative to.
    split: "test" (images in `test_image_ids`), "train" (the others) or "all".

  Returns:
    (image ids, [PsgImage] with predicates 1-based and class ids = psg.json id + 1,
    number of predicate classes).
  """
  with open(psg_json) as f:
    d = json.load(f)
  test_ids = set(d.get("test_image_ids", []))
  ids, images = [], []
  for entry in d["data"]:
    if not entry["relations"]:
      continue
    if split == "test" and entry["image_id"] not in test_ids:
      continue
    if split == "train" and entry["image_id"] in test_ids:
      continue
    png = os.path.join(gt_folder, entry["pan_seg_file_name"])
    seg = read_id_png(png)  # [H, W]
    segs = entry["segments_info"]
    seen = set()
    for s in segs:
      if s["id"] in seen:
        raise ValueError(f"{psg_json}: image {entry['image_id']} lists segment id {s['id']} twice")
      seen.add(s["id"])
    masks = np.stack([seg == s["id"] for s in segs]) if segs else np.zeros((0,) + seg.shape, bool)
    triplets = []
    for s, o, p in entry["relations"]:
      if not (0 <= s < len(segs) and 0 <= o < len(segs)):
        raise ValueError(f"{psg_json}: image {entry['image_id']} relation {[s, o, p]} indexes a "
                         f"segment it does not have ({len(segs)} segments)")
      if (s, o, p + 1) not in triplets:
        triplets.append((s, o, p + 1))
    ids.append(entry["image_id"])
    images.append(PsgImage(masks=masks,  # [N, H, W]
                           labels=np.array([s["category_id"] + 1 for s in segs], np.int64),
                           triplets=np.array(triplets, np.int64).reshape(-1, 3)))
  return ids, images, len(d["predicate_classes"])


def load_psg_predictions(pred_folder: str, image_ids: Sequence, shapes: Sequence[tuple[int, int]]):
  """Reads an OpenPSG-style submission (`relation.json` + `panseg/`).

  Args:
    pred_folder: the submission folder.
    image_ids: ground-truth image ids, in order.
    shapes: ground-truth (H, W) per image.

  Returns:
    [PsgImage | None] aligned with `image_ids` (None where the submission has no entry).

  Raises:
    KeyError / ValueError: naming the file and id for unknown image ids, duplicated entries or
      segment ids, relation indices out of range and PNG sizes that differ from the ground truth.
  """
  path = os.path.join(pred_folder, "relation.json")
  with open(path) as f:
    entries = json.load(f)
  by_id = {}
  if any("image_id" in e for e in entries):
    known = set(image_ids)
    for e in entries:
      if e.get("image_id") not in known:
        raise KeyError(f"{path}: prediction for image id {e.get('image_id')}, which the ground "
                       f"truth does not have")
      if e["image_id"] in by_id:
        raise ValueError(f"{path}: image id {e['image_id']} has two entries")
      by_id[e["image_id"]] = e
  else:
    if len(entries) != len(image_ids):
      raise ValueError(f"{path}: {len(entries)} entries without image_id for {len(image_ids)} "
                       f"ground-truth images")
    by_id = dict(zip(image_ids, entries))
  out = []
  for image_id, hw in zip(image_ids, shapes):
    e = by_id.get(image_id)
    if e is None:
      out.append(None)
      continue
    png = os.path.join(pred_folder, "panseg", e["pan_seg_file_name"])
    seg = read_id_png(png, expected_hw=hw)  # [H, W]
    segs = e["segments_info"]
    seen = set()
    for s in segs:
      if s["id"] in seen:
        raise ValueError(f"{path}: image id {image_id} lists segment id {s['id']} twice")
      seen.add(s["id"])
    rels = np.asarray(e["relations"], np.int64).reshape(-1, 3)  # [R, 3]
    if len(rels) and (rels[:, :2].min() < 0 or rels[:, :2].max() >= len(segs)):
      raise ValueError(f"{path}: image id {image_id} has a relation indexing a segment it does "
                       f"not have ({len(segs)} segments)")
    masks = np.stack([seg == s["id"] for s in segs]) if segs else np.zeros((0,) + tuple(hw), bool)
    out.append(PsgImage(masks=masks,  # [N, H, W]
                        labels=np.array([s["category_id"] for s in segs], np.int64),
                        triplets=rels))
  return out
