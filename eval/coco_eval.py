"""COCO mask / box AP and AR with pycocotools, class-aware or class-agnostic."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from typing import Any, Sequence

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100", "ARs", "ARm",
              "ARl")


def _load(obj: str | dict, what: str) -> Any:
  """Reads a JSON file or passes a loaded object through."""
  if isinstance(obj, str):
    with open(obj) as f:
      return json.load(f)
  if obj is None:
    raise ValueError(f"{what} is None")
  return obj


def class_agnostic(gt: dict, results: Sequence[dict]) -> tuple[dict, list[dict]]:
  """Sets every ground-truth and predicted category to 1 (AIMS' class-agnostic evaluation).

  Args:
    gt: COCO ground-truth dict.
    results: COCO result dicts.

  Returns:
    (ground truth with one category {"id": 1, "name": "object"}, results with category_id 1).
  """
  gt = copy.deepcopy(gt)
  gt["categories"] = [{"id": 1, "name": "object", "supercategory": "object"}]
  for ann in gt["annotations"]:
    ann["category_id"] = 1
  return gt, [dict(r, category_id=1) for r in results]


def coco_evaluate(gt: str | dict, results: str | Sequence[dict], iou_type: str = "segm",
                  class_agnostic_eval: bool = False, gt_name: str = "ground truth",
                  results_name: str = "results") -> dict:
  """Runs pycocotools COCOeval and returns its summary as a dict.

  Args:
    gt: COCO ground-truth JSON path or dict (`images`, `annotations`, `categories`).
    results: COCO results JSON path or list (image_id, category_id, score, and `segmentation`
      RLE for "segm" or `bbox` for "bbox").
    iou_type: "segm" or "bbox".
    class_agnostic_eval: set every category to 1 first.
    gt_name: name of the ground truth in error messages (its file).
    results_name: name of the results in error messages (its file).

  Returns:
    {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100", "ARs", "ARm", "ARl"}
    as pycocotools computes them (fractions; -1 where an area range has no ground truth). With no
    result every value is 0. For "segm", results' `bbox` fields are dropped first (as detectron2
    does), so area ranges use the mask area.

  Raises:
    KeyError: naming the results file and id for a result on an image id or category id the
      ground truth does not have.
    ValueError: for an unknown iou_type.
  """
  if iou_type not in ("segm", "bbox"):
    raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
  if isinstance(gt, str):
    gt_name = gt
  if isinstance(results, str):
    results_name = results
  gt = _load(gt, "ground truth")
  results = list(_load(results, "results"))
  image_ids = {im["id"] for im in gt["images"]}
  category_ids = {c["id"] for c in gt["categories"]}
  for r in results:
    if r["image_id"] not in image_ids:
      raise KeyError(f"{results_name}: result for image id {r['image_id']}, which {gt_name} does "
                     f"not have")
    if not class_agnostic_eval and r["category_id"] not in category_ids:
      raise KeyError(f"{results_name}: result on image id {r['image_id']} has category_id "
                     f"{r['category_id']}, which {gt_name} does not define")
  if class_agnostic_eval:
    gt, results = class_agnostic(gt, results)
  if not results:
    return {name: 0.0 for name in STAT_NAMES}
  if iou_type == "segm":
    results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(copy.deepcopy(results))
    ev = COCOeval(coco_gt, coco_dt, iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return dict(zip(STAT_NAMES, [float(s) for s in ev.stats]))
