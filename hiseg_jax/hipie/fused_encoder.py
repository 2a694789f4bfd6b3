"""HIPIE's thing-branch encoder: input projections, early fusion and 6 deformable encoder layers.

Reference facts (HIPIE `DeformableDETRDINO.input_proj`, `DDETRSegmUniDN.coco_forward`,
`DeformableTransformerVLDINO.forward`, `DeformableTransformerEncoderVL`, Deformable DETR's
`PositionEmbeddingSine` and `get_reference_points`):

* Levels: res3, res4, res5 each through a 1x1 conv (Xavier-uniform, zero bias) + GroupNorm(32);
  one extra stride-64 level from the *raw* res5 through a 3x3 stride-2 conv + GroupNorm(32).
  Levels are flattened row-major and concatenated high resolution first (stride 8, 16, 32, 64).
* Padding: a feature cell is valid when the nearest-neighbour resize of the padding mask says
  so (the image mask for res3-res5, the stride-8 mask for the extra level); with `image_sizes`
  this is `floor(i * H / h_l) < h` along each axis.
* Position encoding: DETR sine encoding over the valid cells with the Deformable DETR offset,
  `(cumsum - 0.5) / (last + 1e-6) * 2 pi`, d/2 features per axis (y first), plus a learned
  per-level embedding (`level_embed`, N(0, 1)).
* Early fusion: one `BiAttentionBlock` (layer scale 1 / num_layers) on the flattened visual
  tokens (no position embedding) and the text features, applied once, before the first encoder
  layer (`NUM_VL_LAYERS = 1`); the other layers run without fusion. The block is the encoder's
  own submodule `fusion`, or the module given as `fusion_block` (so that a model can hold it
  as a top-level parameter group, HIPIE's `vl_layers` learning rate).
* Encoder layers: Deformable DETR post-norm layers with reference points at the valid-cell
  centres, `(i + 0.5) / (valid_ratio_l * H_l)`, rescaled by every level's valid ratio; the
  deformable self-attention zeroes the values of padded cells (`input_padding_mask`).
"""

import functools
from typing import Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from hiseg_jax.hipie.fusion import BiAttentionBlock
from hiseg_jax.layers.pointwise_conv import PointwiseConv
from hiseg_jax.pixel_decoder import DeformableEncoderLayer
from hiseg_jax.pixel_decoder import encoder_reference_points

# Backbone features the encoder reads, high resolution first, with their strides.
FEATURE_KEYS = ('res3', 'res4', 'res5')
_STRIDES = (8, 16, 32)


def _nearest_valid(valid: jnp.ndarray, out_len: int) -> jnp.ndarray:
  """torch `F.interpolate(mode='nearest')` of a [B, n] validity vector to [B, out_len]."""
  n = valid.shape[-1]
  index = np.floor(np.arange(out_len) * (n / out_len)).astype(np.int32)  # [out_len]
  return valid[:, index]  # [B, out_len]


def level_valid_masks(image_sizes: Optional[jnp.ndarray], batch: int,
                      canvas: Tuple[int, int],
                      spatial_shapes: Sequence[Tuple[int, int]]) -> Tuple[jnp.ndarray, ...]:
  """Validity of every feature cell, derived from the valid image size on the canvas.

  Args:
    image_sizes: [B, 2] (height, width) of the valid image on the canvas, or None when the
      whole canvas is valid.
    batch: batch size B.
    canvas: (H, W) of the padded canvas in pixels.
    spatial_shapes: (H_l, W_l) of the levels; the first three are resized from the image mask,
      later ones from the first level's mask (as the reference resizes `masks[0]`).

  Returns:
    One bool [B, H_l, W_l] per level, True at valid cells.
  """
  height, width = canvas
  if image_sizes is None:
    rows = jnp.ones((batch, height), bool)  # [B, H]
    cols = jnp.ones((batch, width), bool)  # [B, W]
  else:
    rows = jnp.arange(height)[None, :] < image_sizes[:, 0:1]  # [B, H]
    cols = jnp.arange(width)[None, :] < image_sizes[:, 1:2]  # [B, W]
  masks, first = [], (rows, cols)
  for lvl, (h, w) in enumerate(spatial_shapes):
    src_rows, src_cols = (rows, cols) if lvl < len(FEATURE_KEYS) else first
    r = _nearest_valid(src_rows, h)  # [B, h]
    c = _nearest_valid(src_cols, w)  # [B, w]
    if lvl == 0:
      first = (r, c)
    masks.append(r[:, :, None] & c[:, None, :])  # [B, h, w]
  return tuple(masks)


def detr_position_encoding(valid: jnp.ndarray, num_pos_feats: int,
                           temperature: float = 10000.0) -> jnp.ndarray:
  """Deformable DETR's normalised sine position encoding of one level.

  Args:
    valid: bool [B, H, W], True at valid cells.
    num_pos_feats: features per axis (d_model / 2); must be even.
    temperature: frequency base.

  Returns:
    float32 [B, H, W, 2 * num_pos_feats]: y features then x features, sin/cos interleaved.
  """
  if num_pos_feats % 2:
    raise ValueError(f'detr_position_encoding: num_pos_feats={num_pos_feats} must be even')
  b, h, w = valid.shape
  not_mask = valid.astype(jnp.float32)  # [B, H, W]
  y_embed = jnp.cumsum(not_mask, axis=1)  # [B, H, W]
  x_embed = jnp.cumsum(not_mask, axis=2)  # [B, H, W]
  scale = 2 * np.pi
  y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + 1e-6) * scale  # [B, H, W]
  x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + 1e-6) * scale  # [B, H, W]
  dim_t = np.arange(num_pos_feats, dtype=np.float32)  # [F]
  dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)  # [F]
  pos_x = x_embed[..., None] / dim_t  # [B, H, W, F]
  pos_y = y_embed[..., None] / dim_t  # [B, H, W, F]
  pos_x = jnp.stack([jnp.sin(pos_x[..., 0::2]), jnp.cos(pos_x[..., 1::2])],
                    axis=-1).reshape(b, h, w, num_pos_feats)  # [B, H, W, F]
  pos_y = jnp.stack([jnp.sin(pos_y[..., 0::2]), jnp.cos(pos_y[..., 1::2])],
                    axis=-1).reshape(b, h, w, num_pos_feats)  # [B, H, W, F]
  return jnp.concatenate([pos_y, pos_x], axis=-1)  # [B, H, W, 2F]


def valid_ratios_of(masks: Sequence[jnp.ndarray]) -> jnp.ndarray:
  """Deformable DETR's `get_valid_ratio` of every level.

  Args:
    masks: bool [B, H_l, W_l] per level, True at valid cells.

  Returns:
    float32 [B, L, 2] (valid width / W_l, valid height / H_l).
  """
  ratios = []
  for m in masks:
    _, h, w = m.shape
    valid_h = jnp.sum(m[:, :, 0], axis=1).astype(jnp.float32) / h  # [B]
    valid_w = jnp.sum(m[:, 0, :], axis=1).astype(jnp.float32) / w  # [B]
    ratios.append(jnp.stack([valid_w, valid_h], axis=-1))  # [B, 2]
  return jnp.stack(ratios, axis=1)  # [B, L, 2]


def encoder_reference_points_padded(spatial_shapes: Sequence[Tuple[int, int]],
                                    valid_ratios: jnp.ndarray) -> jnp.ndarray:
  """Reference points of the encoder (`DeformableTransformerEncoder.get_reference_points`).

  Args:
    spatial_shapes: static (H_l, W_l) per level.
    valid_ratios: [B, L, 2] from `valid_ratios_of`.

  Returns:
    float32 [B, S, L, 2] normalised (x, y): the cell centre over the valid extent of its own
    level, times each level's valid ratio.
  """
  base = jnp.asarray(encoder_reference_points(spatial_shapes))  # [S, 2]
  level_of = np.concatenate([np.full(h * w, lvl)
                             for lvl, (h, w) in enumerate(spatial_shapes)])  # [S]
  own_ratio = valid_ratios[:, level_of]  # [B, S, 2]
  ref = base[None] / own_ratio  # [B, S, 2]
  return ref[:, :, None, :] * valid_ratios[:, None, :, :]  # [B, S, L, 2]


class FusedEncoder(nn.Module):
  """Projects res3-res5 (+ a stride-64 level), fuses them with the text, runs the encoder.

  Attributes:
    d_model: width D (256).
    num_heads: attention heads (8).
    ffn_dim: FFN hidden width (2048 in HIPIE).
    num_layers: deformable encoder layers (6).
    num_levels: feature levels (4: res3, res4, res5 and the stride-64 level); 3 or 4.
    num_points: sampling points per head and level (4).
    norm_groups: GroupNorm groups of the input projections (32).
    dropout: dropout of the encoder layers (0.0 in HIPIE's configs).
    text_dim: width of the text features (768 for BERT-base).
    fusion_embed_dim: attention width of the fusion block (2048).
    fusion_heads: heads of the fusion block (8).
    fusion_dropout: attention dropout of the fusion block (0.1).
    fusion_block: optional `BiAttentionBlock` to use instead of building one named `fusion`
      (the fusion_* fields and the layer scale are then the given block's).
    dtype: computation dtype.
  """
  d_model: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  num_layers: int = 6
  num_levels: int = 4
  num_points: int = 4
  norm_groups: int = 32
  dropout: float = 0.0
  text_dim: int = 768
  fusion_embed_dim: int = 2048
  fusion_heads: int = 8
  fusion_dropout: float = 0.1
  fusion_block: Optional[nn.Module] = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Dict[str, jnp.ndarray], text: jnp.ndarray,
               text_mask: jnp.ndarray, image_sizes: Optional[jnp.ndarray] = None,
               deterministic: bool = True):
    """Encodes the image features, fused with the text.

    Args:
      features: backbone features {'res3': [B, H/8, W/8, C3], 'res4': [B, H/16, W/16, C4],
        'res5': [B, H/32, W/32, C5]} of an [H, W] canvas (H = 8 * res3 height).
      text: [B, T, text_dim] text-encoder token features.
      text_mask: [B, T] bool or {0, 1}, True on real tokens.
      image_sizes: optional int [B, 2] (height, width) of the valid image on the canvas;
        None when the whole canvas is valid.
      deterministic: disables dropout when True.

    Returns:
      (outputs, spatial_shapes): outputs is a dict with 'memory' [B, S, D] encoder output,
      'text' [B, T, text_dim] fused text features, 'padding_mask' bool [B, S] (True at padded
      cells), 'valid_ratios' [B, L, 2]; spatial_shapes is the static ((H_l, W_l), ...) tuple,
      S = sum H_l * W_l.
    """
    missing = [k for k in FEATURE_KEYS if k not in features]
    if missing:
      raise ValueError(f'FusedEncoder: features lack {missing}; got {sorted(features)}')
    if self.num_levels not in (3, 4):
      raise ValueError(f'FusedEncoder: num_levels={self.num_levels} must be 3 or 4')
    b, h8, w8 = features['res3'].shape[:3]
    canvas = (h8 * 8, w8 * 8)
    for name, stride in zip(FEATURE_KEYS, _STRIDES):
      x = features[name]
      expected = (b, -(-canvas[0] // stride), -(-canvas[1] // stride))
      if x.ndim != 4 or x.shape[:3] != expected:
        raise ValueError(f'FusedEncoder: features[{name!r}] shape {x.shape} is not '
                         f'[{b}, {expected[1]}, {expected[2]}, C]')
    if text.ndim != 3 or text.shape[0] != b or text_mask.shape != text.shape[:2]:
      raise ValueError(f'FusedEncoder: text {text.shape} / text_mask {text_mask.shape} are not '
                       f'[{b}, T, {self.text_dim}] / [{b}, T]')
    if image_sizes is not None and image_sizes.shape != (b, 2):
      raise ValueError(f'FusedEncoder: image_sizes shape {image_sizes.shape} is not [{b}, 2]')
    d = self.d_model
    conv_args = dict(kernel_init=nn.initializers.xavier_uniform(),
                     bias_init=nn.initializers.zeros, dtype=self.dtype)
    group_norm = functools.partial(nn.GroupNorm, num_groups=self.norm_groups, epsilon=1e-5,
                                   dtype=self.dtype)
    level_embed = self.param('level_embed', nn.initializers.normal(1.0),
                             (self.num_levels, d))  # [L, D]

    srcs = []
    for i, name in enumerate(FEATURE_KEYS):
      x = PointwiseConv(d, name=f'input_proj_{i}_conv', **conv_args)(
          features[name].astype(self.dtype))  # [B, h, w, D]
      srcs.append(group_norm(name=f'input_proj_{i}_norm')(x))  # [B, h, w, D]
    if self.num_levels == 4:
      x = nn.Conv(d, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)], name='input_proj_3_conv',
                  **conv_args)(features['res5'].astype(self.dtype))  # [B, H/64, W/64, D]
      srcs.append(group_norm(name='input_proj_3_norm')(x))  # [B, H/64, W/64, D]
    shapes = tuple((int(s.shape[1]), int(s.shape[2])) for s in srcs)
    valid = level_valid_masks(image_sizes, b, canvas, shapes)  # L x [B, h, w]

    pos = []
    for lvl, m in enumerate(valid):
      pe = detr_position_encoding(m, d // 2)  # [B, h, w, D]
      pos.append(pe.reshape(b, -1, d) + level_embed[lvl])  # [B, hw, D]
    src = jnp.concatenate([s.reshape(b, -1, d) for s in srcs], axis=1)  # [B, S, D]
    pos = jnp.concatenate(pos, axis=1).astype(self.dtype)  # [B, S, D]
    padding_mask = ~jnp.concatenate([m.reshape(b, -1) for m in valid], axis=1)  # [B, S]
    valid_ratios = valid_ratios_of(valid)  # [B, L, 2]
    ref = encoder_reference_points_padded(shapes, valid_ratios)  # [B, S, L, 2]

    fusion = self.fusion_block
    if fusion is None:
      fusion = BiAttentionBlock(
          v_dim=d, l_dim=self.text_dim, embed_dim=self.fusion_embed_dim,
          num_heads=self.fusion_heads, dropout=self.fusion_dropout,
          init_values=1.0 / self.num_layers, dtype=self.dtype, name='fusion')
    src, text = fusion(src, text, text_mask, deterministic)  # [B, S, D], [B, T, Lt]
    for i in range(self.num_layers):
      src = DeformableEncoderLayer(
          d_model=d, ffn_dim=self.ffn_dim, num_heads=self.num_heads,
          num_levels=self.num_levels, num_points=self.num_points, dropout=self.dropout,
          dtype=self.dtype, name=f'encoder_layer_{i}')(
              src, pos, ref, shapes, deterministic, padding_mask)  # [B, S, D]
    outputs = {'memory': src, 'text': text, 'padding_mask': padding_mask,
               'valid_ratios': valid_ratios}
    return outputs, shapes
