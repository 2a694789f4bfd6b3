"""Writers produce files the evaluators (and pycocotools loadRes) accept, with the right content."""

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from data_pipelines.records import ImageRecord, Part, Relation, Segment
from eval.coco_eval import coco_evaluate
from eval.miou import miou
from eval.panoptic_png import read_id_png
from eval.panoptic_quality import pq_compute
from eval.part_pq import read_prediction
from eval.writers import (class_agnostic_ground_truth, coco_instance_results, read_semantic_png,
                          write_json, write_panoptic_json, write_panoptic_prediction,
                          write_part_panoptic_png, write_semantic_png)


def _box(h, w, y0, y1, x0, x1):
  m = np.zeros([h, w], bool)
  m[y0:y1, x0:x1] = True
  return m


def _record(image_id):
  h, w = 40, 48
  car = _box(h, w, 10, 30, 5, 25)
  man = _box(h, w, 5, 35, 28, 40)
  sky = _box(h, w, 0, 8, 0, 48) & ~man & ~car
  segments = [Segment(1, 3, True, car, (5, 10, 20, 20)), Segment(2, 1, True, man, (28, 5, 12, 30)),
              Segment(3, 7, False, sky, (0, 0, 48, 8))]
  parts = [Part(11, 1, 1, _box(h, w, 24, 30, 5, 12), (5, 24, 7, 6)),
           Part(12, 2, 1, _box(h, w, 10, 16, 8, 20), (8, 10, 12, 6))]
  rels = [Relation(2, 1, 0, "next to"), Relation(1, 2, 1, "touching")]
  return ImageRecord(image_id, f"/x/{image_id}.jpg", h, w, "synthetic",
                     frozenset({"part", "entity", "relation"}), segments, parts, rels)


def test_class_agnostic_gt_and_results_load(tmp_path):
  records = [_record(5), _record(6)]
  for level, count in (("entity", 6), ("part", 4), ("relation", 2)):
    gt = class_agnostic_ground_truth(records, level)
    assert len(gt["annotations"]) == count and {a["category_id"] for a in gt["annotations"]} == {1}
    results = []
    for rec in records:
      masks = np.stack([(s.mask if level == "entity" else p.mask)
                        for s, p in zip(rec.segments, rec.parts)])
      results += coco_instance_results(rec.image_id, masks, [0.9, 0.8], [1, 1])
    write_json(str(tmp_path / f"gt_{level}.json"), gt)
    write_json(str(tmp_path / f"res_{level}.json"), results)
    with contextlib.redirect_stdout(io.StringIO()):
      coco = COCO(str(tmp_path / f"gt_{level}.json"))
      dt = coco.loadRes(str(tmp_path / f"res_{level}.json"))
    assert len(dt.getAnnIds()) == 4
  entity = coco_evaluate(str(tmp_path / "gt_entity.json"), str(tmp_path / "res_entity.json"))
  assert entity["AP"] == pytest.approx(0.6633663366336634) and entity["AR@100"] == pytest.approx(
      2 / 3)


def test_panoptic_round_trip_gives_pq_100(tmp_path):
  annotations, rec = [], _record(5)
  masks = np.stack([s.mask for s in rec.segments])
  ann = write_panoptic_prediction(str(tmp_path / "pan"), 5, "5.png", masks, [3, 1, 7],
                                  isthing=[True, True, False])
  ann["segments_info"] = [dict(s, iscrowd=0) for s in ann["segments_info"]]
  annotations.append(ann)
  categories = [{"id": 3, "isthing": 1}, {"id": 1, "isthing": 1}, {"id": 7, "isthing": 0}]
  write_panoptic_json(str(tmp_path / "pan.json"), annotations, categories)
  ids = read_id_png(str(tmp_path / "pan" / "5.png"))
  assert ids[20, 10] == 1 and ids[20, 30] == 2 and ids[39, 0] == 0
  out = pq_compute(str(tmp_path / "pan.json"), str(tmp_path / "pan.json"))
  assert out["All"]["pq"] == 1.0 and out["Things"]["n"] == 2 and out["Stuff"]["n"] == 1
  with pytest.raises(ValueError, match="overlap"):
    write_panoptic_prediction(str(tmp_path / "pan"), 5, "x.png", np.stack([masks[0], masks[0]]),
                              [3, 3])


def test_semantic_and_part_pngs(tmp_path):
  labels = np.arange(40 * 48).reshape(40, 48) % 150
  write_semantic_png(str(tmp_path / "s.png"), labels)
  back = read_semantic_png(str(tmp_path / "s.png"), expected_hw=(40, 48))
  assert (back == labels).all()
  assert miou([(labels, back)], 150)["mIoU"] == 100.0
  with pytest.raises(ValueError, match="s.png"):
    read_semantic_png(str(tmp_path / "s.png"), expected_hw=(40, 47))
  scene = np.full([40, 48], 84)
  inst = np.zeros([40, 48], np.int64)
  part = np.zeros([40, 48], np.int64)
  scene[5:20, 5:20], inst[5:20, 5:20], part[5:20, 5:20] = 15, 1, 255
  write_part_panoptic_png(str(tmp_path / "2008_000001.png"), scene, inst, part)
  arr = read_prediction(str(tmp_path / "2008_000001.png"))
  assert arr[10, 10].tolist() == [15, 1, 255] and arr[0, 0].tolist() == [84, 0, 0]
  with pytest.raises(ValueError, match="instance ids"):
    write_part_panoptic_png(str(tmp_path / "b.png"), scene, inst + 300, part)
  assert np.array(Image.open(tmp_path / "2008_000001.png")).dtype == np.uint8
  assert json.loads(json.dumps(coco_instance_results(1, np.zeros([0, 4, 4]), [], [])) ) == []
