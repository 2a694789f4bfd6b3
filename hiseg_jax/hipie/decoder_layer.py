"""The DINO deformable decoder layer shared by HIPIE's thing decoder and its MaskDINO stuff decoder.

Reference: `DeformableTransformerDecoderLayer` of HIPIE's `deformable_transformer_dino.py` and
of MaskDINO's `dino_decoder.py` (the same layer), post-norm:

  self-attention (q = k = tgt + pos, v = tgt, optional query mask) -> norm2;
  deformable cross-attention from tgt + pos at the reference boxes (padded memory cells
  zeroed) -> norm1; ReLU FFN -> norm3.

Parameter names follow the torch module (`self_attn`, `norm2`, `cross_attn`, `norm1`,
`linear1`, `linear2`, `norm3`); FFN kernels are Xavier-uniform (the transformers' reset) with
torch-default biases.
"""

import functools
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from hiseg_jax.layers.attention import MultiHeadAttention
from hiseg_jax.layers.deformable_attention import MSDeformAttn
from hiseg_jax.layers.init import torch_default_bias


class DeformableDecoderLayer(nn.Module):
  """DINO deformable decoder layer: self-attention, deformable cross-attention, FFN (post-norm).

  Attributes:
    d_model: width D.
    num_heads: attention heads (self and cross).
    ffn_dim: FFN hidden width.
    num_levels: memory levels.
    num_points: sampling points per head and level.
    dropout: dropout rate (attention probabilities and residual branches).
    dtype: computation dtype.
  """
  d_model: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  num_levels: int = 4
  num_points: int = 4
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tgt: jnp.ndarray, query_pos: jnp.ndarray, reference_points: jnp.ndarray,
               memory: jnp.ndarray, spatial_shapes: Sequence[Tuple[int, int]],
               padding_mask: Optional[jnp.ndarray] = None,
               attn_mask: Optional[jnp.ndarray] = None,
               deterministic: bool = True) -> jnp.ndarray:
    """Applies the layer.

    Args:
      tgt: [B, Q, D] query content.
      query_pos: [B, Q, D] query position embedding.
      reference_points: [B, Q, L, 4] reference boxes (cxcywh) per level (times the valid
        ratios when the memory is padded).
      memory: [B, S, D] flattened encoder memory.
      spatial_shapes: static (H_l, W_l) per level.
      padding_mask: optional bool [B, S], True at padded memory cells.
      attn_mask: optional bool [B, Q, Q], True where a query may attend.
      deterministic: disables dropout when True.

    Returns:
      [B, Q, D] updated queries.
    """
    norm = functools.partial(nn.LayerNorm, epsilon=1e-5, dtype=self.dtype)
    dense = lambda features, fan_in, name: nn.Dense(
        features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=torch_default_bias(fan_in), name=name)
    drop = lambda x: nn.Dropout(self.dropout)(x, deterministic=deterministic)
    q = tgt + query_pos  # [B, Q, D]
    attended = MultiHeadAttention(self.num_heads, dropout=self.dropout, dtype=self.dtype,
                                  name='self_attn')(q, q, tgt, attn_mask,
                                                    deterministic)  # [B, Q, D]
    tgt = norm(name='norm2')(tgt + drop(attended))  # [B, Q, D]
    sampled = MSDeformAttn(d_model=self.d_model, n_levels=self.num_levels,
                           n_heads=self.num_heads, n_points=self.num_points, dtype=self.dtype,
                           name='cross_attn')(tgt + query_pos, reference_points, memory,
                                              spatial_shapes, padding_mask)  # [B, Q, D]
    tgt = norm(name='norm1')(tgt + drop(sampled))  # [B, Q, D]
    hidden = jax.nn.relu(dense(self.ffn_dim, self.d_model, 'linear1')(tgt))  # [B, Q, F]
    out = dense(self.d_model, self.ffn_dim, 'linear2')(drop(hidden))  # [B, Q, D]
    return norm(name='norm3')(tgt + drop(out))  # [B, Q, D]
