"""Mask2Former's multi-scale deformable-attention pixel decoder (`MSDeformAttnPixelDecoder`)."""

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hiseg_jax.layers.deformable_attention import MSDeformAttn
from hiseg_jax.layers.init import kaiming_uniform_a1
from hiseg_jax.layers.pointwise_conv import PointwiseConv
from hiseg_jax.layers.position_encoding import sine_position_encoding

# Input features of the deformable encoder, low resolution first (Mask2Former order).
_ENCODER_FEATURES = ('res5', 'res4', 'res3')
_STRIDES = {'res2': 4, 'res3': 8, 'res4': 16, 'res5': 32}


def encoder_reference_points(spatial_shapes: Sequence[Tuple[int, int]]) -> np.ndarray:
  """Pixel-centre reference points of every position of every level (no padding).

  Args:
    spatial_shapes: (H_l, W_l) per level.

  Returns:
    float32 [S, 2] normalised (x, y) in (0, 1), levels flattened row-major and
    concatenated, S = sum H_l*W_l.
  """
  points = []
  for h, w in spatial_shapes:
    ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing='ij')
    points.append(np.stack([xs.reshape(-1), ys.reshape(-1)], -1))  # [H*W, 2]
  return np.concatenate(points, 0).astype(np.float32)  # [S, 2]


class DeformableEncoderLayer(nn.Module):
  """Deformable-DETR encoder layer: deformable self-attention + FFN, post-norm.

  Attributes:
    d_model: model width.
    ffn_dim: hidden width of the FFN.
    num_heads: attention heads.
    num_levels: feature levels.
    num_points: sampling points per head and level.
    dropout: dropout rate after attention and in the FFN.
    dtype: computation dtype.
  """
  d_model: int = 256
  ffn_dim: int = 1024
  num_heads: int = 8
  num_levels: int = 3
  num_points: int = 4
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, src: jnp.ndarray, pos: jnp.ndarray, reference_points: jnp.ndarray,
               spatial_shapes: Sequence[Tuple[int, int]],
               deterministic: bool = True,
               padding_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Applies the layer.

    Args:
      src: [B, S, D] flattened multi-level features.
      pos: [B, S, D] position (+ level) embeddings.
      reference_points: [B, S, L, 2] normalised (x, y) reference points.
      spatial_shapes: static (H_l, W_l) per level.
      deterministic: disables dropout when True.
      padding_mask: optional bool [B, S], True at padded cells; their values are zeroed in the
        deformable self-attention (Deformable DETR's `input_padding_mask`).

    Returns:
      [B, S, D] updated features.
    """
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=nn.initializers.xavier_uniform(),
                              bias_init=nn.initializers.zeros)
    norm = functools.partial(nn.LayerNorm, epsilon=1e-5, dtype=self.dtype)
    attn = MSDeformAttn(d_model=self.d_model, n_levels=self.num_levels, n_heads=self.num_heads,
                        n_points=self.num_points, dtype=self.dtype, name='self_attn')(
                            src + pos, reference_points, src, spatial_shapes,
                            padding_mask)  # [B, S, D]
    src = src + nn.Dropout(self.dropout)(attn, deterministic=deterministic)  # [B, S, D]
    src = norm(name='norm1')(src)  # [B, S, D]
    hidden = nn.relu(dense(self.ffn_dim, name='linear1')(src))  # [B, S, F]
    hidden = nn.Dropout(self.dropout)(hidden, deterministic=deterministic)  # [B, S, F]
    out = dense(self.d_model, name='linear2')(hidden)  # [B, S, D]
    src = src + nn.Dropout(self.dropout)(out, deterministic=deterministic)  # [B, S, D]
    return norm(name='norm2')(src)  # [B, S, D]


class MSDeformAttnPixelDecoder(nn.Module):
  """Mask2Former pixel decoder: deformable encoder on res3..res5, FPN to stride 4 (and 2).

  1. res5, res4, res3 are projected by a 1x1 conv + GroupNorm (`input_proj_{i}`,
     i = 0 for res5) to conv_dim, flattened and concatenated (low resolution
     first), with sine position encodings plus a learned per-level embedding.
  2. `num_encoder_layers` deformable encoder layers refine them.
  3. res2 goes through a 1x1 lateral conv + GN, gets the bilinearly upsampled
     stride-8 encoder output added, and a 3x3 conv + GN + ReLU.
  4. A 1x1 conv of that stride-4 map gives the mask features.
  5. With `fine_mask_features` (our addition; Mask2Former stops at stride 4)
     a stride-2 level follows: the backbone's stride-2 stem map goes through a
     1x1 lateral conv + GN (`stem_lateral_conv/_norm`), gets the bilinearly
     upsampled stride-4 map of step 3 added, then a ReLU, and a 1x1 conv
     (`fine_mask_features`) gives stride-2 mask features. It is for small
     canvases, where parts span only a few stride-4 cells (runlocal's 128 px
     canvas is 1/8 of the paper's 1024 px); the AIMS model decodes the levels
     of `fine_mask_levels` on it. There is no 3x3 conv at stride 2: with one
     (and every level at stride 2) the runlocal step took 0.56 s, against
     0.38 s without it.

  Parameter names mirror Mask2Former's (`input_proj_{i}_conv/_norm`,
  `level_embed`, `encoder_layer_{i}`, `lateral_conv/_norm` = adapter_1,
  `output_conv/_norm` = layer_1, `mask_features`).

  Attributes:
    conv_dim: width of the encoder and FPN.
    mask_dim: width of the mask features.
    num_encoder_layers: deformable encoder layers.
    ffn_dim: FFN hidden width of the encoder layers.
    num_heads: attention heads.
    num_points: sampling points per head and level.
    norm_groups: GroupNorm groups.
    fine_mask_features: also output stride-2 mask features (needs the
      backbone's 'stem' map).
    dropout: encoder dropout rate.
    dtype: computation dtype.
  """
  conv_dim: int = 256
  mask_dim: int = 256
  num_encoder_layers: int = 6
  ffn_dim: int = 1024
  num_heads: int = 8
  num_points: int = 4
  norm_groups: int = 32
  fine_mask_features: bool = False
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Dict[str, jnp.ndarray],
               deterministic: bool = True
               ) -> Tuple[jnp.ndarray, List[jnp.ndarray], Optional[jnp.ndarray]]:
    """Computes the mask features and the multi-scale features.

    Args:
      features: backbone features {'res2': [B, H/4, W/4, C2], 'res3': [B, H/8, W/8, C3],
        'res4': [B, H/16, W/16, C4], 'res5': [B, H/32, W/32, C5]}, and with
        fine_mask_features also 'stem': [B, H/2, W/2, C1].
      deterministic: disables dropout when True.

    Returns:
      mask_features: [B, H/4, W/4, mask_dim].
      multi_scale: [[B, H/32, W/32, conv_dim], [B, H/16, W/16, conv_dim],
        [B, H/8, W/8, conv_dim]] (low resolution first).
      fine_mask_features: [B, H/2, W/2, mask_dim] with fine_mask_features, else None.
    """
    strides = dict(_STRIDES, stem=2) if self.fine_mask_features else _STRIDES
    missing = [k for k in strides if k not in features]
    if missing:
      raise ValueError(f'MSDeformAttnPixelDecoder: features lack {missing}; got {sorted(features)}')
    b, h4, w4 = features['res2'].shape[:3]
    for name, stride in strides.items():
      expected = (b, h4 * 4 // stride, w4 * 4 // stride)
      if features[name].shape[:3] != expected:
        raise ValueError(f'MSDeformAttnPixelDecoder: features[{name!r}] shape '
                         f'{features[name].shape} is not [{b}, {expected[1]}, {expected[2]}, C]')
    d = self.conv_dim
    group_norm = functools.partial(nn.GroupNorm, num_groups=self.norm_groups, epsilon=1e-5,
                                   dtype=self.dtype)
    level_embed = self.param('level_embed', nn.initializers.normal(1.0),
                             (len(_ENCODER_FEATURES), d))  # [L, D]

    srcs, pos, shapes = [], [], []
    for i, name in enumerate(_ENCODER_FEATURES):
      x = features[name].astype(self.dtype)  # [B, h, w, C]
      h, w = x.shape[1:3]
      x = PointwiseConv(d, kernel_init=nn.initializers.xavier_uniform(),
                        bias_init=nn.initializers.zeros, dtype=self.dtype,
                        name=f'input_proj_{i}_conv')(x)  # [B, h, w, D]
      x = group_norm(name=f'input_proj_{i}_norm')(x)  # [B, h, w, D]
      srcs.append(x.reshape(b, h * w, d))  # [B, hw, D]
      pe = sine_position_encoding(h, w, num_pos_feats=d // 2)  # [h, w, D]
      pos.append(pe.reshape(h * w, d) + level_embed[i])  # [hw, D]
      shapes.append((h, w))
    shapes = tuple(shapes)
    src = jnp.concatenate(srcs, axis=1)  # [B, S, D]
    pos = jnp.broadcast_to(jnp.concatenate(pos, axis=0).astype(self.dtype), src.shape)  # [B, S, D]
    ref = jnp.asarray(encoder_reference_points(shapes))  # [S, 2]
    ref = jnp.broadcast_to(ref[None, :, None, :], (b, ref.shape[0], len(shapes), 2))  # [B, S, L, 2]
    for i in range(self.num_encoder_layers):
      src = DeformableEncoderLayer(d_model=d, ffn_dim=self.ffn_dim, num_heads=self.num_heads,
                                   num_levels=len(shapes), num_points=self.num_points,
                                   dropout=self.dropout, dtype=self.dtype,
                                   name=f'encoder_layer_{i}')(
                                       src, pos, ref, shapes, deterministic)  # [B, S, D]

    multi_scale = []
    start = 0
    for h, w in shapes:
      multi_scale.append(src[:, start:start + h * w].reshape(b, h, w, d))  # [B, h, w, D]
      start += h * w

    lateral = PointwiseConv(d, use_bias=False, kernel_init=kaiming_uniform_a1, dtype=self.dtype,
                            name='lateral_conv')(
                                features['res2'].astype(self.dtype))  # [B, H/4, W/4, D]
    lateral = group_norm(name='lateral_norm')(lateral)  # [B, H/4, W/4, D]
    up = jax.image.resize(multi_scale[-1], (b, h4, w4, d), 'bilinear')  # [B, H/4, W/4, D]
    y = nn.Conv(d, (3, 3), padding=[(1, 1), (1, 1)], use_bias=False, kernel_init=kaiming_uniform_a1,
                dtype=self.dtype, name='output_conv')(lateral + up)  # [B, H/4, W/4, D]
    y = nn.relu(group_norm(name='output_norm')(y))  # [B, H/4, W/4, D]
    mask_conv = functools.partial(PointwiseConv, self.mask_dim, kernel_init=kaiming_uniform_a1,
                                  bias_init=nn.initializers.zeros, dtype=self.dtype)
    mask_features = mask_conv(name='mask_features')(y)  # [B, H/4, W/4, mask_dim]
    if not self.fine_mask_features:
      return mask_features, multi_scale, None
    lateral = PointwiseConv(d, use_bias=False, kernel_init=kaiming_uniform_a1,
                            dtype=self.dtype, name='stem_lateral_conv')(
                                features['stem'].astype(self.dtype))  # [B, H/2, W/2, D]
    lateral = group_norm(name='stem_lateral_norm')(lateral)  # [B, H/2, W/2, D]
    up = jax.image.resize(y, (b, 2 * h4, 2 * w4, d), 'bilinear')  # [B, H/2, W/2, D]
    fine = mask_conv(name='fine_mask_features')(nn.relu(lateral + up))  # [B, H/2, W/2, mask_dim]
    return mask_features, multi_scale, fine
