"""Tests for hiseg_jax.losses.point_sampling against PyTorch's grid_sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiseg_jax.losses.point_sampling import calculate_uncertainty
from hiseg_jax.losses.point_sampling import get_uncertain_point_coords_with_randomness
from hiseg_jax.losses.point_sampling import point_sample
from hiseg_jax.losses.point_sampling import sample_uniform_points


def torch_point_sample(inputs, coords, align_corners):
  """PointRend/Mask2Former point_sample: grid_sample on [N, C, H, W] and [N, P, 2]."""
  grid = 2.0 * coords.unsqueeze(2) - 1.0  # [N, P, 1, 2]
  out = F.grid_sample(inputs, grid, mode="bilinear", padding_mode="zeros",
                      align_corners=align_corners)  # [N, C, P, 1]
  return out.squeeze(3)  # [N, C, P]


def torch_uncertain_points(coarse_logits, candidates, extra, num_uncertain):
  """Mask2Former's get_uncertain_point_coords_with_randomness given its random draws."""
  point_logits = torch_point_sample(coarse_logits, candidates, False)  # [R, 1, S]
  uncertainty = -torch.abs(point_logits)  # [R, 1, S]
  idx = torch.topk(uncertainty[:, 0, :], k=num_uncertain, dim=1)[1]  # [R, Pu]
  chosen = torch.gather(candidates, 1, idx[..., None].expand(-1, -1, 2))  # [R, Pu, 2]
  return torch.cat([chosen, extra], dim=1)  # [R, P, 2]


@pytest.mark.parametrize("align_corners", [False, True])
def test_point_sample_matches_grid_sample(align_corners):
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(3, 4, 7, 9)).astype(np.float32)  # [N, C, H, W]
  coords = rng.uniform(-0.1, 1.1, size=(3, 50, 2)).astype(np.float32)  # some points outside
  coords[0, :4] = [[0, 0], [1, 1], [0, 1], [0.5, 0.5]]
  expected = torch_point_sample(torch.from_numpy(inputs), torch.from_numpy(coords),
                                align_corners).numpy()
  got = jax.jit(lambda x, c: point_sample(x, c, align_corners=align_corners))(inputs, coords)
  # float32 coordinate rounding may differ by an ulp from ATen's: atol 1e-5.
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
  got_last = point_sample(jnp.moveaxis(jnp.asarray(inputs), 1, -1), coords,
                          align_corners=align_corners, channels_last=True)  # [N, P, C]
  np.testing.assert_allclose(np.asarray(got_last), expected.transpose(0, 2, 1),
                             rtol=1e-5, atol=1e-5)


def test_point_sample_reads_bool_masks_as_floats():
  rng = np.random.default_rng(3)
  masks = rng.random((2, 3, 16, 16)) < 0.4  # [B, M, H, W] bool targets
  coords = rng.uniform(-0.05, 1.05, size=(2, 3, 30, 2)).astype(np.float32)  # [B, M, P, 2]
  got = point_sample(jnp.asarray(masks)[:, :, None], coords)[:, :, 0]  # [B, M, P]
  want = point_sample(jnp.asarray(masks, jnp.float32)[:, :, None], coords)[:, :, 0]
  assert got.dtype == jnp.float32
  # The same arithmetic after the lookup: exact.
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_point_sample_gradient_matches_torch():
  rng = np.random.default_rng(1)
  inputs = rng.normal(size=(2, 3, 6, 5)).astype(np.float32)
  coords = rng.uniform(0, 1, size=(2, 40, 2)).astype(np.float32)
  weights = rng.normal(size=(2, 3, 40)).astype(np.float32)
  x = torch.from_numpy(inputs).requires_grad_(True)
  sampled = torch_point_sample(x, torch.from_numpy(coords), False)
  (sampled * torch.from_numpy(weights)).sum().backward()
  grad = jax.grad(lambda v: (point_sample(v, coords) * weights).sum())(jnp.asarray(inputs))
  np.testing.assert_allclose(np.asarray(grad), x.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_point_sample_leading_dims_and_errors():
  rng = np.random.default_rng(2)
  inputs = rng.normal(size=(2, 3, 1, 5, 5)).astype(np.float32)  # [B, M, 1, H, W]
  coords = rng.uniform(0, 1, size=(2, 3, 11, 2)).astype(np.float32)  # [B, M, P, 2]
  got = point_sample(inputs, coords)  # [B, M, 1, P]
  expected = torch_point_sample(torch.from_numpy(inputs.reshape(6, 1, 5, 5)),
                                torch.from_numpy(coords.reshape(6, 11, 2)), False)
  np.testing.assert_allclose(np.asarray(got).reshape(6, 1, 11), expected.numpy(), rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="leading dims"):
    point_sample(inputs, coords[:1])


def test_sample_uniform_points_unit_square_and_region():
  points = sample_uniform_points(jax.random.PRNGKey(0), 500, (2, 3))
  assert points.shape == (2, 3, 500, 2)
  assert float(points.min()) >= 0 and float(points.max()) <= 1
  region = np.zeros((2, 8, 8), np.float32)
  region[0, 2:4, 5:8] = 1  # rows 2-3, cols 5-7: six pixels
  region[1, 7, 0] = 1
  points = np.asarray(sample_uniform_points(jax.random.PRNGKey(1), 12000, (2, 2),
                                            jnp.asarray(region)))  # [2, 2, P, 2]
  cols = np.floor(points[..., 0] * 8).astype(int)
  rows = np.floor(points[..., 1] * 8).astype(int)
  for b in range(2):
    assert region[b][rows[b], cols[b]].min() == 1, "a point fell outside the region"
  # Uniform over the six pixels: 24,000 draws, 4,000 expected per pixel, std ~58.
  _, counts = np.unique(rows[0] * 8 + cols[0], return_counts=True)
  assert counts.size == 6 and np.abs(counts - 4000).max() < 400
  with pytest.raises(ValueError, match="region"):
    sample_uniform_points(jax.random.PRNGKey(0), 5, (3,), jnp.asarray(region))


def test_uncertain_points_match_torch_given_the_same_draws():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 3, 12, 12)).astype(np.float32)  # [B, M, H, W]
  num_points, oversample, importance = 40, 3.0, 0.75
  num_sampled, num_uncertain = 120, 30
  key = jax.random.PRNGKey(4)
  got = np.asarray(jax.jit(lambda x: get_uncertain_point_coords_with_randomness(
      key, x, num_points, oversample, importance))(logits))
  assert got.shape == (2, 3, num_points, 2)
  assert got.min() >= 0 and got.max() <= 1
  draws = np.array(sample_uniform_points(key, num_sampled + num_points - num_uncertain, (2, 3)))
  expected = torch_uncertain_points(
      torch.from_numpy(logits.reshape(6, 1, 12, 12)),
      torch.from_numpy(draws[:, :, :num_sampled].reshape(6, num_sampled, 2)),
      torch.from_numpy(draws[:, :, num_sampled:].reshape(6, -1, 2)), num_uncertain).numpy()
  np.testing.assert_allclose(got.reshape(6, num_points, 2), expected, rtol=0, atol=0)


def test_importance_points_are_the_most_uncertain_and_in_region():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(2, 2, 16, 16)).astype(np.float32) * 4
  region = np.zeros((2, 32, 32), np.float32)
  region[:, 8:30, 4:20] = 1
  key = jax.random.PRNGKey(6)
  got = np.asarray(get_uncertain_point_coords_with_randomness(
      key, jnp.asarray(logits), 64, 3.0, 0.75, region=jnp.asarray(region)))  # [2, 2, 64, 2]
  cols = np.floor(got[..., 0] * 32).astype(int)
  rows = np.floor(got[..., 1] * 32).astype(int)
  assert region[0][rows, cols].min() == 1
  candidates = np.asarray(sample_uniform_points(key, 192 + 16, (2, 2), jnp.asarray(region)))
  unc = np.asarray(calculate_uncertainty(point_sample(
      jnp.asarray(logits)[:, :, None], jnp.asarray(candidates[:, :, :192]))))[:, :, 0]
  chosen_unc = np.asarray(calculate_uncertainty(point_sample(
      jnp.asarray(logits)[:, :, None], jnp.asarray(got[:, :, :48]))))[:, :, 0]  # [2, 2, 48]
  kth = np.sort(unc, axis=-1)[..., -48]  # 48th largest uncertainty per mask
  assert np.all(chosen_unc.min(-1) >= kth - 1e-6)
  np.testing.assert_array_equal(got[:, :, 48:], candidates[:, :, 192:])
  with pytest.raises(ValueError, match="oversample_ratio"):
    get_uncertain_point_coords_with_randomness(key, jnp.asarray(logits), 8, 0.5, 0.75)
  with pytest.raises(ValueError, match="importance_sample_ratio"):
    get_uncertain_point_coords_with_randomness(key, jnp.asarray(logits), 8, 3.0, 1.5)
