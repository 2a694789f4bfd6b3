"""PQ against panopticapi's numbers (tests/reference/reference_numbers.json, tolerance 1e-6 rel)."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from eval import metrics
from eval.panoptic_png import id2rgb
from eval.panoptic_quality import pq_compute

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "reference", "data")
FIXTURE = os.path.join(HERE, "..", "..", "shared", "fixtures", "coco_panoptic_sample")
GT_JSON = os.path.join(FIXTURE, "panoptic_examples.json")
GT_FOLDER = os.path.join(FIXTURE, "panoptic_examples")


def _reference(name):
  with open(os.path.join(HERE, "reference", "reference_numbers.json")) as f:
    return json.load(f)["pq"][name]


def _assert_close(ours, ref):
  for group in ("All", "Things", "Stuff"):
    assert ours[group]["n"] == ref[group]["n"], group
    for k in ("pq", "sq", "rq"):
      assert ours[group][k] == pytest.approx(ref[group][k], rel=1e-6, abs=1e-12), (group, k)


def test_fixture_against_itself_is_100(capsys):
  out = metrics.main(["pq", "--gt_json_file", GT_JSON, "--pred_json_file", GT_JSON,
                      "--gt_folder", GT_FOLDER, "--pred_folder", GT_FOLDER])
  printed = json.loads(capsys.readouterr().out)
  assert printed["All"]["pq"] == 1.0 and out["All"]["pq"] == 1.0
  assert printed["summary"]["All"] == {"PQ": 100.0, "SQ": 100.0, "RQ": 100.0,
                                       "N": out["All"]["n"]}
  _assert_close(out, _reference("coco_self"))


def test_fixture_perturbed_equals_panopticapi():
  out = pq_compute(GT_JSON, os.path.join(DATA, "pq_coco", "pred.json"), GT_FOLDER,
                   os.path.join(DATA, "pq_coco", "pred"))
  ref = _reference("coco_perturbed")
  assert ref["All"]["pq"] < 0.9
  _assert_close(out, ref)


def test_synthetic_crowd_void_equals_panopticapi():
  out = pq_compute(os.path.join(DATA, "pq_synth", "gt.json"),
                   os.path.join(DATA, "pq_synth", "pred.json"))
  _assert_close(out, _reference("synth"))


def _copy_pred(tmp_path):
  dst = tmp_path / "pred"
  shutil.copytree(os.path.join(DATA, "pq_synth", "pred"), dst)
  with open(os.path.join(DATA, "pq_synth", "pred.json")) as f:
    pred = json.load(f)
  return dst, pred


def _run(tmp_path, pred):
  path = tmp_path / "pred.json"
  path.write_text(json.dumps(pred))
  return pq_compute(os.path.join(DATA, "pq_synth", "gt.json"), str(path),
                    os.path.join(DATA, "pq_synth", "gt"), str(tmp_path / "pred"))


def test_unknown_image_id(tmp_path):
  _, pred = _copy_pred(tmp_path)
  pred["annotations"][0]["image_id"] = 77
  with pytest.raises(KeyError, match="image id 77"):
    _run(tmp_path, pred)


def test_png_size_mismatch(tmp_path):
  folder, pred = _copy_pred(tmp_path)
  Image.fromarray(np.zeros([10, 10, 3], np.uint8)).save(folder / "000001.png")
  with pytest.raises(ValueError, match="000001.png.*size"):
    _run(tmp_path, pred)


def test_duplicated_segment_id(tmp_path):
  _, pred = _copy_pred(tmp_path)
  infos = pred["annotations"][1]["segments_info"]
  infos.append(dict(infos[0]))
  with pytest.raises(ValueError, match=f"segment id {infos[0]['id']} appears twice"):
    _run(tmp_path, pred)


def test_unknown_category(tmp_path):
  _, pred = _copy_pred(tmp_path)
  pred["annotations"][2]["segments_info"][0]["category_id"] = 42
  with pytest.raises(KeyError, match="category_id 42"):
    _run(tmp_path, pred)


def test_empty_prediction_is_zero(tmp_path):
  (tmp_path / "pred").mkdir()
  with open(os.path.join(DATA, "pq_synth", "gt.json")) as f:
    gt = json.load(f)
  annotations = []
  for ann in gt["annotations"]:
    Image.fromarray(id2rgb(np.zeros([48, 64], np.int64))).save(tmp_path / "pred" /
                                                                ann["file_name"])
    annotations.append(dict(image_id=ann["image_id"], file_name=ann["file_name"],
                            segments_info=[]))
  out = _run(tmp_path, {"annotations": annotations})
  assert out["All"]["pq"] == 0.0 and out["All"]["rq"] == 0.0 and out["All"]["n"] == 4
