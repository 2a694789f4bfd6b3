"""HIPIE criteria against a PyTorch transcription of the reference loss flow.

The transcription (our own test code) follows HIPIE's `SetCriterion` /
`DINOCriterion` (`loss_labelsVL`, `loss_boxes` with `pred_boxious` and the
is-thing adjustment, point-sampled `loss_masks` with the sigmoid focal loss,
OTA normalisation by the number of matched pairs, the encoder's
`HungarianMatcherVL.forward(force_box_loss=True)` against class-agnostic
targets, `compute_gt_indices` for denoising) and MaskDINO's `SetCriterion` /
`HungarianMatcher` (VL focal class cost and loss, BCE/dice on shared uniform
points, L1/GIoU, "seg" denoising, interm outputs). It works on ragged targets
(the valid slots only), matches with the library's NumPy simOTA core
(`simota_assign`) and `scipy.optimize.linear_sum_assignment`, and re-derives the
random points from the keys documented in `hiseg_jax.losses.hipie_loss`.
Tolerance: rtol 2e-4 / atol 2e-5 on every term (float32; point-sampled terms
go through bilinear gathers in different orders).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from hiseg_jax.losses import hipie_loss
from hiseg_jax.losses.point_sampling import get_uncertain_point_coords_with_randomness
from hiseg_jax.losses.point_sampling import sample_uniform_points
from hiseg_jax.matching.simota import simota_assign

B, T, N, Q, QE, QS, G, H, HG = 2, 6, 4, 10, 8, 6, 2, 8, 16
NUM_POINTS, MATCH_POINTS = 16, 24
VALID = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
IS_THING = np.array([[1, 0, 1, 1], [1, 1, 0, 1]], bool)
TOL = dict(rtol=2e-4, atol=2e-5)


def thing_config():
  cfg = hipie_loss.default_thing_loss_config()
  cfg['num_points'] = NUM_POINTS
  return cfg


def stuff_config():
  cfg = hipie_loss.default_stuff_loss_config()
  cfg['num_points'] = NUM_POINTS
  cfg['match_num_points'] = MATCH_POINTS
  return cfg


def make_targets(rng):
  centre = rng.uniform(0.3, 0.7, (B, N, 2))
  size = rng.uniform(0.2, 0.5, (B, N, 2))
  boxes = np.concatenate([centre, size], -1).astype(np.float32)
  masks = (rng.uniform(size=(B, N, HG, HG)) > 0.5).astype(np.float32)
  positive_map = np.zeros((B, N, T), bool)
  for b, slot, tokens in [(0, 0, [0]), (0, 1, [1, 2]), (0, 2, [3]), (1, 0, [0, 1]), (1, 1, [2])]:
    positive_map[b, slot, tokens] = True
  positive_map[~VALID] = rng.uniform(size=(int((~VALID).sum()), T)) > 0.5  # garbage
  text_mask = np.zeros((B, T), bool)
  text_mask[0, :5] = True
  text_mask[1, :4] = True
  return dict(boxes=boxes, masks=masks, positive_map=positive_map, valid=VALID.copy(),
              is_thing=IS_THING.copy(), text_mask=text_mask)


def make_layer(rng, gt_boxes, num_queries, ious):
  """Predictions: most queries jitter a ground-truth box, the rest are random."""
  owner = rng.integers(0, 3, (B, num_queries))
  base = np.take_along_axis(gt_boxes, owner[..., None], axis=1)  # [B, Q, 4]
  centre = base[..., :2] + rng.normal(0, 0.03, (B, num_queries, 2))
  size = base[..., 2:] * rng.uniform(0.7, 1.3, (B, num_queries, 2))
  boxes = np.clip(np.concatenate([centre, size], -1), 0.02, 0.98)
  far = rng.uniform(size=(B, num_queries)) < 0.2
  boxes[far] = rng.uniform(0.05, 0.95, (int(far.sum()), 4)) * [1, 1, 0.3, 0.3]
  layer = dict(logits=(rng.normal(size=(B, num_queries, T)) * 2).astype(np.float32),
               boxes=boxes.astype(np.float32),
               masks=(rng.normal(size=(B, num_queries, H, H)) * 3).astype(np.float32))
  if ious:
    layer['ious'] = rng.normal(size=(B, num_queries)).astype(np.float32)
  return layer


def make_case(seed=0):
  rng = np.random.default_rng(seed)
  targets = make_targets(rng)
  gt_boxes = targets['boxes']
  thing = make_layer(rng, gt_boxes, Q, True)
  thing['aux'] = [make_layer(rng, gt_boxes, Q, True)]
  thing['enc'] = dict(logits=rng.normal(size=(B, QE, 1)).astype(np.float32),
                      boxes=make_layer(rng, gt_boxes, QE, False)['boxes'])
  thing['dn'] = make_layer(rng, gt_boxes, G * 2 * N, False)
  thing['dn']['aux'] = [make_layer(rng, gt_boxes, G * 2 * N, False)]
  stuff = make_layer(rng, gt_boxes, QS, False)
  stuff['aux'] = [make_layer(rng, gt_boxes, QS, False)]
  stuff['enc'] = make_layer(rng, gt_boxes, QS, False)
  stuff['dn'] = make_layer(rng, gt_boxes, G * N, False)
  stuff['dn']['aux'] = [make_layer(rng, gt_boxes, G * N, False)]
  return {'thing': thing, 'stuff': stuff}, targets


# ----------------------------------------------------------------------------- transcription

_coords_fn = jax.jit(
    lambda key, pair_id, mask: get_uncertain_point_coords_with_randomness(
        jax.random.fold_in(key, pair_id), mask, NUM_POINTS, 3.0, 0.75))


def loss_coords(key, b, rows, i0, i1, mask):
  pair_id = np.uint32(((b * rows + i0) * 4096 + i1) % 2**32)
  return torch.from_numpy(np.array(_coords_fn(key, pair_id, jnp.asarray(mask))))


def t_point_sample(masks, coords):
  """[n, H, W] x [n, P, 2] -> [n, P]."""
  grid = 2 * coords[:, :, None] - 1
  return F.grid_sample(masks[:, None], grid, align_corners=False)[:, 0, :, 0]


def t_xyxy(x):
  cx, cy, w, h = x.unbind(-1)
  return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def t_giou(boxes1, boxes2, hull_eps):
  area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
  area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
  lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
  rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
  wh = (rb - lt).clamp(min=0)
  inter = wh[:, :, 0] * wh[:, :, 1]
  union = area1[:, None] + area2 - inter
  iou = inter / union
  lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
  rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
  wh = (rb - lt).clamp(min=0)
  area = wh[:, :, 0] * wh[:, :, 1]
  return iou - (area - union) / (area + hull_eps), iou


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
  area_c = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
  return 1 - (iouk - (area_c - unionk) / (area_c + eps))


def t_focal(inputs, targets, alpha=0.25, gamma=2.0):
  prob = inputs.sigmoid()
  ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction='none')
  p_t = prob * targets + (1 - prob) * (1 - targets)
  return (alpha * targets + (1 - alpha) * (1 - targets)) * ce * ((1 - p_t) ** gamma)


def t_token_focal(logits, targets, text_mask):
  if text_mask is not None:
    keep = (text_mask > 0).unsqueeze(1).repeat(1, logits.size(1), 1)
    logits, targets = torch.masked_select(logits, keep), torch.masked_select(targets, keep)
  return t_focal(logits, targets).sum()


def t_dice(inputs, targets):
  inputs = inputs.sigmoid()
  return 1 - (2 * (inputs * targets).sum(-1) + 1) / (inputs.sum(-1) + targets.sum(-1) + 1)


def t_class_cost(logits, positive_map):
  prob = logits.sigmoid()
  neg = 0.75 * prob ** 2 * (-(1 - prob + 1e-8).log())
  pos = 0.25 * (1 - prob) ** 2 * (-(prob + 1e-8).log())
  cost = torch.zeros((prob.shape[0], positive_map.shape[0]))
  for j in range(positive_map.shape[0]):
    cost[:, j] = (pos[:, positive_map[j]] - neg[:, positive_map[j]]).mean(-1)
  return cost


def t(x):
  return torch.from_numpy(np.asarray(x))


def labels_vl(layer, indices, positive_maps, text_mask, num_boxes):
  logits = t(layer['logits'])
  onehot = torch.zeros(logits.shape)
  for b, (src, tgt) in enumerate(indices):
    for s, j in zip(src, tgt):
      onehot[b, s] = positive_maps[b][j].float()
  return t_token_focal(logits, onehot, text_mask) / num_boxes


def thing_boxes(layer, targets, indices, with_iou):
  """HIPIE `loss_boxes` with OTA (num_boxes = number of pairs) and the is-thing adjustment."""
  b_idx = np.concatenate([np.full(len(s), b) for b, (s, _) in enumerate(indices)]).astype(int)
  src = t(layer['boxes'])[b_idx, np.concatenate([s for s, _ in indices]).astype(int)]
  tgt_slots = np.concatenate([j for _, j in indices]).astype(int)
  target = t(targets['boxes'])[b_idx, tgt_slots]
  is_thing = t(targets['is_thing'])[b_idx, tgt_slots].float().reshape(-1, 1)
  out = {}
  if len(target) == 0 or is_thing.sum() == 0:
    return {'bbox': 0.0, 'giou': 0.0, 'iou': 0.0}
  adj = 1.0 / (is_thing.sum() + 1e-6) * is_thing.shape[0]
  num = src.shape[0]
  out['bbox'] = (F.l1_loss(src, target, reduction='none') * is_thing * adj).sum() / num
  out['giou'] = (t_fvcore_giou_loss(t_xyxy(src), t_xyxy(target)) * is_thing.view(-1)
                 * adj).sum() / num
  out['iou'] = 0.0
  if with_iou:
    with torch.no_grad():
      ious = torch.diag(t_giou(t_xyxy(src), t_xyxy(target), 1e-7)[1])
    pred = t(layer['ious'])[b_idx, np.concatenate([s for s, _ in indices]).astype(int)]
    out['iou'] = (F.binary_cross_entropy_with_logits(pred, ious, reduction='none')
                  * is_thing.view(-1)).mean() * adj
  return out


def point_mask_losses(layer, targets, pairs, key, rows, focal, num):
  """pairs: (b, query, slot, i0, i1); returns (mask, dice) sums / num."""
  if not pairs:
    return 0.0, 0.0
  coords = torch.stack([loss_coords(key, b, rows, i0, i1, layer['masks'][b, q])
                        for b, q, _, i0, i1 in pairs])
  pred = torch.stack([t(layer['masks'][b, q]) for b, q, _, _, _ in pairs])
  gt = torch.stack([t(targets['masks'][b, j]) for b, _, j, _, _ in pairs])
  logits, labels = t_point_sample(pred, coords), t_point_sample(gt, coords)
  if focal:
    mask = t_focal(logits, labels).mean(1).sum() / num
  else:
    mask = F.binary_cross_entropy_with_logits(logits, labels, reduction='none').mean(1).sum() / num
  return mask, t_dice(logits, labels).sum() / num


def ref_thing(outputs, targets, key):
  """Returns (total, terms) of the thing criterion, transcribed."""
  fg_key, dn_key = jax.random.split(key)
  valid_slots = [np.flatnonzero(targets['valid'][b]) for b in range(B)]
  thing_slots = [v[targets['is_thing'][b, v]] for b, v in enumerate(valid_slots)]
  pos_maps = [t(targets['positive_map'][b]) for b in range(B)]
  text_mask = t(targets['text_mask'])
  weights = dict(ce=2, bbox=5, giou=2, mask=5, dice=5, iou=1)
  layers = outputs['aux'] + [outputs]
  per_layer, matched_queries = [], []
  for layer, layer_key in zip(layers, jax.random.split(fg_key, len(layers))):
    indices = []
    for b in range(B):
      subset = thing_slots[b]
      cost = t_class_cost(t(layer['logits'][b]), pos_maps[b][subset])
      local = simota_assign(cost.numpy(), layer['boxes'][b], targets['boxes'][b][subset])
      src = np.flatnonzero(local >= 0)
      indices.append((src, subset[local[src]]))
    matched_queries.append([set(s.tolist()) for s, _ in indices])
    num = sum(len(s) for s, _ in indices)
    terms = dict(ce=0.0, bbox=0.0, giou=0.0, mask=0.0, dice=0.0, iou=0.0)
    if num:
      terms['ce'] = labels_vl(layer, indices, pos_maps, text_mask, num)
      terms.update(thing_boxes(layer, targets, indices, True))
      pairs = [(b, q, j, q, 0) for b, (s, tg) in enumerate(indices) for q, j in zip(s, tg)]
      terms['mask'], terms['dice'] = point_mask_losses(layer, targets, pairs, layer_key, Q,
                                                       True, num)
    per_layer.append({k: float(v) for k, v in terms.items()})
  total = sum(weights[k] * v for terms in per_layer for k, v in terms.items())
  out = {f'loss_{k}': v for k, v in per_layer[-1].items()}
  out['loss_aux'] = sum(weights[k] * v for k, v in per_layer[0].items())

  enc = outputs['enc']
  enc_maps = [torch.ones((len(v), 1), dtype=torch.bool) for v in valid_slots]
  indices = []
  for b in range(B):
    v = valid_slots[b]
    boxes, gt_boxes = t(enc['boxes'][b]), t(targets['boxes'][b][v])
    cost = (2 * t_class_cost(t(enc['logits'][b]), enc_maps[b])
            + 5 * torch.cdist(boxes, gt_boxes, p=1)
            - 2 * t_giou(t_xyxy(boxes), t_xyxy(gt_boxes), 1e-7)[0])
    src, tgt = linear_sum_assignment(cost.numpy())
    indices.append((src, v[tgt]))
  num = sum(len(s) for s, _ in indices)
  enc_maps_full = [torch.ones((N, 1), dtype=torch.bool) for _ in range(B)]
  enc_terms = dict(ce=float(labels_vl(enc, indices, enc_maps_full, None, num)))
  enc_terms.update({k: float(v) for k, v in thing_boxes(enc, targets, indices, False).items()})
  second = sum(weights[k] * enc_terms[k] for k in ('ce', 'bbox', 'giou'))
  out.update({f'enc/loss_{k}': enc_terms[k] for k in ('ce', 'bbox', 'giou')})

  dn = outputs['dn']
  dn_layers = dn['aux'] + [dn]
  groups = dn['logits'].shape[1] // (2 * N)
  indices = []
  for b in range(B):
    slots = valid_slots[b]
    src = (np.arange(groups)[:, None] * 2 * N + slots[None, :]).reshape(-1)
    indices.append((src, np.tile(slots, groups)))
  num = sum(len(s) for s, _ in indices)
  dn_terms = []
  for layer, layer_key in zip(dn_layers, jax.random.split(dn_key, len(dn_layers))):
    terms = dict(ce=labels_vl(layer, indices, pos_maps, text_mask, num))
    terms.update(thing_boxes(layer, targets, indices, False))
    pairs = [(b, g * 2 * N + j, j, g, j) for b in range(B) for g in range(groups)
             for j in valid_slots[b]]
    terms['mask'], terms['dice'] = point_mask_losses(layer, targets, pairs, layer_key, groups,
                                                     True, num)
    dn_terms.append({k: float(v) for k, v in terms.items() if k != 'iou'})
  second += sum(weights[k] * v for terms in dn_terms for k, v in terms.items())
  out.update({f'dn/loss_{k}': v for k, v in dn_terms[-1].items()})
  out['dn/loss_aux'] = sum(weights[k] * v for k, v in dn_terms[0].items())
  has_fg = any(len(s) for s in thing_slots)
  return total + (second if has_fg else 0.0), out, matched_queries


def ref_stuff(outputs, targets, key):
  """Returns (total, terms) of the MaskDINO criterion, transcribed."""
  main_key, dn_key = jax.random.split(key)
  valid_slots = [np.flatnonzero(targets['valid'][b]) for b in range(B)]
  pos_maps = [t(targets['positive_map'][b]) for b in range(B)]
  text_mask = t(targets['text_mask'])
  num_masks = max(sum(len(v) for v in valid_slots), 1)
  weights = dict(ce=4, bbox=5, giou=2, mask=5, dice=5)

  def losses(layer, indices, key, rows, ids, num):
    b_idx = np.concatenate([np.full(len(s), b) for b, (s, _) in enumerate(indices)]).astype(int)
    q_idx = np.concatenate([s for s, _ in indices]).astype(int)
    slots = np.concatenate([j for _, j in indices]).astype(int)
    src, target = t(layer['boxes'])[b_idx, q_idx], t(targets['boxes'])[b_idx, slots]
    terms = dict(ce=labels_vl(layer, indices, pos_maps, text_mask, num),
                 bbox=F.l1_loss(src, target, reduction='none').sum() / num,
                 giou=(1 - torch.diag(t_giou(t_xyxy(src), t_xyxy(target), 1e-6)[0])).sum() / num)
    pairs = [(b, q, j) + ids(b, q, j) for b, q, j in zip(b_idx, q_idx, slots)]
    terms['mask'], terms['dice'] = point_mask_losses(layer, targets, pairs, key, rows, False, num)
    return {k: float(v) for k, v in terms.items()}

  layers = outputs['aux'] + [outputs, outputs['enc']]
  per_layer = []
  for layer, layer_key in zip(layers, jax.random.split(main_key, len(layers))):
    match_key, loss_key = jax.random.split(layer_key)
    coords = t(np.array(sample_uniform_points(match_key, MATCH_POINTS, (B,))))
    indices = []
    for b in range(B):
      v = valid_slots[b]
      out_pts = t_point_sample(t(layer['masks'][b]), coords[b][None].expand(QS, -1, -1))
      tgt_pts = t_point_sample(t(targets['masks'][b][v]), coords[b][None].expand(len(v), -1, -1))
      pos = F.binary_cross_entropy_with_logits(out_pts, torch.ones_like(out_pts), reduction='none')
      neg = F.binary_cross_entropy_with_logits(out_pts, torch.zeros_like(out_pts),
                                               reduction='none')
      cost_mask = (torch.einsum('nc,mc->nm', pos, tgt_pts)
                   + torch.einsum('nc,mc->nm', neg, 1 - tgt_pts)) / MATCH_POINTS
      prob = out_pts.sigmoid()
      cost_dice = 1 - (2 * torch.einsum('nc,mc->nm', prob, tgt_pts) + 1) / (
          prob.sum(-1)[:, None] + tgt_pts.sum(-1)[None, :] + 1)
      boxes, gt_boxes = t(layer['boxes'][b]), t(targets['boxes'][b][v])
      cost = (5 * cost_mask + 4 * t_class_cost(t(layer['logits'][b]), pos_maps[b][v])
              + 5 * cost_dice + 5 * torch.cdist(boxes, gt_boxes, p=1)
              - 2 * t_giou(t_xyxy(boxes), t_xyxy(gt_boxes), 1e-6)[0])
      src, tgt = linear_sum_assignment(cost.numpy())
      indices.append((src, v[tgt]))
    per_layer.append(losses(layer, indices, loss_key, QS, lambda b, q, j: (q, 0), num_masks))
  total = sum(weights[k] * v for terms in per_layer for k, v in terms.items())
  out = {f'loss_{k}': v for k, v in per_layer[-2].items()}
  out.update({f'enc/loss_{k}': v for k, v in per_layer[-1].items()})
  out['loss_aux'] = sum(weights[k] * v for k, v in per_layer[0].items())

  dn = outputs['dn']
  dn_layers = dn['aux'] + [dn]
  groups = dn['logits'].shape[1] // N
  indices = []
  for b in range(B):
    slots = valid_slots[b]
    indices.append(((np.arange(groups)[:, None] * N + slots[None, :]).reshape(-1),
                    np.tile(slots, groups)))
  dn_terms = [losses(layer, indices, layer_key, groups, lambda b, q, j: (q // N, j),
                     num_masks * groups)
              for layer, layer_key in zip(dn_layers, jax.random.split(dn_key, len(dn_layers)))]
  total += sum(weights[k] * v for terms in dn_terms for k, v in terms.items())
  out.update({f'dn/loss_{k}': v for k, v in dn_terms[-1].items()})
  out['dn/loss_aux'] = sum(weights[k] * v for k, v in dn_terms[0].items())
  return total, out


# ----------------------------------------------------------------------------- tests

CONFIG = {'thing': thing_config(), 'stuff': stuff_config()}
_value_and_grad = jax.jit(jax.value_and_grad(
    lambda outputs, targets, key: hipie_loss.hipie_criterion(outputs, targets, key, CONFIG),
    has_aux=True))


def run(outputs, targets, key):
  targets = dict(targets)
  targets.setdefault('active', np.ones((B,), bool))
  jax_targets = {'thing': targets, 'stuff': targets}
  (total, terms), grads = _value_and_grad(outputs, jax_targets, key)
  return float(total), {k: float(v) for k, v in terms.items()}, grads


@pytest.fixture(scope='module', name='case')
def fixture_case():
  outputs, targets = make_case()
  key = jax.random.PRNGKey(3)
  total, terms, grads = run(outputs, targets, key)
  return dict(outputs=outputs, targets=targets, key=key, total=total, terms=terms, grads=grads)


def test_criteria_match_the_transcription(case):
  thing_key, stuff_key = jax.random.split(case['key'])
  thing_total, thing_terms, _ = ref_thing(case['outputs']['thing'], case['targets'], thing_key)
  stuff_total, stuff_terms = ref_stuff(case['outputs']['stuff'], case['targets'], stuff_key)
  expected = {f'thing/{k}': v for k, v in thing_terms.items()}
  expected.update({f'stuff/{k}': v for k, v in stuff_terms.items()})
  assert sorted(expected) == sorted(case['terms'])
  for name, value in expected.items():
    np.testing.assert_allclose(case['terms'][name], value, err_msg=name, **TOL)
  np.testing.assert_allclose(case['total'], thing_total + stuff_total, **TOL)
  assert case['terms']['thing/loss_mask'] > 0 and case['terms']['thing/dn/loss_mask'] > 0


def test_gradients_are_finite_and_reach_only_supervised_masks(case):
  grads = case['grads']
  for leaf in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf)))
  thing_key, _ = jax.random.split(case['key'])
  _, _, matched = ref_thing(case['outputs']['thing'], case['targets'], thing_key)
  mask_grad = np.abs(np.asarray(grads['thing']['masks'])).sum((2, 3))  # [B, Q]
  for b in range(B):
    hit = np.zeros(Q, bool)
    hit[sorted(matched[-1][b])] = True
    assert np.all(mask_grad[b, ~hit] == 0) and np.all(mask_grad[b, hit] > 0)
  enc_grad = np.asarray(grads['thing']['enc']['logits'])
  assert np.abs(enc_grad).sum() > 0
  dn_mask_grad = np.abs(np.asarray(grads['thing']['dn']['masks'])).sum((2, 3))  # [B, G*2N]
  negatives = (np.arange(G * 2 * N) % (2 * N)) >= N
  assert np.all(dn_mask_grad[:, negatives] == 0)


def test_padding_slots_change_nothing(case):
  rng = np.random.default_rng(7)
  targets = {k: v.copy() for k, v in case['targets'].items()}
  pad = ~VALID
  targets['boxes'][pad] = rng.uniform(0.05, 0.9, (int(pad.sum()), 4))
  targets['masks'][pad] = rng.uniform(size=(int(pad.sum()), HG, HG))
  targets['positive_map'][pad] = rng.uniform(size=(int(pad.sum()), T)) > 0.3
  targets['is_thing'][pad] = ~targets['is_thing'][pad]
  total, terms, _ = run(case['outputs'], targets, case['key'])
  np.testing.assert_allclose(total, case['total'], rtol=1e-6)
  for name, value in case['terms'].items():
    np.testing.assert_allclose(terms[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_inactive_samples_and_batches_without_things(case):
  targets = {k: v.copy() for k, v in case['targets'].items()}
  targets['is_thing'][:] = False
  _, stuff_key = jax.random.split(case['key'])
  total, terms, _ = run(case['outputs'], targets, case['key'])
  # No thing: the matched-query terms vanish and the reference drops dn + encoder losses.
  for name in ('ce', 'bbox', 'giou', 'mask', 'dice', 'iou', 'aux'):
    assert terms[f'thing/loss_{name}'] == 0.0
  np.testing.assert_allclose(
      total, ref_stuff(case['outputs']['stuff'], targets, stuff_key)[0], **TOL)

  # Sample 1 inactive: as if it had no objects and its queries added no focal term.
  total, terms, _ = run(case['outputs'], dict(case['targets'], active=np.array([True, False])),
                        case['key'])
  only_first = {k: v.copy() for k, v in case['targets'].items()}
  only_first['valid'][1] = False
  silenced = jax.tree_util.tree_map(np.copy, case['outputs'])
  for group in ('thing', 'stuff'):
    out = silenced[group]
    for layer in [out, *out['aux'], out['dn'], *out['dn']['aux'], out['enc']]:
      layer['logits'][1] = -60.0  # sigmoid(-60)^2 underflows: zero focal loss
  expected, expected_terms, _ = run(silenced, only_first, case['key'])
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  for name, value in expected_terms.items():
    np.testing.assert_allclose(terms[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_labels_are_one_hot_positive_maps():
  targets = dict(boxes=jnp.zeros((1, 2, 4)), masks=jnp.zeros((1, 2, 4, 4)),
                 valid=jnp.asarray([[True, False]]), labels=jnp.asarray([[2, -1]]))
  assert hipie_loss._check_targets('stuff_criterion', targets, 1, 5, allow_labels=True) == 2
  gt = hipie_loss._prepare_targets(targets, 1, 5)
  np.testing.assert_array_equal(gt.positive_map, [[[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]])
  np.testing.assert_array_equal(gt.text_mask, np.ones((1, 5)))


def test_config_validation():
  cfg = hipie_loss.default_hipie_loss_config()
  assert hipie_loss.check_hipie_loss_config(cfg) == cfg
  bad = dict(cfg['thing'], extra=1.0)
  with pytest.raises(ValueError, match='unknown keys'):
    hipie_loss.check_thing_loss_config(bad)
  with pytest.raises(ValueError, match='class_weight'):
    hipie_loss.check_stuff_loss_config(dict(cfg['stuff'], class_weight='4'))
  with pytest.raises(ValueError, match='matcher'):
    hipie_loss.check_stuff_loss_config(dict(cfg['stuff'], matcher='greedy'))
  with pytest.raises(ValueError, match='num_points'):
    hipie_loss.check_thing_loss_config(dict(cfg['thing'], num_points=0))
  with pytest.raises(ValueError, match="exactly the keys"):
    hipie_loss.check_hipie_loss_config({'thing': cfg['thing']})


def test_bad_inputs_raise_clear_errors():
  outputs, targets = make_case()
  key = jax.random.PRNGKey(0)
  thing, stuff = outputs['thing'], outputs['stuff']
  with pytest.raises(ValueError, match="positive_map"):
    hipie_loss.thing_criterion(thing, {k: v for k, v in targets.items() if k != 'positive_map'},
                               key, thing_config())
  with pytest.raises(ValueError, match=r"\['dn'\] must hold G \* 2N"):
    hipie_loss.thing_criterion(dict(thing, dn=make_layer(np.random.default_rng(0),
                                                         targets['boxes'], 10, False)),
                               targets, key, thing_config())
  with pytest.raises(ValueError, match=r"\['aux'\]\[0\]\['boxes'\]"):
    hipie_loss.thing_criterion(dict(thing, aux=[dict(thing['aux'][0], boxes=np.zeros((B, Q, 3)))]),
                               targets, key, thing_config())
  with pytest.raises(ValueError, match="targets\\['masks'\\]"):
    hipie_loss.stuff_criterion(stuff, dict(targets, masks=np.zeros((B, N, HG))), key,
                               stuff_config())
  with pytest.raises(ValueError, match="not both"):
    hipie_loss.stuff_criterion(stuff, dict(targets, labels=np.zeros((B, N), int)), key,
                               stuff_config())
  with pytest.raises(ValueError, match=r"outputs\['enc'\] must have the shapes"):
    hipie_loss.stuff_criterion(dict(stuff, enc=make_layer(np.random.default_rng(0),
                                                          targets['boxes'], 3, False)),
                               targets, key, stuff_config())
