"""AIMS task complementarity module (TCM, Sec. 3.2, Eq. 5-7).

Within an attention block, after each level decoder's self-attention, the
embeddings of two adjacent levels are concatenated along the query axis, passed
through a self-attention layer and an FFN layer (Mask2Former-style layers, each
with its own residual and LayerNorm), split back, and the fused embeddings are
added to the post-self-attention embeddings (Eq. 5-6); each level then runs its
own FFN (Eq. 7, done by the level decoder).

There are two such modules per block, E-P (entity with part) and R-E
(relation with entity). The entity level takes part in both. We compute the two
modules in parallel from the same post-self-attention embeddings (each sees
E_{e_s} exactly as Eq. 5 writes it) and add both fused entity embeddings:
E''_e = E_e + E'_e(E-P) + E'_e(R-E), E''_p = E_p + E'_p(E-P),
E''_r = E_r + E'_r(R-E). Figure 3 draws the two modules side by side on the
entity decoder, and the parallel form keeps the module symmetric in its order.
The self-attention inside a module adds the query positional embeddings of the
two levels (concatenated like the embeddings), as every decoder self-attention
does.
"""

from typing import Dict, Tuple

import flax.linen as nn
import jax.numpy as jnp

from hiseg_jax.aims.level_decoder import FFNLayer
from hiseg_jax.aims.level_decoder import SelfAttentionLayer


class TaskComplementarity(nn.Module):
  """One pair module (E-P or R-E): Eq. 5 on two levels' embeddings.

  Parameters: `self_attn` (SelfAttentionLayer), `ffn` (FFNLayer).

  Attributes:
    num_heads: attention heads.
    ffn_dim: FFN hidden width.
    dropout: dropout rate.
    pre_norm: pre-norm instead of post-norm layers.
  """
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout: float = 0.0
  pre_norm: bool = False

  @nn.compact
  def __call__(self, high: jnp.ndarray, low: jnp.ndarray, high_pos: jnp.ndarray,
               low_pos: jnp.ndarray,
               deterministic: bool = True) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Concat -> self-attention -> FFN -> split (Eq. 5).

    Args:
      high: [B, Qa, D] post-self-attention embeddings of the higher level.
      low: [B, Qb, D] post-self-attention embeddings of the lower level.
      high_pos: [B, Qa, D] query positional embeddings of the higher level.
      low_pos: [B, Qb, D] query positional embeddings of the lower level.
      deterministic: disables dropout when True.

    Returns:
      (fused_high [B, Qa, D], fused_low [B, Qb, D]), the E' of Eq. 5 (the
      caller adds them to the inputs, Eq. 6).
    """
    if high.shape[0] != low.shape[0] or high.shape[2] != low.shape[2]:
      raise ValueError(f'TaskComplementarity: embeddings {high.shape} and {low.shape} '
                       'must share batch and width')
    qa = high.shape[1]
    x = jnp.concatenate([high, low], axis=1)  # [B, Qa+Qb, D]
    pos = jnp.concatenate([high_pos, low_pos], axis=1)  # [B, Qa+Qb, D]
    x = SelfAttentionLayer(self.num_heads, self.dropout, self.pre_norm,
                           name='self_attn')(x, pos, deterministic)  # [B, Qa+Qb, D]
    x = FFNLayer(self.ffn_dim, self.dropout, self.pre_norm, name='ffn')(
        x, deterministic)  # [B, Qa+Qb, D]
    return x[:, :qa], x[:, qa:]  # [B, Qa, D], [B, Qb, D]


class TaskComplementarityBlock(nn.Module):
  """Both TCM pair modules of one attention block, with the Eq. 6 additions.

  Parameters: `ep` (entity-part TaskComplementarity), `re` (relation-entity).

  Attributes:
    num_heads: attention heads.
    ffn_dim: FFN hidden width.
    dropout: dropout rate.
    pre_norm: pre-norm instead of post-norm layers.
  """
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout: float = 0.0
  pre_norm: bool = False

  @nn.compact
  def __call__(self, embeddings: Dict[str, jnp.ndarray], query_pos: Dict[str, jnp.ndarray],
               deterministic: bool = True) -> Dict[str, jnp.ndarray]:
    """Fuses part/entity and relation/entity embeddings (Eq. 5-6).

    Args:
      embeddings: {'part': [B, Qp, D], 'entity': [B, Qe, D], 'relation':
        [B, Qr, D]} post-self-attention embeddings.
      query_pos: the query positional embeddings, same keys and shapes.
      deterministic: disables dropout when True.

    Returns:
      The enhanced embeddings E'' with the same keys and shapes.
    """
    make = lambda name: TaskComplementarity(self.num_heads, self.ffn_dim, self.dropout,
                                            self.pre_norm, name=name)
    e_from_ep, p_from_ep = make('ep')(embeddings['entity'], embeddings['part'],
                                      query_pos['entity'], query_pos['part'],
                                      deterministic)  # [B, Qe, D], [B, Qp, D]
    r_from_re, e_from_re = make('re')(embeddings['relation'], embeddings['entity'],
                                      query_pos['relation'], query_pos['entity'],
                                      deterministic)  # [B, Qr, D], [B, Qe, D]
    return {
        'part': embeddings['part'] + p_from_ep,  # [B, Qp, D]
        'entity': embeddings['entity'] + e_from_ep + e_from_re,  # [B, Qe, D]
        'relation': embeddings['relation'] + r_from_re,  # [B, Qr, D]
    }
