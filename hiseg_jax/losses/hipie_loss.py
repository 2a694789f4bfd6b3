"""HIPIE's training criteria: the thing decoder (simOTA) and the stuff decoder (MaskDINO).

Follows the official implementation (HIPIE `DDETRSegmUniDN.coco_forward` with
`DINOCriterion` / `SetCriterion` for things, MaskDINO's `SetCriterion` and
`HungarianMatcher` for stuff) with the r50 settings (OTA, point-sampled masks,
IoU branch, still classifier for the encoder, MaskDINO "seg" denoising).

Ground truth (`targets`, one dict per criterion): `boxes` [B, N, 4] normalised
cxcywh, `masks` [B, N, h, w] in [0, 1] (any resolution: losses read them at
normalised points), `valid` [B, N] (False for padded slots) and either
`positive_map` [B, N, T] (the text tokens of each object's class name or
referring sentence) or, for the stuff criterion only, `labels` [B, N] int
(closed-set class logits [B, Q, C]: the positive map is one_hot(label, C)).
Optional: `is_thing` [B, N] (default all True), `text_mask` [B, T] (1 on real
tokens, default all), `active` [B] (False drops the sample from the criterion
entirely, e.g. referring samples for the stuff decoder, which the reference
trains on detection batches only). The reference gives both criteria all
panoptic segments; the thing criterion selects `valid & is_thing` for its
matched queries.

Thing criterion (`thing_criterion`). `outputs`:
* final layer `logits` [B, Q, T], `boxes` [B, Q, 4], `masks` [B, Q, h, w],
  optional `ious` [B, Q] (IoU-head logits); `aux`: the earlier decoder layers,
  same keys and shapes (all with `ious` or none).
* optional `enc` (absent or None: no encoder terms): the two-stage encoder
  proposals, `logits` [B, Qe, Te], `boxes` [B, Qe, 4]. Te == 1 is the still
  (class-agnostic) classifier: every object's positive map is [1] and no text
  mask applies; otherwise the objects' positive maps and the text mask are used.
* optional `dn` (absent or None: no denoising terms): the denoising queries,
  `logits` [B, Qd, T], `boxes`, `masks`
  [B, Qd, h, w] and `aux` (earlier layers). Layout (DINO's dn_meta with
  `single_padding` = 2N, N the gt slot count): Qd = G * 2N, group g holds the
  positive query of gt slot m at `g * 2N + m` and its negative at
  `g * 2N + N + m`; slots past an image's objects are padding queries.

Per decoder layer (final and aux), the predictions are matched to the valid
thing objects by simOTA (`simota_class_cost` + `simota_match`, many-to-one),
then with n = number of matched queries in the batch:
* `ce`: token sigmoid focal (alpha .25, gamma 2) over all queries and real
  tokens, targets = positive map of the matched object, / n;
* `bbox` (L1) and `giou` (fvcore `giou_loss`) over matched queries whose object
  is a thing, / (n_thing + 1e-6) (the reference's `adj_factor_is_thing`);
* `iou`: BCE of the IoU head against the IoU of predicted and matched boxes,
  same normaliser (weight 1: the reference leaves `loss_boxiou` out of its
  weight dict, so it enters the sum unweighted);
* `mask` and `dice`: on `num_points` uncertainty-sampled points per matched mask
  (sigmoid *focal* loss, alpha .25, gamma 2, averaged over points; and dice), / n.
Every term is 0 when n (or n_thing) is 0. The encoder proposals are matched by
Hungarian on `enc_cost_class * focal class cost + enc_cost_bbox * L1 +
enc_cost_giou * (-GIoU)` against all valid objects (things and stuff) and get
`ce`, `bbox`, `giou`. The denoising queries use the known matching (positive
query of each valid object in every group) against all valid objects and get
`ce` (negatives and padding queries have all-zero targets), `bbox`, `giou`,
`mask`, `dice`. Total = fg_weight * sum over layers + dn_weight * (dn layers +
encoder), where the dn/encoder part is dropped (as the reference's
`all_weights[2] = 0`) when the batch has no valid thing.

Stuff criterion (`stuff_criterion`). `outputs`: final `logits` [B, Q, T],
`boxes`, `masks` [B, Q, h, w], `aux` (initial prediction and earlier layers),
optional `enc` (MaskDINO's `interm_outputs`, same keys and shapes) and optional `dn`
(same keys plus `aux`; layout: Qd = G * N, the query of slot m in group g at
`g * N + m`, no negatives). Each layer and the encoder output are matched by
Hungarian on `cost_class * focal class cost + cost_mask * BCE + cost_dice *
dice + cost_bbox * L1 + cost_giou * (-GIoU)`, the mask costs on
`match_num_points` uniform points shared by an image's masks; the losses,
normalised by num_masks = max(valid objects in the batch, 1) (num_masks * G
for dn), are the token focal `ce`, point-sampled `mask` (BCE) and `dice`, and
`bbox` / `giou` (MaskDINO's box ops) on every matched object. Total =
loss_weight * (class_weight ce + mask_weight mask + dice_weight dice +
bbox_weight bbox + giou_weight giou) summed over layers, encoder and dn.

Normalisers are batch-global (no collective needed under jit with sharded
arrays). For stuff this equals the reference's all-reduced average; for things
the reference divides by each GPU's own matched count.

Randomness (documented so tests can re-derive the points). Thing:
`fg_key, dn_key = jax.random.split(rng)`, one key per layer from
`jax.random.split(fg_key, L)` (order aux[0], ..., final), likewise for dn; the
encoder terms use no randomness. Stuff: `main_key, dn_key =
jax.random.split(rng)`, layer keys `jax.random.split(main_key, L)` over aux[0],
..., final, enc (when present), each split into `match_key, loss_key`; dn layer
keys `jax.random.split(dn_key, L_dn)` are loss keys. Matching points:
`sample_uniform_points(match_key, match_num_points, (B,))`. Loss points of a
matched pair in image b: `get_uncertain_point_coords_with_randomness(
fold_in(loss_key, (b * R + i0) * 4096 + i1), pred_mask [h, w], num_points,
oversample_ratio, importance_sample_ratio)` (uint32 arithmetic), with
(i0, i1, R) = (query, 0, Q) for matched queries and (group, gt slot, G) for
denoising pairs, so padding slots never move the points.
`hipie_criterion` splits `thing_key, stuff_key = jax.random.split(rng)`.

The layers of a kind are stacked (one extra copy of their masks) and run by
`jax.lax.map`, so compile time does not grow with depth; they must share shapes.
For simOTA the matched queries of an image are gathered into
K = min(Q, (candidate_k + 1) * N) slots (matched queries in ascending order
first): the first round matches at most the sum of the dynamic k <= candidate_k
per object, and the unmatched-object rounds add at most one query per object
that lost all of its own.
"""

import functools
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from hiseg_jax.boxes import box_cxcywh_to_xyxy
from hiseg_jax.boxes import box_l1_distance
from hiseg_jax.boxes import generalized_box_iou
from hiseg_jax.losses.loss_config import check_loss_config
from hiseg_jax.losses.box_losses import box_iou_bce_loss
from hiseg_jax.losses.box_losses import giou_loss
from hiseg_jax.losses.box_losses import l1_box_loss
from hiseg_jax.losses.focal import sigmoid_focal_loss
from hiseg_jax.losses.focal import token_sigmoid_focal_loss
from hiseg_jax.losses.mask_losses import dice_loss
from hiseg_jax.losses.mask_losses import sigmoid_ce_loss
from hiseg_jax.losses.point_sampling import get_uncertain_point_coords_with_randomness
from hiseg_jax.losses.point_sampling import point_sample
from hiseg_jax.losses.point_sampling import sample_uniform_points
from hiseg_jax.matching import get_matcher
from hiseg_jax.matching.costs import batch_dice_cost
from hiseg_jax.matching.costs import batch_sigmoid_ce_cost
from hiseg_jax.matching.simota import simota_class_cost
from hiseg_jax.matching.simota import simota_match

THING_TERMS = ("ce", "bbox", "giou", "mask", "dice", "iou")
STUFF_TERMS = ("ce", "bbox", "giou", "mask", "dice")
# Config key of each term's loss weight.
_WEIGHT_KEYS = {"ce": "class_weight", "bbox": "bbox_weight", "giou": "giou_weight",
                "mask": "mask_weight", "dice": "dice_weight", "iou": "iou_weight"}

# GIoU epsilons (union, hull): fvcore's giou_loss, HIPIE's and MaskDINO's box ops.
_FVCORE_EPS = (1e-7, 1e-7)
_HIPIE_EPS = (0.0, 1e-7)
_MASKDINO_EPS = (0.0, 1e-6)
# Target for unmatched positions (masked out afterwards): keeps every box term finite.
_DUMMY_BOX = (0.5, 0.5, 1.0, 1.0)
# Pair ids enter the point-sampling key as (b * rows + i0) * _SLOT_SPAN + i1 (uint32).
_SLOT_SPAN = 4096

_NUM = (int, float)
_THING_TYPES = {
    "class_weight": _NUM, "bbox_weight": _NUM, "giou_weight": _NUM, "mask_weight": _NUM,
    "dice_weight": _NUM, "iou_weight": _NUM, "focal_alpha": _NUM, "focal_gamma": _NUM,
    "enc_cost_class": _NUM, "enc_cost_bbox": _NUM, "enc_cost_giou": _NUM,
    "fg_weight": _NUM, "dn_weight": _NUM,
    "num_points": (int,), "oversample_ratio": _NUM, "importance_sample_ratio": _NUM,
    "center_radius": _NUM, "expanded_stride": _NUM, "simota_giou_weight": _NUM,
    "center_weight": _NUM, "outside_weight": _NUM, "candidate_k": (int,),
    "matcher": (str,),
}
_STUFF_TYPES = {
    "class_weight": _NUM, "mask_weight": _NUM, "dice_weight": _NUM, "bbox_weight": _NUM,
    "giou_weight": _NUM, "cost_class": _NUM, "cost_mask": _NUM, "cost_dice": _NUM,
    "cost_bbox": _NUM, "cost_giou": _NUM, "focal_alpha": _NUM, "focal_gamma": _NUM,
    "num_points": (int,), "match_num_points": (int,), "oversample_ratio": _NUM,
    "importance_sample_ratio": _NUM, "loss_weight": _NUM, "matcher": (str,),
}


def default_thing_loss_config() -> Dict[str, Any]:
  """Returns the thing-criterion settings of the reference r50 model.

  Returns:
    Dict: loss weights `class_weight` 2, `bbox_weight` 5, `giou_weight` 2,
    `mask_weight` 5, `dice_weight` 5, `iou_weight` 1; `focal_alpha` .25,
    `focal_gamma` 2; encoder Hungarian costs `enc_cost_class` 2, `enc_cost_bbox`
    5, `enc_cost_giou` 2; `fg_weight` 1 (FINAL_FG_WEIGHT) and `dn_weight` 1
    (FINAL_GT_WEIGHT, denoising + encoder); mask points `num_points` 12544,
    `oversample_ratio` 3, `importance_sample_ratio` .75; simOTA `center_radius`
    2.5, `expanded_stride` 32, `simota_giou_weight` 3, `center_weight` 100,
    `outside_weight` 1e4, `candidate_k` 10; `matcher` "hungarian_host".
  """
  return {
      "class_weight": 2.0, "bbox_weight": 5.0, "giou_weight": 2.0, "mask_weight": 5.0,
      "dice_weight": 5.0, "iou_weight": 1.0, "focal_alpha": 0.25, "focal_gamma": 2.0,
      "enc_cost_class": 2.0, "enc_cost_bbox": 5.0, "enc_cost_giou": 2.0,
      "fg_weight": 1.0, "dn_weight": 1.0,
      "num_points": 12544, "oversample_ratio": 3.0, "importance_sample_ratio": 0.75,
      "center_radius": 2.5, "expanded_stride": 32.0, "simota_giou_weight": 3.0,
      "center_weight": 100.0, "outside_weight": 1e4, "candidate_k": 10,
      "matcher": "hungarian_host",
  }


def default_stuff_loss_config() -> Dict[str, Any]:
  """Returns the stuff (MaskDINO) criterion settings of the reference.

  Returns:
    Dict: loss weights `class_weight` 4, `mask_weight` 5, `dice_weight` 5,
    `bbox_weight` 5, `giou_weight` 2; Hungarian costs `cost_class` 4,
    `cost_mask` 5, `cost_dice` 5, `cost_bbox` 5, `cost_giou` 2; `focal_alpha`
    .25, `focal_gamma` 2; `num_points` 12544, `match_num_points` 12544,
    `oversample_ratio` 3, `importance_sample_ratio` .75; `loss_weight` 1
    (MASKDINO.LOSS_WEIGHT); `matcher` "hungarian_host".
  """
  return {
      "class_weight": 4.0, "mask_weight": 5.0, "dice_weight": 5.0, "bbox_weight": 5.0,
      "giou_weight": 2.0, "cost_class": 4.0, "cost_mask": 5.0, "cost_dice": 5.0,
      "cost_bbox": 5.0, "cost_giou": 2.0, "focal_alpha": 0.25, "focal_gamma": 2.0,
      "num_points": 12544, "match_num_points": 12544, "oversample_ratio": 3.0,
      "importance_sample_ratio": 0.75, "loss_weight": 1.0, "matcher": "hungarian_host",
  }


def default_hipie_loss_config() -> Dict[str, Dict[str, Any]]:
  """Returns `{"thing": default_thing_loss_config(), "stuff": default_stuff_loss_config()}`."""
  return {"thing": default_thing_loss_config(), "stuff": default_stuff_loss_config()}


def check_thing_loss_config(config: Mapping[str, Any]) -> Dict[str, Any]:
  """Validates a thing-criterion config (dict or ConfigDict) and returns a plain dict.

  Args:
    config: mapping with exactly the keys of `default_thing_loss_config()`.

  Returns:
    The settings as a dict.

  Raises:
    ValueError: on missing or unknown keys, wrong types or bad values.
  """
  return check_loss_config("HIPIE thing loss config", config, _THING_TYPES)


def check_stuff_loss_config(config: Mapping[str, Any]) -> Dict[str, Any]:
  """Validates a stuff-criterion config (dict or ConfigDict) and returns a plain dict.

  Args:
    config: mapping with exactly the keys of `default_stuff_loss_config()`.

  Returns:
    The settings as a dict.

  Raises:
    ValueError: on missing or unknown keys, wrong types or bad values.
  """
  return check_loss_config("HIPIE stuff loss config", config, _STUFF_TYPES)


def check_hipie_loss_config(config: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
  """Validates `{"thing": ..., "stuff": ...}` and returns plain dicts.

  Args:
    config: mapping with exactly the keys "thing" and "stuff".

  Returns:
    `{"thing": dict, "stuff": dict}`.

  Raises:
    ValueError: on a bad layout or a bad sub-config.
  """
  if set(config.keys()) != {"thing", "stuff"}:
    raise ValueError(f"HIPIE loss config: expected exactly the keys ['stuff', 'thing'], got "
                     f"{sorted(config.keys())}")
  return {"thing": check_thing_loss_config(config["thing"]),
          "stuff": check_stuff_loss_config(config["stuff"])}


class _Targets(NamedTuple):
  """Validated ground truth; `valid` already includes `active`."""
  boxes: jax.Array  # [B, N, 4] float32
  masks: jax.Array  # [B, N, h, w] float32
  positive_map: jax.Array  # [B, N, T] float32
  valid: jax.Array  # [B, N] bool
  is_thing: jax.Array  # [B, N] bool
  text_mask: jax.Array  # [B, T] float32
  active: jax.Array  # [B] bool


def _check_targets(name: str, targets: Mapping[str, jax.Array], batch_size: int,
                   num_tokens: int, allow_labels: bool) -> int:
  """Checks the ground-truth dict against the contract; returns the slot count N."""
  label_key = "positive_map" if "positive_map" in targets else "labels"
  missing = [k for k in ("boxes", "masks", "valid") if k not in targets]
  if label_key not in targets:
    missing.append("positive_map" + (" or labels" if allow_labels else ""))
  if missing:
    raise ValueError(f"{name}: targets lack {missing}; got {sorted(targets)}")
  if allow_labels and "positive_map" in targets and "labels" in targets:
    raise ValueError(f"{name}: targets must hold 'positive_map' or 'labels', not both")
  if label_key == "labels" and not allow_labels:
    raise ValueError(f"{name}: targets need 'positive_map' [B, N, T]")
  if label_key == "labels" and "text_mask" in targets:
    raise ValueError(f"{name}: 'text_mask' applies to token logits, not to 'labels'")
  valid = targets["valid"]
  if valid.ndim != 2 or valid.shape[0] != batch_size:
    raise ValueError(f"{name}: targets['valid'] must be [B={batch_size}, N], got {valid.shape}")
  num_slots = valid.shape[1]
  expect = {"boxes": (batch_size, num_slots, 4), "is_thing": (batch_size, num_slots),
            "text_mask": (batch_size, num_tokens), "active": (batch_size,),
            "labels": (batch_size, num_slots),
            "positive_map": (batch_size, num_slots, num_tokens)}
  for key, shape in expect.items():
    if key in targets and targets[key].shape != shape:
      raise ValueError(f"{name}: targets[{key!r}] must be {shape} (B, N, T from valid and the "
                       f"logits), got {targets[key].shape}")
  masks = targets["masks"]
  if masks.ndim != 4 or masks.shape[:2] != (batch_size, num_slots):
    raise ValueError(f"{name}: targets['masks'] must be [B={batch_size}, N={num_slots}, h, w], "
                     f"got {masks.shape}")
  return num_slots


def _prepare_targets(targets: Mapping[str, jax.Array], batch_size: int,
                     num_tokens: int) -> _Targets:
  """Converts checked ground truth (`_check_targets`) and fills the optional entries."""
  valid = targets["valid"]
  if "labels" in targets:
    positive_map = jax.nn.one_hot(targets["labels"], num_tokens, dtype=jnp.float32)  # [B, N, C]
  else:
    positive_map = (targets["positive_map"] > 0).astype(jnp.float32)  # [B, N, T]
  active = targets.get("active", jnp.ones((batch_size,), jnp.bool_)).astype(jnp.bool_)  # [B]
  return _Targets(
      boxes=targets["boxes"].astype(jnp.float32),
      masks=targets["masks"].astype(jnp.float32),
      positive_map=positive_map,
      valid=valid.astype(jnp.bool_) & active[:, None],
      is_thing=targets.get("is_thing", jnp.ones(valid.shape, jnp.bool_)).astype(jnp.bool_),
      text_mask=(targets.get("text_mask", jnp.ones((batch_size, num_tokens))) > 0
                 ).astype(jnp.float32),
      active=active)


def _check_layer(name: str, where: str, layer: Any, keys: Sequence[str],
                 batch_size: int, num_tokens: Optional[int]) -> None:
  """Raises when a prediction dict lacks `keys` or has mis-shaped entries."""
  if not isinstance(layer, Mapping) or any(k not in layer for k in keys):
    got = sorted(layer) if isinstance(layer, Mapping) else type(layer).__name__
    raise ValueError(f"{name}: outputs{where} needs {list(keys)}; got {got}")
  logits = layer["logits"]
  if logits.ndim != 3 or logits.shape[0] != batch_size or (
      num_tokens is not None and logits.shape[2] != num_tokens):
    raise ValueError(f"{name}: outputs{where}['logits'] must be [B={batch_size}, Q, "
                     f"{'T' if num_tokens is None else num_tokens}], got {logits.shape}")
  lead = logits.shape[:2]
  shapes = {"boxes": lead + (4,), "ious": lead}
  for key, shape in shapes.items():
    if key in layer and layer[key].shape != shape:
      raise ValueError(f"{name}: outputs{where}[{key!r}] must be {shape}, got {layer[key].shape}")
  if "masks" in layer and (layer["masks"].ndim != 4 or layer["masks"].shape[:2] != lead):
    raise ValueError(f"{name}: outputs{where}['masks'] must be [B, Q, h, w] with B, Q = {lead}, "
                     f"got {layer['masks'].shape}")


def _layers(name: str, where: str, block: Mapping[str, Any], keys: Sequence[str],
            batch_size: int, num_tokens: Optional[int]) -> Sequence[Mapping[str, jax.Array]]:
  """Returns `aux + [final]` of a prediction group after checking that they share shapes."""
  aux = list(block.get("aux", ()))
  layers = aux + [block]
  for i, layer in enumerate(layers):
    _check_layer(name, where + ("" if i == len(aux) else f"['aux'][{i}]"), layer, keys,
                 batch_size, num_tokens)
  shapes = {tuple((k, layer[k].shape) for k in sorted(keys)) + (("ious", "ious" in layer),)
            for layer in layers}
  if len(shapes) != 1:
    raise ValueError(f"{name}: outputs{where} and its 'aux' layers must share shapes (and all "
                     f"have 'ious' or none); got {sorted(shapes)}")
  return layers


def _gather(values: jax.Array, index: jax.Array) -> jax.Array:
  """`values[b, index[b, k]]` for `values` [B, N, ...] and `index` [B, K] -> [B, K, ...]."""
  return jax.vmap(lambda v, i: v[i])(values, index)


def _queries_from_slots(pred_idx: jax.Array, matched: jax.Array, num_queries: int) -> jax.Array:
  """One-to-one matches per gt slot ([B, N] each) -> gt slot per query [B, Q], -1 for none."""
  batch_size, num_slots = pred_idx.shape
  slots = jnp.where(matched, jnp.arange(num_slots, dtype=jnp.int32)[None, :], -1)  # [B, N]
  rows = jnp.arange(batch_size)[:, None]  # [B, 1]
  return jnp.full((batch_size, num_queries), -1, jnp.int32).at[rows, pred_idx].max(slots)


class _Pairs(NamedTuple):
  """Matched (query, gt slot) pairs gathered into K slots per image."""
  query: jax.Array  # [B, K] int32 query index (0 where not ok)
  slot: jax.Array  # [B, K] int32 gt slot (0 where not ok)
  ok: jax.Array  # [B, K] bool, a real pair
  ids: jax.Array  # [B, K, 2] int32, the pair's ids for its point-sampling key
  rows: int  # range of ids[..., 0]: Q for query ids, G for denoising groups


def _pairs_many_to_one(matched_gt: jax.Array, num_pairs: int) -> _Pairs:
  """Matched queries of each image, in ascending query order, in the first of K slots."""
  matched = matched_gt >= 0  # [B, Q]
  order = jnp.argsort(~matched, axis=-1, stable=True)[:, :num_pairs].astype(jnp.int32)  # [B, K]
  ok = jnp.take_along_axis(matched, order, axis=-1)  # [B, K]
  slot = jnp.maximum(jnp.take_along_axis(matched_gt, order, axis=-1), 0)  # [B, K]
  ids = jnp.stack([order, jnp.zeros_like(order)], axis=-1)  # [B, K, 2]
  return _Pairs(order, slot, ok, ids, matched_gt.shape[1])


def _pairs_one_to_one(pred_idx: jax.Array, matched: jax.Array, num_queries: int) -> _Pairs:
  """Hungarian matches aligned with the gt slots."""
  slot = jnp.broadcast_to(jnp.arange(pred_idx.shape[1], dtype=jnp.int32), pred_idx.shape)
  ids = jnp.stack([pred_idx, jnp.zeros_like(pred_idx)], axis=-1)  # [B, N, 2]
  return _Pairs(pred_idx.astype(jnp.int32), slot, matched, ids, num_queries)


def _known_pairs(valid: jax.Array, num_queries: int, span: int) -> Tuple[jax.Array, _Pairs]:
  """Denoising's known matching: slot m of group g <-> query g * span + m."""
  batch_size, num_slots = valid.shape
  groups = num_queries // span
  offset = jnp.arange(num_queries, dtype=jnp.int32) % span  # [Qd]
  in_slot = offset < num_slots  # [Qd]
  slot_valid = jnp.take(valid, jnp.minimum(offset, num_slots - 1), axis=1)  # [B, Qd]
  matched_gt = jnp.where(in_slot[None, :] & slot_valid, offset[None, :], -1)  # [B, Qd]
  group = jnp.repeat(jnp.arange(groups, dtype=jnp.int32), num_slots)  # [G*N]
  slot = jnp.tile(jnp.arange(num_slots, dtype=jnp.int32), groups)  # [G*N]
  query = group * span + slot  # [G*N]
  pairs = _Pairs(
      query=jnp.broadcast_to(query, (batch_size, groups * num_slots)),
      slot=jnp.broadcast_to(slot, (batch_size, groups * num_slots)),
      ok=jnp.tile(valid, (1, groups)),
      ids=jnp.broadcast_to(jnp.stack([group, slot], axis=-1), (batch_size, groups * num_slots, 2)),
      rows=groups)
  return matched_gt, pairs


def _point_losses(key: jax.Array, pred_masks: jax.Array, gt_masks: jax.Array, pairs: _Pairs,
                  cfg: Mapping[str, Any], focal: bool) -> Tuple[jax.Array, jax.Array]:
  """Point-sampled mask loss (focal or BCE, mean over points) and dice of each pair, [B, K]."""
  pred = _gather(pred_masks.astype(jnp.float32), pairs.query)  # [B, K, h, w]
  target = jax.lax.stop_gradient(_gather(gt_masks, pairs.slot))  # [B, K, hg, wg]
  image = jnp.arange(pred.shape[0], dtype=jnp.uint32)[:, None]  # [B, 1]
  ids = pairs.ids.astype(jnp.uint32)  # [B, K, 2]
  pair_ids = (image * pairs.rows + ids[..., 0]) * _SLOT_SPAN + ids[..., 1]  # [B, K]

  def pair_coords(pair_id, mask):
    return get_uncertain_point_coords_with_randomness(
        jax.random.fold_in(key, pair_id), mask, cfg["num_points"], cfg["oversample_ratio"],
        cfg["importance_sample_ratio"])  # [P, 2]

  coords = jax.vmap(jax.vmap(pair_coords))(pair_ids, pred)  # [B, K, P, 2]
  labels = point_sample(target[:, :, None], coords)[:, :, 0]  # [B, K, P]
  logits = point_sample(pred[:, :, None], coords)[:, :, 0]  # [B, K, P]
  if focal:
    point_loss = sigmoid_focal_loss(logits, labels, cfg["focal_alpha"],
                                    cfg["focal_gamma"]).mean(-1)  # [B, K]
  else:
    point_loss = sigmoid_ce_loss(logits, labels)  # [B, K]
  return point_loss, dice_loss(logits, labels)


def _matched_boxes(matched_gt: jax.Array, gt_boxes: jax.Array) -> jax.Array:
  """Target box per query, a dummy full-image box where unmatched, [B, Q, 4]."""
  boxes = _gather(gt_boxes, jnp.maximum(matched_gt, 0))  # [B, Q, 4]
  return jnp.where((matched_gt >= 0)[..., None], boxes, jnp.asarray(_DUMMY_BOX, jnp.float32))


def _focal_sum(logits: jax.Array, matched_gt: jax.Array, positive_map: jax.Array,
               text_mask: jax.Array, active: jax.Array, cfg: Mapping[str, Any]) -> jax.Array:
  """Token focal loss summed over the queries and real tokens of the active samples."""
  targets = _gather(positive_map, jnp.maximum(matched_gt, 0))  # [B, Q, T]
  targets = jnp.where((matched_gt >= 0)[..., None], targets, 0.0)  # [B, Q, T]
  per_query = token_sigmoid_focal_loss(logits, targets, text_mask, cfg["focal_alpha"],
                                       cfg["focal_gamma"])  # [B, Q]
  return jnp.where(active[:, None], per_query, 0.0).sum()


def _thing_terms(key: jax.Array, layer: Mapping[str, jax.Array], matched_gt: jax.Array,
                 pairs: Optional[_Pairs], positive_map: jax.Array, text_mask: jax.Array,
                 gt: _Targets, cfg: Mapping[str, Any]) -> jax.Array:
  """The six thing terms of one prediction set, normalised as the reference; [6]."""
  matched = matched_gt >= 0  # [B, Q]
  count = matched.sum().astype(jnp.float32)  # []
  inv = jnp.where(count > 0, 1.0 / jnp.maximum(count, 1.0), 0.0)  # []
  ce = _focal_sum(layer["logits"], matched_gt, positive_map, text_mask, gt.active, cfg) * inv  # []
  boxes = layer["boxes"].astype(jnp.float32)  # [B, Q, 4]
  target = _matched_boxes(matched_gt, gt.boxes)  # [B, Q, 4]
  thing = matched & _gather(gt.is_thing, jnp.maximum(matched_gt, 0))  # [B, Q]
  thing_inv = 1.0 / (thing.sum().astype(jnp.float32) + 1e-6)  # []
  bbox = jnp.where(thing, l1_box_loss(boxes, target), 0.0).sum() * thing_inv  # []
  giou = jnp.where(thing, giou_loss(boxes, target, *_FVCORE_EPS), 0.0).sum() * thing_inv  # []
  zero = jnp.zeros((), jnp.float32)  # []
  iou = zero
  if "ious" in layer:
    iou = jnp.where(thing, box_iou_bce_loss(layer["ious"], boxes, target), 0.0).sum() * thing_inv
  mask = dice = zero
  if pairs is not None:
    point_loss, dice_per = _point_losses(key, layer["masks"], gt.masks, pairs, cfg, focal=True)
    mask = jnp.where(pairs.ok, point_loss, 0.0).sum() * inv  # []
    dice = jnp.where(pairs.ok, dice_per, 0.0).sum() * inv  # []
  return jnp.stack([ce, bbox, giou, mask, dice, iou])  # [6]


def _stack(layers: Sequence[Mapping[str, jax.Array]], keys: Sequence[str]) -> Dict[str, jax.Array]:
  return {k: jnp.stack([layer[k] for layer in layers]) for k in keys}  # [L, ...] each


def _weighted(terms: jax.Array, names: Sequence[str], cfg: Mapping[str, Any]) -> jax.Array:
  """Weighted sum over the term axis (last) with the terms' configured weights."""
  weights = jnp.asarray([cfg[_WEIGHT_KEYS[n]] for n in names], jnp.float32)  # [S]
  return (terms * weights).sum(-1)


def _report(terms: Dict[str, jax.Array], prefix: str, values: jax.Array,
            names: Sequence[str], cfg: Mapping[str, Any]) -> None:
  """Stores the final layer's unweighted terms and the weighted sum of the earlier ones."""
  for i, n in enumerate(names):
    terms[f"{prefix}loss_{n}"] = values[-1, i]
  if values.shape[0] > 1:
    terms[f"{prefix}loss_aux"] = _weighted(values[:-1], names, cfg).sum()


def thing_criterion(outputs: Mapping[str, Any], targets: Mapping[str, jax.Array],
                    rng: jax.Array, config: Mapping[str, Any]
                    ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """HIPIE thing-decoder loss: simOTA-matched layers, encoder proposals and denoising.

  Args:
    outputs: thing-decoder predictions, see the module docstring.
    targets: ground truth, see the module docstring (`positive_map` required).
    rng: PRNG key for the mask points (split as the module docstring says).
    config: settings, see `default_thing_loss_config`.

  Returns:
    `(total, terms)`: the weighted total and scalar terms `loss_<t>` for t in
    ce, bbox, giou, mask, dice, iou (final layer, unweighted), `loss_aux`
    (weighted sum over the aux layers), `enc/loss_{ce,bbox,giou}` and
    `dn/loss_{ce,bbox,giou,mask,dice}`, `dn/loss_aux` when those outputs exist.

  Raises:
    ValueError: on a bad config or mis-shaped outputs / targets.
  """
  cfg = check_thing_loss_config(config)
  name = "thing_criterion"
  if "logits" not in outputs:
    raise ValueError(f"{name}: outputs need 'logits'; got {sorted(outputs)}")
  batch_size, num_queries, num_tokens = outputs["logits"].shape
  num_slots = _check_targets(name, targets, batch_size, num_tokens, allow_labels=False)
  layers = _layers(name, "", outputs, ("logits", "boxes", "masks"), batch_size, num_tokens)
  enc = outputs.get("enc")
  if enc is not None:
    _check_layer(name, "['enc']", enc, ("logits", "boxes"), batch_size, None)
    if enc["logits"].shape[2] not in (1, num_tokens):
      raise ValueError(f"{name}: outputs['enc']['logits'] must have 1 or T={num_tokens} "
                       f"channels, got {enc['logits'].shape}")
  dn_layers = ()
  if outputs.get("dn") is not None:
    dn_layers = _layers(name, "['dn']", outputs["dn"], ("logits", "boxes", "masks"), batch_size,
                        num_tokens)
    num_dn = outputs["dn"]["logits"].shape[1]
    if num_dn % (2 * num_slots) or num_dn == 0 or num_slots >= _SLOT_SPAN:
      raise ValueError(f"{name}: outputs['dn'] must hold G * 2N queries (N={num_slots} gt "
                       f"slots, N < {_SLOT_SPAN}), got {num_dn}")

  gt = _prepare_targets(targets, batch_size, num_tokens)
  fg_valid = gt.valid & gt.is_thing  # [B, N]
  simota_options = dict(
      center_radius=cfg["center_radius"], expanded_stride=cfg["expanded_stride"],
      giou_weight=cfg["simota_giou_weight"], center_weight=cfg["center_weight"],
      outside_weight=cfg["outside_weight"], candidate_k=cfg["candidate_k"])
  fg_key, dn_key = jax.random.split(rng)
  terms = {}
  num_pairs = min(num_queries, (cfg["candidate_k"] + 1) * num_slots)

  def fg_layer(xs):
    key, layer = xs
    cost = simota_class_cost(layer["logits"], gt.positive_map, cfg["focal_alpha"],
                             cfg["focal_gamma"])  # [B, Q, N]
    matched_gt, _ = simota_match(cost, layer["boxes"], gt.boxes, fg_valid,
                                 **simota_options)  # [B, Q]
    return _thing_terms(key, layer, matched_gt, _pairs_many_to_one(matched_gt, num_pairs),
                        gt.positive_map, gt.text_mask, gt, cfg)

  fg_keys = ("logits", "boxes", "masks") + (("ious",) if "ious" in outputs else ())
  fg_values = jax.lax.map(fg_layer, (jax.random.split(fg_key, len(layers)),
                                     _stack(layers, fg_keys)))  # [L, 6]
  _report(terms, "", fg_values, THING_TERMS, cfg)
  total = cfg["fg_weight"] * _weighted(fg_values, THING_TERMS, cfg).sum()

  second = jnp.zeros((), jnp.float32)
  if enc is not None:
    if enc["logits"].shape[2] == 1:
      enc_map = jnp.ones((batch_size, num_slots, 1), jnp.float32)  # [B, N, 1]
      enc_text = jnp.ones((batch_size, 1), jnp.float32)  # [B, 1]
    else:
      enc_map, enc_text = gt.positive_map, gt.text_mask
    enc_boxes = jax.lax.stop_gradient(enc["boxes"]).astype(jnp.float32)  # [B, Qe, 4]
    cost = (cfg["enc_cost_class"] * simota_class_cost(enc["logits"], enc_map, cfg["focal_alpha"],
                                                      cfg["focal_gamma"])
            + cfg["enc_cost_bbox"] * box_l1_distance(enc_boxes, gt.boxes)
            - cfg["enc_cost_giou"] * generalized_box_iou(
                box_cxcywh_to_xyxy(enc_boxes), box_cxcywh_to_xyxy(gt.boxes),
                *_HIPIE_EPS))  # [B, Qe, N]
    pred_idx, matched = get_matcher(cfg["matcher"])(cost, gt.valid)  # [B, N] x 2
    matched_gt = _queries_from_slots(pred_idx, matched, enc["logits"].shape[1])  # [B, Qe]
    enc_values = _thing_terms(fg_key, enc, matched_gt, None, enc_map, enc_text, gt, cfg)  # [6]
    for i, n in enumerate(("ce", "bbox", "giou")):
      terms[f"enc/loss_{n}"] = enc_values[i]
    second = second + _weighted(enc_values, THING_TERMS, cfg)

  if dn_layers:
    dn_matched_gt, dn_pairs = _known_pairs(gt.valid, num_dn, 2 * num_slots)

    def dn_layer(xs):
      key, layer = xs
      return _thing_terms(key, layer, dn_matched_gt, dn_pairs, gt.positive_map, gt.text_mask,
                          gt, cfg)

    dn_values = jax.lax.map(dn_layer, (jax.random.split(dn_key, len(dn_layers)),
                                       _stack(dn_layers, ("logits", "boxes", "masks"))))  # [L, 6]
    _report(terms, "dn/", dn_values[:, :5], STUFF_TERMS, cfg)
    second = second + _weighted(dn_values, THING_TERMS, cfg).sum()

  has_fg = fg_valid.any()  # []
  total = total + cfg["dn_weight"] * jnp.where(has_fg, second, 0.0)
  return total, terms


def _stuff_layer_terms(keys: Tuple[jax.Array, jax.Array], layer: Mapping[str, jax.Array],
                       gt: _Targets, inv_masks: jax.Array, cfg: Mapping[str, Any],
                       matcher: Callable[[jax.Array, jax.Array], Tuple[jax.Array, jax.Array]]
                       ) -> jax.Array:
  """Hungarian-matches one MaskDINO prediction set and returns its five terms, [5]."""
  match_key, loss_key = keys
  logits = layer["logits"]
  masks = jax.lax.stop_gradient(layer["masks"]).astype(jnp.float32)  # [B, Q, h, w]
  boxes = jax.lax.stop_gradient(layer["boxes"]).astype(jnp.float32)  # [B, Q, 4]
  coords = sample_uniform_points(match_key, cfg["match_num_points"], logits.shape[:1])  # [B, P, 2]
  pred_points = point_sample(masks, coords)  # [B, Q, P]
  gt_points = point_sample(gt.masks, coords)  # [B, N, P]
  cost = (cfg["cost_class"] * simota_class_cost(logits, gt.positive_map, cfg["focal_alpha"],
                                                cfg["focal_gamma"])
          + cfg["cost_mask"] * batch_sigmoid_ce_cost(pred_points, gt_points)
          + cfg["cost_dice"] * batch_dice_cost(pred_points, gt_points)
          + cfg["cost_bbox"] * box_l1_distance(boxes, gt.boxes)
          - cfg["cost_giou"] * generalized_box_iou(
              box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(gt.boxes),
              *_MASKDINO_EPS))  # [B, Q, N]
  pred_idx, matched = matcher(cost, gt.valid)  # [B, N] x 2
  matched_gt = _queries_from_slots(pred_idx, matched, logits.shape[1])  # [B, Q]
  return _stuff_terms(loss_key, layer, matched_gt,
                      _pairs_one_to_one(pred_idx, matched, logits.shape[1]), gt,
                      inv_masks, cfg)


def _stuff_terms(key: jax.Array, layer: Mapping[str, jax.Array], matched_gt: jax.Array,
                 pairs: _Pairs, gt: _Targets, inv_masks: jax.Array,
                 cfg: Mapping[str, Any]) -> jax.Array:
  """MaskDINO's five terms of one prediction set given its matching, [5]."""
  matched = matched_gt >= 0  # [B, Q]
  ce = _focal_sum(layer["logits"], matched_gt, gt.positive_map, gt.text_mask, gt.active, cfg)  # []
  boxes = layer["boxes"].astype(jnp.float32)  # [B, Q, 4]
  target = _matched_boxes(matched_gt, gt.boxes)  # [B, Q, 4]
  bbox = jnp.where(matched, l1_box_loss(boxes, target), 0.0).sum()  # []
  giou = jnp.where(matched, giou_loss(boxes, target, *_MASKDINO_EPS), 0.0).sum()  # []
  point_loss, dice_per = _point_losses(key, layer["masks"], gt.masks, pairs, cfg, focal=False)
  mask = jnp.where(pairs.ok, point_loss, 0.0).sum()  # []
  dice = jnp.where(pairs.ok, dice_per, 0.0).sum()  # []
  return jnp.stack([ce, bbox, giou, mask, dice]) * inv_masks  # [5]


def stuff_criterion(outputs: Mapping[str, Any], targets: Mapping[str, jax.Array],
                    rng: jax.Array, config: Mapping[str, Any]
                    ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """HIPIE stuff-decoder (MaskDINO) loss: Hungarian-matched layers, encoder output, denoising.

  Args:
    outputs: stuff-decoder predictions, see the module docstring.
    targets: ground truth with `positive_map` (token logits) or `labels` (class
      logits), see the module docstring.
    rng: PRNG key for matching and loss points (split as the module docstring says).
    config: settings, see `default_stuff_loss_config`.

  Returns:
    `(total, terms)`: the weighted total and scalar terms `loss_<t>` for t in
    ce, bbox, giou, mask, dice (final layer, unweighted), `loss_aux` (weighted
    sum over the aux layers), `enc/loss_<t>` and `dn/loss_<t>`, `dn/loss_aux`
    when those outputs exist.

  Raises:
    ValueError: on a bad config or mis-shaped outputs / targets.
  """
  cfg = check_stuff_loss_config(config)
  name = "stuff_criterion"
  if "logits" not in outputs:
    raise ValueError(f"{name}: outputs need 'logits'; got {sorted(outputs)}")
  batch_size, _, num_tokens = outputs["logits"].shape
  num_slots = _check_targets(name, targets, batch_size, num_tokens, allow_labels=True)
  keys = ("logits", "boxes", "masks")
  layers = list(_layers(name, "", outputs, keys, batch_size, num_tokens))
  if outputs.get("enc") is not None:
    _check_layer(name, "['enc']", outputs["enc"], keys, batch_size, num_tokens)
    if any(outputs["enc"][k].shape != outputs[k].shape for k in keys):
      raise ValueError(f"{name}: outputs['enc'] must have the shapes of the decoder layers "
                       f"{[outputs[k].shape for k in keys]}, got "
                       f"{[outputs['enc'][k].shape for k in keys]}")
    layers.append(outputs["enc"])
  dn_layers = ()
  if outputs.get("dn") is not None:
    dn_layers = _layers(name, "['dn']", outputs["dn"], keys, batch_size, num_tokens)
    num_dn = outputs["dn"]["logits"].shape[1]
    if num_dn % num_slots or num_dn == 0 or num_slots >= _SLOT_SPAN:
      raise ValueError(f"{name}: outputs['dn'] must hold G * N queries (N={num_slots} gt "
                       f"slots, N < {_SLOT_SPAN}), got {num_dn}")

  gt = _prepare_targets(targets, batch_size, num_tokens)
  matcher = get_matcher(cfg["matcher"])
  num_masks = jnp.maximum(gt.valid.sum().astype(jnp.float32), 1.0)  # []
  main_key, dn_key = jax.random.split(rng)
  terms = {}
  layer_fn = functools.partial(_stuff_layer_terms, gt=gt, inv_masks=1.0 / num_masks, cfg=cfg,
                               matcher=matcher)
  values = jax.lax.map(
      lambda xs: layer_fn(tuple(jax.random.split(xs[0])), xs[1]),
      (jax.random.split(main_key, len(layers)), _stack(layers, keys)))  # [L(+1), 5]
  if outputs.get("enc") is not None:
    for i, n in enumerate(STUFF_TERMS):
      terms[f"enc/loss_{n}"] = values[-1, i]
  _report(terms, "", values[:-1] if outputs.get("enc") is not None else values, STUFF_TERMS, cfg)
  total = _weighted(values, STUFF_TERMS, cfg).sum()

  if dn_layers:
    dn_matched_gt, dn_pairs = _known_pairs(gt.valid, num_dn, num_slots)
    inv_dn = 1.0 / (num_masks * (num_dn // num_slots))  # []
    dn_values = jax.lax.map(
        lambda xs: _stuff_terms(xs[0], xs[1], dn_matched_gt, dn_pairs, gt, inv_dn, cfg),
        (jax.random.split(dn_key, len(dn_layers)), _stack(dn_layers, keys)))  # [L, 5]
    _report(terms, "dn/", dn_values, STUFF_TERMS, cfg)
    total = total + _weighted(dn_values, STUFF_TERMS, cfg).sum()
  return cfg["loss_weight"] * total, terms


def hipie_criterion(outputs: Mapping[str, Any], targets: Mapping[str, Mapping[str, jax.Array]],
                    rng: jax.Array, config: Mapping[str, Any]
                    ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Thing plus stuff criterion of HIPIE.

  Args:
    outputs: `{"thing": thing-decoder outputs, "stuff": stuff-decoder outputs}`.
    targets: `{"thing": ground truth, "stuff": ground truth}` (usually the same
      panoptic arrays; `active` lets the stuff part skip e.g. referring samples).
    rng: PRNG key, split into `thing_key, stuff_key`.
    config: `{"thing": ..., "stuff": ...}`, see `default_hipie_loss_config`.

  Returns:
    `(total, terms)` with the terms of both criteria prefixed "thing/" and "stuff/".

  Raises:
    ValueError: on a bad config or missing / mis-shaped entries.
  """
  cfg = check_hipie_loss_config(config)
  for name, value in (("outputs", outputs), ("targets", targets)):
    if set(value.keys()) != {"thing", "stuff"}:
      raise ValueError(f"hipie_criterion: {name} must have exactly the keys ['stuff', 'thing'], "
                       f"got {sorted(value.keys())}")
  thing_key, stuff_key = jax.random.split(rng)
  thing_total, thing_terms = thing_criterion(outputs["thing"], targets["thing"], thing_key,
                                             cfg["thing"])
  stuff_total, stuff_terms = stuff_criterion(outputs["stuff"], targets["stuff"], stuff_key,
                                             cfg["stuff"])
  terms = {f"thing/{k}": v for k, v in thing_terms.items()}
  terms.update({f"stuff/{k}": v for k, v in stuff_terms.items()})
  return thing_total + stuff_total, terms
