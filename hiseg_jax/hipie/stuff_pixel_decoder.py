"""HIPIE's MaskDINO pixel decoder (`MaskDINOEncoder`) for the stuff branch.

Facts followed (berkeley-hipie/HIPIE `maskdino_encoder.py` with the r50 config
`maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml`; HIPIE's R50 backbone gives the
stuff branch only res3..res5):

* Levels of the deformable encoder, in this order: res3 (stride 8), res4 (16),
  res5 (32) through a 1x1 conv + GroupNorm each, and an extra stride-64 level
  from a 3x3 stride-2 conv (padding 1) + GroupNorm of the raw res5 features.
  (MaskDINO's "low2high" option ends up putting the stride-8 level first.)
* Sine position encodings (normalised, num_pos_feats = D/2) plus a learned
  per-level embedding; `num_encoder_layers` post-norm deformable encoder layers
  with FFN width 2048 in the r50 config.
* One FPN step on res3: a 1x1 lateral conv + GN (no bias) plus the stride-8
  encoder output (the reference resizes it bilinearly to res3's size, which is
  the identity), then a 3x3 conv + GN + ReLU.
* HIPIE's mask features (its change to MaskDINO, needed because res2 is not
  used): ConvTranspose 2x2 stride 2 -> GroupNorm -> ReLU -> 1x1 conv, giving
  stride-4 features.

Initialisation follows the reference: input projections Xavier-uniform with
zero bias, detectron2's c2_xavier_fill (Kaiming-uniform a=1, zero bias) for the
FPN and mask-feature convs, `level_embed` ~ N(0, 1). Parameter names:
`input_proj_{i}_conv/_norm` (i = 0 res3, 1 res4, 2 res5, 3 the stride-64
conv), `level_embed`, `encoder_layer_{i}`, `lateral_conv/_norm` (adapter_1),
`output_conv/_norm` (layer_1), `mask_features_deconv`, `mask_features_norm`,
`mask_features_conv`. The transposed conv uses `transpose_kernel=True`, so a
torch ConvTranspose2d weight [in, out, kh, kw] converts by permute(2, 3, 1, 0).
"""

import functools
from typing import Dict, List, Tuple

import flax.linen as nn
import jax.numpy as jnp

from hiseg_jax.layers.init import kaiming_uniform_a1
from hiseg_jax.layers.pointwise_conv import PointwiseConv
from hiseg_jax.layers.position_encoding import sine_position_encoding
from hiseg_jax.pixel_decoder import DeformableEncoderLayer
from hiseg_jax.pixel_decoder import encoder_reference_points

# Backbone features the stuff branch reads, high resolution first (the encoder's level order).
IN_FEATURES = ('res3', 'res4', 'res5')


class MaskDINOEncoder(nn.Module):
  """HIPIE's MaskDINO pixel decoder: 4-level deformable encoder, stride-4 mask features.

  Attributes:
    conv_dim: width of the encoder and FPN (256).
    mask_dim: width of the mask features (256).
    num_encoder_layers: deformable encoder layers (6).
    ffn_dim: FFN hidden width of the encoder layers (2048 in HIPIE's r50 config).
    num_heads: attention heads (8).
    num_points: sampling points per head and level (4).
    norm_groups: GroupNorm groups (32).
    dropout: encoder dropout rate (0.0).
    dtype: computation dtype.
  """
  conv_dim: int = 256
  mask_dim: int = 256
  num_encoder_layers: int = 6
  ffn_dim: int = 2048
  num_heads: int = 8
  num_points: int = 4
  norm_groups: int = 32
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Dict[str, jnp.ndarray],
               deterministic: bool = True) -> Tuple[jnp.ndarray, List[jnp.ndarray]]:
    """Computes the stride-4 mask features and the four encoder levels.

    Args:
      features: raw backbone features with at least {'res3': [B, H/8, W/8, C3],
        'res4': [B, H/16, W/16, C4], 'res5': [B, H/32, W/32, C5]}; other keys
        (e.g. 'res2') are ignored, as in HIPIE.
      deterministic: disables dropout when True.

    Returns:
      mask_features: [B, H/4, W/4, mask_dim] (twice res3's size).
      multi_scale: [[B, H/8, W/8, conv_dim], [B, H/16, W/16, conv_dim],
        [B, H/32, W/32, conv_dim], [B, H/64, W/64, conv_dim]] encoder outputs.
    """
    missing = [k for k in IN_FEATURES if k not in features]
    if missing:
      raise ValueError(f'MaskDINOEncoder: features lack {missing}; got {sorted(features)}')
    b = features['res3'].shape[0]
    for name in IN_FEATURES:
      if features[name].ndim != 4 or features[name].shape[0] != b:
        raise ValueError(f'MaskDINOEncoder: features[{name!r}] shape {features[name].shape} '
                         f'is not [{b}, h, w, C]')
    d = self.conv_dim
    group_norm = functools.partial(nn.GroupNorm, num_groups=self.norm_groups, epsilon=1e-5,
                                   dtype=self.dtype)
    proj_args = dict(kernel_init=nn.initializers.xavier_uniform(),
                     bias_init=nn.initializers.zeros, dtype=self.dtype)
    num_levels = len(IN_FEATURES) + 1
    level_embed = self.param('level_embed', nn.initializers.normal(1.0), (num_levels, d))  # [L, D]

    maps = []
    for i, name in enumerate(IN_FEATURES):
      x = PointwiseConv(d, name=f'input_proj_{i}_conv', **proj_args)(
          features[name].astype(self.dtype))  # [B, h_i, w_i, D]
      maps.append(group_norm(name=f'input_proj_{i}_norm')(x))  # [B, h_i, w_i, D]
    x = nn.Conv(d, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                name=f'input_proj_{len(IN_FEATURES)}_conv', **proj_args)(
                      features['res5'].astype(self.dtype))  # [B, H/64, W/64, D]
    maps.append(group_norm(name=f'input_proj_{len(IN_FEATURES)}_norm')(x))  # [B, H/64, W/64, D]

    srcs, pos, shapes = [], [], []
    for i, x in enumerate(maps):
      h, w = x.shape[1:3]
      srcs.append(x.reshape(b, h * w, d))  # [B, hw, D]
      pe = sine_position_encoding(h, w, num_pos_feats=d // 2)  # [h, w, D]
      pos.append(pe.reshape(h * w, d) + level_embed[i])  # [hw, D]
      shapes.append((h, w))
    shapes = tuple(shapes)
    src = jnp.concatenate(srcs, axis=1)  # [B, S, D]
    pos = jnp.broadcast_to(jnp.concatenate(pos, axis=0).astype(self.dtype), src.shape)  # [B, S, D]
    ref = jnp.asarray(encoder_reference_points(shapes))  # [S, 2]
    ref = jnp.broadcast_to(ref[None, :, None, :], (b, ref.shape[0], num_levels, 2))  # [B, S, L, 2]
    for i in range(self.num_encoder_layers):
      src = DeformableEncoderLayer(d_model=d, ffn_dim=self.ffn_dim, num_heads=self.num_heads,
                                   num_levels=num_levels, num_points=self.num_points,
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
                                features['res3'].astype(self.dtype))  # [B, H/8, W/8, D]
    lateral = group_norm(name='lateral_norm')(lateral)  # [B, H/8, W/8, D]
    y = nn.Conv(d, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=kaiming_uniform_a1,
                dtype=self.dtype, name='output_conv')(lateral + multi_scale[0])  # [B, H/8, W/8, D]
    y = nn.relu(group_norm(name='output_norm')(y))  # [B, H/8, W/8, D]
    y = nn.ConvTranspose(d, (2, 2), strides=(2, 2), padding='VALID', transpose_kernel=True,
                         kernel_init=kaiming_uniform_a1, bias_init=nn.initializers.zeros,
                         dtype=self.dtype, name='mask_features_deconv')(y)  # [B, H/4, W/4, D]
    y = nn.relu(group_norm(name='mask_features_norm')(y))  # [B, H/4, W/4, D]
    mask_features = PointwiseConv(self.mask_dim, kernel_init=kaiming_uniform_a1,
                                  bias_init=nn.initializers.zeros, dtype=self.dtype,
                                  name='mask_features_conv')(y)  # [B, H/4, W/4, mask_dim]
    return mask_features, multi_scale
