"""COCO AP/AR wrapper against pycocotools run directly on the same inputs (tolerance 1e-6 rel)."""

import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from eval.coco_eval import STAT_NAMES, class_agnostic, coco_evaluate
from eval.writers import coco_instance_results, encode_mask


def _data():
  rng = np.random.default_rng(0)
  images, anns, results = [], [], []
  for image_id in (1, 2, 3):
    images.append({"id": image_id, "height": 64, "width": 80})
    for k in range(6):
      y, x = rng.integers(0, 40), rng.integers(0, 50)
      h, w = rng.integers(4, 24), rng.integers(4, 30)
      m = np.zeros([64, 80], bool)
      m[y:y + h, x:x + w] = True
      rle = encode_mask(m)
      anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(k % 3 + 1),
                   "segmentation": rle, "area": float(m.sum()), "bbox": [float(x), float(y),
                                                                         float(w), float(h)],
                   "iscrowd": int(k == 5 and image_id == 2)})
      if k == 4:
        continue
      p = np.roll(m, int(rng.integers(-3, 4)), axis=int(rng.integers(0, 2)))
      cat = int(k % 3 + 1) if k != 3 else int((k + 1) % 3 + 1)
      results += coco_instance_results(image_id, p[None], [rng.uniform(0.1, 1)], [cat])
    fp = np.zeros([64, 80], bool)
    fp[50:60, 60:75] = True
    results += coco_instance_results(image_id, fp[None], [0.9], [2])
  gt = {"images": images, "annotations": anns,
        "categories": [{"id": i, "name": str(i)} for i in (1, 2, 3)]}
  return gt, results


def _direct(gt, results, iou_type):
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    coco.createIndex()
    if iou_type == "segm":
      results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    dt = coco.loadRes(copy.deepcopy(results))
    ev = COCOeval(coco, dt, iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return dict(zip(STAT_NAMES, ev.stats))


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
@pytest.mark.parametrize("agnostic", [False, True])
def test_equals_pycocotools(iou_type, agnostic):
  gt, results = _data()
  ours = coco_evaluate(gt, results, iou_type, class_agnostic_eval=agnostic)
  ref = _direct(*(class_agnostic(gt, results) if agnostic else (gt, results)), iou_type)
  assert 0.05 < ref["AP"] < 0.95
  for k in STAT_NAMES:
    assert ours[k] == pytest.approx(ref[k], rel=1e-6), k


def test_class_agnostic_differs_from_class_aware():
  gt, results = _data()
  assert coco_evaluate(gt, results, class_agnostic_eval=True)["AP"] > coco_evaluate(
      gt, results)["AP"]


def test_unknown_image_and_category(tmp_path):
  gt, results = _data()
  bad = copy.deepcopy(results)
  bad[0]["image_id"] = 99
  with pytest.raises(KeyError, match="image id 99"):
    coco_evaluate(gt, bad)
  bad = copy.deepcopy(results)
  bad[0]["category_id"] = 7
  with pytest.raises(KeyError, match="category_id 7"):
    coco_evaluate(gt, bad)


def test_empty_results_zero():
  gt, _ = _data()
  out = coco_evaluate(gt, [])
  assert out["AP"] == 0.0 and out["AR@100"] == 0.0
