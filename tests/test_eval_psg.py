"""PSG R@K / mR@K against OpenPSG's numbers (reference_numbers.json, tolerance 1e-6 relative)."""

import json
import os
import shutil

import numpy as np
import pytest

from eval import metrics
from eval.psg_recall import PsgImage, load_psg_ground_truth, load_psg_predictions, psg_recall
from eval.writers import psg_prediction_entry, write_psg_submission

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "reference", "data", "psg")
ARGS = ["psg", "--psg_json", os.path.join(DATA, "psg.json"), "--gt_folder",
        os.path.join(DATA, "gt"), "--pred_folder"]


def test_equals_openpsg(capsys):
  with open(os.path.join(HERE, "reference", "reference_numbers.json")) as f:
    ref = json.load(f)["psg"]
  out = metrics.main(ARGS + [os.path.join(DATA, "submission")])
  capsys.readouterr()
  assert out["num_images"] == 4
  assert ref["R@20"] < ref["R@50"] and 0 < ref["mR@20"] < ref["R@20"]
  for k, v in ref.items():
    assert out[k] == pytest.approx(v, rel=1e-6), k


def test_empty_prediction_is_zero_recall(tmp_path):
  ids, gts, n = load_psg_ground_truth(os.path.join(DATA, "psg.json"), os.path.join(DATA, "gt"))
  out = psg_recall(gts, [None] * len(gts), n)
  assert out["R@20"] == 0.0 and out["mR@100"] == 0.0 and out["num_images"] == len(ids)
  empty = [PsgImage(g.masks, g.labels, np.zeros([0, 3], np.int64)) for g in gts]
  assert psg_recall(gts, empty, n)["R@100"] == 0.0


def test_ground_truth_as_prediction_is_100(tmp_path):
  ids, gts, n = load_psg_ground_truth(os.path.join(DATA, "psg.json"), os.path.join(DATA, "gt"))
  entries = []
  for image_id, g in zip(ids, gts):
    scores = np.zeros([len(g.triplets), n])
    scores[np.arange(len(g.triplets)), g.triplets[:, 2] - 1] = 1.0
    entries.append(psg_prediction_entry(str(tmp_path), image_id, g.masks, g.labels - 1, scores,
                                        g.triplets[:, :2]))
  write_psg_submission(str(tmp_path), entries)
  preds = load_psg_predictions(str(tmp_path), ids, [g.masks.shape[1:] for g in gts])
  out = psg_recall(gts, preds, n)
  assert out["R@20"] == 100.0 and out["mR@20"] == pytest.approx(100.0 * 4 / 5)


def test_unknown_image_id(tmp_path):
  sub = tmp_path / "sub"
  shutil.copytree(os.path.join(DATA, "submission"), sub)
  entries = json.loads((sub / "relation.json").read_text())
  entries[0]["image_id"] = 5555
  (sub / "relation.json").write_text(json.dumps(entries))
  with pytest.raises(KeyError, match="5555"):
    metrics.main(ARGS + [str(sub)])
