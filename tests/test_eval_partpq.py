"""PartPQ against panoptic_parts' numbers (reference_numbers.json, tolerance 1e-6 relative)."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from eval import metrics
from eval.part_pq import SPEC_PATH, load_spec, part_pq_compute

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "reference", "data", "partpq")


def test_spec_facts():
  spec = load_spec()
  assert len(spec.sids) == 59
  with open(SPEC_PATH) as f:
    flat = json.load(f)["eval_sid_pid2eval_pid_flat"]
  assert sorted(flat.values()) == list(range(1, 58))
  assert sum(len(v) for v in spec.parts.values()) == 52 and len(spec.parts) == 15
  assert spec.ignore_label == 255 and len(spec.things) == 20


def test_equals_panoptic_parts(capsys):
  with open(os.path.join(HERE, "reference", "reference_numbers.json")) as f:
    ref = json.load(f)["partpq"]
  out = metrics.main(["partpq", "ppq_ppp_59_57_cvpr21_default", os.path.join(DATA, "gt"),
                      os.path.join(DATA, "pred"), os.path.join(DATA, "images.json")])
  capsys.readouterr()
  assert 0.3 < ref["PartPQ"] < 0.9 and ref["PartPQ"] != ref["PartSQ"]
  for k, v in ref.items():
    assert out[k] == pytest.approx(v, rel=1e-6, abs=1e-12), k


def test_size_mismatch_names_file(tmp_path):
  pred = tmp_path / "pred"
  shutil.copytree(os.path.join(DATA, "pred"), pred)
  Image.fromarray(np.zeros([8, 8, 3], np.uint8)).save(pred / "2008_000001.png")
  with pytest.raises(ValueError, match="2008_000001"):
    part_pq_compute(os.path.join(DATA, "gt"), str(pred), os.path.join(DATA, "images.json"))


def test_unknown_image_id(tmp_path):
  pred = tmp_path / "pred"
  shutil.copytree(os.path.join(DATA, "pred"), pred)
  shutil.copy(pred / "2008_000001.png", pred / "2009_000007.png")
  with pytest.raises(KeyError, match="2009_000007"):
    part_pq_compute(os.path.join(DATA, "gt"), str(pred), os.path.join(DATA, "images.json"))


def test_empty_prediction_is_zero(tmp_path):
  pred = tmp_path / "pred"
  pred.mkdir()
  for name in os.listdir(os.path.join(DATA, "pred")):
    Image.fromarray(np.zeros([48, 64, 3], np.uint8)).save(pred / name)
  out = part_pq_compute(os.path.join(DATA, "gt"), str(pred), os.path.join(DATA, "images.json"))
  assert out["PartPQ"] == 0.0 and out["PartRQ"] == 0.0 and out["n"] > 0
