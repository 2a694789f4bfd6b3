"""Computes tests/reference/reference_numbers.json with the official evaluators.

The evaluators cannot live beside our pins (panopticapi-lite pins numpy < 2, panoptic_parts
needs ruamel.yaml / scikit-learn and a Python-version workaround, OpenPSG needs mmcv / mmdet),
so this script runs in a separate virtual environment (tests/reference/README.md):

  python -m venv /tmp/h3/refenv
  /tmp/h3/refenv/bin/pip install panopticapi-lite "numpy<2" pillow panoptic-parts==2.0rc6 \
      ruamel.yaml scikit-learn terminaltables
  /tmp/h3/refenv/bin/python tests/reference/compute_reference_numbers.py \
      --openpsg /path/to/OpenPSG   # a checkout of github.com/Jingkang50/OpenPSG

* PQ: panopticapi.evaluation.pq_compute on data/pq_coco (the real COCO fixture against itself
  and against perturbed predictions) and data/pq_synth;
* PartPQ: panoptic_parts.evaluation.eval_PartPQ.evaluate with ppq_ppp_59_57_cvpr21_default on
  data/partpq;
* PSG: OpenPSG's own openpsg/evaluation/sgg_eval.py (mode sgdet, detection_method pan_seg,
  iou_thrs 0.5) on data/psg. Its unused heavy imports (mmcv's print_log / ProgressBar, mmdet's
  bbox_overlaps for boxes, torch) are replaced by stubs; the ground truth and predictions are
  built as OpenPSG's dataset `evaluate` and tools/grade.py `load_results` build them (without
  grade.py's cut to 20 triplets, so R@50 / R@100 are meaningful).
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import tempfile
import types

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
FIXTURE = os.path.abspath(os.path.join(HERE, "..", "..", "..", "shared", "fixtures",
                                       "coco_panoptic_sample"))
sys.path.insert(0, HERE)

from refenv_import import import_panoptic_parts  # pylint: disable=wrong-import-position


def _strip(result):
  """JSON-friendly copy of a panopticapi / panoptic_parts result."""
  return json.loads(json.dumps(result, default=float))


def pq_numbers():
  """panopticapi numbers."""
  from panopticapi.evaluation import pq_compute  # pylint: disable=import-outside-toplevel
  gt_json = os.path.join(FIXTURE, "panoptic_examples.json")
  gt_folder = os.path.join(FIXTURE, "panoptic_examples")
  out = {}
  with contextlib.redirect_stdout(io.StringIO()):
    out["coco_self"] = pq_compute(gt_json, gt_json, gt_folder, gt_folder)
    out["coco_perturbed"] = pq_compute(gt_json, os.path.join(DATA, "pq_coco", "pred.json"),
                                       gt_folder, os.path.join(DATA, "pq_coco", "pred"))
    out["synth"] = pq_compute(os.path.join(DATA, "pq_synth", "gt.json"),
                              os.path.join(DATA, "pq_synth", "pred.json"),
                              os.path.join(DATA, "pq_synth", "gt"),
                              os.path.join(DATA, "pq_synth", "pred"))
  for v in out.values():
    v.pop("per_class")
  return _strip(out)


def partpq_numbers():
  """panoptic_parts numbers."""
  pp = import_panoptic_parts()
  from panoptic_parts.evaluation import eval_PartPQ  # pylint: disable=import-outside-toplevel
  pkg_root = os.path.dirname(os.path.dirname(pp.__file__))
  cwd = os.getcwd()
  os.chdir(pkg_root)
  try:
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
      eval_PartPQ.evaluate(
          "panoptic_parts/specs/eval_specs/ppq_ppp_59_57_cvpr21_default_evalspec.yaml",
          os.path.join(DATA, "partpq", "gt"), os.path.join(DATA, "partpq", "pred"),
          os.path.join(DATA, "partpq", "images.json"), save_dir=tmp)
      with open(os.path.join(tmp, "ppq_ppp_59_57_cvpr21_default_results.json")) as f:
        results = json.load(f)
  finally:
    os.chdir(cwd)
  summary = {}
  for d in results[0]:
    summary.update(d)
  return _strip(summary)


def _load_openpsg(openpsg_root):
  """Imports OpenPSG's evaluation package with stubs for its unused heavy imports."""
  stubs = {
      "torch": types.ModuleType("torch"),
      "mmcv": types.ModuleType("mmcv"),
      "mmcv.utils": types.ModuleType("mmcv.utils"),
      "mmdet": types.ModuleType("mmdet"),
      "mmdet.core": types.ModuleType("mmdet.core"),
  }

  class _Bar:
    def __init__(self, *_):
      pass

    def update(self):
      pass

  stubs["mmcv"].ProgressBar = _Bar
  stubs["mmcv.utils"].print_log = lambda *a, **k: None
  stubs["mmcv"].utils = stubs["mmcv.utils"]

  def _no_boxes(*_):
    raise RuntimeError("bbox_overlaps is only used for detection_method='bbox'")

  stubs["mmdet.core"].bbox_overlaps = _no_boxes
  sys.modules.update(stubs)
  pkg = types.ModuleType("openpsg")
  pkg.__path__ = [os.path.join(openpsg_root, "openpsg")]
  sys.modules["openpsg"] = pkg
  ev = types.ModuleType("openpsg.evaluation")
  ev.__path__ = [os.path.join(openpsg_root, "openpsg", "evaluation")]
  sys.modules["openpsg.evaluation"] = ev
  for name in ("sgg_eval_util", "sgg_metrics", "sgg_eval"):
    spec = importlib.util.spec_from_file_location(
        f"openpsg.evaluation.{name}", os.path.join(openpsg_root, "openpsg", "evaluation",
                                                    name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"openpsg.evaluation.{name}"] = mod
    spec.loader.exec_module(mod)
  return sys.modules["openpsg.evaluation.sgg_eval"]


class _Result:
  """Stands in for openpsg.models.relation_heads.approaches.Result (attributes only)."""

  def __init__(self, **kwargs):
    self.refine_bboxes = None
    for k, v in kwargs.items():
      setattr(self, k, v)


def _ids(path):
  rgb = np.array(Image.open(path).convert("RGB")).astype(np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def psg_numbers(openpsg_root):
  """OpenPSG numbers."""
  sgg_eval = _load_openpsg(openpsg_root)
  root = os.path.join(DATA, "psg")
  with open(os.path.join(root, "psg.json")) as f:
    d = json.load(f)
  test_ids = set(d["test_image_ids"])
  gts, gt_ids = [], []
  for e in d["data"]:
    if not e["relations"] or e["image_id"] not in test_ids:
      continue
    rels = []
    for s, o, p in e["relations"]:
      if (s, o, p + 1) not in rels:
        rels.append((s, o, p + 1))
    rels = np.array(rels, np.int32)
    seg = _ids(os.path.join(root, "gt", e["pan_seg_file_name"]))
    gts.append(_Result(
        labels=np.array([a["category_id"] for a in e["annotations"]], np.int64) + 1,
        rels=rels, rel_pair_idxes=rels[:, :2], rel_labels=rels[:, -1],
        masks=[seg == s["id"] for s in e["segments_info"]], bboxes=np.zeros([0, 4])))
    gt_ids.append(e["image_id"])
  with open(os.path.join(root, "submission", "relation.json")) as f:
    entries = {e["image_id"]: e for e in json.load(f)}
  preds = []
  for image_id in gt_ids:
    e = entries[image_id]
    seg = _ids(os.path.join(root, "submission", "panseg", e["pan_seg_file_name"]))
    rel_array = np.asarray(e["relations"])
    rel_dists = np.zeros((len(rel_array), len(d["predicate_classes"]) + 1))
    for i, rel in enumerate(rel_array):
      rel_dists[i, rel[2]] += 1
    preds.append(_Result(
        rels=rel_array, rel_pair_idxes=rel_array[:, :2],
        masks=np.array([seg == s["id"] for s in e["segments_info"]]),
        labels=np.asarray([s["category_id"] for s in e["segments_info"]]),
        rel_dists=rel_dists, refine_bboxes=np.ones((len(e["segments_info"]), 5))))
  with contextlib.redirect_stdout(io.StringIO()):
    res = sgg_eval.sgg_evaluation(
        ["sgdet"], groundtruths=gts, predictions=preds, iou_thrs=0.5, logger=None,
        ind_to_predicates=["__background__"] + d["predicate_classes"],
        detection_method="pan_seg")
  out = {}
  for k in (20, 50, 100):
    out[f"R@{k}"] = 100.0 * float(res[f"sgdet_recall_R_{k}"])
    out[f"mR@{k}"] = 100.0 * float(res[f"sgdet_mean_recall_mR_{k}"])
  return out


def main():
  """Writes reference_numbers.json."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--openpsg", required=True, help="OpenPSG checkout (has openpsg/evaluation)")
  parser.add_argument("--out", default=os.path.join(HERE, "reference_numbers.json"))
  args = parser.parse_args()
  numbers = {"pq": pq_numbers(), "partpq": partpq_numbers(), "psg": psg_numbers(args.openpsg)}
  with open(args.out, "w") as f:
    json.dump(numbers, f, indent=1, sort_keys=True)
  print(json.dumps(numbers, indent=1, sort_keys=True))


if __name__ == "__main__":
  main()
