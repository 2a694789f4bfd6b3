"""Tests for the AIMS association module (Eq. 8 similarity logits)."""

import jax
import jax.numpy as jnp
import numpy as np

from hiseg_jax.aims.association import AssociationModule


def test_association_logits_are_fc_dot_products():
  b, d, a = 2, 16, 8
  counts = {'part': 7, 'entity': 5, 'relation': 3}
  rng = np.random.default_rng(0)
  emb = {k: rng.normal(size=(b, q, d)).astype(np.float32) for k, q in counts.items()}
  module = AssociationModule(assoc_dim=a)
  variables = module.init(jax.random.PRNGKey(0), emb)
  params = jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32)), variables)
  out = module.apply(params, emb)
  fc = {k: emb[k] @ np.asarray(params['params'][f'fc_{k}']['kernel'])
        + np.asarray(params['params'][f'fc_{k}']['bias']) for k in counts}
  # float32 matmuls in a different order: 1e-4 relative.
  np.testing.assert_allclose(np.asarray(out['assoc_ep']),
                             fc['entity'] @ fc['part'].transpose(0, 2, 1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out['assoc_re']),
                             fc['relation'] @ fc['entity'].transpose(0, 2, 1), rtol=1e-4,
                             atol=1e-4)
  assert out['assoc_ep'].shape == (b, 5, 7) and out['assoc_re'].shape == (b, 3, 5)
