"""AIMS mask prompt encoder (MPE, AIMS Eq. 10-11).

The encoder turns a binary prompt mask M_P [B, H, W] into M_2 at stride 4 with
three blocks, CONV2+LN+GELU, CONV2+LN+GELU, CONV1 (Sec. 3.4), then derives
M_3, M_4, M_5 by bilinear downscaling of M_2 by 2, 4 and 8; the model adds M_s
to the image features F_s (Eq. 11). To the stride-2 mask features of the
model's `fine_mask_levels` option the model adds M_2 upscaled bilinearly by
2. The paper does not give the two hidden widths; we use 4 and 16 (the widths
of SAM's identically built mask downscaler). LayerNorm normalises over
channels at each pixel (eps 1e-6), GELU is the exact erf form, and the
downscale is bilinear with half-pixel centres and no antialiasing (torch
`F.interpolate(mode='bilinear', align_corners=False)`).
"""

from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from hiseg_jax.layers.pointwise_conv import PointwiseConv


def resize_bilinear(x: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """Bilinear resize of a channels-last map, torch `align_corners=False` style.

  Args:
    x: [B, h, w, C] input.
    height: output height.
    width: output width.

  Returns:
    [B, height, width, C] resized map (no antialiasing, half-pixel centres).
  """
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, height, width, c), method='bilinear',
                          antialias=False)  # [B, height, width, C]


class MaskPromptEncoder(nn.Module):
  """Encodes a binary prompt mask into features added to F_2 ... F_5.

  Parameters: `conv_0` (k2 s2, 1 -> hidden_dims[0]), `norm_0`, `conv_1`
  (k2 s2, hidden_dims[0] -> hidden_dims[1]), `norm_1`, `conv_2` (k1,
  hidden_dims[1] -> out_dim).

  Attributes:
    out_dim: channels C_m of M_s (equal to the image-feature width).
    hidden_dims: output widths of the two stride-2 blocks.
  """
  out_dim: int = 256
  hidden_dims: Tuple[int, int] = (4, 16)

  @nn.compact
  def __call__(self, prompt_mask: jnp.ndarray,
               feature_sizes: Sequence[Tuple[int, int]]) -> Tuple[jnp.ndarray, ...]:
    """Encodes the prompt and resizes it to every feature scale.

    Args:
      prompt_mask: [B, H, W] binary (bool or float) prompt; H and W divisible
        by 4.
      feature_sizes: (h, w) of the maps to produce; M_2 is computed at
        (H/4, W/4) and returned as is where a size equals that, resized
        bilinearly otherwise (for AIMS: the mask-feature size H/4 or H/2,
        then H/8, H/16, H/32).

    Returns:
      Tuple of [B, h, w, out_dim] maps, one per entry of `feature_sizes`.
    """
    if prompt_mask.ndim != 3:
      raise ValueError(f'MaskPromptEncoder: prompt_mask shape {prompt_mask.shape} '
                       'is not [B, H, W]')
    _, h, w = prompt_mask.shape
    if h % 4 or w % 4:
      raise ValueError(f'MaskPromptEncoder: prompt {h}x{w} must have sides divisible by 4')
    x = prompt_mask.astype(jnp.float32)[..., None]  # [B, H, W, 1]
    for i, width in enumerate(self.hidden_dims):
      x = nn.Conv(width, (2, 2), strides=(2, 2), padding='VALID',
                  name=f'conv_{i}')(x)  # [B, H/2^(i+1), W/2^(i+1), width]
      x = nn.LayerNorm(epsilon=1e-6, name=f'norm_{i}')(x)  # [B, H/2^(i+1), W/2^(i+1), width]
      x = nn.gelu(x, approximate=False)  # [B, H/2^(i+1), W/2^(i+1), width]
    m2 = PointwiseConv(self.out_dim, name='conv_2')(x)  # [B, H/4, W/4, C_m]
    outputs = []
    for fh, fw in feature_sizes:
      same = (fh, fw) == (h // 4, w // 4)
      outputs.append(m2 if same else resize_bilinear(m2, fh, fw))  # [B, fh, fw, C_m]
    return tuple(outputs)
