"""Panoptic quality (PQ, SQ, RQ) with the semantics of cocodataset/panopticapi `pq_compute`.

Per image, with VOID = segment id 0 in the ground-truth PNG:
  * a (ground truth, prediction) pair of the same category is a true positive when
    IoU = |g ∩ p| / (|p| + |g| − |g ∩ p| − |VOID ∩ p|) > 0.5; crowd ground truth (`iscrowd` 1)
    never matches. |g| is the ground truth's `area` from its JSON (as panopticapi reads it) and
    |p| is the prediction's pixel count in its PNG;
  * an unmatched non-crowd ground-truth segment is a false negative;
  * an unmatched predicted segment is a false positive unless more than half of it lies on VOID
    plus the crowd region of its category (panopticapi keeps one crowd segment per category: the
    last one listed in `segments_info`);
  * ground-truth ids in the PNG that `segments_info` does not list are neither VOID nor matched.
Per category PQ = Σ IoU(TP) / (TP + ½FP + ½FN), SQ = Σ IoU / TP (0 without TP), RQ = TP / (TP +
½FP + ½FN); All / Things / Stuff average over the ground truth's categories with TP + FP + FN > 0.
Where no category qualifies (e.g. stuff in a things-only dataset) the averages are 0 with n = 0
(panopticapi divides by zero there). Results are fractions in [0, 1], keyed like panopticapi's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from eval.panoptic_png import read_id_png

OFFSET = 256 * 256 * 256
VOID = 0


@dataclasses.dataclass
class CategoryStat:
  """Accumulated matches of one category.

  Attributes:
    iou: sum of IoUs of true positives.
    tp: true positives.
    fp: false positives.
    fn: false negatives.
  """

  iou: float = 0.0
  tp: int = 0
  fp: int = 0
  fn: int = 0


def _segments_by_id(segments_info: Sequence[Mapping[str, Any]], where: str) -> dict[int, dict]:
  """Indexes `segments_info` by id, refusing duplicates."""
  out = {}
  for seg in segments_info:
    sid = int(seg["id"])
    if sid in out:
      raise ValueError(f"{where}: segment id {sid} appears twice in segments_info")
    out[sid] = dict(seg)
  return out


def pq_image_stats(gt_ids: np.ndarray, gt_segments: Sequence[Mapping[str, Any]],
                   pred_ids: np.ndarray, pred_segments: Sequence[Mapping[str, Any]],
                   categories: Mapping[int, Mapping[str, Any]], where: str,
                   stats: dict[int, CategoryStat]) -> None:
  """Adds one image's matches to `stats`.

  Args:
    gt_ids: uint32 [H, W] ground-truth segment ids (0 = VOID).
    gt_segments: the ground truth's `segments_info` (id, category_id, iscrowd, area).
    pred_ids: uint32 [H, W] predicted segment ids (0 = unassigned).
    pred_segments: the prediction's `segments_info` (id, category_id).
    categories: ground-truth categories by id.
    where: text naming the image and files, used in error messages.
    stats: per-category statistics, updated in place.

  Raises:
    ValueError / KeyError: naming `where` and the id, for duplicated segment ids, ids in the PNG
      and not in the JSON (or the reverse), and categories missing from the ground truth.
  """
  if gt_ids.shape != pred_ids.shape:
    raise ValueError(f"{where}: prediction size {pred_ids.shape} differs from ground truth "
                     f"{gt_ids.shape}")
  gt_segms = _segments_by_id(gt_segments, f"{where} (ground truth)")
  pred_segms = _segments_by_id(pred_segments, f"{where} (prediction)")
  for seg in gt_segms.values():
    if seg["category_id"] not in categories:
      raise KeyError(f"{where}: ground-truth segment {seg['id']} has category_id "
                     f"{seg['category_id']}, which the ground-truth categories do not define")
    if "area" not in seg:
      seg["area"] = int(np.count_nonzero(gt_ids == seg["id"]))
  labels, counts = np.unique(pred_ids, return_counts=True)  # [K], [K]
  unseen = set(pred_segms)
  for label, count in zip(labels.tolist(), counts.tolist()):
    if label not in pred_segms:
      if label == VOID:
        continue
      raise KeyError(f"{where}: segment id {label} is in the prediction PNG but not in its JSON")
    pred_segms[label]["area"] = count
    unseen.discard(label)
    if pred_segms[label]["category_id"] not in categories:
      raise KeyError(f"{where}: predicted segment {label} has category_id "
                     f"{pred_segms[label]['category_id']}, which the ground truth does not define")
  if unseen:
    raise KeyError(f"{where}: segment ids {sorted(unseen)} are in the prediction JSON but not in "
                   f"its PNG")

  joint = gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64)  # [H, W]
  pair_labels, pair_counts = np.unique(joint, return_counts=True)  # [P], [P]
  inter = {(int(l // OFFSET), int(l % OFFSET)): int(c)
           for l, c in zip(pair_labels.tolist(), pair_counts.tolist())}

  gt_matched, pred_matched = set(), set()
  for (gt_label, pred_label), intersection in inter.items():
    if gt_label not in gt_segms or pred_label not in pred_segms:
      continue
    gt, pred = gt_segms[gt_label], pred_segms[pred_label]
    if gt.get("iscrowd", 0) == 1 or gt["category_id"] != pred["category_id"]:
      continue
    union = (pred["area"] + gt["area"] - intersection - inter.get((VOID, pred_label), 0))
    iou = intersection / union
    if iou > 0.5:
      stat = stats.setdefault(gt["category_id"], CategoryStat())
      stat.tp += 1
      stat.iou += iou
      gt_matched.add(gt_label)
      pred_matched.add(pred_label)

  crowd_by_category = {}
  for gt_label, gt in gt_segms.items():
    if gt_label in gt_matched:
      continue
    if gt.get("iscrowd", 0) == 1:
      crowd_by_category[gt["category_id"]] = gt_label
      continue
    stats.setdefault(gt["category_id"], CategoryStat()).fn += 1

  for pred_label, pred in pred_segms.items():
    if pred_label in pred_matched:
      continue
    ignored = inter.get((VOID, pred_label), 0)
    if pred["category_id"] in crowd_by_category:
      ignored += inter.get((crowd_by_category[pred["category_id"]], pred_label), 0)
    if ignored / pred["area"] > 0.5:
      continue
    stats.setdefault(pred["category_id"], CategoryStat()).fp += 1


def pq_average(stats: Mapping[int, CategoryStat], categories: Mapping[int, Mapping[str, Any]],
               isthing: bool | None) -> tuple[dict, dict]:
  """Averages per-category statistics.

  Args:
    stats: per-category statistics.
    categories: ground-truth categories by id (with `isthing`).
    isthing: True for things, False for stuff, None for all.

  Returns:
    ({"pq", "sq", "rq", "n"}, per-class {"pq", "sq", "rq"} by category id).
  """
  pq = sq = rq = 0.0
  n = 0
  per_class = {}
  for cat_id, info in categories.items():
    if isthing is not None and (info.get("isthing", 0) == 1) != isthing:
      continue
    s = stats.get(cat_id, CategoryStat())
    if s.tp + s.fp + s.fn == 0:
      per_class[cat_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
      continue
    n += 1
    denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
    c_pq, c_sq, c_rq = s.iou / denom, (s.iou / s.tp if s.tp else 0.0), s.tp / denom
    per_class[cat_id] = {"pq": c_pq, "sq": c_sq, "rq": c_rq}
    pq, sq, rq = pq + c_pq, sq + c_sq, rq + c_rq
  if n == 0:
    return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
  return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def pq_compute(gt_json_file: str, pred_json_file: str, gt_folder: str | None = None,
               pred_folder: str | None = None) -> dict:
  """Computes PQ / SQ / RQ from COCO panoptic files, as panopticapi's `pq_compute` does.

  Args:
    gt_json_file: ground-truth panoptic JSON (`annotations`, `categories`).
    pred_json_file: predicted panoptic JSON (`annotations` with `image_id`, `file_name`,
      `segments_info`).
    gt_folder: ground-truth PNG folder (default: `gt_json_file` without `.json`).
    pred_folder: predicted PNG folder (default: `pred_json_file` without `.json`).

  Returns:
    {"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category_id: {...}}}.

  Raises:
    FileNotFoundError / ValueError / KeyError: naming the file and id for missing folders or
      PNGs, predictions for unknown image ids, images without a prediction, PNG sizes that differ
      from the ground truth, duplicated segment ids and unknown categories.
  """
  with open(gt_json_file) as f:
    gt_json = json.load(f)
  with open(pred_json_file) as f:
    pred_json = json.load(f)
  gt_folder = gt_folder if gt_folder is not None else gt_json_file.replace(".json", "")
  pred_folder = pred_folder if pred_folder is not None else pred_json_file.replace(".json", "")
  for folder in (gt_folder, pred_folder):
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"panoptic PNG folder {folder} does not exist")
  categories = {int(c["id"]): c for c in gt_json["categories"]}
  gt_image_ids = {a["image_id"] for a in gt_json["annotations"]}
  pred_annotations = {}
  for ann in pred_json["annotations"]:
    if ann["image_id"] not in gt_image_ids:
      raise KeyError(f"{pred_json_file}: prediction for image id {ann['image_id']}, which "
                     f"{gt_json_file} does not have")
    if ann["image_id"] in pred_annotations:
      raise ValueError(f"{pred_json_file}: image id {ann['image_id']} has two predictions")
    pred_annotations[ann["image_id"]] = ann

  stats: dict[int, CategoryStat] = {}
  for gt_ann in gt_json["annotations"]:
    image_id = gt_ann["image_id"]
    if image_id not in pred_annotations:
      raise KeyError(f"{pred_json_file}: no prediction for image id {image_id}")
    pred_ann = pred_annotations[image_id]
    gt_png = os.path.join(gt_folder, gt_ann["file_name"])
    pred_png = os.path.join(pred_folder, pred_ann["file_name"])
    gt_ids = read_id_png(gt_png)
    pred_ids = read_id_png(pred_png, expected_hw=gt_ids.shape)
    pq_image_stats(gt_ids, gt_ann["segments_info"], pred_ids, pred_ann["segments_info"],
                   categories, f"image id {image_id} ({pred_json_file}, {pred_png})", stats)

  results = {}
  for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
    results[name], per_class = pq_average(stats, categories, isthing)
    if name == "All":
      results["per_class"] = per_class
  return results
