"""Tests for hiseg_jax.losses: Mask2Former loss pieces against PyTorch transcriptions and
the full AIMS set criterion against a torch + scipy transcription written here."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from hiseg_jax.losses.aims_loss import AIMS_TASK_SUPERVISION
from hiseg_jax.losses.aims_loss import LEVELS
from hiseg_jax.losses.aims_loss import aims_set_criterion
from hiseg_jax.losses.aims_loss import check_aims_loss_config
from hiseg_jax.losses.aims_loss import default_aims_loss_config
from hiseg_jax.losses.association_loss import association_loss
from hiseg_jax.losses.grid_targets import grid_targets
from hiseg_jax.losses.hipie_loss import check_thing_loss_config
from hiseg_jax.losses.hipie_loss import default_thing_loss_config
from hiseg_jax.losses.mask_losses import dense_mask_losses
from hiseg_jax.losses.mask_losses import dice_loss
from hiseg_jax.losses.mask_losses import sampled_mask_losses
from hiseg_jax.losses.mask_losses import sigmoid_ce_loss
from hiseg_jax.losses.objectness_loss import objectness_loss
from hiseg_jax.losses.point_sampling import get_uncertain_point_coords_with_randomness
from hiseg_jax.losses.point_sampling import sample_uniform_points
from hiseg_jax.matching.costs import mask_matching_cost


# Jitted samplers for the reference (eager op-by-op dispatch is slow on CPU).
uniform_points = jax.jit(sample_uniform_points, static_argnums=(1, 2))
uncertain_points = jax.jit(get_uncertain_point_coords_with_randomness, static_argnums=(2, 3, 4))


def torch_point_sample(inputs, coords):
  """PointRend point_sample: [N, C, H, W], [N, P, 2] -> [N, C, P]."""
  return F.grid_sample(inputs, 2 * coords[:, :, None] - 1, align_corners=False)[..., 0]


def torch_dice_loss(inputs, targets, num_masks):
  """Mask2Former criterion.dice_loss, transcribed."""
  inputs = inputs.sigmoid().flatten(1)
  numerator = 2 * (inputs * targets).sum(-1)
  denominator = inputs.sum(-1) + targets.sum(-1)
  return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def torch_sigmoid_ce_loss(inputs, targets, num_masks):
  """Mask2Former criterion.sigmoid_ce_loss, transcribed."""
  loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
  return loss.mean(1).sum() / num_masks


def torch_matcher_cost(logits, masks, gt_masks, coords, weights):
  """Mask2Former HungarianMatcher cost for one image, sigmoid objectness."""
  w_class, w_mask, w_dice = weights
  out = torch_point_sample(masks[:, None], coords[None].expand(masks.shape[0], -1, -1))[:, 0]
  tgt = torch_point_sample(gt_masks[:, None], coords[None].expand(gt_masks.shape[0], -1, -1))[:, 0]
  pos = F.binary_cross_entropy_with_logits(out, torch.ones_like(out), reduction="none")
  neg = F.binary_cross_entropy_with_logits(out, torch.zeros_like(out), reduction="none")
  cost_mask = (pos @ tgt.T + neg @ (1 - tgt).T) / out.shape[1]
  prob = out.sigmoid()
  cost_dice = 1 - (2 * prob @ tgt.T + 1) / (prob.sum(-1)[:, None] + tgt.sum(-1)[None] + 1)
  return w_mask * cost_mask + w_class * -logits.sigmoid()[:, None] + w_dice * cost_dice


def torch_dense_terms(logits, gt, region):
  """Dense mask terms of every (prediction, target) pair on the pixels of the region grid.

  Prediction logits and targets are repeated onto the region's pixels (nearest upsampling); BCE
  is the mean over the supervised pixels, dice sums over them in prediction-cell units (pixel sums
  divided by the pixels per cell, so the +1 smoothing counts cells).

  Args:
    logits: [N, h, w] predicted logits; gt: [M, Hg, Wg] targets; region: [H, W] 0/1, H and W
      multiples of Hg, Wg and h, w.

  Returns:
    (bce [N, M], dice [N, M]).
  """
  k, kg = region.shape[-1] // logits.shape[-1], region.shape[-1] // gt.shape[-1]
  up = logits.repeat_interleave(k, -2).repeat_interleave(k, -1).flatten(1)  # [N, H*W]
  tgt = gt.repeat_interleave(kg, -2).repeat_interleave(kg, -1).flatten(1)  # [M, H*W]
  reg = region.flatten()[None]  # [1, H*W]
  pos = F.binary_cross_entropy_with_logits(up, torch.ones_like(up), reduction="none") * reg
  neg = F.binary_cross_entropy_with_logits(up, torch.zeros_like(up), reduction="none") * reg
  bce = (pos @ tgt.T + neg @ (1 - tgt).T) / reg.sum().clamp(min=1e-12)
  prob = up.sigmoid() * reg
  cells = k * k
  dice = 1 - (2 * prob @ tgt.T / cells + 1) / (
      prob.sum(-1)[:, None] / cells + (tgt * reg).sum(-1)[None] / cells + 1)
  return bce, dice


def test_point_losses_match_mask2former():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 40)).astype(np.float32) * 3
  targets = rng.random((5, 40)).astype(np.float32)
  targets[:3] = targets[:3] > 0.5
  t_logits, t_targets = torch.from_numpy(logits), torch.from_numpy(targets)
  np.testing.assert_allclose(float(sigmoid_ce_loss(logits, targets).sum()) / 3.0,
                             float(torch_sigmoid_ce_loss(t_logits, t_targets, 3.0)), rtol=1e-5)
  np.testing.assert_allclose(float(dice_loss(logits, targets).sum()) / 3.0,
                             float(torch_dice_loss(t_logits, t_targets, 3.0)), rtol=1e-5)


def test_sampled_mask_losses_match_mask2former_on_the_same_points():
  rng = np.random.default_rng(1)
  pred = rng.normal(size=(2, 3, 8, 8)).astype(np.float32) * 2
  gt = (rng.random((2, 3, 16, 16)) > 0.5).astype(np.float32)  # another resolution on purpose
  region = np.zeros((2, 32, 32), np.float32)
  region[:, 4:30, 2:20] = 1
  key = jax.random.PRNGKey(2)
  ce, dice = jax.jit(lambda p, g, r: sampled_mask_losses(key, p, g, 30, 3.0, 0.75, region=r))(
      pred, gt, region)
  coords = np.array(uncertain_points(key, jnp.asarray(pred), 30, 3.0, 0.75,
                                     jnp.asarray(region))).reshape(6, 30, 2)
  t_coords = torch.from_numpy(coords)
  labels = torch_point_sample(torch.from_numpy(gt.reshape(6, 1, 16, 16)), t_coords)[:, 0]
  point_logits = torch_point_sample(torch.from_numpy(pred.reshape(6, 1, 8, 8)), t_coords)[:, 0]
  np.testing.assert_allclose(float(ce.sum()), float(torch_sigmoid_ce_loss(point_logits, labels, 1)),
                             rtol=1e-5)
  np.testing.assert_allclose(float(dice.sum()), float(torch_dice_loss(point_logits, labels, 1)),
                             rtol=1e-5)


def test_objectness_loss_matches_weighted_cross_entropy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(3, 6)).astype(np.float32)
  matched = rng.random((3, 6)) > 0.6
  active = np.array([1.0, 0.0, 1.0], np.float32)
  got = float(objectness_loss(logits, matched, active, 0.1))
  weight = np.where(matched, 1.0, 0.1) * active[:, None]
  expected = F.binary_cross_entropy_with_logits(
      torch.from_numpy(logits), torch.from_numpy(matched.astype(np.float32)),
      weight=torch.from_numpy(weight.astype(np.float32)), reduction="sum") / weight.sum()
  np.testing.assert_allclose(got, float(expected), rtol=1e-5)
  assert float(objectness_loss(logits, matched, np.zeros(3, np.float32), 0.1)) == 0.0


def test_association_loss_on_matched_pairs():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 5, 6)).astype(np.float32)
  gt = rng.random((2, 3, 4)) > 0.5
  hi_idx, lo_idx = np.array([[4, 0, 2], [1, 3, 0]]), np.array([[5, 1, 0, 2], [0, 2, 4, 1]])
  hi_ok = np.array([[True, True, False], [True, True, True]])
  lo_ok = np.array([[True, False, True, True], [True, True, True, True]])
  sample_ok = np.array([True, False])
  got = float(association_loss(logits, gt, hi_idx, hi_ok, lo_idx, lo_ok, sample_ok))
  terms = []
  for i in range(3):
    for j in range(4):
      if hi_ok[0, i] and lo_ok[0, j]:
        x, t = logits[0, hi_idx[0, i], lo_idx[0, j]], float(gt[0, i, j])
        p = 1 / (1 + np.exp(-x))
        terms.append(-(t * np.log(p) + (1 - t) * np.log(1 - p)))
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)
  assert float(association_loss(logits, gt, hi_idx, hi_ok, lo_idx, lo_ok, ~np.ones(2, bool))) == 0


def test_config_validation():
  cfg = default_aims_loss_config()
  assert check_aims_loss_config(cfg) == cfg
  with pytest.raises(ValueError, match=r"unknown keys \['eos_coef'\]"):
    check_aims_loss_config({**cfg, "eos_coef": 0.1})
  with pytest.raises(ValueError, match=r"missing keys \['dice_weight'\]"):
    check_aims_loss_config({k: v for k, v in cfg.items() if k != "dice_weight"})
  with pytest.raises(ValueError, match="num_points must be int"):
    check_aims_loss_config({**cfg, "num_points": 12.5})
  with pytest.raises(ValueError, match="unknown matcher"):
    check_aims_loss_config({**cfg, "matcher": "auction"})
  with pytest.raises(ValueError, match="block_batch must be > 0, got 0"):
    check_aims_loss_config({**cfg, "block_batch": 0})
  # 0 points: dense losses / costs (AIMS only); negative counts are rejected.
  assert check_aims_loss_config({**cfg, "num_points": 0, "match_num_points": 0})["num_points"] == 0
  with pytest.raises(ValueError, match=r"match_num_points must be >= 0 \(0: every prediction"):
    check_aims_loss_config({**cfg, "match_num_points": -1})
  with pytest.raises(ValueError, match="num_points must be > 0, got 0"):
    check_thing_loss_config({**default_thing_loss_config(), "num_points": 0})


def region_grid_reference(gt, region, grid):
  """Per-cell weights and targets by looping over the region pixels (gt repeated onto them)."""
  b, m = gt.shape[:2]
  kg, kc = region.shape[-1] // gt.shape[-1], region.shape[-1] // grid
  gt_up = gt.repeat(kg, -2).repeat(kg, -1)  # [B, M, H, W]
  weights = np.zeros((b, grid, grid))
  targets = np.zeros((b, m, grid, grid))
  for i in range(grid):
    for j in range(grid):
      cell = region[:, i * kc:(i + 1) * kc, j * kc:(j + 1) * kc]  # [B, kc, kc]
      weights[:, i, j] = cell.mean(axis=(1, 2))
      covered = (gt_up[:, :, i * kc:(i + 1) * kc, j * kc:(j + 1) * kc] * cell[:, None]).sum((2, 3))
      targets[:, :, i, j] = np.where(cell.sum((1, 2))[:, None] > 0,
                                     covered / np.maximum(cell.sum((1, 2)), 1)[:, None], 0)
  return targets.reshape(b, m, -1), weights.reshape(b, -1)


def test_grid_targets_and_dense_losses_on_partial_cells():
  rng = np.random.default_rng(3)
  gt = (rng.random((2, 3, 8, 8)) > 0.5).astype(np.float32)  # targets at stride 2 of 16 px
  region = (rng.random((2, 16, 16)) > 0.3).astype(np.float32)  # cells partly supervised
  region[1, :8] = 0  # and half of sample 1 not at all
  logits = 3 * rng.normal(size=(2, 3, 4, 4)).astype(np.float32)  # predictions at stride 4
  targets, weights = grid_targets(jnp.asarray(gt), jnp.asarray(region), (4, 4))
  ref_targets, ref_weights = region_grid_reference(gt, region, 4)
  np.testing.assert_allclose(np.asarray(weights), ref_weights, atol=1e-6)
  np.testing.assert_allclose(np.asarray(targets), ref_targets, atol=1e-6)
  assert ((ref_weights > 0) & (ref_weights < 1)).any() and (ref_weights == 0).any()
  ce, dice = jax.jit(dense_mask_losses)(logits, gt, region)  # [2, 3] each
  for b in range(2):
    ref_ce, ref_dice = torch_dense_terms(torch.from_numpy(logits[b]), torch.from_numpy(gt[b]),
                                         torch.from_numpy(region[b]))
    # float32 sums over 256 pixels against 16 cells: rtol 1e-5.
    np.testing.assert_allclose(np.asarray(ce[b]), np.diag(ref_ce.numpy()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dice[b]), np.diag(ref_dice.numpy()), rtol=1e-5)
  # Logits of cells outside the region change nothing.
  moved = logits.copy()
  moved[1, :, :2] += 5.0
  np.testing.assert_allclose(np.asarray(dense_mask_losses(moved, gt, region)[0]),
                             np.asarray(ce), rtol=1e-6)
  with pytest.raises(ValueError, match=r"the target masks \(2, 3, 8, 8\) must be an integer "
                     r"multiple of the prediction grid \(3, 3\)"):
    dense_mask_losses(logits[:, :, :3, :3], gt, region)
  with pytest.raises(ValueError, match="the region"):
    dense_mask_losses(logits, gt, region[:, :12, :12])


def test_dense_matching_cost_equals_the_point_cost_at_every_cell_centre():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 5)).astype(np.float32)
  masks = 3 * rng.normal(size=(2, 5, 6, 6)).astype(np.float32)
  gt = (rng.random((2, 4, 6, 6)) > 0.5).astype(np.float32)
  cost = mask_matching_cost(jax.random.PRNGKey(0), logits, masks, gt, 0, 2.0, 5.0, 5.0)
  centres = (np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2) + 0.5) / 6
  for b in range(2):  # the bilinear read at a cell centre is the cell's value
    ref = torch_matcher_cost(torch.from_numpy(logits[b]), torch.from_numpy(masks[b]),
                             torch.from_numpy(gt[b]), torch.from_numpy(centres.astype(np.float32)),
                             (2.0, 5.0, 5.0)).numpy()
    np.testing.assert_allclose(np.asarray(cost[b]), ref, rtol=1e-5, atol=1e-6)


# ---- the full criterion ----------------------------------------------------------------

NUM_QUERIES = {"part": 6, "entity": 5, "relation": 4}
NUM_GT = {"part": 4, "entity": 3, "relation": 2}
BATCH, MASK, IMAGE = 4, 8, 32


def make_case(seed=0):
  rng = np.random.default_rng(seed)
  outputs = {}
  for level in LEVELS:
    def block():
      return {"logits": rng.normal(size=(BATCH, NUM_QUERIES[level])).astype(np.float32),
              "masks": 3 * rng.normal(
                  size=(BATCH, NUM_QUERIES[level], MASK, MASK)).astype(np.float32)}
    outputs[level] = {**block(), "aux": [block(), block()]}
  outputs["assoc_ep"] = rng.normal(size=(BATCH, 5, 6)).astype(np.float32)
  outputs["assoc_re"] = rng.normal(size=(BATCH, 4, 5)).astype(np.float32)
  batch = {}
  for level in LEVELS:
    masks = rng.random((BATCH, NUM_GT[level], MASK, MASK)) > 0.6
    batch[f"{level}/masks"] = masks.astype(np.float32)
    valid = rng.random((BATCH, NUM_GT[level])) > 0.25
    valid[:, 0] = True
    batch[f"{level}/valid"] = valid
  batch["assoc/ep"] = rng.random((BATCH, 3, 4)) > 0.5
  batch["assoc/re"] = rng.random((BATCH, 2, 3)) > 0.5
  batch["assoc/ep_valid"] = np.array([True, True, False, True])
  batch["assoc/re_valid"] = np.array([True, False, True, False])
  region = np.zeros((BATCH, IMAGE, IMAGE), np.float32)
  region[0] = 1
  region[1, 4:28, 8:32] = 1
  region[2] = 1
  region[3, 0:20, 0:16] = 1
  batch["prompt/region"] = region
  valid_image = np.ones((BATCH, IMAGE, IMAGE), np.float32)
  valid_image[2, :, 24:] = 0  # padding on the right of sample 2
  batch["valid"] = valid_image
  batch["task"] = np.array([1, 5, 8, 7], np.int32)  # entity, part, relation, part
  return outputs, batch


def small_config(matcher="hungarian_host", dense=False):
  cfg = default_aims_loss_config()
  cfg.update(num_points=24, match_num_points=40, matcher=matcher, assoc_weight=0.5)
  if dense:
    cfg.update(num_points=0, match_num_points=0)
  return cfg


def reference_point_losses(aligned, gt, keep, scored, region, loss_key, num_masks, cfg):
  """Mask2Former's point-sampled BCE and dice of the kept (matched, active) slots, in torch."""
  point_coords = np.zeros(aligned.shape[:2] + (cfg["num_points"], 2), np.float32)
  point_coords[scored] = np.array(uncertain_points(
      loss_key, jnp.asarray(aligned[scored]), cfg["num_points"], cfg["oversample_ratio"],
      cfg["importance_sample_ratio"], jnp.asarray(region[scored])))
  src = torch.from_numpy(aligned[keep][:, None])
  tgt = torch.from_numpy(gt[keep][:, None])
  pc = torch.from_numpy(point_coords[keep])
  point_logits = torch_point_sample(src, pc)[:, 0]
  point_labels = torch_point_sample(tgt, pc)[:, 0]
  loss_mask = float(torch_sigmoid_ce_loss(point_logits, point_labels, num_masks))
  loss_dice = float(torch_dice_loss(point_logits, point_labels, num_masks))
  return loss_mask, loss_dice


def reference_criterion(outputs, batch, rng, cfg, sample_tasks=None):
  """Torch + scipy transcription of the AIMS criterion (Mask2Former SetCriterion per level).

  Random points are re-derived with the library's samplers and the documented key split. With
  `sample_tasks`, the points of every loss and of the auxiliary matchings are drawn for the
  level's positions only, as the criterion documents. With `num_points` = `match_num_points` =
  0, costs and losses are the dense terms of `torch_dense_terms` instead.
  """
  dense = cfg["num_points"] == 0
  region = batch["prompt/region"] * (batch["valid"] > 0.5)
  region_any = (region > 0.5).any(axis=(1, 2))
  weights = (cfg["class_weight"], cfg["mask_weight"], cfg["dice_weight"])
  total, terms, final = 0.0, {}, {}
  for level, level_key in zip(LEVELS, jax.random.split(rng, 3)):
    blocks = outputs[level]["aux"] + [outputs[level]]
    # Per sample, the targets of the level the sample's type assigns to this decoder (type 8:
    # entities for the relation decoder), all padded to the largest slot count involved.
    supervision = [AIMS_TASK_SUPERVISION.get(int(t), (None, None)) for t in batch["task"]]
    target_level = [tl if decoder == level else level for decoder, tl in supervision]
    n = max(batch[f"{lv}/valid"].shape[1] for lv in set(target_level) | {level})
    pad = lambda x: np.pad(x, [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    gt = np.stack([pad(batch[f"{lv}/masks"][b]) for b, lv in enumerate(target_level)])
    valid = np.stack([pad(batch[f"{lv}/valid"][b]) for b, lv in enumerate(target_level)])
    swapped = np.array([lv != level for lv in target_level])
    tasks = [t for t, (d, _) in AIMS_TASK_SUPERVISION.items() if d == level]
    active = np.isin(batch["task"], tasks) & region_any
    num_masks = max(float((valid & active[:, None]).sum()), 1.0)
    scored = np.arange(BATCH) if sample_tasks is None else np.array(
        [b for b, t in enumerate(sample_tasks) if AIMS_TASK_SUPERVISION[t][0] == level], int)
    aux = 0.0
    for i, (blk, block_key) in enumerate(zip(blocks, jax.random.split(level_key, len(blocks)))):
      match_key, loss_key = jax.random.split(block_key)
      matched_rows = np.arange(BATCH) if i == len(blocks) - 1 else scored
      if not dense:
        coords = np.array(uniform_points(match_key, cfg["match_num_points"],
                                         (len(matched_rows),), jnp.asarray(region[matched_rows])))
      pred_idx = np.zeros(valid.shape, np.int64)
      matched = np.zeros(valid.shape, bool)
      for r, b in enumerate(matched_rows):
        if dense:
          bce, dice = torch_dense_terms(torch.from_numpy(blk["masks"][b]), torch.from_numpy(gt[b]),
                                        torch.from_numpy((region[b] > 0.5).astype(np.float32)))
          cost = (weights[1] * bce + weights[2] * dice
                  + weights[0] * -torch.from_numpy(blk["logits"][b]).sigmoid()[:, None]).numpy()
        else:
          cost = torch_matcher_cost(
              torch.from_numpy(blk["logits"][b]), torch.from_numpy(blk["masks"][b]),
              torch.from_numpy(gt[b]), torch.from_numpy(coords[r]), weights).numpy()
        cols = np.flatnonzero(valid[b])
        rows, sel = linear_sum_assignment(cost[:, cols])
        pred_idx[b, cols[sel]] = rows
        matched[b, cols[sel]] = True
      target = np.zeros(blk["logits"].shape, np.float32)
      for b in range(BATCH):
        target[b, pred_idx[b][matched[b]]] = 1
      w = np.where(target > 0, 1.0, cfg["no_object_weight"]) * active[:, None]
      loss_obj = float(F.binary_cross_entropy_with_logits(
          torch.from_numpy(blk["logits"]), torch.from_numpy(target),
          weight=torch.from_numpy(w.astype(np.float32)), reduction="sum")) / w.sum()
      aligned = np.take_along_axis(blk["masks"], pred_idx[:, :, None, None], axis=1)
      keep = matched & active[:, None]
      if dense:
        bce, dice = [], []
        for b, j in zip(*np.nonzero(keep)):
          pair = torch_dense_terms(torch.from_numpy(aligned[b, j][None]),
                                   torch.from_numpy(gt[b, j][None]),
                                   torch.from_numpy((region[b] > 0.5).astype(np.float32)))
          bce.append(float(pair[0][0, 0]))
          dice.append(float(pair[1][0, 0]))
        loss_mask, loss_dice = sum(bce) / num_masks, sum(dice) / num_masks
      else:
        loss_mask, loss_dice = reference_point_losses(
            aligned, gt, keep, scored, region, loss_key, num_masks, cfg)
      weighted = weights[0] * loss_obj + weights[1] * loss_mask + weights[2] * loss_dice
      total += weighted
      if i == len(blocks) - 1:
        terms.update({f"{level}/loss_obj": loss_obj, f"{level}/loss_mask": loss_mask,
                      f"{level}/loss_dice": loss_dice})
        own = batch[f"{level}/valid"].shape[1]
        final[level] = (pred_idx[:, :own], matched[:, :own] & ~swapped[:, None])
      else:
        aux += weighted
    terms[f"{level}/loss_aux"] = aux
  for key, hi, lo in (("ep", "entity", "part"), ("re", "relation", "entity")):
    logits, gt_assoc = outputs[f"assoc_{key}"], batch[f"assoc/{key}"]
    ok = batch[f"assoc/{key}_valid"]
    x, t = [], []
    for b in range(BATCH):
      for i in range(gt_assoc.shape[1]):
        for j in range(gt_assoc.shape[2]):
          if ok[b] and final[hi][1][b, i] and final[lo][1][b, j]:
            x.append(logits[b, final[hi][0][b, i], final[lo][0][b, j]])
            t.append(float(gt_assoc[b, i, j]))
    loss = float(F.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(t)))
    terms[f"assoc/loss_{key}"] = loss
    total += cfg["assoc_weight"] * loss
  return total, terms


@pytest.mark.parametrize("block_batch,static_layout,dense",
                         [(1, False, False), (3, False, False), (2, True, False), (2, True, True)])
def test_criterion_matches_transcription_and_gradients_flow_only_where_supervised(
    block_batch, static_layout, dense):
  # Three predictions per level (two auxiliary): auxiliary blocks one at a time, a group larger
  # than the level's, or both together; every position scored, or only the level's positions
  # of a static layout; point-sampled or dense (every cell of the 8x8 prediction grid against
  # the 32x32 targets) costs and losses.
  outputs, batch = make_case()
  cfg = small_config(dense=dense)
  cfg["block_batch"] = block_batch
  sample_tasks = tuple(int(t) for t in batch["task"]) if static_layout else None
  rng = jax.random.PRNGKey(5)
  (total, terms), grads = jax.jit(jax.value_and_grad(
      lambda o: aims_set_criterion(o, batch, rng, cfg, sample_tasks=sample_tasks),
      has_aux=True))(outputs)
  ref_total, ref_terms = reference_criterion(outputs, batch, rng, cfg, sample_tasks)
  if static_layout:
    for level in LEVELS:  # every supervising sample sits where the layout puts its type
      assert float(terms.pop(f"{level}/off_layout")) == 0.0
  assert set(terms) == set(ref_terms)
  # float32 sums of a few hundred terms in a different order: rtol 1e-5.
  for name, value in ref_terms.items():
    np.testing.assert_allclose(float(terms[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)

  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  active = {"part": [1, 3], "entity": [0], "relation": [2]}
  for level in LEVELS:
    for grad in grads[level]["aux"] + [grads[level]]:
      logit_grad = np.abs(np.asarray(grad["logits"]))  # [B, Q]
      mask_grad = np.abs(np.asarray(grad["masks"])).sum(axis=(2, 3))  # [B, Q]
      inactive = [b for b in range(BATCH) if b not in active[level]]
      assert logit_grad[inactive].max() == 0 and mask_grad[inactive].max() == 0
      assert logit_grad[active[level]].min() > 0  # every query of a supervised sample
      for b in active[level]:
        # Matched queries (one per valid ground truth) get mask gradient, the others none.
        assert (mask_grad[b] > 0).sum() == int(batch[f"{level}/valid"][b].sum())
  ep_grad = np.asarray(grads["assoc_ep"])
  assert ep_grad[2].max() == 0  # assoc/ep_valid is False for sample 2
  num_pairs = int(batch["entity/valid"][0].sum() * batch["part/valid"][0].sum())
  assert (ep_grad[0] != 0).sum() == num_pairs  # one gradient entry per matched pair
  re_grad = np.asarray(grads["assoc_re"])
  assert re_grad[1].max() == 0 and re_grad[3].max() == 0  # assoc/re_valid False


def test_criterion_without_association_module_and_bad_inputs():
  outputs, batch = make_case(seed=2)
  cfg = small_config(matcher="hungarian_device")
  no_assoc = {k: v for k, v in outputs.items() if not k.startswith("assoc_")}
  no_aux = {level: {"logits": no_assoc[level]["logits"], "masks": no_assoc[level]["masks"]}
            for level in LEVELS}

  def criterion(o, b, task_supervision=AIMS_TASK_SUPERVISION):
    return aims_set_criterion(o, b, jax.random.PRNGKey(0), cfg,
                              task_supervision=task_supervision)

  total, terms = jax.jit(criterion)(no_aux, batch)
  assert "assoc/loss_ep" not in terms and float(terms["part/loss_aux"]) == 0.0
  assert np.isfinite(float(total))
  with pytest.raises(ValueError, match=r"outputs\['assoc_ep'\] must be"):
    jax.eval_shape(criterion, {**outputs, "assoc_ep": outputs["assoc_re"]}, batch)
  with pytest.raises(ValueError, match="prompt/region"):
    jax.eval_shape(criterion, outputs, {k: v for k, v in batch.items() if k != "prompt/region"})
  with pytest.raises(ValueError, match="unknown levels"):
    jax.eval_shape(lambda o, b: criterion(o, b, {1: ("object", "entity")}), outputs, batch)

  def with_layout(o, b, sample_tasks):
    return aims_set_criterion(o, b, jax.random.PRNGKey(0), cfg, sample_tasks=sample_tasks)

  # Position 3 holds a type-7 (part) sample where the layout says type 8 (relation): it is
  # counted as off the layout and scored by no decoder.
  _, terms = jax.jit(functools.partial(with_layout, sample_tasks=(1, 5, 8, 8)))(outputs, batch)
  assert [float(terms[f"{lv}/off_layout"]) for lv in LEVELS] == [1.0, 0.0, 0.0]
  with pytest.raises(ValueError, match="sample_tasks has 3 entries for a batch of 4"):
    jax.eval_shape(functools.partial(with_layout, sample_tasks=(1, 5, 8)), outputs, batch)
