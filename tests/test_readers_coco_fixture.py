"""The COCO panoptic reader on real COCO val2017 annotations (panopticapi sample data)."""

import json
import os

import numpy as np

from data_pipelines import readers

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures",
                       "coco_panoptic_sample")


def _reader():
  return readers.build_reader(
      "coco_panoptic", name="coco_sample",
      annotation_file=os.path.join(FIXTURE, "panoptic_examples.json"),
      panoptic_root=os.path.join(FIXTURE, "panoptic_examples"),
      image_root=os.path.join(FIXTURE, "input_images"))


def test_segments_and_areas_match_segments_info():
  with open(os.path.join(FIXTURE, "panoptic_examples.json")) as f:
    official = json.load(f)
  infos = {a["image_id"]: a["segments_info"] for a in official["annotations"]}
  isthing = {c["id"]: bool(c["isthing"]) for c in official["categories"]}
  r = _reader()
  assert len(r) == 2
  void_total = 0
  for i in range(len(r)):
    rec = r[i]
    want = infos[rec.image_id]
    assert r.meta(i).num_segments == len(rec.segments) == len(want)
    assert rec.file_name.endswith(f"{rec.image_id:012d}.jpg")
    for seg, info in zip(rec.segments, want):
      assert seg.id == info["id"] and seg.category_id == info["category_id"]
      assert seg.area == int(seg.mask.sum()) == info["area"]
      assert seg.bbox == tuple(float(v) for v in info["bbox"])
      assert seg.isthing == isthing[info["category_id"]]
      assert seg.mask.shape == (rec.height, rec.width)
    covered = np.sum([s.mask for s in rec.segments], axis=0)
    assert covered.max() == 1
    void = rec.height * rec.width - sum(s["area"] for s in want)
    assert (0 if rec.annotated is None else int((~rec.annotated).sum())) == void
    np.testing.assert_array_equal(rec.annotated, covered == 1)
    void_total += void
  s = r.summary()
  assert s["images"] == 2 and s["segments"] == sum(len(v) for v in infos.values())
  assert s["void_pixels"] == void_total and s["dropped"] == 0
  assert s["things"] + s["stuff"] == s["segments"]
