"""Tests for hiseg_jax.hipie.dynamic_mask_head against a PyTorch transcription of HIPIE's CondInst head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiseg_jax.hipie.dynamic_mask_head import aligned_bilinear
from hiseg_jax.hipie.dynamic_mask_head import compute_locations
from hiseg_jax.hipie.dynamic_mask_head import dynamic_mask_logits
from hiseg_jax.hipie.dynamic_mask_head import dynamic_param_counts

# float32; logits reach ~1e2-1e3 (pixel-unit coordinates), sums of <= 10 terms per layer.
RTOL = 1e-5
ATOL = 1e-4


def torch_aligned_bilinear(tensor, factor):
  """Transcription of CondInst's aligned_bilinear."""
  if factor == 1:
    return tensor
  h, w = tensor.size()[2:]
  tensor = F.pad(tensor, pad=(0, 1, 0, 1), mode='replicate')
  oh = factor * h + 1
  ow = factor * w + 1
  tensor = F.interpolate(tensor, size=(oh, ow), mode='bilinear', align_corners=True)
  tensor = F.pad(tensor, pad=(factor // 2, 0, factor // 2, 0), mode='replicate')
  return tensor[:, :, :oh - 1, :ow - 1]


def torch_compute_locations(h, w, stride):
  shifts_x = torch.arange(0, w * stride, step=stride, dtype=torch.float32)
  shifts_y = torch.arange(0, h * stride, step=stride, dtype=torch.float32)
  shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing='ij')
  return torch.stack((shift_x.reshape(-1), shift_y.reshape(-1)), dim=1) + stride // 2


def torch_parse_dynamic_params(params, channels, weight_nums, bias_nums):
  num_insts = params.size(0)
  num_layers = len(weight_nums)
  splits = list(torch.split_with_sizes(params, weight_nums + bias_nums, dim=1))
  weights, biases = splits[:num_layers], splits[num_layers:]
  for l in range(num_layers):
    if l < num_layers - 1:
      weights[l] = weights[l].reshape(num_insts * channels, -1, 1, 1)
      biases[l] = biases[l].reshape(num_insts * channels)
    else:
      weights[l] = weights[l].reshape(num_insts * 1, -1, 1, 1)
      biases[l] = biases[l].reshape(num_insts)
  return weights, biases


def torch_mask_heads_forward(features, weights, biases, num_insts):
  x = features
  for i, (w, b) in enumerate(zip(weights, biases)):
    x = F.conv2d(x, w, bias=b, stride=1, padding=0, groups=num_insts)
    if i < len(weights) - 1:
      x = F.relu(x)
  return x


def torch_dynamic_mask_with_coords(mask_feats, reference_points, params, num_insts,
                                   weight_nums, bias_nums, rel_coord, mask_feat_stride=8,
                                   mask_out_stride=4):
  """Transcription of HIPIE's DDETRSegmUniDN.dynamic_mask_with_coords (no RAFT upsampling)."""
  _, in_channels, h, w = mask_feats.size()
  num_insts_all = reference_points.shape[1]
  locations = torch_compute_locations(h, w, mask_feat_stride)
  inputs = []
  inst_st = 0
  if rel_coord:
    rel = reference_points.reshape(1, num_insts_all, 1, 1, 2) - locations.reshape(1, 1, h, w, 2)
    rel = rel.float().permute(0, 1, 4, 2, 3).flatten(-2, -1)
    for i, num_inst in enumerate(num_insts):
      rel_b = rel[:, inst_st:inst_st + num_inst]
      feats_b = mask_feats[i].reshape(1, in_channels, h * w).unsqueeze(1).repeat(1, num_inst, 1, 1)
      inputs.append(torch.cat([rel_b, feats_b], dim=2))
      inst_st += num_inst
  else:
    for i, num_inst in enumerate(num_insts):
      feats_b = mask_feats[i].reshape(1, in_channels, h * w).unsqueeze(1).repeat(1, num_inst, 1, 1)
      inputs.append(feats_b.reshape(1, -1, h, w))
  inputs = torch.cat(inputs, dim=1).reshape(1, -1, h, w)
  params = torch.flatten(params, 0, 1)
  weights, biases = torch_parse_dynamic_params(params, 8, weight_nums, bias_nums)
  logits = torch_mask_heads_forward(inputs, weights, biases, params.shape[0])
  logits = logits.reshape(-1, 1, h, w)
  logits = torch_aligned_bilinear(logits, mask_feat_stride // mask_out_stride)
  return logits.reshape(1, -1, logits.shape[-2], logits.shape[-1])


def test_param_counts_match_condinst_layout():
  weight_nums, bias_nums = dynamic_param_counts()
  assert (weight_nums, bias_nums) == ([80, 64, 8], [8, 8, 1])
  assert sum(weight_nums) + sum(bias_nums) == 169
  assert dynamic_param_counts(rel_coord=False) == ([64, 64, 8], [8, 8, 1])


@pytest.mark.parametrize('factor', [1, 2, 3, 4])
def test_aligned_bilinear_matches_torch(factor):
  x = np.random.default_rng(factor).normal(size=(2, 3, 5, 7)).astype(np.float32)
  ref = torch_aligned_bilinear(torch.from_numpy(x), factor).numpy()
  out = np.asarray(aligned_bilinear(jnp.asarray(x), factor))
  assert out.shape == ref.shape == (2, 3, 5 * factor, 7 * factor)
  # Inputs of size ~2: weights such as 1/3 round differently in f32 (one ulp of the inputs).
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=3e-6)


def test_compute_locations_matches_torch():
  ref = torch_compute_locations(3, 5, 8).numpy().reshape(3, 5, 2)
  np.testing.assert_array_equal(compute_locations(3, 5, 8), ref)


@pytest.mark.parametrize('rel_coord', [True, False])
def test_dynamic_mask_logits_match_torch_grouped_conv(rel_coord):
  rng = np.random.default_rng(0 if rel_coord else 1)
  b, h, w, c, q = 2, 6, 7, 8, 5
  weight_nums, bias_nums = dynamic_param_counts(c, 8, 3, rel_coord)
  num_params = sum(weight_nums) + sum(bias_nums)
  mask_feats = rng.normal(size=(b, h, w, c)).astype(np.float32)
  params = (0.3 * rng.normal(size=(b, q, num_params))).astype(np.float32)
  locations = rng.uniform(size=(b, q, 2)).astype(np.float32)
  image_sizes = np.array([[48, 56], [40, 50]], np.int32)  # (h, w) of each image

  # The reference scales the normalised points by (w, h) and concatenates all images' queries.
  scale = image_sizes[:, ::-1].astype(np.float32)
  ref_points = torch.from_numpy((locations * scale[:, None, :]).reshape(1, b * q, 2))
  ref = torch_dynamic_mask_with_coords(
      torch.from_numpy(mask_feats.transpose(0, 3, 1, 2).copy()), ref_points,
      torch.from_numpy(params.reshape(1, b * q, num_params)), [q] * b,
      weight_nums, bias_nums, rel_coord).numpy().reshape(b, q, 2 * h, 2 * w)

  out = jax.jit(dynamic_mask_logits, static_argnames=('rel_coord',))(
      mask_feats, params, locations, image_sizes, rel_coord=rel_coord)
  assert out.shape == (b, q, 2 * h, 2 * w)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=RTOL, atol=ATOL)


def test_bad_param_count_raises():
  with pytest.raises(ValueError, match='169'):
    dynamic_mask_logits(jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 3, 168)),
                        jnp.zeros((1, 3, 2)), jnp.array([[32, 32]]))
