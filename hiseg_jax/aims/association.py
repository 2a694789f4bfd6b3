"""AIMS association module (AM, Sec. 3.3, Eq. 8).

Each level has one fully-connected layer FC_T projecting its query embeddings
to `assoc_dim`; the association logits are dot products between projected
embeddings of adjacent levels: A_EP = FC_e(E_e) FC_p(E_p)^T and
A_RE = FC_r(E_r) FC_e(E_e)^T (the entity projection is shared by both maps, one
FC per level as Eq. 8 writes it). A sigmoid of the logits gives the association
probability; the loss is a BCE on them (Eq. 8-9).
"""

from typing import Dict

import flax.linen as nn
import jax.numpy as jnp


class AssociationModule(nn.Module):
  """Cross-level association logits from query embeddings.

  Parameters: `fc_part`, `fc_entity`, `fc_relation` (Dense D -> assoc_dim).

  Attributes:
    assoc_dim: width of the projected embeddings.
  """
  assoc_dim: int = 256

  @nn.compact
  def __call__(self, embeddings: Dict[str, jnp.ndarray]) -> Dict[str, jnp.ndarray]:
    """Computes the entity-part and relation-entity association logits.

    Args:
      embeddings: {'part': [B, Qp, D], 'entity': [B, Qe, D], 'relation':
        [B, Qr, D]} final query embeddings.

    Returns:
      {'assoc_ep': [B, Qe, Qp], 'assoc_re': [B, Qr, Qe]} logits.
    """
    proj = {level: nn.Dense(self.assoc_dim, name=f'fc_{level}')(embeddings[level])
            for level in ('part', 'entity', 'relation')}  # each [B, Q_T, A]
    assoc_ep = jnp.einsum('bea,bpa->bep', proj['entity'], proj['part'])  # [B, Qe, Qp]
    assoc_re = jnp.einsum('bra,bea->bre', proj['relation'], proj['entity'])  # [B, Qr, Qe]
    return {'assoc_ep': assoc_ep, 'assoc_re': assoc_re}
