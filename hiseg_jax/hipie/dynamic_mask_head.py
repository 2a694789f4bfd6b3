"""CondInst dynamic mask head as HIPIE's thing decoder uses it.

Each query carries the parameters of a tiny per-instance network (produced by
the decoder's controller MLP) that is run as 1x1 convolutions over the shared
mask-branch features::

  input  = concat([rel_x, rel_y], mask_feats)      (2 + C channels, stride 8)
  hidden = relu(conv1x1) -> relu(conv1x1) -> conv1x1   (C+2 -> 8 -> 8 -> 1)
  logits = aligned_bilinear(output, 8 / 4)         (stride 4)

Reference facts (HIPIE `DDETRSegmUniDN.dynamic_mask_with_coords`,
`parse_dynamic_params`, `aligned_bilinear`, `compute_locations`):

* With C = 8 feature channels and 8 dynamic channels the parameter vector has
  169 entries, split in this order: weights [80, 64, 8], then biases [8, 8, 1];
  each weight block is a row-major [out, in] matrix.
* The 2 coordinate channels come *first*, then the C feature channels.
* Relative coordinates are in input pixels and are not normalised:
  `rel = instance_xy - pixel_xy`, where `instance_xy` is the normalised
  reference point times the image size (w, h) and `pixel_xy` is the centre of
  the stride-8 feature cell, `8 * index + 8 // 2`.
* The stride-8 logits are upsampled x2 to stride 4 by CondInst's
  `aligned_bilinear` (replicate-pad one row/column at the end, align-corners
  bilinear resize to `f * n + 1`, replicate-pad `f // 2` at the start, crop).
"""

from typing import List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def dynamic_param_counts(in_channels: int = 8,
                         channels: int = 8,
                         num_layers: int = 3,
                         rel_coord: bool = True) -> Tuple[List[int], List[int]]:
  """Sizes of the weight and bias blocks of the dynamic network.

  Args:
    in_channels: mask-branch feature channels C (HIPIE: hidden_dim // 32 = 8).
    channels: width of the hidden dynamic layers (8).
    num_layers: number of dynamic 1x1 convolutions (the reference's
      `CTRL_LAYERS`, 3); must be >= 2.
    rel_coord: whether 2 relative-coordinate channels are prepended.

  Returns:
    (weight_nums, bias_nums); for the defaults ([80, 64, 8], [8, 8, 1]),
    169 parameters in all.

  Raises:
    ValueError: for fewer than 2 layers.
  """
  if num_layers < 2:
    raise ValueError(f'dynamic_param_counts: num_layers={num_layers} must be >= 2')
  first_in = in_channels + 2 if rel_coord else in_channels
  weight_nums = [first_in * channels] + [channels * channels] * (num_layers - 2) + [channels]
  bias_nums = [channels] * (num_layers - 1) + [1]
  return weight_nums, bias_nums


def parse_dynamic_params(params: jnp.ndarray,
                         weight_nums: Sequence[int],
                         bias_nums: Sequence[int]) -> List[Tuple[jnp.ndarray, jnp.ndarray]]:
  """Splits flat per-instance parameters into (weight, bias) pairs per layer.

  Args:
    params: [..., P] parameters, P = sum(weight_nums) + sum(bias_nums); all
      weights come first, then all biases.
    weight_nums: weight-block sizes per layer (out * in).
    bias_nums: bias-block sizes per layer (out).

  Returns:
    One `(weight [..., out, in], bias [..., out])` pair per layer.

  Raises:
    ValueError: when P does not match the block sizes.
  """
  total = sum(weight_nums) + sum(bias_nums)
  if params.shape[-1] != total or len(weight_nums) != len(bias_nums):
    raise ValueError(f'parse_dynamic_params: params {params.shape} must end in '
                     f'{total} = sum({list(weight_nums)}) + sum({list(bias_nums)})')
  splits = np.cumsum(list(weight_nums) + list(bias_nums))[:-1]  # [2L - 1]
  blocks = jnp.split(params, splits, axis=-1)  # 2L x [..., size]
  num_layers = len(weight_nums)
  layers = []
  for i in range(num_layers):
    out = bias_nums[i]
    weight = blocks[i].reshape(params.shape[:-1] + (out, weight_nums[i] // out))  # [..., out, in]
    layers.append((weight, blocks[num_layers + i]))  # [..., out, in], [..., out]
  return layers


def compute_locations(height: int, width: int, stride: int) -> np.ndarray:
  """Input-pixel centres of a stride-`stride` feature grid.

  Args:
    height: grid height h.
    width: grid width w.
    stride: feature stride in input pixels.

  Returns:
    [h, w, 2] float32 (x, y) = (stride * j + stride // 2, stride * i + stride // 2).
  """
  xs = np.arange(width, dtype=np.float32) * stride + stride // 2  # [w]
  ys = np.arange(height, dtype=np.float32) * stride + stride // 2  # [h]
  grid_x, grid_y = np.meshgrid(xs, ys, indexing='xy')  # [h, w], [h, w]
  return np.stack([grid_x, grid_y], axis=-1)  # [h, w, 2]


def _aligned_bilinear_matrix(size: int, factor: int) -> np.ndarray:
  """The [factor * size, size] interpolation matrix of `aligned_bilinear` along one axis."""
  # Output j reads the resized signal at j - factor // 2 (clamped at 0: the
  # front replicate pad); the resized signal at i samples the end-padded input
  # (length size + 1) at i / factor (align_corners=True). The end pad replicates
  # the last element, so padded index `size` is input `size - 1`.
  resized = np.maximum(np.arange(factor * size) - factor // 2, 0)  # [f*n]
  src = resized.astype(np.float64) / factor  # [f*n]
  lo = np.floor(src).astype(np.int64)  # [f*n]
  frac = src - lo  # [f*n]
  hi = np.minimum(lo + 1, size)  # [f*n]
  rows = np.arange(factor * size)  # [f*n]
  matrix = np.zeros((factor * size, size), np.float64)  # [f*n, n]
  np.add.at(matrix, (rows, np.minimum(lo, size - 1)), 1.0 - frac)
  np.add.at(matrix, (rows, np.minimum(hi, size - 1)), frac)
  return matrix.astype(np.float32)


def aligned_bilinear(x: jnp.ndarray, factor: int) -> jnp.ndarray:
  """CondInst's `aligned_bilinear` upsampling over the last two axes.

  Each axis is a product with its [factor * n, n] interpolation matrix (two taps per row), so the
  backward pass is a matrix product too instead of a scatter-add (slow on CPU).

  Args:
    x: [..., h, w] input.
    factor: integer upsampling factor >= 1.

  Returns:
    [..., factor * h, factor * w] output.

  Raises:
    ValueError: for a non-integer or non-positive factor or fewer than 2 axes.
  """
  if int(factor) != factor or factor < 1 or x.ndim < 2:
    raise ValueError(f'aligned_bilinear: factor {factor} must be an integer >= 1 and x '
                     f'{x.shape} must have at least 2 axes')
  factor = int(factor)
  if factor == 1:
    return x
  h, w = x.shape[-2:]
  rows = jnp.asarray(_aligned_bilinear_matrix(h, factor), x.dtype)  # [f*h, h]
  cols = jnp.asarray(_aligned_bilinear_matrix(w, factor), x.dtype)  # [f*w, w]
  x = jnp.einsum('...hw,Hh->...Hw', x, rows, precision='highest')  # [..., f*h, w]
  return jnp.einsum('...Hw,Ww->...HW', x, cols, precision='highest')  # [..., f*h, f*w]


def dynamic_mask_logits(mask_feats: jnp.ndarray,
                        params: jnp.ndarray,
                        locations: jnp.ndarray,
                        image_sizes: jnp.ndarray,
                        mask_feat_stride: int = 8,
                        mask_out_stride: int = 4,
                        channels: int = 8,
                        num_layers: int = 3,
                        rel_coord: bool = True) -> jnp.ndarray:
  """Per-query mask logits from CondInst dynamic convolutions.

  Args:
    mask_feats: [B, h, w, C] mask-branch features at `mask_feat_stride`.
    params: [B, Q, P] dynamic parameters from the controller MLP
      (P = 169 for C = 8, 8 channels, 3 layers, relative coordinates).
    locations: [B, Q, 2] normalised (x, y) instance locations in [0, 1] (the
      queries' reference-point / box centres).
    image_sizes: [B, 2] (height, width) in input pixels of the image the
      normalised locations refer to (the reference's `image_sizes`).
    mask_feat_stride: stride of `mask_feats` in input pixels (8).
    mask_out_stride: stride of the output logits (4).
    channels: width of the hidden dynamic layers (8).
    num_layers: number of dynamic 1x1 convolutions (3).
    rel_coord: prepend the 2 relative-coordinate channels (True in HIPIE).

  Returns:
    [B, Q, h * r, w * r] float mask logits, r = mask_feat_stride // mask_out_stride.

  Raises:
    ValueError: on inconsistent shapes, a parameter count that does not match
      the network, or strides that do not divide.
  """
  if mask_feats.ndim != 4 or params.ndim != 3 or params.shape[0] != mask_feats.shape[0]:
    raise ValueError(f'dynamic_mask_logits: expected mask_feats [B, h, w, C] and params '
                     f'[B, Q, P]; got {mask_feats.shape} and {params.shape}')
  b, h, w, c = mask_feats.shape
  q = params.shape[1]
  if locations.shape != (b, q, 2) or image_sizes.shape != (b, 2):
    raise ValueError(f'dynamic_mask_logits: expected locations [{b}, {q}, 2] and image_sizes '
                     f'[{b}, 2]; got {locations.shape} and {image_sizes.shape}')
  if mask_feat_stride % mask_out_stride or mask_feat_stride < mask_out_stride:
    raise ValueError(f'dynamic_mask_logits: mask_feat_stride={mask_feat_stride} must be a '
                     f'multiple of mask_out_stride={mask_out_stride}')
  weight_nums, bias_nums = dynamic_param_counts(c, channels, num_layers, rel_coord)
  layers = parse_dynamic_params(params, weight_nums, bias_nums)

  weight, bias = layers[0]  # [B, Q, O, C(+2)], [B, Q, O]
  x = jnp.einsum('bhwc,bqoc->bqhwo', mask_feats, weight[..., -c:])  # [B, Q, h, w, O]
  if rel_coord:
    scale = image_sizes[:, ::-1].astype(jnp.float32)  # [B, 2]  (w, h)
    instance_xy = locations.astype(jnp.float32) * scale[:, None, :]  # [B, Q, 2]
    pixel_xy = jnp.asarray(compute_locations(h, w, mask_feat_stride))  # [h, w, 2]
    rel = instance_xy[:, :, None, None, :] - pixel_xy  # [B, Q, h, w, 2]
    x = x + jnp.einsum('bqhwk,bqok->bqhwo', rel, weight[..., :2])  # [B, Q, h, w, O]
  x = x + bias[:, :, None, None, :]  # [B, Q, h, w, O]
  for weight, bias in layers[1:]:
    x = jax.nn.relu(x)  # [B, Q, h, w, I]
    x = jnp.einsum('bqhwi,bqoi->bqhwo', x, weight) + bias[:, :, None, None, :]  # [B, Q, h, w, O]
  x = x[..., 0]  # [B, Q, h, w]
  return aligned_bilinear(x, mask_feat_stride // mask_out_stride)  # [B, Q, r*h, r*w]
