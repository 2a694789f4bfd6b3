"""Tests for hiseg_jax.matching: both Hungarian matchers against scipy, and the costs
against a PyTorch transcription of Mask2Former's matcher costs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from hiseg_jax.losses.point_sampling import sample_uniform_points
from hiseg_jax.matching import batch_dice_cost
from hiseg_jax.matching import batch_sigmoid_ce_cost
from hiseg_jax.matching import get_matcher
from hiseg_jax.matching import hungarian_device
from hiseg_jax.matching import hungarian_host
from hiseg_jax.matching import mask_matching_cost
from hiseg_jax.matching import matched_queries
from hiseg_jax.matching import objectness_cost

MATCHERS = {"hungarian_host": hungarian_host, "hungarian_device": hungarian_device}


def scipy_reference(cost, gt_valid):
  """Per batch element: scipy on the valid columns, scattered to [B, M] slots."""
  batch, _, num_gt = cost.shape
  pred_idx = np.zeros((batch, num_gt), np.int64)
  matched = np.zeros((batch, num_gt), bool)
  totals = np.zeros(batch)
  for b in range(batch):
    cols = np.flatnonzero(gt_valid[b])
    if cols.size:
      rows, sel = linear_sum_assignment(cost[b][:, cols])
      pred_idx[b, cols[sel]] = rows
      matched[b, cols[sel]] = True
      totals[b] = cost[b][rows, cols[sel]].sum()
  return pred_idx, matched, totals


def assignment_total(cost, pred_idx, matched):
  """Checks one-to-one-ness and returns the summed cost per batch element."""
  totals = []
  for b in range(cost.shape[0]):
    rows = pred_idx[b][matched[b]]
    assert len(set(rows.tolist())) == rows.size, "a prediction was matched twice"
    totals.append(cost[b][rows, np.flatnonzero(matched[b])].sum())
  return np.array(totals)


@pytest.mark.parametrize("name", sorted(MATCHERS))
@pytest.mark.parametrize("num_pred,num_gt", [(7, 4), (4, 7), (5, 5)])
def test_matches_scipy_with_padding_under_jit(name, num_pred, num_gt):
  rng = np.random.default_rng(num_pred * 10 + num_gt)
  cost = rng.normal(size=(4, num_pred, num_gt)).astype(np.float32)
  gt_valid = rng.random((4, num_gt)) > 0.3
  gt_valid[0] = True
  gt_valid[1] = False
  cost[2][:, ~gt_valid[2]] = -100.0  # padded columns must be ignored even when cheap
  pred_idx, matched = jax.jit(MATCHERS[name])(cost, gt_valid)
  assert pred_idx.dtype == jnp.int32 and matched.dtype == jnp.bool_
  assert pred_idx.shape == matched.shape == (4, num_gt)
  ref_idx, ref_matched, _ = scipy_reference(cost, gt_valid)
  np.testing.assert_array_equal(np.asarray(matched), ref_matched)
  np.testing.assert_array_equal(np.where(ref_matched, np.asarray(pred_idx), 0),
                                np.where(ref_matched, ref_idx, 0))
  assert not np.asarray(matched)[1].any()
  assert np.asarray(matched).sum(axis=1).max() <= min(num_pred, num_gt)


@pytest.mark.parametrize("name", sorted(MATCHERS))
def test_vmap_over_an_outer_batch(name):
  rng = np.random.default_rng(7)
  cost = rng.normal(size=(3, 2, 6, 5)).astype(np.float32)
  gt_valid = rng.random((2, 5)) > 0.4  # shared across the vmapped axis
  pred_idx, matched = jax.jit(jax.vmap(MATCHERS[name], in_axes=(0, None)))(cost, gt_valid)
  for v in range(3):
    ref_idx, ref_matched, _ = scipy_reference(cost[v], gt_valid)
    np.testing.assert_array_equal(np.asarray(matched[v]), ref_matched)
    np.testing.assert_array_equal(np.where(ref_matched, np.asarray(pred_idx[v]), 0),
                                  np.where(ref_matched, ref_idx, 0))


@pytest.mark.parametrize("name", sorted(MATCHERS))
@pytest.mark.parametrize("num_pred", [8, 4])
def test_ties_reach_the_optimal_total(name, num_pred):
  rng = np.random.default_rng(8)
  cost = rng.integers(0, 3, size=(5, num_pred, 6)).astype(np.float32)  # many ties
  gt_valid = rng.random((5, 6)) > 0.25
  pred_idx, matched = MATCHERS[name](cost, gt_valid)
  _, ref_matched, ref_totals = scipy_reference(cost, gt_valid)
  np.testing.assert_array_equal(np.asarray(matched), ref_matched)
  np.testing.assert_allclose(assignment_total(cost, np.asarray(pred_idx), np.asarray(matched)),
                             ref_totals, rtol=0, atol=1e-5)


def test_device_agrees_with_host_on_large_random_costs():
  rng = np.random.default_rng(9)
  cost = (rng.normal(size=(3, 30, 12)) * 50 + 10).astype(np.float32)
  gt_valid = rng.random((3, 12)) > 0.5
  host = hungarian_host(cost, gt_valid)
  device = hungarian_device(cost, gt_valid)
  np.testing.assert_array_equal(np.asarray(host[1]), np.asarray(device[1]))
  np.testing.assert_array_equal(np.asarray(host[0]), np.asarray(device[0]))


def test_non_finite_costs():
  cost = np.array([[[0.0, 5.0, 5.0], [5.0, 1.0, 5.0], [5.0, 5.0, 1.0]]], np.float32)
  gt_valid = np.array([[True, True, False]])
  cost[0, 0, 2] = np.nan  # NaN in a padded column: ignored by both
  np.testing.assert_array_equal(np.asarray(hungarian_host(cost, gt_valid)[0]), [[0, 1, 0]])
  np.testing.assert_array_equal(np.asarray(hungarian_device(cost, gt_valid)[0]), [[0, 1, 0]])
  cost[0, 0, 0] = np.nan  # NaN in a valid column
  with pytest.raises(Exception, match="NaN/inf"):
    jax.block_until_ready(jax.jit(hungarian_host)(cost, gt_valid))
  # Device: NaN counts as worse than every finite cost, -inf as better.
  pred_idx, matched = hungarian_device(cost, gt_valid)
  assert np.asarray(matched).tolist() == [[True, True, False]]
  assert int(pred_idx[0, 0]) != 0
  cost[0, 2, 1] = -np.inf
  pred_idx, _ = hungarian_device(cost, gt_valid)
  assert int(pred_idx[0, 1]) == 2


def test_matching_carries_no_gradient_and_works_under_grad():
  rng = np.random.default_rng(10)
  cost = jnp.asarray(rng.normal(size=(2, 4, 3)).astype(np.float32))
  gt_valid = jnp.ones((2, 3), bool)

  def loss(c):
    pred_idx, matched = hungarian_host(c, gt_valid)
    picked = jnp.take_along_axis(c, pred_idx[:, None, :], axis=1)[:, 0]  # [B, M]
    return jnp.where(matched, picked, 0.0).sum()

  grad = jax.jit(jax.grad(loss))(cost)
  pred_idx, _ = hungarian_host(cost, gt_valid)
  expected = np.zeros((2, 4, 3), np.float32)
  for b in range(2):
    expected[b, np.asarray(pred_idx[b]), np.arange(3)] = 1
  np.testing.assert_array_equal(np.asarray(grad), expected)


def test_get_matcher_and_matched_queries():
  assert get_matcher("hungarian_host") is hungarian_host
  assert get_matcher("hungarian_device") is hungarian_device
  with pytest.raises(ValueError, match="unknown matcher 'simota'.*hungarian_device"):
    get_matcher("simota")
  with pytest.raises(ValueError, match="gt_valid"):
    hungarian_host(jnp.zeros((2, 4, 3)), jnp.ones((2, 4), bool))
  mask = matched_queries(jnp.array([[2, 0, 1], [3, 3, 0]]),
                         jnp.array([[True, False, True], [True, False, False]]), 4)
  assert np.asarray(mask).tolist() == [[False, True, True, False], [False, False, False, True]]


def torch_batch_dice_loss(inputs, targets):
  """Mask2Former matcher.batch_dice_loss, transcribed."""
  inputs = inputs.sigmoid().flatten(1)
  numerator = 2 * torch.einsum("nc,mc->nm", inputs, targets)
  denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
  return 1 - (numerator + 1) / (denominator + 1)


def torch_batch_sigmoid_ce_loss(inputs, targets):
  """Mask2Former matcher.batch_sigmoid_ce_loss, transcribed."""
  hw = inputs.shape[1]
  pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
  neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
  loss = torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, 1 - targets)
  return loss / hw


def torch_matcher_cost(pred_logits, pred_masks, gt_masks, coords, weights):
  """Mask2Former HungarianMatcher cost for one image with sigmoid objectness."""
  w_class, w_mask, w_dice = weights
  out = F.grid_sample(pred_masks[:, None], 2 * coords[None, :, None].expand(
      pred_masks.shape[0], -1, -1, -1) - 1, align_corners=False)[:, 0, :, 0]  # [N, K]
  tgt = F.grid_sample(gt_masks[:, None], 2 * coords[None, :, None].expand(
      gt_masks.shape[0], -1, -1, -1) - 1, align_corners=False)[:, 0, :, 0]  # [M, K]
  return (w_mask * torch_batch_sigmoid_ce_loss(out, tgt)
          + w_class * -pred_logits.sigmoid()[:, None]
          + w_dice * torch_batch_dice_loss(out, tgt))


def test_batch_costs_match_mask2former():
  rng = np.random.default_rng(11)
  logits = rng.normal(size=(2, 6, 50)).astype(np.float32) * 3
  targets = rng.random((2, 4, 50)).astype(np.float32)
  targets[:, :2] = targets[:, :2] > 0.5
  for b in range(2):
    t_logits, t_targets = torch.from_numpy(logits[b]), torch.from_numpy(targets[b])
    np.testing.assert_allclose(np.asarray(batch_dice_cost(logits, targets))[b],
                               torch_batch_dice_loss(t_logits, t_targets).numpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(batch_sigmoid_ce_cost(logits, targets))[b],
                               torch_batch_sigmoid_ce_loss(t_logits, t_targets).numpy(),
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(objectness_cost(logits[:, :, 0])),
                             -torch.from_numpy(logits[:, :, 0]).sigmoid().numpy(), rtol=1e-6)


def test_mask_matching_cost_matches_mask2former_and_ignores_outside_region():
  rng = np.random.default_rng(12)
  batch, num_pred, num_gt, size, num_points = 2, 5, 3, 8, 64
  pred_logits = rng.normal(size=(batch, num_pred)).astype(np.float32)
  pred_masks = rng.normal(size=(batch, num_pred, size, size)).astype(np.float32) * 2
  gt_masks = (rng.random((batch, num_gt, size, size)) > 0.5).astype(np.float32)
  region = np.zeros((batch, 4 * size, 4 * size), np.float32)  # stride-4 masks, full-size region
  region[0, 8:24, 4:28] = 1  # mask pixels rows 2-5, cols 1-6
  region[1] = 1
  key = jax.random.PRNGKey(13)
  cost = jax.jit(lambda *a: mask_matching_cost(key, *a, num_points, 2.0, 5.0, 5.0, region=region))(
      pred_logits, pred_masks, gt_masks)
  coords = np.array(sample_uniform_points(key, num_points, (batch,), jnp.asarray(region)))
  for b in range(batch):
    expected = torch_matcher_cost(torch.from_numpy(pred_logits[b]),
                                  torch.from_numpy(pred_masks[b]), torch.from_numpy(gt_masks[b]),
                                  torch.from_numpy(coords[b]), (2.0, 5.0, 5.0)).numpy()
    np.testing.assert_allclose(np.asarray(cost)[b], expected, rtol=1e-5, atol=1e-5)
  # Bilinear reads reach one mask pixel beyond the region: change everything further out.
  outside = np.ones((size, size), bool)
  outside[1:7, 0:8] = False
  pred_changed, gt_changed = pred_masks.copy(), gt_masks.copy()
  pred_changed[0][:, outside] = 50.0
  gt_changed[0][:, outside] = 1 - gt_changed[0][:, outside]
  changed = mask_matching_cost(key, pred_logits, pred_changed, gt_changed, num_points, 2.0, 5.0,
                               5.0, region=region)
  np.testing.assert_allclose(np.asarray(changed)[0], np.asarray(cost)[0], rtol=1e-6, atol=1e-6)
