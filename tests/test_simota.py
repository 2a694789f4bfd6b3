"""Tests for hiseg_jax.matching.simota against a loop-based NumPy transcription of HIPIE's simOTA.

The transcription follows `HungarianMatcherVL.compute_cost`, `get_in_boxes_info`
and `dynamic_k_matching` of the reference statement by statement (float64, ties
to the lower index), including its reuse of the first round's conflict set in
the unmatched-gt loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiseg_jax.matching.simota import simota_assign
from hiseg_jax.matching.simota import simota_class_cost
from hiseg_jax.matching.simota import simota_match


def ref_class_cost(logits, positive_map):
  """compute_cost's class term: per gt, mean over its positive tokens of pos - neg."""
  prob = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
  neg = 0.75 * prob ** 2 * (-np.log(1 - prob + 1e-8))
  pos = 0.25 * (1 - prob) ** 2 * (-np.log(prob + 1e-8))
  cost = np.zeros((logits.shape[0], positive_map.shape[0]))
  for idx in range(positive_map.shape[0]):
    cost[:, idx] = (pos[:, positive_map[idx]] - neg[:, positive_map[idx]]).mean(-1)
  return cost


def ref_cxcywh_to_xyxy(box):
  cx, cy, w, h = box
  return [cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h]


def ref_iou_giou(a, b):
  area_a = (a[2] - a[0]) * (a[3] - a[1])
  area_b = (b[2] - b[0]) * (b[3] - b[1])
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
  inter = iw * ih
  union = area_a + area_b - inter
  iou = inter / union
  hw = max(max(a[2], b[2]) - min(a[0], b[0]), 0.0)
  hh = max(max(a[3], b[3]) - min(a[1], b[1]), 0.0)
  hull = hw * hh
  return iou, iou - (hull - union) / hull


def ref_topk_smallest(values, k):
  """torch.topk(values, k, largest=False) indices, ties to the lower index."""
  return sorted(range(len(values)), key=lambda i: (values[i], i))[:k]


def ref_simota(cost_class, boxes, gt_boxes, max_rounds=50):
  """Literal transcription; returns (per-prediction gt or -1, statistics of the run)."""
  n, m = cost_class.shape
  stats = {'max_k': 0, 'conflicts': 0, 'rounds': 0, 'shared': 0}
  # get_in_boxes_info(boxes, gt, expanded_strides=32)
  is_in_boxes = np.zeros((n, m), bool)
  is_in_centers = np.zeros((n, m), bool)
  radius = 2.5 / 32
  for i in range(n):
    ax, ay = boxes[i][0], boxes[i][1]
    for j in range(m):
      x1, y1, x2, y2 = ref_cxcywh_to_xyxy(gt_boxes[j])
      is_in_boxes[i, j] = ax > x1 and ax < x2 and ay > y1 and ay < y2
      gx, gy = gt_boxes[j][0], gt_boxes[j][1]
      is_in_centers[i, j] = (ax > gx - radius and ax < gx + radius
                             and ay > gy - radius and ay < gy + radius)
  fg_mask = [is_in_boxes[i].any() or is_in_centers[i].any() for i in range(n)]
  is_in_boxes_and_center = is_in_boxes & is_in_centers
  # compute_cost
  ious = np.zeros((n, m))
  cost = np.zeros((n, m))
  for i in range(n):
    for j in range(m):
      iou, giou = ref_iou_giou(ref_cxcywh_to_xyxy(boxes[i]), ref_cxcywh_to_xyxy(gt_boxes[j]))
      ious[i, j] = iou
      cost[i, j] = cost_class[i, j] + 3.0 * (-giou) + 100.0 * (not is_in_boxes_and_center[i, j])
      if not fg_mask[i]:
        cost[i, j] += 10000.0
  # dynamic_k_matching
  matching = np.zeros((n, m))
  n_candidate_k = min(n, 10)
  for j in range(m):
    top = sorted(ious[:, j], reverse=True)[:n_candidate_k]
    k = max(int(np.sum(top)), 1)
    stats['max_k'] = max(stats['max_k'], k)
    for i in ref_topk_smallest(list(cost[:, j]), k):
      matching[i, j] = 1.0
  anchor_matching_gt = matching.sum(1)
  stale = [i for i in range(n) if anchor_matching_gt[i] > 1]
  stats['conflicts'] = len(stale)

  def resolve():
    for i in stale:
      best = int(np.argmin(cost[i]))
      matching[i] *= 0
      matching[i, best] = 1

  resolve()
  while (matching.sum(0) == 0).any() and stats['rounds'] < max_rounds:
    stats['rounds'] += 1
    matched_query = matching.sum(1) > 0
    for i in range(n):
      if matched_query[i]:
        cost[i] += 100000.0
    unmatched = [j for j in range(m) if matching[:, j].sum() == 0]
    for j in unmatched:
      matching[int(np.argmin(cost[:, j])), j] = 1.0
    if (matching.sum(1) > 1).sum() > 0:
      resolve()
  stats['shared'] = int((matching.sum(1) > 1).sum())
  out = np.full(n, -1)
  for i in range(n):
    if matching[i].sum() > 0:
      out[i] = int(np.argmax(matching[i]))
  return out, stats


def _random_problem(rng, n, m, t=12, crowded=False):
  """GT boxes and predictions that are jittered copies of them (plus far-away ones).

  `crowded` packs all gt and most prediction centres around the image centre,
  so that gts compete for the same predictions.
  """
  centres = rng.uniform(0.3, 0.7, size=(m, 2))
  sizes = rng.uniform(0.1, 0.4, size=(m, 2))
  gt = np.concatenate([centres, sizes], 1)
  owner = rng.integers(0, m, size=n)
  pred = gt[owner] + np.concatenate([rng.normal(0, 0.04, (n, 2)), rng.normal(0, 0.05, (n, 2))], 1)
  pred[:, 2:] = np.clip(pred[:, 2:], 0.02, None)
  if crowded:
    gt[:, :2] = 0.5 + rng.normal(0, 0.03, (m, 2))
    pred[:, :2] = 0.5 + rng.normal(0, 0.05, (n, 2))
  far = rng.random(n) < 0.2
  pred[far, :2] = rng.uniform(0.0, 0.1, size=(far.sum(), 2))
  logits = rng.normal(0, 2, size=(n, t))
  positive_map = np.zeros((m, t), bool)
  for j in range(m):
    start = rng.integers(0, t - 2)
    positive_map[j, start:start + rng.integers(1, 3)] = True
  return logits, positive_map, pred, gt


def test_class_cost_matches_reference():
  rng = np.random.default_rng(0)
  logits, positive_map, _, _ = _random_problem(rng, 20, 5)
  out = simota_class_cost(jnp.asarray(logits, jnp.float32), jnp.asarray(positive_map))
  # float32 on device vs float64 transcription of float32 inputs: 1e-5 relative.
  np.testing.assert_allclose(np.asarray(out), ref_class_cost(logits.astype(np.float32),
                                                              positive_map),
                             rtol=1e-5, atol=1e-6)


def test_simota_assign_matches_reference_with_conflicts_and_dynamic_k():
  seen = {'max_k': 0, 'conflicts': 0, 'rounds': 0, 'shared': 0}
  for seed in range(30):
    rng = np.random.default_rng(seed)
    crowded = seed % 2 == 1
    n = int(rng.integers(15, 40) if crowded else rng.integers(30, 80))
    m = int(rng.integers(4, 12) if crowded else rng.integers(1, 9))
    logits, positive_map, pred, gt = _random_problem(rng, n, m, crowded=crowded)
    cost_class = ref_class_cost(logits, positive_map)
    ref, stats = ref_simota(cost_class, pred, gt)
    out = simota_assign(cost_class, pred, gt)
    np.testing.assert_array_equal(out, ref, err_msg=f'seed {seed}')
    for key in seen:
      seen[key] = max(seen[key], stats[key])
  # The random problems exercise every branch of the reference: dynamic k > 1,
  # conflicts, the unmatched-gt loop, and a prediction left with two gts by it.
  assert (seen['max_k'] > 1 and seen['conflicts'] > 0 and seen['rounds'] > 0
          and seen['shared'] > 0), seen


def test_simota_match_under_jit_with_padding_equals_reference():
  b, n, m_pad, t = 3, 40, 7, 12
  rng = np.random.default_rng(1)
  cost = np.zeros((b, n, m_pad), np.float32)
  pred = np.zeros((b, n, 4), np.float32)
  gt = np.tile(np.array([0.5, 0.5, 0.2, 0.2], np.float32), (b, m_pad, 1))
  valid = np.zeros((b, m_pad), bool)
  logits_all = np.zeros((b, n, t), np.float32)
  pmap_all = np.zeros((b, m_pad, t), bool)
  expected = np.full((b, n), -1)
  for i, num_valid in enumerate([5, 0, 3]):
    logits, positive_map, pred_i, gt_i = _random_problem(rng, n, max(num_valid, 1), t)
    pred[i] = pred_i
    logits_all[i] = logits
    if num_valid == 0:
      continue
    slots = np.sort(rng.choice(m_pad, size=num_valid, replace=False))  # padding in between
    valid[i, slots] = True
    gt[i, slots] = gt_i
    pmap_all[i, slots] = positive_map
    cost_class = ref_class_cost(logits.astype(np.float32), positive_map)
    ref, _ = ref_simota(cost_class, pred_i.astype(np.float32).astype(np.float64),
                        gt_i.astype(np.float32).astype(np.float64))
    expected[i] = np.where(ref >= 0, slots[np.maximum(ref, 0)], -1)

  @jax.jit
  def match(logits, pmap, pred, gt, valid):
    cost = simota_class_cost(logits, pmap)  # [B, N, M]
    return simota_match(cost, pred, gt, valid)

  matched_gt, matched = match(logits_all, pmap_all, pred, gt, valid)
  assert matched_gt.shape == (b, n) and matched_gt.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(matched_gt), expected)
  np.testing.assert_array_equal(np.asarray(matched), expected >= 0)
  # vmap over an extra leading axis gives the same answer per element.
  cost = simota_class_cost(jnp.asarray(logits_all), jnp.asarray(pmap_all))
  vm_gt, _ = jax.vmap(simota_match)(cost[:, None], jnp.asarray(pred)[:, None],
                                     jnp.asarray(gt)[:, None], jnp.asarray(valid)[:, None])
  np.testing.assert_array_equal(np.asarray(vm_gt)[:, 0], expected)


def test_stalled_loop_stops_where_reference_would_repeat_forever():
  # Both predictions equal gt 0 (IoU 1 each, so k = 2); gt 1 also prefers
  # prediction 0, which stays with gt 0 (lower cost). Every prediction is then
  # matched and gt 1 keeps choosing prediction 0: the reference never exits.
  pred = np.array([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])
  gt = np.array([[0.5, 0.5, 0.2, 0.2], [0.52, 0.5, 0.2, 0.2]])
  cost_class = np.array([[-5.0, 0.0], [0.0, 1.0]])
  ref, stats = ref_simota(cost_class, pred, gt, max_rounds=5)
  assert stats['rounds'] == 5 and stats['max_k'] == 2
  np.testing.assert_array_equal(simota_assign(cost_class, pred, gt), ref)
  np.testing.assert_array_equal(ref, [0, 0])


def test_no_ground_truth_and_bad_input():
  assert np.all(simota_assign(np.zeros((4, 0)), np.full((4, 4), 0.5), np.zeros((0, 4))) == -1)
  with pytest.raises(ValueError, match='cost_class'):
    simota_assign(np.full((2, 1), np.nan), np.full((2, 4), 0.5), np.full((1, 4), 0.5))
  with pytest.raises(ValueError, match='gt_valid'):
    simota_match(jnp.zeros((1, 3, 2)), jnp.zeros((1, 3, 4)), jnp.zeros((1, 2, 4)),
                 jnp.zeros((1, 3), bool))
