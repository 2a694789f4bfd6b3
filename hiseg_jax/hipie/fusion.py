"""HIPIE's early image-text fusion: one GLIP-style bi-directional attention block.

HIPIE fuses the flattened multi-level visual tokens of the thing branch with the
BERT token features once, before the first deformable encoder layer
(`VLFuse` -> `BiAttentionBlockForCheckpoint` -> `BiMultiHeadAttention` in the
reference). The block is pre-norm with a layer-scale residual taken from the
LayerNorm'd inputs::

  v, l = LN_v(v), LN_l(l)
  dv, dl = BiAttention(v, l, text_mask)
  v, l = v + gamma_v * dv, l + gamma_l * dl

Inside the bi-attention both directions share one logit matrix
`A = (W_v v) (W_l l)^T / sqrt(d_head)` per head, clamped to [-5e4, 5e4].
Vision <- text: padded text tokens are masked out, then softmax over tokens.
Text <- vision: `A^T` minus its row max, clamped again, softmax over visual
tokens (visual padding is not masked, as in the reference). Dropout applies to
both probability maps. The reference defaults are used: clamping on, the 2-D
"stable softmax" off, drop-path 0.

Parameter names follow the torch module so a state dict converts by name:
`layer_norm_v`, `layer_norm_l`, `gamma_v`, `gamma_l` and, under `attn`,
`v_proj`, `l_proj`, `values_v_proj`, `values_l_proj`, `out_v_proj`,
`out_l_proj` (torch `weight` transposed -> `kernel`).
"""

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# Logit clamp of the reference (float16-safe bound).
LOGIT_CLAMP = 50000.0
# Additive value the reference gives padded text tokens in the vision <- text softmax.
PADDED_TEXT_LOGIT = -9e15


class BiMultiHeadAttention(nn.Module):
  """Bi-directional multi-head cross-attention between visual and text tokens.

  Attributes:
    v_dim: visual token width (256).
    l_dim: text token width (768).
    embed_dim: attention width shared by both directions (2048).
    num_heads: number of heads (8); must divide `embed_dim`.
    dropout: dropout rate on both attention probability maps (0.1).
    dtype: computation dtype (logits and softmax are computed in float32).
  """
  v_dim: int = 256
  l_dim: int = 768
  embed_dim: int = 2048
  num_heads: int = 8
  dropout: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self,
               visual: jnp.ndarray,
               text: jnp.ndarray,
               text_mask: jnp.ndarray,
               deterministic: bool = True) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Computes the updates of both modalities.

    Args:
      visual: [B, Nv, v_dim] visual tokens.
      text: [B, T, l_dim] text tokens.
      text_mask: [B, T] bool or {0, 1}; True/1 on real tokens, False/0 on padding.
      deterministic: when False, applies attention dropout (needs a 'dropout' rng).

    Returns:
      (delta_visual [B, Nv, v_dim], delta_text [B, T, l_dim]).
    """
    b, nv, _ = visual.shape
    t = text.shape[1]
    if self.embed_dim % self.num_heads:
      raise ValueError(f'BiMultiHeadAttention: embed_dim={self.embed_dim} is not divisible '
                       f'by num_heads={self.num_heads}')
    hh = self.num_heads
    dh = self.embed_dim // hh
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.zeros, name=name)
    query = dense(self.embed_dim, 'v_proj')(visual) * (dh ** -0.5)  # [B, Nv, E]
    key = dense(self.embed_dim, 'l_proj')(text)  # [B, T, E]
    value_v = dense(self.embed_dim, 'values_v_proj')(visual)  # [B, Nv, E]
    value_l = dense(self.embed_dim, 'values_l_proj')(text)  # [B, T, E]
    query = query.reshape(b, nv, hh, dh)  # [B, Nv, Hh, Dh]
    key = key.reshape(b, t, hh, dh)  # [B, T, Hh, Dh]
    value_v = value_v.reshape(b, nv, hh, dh)  # [B, Nv, Hh, Dh]
    value_l = value_l.reshape(b, t, hh, dh)  # [B, T, Hh, Dh]

    logits = jnp.einsum('bnhd,bthd->bhnt', query, key,
                        preferred_element_type=jnp.float32)  # [B, Hh, Nv, T]
    logits = jnp.clip(logits, -LOGIT_CLAMP, LOGIT_CLAMP)  # [B, Hh, Nv, T]

    logits_l = jnp.swapaxes(logits, -1, -2)  # [B, Hh, T, Nv]
    logits_l = logits_l - logits_l.max(axis=-1, keepdims=True)  # [B, Hh, T, Nv]
    logits_l = jnp.clip(logits_l, -LOGIT_CLAMP, LOGIT_CLAMP)  # [B, Hh, T, Nv]
    probs_l = jax.nn.softmax(logits_l, axis=-1)  # [B, Hh, T, Nv]

    valid = text_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]
    logits_v = jnp.where(valid, logits, PADDED_TEXT_LOGIT)  # [B, Hh, Nv, T]
    probs_v = jax.nn.softmax(logits_v, axis=-1)  # [B, Hh, Nv, T]

    probs_v = nn.Dropout(self.dropout)(probs_v, deterministic=deterministic)  # [B, Hh, Nv, T]
    probs_l = nn.Dropout(self.dropout)(probs_l, deterministic=deterministic)  # [B, Hh, T, Nv]
    out_v = jnp.einsum('bhnt,bthd->bnhd', probs_v.astype(self.dtype), value_l)  # [B, Nv, Hh, Dh]
    out_l = jnp.einsum('bhtn,bnhd->bthd', probs_l.astype(self.dtype), value_v)  # [B, T, Hh, Dh]
    out_v = out_v.reshape(b, nv, self.embed_dim)  # [B, Nv, E]
    out_l = out_l.reshape(b, t, self.embed_dim)  # [B, T, E]
    delta_v = dense(self.v_dim, 'out_v_proj')(out_v)  # [B, Nv, v_dim]
    delta_l = dense(self.l_dim, 'out_l_proj')(out_l)  # [B, T, l_dim]
    return delta_v, delta_l


class BiAttentionBlock(nn.Module):
  """Pre-norm bi-attention fusion block with layer scale (HIPIE's `VLFuse`).

  Attributes:
    v_dim: visual token width (256).
    l_dim: text token width (768).
    embed_dim: attention width (2048).
    num_heads: number of heads (8).
    dropout: attention-probability dropout (0.1).
    init_values: initial value of the layer-scale vectors `gamma_v`, `gamma_l`
      (the reference uses 1 / number of encoder layers = 1/6).
    dtype: computation dtype.
  """
  v_dim: int = 256
  l_dim: int = 768
  embed_dim: int = 2048
  num_heads: int = 8
  dropout: float = 0.1
  init_values: float = 1.0 / 6.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self,
               visual: jnp.ndarray,
               text: jnp.ndarray,
               text_mask: jnp.ndarray,
               deterministic: bool = True) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Fuses visual and text tokens.

    Args:
      visual: [B, Nv, v_dim] flattened multi-level visual tokens (no position
        embedding added, as in the reference).
      text: [B, T, l_dim] text-encoder token features.
      text_mask: [B, T] bool or {0, 1} attention mask of the text (1 = real token).
      deterministic: when False, applies attention dropout (needs a 'dropout' rng).

    Returns:
      (fused visual [B, Nv, v_dim], fused text [B, T, l_dim]).

    Raises:
      ValueError: when the shapes disagree with each other or with the widths.
    """
    if (visual.ndim != 3 or text.ndim != 3 or visual.shape[-1] != self.v_dim
        or text.shape[-1] != self.l_dim or visual.shape[0] != text.shape[0]
        or text_mask.shape != text.shape[:2]):
      raise ValueError(
          f'BiAttentionBlock: expected visual [B, Nv, {self.v_dim}], text [B, T, {self.l_dim}] '
          f'and text_mask [B, T]; got visual {visual.shape}, text {text.shape}, '
          f'text_mask {text_mask.shape}')
    visual = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='layer_norm_v')(visual)  # [B, Nv, Dv]
    text = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='layer_norm_l')(text)  # [B, T, Dl]
    delta_v, delta_l = BiMultiHeadAttention(
        v_dim=self.v_dim, l_dim=self.l_dim, embed_dim=self.embed_dim,
        num_heads=self.num_heads, dropout=self.dropout, dtype=self.dtype,
        name='attn')(visual, text, text_mask, deterministic)  # [B, Nv, Dv], [B, T, Dl]
    gamma_v = self.param('gamma_v', nn.initializers.constant(self.init_values),
                         (self.v_dim,))  # [Dv]
    gamma_l = self.param('gamma_l', nn.initializers.constant(self.init_values),
                         (self.l_dim,))  # [Dl]
    visual = visual + gamma_v.astype(self.dtype) * delta_v  # [B, Nv, Dv]
    text = text + gamma_l.astype(self.dtype) * delta_l  # [B, T, Dl]
    return visual, text
