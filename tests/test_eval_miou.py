"""mIoU / mIoU_PartS against a PyTorch transcription of detectron2's SemSegEvaluator."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from eval.miou import IGNORE, miou, miou_parts, ppp_part_labels, to_train_ids

HERE = os.path.dirname(os.path.abspath(__file__))


def _detectron2_reference(pairs, num_classes):
  """Our own torch transcription of detectron2 SemSegEvaluator.process / evaluate."""
  conf = torch.zeros([(num_classes + 1) ** 2], dtype=torch.int64)
  for gt, pred in pairs:
    gt = torch.as_tensor(gt).clone()
    gt[gt == IGNORE] = num_classes
    conf += torch.bincount((num_classes + 1) * torch.as_tensor(pred).reshape(-1)
                           + gt.reshape(-1), minlength=conf.numel())
  conf = conf.reshape(num_classes + 1, num_classes + 1).double()
  tp = conf.diagonal()[:-1]
  pos_gt = conf[:-1, :-1].sum(0)
  pos_pred = conf[:-1, :-1].sum(1)
  valid = pos_gt > 0
  iou = tp[valid] / (pos_gt + pos_pred - tp)[valid]
  return {"mIoU": 100 * float(iou.sum() / ((pos_gt + pos_pred) > 0).sum()),
          "pACC": 100 * float(tp.sum() / pos_gt.sum()),
          "mACC": 100 * float((tp[valid] / pos_gt[valid]).mean()),
          "fwIoU": 100 * float((iou * pos_gt[valid] / pos_gt.sum()).sum())}


def _images(rng, num_classes, stored_offset):
  pairs = []
  for _ in range(3):
    gt = rng.integers(0, num_classes, [40, 56]) + stored_offset
    gt[:5] = 0 if stored_offset else 255
    pred = np.where(rng.uniform(size=gt.shape) < 0.6, gt - stored_offset,
                    rng.integers(0, num_classes, gt.shape))
    pred = np.clip(pred, 0, num_classes - 1)
    pairs.append((gt, pred))
  return pairs


@pytest.mark.parametrize("convention,offset", [("ade20k", 1), ("pascal", 0)])
def test_equals_detectron2(convention, offset):
  rng = np.random.default_rng(1)
  pairs = _images(rng, 7, offset)
  ours = miou(pairs, 7, convention)
  ref = _detectron2_reference([(to_train_ids(g, convention), p) for g, p in pairs], 7)
  for k, v in ref.items():
    assert ours[k] == pytest.approx(v, rel=1e-6), k


def test_ade20k_reduce_zero_label():
  gt = np.array([[0, 1, 2, 150]])
  assert to_train_ids(gt, "ade20k").tolist() == [[255, 0, 1, 149]]
  assert to_train_ids(gt, "pascal").tolist() == gt.tolist()


def test_parts_on_ppp_ground_truth():
  gt_uids = np.array(Image.open(os.path.join(HERE, "reference", "data", "partpq", "gt",
                                             "2008_000002.tif"))).astype(np.int64)
  labels = ppp_part_labels(gt_uids)
  assert set(np.unique(labels).tolist()) <= set(range(58)) | {IGNORE}
  assert labels[15, 10] == 43 and labels[25, 10] == 44 and labels[5, 5] == 0
  assert labels[24, 24] == IGNORE
  rng = np.random.default_rng(2)
  pred = np.where(rng.uniform(size=labels.shape) < 0.7, np.where(labels == IGNORE, 0, labels),
                  rng.integers(0, 58, labels.shape))
  ours = miou_parts([(labels, pred)])
  ref = _detectron2_reference([(labels, pred)], 58)
  assert ours["mIoU"] == pytest.approx(ref["mIoU"], rel=1e-6)


def test_bad_prediction_ids():
  with pytest.raises(ValueError, match="image 0: predicted ids"):
    miou([(np.zeros([4, 4], np.int64), np.full([4, 4], 9))], 5)
  with pytest.raises(ValueError, match="image 0: prediction size"):
    miou([(np.zeros([4, 4], np.int64), np.zeros([4, 5], np.int64))], 5)
