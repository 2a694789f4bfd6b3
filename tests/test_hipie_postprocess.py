"""HIPIE post-processing against transcriptions of the reference inference code.

The references below are PyTorch / NumPy transcriptions, written for these tests, of
berkeley-hipie/HIPIE `HIPIE_IMG.inference` (detection and grounding branches),
`panoptic_inference`, `semantic_inference`, `segmentation_postprocess`,
`convert_grounding_to_od_logits` and `demo_lib/part_segm_demo.py`'s
`sem_to_instance_map_by_instances` / `match`; NMS is a plain NumPy greedy NMS per class (what
torchvision's `batched_nms` computes). Tolerances: float32 arithmetic on O(1) values, 1e-5
absolute on scores and boxes, 1e-4 on resized logits; masks, labels and ids exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval.miou import ppp_part_labels
from eval.part_pq import SPEC_PATH
from hiseg_jax.postprocess import boxes as boxes_lib
from hiseg_jax.postprocess import instances, panoptic, parts, referring, resize

ATOL = 1e-5
STRIDE = 4


# ----------------------------------------------------------------------------- references


def _np_iou(a, b):
  """torchvision box_iou on one box vs many (float32)."""
  lt = np.maximum(a[:2], b[:, :2])
  rb = np.minimum(a[2:], b[:, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[:, 0] * wh[:, 1]
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  with np.errstate(invalid='ignore', divide='ignore'):
    return inter / (area(a) + area(b) - inter)


def _np_batched_nms(boxes, scores, classes, thr):
  """Greedy NMS per class; kept indices by descending score."""
  boxes, scores = np.asarray(boxes, np.float32), np.asarray(scores, np.float32)
  keep = []
  for c in np.unique(classes):
    idx = np.flatnonzero(classes == c)
    order = idx[np.argsort(-scores[idx], kind='stable')]
    while len(order):
      i, rest = order[0], order[1:]
      keep.append(i)
      order = rest[~(_np_iou(boxes[i], boxes[rest]) > thr)]
  keep = np.array(keep, np.int64)
  return keep[np.argsort(-scores[keep], kind='stable')]


def _t(x):
  return torch.from_numpy(np.array(x))


def _ref_xyxy(b):
  cx, cy, w, h = b.unbind(-1)
  return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def _ref_restrict(logits, is_thing, mode):
  """convert_grounding_to_od_logits' FG / BG masking."""
  out = logits.clone()
  for c, thing in enumerate(is_thing):
    if (mode == 'FG' and not thing) or (mode == 'BG' and thing):
      out[:, c] = -9999.0
  return out


def _ref_detection(logits, boxes, masks, iou, is_thing, image_hw, out_hw, top=100):
  """HIPIE detection branch (OTA, IoU head, no CLIP) + segmentation_postprocess."""
  logits, boxes, masks, iou = _t(logits), _t(boxes), _t(masks), _t(iou)
  has_thing = any(is_thing)
  logits = _ref_restrict(logits, is_thing, 'FG' if has_thing else None)
  prob = torch.sqrt(logits.sigmoid() * iou.sigmoid()[:, None])
  nms_scores, idxs = prob.max(1)
  keep = torch.from_numpy(_np_batched_nms(_ref_xyxy(boxes).numpy(), nms_scores.numpy(),
                                          idxs.numpy(), 0.7))
  prob = prob[keep]
  num = min(top, prob.numel())
  values, index = torch.topk(prob.reshape(-1), num)
  c = logits.shape[1]
  rows, labels = index // c, index % c
  kept_boxes, kept_masks = boxes[keep][rows], masks[keep][rows]
  h, w = image_hw
  ho, wo = out_hw
  xyxy = _ref_xyxy(kept_boxes) * torch.tensor([w, h, w, h], dtype=torch.float32)
  xyxy = xyxy * torch.tensor([wo / w, ho / h, wo / w, ho / h], dtype=torch.float32)
  xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, wo)
  xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, ho)
  nonempty = (xyxy[:, 2] - xyxy[:, 0] > 0) & (xyxy[:, 3] - xyxy[:, 1] > 0)
  up = F.interpolate(kept_masks[:, None], scale_factor=STRIDE, mode='bilinear',
                     align_corners=False)
  binary = (up.sigmoid() > 0.5)[:, :, :h, :w]
  binary = F.interpolate(binary.float(), size=(ho, wo), mode='nearest')[:, 0] > 0.5
  return {'scores': values[nonempty].numpy(), 'labels': labels[nonempty].numpy(),
          'queries': keep[rows][nonempty].numpy(), 'boxes': xyxy[nonempty].numpy(),
          'masks': binary[nonempty].numpy(), 'keep': keep.numpy()}


def _ref_panoptic(probs, mask_probs, is_thing, thr=0.25, overlap=0.8):
  """HIPIE panoptic_inference (Mask2Former's loop) on probabilities and mask probabilities."""
  probs, mask_probs = _t(probs), _t(mask_probs)
  scores, labels = probs.max(-1)
  keep = scores > thr
  cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_probs[keep]
  seg = torch.zeros(mask_probs.shape[-2:], dtype=torch.int32)
  info = []
  if cur_masks.shape[0] == 0:
    return seg.numpy(), info
  ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
  memory, current = {}, 0
  for k in range(cur_classes.shape[0]):
    pred_class = int(cur_classes[k])
    isthing = bool(is_thing[pred_class])
    mask_area = (ids == k).sum().item()
    original_area = (cur_masks[k] >= 0.5).sum().item()
    mask = (ids == k) & (cur_masks[k] >= 0.5)
    if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
      if mask_area / original_area < overlap:
        continue
      if not isthing:
        if pred_class in memory:
          seg[mask] = memory[pred_class]
          continue
        memory[pred_class] = current + 1
      current += 1
      seg[mask] = current
      info.append({'id': current, 'isthing': isthing, 'category_id': pred_class})
  return seg.numpy(), info


def _ref_pano_sem(thing_logits, thing_masks, keep, stuff_logits, stuff_masks, is_thing,
                  image_hw, out_hw, temperature=0.06):
  """HIPIE's thing + stuff candidates, class probabilities, masks, semantic and panoptic."""
  thing = _ref_restrict(_t(thing_logits), is_thing, 'FG')[_t(keep)]
  stuff = _ref_restrict(_t(stuff_logits), is_thing, 'BG')
  logits = torch.cat([thing, stuff])
  masks = torch.cat([_t(thing_masks)[_t(keep)], _t(stuff_masks)])[:, None]
  probs = F.softmax(logits.sigmoid() / temperature, dim=-1)
  h, w = image_hw
  masks = F.interpolate(masks, scale_factor=STRIDE, mode='bilinear', align_corners=False)
  masks = masks[:, :, :h, :w]
  masks = F.interpolate(masks, size=out_hw, mode='bilinear', align_corners=False)[:, 0]
  sem = torch.einsum('qc,qhw->chw', probs, masks.sigmoid())
  seg, info = _ref_panoptic(probs.numpy(), masks.sigmoid().numpy(), is_thing)
  return probs.numpy(), masks.numpy(), sem.numpy(), seg, info


# ----------------------------------------------------------------------------- inputs


def _detections(seed, q=40, c=5, hw=(8, 10)):
  rng = np.random.default_rng(seed)
  centres = rng.uniform(0.2, 0.8, (4, 2))
  pick = rng.integers(0, 4, q)
  cxcy = centres[pick] + rng.normal(0, 0.03, (q, 2))
  wh = rng.uniform(0.2, 0.4, (4, 2))[pick] * rng.uniform(0.85, 1.15, (q, 2))
  boxes = np.concatenate([cxcy, wh], 1).astype(np.float32)
  logits = rng.normal(0, 2, (q, c)).astype(np.float32)
  iou = rng.normal(0, 1, (q,)).astype(np.float32)
  masks = rng.normal(0, 3, (q,) + hw).astype(np.float32)
  return logits, boxes, masks, iou


def _blob_masks(rng, n, hw, scale=6.0):
  yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
  cy = rng.uniform(0, hw[0], n)[:, None, None]
  cx = rng.uniform(0, hw[1], n)[:, None, None]
  r = rng.uniform(1.5, 4.0, n)[:, None, None]
  d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
  return (scale * (r - d) / r + rng.normal(0, 0.3, (n,) + hw)).astype(np.float32)


IS_THING = np.array([True, True, True, False, False])


# ----------------------------------------------------------------------------- boxes / resize


@pytest.mark.parametrize('seed', range(4))
def test_nms_matches_numpy_greedy(seed):
  logits, boxes, _, _ = _detections(seed, q=60)
  rng = np.random.default_rng(seed)
  scores = rng.uniform(0, 1, 60).astype(np.float32)
  classes = rng.integers(0, 3, 60)
  xyxy = np.asarray(boxes_lib.box_cxcywh_to_xyxy(jnp.asarray(boxes)))
  order, keep = jax.jit(boxes_lib.nms, static_argnums=2)(
      jnp.asarray(xyxy), jnp.asarray(scores), 0.7, jnp.asarray(classes))
  got = np.asarray(order)[np.asarray(keep)]
  want = _np_batched_nms(xyxy, scores, classes, 0.7)
  np.testing.assert_array_equal(got, want)
  assert 0 < len(got) < 60  # suppression happened
  _, keep_agnostic = boxes_lib.nms(jnp.asarray(xyxy), jnp.asarray(scores), 0.7)
  assert np.asarray(keep_agnostic).sum() <= len(got)


def test_nms_empty_boxes_never_suppress():
  boxes = jnp.array([[0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1], [0, 0, 1, 1], [0, 0, 1, 1.01]])
  order, keep = boxes_lib.nms(boxes, jnp.array([0.9, 0.8, 0.7, 0.6]), 0.7)
  np.testing.assert_array_equal(np.asarray(order)[np.asarray(keep)], [0, 1, 2])


def test_mask_resizing_matches_torch():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 9, 11)).astype(np.float32)
  got = resize.mask_logits_to_output(jnp.asarray(x), STRIDE, (33, 41), (50, 23))
  up = F.interpolate(_t(x)[None], scale_factor=STRIDE, mode='bilinear', align_corners=False)
  want = F.interpolate(up[:, :, :33, :41], size=(50, 23), mode='bilinear', align_corners=False)
  np.testing.assert_allclose(np.asarray(got), want[0].numpy(), atol=1e-4)
  b = rng.uniform(size=(2, 13, 17)) > 0.5
  for out in [(40, 7), (13, 17), (5, 30)]:
    want = F.interpolate(_t(b.astype(np.float32))[None], size=out, mode='nearest')[0] > 0.5
    np.testing.assert_array_equal(np.asarray(resize.nearest_resize(jnp.asarray(b), out)),
                                  want.numpy())


@pytest.mark.parametrize('image_hw,out_hw', [((33, 41), (50, 23)), ((36, 44), (36, 44)),
                                             ((20, 44), (13, 29))])
def test_host_mask_resizing_matches_torch(image_hw, out_hw):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 9, 11)).astype(np.float32)
  got = resize.host_mask_logits_to_output(x, STRIDE, image_hw, out_hw)
  up = F.interpolate(_t(x)[None], scale_factor=STRIDE, mode='bilinear', align_corners=False)
  want = F.interpolate(up[:, :, :image_hw[0], :image_hw[1]], size=out_hw, mode='bilinear',
                       align_corners=False)[0].numpy()
  assert got.shape == want.shape and got.dtype == np.float32
  # One composed float32 matrix per axis against three float32 passes: 1e-5.
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(got, np.asarray(resize.mask_logits_to_output(
      jnp.asarray(x), STRIDE, image_hw, out_hw)), atol=1e-5)
  with pytest.raises(ValueError, match='does not fit'):
    resize.host_mask_logits_to_output(x, STRIDE, (37, 44), out_hw)


# ----------------------------------------------------------------------------- instances


@pytest.mark.parametrize('seed,is_thing,top', [(0, IS_THING, 100), (1, IS_THING, 30),
                                               (2, np.zeros(5, bool), 100)])
def test_instances_match_reference(seed, is_thing, top):
  logits, boxes, masks, iou = _detections(seed)
  image_hw, out_hw = (30, 37), (45, 50)
  got = instances.postprocess_instances(logits, boxes, masks, iou, is_thing, image_hw, out_hw,
                                        top_k=top)
  want = _ref_detection(logits, boxes, masks, iou, is_thing, image_hw, out_hw, top)
  assert len(want['keep']) < len(logits)  # NMS removed duplicates
  np.testing.assert_allclose(got['scores'], want['scores'], atol=ATOL)
  # Masked classes score exactly 0; which of these ties top-k keeps is arbitrary.
  pos = want['scores'] > 0
  assert (got['scores'] > 0).tolist() == pos.tolist()
  np.testing.assert_array_equal(got['labels'][pos], want['labels'][pos])
  np.testing.assert_array_equal(got['queries'][pos], want['queries'][pos])
  np.testing.assert_allclose(got['boxes'][pos], want['boxes'][pos], atol=1e-4)
  np.testing.assert_array_equal(got['masks'][pos], want['masks'][pos])
  if is_thing.any():
    assert not is_thing[got['labels'][~pos]].any() and not is_thing[want['labels'][~pos]].any()
  if is_thing.any():
    assert is_thing[got['labels'][pos]].all()
  assert len(set(got['queries'].tolist())) < len(got['queries'])  # a query with two classes


def test_select_instances_jit_and_padding():
  logits, boxes, _, iou = _detections(3, q=6, c=2)
  scores = instances.instance_scores(instances.thing_class_logits(
      jnp.asarray(logits), np.array([True, False])), jnp.asarray(iou))
  sel = jax.jit(instances.select_instances, static_argnums=(2, 3))(
      scores, jnp.asarray(boxes), 100, 0.7)
  assert sel['scores'].shape == (12,)  # K = min(100, Q · C)
  survivors = int(sel['nms_keep'].sum())
  np.testing.assert_array_equal(np.asarray(sel['valid']),
                                np.arange(12) < survivors * 2)
  assert float(jnp.max(jnp.where(sel['valid'], 0.0, sel['scores']))) == 0.0


def test_no_detections_when_every_box_is_empty():
  logits, boxes, masks, iou = _detections(4, q=8)
  boxes[:, 2:] = 0.0
  out = instances.postprocess_instances(logits, boxes, masks, iou, IS_THING, (30, 37), (45, 50))
  assert out['scores'].shape == (0,) and out['masks'].shape == (0, 45, 50)
  assert out['boxes'].shape == (0, 4)


# ----------------------------------------------------------------------------- panoptic


def _pano_inputs(seed, q=10, qs=6, c=5, hw=(12, 16)):
  rng = np.random.default_rng(seed)
  logits, boxes, _, iou = _detections(seed, q=q, c=c, hw=hw)
  thing_masks = _blob_masks(rng, q, hw)
  stuff_logits = rng.normal(0, 2, (qs, c)).astype(np.float32)
  stuff_logits[: qs // 2, 3] += 4.0  # several confident queries of one stuff class
  stuff_masks = _blob_masks(rng, qs, hw, scale=4.0)
  return logits, boxes, iou, thing_masks, stuff_logits, stuff_masks


@functools.partial(jax.jit, static_argnums=(6, 7))
def _our_pano_sem(logits, boxes, iou, thing_masks, stuff_logits, stuff_masks, image_hw, out_hw):
  thing = instances.thing_class_logits(logits, IS_THING)
  sel = instances.select_instances(instances.instance_scores(thing, iou), boxes)
  cand_logits, cand_masks, valid = panoptic.thing_stuff_candidates(
      thing, thing_masks, sel['nms_order'], sel['nms_keep'],
      panoptic.stuff_class_logits(stuff_logits, IS_THING), stuff_masks)
  probs = panoptic.candidate_class_probs(cand_logits, 0.06)
  masks = resize.mask_logits_to_output(cand_masks, STRIDE, image_hw, out_hw)
  sem = panoptic.semantic_inference(probs, masks, valid)
  pano = panoptic.panoptic_inference(probs, masks, IS_THING, valid)
  return sel, probs, masks, valid, sem, pano


@pytest.mark.parametrize('seed', [0, 2, 3, 5, 6])
def test_semantic_and_panoptic_match_reference(seed):
  logits, boxes, iou, thing_masks, stuff_logits, stuff_masks = _pano_inputs(seed)
  image_hw, out_hw = (37, 45), (30, 52)
  sel, probs, masks, valid, sem, pano = _our_pano_sem(
      *(jnp.asarray(x) for x in (logits, boxes, iou, thing_masks, stuff_logits, stuff_masks)),
      image_hw, out_hw)

  keep = np.asarray(sel['nms_order'])[np.asarray(sel['nms_keep'])]
  w_probs, w_masks, w_sem, w_seg, w_info = _ref_pano_sem(
      logits, thing_masks, keep, stuff_logits, stuff_masks, IS_THING, image_hw, out_hw)
  v = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(probs)[v], w_probs, atol=ATOL)
  np.testing.assert_allclose(np.asarray(masks)[v], w_masks, atol=1e-4)
  np.testing.assert_allclose(np.asarray(sem), w_sem, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(pano['id_map']), w_seg)
  assert panoptic.segments_info(pano) == w_info and len(w_info) >= 2


def test_postprocess_semantic_panoptic_end_to_end():
  logits, boxes, iou, thing_masks, stuff_logits, stuff_masks = _pano_inputs(11)
  image_hw, out_hw = (37, 45), (30, 52)
  thing = instances.thing_class_logits(jnp.asarray(logits), IS_THING)
  sel = instances.select_instances(instances.instance_scores(thing, jnp.asarray(iou)),
                                   jnp.asarray(boxes))
  cand = panoptic.thing_stuff_candidates(
      thing, jnp.asarray(thing_masks), sel['nms_order'], sel['nms_keep'],
      panoptic.stuff_class_logits(jnp.asarray(stuff_logits), IS_THING), jnp.asarray(stuff_masks))
  got = panoptic.postprocess_semantic_panoptic(*cand, IS_THING, image_hw, out_hw)
  keep = np.asarray(sel['nms_order'])[np.asarray(sel['nms_keep'])]
  _, _, w_sem, w_seg, w_info = _ref_pano_sem(logits, thing_masks, keep, stuff_logits,
                                             stuff_masks, IS_THING, image_hw, out_hw)
  np.testing.assert_array_equal(got['semantic'], w_sem.argmax(0))
  np.testing.assert_array_equal(got['id_map'], w_seg)
  assert got['segments_info'] == w_info and len(w_info) > 1


_jit_panoptic = jax.jit(panoptic.panoptic_inference)


def test_panoptic_merging_branches_against_reference():
  rng = np.random.default_rng(7)
  seen_merge = seen_reject = seen_thing = 0
  for _ in range(30):
    n, c, hw = 14, 4, (12, 16)
    is_thing = np.array([True, True, False, False])
    probs = np.asarray(jax.nn.softmax(rng.normal(0, 3, (n, c)), -1), np.float32)
    mask_logits = _blob_masks(rng, n, hw)
    got = _jit_panoptic(jnp.asarray(probs), jnp.asarray(mask_logits), is_thing)
    seg, info = _ref_panoptic(probs, np.asarray(jax.nn.sigmoid(mask_logits)), is_thing)
    np.testing.assert_array_equal(np.asarray(got['id_map']), seg)
    assert panoptic.segments_info(got) == info
    seen_thing += sum(s['isthing'] for s in info)
    merged = np.asarray(got['segment_id'] > 0) & ~np.asarray(got['new_segment'])
    seen_merge += int(merged.sum())
    seen_reject += int(((probs.max(1) > 0.25) & (np.asarray(got['segment_id']) == 0)).sum())
  assert seen_merge and seen_reject and seen_thing  # every branch was exercised


def test_panoptic_stuff_merged_and_thing_over_stuff():
  hw = (8, 8)
  m = np.full((4,) + hw, -10.0, np.float32)
  m[0, :4, :4] = 10.0  # thing, confident, overlaps stuff 1
  m[1, :4, :] = 10.0  # stuff class 2, loses its left half to the thing -> ratio 0.5, rejected
  m[2, 4:, :4] = 10.0  # stuff class 3
  m[3, 4:, 4:] = 10.0  # stuff class 3 again: merged with query 2
  probs = np.array([[0.9, 0.05, 0.03, 0.02], [0.1, 0.1, 0.7, 0.1],
                    [0.1, 0.1, 0.1, 0.7], [0.05, 0.05, 0.1, 0.8]], np.float32)
  is_thing = np.array([True, True, False, False])
  got = _jit_panoptic(jnp.asarray(probs), jnp.asarray(m), is_thing)
  seg, info = _ref_panoptic(probs, np.asarray(jax.nn.sigmoid(m)), is_thing)
  np.testing.assert_array_equal(np.asarray(got['id_map']), seg)
  assert panoptic.segments_info(got) == info == [
      {'id': 1, 'isthing': True, 'category_id': 0}, {'id': 2, 'isthing': False, 'category_id': 3}]
  assert (seg[4:] == 2).all() and (seg[:4, :4] == 1).all() and (seg[:4, 4:] == 0).all()
  masks, cats, things = panoptic.segment_masks(seg, info)
  assert masks.shape == (2, 8, 8) and cats.tolist() == [0, 3] and things.tolist() == [True, False]


def test_panoptic_nothing_above_threshold():
  probs = jnp.full((5, 4), 0.25)  # max never strictly above 0.25
  masks = jnp.asarray(_blob_masks(np.random.default_rng(0), 5, (6, 7)))
  got = _jit_panoptic(probs, masks, np.array([True, False, True, False]))
  assert not np.asarray(got['id_map']).any() and panoptic.segments_info(got) == []
  confident = jnp.eye(5, 4) * 0.9
  got = _jit_panoptic(confident, masks, np.ones(4, bool), jnp.zeros(5, bool))
  assert not np.asarray(got['id_map']).any() and panoptic.segments_info(got) == []


# ----------------------------------------------------------------------------- referring


def test_referring_top1():
  logits, boxes, masks, iou = _detections(5, q=20, c=1)
  got = referring.referring_inference(logits, boxes, masks, iou, (30, 37), (45, 50))
  want = _ref_detection(logits, boxes, masks, iou, [True], (30, 37), (45, 50), top=1)
  assert got['valid']
  assert got['query'] == int(want['queries'][0])
  assert abs(got['score'] - float(want['scores'][0])) < ATOL
  np.testing.assert_allclose(got['box'], want['boxes'][0], atol=1e-4)
  np.testing.assert_array_equal(got['mask'], want['masks'][0])
  best = int(np.argmax(np.sqrt(1 / (1 + np.exp(-logits[:, 0])) / (1 + np.exp(-iou)))))
  assert got['query'] == best
  with pytest.raises(ValueError, match='referring_inference'):
    referring.referring_inference(np.zeros((20, 2)), boxes, masks, iou, (30, 37), (45, 50))


# ----------------------------------------------------------------------------- parts


PART_NAMES = ['car body', 'car wheel', 'car window', 'boat ', 'cow head', 'cow ear',
              'cow muzzle', 'person lower arm']


def _ref_assemble(part_labels, names, instance_masks, instance_names, max_id):
  """sem_to_instance_map_by_instances."""
  msks, labels = [], []
  for v in np.unique(part_labels):
    if v == max_id:
      continue
    msk = part_labels == v
    for idx, inst in enumerate(instance_masks):
      m = msk & inst
      if m.sum() > 100:
        name = names[v].split(' ', 1)
        if len(name) == 1 or not name[1]:
          continue
        if instance_names is not None and name[0] != instance_names[idx]:
          continue
        msks.append(m)
        labels.append(name[1] if name[1] != 'body' else name[0])
  return msks, labels


@pytest.mark.parametrize('with_names', [True, False])
def test_assemble_parts_matches_reference(with_names):
  rng = np.random.default_rng(0)
  hw = (40, 48)
  labels = rng.integers(0, len(PART_NAMES) + 1, (8, 6)).repeat(5, 0).repeat(8, 1)
  inst = np.zeros((3,) + hw, bool)
  inst[0, :, :30] = True
  inst[1, 10:, 20:] = True
  inst[2, :20] = True
  names = ['car', 'cow', 'person'] if with_names else None
  got = parts.assemble_parts(labels, PART_NAMES, inst, names, ignore_label=len(PART_NAMES))
  w_masks, w_labels = _ref_assemble(labels, PART_NAMES, inst, names, len(PART_NAMES))
  assert [p.label for p in got] == w_labels and len(got) > 3
  for p, m in zip(got, w_masks):
    np.testing.assert_array_equal(p.mask, m)
  assert 'car' in w_labels  # "car body" is labelled by its object
  with pytest.raises(ValueError, match='part vocabulary'):
    parts.assemble_parts(labels, PART_NAMES[:3], inst, names)


def test_part_queries_follow_the_hierarchy():
  hw = (4, 4)
  found = [parts.InstancePart(np.eye(4, dtype=bool), lab, 0, 0)
           for lab in ['ear', 'muzzle', 'lower arm']]
  found[1].mask = np.flip(np.eye(4, dtype=bool), 1).copy()
  head = parts.part_query_mask('head', found, hw)
  np.testing.assert_array_equal(head, np.eye(4, dtype=bool) | np.flip(np.eye(4, dtype=bool), 1))
  assert parts.matches_part_query('nose', 'muzzle') and parts.matches_part_query('arm',
                                                                                 'lower arm')
  assert not parts.matches_part_query('leg', 'ear')


def test_ppp_part_groups_match_the_eval_mapping():
  import json  # pylint: disable=import-outside-toplevel
  with open(SPEC_PATH) as f:
    spec = json.load(f)
  # Every file scene / part id: sid-only ids (e.g. boat, a one-part class) and sid·100 + pid.
  cats = sorted(int(k) for k in spec['file_sid_pid2eval_sid_pid'] if int(k) > 0)
  lookup = parts.part_group_lookup(len(cats), parts.ppp_part_groups(cats, spec))
  uids = np.array([[c if c < 100 else (c // 100) * 10 ** 5 + 100 + c % 100
                    for c in cats]])  # one pixel each, instance 1
  want = ppp_part_labels(uids)
  got = parts.coarse_part_labels(np.arange(len(cats))[None], lookup)
  np.testing.assert_array_equal(got[want != 255], want[want != 255])
  assert set(got.ravel().tolist()) == set(range(0, 58))
