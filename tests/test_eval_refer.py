"""Referring metrics against PyTorch transcriptions (LAVT-style loop, torchvision-style box IoU)."""

import json

import numpy as np
import pytest
import torch

from eval import metrics
from eval.referring import referring_boxes, referring_masks
from eval.writers import encode_mask


def _masks(rng):
  gts, preds = [], []
  for i in range(6):
    g = np.zeros([32, 40], bool)
    g[rng.integers(0, 10):rng.integers(12, 32), rng.integers(0, 10):rng.integers(14, 40)] = True
    p = np.roll(g, int(rng.integers(0, 9)), axis=1) if i != 4 else np.zeros_like(g)
    gts.append(g)
    preds.append(p)
  return gts, preds


def test_masks_equal_torch_transcription():
  gts, preds = _masks(np.random.default_rng(3))
  inter = union = 0
  ious = []
  for g, p in zip(gts, preds):
    g, p = torch.as_tensor(g), torch.as_tensor(p)
    i, u = int((g & p).sum()), int((g | p).sum())
    inter, union = inter + i, union + u
    ious.append(i / u if u else 0.0)
  out = referring_masks(gts, preds)
  assert out["oIoU"] == pytest.approx(100 * inter / union, rel=1e-6)
  assert out["mIoU"] == pytest.approx(100 * float(np.mean(ious)), rel=1e-6)
  assert out["Prec@0.5"] == pytest.approx(100 * np.mean([x >= 0.5 for x in ious]), rel=1e-6)
  assert out["oIoU"] != out["mIoU"]


def _torch_box_iou(a, b):
  """Pairwise IoU of xyxy boxes, our transcription of torchvision.ops.box_iou."""
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  lt = torch.max(a[:, None, :2], b[None, :, :2])
  rb = torch.min(a[:, None, 2:], b[None, :, 2:])
  wh = (rb - lt).clamp(min=0)
  inter = wh[..., 0] * wh[..., 1]
  return inter / (area_a[:, None] + area_b[None, :] - inter)


def test_boxes_equal_torch_transcription():
  rng = np.random.default_rng(4)
  g = np.concatenate([rng.uniform(0, 50, [20, 2]), rng.uniform(5, 30, [20, 2])], 1)
  p = g + rng.normal(0, 4, g.shape)
  p[:, 2:] = np.abs(p[:, 2:]) + 1
  xyxy = lambda b: torch.as_tensor(np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1))
  ref = torch.diagonal(_torch_box_iou(xyxy(g), xyxy(p))).numpy()
  out = referring_boxes(g, p)
  assert 0 < out["P@0.5"] < 100
  assert out["P@0.5"] == pytest.approx(100 * np.mean(ref >= 0.5), rel=1e-6)


def test_cli_and_errors(tmp_path, capsys):
  gts, preds = _masks(np.random.default_rng(3))
  g = [{"id": i, "segmentation": encode_mask(m), "bbox": [0, 0, 4, 4]} for i, m in enumerate(gts)]
  p = [{"id": i, "segmentation": encode_mask(m), "bbox": [0, 0, 4, 4]}
       for i, m in enumerate(preds) if i != 2]
  (tmp_path / "g.json").write_text(json.dumps(g))
  (tmp_path / "p.json").write_text(json.dumps(p))
  out = metrics.main(["refer", "--gt_json", str(tmp_path / "g.json"), "--pred_json",
                      str(tmp_path / "p.json")])
  capsys.readouterr()
  preds[2] = np.zeros_like(preds[2])
  assert out["oIoU"] == pytest.approx(referring_masks(gts, preds)["oIoU"])
  assert out["P@0.5"] == pytest.approx(100 * 5 / 6)
  p.append({"id": 42, "bbox": [0, 0, 1, 1]})
  (tmp_path / "p.json").write_text(json.dumps(p))
  with pytest.raises(KeyError, match="expression id 42"):
    metrics.main(["refer", "--gt_json", str(tmp_path / "g.json"), "--pred_json",
                  str(tmp_path / "p.json")])
  assert referring_masks([], [])["oIoU"] == 0.0
