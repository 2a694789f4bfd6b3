"""simOTA many-to-one matching for HIPIE's thing decoder (host solve via `jax.pure_callback`).

Follows the reference `HungarianMatcherVL.forward_ota` (HIPIE, after UNINEXT /
YOLOX). All boxes are normalised (cx, cy, w, h); the "anchor" of a prediction
is the centre of its *predicted box*. For one image with N predictions and M
ground-truth boxes:

* in-box[n, m]: the anchor lies strictly inside gt box m;
  in-centre[n, m]: it lies strictly inside the square of half-side
  `center_radius / expanded_stride` (2.5 / 32, in normalised units: the
  reference passes the constant stride 32) around gt centre m;
  candidate[n] = any_m in-box | any_m in-centre.
* cost = cost_class + 3 * (-GIoU) + 100 * not(in-box & in-centre), plus 1e4 on
  every column of a non-candidate prediction. `cost_class` is the focal token
  cost averaged over the gt's positive tokens (`simota_class_cost`).
* dynamic k[m] = max(1, int(sum of the top-min(N, 10) IoUs of gt m)); gt m takes
  its k[m] lowest-cost predictions.
* A prediction taken by several gts keeps only the gt of lowest cost in its
  whole cost row (the argmin over all gts, as the reference does).
* While some gt has no prediction: every matched prediction's costs grow by
  1e5, each unmatched gt takes its argmin prediction, and the predictions that
  had conflicts in the first round are resolved again (the reference reuses the
  first round's conflict set, so a prediction newly taken by two unmatched gts
  keeps both; it is then reported for the lower gt index).

Departures, both only where the reference is undefined: costs are computed in
float64 (the reference uses float32, where adding 1e5 rounds costs to 1/128),
ties are broken towards the lower prediction index, and when every prediction
is already matched and a round of the loop changes nothing (every later round
would repeat it: the reference loops forever) the remaining gts stay unmatched.

`simota_assign` is the NumPy core for one image; `simota_match` is the
jit/vmap-friendly wrapper that slices padded ground truth off on the host.
"""

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Cost added to every matched prediction per round of the unmatched-gt loop.
_MATCHED_PENALTY = 1e5


def simota_class_cost(logits: jax.Array,
                      positive_map: jax.Array,
                      alpha: float = 0.25,
                      gamma: float = 2.0) -> jax.Array:
  """Focal token classification cost of simOTA, on device.

  `cost[n, m] = mean over tokens t of gt m of (pos[n, t] - neg[n, t])` with
  `p = sigmoid(logit)`, `pos = alpha (1 - p)^gamma (-log(p + 1e-8))` and
  `neg = (1 - alpha) p^gamma (-log(1 - p + 1e-8))`.

  Args:
    logits: [..., N, T] token logits of the predictions.
    positive_map: [..., M, T] bool, the tokens of each gt's class name (or
      referring sentence).
    alpha: focal alpha (0.25).
    gamma: focal gamma (2.0).

  Returns:
    [..., N, M] float32 cost, gradient stopped. A gt with no positive token
    (a padded slot) gets cost 0.

  Raises:
    ValueError: on inconsistent shapes.
  """
  if (logits.ndim < 2 or positive_map.ndim != logits.ndim
      or positive_map.shape[:-2] != logits.shape[:-2]
      or positive_map.shape[-1] != logits.shape[-1]):
    raise ValueError(f'simota_class_cost: expected logits [..., N, T] and positive_map '
                     f'[..., M, T]; got {logits.shape} and {positive_map.shape}')
  prob = jax.nn.sigmoid(jax.lax.stop_gradient(logits).astype(jnp.float32))  # [..., N, T]
  neg = (1 - alpha) * prob ** gamma * (-jnp.log(1 - prob + 1e-8))  # [..., N, T]
  pos = alpha * (1 - prob) ** gamma * (-jnp.log(prob + 1e-8))  # [..., N, T]
  tokens = positive_map.astype(jnp.float32)  # [..., M, T]
  total = jnp.einsum('...nt,...mt->...nm', pos - neg, tokens,
                     precision=jax.lax.Precision.HIGHEST)  # [..., N, M]
  count = tokens.sum(-1)[..., None, :]  # [..., 1, M]
  return total / jnp.maximum(count, 1.0)  # [..., N, M]


def _cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
  cx, cy, w, h = np.moveaxis(boxes, -1, 0)
  return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def _iou_and_giou(boxes1: np.ndarray, boxes2: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Pairwise IoU and GIoU of xyxy boxes [N, 4] x [M, 4]."""
  area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])  # [N]
  area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])  # [M]
  lt = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
  rb = np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [N, M, 2]
  wh = np.clip(rb - lt, 0, None)  # [N, M, 2]
  inter = wh[..., 0] * wh[..., 1]  # [N, M]
  union = area1[:, None] + area2[None, :] - inter  # [N, M]
  iou = inter / union  # [N, M]
  lt = np.minimum(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
  rb = np.maximum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [N, M, 2]
  wh = np.clip(rb - lt, 0, None)  # [N, M, 2]
  hull = wh[..., 0] * wh[..., 1]  # [N, M]
  return iou, iou - (hull - union) / hull


def _resolve_conflicts(matching: np.ndarray, cost: np.ndarray, rows: np.ndarray) -> None:
  """Keeps only the lowest-cost gt (over the whole cost row) for each row in `rows`."""
  if rows.any():
    best = cost[rows].argmin(axis=1)  # [R]
    matching[rows] = False
    matching[np.flatnonzero(rows), best] = True


def simota_assign(cost_class: np.ndarray,
                  pred_boxes: np.ndarray,
                  gt_boxes: np.ndarray,
                  center_radius: float = 2.5,
                  expanded_stride: float = 32.0,
                  giou_weight: float = 3.0,
                  center_weight: float = 100.0,
                  outside_weight: float = 1e4,
                  candidate_k: int = 10) -> np.ndarray:
  """simOTA assignment of one image (NumPy, host).

  Args:
    cost_class: [N, M] classification cost (`simota_class_cost`).
    pred_boxes: [N, 4] predicted boxes, normalised (cx, cy, w, h); their centres
      are the anchors.
    gt_boxes: [M, 4] ground-truth boxes, normalised (cx, cy, w, h), w, h > 0.
    center_radius: centre-prior radius in strides (2.5).
    expanded_stride: the stride that divides the radius (the reference's 32,
      applied to normalised coordinates).
    giou_weight: weight of the -GIoU cost (3).
    center_weight: cost of not being both in the box and in the centre (100).
    outside_weight: cost added to predictions outside every box and centre (1e4).
    candidate_k: number of top IoUs summed for the dynamic k (10).

  Returns:
    [N] int32, the gt index each prediction is matched to, -1 for none.

  Raises:
    ValueError: on inconsistent shapes or non-finite inputs.
  """
  cost_class = np.asarray(cost_class, np.float64)
  pred_boxes = np.asarray(pred_boxes, np.float64)
  gt_boxes = np.asarray(gt_boxes, np.float64)
  num_pred, num_gt = cost_class.shape
  if pred_boxes.shape != (num_pred, 4) or gt_boxes.shape != (num_gt, 4):
    raise ValueError(f'simota_assign: expected cost_class [N, M], pred_boxes [N, 4] and '
                     f'gt_boxes [M, 4]; got {cost_class.shape}, {pred_boxes.shape}, '
                     f'{gt_boxes.shape}')
  for name, value in (('cost_class', cost_class), ('pred_boxes', pred_boxes),
                      ('gt_boxes', gt_boxes)):
    if not np.all(np.isfinite(value)):
      raise ValueError(f'simota_assign: {name} has NaN/inf entries')
  matched_gt = np.full((num_pred,), -1, np.int32)  # [N]
  if num_pred == 0 or num_gt == 0:
    return matched_gt

  gt_xyxy = _cxcywh_to_xyxy(gt_boxes)  # [M, 4]
  anchor_x = pred_boxes[:, 0:1]  # [N, 1]
  anchor_y = pred_boxes[:, 1:2]  # [N, 1]
  in_box = ((anchor_x > gt_xyxy[None, :, 0]) & (anchor_x < gt_xyxy[None, :, 2])
            & (anchor_y > gt_xyxy[None, :, 1]) & (anchor_y < gt_xyxy[None, :, 3]))  # [N, M]
  radius = center_radius / expanded_stride
  in_centre = ((anchor_x > gt_boxes[None, :, 0] - radius) & (anchor_x < gt_boxes[None, :, 0] + radius)
               & (anchor_y > gt_boxes[None, :, 1] - radius)
               & (anchor_y < gt_boxes[None, :, 1] + radius))  # [N, M]
  candidate = in_box.any(axis=1) | in_centre.any(axis=1)  # [N]

  iou, giou = _iou_and_giou(_cxcywh_to_xyxy(pred_boxes), gt_xyxy)  # [N, M], [N, M]
  cost = cost_class - giou_weight * giou + center_weight * ~(in_box & in_centre)  # [N, M]
  cost[~candidate] += outside_weight

  top = -np.sort(-iou, axis=0)[:min(num_pred, candidate_k)]  # [k, M]
  dynamic_k = np.maximum(np.trunc(top.sum(axis=0)).astype(np.int64), 1)  # [M]
  order = np.argsort(cost, axis=0, kind='stable')  # [N, M]
  rank = np.empty_like(order)  # [N, M]
  np.put_along_axis(rank, order, np.arange(num_pred)[:, None], axis=0)
  matching = rank < dynamic_k[None, :]  # [N, M]

  first_conflicts = matching.sum(axis=1) > 1  # [N]
  _resolve_conflicts(matching, cost, first_conflicts)
  while not matching.any(axis=0).all():
    before = matching.copy()
    cost[matching.any(axis=1)] += _MATCHED_PENALTY
    unmatched = np.flatnonzero(~matching.any(axis=0))  # [U]
    matching[cost[:, unmatched].argmin(axis=0), unmatched] = True
    if (matching.sum(axis=1) > 1).any():
      _resolve_conflicts(matching, cost, first_conflicts)
    if matching.any(axis=1).all() and np.array_equal(before, matching):
      break

  rows = matching.any(axis=1)  # [N]
  matched_gt[rows] = matching[rows].argmax(axis=1)
  return matched_gt


def _assign_on_host(cost_class, pred_boxes, gt_boxes, gt_valid, options):
  """Runs `simota_assign` per (flattened) batch element on its valid gts."""
  cost_class = np.asarray(cost_class)
  pred_boxes = np.asarray(pred_boxes)
  gt_boxes = np.asarray(gt_boxes)
  gt_valid = np.asarray(gt_valid).astype(bool)
  num_pred, num_gt = cost_class.shape[-2:]
  batch_shape = cost_class.shape[:-2]
  flat_cost = cost_class.reshape(-1, num_pred, num_gt)  # [B', N, M]
  flat_pred = pred_boxes.reshape(-1, num_pred, 4)  # [B', N, 4]
  flat_gt = gt_boxes.reshape(-1, num_gt, 4)  # [B', M, 4]
  flat_valid = gt_valid.reshape(-1, num_gt)  # [B', M]
  out = np.full((flat_cost.shape[0], num_pred), -1, np.int32)  # [B', N]
  for b in range(flat_cost.shape[0]):
    cols = np.flatnonzero(flat_valid[b])  # [Mv]
    if cols.size == 0:
      continue
    try:
      local = simota_assign(flat_cost[b][:, cols], flat_pred[b], flat_gt[b][cols], **options)
    except ValueError as err:
      raise ValueError(f'hiseg_jax.matching.simota_match: (flattened) batch element {b}: '
                       f'{err}') from err
    out[b] = np.where(local >= 0, cols[np.maximum(local, 0)], -1)
  out = out.reshape(batch_shape + (num_pred,))
  return out, out >= 0


def simota_match(cost_class: jax.Array,
                 pred_boxes: jax.Array,
                 gt_boxes: jax.Array,
                 gt_valid: jax.Array,
                 center_radius: float = 2.5,
                 expanded_stride: float = 32.0,
                 giou_weight: float = 3.0,
                 center_weight: float = 100.0,
                 outside_weight: float = 1e4,
                 candidate_k: int = 10) -> Tuple[jax.Array, jax.Array]:
  """simOTA matching inside `jax.jit`, solved on the host by `simota_assign`.

  Padded gt slots are sliced off per batch element before the solve, and the
  returned indices refer to the original (padded) slots. Under `jax.vmap` the
  callback receives all batch dims at once (`vmap_method="broadcast_all"`).

  Args:
    cost_class: [..., N, M] classification cost (`simota_class_cost`).
    pred_boxes: [..., N, 4] predicted boxes, normalised (cx, cy, w, h).
    gt_boxes: [..., M, 4] gt boxes, normalised (cx, cy, w, h).
    gt_valid: [..., M] bool, False for padded gt slots.
    center_radius: see `simota_assign`.
    expanded_stride: see `simota_assign`.
    giou_weight: see `simota_assign`.
    center_weight: see `simota_assign`.
    outside_weight: see `simota_assign`.
    candidate_k: see `simota_assign`.

  Returns:
    (matched_gt int32 [..., N]: gt slot of each prediction, -1 for none;
     matched bool [..., N]: matched_gt >= 0).

  Raises:
    ValueError: on shape mismatch (at trace time) or, when the callback runs,
      on non-finite costs or boxes of a batch element (surfaced by JAX as a
      runtime error carrying this message).
  """
  if (cost_class.ndim < 2 or pred_boxes.shape != cost_class.shape[:-1] + (4,)
      or gt_boxes.shape != cost_class.shape[:-2] + cost_class.shape[-1:] + (4,)
      or gt_valid.shape != gt_boxes.shape[:-1]):
    raise ValueError(f'simota_match: expected cost_class [..., N, M], pred_boxes [..., N, 4], '
                     f'gt_boxes [..., M, 4] and gt_valid [..., M]; got {cost_class.shape}, '
                     f'{pred_boxes.shape}, {gt_boxes.shape}, {gt_valid.shape}')
  options = dict(center_radius=center_radius, expanded_stride=expanded_stride,
                 giou_weight=giou_weight, center_weight=center_weight,
                 outside_weight=outside_weight, candidate_k=candidate_k)
  stop = lambda x: jax.lax.stop_gradient(x).astype(jnp.float32)
  out_shape = cost_class.shape[:-1]
  result_shapes = (jax.ShapeDtypeStruct(out_shape, jnp.int32),
                   jax.ShapeDtypeStruct(out_shape, jnp.bool_))
  return jax.pure_callback(
      lambda c, p, g, v: _assign_on_host(c, p, g, v, options), result_shapes,
      stop(cost_class), stop(pred_boxes), stop(gt_boxes), gt_valid.astype(jnp.bool_),
      vmap_method='broadcast_all')
