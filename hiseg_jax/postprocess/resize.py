"""Mask resampling exactly as HIPIE's PyTorch inference does it.

* `upsample_mask_logits`: `F.interpolate(..., scale ×stride, 'bilinear', align_corners=False)`
  from the mask resolution (stride 4 of the padded input canvas) to the canvas.
* `crop_resize_mask_logits`: crop to the valid (unpadded) image area, then bilinear to the
  original image size (the semantic / panoptic path).
* `nearest_resize`: `F.interpolate(..., mode='nearest')` (source index floor(dst · in / out) in
  float32), which HIPIE's `segmentation_postprocess` applies to binary instance masks.
* `bilinear_weights` and `host_mask_logits_to_output`: the same upsample-crop-resize as
  `mask_logits_to_output` in NumPy, for per-image host code whose output sizes vary (no
  compilation per size).

Bilinear resizes use `jax.image.resize` without antialiasing, which equals torch's
`align_corners=False` bilinear for up- and down-sampling.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _check_hw(name: str, hw: Sequence[int]) -> tuple:
  hw = tuple(int(v) for v in hw)
  if len(hw) != 2 or min(hw) <= 0:
    raise ValueError(f'{name} must be a positive (height, width), got {hw}')
  return hw


def upsample_mask_logits(mask_logits: jnp.ndarray, stride: int) -> jnp.ndarray:
  """Bilinear upsampling of mask logits by the mask stride.

  Args:
    mask_logits: [N, h, w] logits at 1/stride of the padded canvas.
    stride: integer factor (HIPIE's MASK_STRIDE, 4).

  Returns:
    [N, h·stride, w·stride] logits.
  """
  if mask_logits.ndim != 3:
    raise ValueError(f'upsample_mask_logits: mask_logits must be [N, h, w], got '
                     f'{mask_logits.shape}')
  n, h, w = mask_logits.shape
  return jax.image.resize(mask_logits.astype(jnp.float32), (n, h * stride, w * stride),
                          'bilinear', antialias=False)  # [N, h·s, w·s]


def crop_resize_mask_logits(mask_logits: jnp.ndarray, image_hw: Sequence[int],
                            output_hw: Sequence[int]) -> jnp.ndarray:
  """Crops canvas-resolution logits to the valid image and resizes them to the output size.

  Args:
    mask_logits: [N, H, W] logits on the padded canvas.
    image_hw: (h, w) valid image area at the canvas' top-left, h <= H, w <= W.
    output_hw: (H_out, W_out) original image size.

  Returns:
    [N, H_out, W_out] logits.
  """
  (h, w), (ho, wo) = _check_hw('image_hw', image_hw), _check_hw('output_hw', output_hw)
  if mask_logits.ndim != 3 or h > mask_logits.shape[1] or w > mask_logits.shape[2]:
    raise ValueError(f'crop_resize_mask_logits: image_hw {(h, w)} does not fit in mask_logits '
                     f'{mask_logits.shape}')
  cropped = mask_logits[:, :h, :w]  # [N, h, w]
  if (h, w) == (ho, wo):
    return cropped
  return jax.image.resize(cropped, (mask_logits.shape[0], ho, wo), 'bilinear',
                          antialias=False)  # [N, H_out, W_out]


def mask_logits_to_output(mask_logits: jnp.ndarray, stride: int, image_hw: Sequence[int],
                          output_hw: Sequence[int]) -> jnp.ndarray:
  """Stride-resolution logits to original-image logits (upsample, crop, resize).

  Args:
    mask_logits: [N, h, w] logits at 1/stride of the padded canvas.
    stride: mask stride.
    image_hw: valid image area on the canvas.
    output_hw: original image size.

  Returns:
    [N, H_out, W_out] logits.
  """
  return crop_resize_mask_logits(upsample_mask_logits(mask_logits, stride), image_hw,
                                 output_hw)  # [N, H_out, W_out]


def bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
  """Resampling matrix of torch's bilinear resize (`align_corners=False`) along one axis.

  Output sample i reads the input at x = max((i + 0.5) · in / out - 0.5, 0), linearly between
  floor(x) and min(floor(x) + 1, in - 1), as `F.interpolate` does (no antialiasing).

  Args:
    in_size: input length.
    out_size: output length.

  Returns:
    float64 [out_size, in_size]; `weights @ v` resizes a vector v of length in_size.
  """
  x = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)  # [out]
  lo = np.minimum(np.floor(x).astype(np.int64), in_size - 1)  # [out]
  hi = np.minimum(lo + 1, in_size - 1)  # [out]
  frac = x - lo  # [out]
  weights = np.zeros((out_size, in_size))  # [out, in]
  np.add.at(weights, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(weights, (np.arange(out_size), hi), frac)
  return weights


def host_mask_logits_to_output(mask_logits: np.ndarray, stride: int, image_hw: Sequence[int],
                               output_hw: Sequence[int]) -> np.ndarray:
  """NumPy `mask_logits_to_output`: upsample by the stride, crop, resize to the output size.

  The three linear steps are composed into one matrix per axis, so the result equals the
  sequential torch resizes up to float rounding.

  Args:
    mask_logits: [N, h, w] logits at 1/stride of the padded canvas.
    stride: mask stride (the canvas is h·stride x w·stride).
    image_hw: (h_img, w_img) valid image area at the canvas' top-left.
    output_hw: (H_out, W_out) original image size.

  Returns:
    float32 [N, H_out, W_out] logits.
  """
  (h, w), (ho, wo) = _check_hw('image_hw', image_hw), _check_hw('output_hw', output_hw)
  if mask_logits.ndim != 3 or h > mask_logits.shape[1] * stride or (
      w > mask_logits.shape[2] * stride):
    raise ValueError(f'host_mask_logits_to_output: image_hw {(h, w)} does not fit in '
                     f'mask_logits {mask_logits.shape} at stride {stride}')
  rows = bilinear_weights(h, ho) @ bilinear_weights(mask_logits.shape[1],
                                                    mask_logits.shape[1] * stride)[:h]  # [Ho, h']
  cols = bilinear_weights(w, wo) @ bilinear_weights(mask_logits.shape[2],
                                                    mask_logits.shape[2] * stride)[:w]  # [Wo, w']
  out = rows.astype(np.float32) @ np.asarray(mask_logits, np.float32)  # [N, Ho, w']
  return out @ cols.astype(np.float32).T  # [N, Ho, Wo]


def nearest_source_index(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of torch's legacy 'nearest' resize along one axis.

  Args:
    in_size: input length.
    out_size: output length.

  Returns:
    int64 [out_size] min(floor(i · in / out), in - 1), with the scale and product in float32.
  """
  scale = np.float32(in_size / out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)  # [out]
  return np.minimum(src, in_size - 1)  # [out]


def nearest_resize(masks: jnp.ndarray, output_hw: Sequence[int]) -> jnp.ndarray:
  """Nearest-neighbour resize of [N, H, W] maps (torch `mode='nearest'`).

  Args:
    masks: [N, H, W] any dtype.
    output_hw: (H_out, W_out).

  Returns:
    [N, H_out, W_out] same dtype.
  """
  ho, wo = _check_hw('output_hw', output_hw)
  if masks.ndim != 3:
    raise ValueError(f'nearest_resize: masks must be [N, H, W], got {masks.shape}')
  iy = nearest_source_index(masks.shape[1], ho)  # [H_out]
  ix = nearest_source_index(masks.shape[2], wo)  # [W_out]
  return masks[:, iy][:, :, ix]  # [N, H_out, W_out]
