"""Point sampling on masks: bilinear point lookup and Mask2Former's point selection.

`point_sample` reads values at continuous normalised coordinates exactly like
PyTorch's `grid_sample(input, 2 * coords - 1, mode="bilinear", padding_mode="zeros")`
(PointRend's `point_sample`, used by Mask2Former). `sample_uniform_points` draws
points uniformly over the unit square or uniformly over a binary region, and
`get_uncertain_point_coords_with_randomness` is Mask2Former's importance sampling
(oversample, keep the most uncertain points, top up with random ones).

Coordinates are `(x, y)` in `[0, 1]`, x along the width; with `align_corners=False`
pixel `i` of a size-`S` axis covers `[i / S, (i + 1) / S]` and its centre is at
`(i + 0.5) / S`, so the same coordinates address masks of any resolution.
"""

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp


def point_sample(
    inputs: jax.Array,
    coords: jax.Array,
    align_corners: bool = False,
    channels_last: bool = False,
) -> jax.Array:
  """Bilinearly samples `inputs` at normalised points, zero outside the map.

  Equal to `torch.nn.functional.grid_sample(inputs, 2 * coords[:, :, None] - 1,
  mode="bilinear", padding_mode="zeros", align_corners=align_corners)[..., 0]`.

  Args:
    inputs: feature maps, `[..., C, H, W]` (or `[..., H, W, C]` with
      `channels_last`); the leading dims are batch dims shared with `coords`.
      Any numeric or bool dtype: values are converted after the lookup, so
      bool targets need no float copy of the whole map.
    coords: `[..., P, 2]` points as `(x, y)` in `[0, 1]`, same leading dims.
    align_corners: PyTorch's `align_corners` convention; False maps 0 and 1 to
      the outer pixel edges, True to the outer pixel centres.
    channels_last: whether `inputs` has its channel axis last.

  Returns:
    `[..., C, P]` sampled values (`[..., P, C]` with `channels_last`).

  Raises:
    ValueError: when the ranks or leading dims of `inputs` and `coords` differ.
  """
  if channels_last:
    inputs = jnp.moveaxis(inputs, -1, -3)  # [..., C, H, W]
  if inputs.ndim < 3 or coords.ndim < 2 or coords.shape[-1] != 2:
    raise ValueError(
        f"point_sample: inputs must be [..., C, H, W] and coords [..., P, 2]; "
        f"got inputs {inputs.shape} and coords {coords.shape}")
  if inputs.shape[:-3] != coords.shape[:-2]:
    raise ValueError(
        f"point_sample: leading dims of inputs {inputs.shape} (before C, H, W) "
        f"and coords {coords.shape} (before P, 2) must be equal")
  height, width = inputs.shape[-2:]
  grid = 2.0 * coords.astype(jnp.float32) - 1.0  # [..., P, 2] in [-1, 1], as grid_sample
  if align_corners:
    x = (grid[..., 0] + 1) / 2 * (width - 1)  # [..., P] pixel-centre units
    y = (grid[..., 1] + 1) / 2 * (height - 1)  # [..., P]
  else:
    x = ((grid[..., 0] + 1) * width - 1) / 2  # [..., P]
    y = ((grid[..., 1] + 1) * height - 1) / 2  # [..., P]
  x0 = jnp.floor(x)  # [..., P]
  y0 = jnp.floor(y)  # [..., P]
  wx1 = x - x0  # [..., P]
  wy1 = y - y0  # [..., P]
  x0 = x0.astype(jnp.int32)  # [..., P]
  y0 = y0.astype(jnp.int32)  # [..., P]
  flat = inputs.reshape(inputs.shape[:-2] + (height * width,))  # [..., C, H*W]

  def corner(yi, xi, weight):
    inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)  # [..., P]
    index = jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)  # [..., P]
    values = jnp.take_along_axis(flat, index[..., None, :], axis=-1)  # [..., C, P]
    weight = jnp.where(inside, weight, 0.0)[..., None, :]  # [..., 1, P]
    return values.astype(jnp.promote_types(values.dtype, weight.dtype)) * weight  # [..., C, P]

  out = (corner(y0, x0, (1 - wx1) * (1 - wy1))
         + corner(y0, x0 + 1, wx1 * (1 - wy1))
         + corner(y0 + 1, x0, (1 - wx1) * wy1)
         + corner(y0 + 1, x0 + 1, wx1 * wy1))  # [..., C, P]
  if channels_last:
    out = jnp.moveaxis(out, -2, -1)  # [..., P, C]
  return out


def sample_uniform_points(
    rng: jax.Array,
    num_points: int,
    batch_shape: Sequence[int],
    region: Optional[jax.Array] = None,
) -> jax.Array:
  """Draws points uniformly over the unit square or over a binary region.

  With a region, each point picks one of the image's region pixels uniformly
  (a table of region pixel indices built once per image with a cumulative
  count, then one lookup per point) and a uniform position inside that pixel,
  so the points are uniform over the union of region pixels. An empty region
  yields points in its first pixel; callers must give such samples zero weight.

  Args:
    rng: PRNG key.
    num_points: points per set, P.
    batch_shape: leading shape of the result; `batch_shape[0]` indexes images.
    region: optional `[batch_shape[0], Hr, Wr]` map, a pixel is in the region
      where it is > 0.5; any resolution (coordinates are normalised).

  Returns:
    `batch_shape + [P, 2]` float32 `(x, y)` coordinates in `[0, 1]`.

  Raises:
    ValueError: when `region` is not `[batch_shape[0], Hr, Wr]`.
  """
  batch_shape = tuple(batch_shape)
  if region is None:
    return jax.random.uniform(rng, batch_shape + (num_points, 2), jnp.float32)  # [..., P, 2]
  if region.ndim != 3 or not batch_shape or region.shape[0] != batch_shape[0]:
    raise ValueError(
        f"sample_uniform_points: region must be [{batch_shape[0] if batch_shape else 'B'}, H, W] "
        f"matching batch_shape {batch_shape}; got {region.shape}")
  num_images, height, width = region.shape
  inside = (region > 0.5).reshape(num_images, height * width)  # [B, Hr*Wr]
  order = jnp.cumsum(inside.astype(jnp.int32), axis=-1) - 1  # [B, Hr*Wr] rank of each region pixel
  total = order[:, -1] + 1  # [B]
  # table[b, r] = flat index of the r-th region pixel of image b (0 past the end).
  slots = jnp.where(inside, order, height * width)  # [B, Hr*Wr]
  pixel_ids = jnp.broadcast_to(jnp.arange(height * width, dtype=jnp.int32),
                               inside.shape)  # [B, Hr*Wr]
  table = jax.vmap(lambda s, p: jnp.zeros((height * width,), jnp.int32).at[s].set(p, mode="drop"))(
      slots, pixel_ids)  # [B, Hr*Wr]
  # One draw with the 3 uniforms per point on a leading axis (a trailing axis of
  # size 3 is several times slower to generate on CPU).
  draws = jax.random.uniform(rng, (3,) + batch_shape + (num_points,), jnp.float32)  # [3, ..., P]
  u = draws[0].reshape(num_images, -1)  # [B, S*P]
  rank = jnp.floor(u * total[:, None].astype(jnp.float32)).astype(jnp.int32)  # [B, S*P]
  rank = jnp.clip(rank, 0, jnp.maximum(total[:, None] - 1, 0))  # [B, S*P]
  pixel = jnp.take_along_axis(table, rank, axis=-1).reshape(batch_shape + (num_points,))  # [..., P]
  row = (pixel // width).astype(jnp.float32)  # [..., P]
  col = (pixel % width).astype(jnp.float32)  # [..., P]
  x = (col + draws[1]) / width  # [..., P]
  y = (row + draws[2]) / height  # [..., P]
  return jnp.stack([x, y], axis=-1)  # [..., P, 2]


def calculate_uncertainty(logits: jax.Array) -> jax.Array:
  """Mask2Former's class-agnostic point uncertainty, `-|logit|`.

  Args:
    logits: mask logits at points, any shape.

  Returns:
    Uncertainty of the same shape; highest where the logit is closest to 0.
  """
  return -jnp.abs(logits)


def get_uncertain_point_coords_with_randomness(
    rng: jax.Array,
    coarse_logits: jax.Array,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    region: Optional[jax.Array] = None,
    uncertainty_fn: Callable[[jax.Array], jax.Array] = calculate_uncertainty,
) -> jax.Array:
  """Mask2Former/PointRend importance sampling of mask points.

  Draws `int(num_points * oversample_ratio)` uniform points, keeps the
  `int(importance_sample_ratio * num_points)` most uncertain ones under
  `uncertainty_fn` of the bilinearly sampled logits, and adds
  `num_points - that` further uniform points (drawn in the same call as, and
  independent of, the oversampled ones). With `region`, every uniform draw
  (oversampled and random) lies inside the region (see `sample_uniform_points`).
  The result carries no gradient.

  Args:
    rng: PRNG key.
    coarse_logits: `[..., H, W]` mask logits; leading dims index masks, the
      first one images.
    num_points: number of points to return per mask.
    oversample_ratio: oversampling factor, >= 1 (Mask2Former: 3).
    importance_sample_ratio: fraction of points chosen by uncertainty, in
      `[0, 1]` (Mask2Former: 0.75).
    region: optional `[coarse_logits.shape[0], Hr, Wr]` supervised region.
    uncertainty_fn: maps point logits `[..., S]` to uncertainties `[..., S]`.

  Returns:
    `[..., num_points, 2]` float32 `(x, y)` coordinates in `[0, 1]`.

  Raises:
    ValueError: on an oversample ratio below 1 or an importance ratio outside
      `[0, 1]`.
  """
  if oversample_ratio < 1:
    raise ValueError(f"get_uncertain_point_coords_with_randomness: oversample_ratio "
                     f"must be >= 1, got {oversample_ratio}")
  if not 0 <= importance_sample_ratio <= 1:
    raise ValueError(f"get_uncertain_point_coords_with_randomness: importance_sample_ratio "
                     f"must be in [0, 1], got {importance_sample_ratio}")
  coarse_logits = jax.lax.stop_gradient(coarse_logits)  # [..., H, W]
  batch_shape = coarse_logits.shape[:-2]
  num_sampled = int(num_points * oversample_ratio)
  num_uncertain = int(importance_sample_ratio * num_points)
  num_random = num_points - num_uncertain
  coords = sample_uniform_points(
      rng, num_sampled + num_random, batch_shape, region)  # [..., S+Pr, 2]
  candidates = coords[..., :num_sampled, :]  # [..., S, 2]
  point_logits = point_sample(coarse_logits[..., None, :, :], candidates)[..., 0, :]  # [..., S]
  uncertainty = uncertainty_fn(point_logits)  # [..., S]
  _, top = jax.lax.top_k(uncertainty, num_uncertain)  # [..., Pu]
  chosen = jnp.take_along_axis(candidates, top[..., None], axis=-2)  # [..., Pu, 2]
  chosen = jnp.concatenate([chosen, coords[..., num_sampled:, :]], axis=-2)  # [..., P, 2]
  return jax.lax.stop_gradient(chosen)  # [..., P, 2]
