"""Box geometry and box losses against PyTorch transcriptions of the HIPIE reference.

Transcribed (our own test code): HIPIE `util/box_ops.py` (`box_cxcywh_to_xyxy`,
`box_iou`, `generalized_box_iou` with 1e-7 on the hull), MaskDINO's variant
(1e-6), fvcore's `giou_loss` (eps 1e-7, intersection only where both overlaps
are positive), `F.l1_loss`, and the IoU-head loss of `SetCriterion.loss_boxes`
(`compute_box_iou` under no_grad, then BCE-with-logits). Tolerance: float32
round-off, rtol 1e-5 / atol 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiseg_jax.boxes import aligned_box_iou
from hiseg_jax.boxes import box_cxcywh_to_xyxy
from hiseg_jax.boxes import box_iou
from hiseg_jax.boxes import box_l1_distance
from hiseg_jax.boxes import box_xyxy_to_cxcywh
from hiseg_jax.boxes import generalized_box_iou
from hiseg_jax.losses.box_losses import box_iou_bce_loss
from hiseg_jax.losses.box_losses import giou_loss
from hiseg_jax.losses.box_losses import l1_box_loss

TOL = dict(rtol=1e-5, atol=1e-6)


def t_cxcywh_to_xyxy(x):
  cx, cy, w, h = x.unbind(-1)
  return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def t_box_area(b):
  return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def t_box_iou(boxes1, boxes2):
  area1, area2 = t_box_area(boxes1), t_box_area(boxes2)
  lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
  rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
  wh = (rb - lt).clamp(min=0)
  inter = wh[:, :, 0] * wh[:, :, 1]
  union = area1[:, None] + area2 - inter
  return inter / union, union


def t_generalized_box_iou(boxes1, boxes2, hull_eps):
  iou, union = t_box_iou(boxes1, boxes2)
  lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
  rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
  wh = (rb - lt).clamp(min=0)
  area = wh[:, :, 0] * wh[:, :, 1]
  return iou - (area - union) / (area + hull_eps)


def t_fvcore_giou_loss(boxes1, boxes2, eps=1e-7):
  x1, y1, x2, y2 = boxes1.unbind(dim=-1)
  x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
  xkis1, ykis1 = torch.max(x1, x1g), torch.max(y1, y1g)
  xkis2, ykis2 = torch.min(x2, x2g), torch.min(y2, y2g)
  intsctk = torch.zeros_like(x1)
  mask = (ykis2 > ykis1) & (xkis2 > xkis1)
  intsctk[mask] = (xkis2[mask] - xkis1[mask]) * (ykis2[mask] - ykis1[mask])
  unionk = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intsctk
  iouk = intsctk / (unionk + eps)
  xc1, yc1 = torch.min(x1, x1g), torch.min(y1, y1g)
  xc2, yc2 = torch.max(x2, x2g), torch.max(y2, y2g)
  area_c = (xc2 - xc1) * (yc2 - yc1)
  miouk = iouk - ((area_c - unionk) / (area_c + eps))
  return 1 - miouk


def t_iou_bce(logits, src_boxes, tgt_boxes):
  with torch.no_grad():
    a, b = t_cxcywh_to_xyxy(src_boxes), t_cxcywh_to_xyxy(tgt_boxes)
    iou = torch.diag(t_box_iou(a, b)[0])
  return F.binary_cross_entropy_with_logits(logits, iou, reduction='none')


def random_boxes(rng, n):
  """cxcywh boxes; some overlap, some are disjoint, a few share an edge."""
  centre = rng.uniform(0.2, 0.8, (n, 2))
  size = rng.uniform(0.05, 0.5, (n, 2))
  return np.concatenate([centre, size], -1).astype(np.float32)


@pytest.fixture(name='boxes')
def fixture_boxes():
  rng = np.random.default_rng(0)
  pred, target = random_boxes(rng, 40), random_boxes(rng, 40)
  target[:3] = pred[:3]  # identical boxes: GIoU 1
  target[3] = [pred[3, 0] + pred[3, 2], pred[3, 1], pred[3, 2], pred[3, 3]]  # touching edges
  target[4] = [0.05, 0.05, 0.02, 0.02]
  pred[4] = [0.95, 0.95, 0.02, 0.02]  # far apart: GIoU near -1
  return pred, target


def test_conversions_round_trip(boxes):
  pred, _ = boxes
  xyxy = box_cxcywh_to_xyxy(jnp.asarray(pred))
  np.testing.assert_allclose(xyxy, t_cxcywh_to_xyxy(torch.from_numpy(pred)).numpy(), **TOL)
  np.testing.assert_allclose(box_xyxy_to_cxcywh(xyxy), pred, **TOL)


def test_pairwise_iou_giou_and_l1_match_reference(boxes):
  pred, target = boxes
  a = t_cxcywh_to_xyxy(torch.from_numpy(pred))
  b = t_cxcywh_to_xyxy(torch.from_numpy(target[:13]))
  ja, jb = jnp.asarray(a.numpy()), jnp.asarray(b.numpy())
  iou, union = box_iou(ja, jb)
  ref_iou, ref_union = t_box_iou(a, b)
  np.testing.assert_allclose(iou, ref_iou.numpy(), **TOL)
  np.testing.assert_allclose(union, ref_union.numpy(), **TOL)
  for hull_eps in (1e-7, 1e-6):
    np.testing.assert_allclose(generalized_box_iou(ja, jb, 0.0, hull_eps),
                               t_generalized_box_iou(a, b, hull_eps).numpy(), **TOL)
  np.testing.assert_allclose(
      box_l1_distance(jnp.asarray(pred), jnp.asarray(target[:13])),
      torch.cdist(torch.from_numpy(pred), torch.from_numpy(target[:13]), p=1).numpy(), **TOL)
  batched = generalized_box_iou(jnp.stack([ja, ja]), jnp.stack([jb, jb]))
  assert batched.shape == (2, 40, 13)
  np.testing.assert_allclose(aligned_box_iou(ja[:13], jb), jnp.diagonal(iou[:13]), **TOL)


def test_giou_and_l1_losses_match_reference(boxes):
  pred, target = boxes
  tp, tt = torch.from_numpy(pred), torch.from_numpy(target)
  np.testing.assert_allclose(
      giou_loss(jnp.asarray(pred), jnp.asarray(target)),
      t_fvcore_giou_loss(t_cxcywh_to_xyxy(tp), t_cxcywh_to_xyxy(tt)).numpy(), **TOL)
  maskdino = 1 - torch.diag(t_generalized_box_iou(t_cxcywh_to_xyxy(tp), t_cxcywh_to_xyxy(tt),
                                                  1e-6))
  np.testing.assert_allclose(giou_loss(jnp.asarray(pred), jnp.asarray(target), 0.0, 1e-6),
                             maskdino.numpy(), **TOL)
  np.testing.assert_allclose(giou_loss(jnp.asarray(pred[:3]), jnp.asarray(target[:3])), 0.0,
                             atol=1e-5)
  assert float(giou_loss(jnp.asarray(pred[4:5]), jnp.asarray(target[4:5]))[0]) > 1.9
  np.testing.assert_allclose(l1_box_loss(jnp.asarray(pred), jnp.asarray(target)),
                             F.l1_loss(tp, tt, reduction='none').sum(-1).numpy(), **TOL)


def test_iou_bce_matches_reference_and_stops_the_target_gradient(boxes):
  pred, target = boxes
  logits = np.random.default_rng(1).normal(size=40).astype(np.float32)
  ref = t_iou_bce(torch.from_numpy(logits), torch.from_numpy(pred), torch.from_numpy(target))
  out = box_iou_bce_loss(jnp.asarray(logits), jnp.asarray(pred), jnp.asarray(target))
  np.testing.assert_allclose(out, ref.numpy(), **TOL)
  grad_boxes = jax.grad(lambda b: box_iou_bce_loss(jnp.asarray(logits), b,
                                                   jnp.asarray(target)).sum())(jnp.asarray(pred))
  np.testing.assert_array_equal(grad_boxes, 0.0)


def test_gradients_are_finite_and_match_torch(boxes):
  pred, target = boxes
  tp = torch.from_numpy(pred).requires_grad_(True)
  ref = t_fvcore_giou_loss(t_cxcywh_to_xyxy(tp), t_cxcywh_to_xyxy(torch.from_numpy(target)))
  ref.sum().backward()
  grad = jax.grad(lambda b: giou_loss(b, jnp.asarray(target)).sum())(jnp.asarray(pred))
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, tp.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_shape_errors_name_the_function():
  with pytest.raises(ValueError, match='giou_loss'):
    giou_loss(jnp.zeros((3, 4)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match='box_iou_bce_loss'):
    box_iou_bce_loss(jnp.zeros((2,)), jnp.zeros((3, 4)), jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match='generalized_box_iou'):
    generalized_box_iou(jnp.zeros((3, 4)), jnp.zeros((2, 1, 4)))
