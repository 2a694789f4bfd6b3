"""One AIMS level decoder (Mask2Former-style) and its attention-block layers.

AIMS (Sec. 3.1, Eq. 2-3) gives each level (part, entity, relation) its own
decoder of cascaded blocks, masked cross-attention -> self-attention -> FFN,
refining learnable queries against the multi-scale features F_3..F_5 (the
model's `decoder_strides` can shift them one scale finer), with a
class-agnostic objectness head and a mask head on F_2. Where the paper is
silent we follow Mask2Former (the base of the authors' entity segmenter):
post-norm layers (or pre-norm by flag), learnable query features and query
positional embeddings, one learnable level embedding per feature scale, the
scales used round-robin from the lowest resolution (1/32, 1/16, 1/8), sine
positional encodings of the memory, a LayerNorm before the heads, a 3-layer
mask-embedding MLP, and a prediction from the learnable queries plus one after
every block; block i's cross-attention is masked by the prediction before it
(bilinearly resized to that block's scale, allowed where sigmoid >= 0.5, an
empty row attends everywhere).

The three decoders run in lock step so the task complementarity module can sit
between self-attention and FFN; `LevelDecoder` therefore exposes the steps of
a block as separate methods that the AIMS model interleaves.
"""

from typing import List, NamedTuple, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from hiseg_jax.layers.attention import MultiHeadAttention
from hiseg_jax.layers.attention import masked_attention_mask
from hiseg_jax.layers.mlp import MLP
from hiseg_jax.layers.position_encoding import sine_position_encoding

_xavier = nn.initializers.xavier_uniform()


class CrossAttentionLayer(nn.Module):
  """Masked cross-attention from queries to image features, with residual and LayerNorm.

  Post-norm: out = LN(tgt + Attn(tgt + query_pos, memory + pos, memory)).
  Pre-norm: out = tgt + Attn(LN(tgt) + query_pos, memory + pos, memory).

  Attributes:
    num_heads: attention heads.
    dropout: dropout on attention probabilities and on the residual branch.
    pre_norm: whether LayerNorm precedes the attention.
  """
  num_heads: int
  dropout: float = 0.0
  pre_norm: bool = False

  @nn.compact
  def __call__(self, tgt: jnp.ndarray, memory: jnp.ndarray, query_pos: jnp.ndarray,
               pos: jnp.ndarray, mask: jnp.ndarray,
               deterministic: bool = True) -> jnp.ndarray:
    """Applies the layer.

    Args:
      tgt: [B, Q, D] query embeddings.
      memory: [B, HW, D] image features of one scale.
      query_pos: [B, Q, D] query positional embeddings.
      pos: [B, HW, D] or [HW, D] positional encodings of the features.
      mask: bool [B, Q, HW], True where a query may attend.
      deterministic: disables dropout when True.

    Returns:
      [B, Q, D] updated query embeddings.
    """
    norm = nn.LayerNorm(epsilon=1e-5, name='norm')
    attn = MultiHeadAttention(self.num_heads, self.dropout, name='attn')
    q = norm(tgt) if self.pre_norm else tgt  # [B, Q, D]
    out = attn(q + query_pos, memory + pos, memory, mask=mask,
               deterministic=deterministic)  # [B, Q, D]
    out = nn.Dropout(self.dropout)(out, deterministic=deterministic)  # [B, Q, D]
    return tgt + out if self.pre_norm else norm(tgt + out)  # [B, Q, D]


class SelfAttentionLayer(nn.Module):
  """Self-attention among queries, with residual and LayerNorm.

  Post-norm: out = LN(tgt + Attn(tgt + query_pos, tgt + query_pos, tgt)).
  Pre-norm: x = LN(tgt); out = tgt + Attn(x + query_pos, x + query_pos, x).

  Attributes:
    num_heads: attention heads.
    dropout: dropout on attention probabilities and on the residual branch.
    pre_norm: whether LayerNorm precedes the attention.
  """
  num_heads: int
  dropout: float = 0.0
  pre_norm: bool = False

  @nn.compact
  def __call__(self, tgt: jnp.ndarray, query_pos: jnp.ndarray,
               deterministic: bool = True) -> jnp.ndarray:
    """Applies the layer.

    Args:
      tgt: [B, Q, D] query embeddings.
      query_pos: [B, Q, D] query positional embeddings.
      deterministic: disables dropout when True.

    Returns:
      [B, Q, D] updated query embeddings.
    """
    norm = nn.LayerNorm(epsilon=1e-5, name='norm')
    attn = MultiHeadAttention(self.num_heads, self.dropout, name='attn')
    x = norm(tgt) if self.pre_norm else tgt  # [B, Q, D]
    qk = x + query_pos  # [B, Q, D]
    out = attn(qk, qk, x, deterministic=deterministic)  # [B, Q, D]
    out = nn.Dropout(self.dropout)(out, deterministic=deterministic)  # [B, Q, D]
    return tgt + out if self.pre_norm else norm(tgt + out)  # [B, Q, D]


class FFNLayer(nn.Module):
  """Feed-forward network (Linear -> ReLU -> Linear), with residual and LayerNorm.

  Parameters `linear1`, `linear2`, `norm` (torch names of Mask2Former's layer).

  Attributes:
    ffn_dim: hidden width.
    dropout: dropout after the ReLU and on the residual branch.
    pre_norm: whether LayerNorm precedes the FFN.
  """
  ffn_dim: int
  dropout: float = 0.0
  pre_norm: bool = False

  @nn.compact
  def __call__(self, tgt: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    """Applies the layer.

    Args:
      tgt: [B, Q, D] query embeddings.
      deterministic: disables dropout when True.

    Returns:
      [B, Q, D] updated query embeddings.
    """
    d = tgt.shape[-1]
    norm = nn.LayerNorm(epsilon=1e-5, name='norm')
    x = norm(tgt) if self.pre_norm else tgt  # [B, Q, D]
    x = nn.Dense(self.ffn_dim, kernel_init=_xavier, name='linear1')(x)  # [B, Q, F]
    x = jax.nn.relu(x)  # [B, Q, F]
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)  # [B, Q, F]
    x = nn.Dense(d, kernel_init=_xavier, name='linear2')(x)  # [B, Q, D]
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)  # [B, Q, D]
    return tgt + x if self.pre_norm else norm(tgt + x)  # [B, Q, D]


class Prediction(NamedTuple):
  """One prediction of a level decoder.

  Attributes:
    logits: [B, Q] objectness (part-/entity-/relation-ness) logits.
    masks: [B, Q, H/s, W/s] mask logits (s: the mask-feature stride, 4 or 2).
    embedding: [B, Q, D] the LayerNorm'd query embeddings the heads read.
  """
  logits: jnp.ndarray
  masks: jnp.ndarray
  embedding: jnp.ndarray


class LevelMemory(NamedTuple):
  """The features one level decoder attends to, one entry per scale (low resolution first).

  Attributes:
    features: list of [B, h_l*w_l, D] projected features plus level embedding.
    pos: list of [h_l*w_l, D] sine positional encodings.
    sizes: list of (h_l, w_l).
  """
  features: List[jnp.ndarray]
  pos: List[jnp.ndarray]
  sizes: List[Tuple[int, int]]


def resize_mask_logits(masks: jnp.ndarray, size: Tuple[int, int]) -> jnp.ndarray:
  """Bilinear resize of mask logits (torch `align_corners=False`, no antialiasing).

  Args:
    masks: [B, Q, h, w] mask logits.
    size: target (h', w').

  Returns:
    [B, Q, h', w'] resized logits.
  """
  b, q = masks.shape[:2]
  return jax.image.resize(masks, (b, q) + tuple(size), method='bilinear',
                          antialias=False)  # [B, Q, h', w']


class LevelDecoder(nn.Module):
  """Query state, attention blocks and heads of one AIMS level.

  Parameters: `query_feat` [Q, D], `query_embed` [Q, D], `level_embed` [S, D],
  `input_proj_{s}` (only when `input_dim != hidden_dim`), `cross_attn_{i}`,
  `self_attn_{i}`, `ffn_{i}` for each block i, `decoder_norm`, `class_embed`
  (Dense D -> 1) and `mask_embed` (3-layer MLP D -> D -> D -> mask_dim).

  Attributes:
    num_queries: queries Q of this level.
    hidden_dim: query width D.
    input_dim: width of the attended feature maps (F_3..F_5 in the paper).
    mask_dim: width of the mask features F_2.
    num_heads: attention heads.
    ffn_dim: FFN hidden width.
    num_layers: number of attention blocks.
    num_feature_levels: number of feature scales used round-robin.
    pre_norm: pre-norm instead of post-norm layers.
    dropout: dropout rate (0 in AIMS / Mask2Former).
  """
  num_queries: int
  hidden_dim: int = 256
  input_dim: int = 256
  mask_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  num_layers: int = 9
  num_feature_levels: int = 3
  pre_norm: bool = False
  dropout: float = 0.0

  def setup(self):
    d = self.hidden_dim
    normal = nn.initializers.normal(1.0)
    self.query_feat = self.param('query_feat', normal, (self.num_queries, d))
    self.query_embed = self.param('query_embed', normal, (self.num_queries, d))
    self.level_embed = self.param('level_embed', normal, (self.num_feature_levels, d))
    if self.input_dim != d:
      self.input_proj = [nn.Dense(d, kernel_init=_xavier, name=f'input_proj_{s}')
                         for s in range(self.num_feature_levels)]
    self.cross_attn = [CrossAttentionLayer(self.num_heads, self.dropout, self.pre_norm,
                                           name=f'cross_attn_{i}')
                       for i in range(self.num_layers)]
    self.self_attn = [SelfAttentionLayer(self.num_heads, self.dropout, self.pre_norm,
                                         name=f'self_attn_{i}')
                      for i in range(self.num_layers)]
    self.ffn = [FFNLayer(self.ffn_dim, self.dropout, self.pre_norm, name=f'ffn_{i}')
                for i in range(self.num_layers)]
    self.decoder_norm = nn.LayerNorm(epsilon=1e-5)
    self.class_embed = nn.Dense(1)
    self.mask_embed = MLP(d, self.mask_dim, 3)

  def memory(self, multi_scale: Sequence[jnp.ndarray]) -> LevelMemory:
    """Flattens the feature scales, projects them and adds the level embeddings.

    Args:
      multi_scale: `num_feature_levels` maps [B, h_l, w_l, input_dim], low
        resolution first.

    Returns:
      The LevelMemory of this decoder.
    """
    if len(multi_scale) != self.num_feature_levels:
      raise ValueError(f'LevelDecoder: got {len(multi_scale)} feature scales, '
                       f'expected {self.num_feature_levels}')
    features, pos, sizes = [], [], []
    for s, x in enumerate(multi_scale):
      b, h, w, c = x.shape
      if c != self.input_dim:
        raise ValueError(f'LevelDecoder: feature scale {s} has shape {x.shape}; '
                         f'expected {self.input_dim} channels')
      x = x.reshape(b, h * w, c)  # [B, hw, C]
      if self.input_dim != self.hidden_dim:
        x = self.input_proj[s](x)  # [B, hw, D]
      features.append(x + self.level_embed[s])  # [B, hw, D]
      pos.append(sine_position_encoding(h, w, self.hidden_dim // 2).reshape(
          h * w, self.hidden_dim))  # [hw, D]
      sizes.append((h, w))
    return LevelMemory(features, pos, sizes)

  def initial_queries(self, batch_size: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """The learnable query features and positional embeddings, broadcast over the batch.

    Args:
      batch_size: B.

    Returns:
      (tgt [B, Q, D], query_pos [B, Q, D]).
    """
    shape = (batch_size, self.num_queries, self.hidden_dim)
    tgt = jnp.broadcast_to(self.query_feat, shape)  # [B, Q, D]
    query_pos = jnp.broadcast_to(self.query_embed, shape)  # [B, Q, D]
    return tgt, query_pos

  def predict(self, tgt: jnp.ndarray, mask_features: jnp.ndarray) -> Prediction:
    """Objectness and mask heads (Eq. 3).

    Args:
      tgt: [B, Q, D] query embeddings.
      mask_features: [B, H/s, W/s, mask_dim] the (prompt-fused) F_2, or the
        stride-2 F_1 for the model's fine levels.

    Returns:
      The Prediction.
    """
    emb = self.decoder_norm(tgt)  # [B, Q, D]
    logits = self.class_embed(emb)[..., 0]  # [B, Q]
    mask_emb = self.mask_embed(emb)  # [B, Q, mask_dim]
    masks = jnp.einsum('bqc,bhwc->bqhw', mask_emb, mask_features)  # [B, Q, H/s, W/s]
    return Prediction(logits, masks, emb)

  def attend(self, block: int, tgt: jnp.ndarray, query_pos: jnp.ndarray,
             memory: LevelMemory, previous: Prediction,
             deterministic: bool = True) -> jnp.ndarray:
    """Masked cross-attention then self-attention of one block.

    Args:
      block: block index i; it attends to scale i % num_feature_levels.
      tgt: [B, Q, D] query embeddings entering the block.
      query_pos: [B, Q, D] query positional embeddings.
      memory: this decoder's LevelMemory.
      previous: the prediction made before this block; its masks, resized to
        the block's scale, give the attention mask.
      deterministic: disables dropout when True.

    Returns:
      [B, Q, D] embeddings after self-attention (E_{T_s} of Eq. 5).
    """
    scale = block % self.num_feature_levels
    attn_logits = resize_mask_logits(previous.masks, memory.sizes[scale])  # [B, Q, h, w]
    mask = masked_attention_mask(attn_logits)  # [B, Q, hw]
    tgt = self.cross_attn[block](tgt, memory.features[scale], query_pos,
                                 memory.pos[scale], mask, deterministic)  # [B, Q, D]
    return self.self_attn[block](tgt, query_pos, deterministic)  # [B, Q, D]

  def feed_forward(self, block: int, tgt: jnp.ndarray,
                   deterministic: bool = True) -> jnp.ndarray:
    """The block's FFN (Eq. 7).

    Args:
      block: block index i.
      tgt: [B, Q, D] embeddings after self-attention (and TCM).
      deterministic: disables dropout when True.

    Returns:
      [B, Q, D] embeddings leaving the block.
    """
    return self.ffn[block](tgt, deterministic)  # [B, Q, D]
