"""AIMS association AR@100 against a direct loop over the written definition."""

import numpy as np
import pytest

from eval.association import (THRESHOLDS, AssociationImage, association_recall, pair_scores)


def _iou(a, b):
  u = np.count_nonzero(a | b)
  return np.count_nonzero(a & b) / u if u else 0.0


def _loop_reference(images, max_pairs=100):
  """Straight transcription of the docstring definition."""
  per_t = []
  for t in THRESHOLDS:
    hit = total = 0
    for im in images:
      order = sorted(range(len(im.pred_scores)), key=lambda q: -im.pred_scores[q])[:max_pairs]
      for h, l in im.gt_pairs:
        total += 1
        hit += any(_iou(im.gt_high[h], im.pred_high[i]) >= t
                   and _iou(im.gt_low[l], im.pred_low[j]) >= t
                   for i, j in (im.pred_pairs[q] for q in order))
    per_t.append(hit / total)
  return 100 * float(np.mean(per_t))


def _image(rng, n_pred):
  h, w = 32, 40
  gt_high = np.zeros([3, h, w], bool)
  gt_low = np.zeros([5, h, w], bool)
  for k in range(3):
    gt_high[k, 2 + 9 * k:10 + 9 * k, 2:30] = True
  for k in range(5):
    gt_low[k, 2 + 6 * k:7 + 6 * k, 3 + 4 * k:14 + 4 * k] = True
  gt_pairs = np.array([[0, 0], [0, 1], [1, 2], [2, 3], [2, 4], [1, 1]])
  pred_high = np.stack([np.roll(m, int(rng.integers(-2, 3)), 1) for m in gt_high]
                       + [np.roll(gt_high[0], 6, 0)])
  pred_low = np.stack([np.roll(m, int(rng.integers(-2, 3)), 0) for m in gt_low])
  assoc = rng.uniform(size=[len(pred_high), len(pred_low)])
  pairs, scores = pair_scores(assoc, rng.uniform(0.2, 1, len(pred_high)),
                              rng.uniform(0.2, 1, len(pred_low)))
  keep = rng.permutation(len(pairs))[:n_pred]
  return AssociationImage(gt_high, gt_low, gt_pairs, pred_high, pred_low, pairs[keep],
                          scores[keep])


def test_equals_definition_loop():
  rng = np.random.default_rng(5)
  images = [_image(rng, n) for n in (20, 12, 6)]
  out = association_recall(images)
  assert 0 < out["AR"] < 100 and out["num_gt"] == 18
  assert out["AR"] == pytest.approx(_loop_reference(images), rel=1e-6)
  small = association_recall(images, max_pairs=3)
  assert small["AR"] == pytest.approx(_loop_reference(images, 3), rel=1e-6)
  assert small["AR"] < out["AR"]


def test_pair_scores_product():
  pairs, scores = pair_scores(np.array([[0.5, 1.0]]), np.array([0.5]), np.array([0.2, 0.4]))
  assert pairs.tolist() == [[0, 0], [0, 1]]
  assert scores.tolist() == pytest.approx([0.05, 0.2])


def test_empty_prediction_is_zero():
  rng = np.random.default_rng(6)
  im = _image(rng, 0)
  out = association_recall([im])
  assert out["AR"] == 0.0 and out["num_gt"] == 6
  assert association_recall([])["AR"] == 0.0


def test_bad_pair_index():
  rng = np.random.default_rng(6)
  im = _image(rng, 4)
  im.pred_pairs = np.array([[0, 0], [9, 0], [0, 1], [1, 1]])
  with pytest.raises(ValueError, match="predicted pair"):
    association_recall([im])
