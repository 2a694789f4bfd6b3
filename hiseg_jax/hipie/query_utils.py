"""Pieces shared by HIPIE's two DINO-style query decoders (things and stuff).

Reference facts (berkeley-hipie/HIPIE: `util/misc.py` `inverse_sigmoid`,
`deformable_transformer_dino.py` `get_sine_pos_embed` / `gen_encoder_output_proposals`,
`ddetrs_dn.py` `prepare_for_cdn`; MaskDINO `utils.py` `gen_sineembed_for_position`,
`gen_encoder_output_proposals`, `prepare_for_dn`):

* `inverse_sigmoid`: log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= 1e-5.
* `sine_box_embedding`: sine features of every box coordinate, x and y swapped (y, x, w, h).
  The thing decoder uses D/2 features per coordinate (`get_sine_pos_embed(num_pos_feats=128)`),
  and so does MaskDINO (`gen_sineembed_for_position` hard-codes 128 for D = 256).
* `encoder_output_proposals`: the two-stage anchor of every encoder cell, centre over the valid
  extent of its level, side 0.05 * 2^level, invalid outside (0.01, 0.99) or on padding. The thing
  decoder passes the padding mask of its levels; the stuff decoder (MaskDINO ignores padding)
  passes none.
* `cdn_attention_mask`: the self-attention mask of denoising groups followed by the other
  queries (DINO's contrastive groups of 2N and MaskDINO's groups of N have the same rule).
* `HeadMLP`: DETR's `MLP` with the initialisations the reference heads need.
"""

import math
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hiseg_jax.layers.init import torch_default_bias
from hiseg_jax.layers.init import torch_default_kernel


def inverse_sigmoid(x: jnp.ndarray, eps: float = 1e-5) -> jnp.ndarray:
  """The reference's `inverse_sigmoid`: log(x / (1 - x)), x clipped to [0, 1], terms >= eps.

  Args:
    x: [...] values in [0, 1].
    eps: lower clamp of x and 1 - x.

  Returns:
    [...] logits.
  """
  x = jnp.clip(x, 0.0, 1.0)  # [...]
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))  # [...]


def sine_box_embedding(boxes: jnp.ndarray, num_pos_feats: int,
                       temperature: float = 10000.0) -> jnp.ndarray:
  """Sine features of every coordinate, the first two (x, y) swapped.

  Args:
    boxes: [..., K] coordinates in [0, 1] (K = 4: cx, cy, w, h; K = 2: x, y).
    num_pos_feats: features per coordinate F (D/2 for decoder width D); must be even.
    temperature: frequency base.

  Returns:
    float32 [..., K * F]: pos(y), pos(x), then the remaining coordinates in order, each block
    with sin and cos interleaved.
  """
  if num_pos_feats % 2:
    raise ValueError(f'sine_box_embedding: num_pos_feats={num_pos_feats} must be even')
  k = boxes.shape[-1]
  if k < 2:
    raise ValueError(f'sine_box_embedding: boxes shape {boxes.shape} needs >= 2 coordinates')
  dim_t = np.arange(num_pos_feats, dtype=np.float32)  # [F]
  dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)  # [F]
  x = boxes.astype(jnp.float32)[..., None] * (2 * math.pi) / dim_t  # [..., K, F]
  x = jnp.stack([jnp.sin(x[..., 0::2]), jnp.cos(x[..., 1::2])],
                axis=-1).reshape(x.shape)  # [..., K, F]
  order = [1, 0] + list(range(2, k))
  x = x[..., order, :]  # [..., K, F]
  return x.reshape(*boxes.shape[:-1], k * num_pos_feats)  # [..., K*F]


def encoder_output_proposals(padding_mask: Optional[jnp.ndarray],
                             spatial_shapes: Sequence[Tuple[int, int]],
                             batch: Optional[int] = None
                             ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Anchor boxes of every encoder cell (`gen_encoder_output_proposals`, boxes only).

  Args:
    padding_mask: bool [B, S], True at padded cells; None when no cell is padded.
    spatial_shapes: static (H_l, W_l) per level, in the memory's level order; level l
      proposes boxes of side 0.05 * 2^l.
    batch: B when `padding_mask` is None (ignored otherwise).

  Returns:
    proposals: float32 [B, S, 4] inverse-sigmoid anchors ((j + 0.5) / valid_W,
      (i + 0.5) / valid_H, 0.05 * 2^l, 0.05 * 2^l), +inf where the cell is padded or any
      coordinate lies outside (0.01, 0.99).
    keep: bool [B, S], True where the anchor is valid (the reference zeroes the memory
      elsewhere).
  """
  total = sum(h * w for h, w in spatial_shapes)
  if padding_mask is None:
    if batch is None:
      raise ValueError('encoder_output_proposals: pass padding_mask or batch')
    padding_mask = jnp.zeros((batch, total), bool)  # [B, S]
  b = padding_mask.shape[0]
  if padding_mask.shape != (b, total):
    raise ValueError(f'encoder_output_proposals: padding_mask shape {padding_mask.shape} is '
                     f'not [B, {total}] for spatial_shapes {tuple(spatial_shapes)}')
  proposals = []
  start = 0
  for lvl, (h, w) in enumerate(spatial_shapes):
    pad = padding_mask[:, start:start + h * w].reshape(b, h, w)  # [B, h, w]
    start += h * w
    valid_h = jnp.sum(~pad[:, :, 0], axis=1).astype(jnp.float32)  # [B]
    valid_w = jnp.sum(~pad[:, 0, :], axis=1).astype(jnp.float32)  # [B]
    grid_y, grid_x = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                                 indexing='ij')  # [h, w], [h, w]
    grid = np.stack([grid_x, grid_y], axis=-1)  # [h, w, 2]
    scale = jnp.stack([valid_w, valid_h], axis=-1)[:, None, None, :]  # [B, 1, 1, 2]
    grid = (grid[None] + 0.5) / scale  # [B, h, w, 2]
    wh = jnp.full_like(grid, 0.05 * (2.0 ** lvl))  # [B, h, w, 2]
    proposals.append(jnp.concatenate([grid, wh], axis=-1).reshape(b, h * w, 4))  # [B, hw, 4]
  proposals = jnp.concatenate(proposals, axis=1)  # [B, S, 4]
  in_range = jnp.all((proposals > 0.01) & (proposals < 0.99), axis=-1)  # [B, S]
  keep = in_range & ~padding_mask  # [B, S]
  safe = jnp.where(keep[..., None], proposals, 0.5)  # [B, S, 4]
  proposals = jnp.where(keep[..., None], jnp.log(safe / (1 - safe)), jnp.inf)  # [B, S, 4]
  return proposals, keep


def cdn_attention_mask(num_groups: int, group_size: int, num_other: int) -> np.ndarray:
  """Self-attention mask of denoising groups followed by the other queries.

  Args:
    num_groups: denoising groups G.
    group_size: queries per group (2N for DINO's positive + negative pairs, N for MaskDINO).
    num_other: queries after the denoising part (background + matching queries).

  Returns:
    bool [P + num_other, P + num_other], P = G * group_size; True where row may attend to
    column (the reference's mask negated): the other queries see only the other queries, each
    group sees itself and the other queries.
  """
  if min(num_groups, group_size, num_other) < 0:
    raise ValueError(f'cdn_attention_mask: negative size in num_groups={num_groups}, '
                     f'group_size={group_size}, num_other={num_other}')
  pad = num_groups * group_size
  group = np.concatenate([np.arange(pad) // max(group_size, 1),
                          np.full(num_other, -1)])  # [P + O]
  is_dn = group >= 0  # [P + O]
  return ~is_dn[None, :] | (group[:, None] == group[None, :])  # [P + O, P + O]


class HeadMLP(nn.Module):
  """Linear layers with ReLU between them, with the reference heads' initialisations.

  `hiseg_jax.layers.mlp.MLP` has Flax's default initialisation; the reference MLPs use torch's
  default (box heads), Xavier weights (modules under the transformer's reset, the controller)
  and zero last layers (box heads). Parameters are named `layers_{i}` like `MLP`.

  Attributes:
    hidden_dim: hidden width.
    output_dim: output width.
    num_layers: number of Linear layers (>= 1).
    kernel: 'torch' (torch's default) or 'xavier'.
    bias: 'torch' (torch's default) or 'zeros'.
    zero_last: zero the last layer's weight and bias.
    dtype: computation dtype.
  """
  hidden_dim: int
  output_dim: int
  num_layers: int
  kernel: str = 'torch'
  bias: str = 'torch'
  zero_last: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Applies the MLP to the last axis.

    Args:
      x: [..., D_in] input.

    Returns:
      [..., output_dim] output.
    """
    if self.num_layers < 1:
      raise ValueError(f'HeadMLP: num_layers={self.num_layers} must be >= 1')
    if self.kernel not in ('torch', 'xavier') or self.bias not in ('torch', 'zeros'):
      raise ValueError(f'HeadMLP: kernel={self.kernel!r} must be "torch" or "xavier" and '
                       f'bias={self.bias!r} "torch" or "zeros"')
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      kernel_init = (nn.initializers.xavier_uniform() if self.kernel == 'xavier'
                     else torch_default_kernel)
      bias_init = nn.initializers.zeros if self.bias == 'zeros' else torch_default_bias(
          x.shape[-1])
      if last and self.zero_last:
        kernel_init, bias_init = nn.initializers.zeros, nn.initializers.zeros
      x = nn.Dense(self.output_dim if last else self.hidden_dim, dtype=self.dtype,
                   kernel_init=kernel_init, bias_init=bias_init, name=f'layers_{i}')(x)  # [..., W]
      if not last:
        x = jax.nn.relu(x)  # [..., hidden_dim]
    return x
