"""Sine position encoding of a 2-D feature map (DETR / Mask2Former `PositionEmbeddingSine`)."""

import math
from typing import Optional

import jax.numpy as jnp


def sine_position_encoding(height: int,
                           width: int,
                           num_pos_feats: int = 128,
                           temperature: float = 10000.,
                           normalize: bool = True,
                           scale: float = 2 * math.pi,
                           mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Sine/cosine position encoding of an H x W grid, y features first, then x.

  Follows `PositionEmbeddingSine` of DETR / Mask2Former: positions are the
  cumulative count of valid pixels along each axis (1-based), optionally
  normalised to (0, scale] by the last count (plus eps 1e-6); feature i of an
  axis is pos / temperature^(2*(i//2)/num_pos_feats), with sin on even and cos
  on odd features (interleaved).

  Args:
    height: grid height H.
    width: grid width W.
    num_pos_feats: features per axis; the output has 2*num_pos_feats channels.
    temperature: the frequency base.
    normalize: whether to normalise the positions by the valid extent.
    scale: the normalised range (only used when normalize is True).
    mask: optional bool [B, H, W] padding mask, True at padded pixels.

  Returns:
    float32 [H, W, 2*num_pos_feats] without a mask, [B, H, W, 2*num_pos_feats]
    with one.
  """
  if mask is not None and (mask.ndim != 3 or mask.shape[1:] != (height, width)):
    raise ValueError(f'sine_position_encoding: mask shape {mask.shape} is not '
                     f'[B, {height}, {width}]')
  if num_pos_feats % 2:
    raise ValueError(f'sine_position_encoding: num_pos_feats={num_pos_feats} must be even')
  if mask is None:
    not_mask = jnp.ones((1, height, width), jnp.float32)  # [1, H, W]
  else:
    not_mask = 1.0 - mask.astype(jnp.float32)  # [B, H, W]
  y_embed = jnp.cumsum(not_mask, axis=1)  # [B, H, W]
  x_embed = jnp.cumsum(not_mask, axis=2)  # [B, H, W]
  if normalize:
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale  # [B, H, W]
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale  # [B, H, W]
  dim_t = jnp.arange(num_pos_feats, dtype=jnp.float32)  # [F]
  dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)  # [F]
  pos_x = x_embed[..., None] / dim_t  # [B, H, W, F]
  pos_y = y_embed[..., None] / dim_t  # [B, H, W, F]
  b = not_mask.shape[0]
  pos_x = jnp.stack([jnp.sin(pos_x[..., 0::2]), jnp.cos(pos_x[..., 1::2])],
                    axis=-1).reshape(b, height, width, num_pos_feats)  # [B, H, W, F]
  pos_y = jnp.stack([jnp.sin(pos_y[..., 0::2]), jnp.cos(pos_y[..., 1::2])],
                    axis=-1).reshape(b, height, width, num_pos_feats)  # [B, H, W, F]
  pos = jnp.concatenate([pos_y, pos_x], axis=-1)  # [B, H, W, 2F]
  return pos[0] if mask is None else pos
