"""Tests for hiseg_jax.layers.attention against torch nn.MultiheadAttention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hiseg_jax.layers.attention import MultiHeadAttention, masked_attention_mask
from hiseg_jax.layers.mlp import MLP

# float32 with different summation orders: agreement to 1e-5 absolute.
ATOL = 1e-5


def _torch_mha_and_params(d, num_heads, seed):
  """A torch MHA on random weights and the same weights as Flax params."""
  torch.manual_seed(seed)
  mha = torch.nn.MultiheadAttention(d, num_heads, batch_first=True)
  with torch.no_grad():
    mha.in_proj_bias.normal_()
    mha.out_proj.bias.normal_()
  w = mha.in_proj_weight.detach().numpy()  # [3D, D]
  bias = mha.in_proj_bias.detach().numpy()  # [3D]
  params = {}
  for i, name in enumerate(['q_proj', 'k_proj', 'v_proj']):
    params[name] = {'kernel': w[i * d:(i + 1) * d].T, 'bias': bias[i * d:(i + 1) * d]}
  params['out_proj'] = {'kernel': mha.out_proj.weight.detach().numpy().T,
                        'bias': mha.out_proj.bias.detach().numpy()}
  return mha, {'params': jax.tree.map(jnp.asarray, params)}


def _torch_mask2former_mask(mask_logits, num_heads):
  """Transcription of Mask2Former's attn_mask rule (True = blocked), [B*Hh, Nq, HW]."""
  m = torch.from_numpy(mask_logits).flatten(2)  # [B, Nq, HW]
  m = m.unsqueeze(1).repeat(1, num_heads, 1, 1).flatten(0, 1)  # [B*Hh, Nq, HW]
  blocked = m.sigmoid() < 0.5
  blocked[torch.where(blocked.sum(-1) == blocked.shape[-1])] = False
  return blocked


def test_mha_matches_torch_without_mask():
  d, hh, b, nq, nk = 32, 4, 2, 5, 7
  mha, params = _torch_mha_and_params(d, hh, seed=0)
  rng = np.random.default_rng(0)
  q = rng.normal(size=(b, nq, d)).astype(np.float32)
  k = rng.normal(size=(b, nk, d)).astype(np.float32)
  v = rng.normal(size=(b, nk, d)).astype(np.float32)
  ref = mha(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
            need_weights=False)[0].detach().numpy()
  out = MultiHeadAttention(num_heads=hh).apply(params, q, k, v)
  assert out.shape == (b, nq, d)
  np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL)


def test_masked_attention_matches_torch_with_mask2former_rule():
  d, hh, b, nq, h, w = 32, 4, 2, 6, 4, 5
  mha, params = _torch_mha_and_params(d, hh, seed=1)
  rng = np.random.default_rng(1)
  mask_logits = rng.normal(size=(b, nq, h, w)).astype(np.float32)
  mask_logits[0, 2] = -3.0  # an all-masked row: must attend everywhere
  mask_logits[1, 4] = -0.1
  mask_logits[1, 0, 0, 0] = 0.0  # sigmoid exactly 0.5: allowed
  q = rng.normal(size=(b, nq, d)).astype(np.float32)
  kv = rng.normal(size=(b, h * w, d)).astype(np.float32)
  blocked = _torch_mask2former_mask(mask_logits, hh)
  ref = mha(torch.from_numpy(q), torch.from_numpy(kv), torch.from_numpy(kv),
            attn_mask=blocked, need_weights=False)[0].detach().numpy()

  allowed = masked_attention_mask(jnp.asarray(mask_logits))
  assert allowed.shape == (b, nq, h * w) and allowed.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(allowed),
                                ~blocked.numpy().reshape(b, hh, nq, h * w)[:, 0])
  assert bool(allowed[0, 2].all()) and bool(allowed[1, 4].all())
  assert bool(allowed[1, 0, 0])
  model = MultiHeadAttention(num_heads=hh)
  out = model.apply(params, q, kv, kv, mask=allowed)
  np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL)
  per_head = masked_attention_mask(jnp.asarray(mask_logits).reshape(b, nq, h * w), num_heads=hh)
  assert per_head.shape == (b, hh, nq, h * w)
  out_heads = model.apply(params, q, kv, kv, mask=per_head)
  np.testing.assert_allclose(np.asarray(out_heads), ref, atol=ATOL)


def test_mha_dropout_changes_output_only_when_not_deterministic():
  x = jax.random.normal(jax.random.key(0), (1, 4, 16))
  model = MultiHeadAttention(num_heads=2, dropout=0.5)
  params = model.init(jax.random.key(1), x, x, x)
  a = model.apply(params, x, x, x)
  b = model.apply(params, x, x, x, deterministic=False, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(np.asarray(a), np.asarray(b))


def test_mha_rejects_bad_shapes():
  x = jnp.zeros((1, 4, 16))
  model = MultiHeadAttention(num_heads=3)
  with pytest.raises(ValueError, match='not divisible'):
    model.init(jax.random.key(0), x, x, x)
  model = MultiHeadAttention(num_heads=2)
  with pytest.raises(ValueError, match='mask shape'):
    model.init(jax.random.key(0), x, x, x, mask=jnp.ones((1, 4, 5), bool))
  with pytest.raises(ValueError, match='mask_logits shape'):
    masked_attention_mask(jnp.zeros((4, 5)))


def test_mlp_matches_detr_mlp():
  torch.manual_seed(0)
  layers = torch.nn.ModuleList([torch.nn.Linear(8, 16), torch.nn.Linear(16, 16),
                                torch.nn.Linear(16, 3)])
  x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  ref = torch.from_numpy(x)
  for i, layer in enumerate(layers):
    ref = torch.relu(layer(ref)) if i < 2 else layer(ref)
  params = {'params': {f'layers_{i}': {'kernel': jnp.asarray(l.weight.detach().numpy().T),
                                       'bias': jnp.asarray(l.bias.detach().numpy())}
                       for i, l in enumerate(layers)}}
  out = MLP(hidden_dim=16, output_dim=3, num_layers=3).apply(params, x)
  np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), atol=ATOL)
