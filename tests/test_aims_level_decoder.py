"""Tests for one AIMS level decoder: layers vs torch Mask2Former, heads, masked cross-attention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hiseg_jax.aims.level_decoder import CrossAttentionLayer
from hiseg_jax.aims.level_decoder import FFNLayer
from hiseg_jax.aims.level_decoder import LevelDecoder
from hiseg_jax.aims.level_decoder import Prediction
from hiseg_jax.aims.level_decoder import SelfAttentionLayer

B, Q, D = 2, 4, 32
SIZES = [(2, 2), (4, 4), (8, 8)]  # F_5, F_4, F_3 of a 64 px image


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  multi_scale = [rng.normal(size=(B, h, w, 24)).astype(np.float32) for h, w in SIZES]
  mask_features = rng.normal(size=(B, 16, 16, 24)).astype(np.float32)
  return multi_scale, mask_features


def _block0(dec, multi_scale, mask_features, previous_masks):
  """Runs block 0 (scale 1/32) with the given previous mask logits."""
  memory = dec.memory(multi_scale)
  tgt, query_pos = dec.initial_queries(B)
  first = dec.predict(tgt, mask_features)
  previous = Prediction(first.logits, previous_masks, first.embedding)
  out = dec.feed_forward(0, dec.attend(0, tgt, query_pos, memory, previous))
  return out, first


def _decoder():
  return LevelDecoder(num_queries=Q, hidden_dim=D, input_dim=24, mask_dim=24, num_heads=4,
                      ffn_dim=64, num_layers=2)


def test_parameters_and_prediction_shapes():
  dec = _decoder()
  multi_scale, mask_features = _inputs()
  prev = jnp.zeros((B, Q, 16, 16))
  variables = dec.init(jax.random.PRNGKey(0), multi_scale, mask_features, prev,
                       method=_block0)
  params = variables['params']
  assert params['query_feat'].shape == (Q, D) and params['query_embed'].shape == (Q, D)
  assert params['level_embed'].shape == (3, D)
  assert params['input_proj_0']['kernel'].shape == (24, D)  # 24-wide features -> D
  assert params['class_embed']['kernel'].shape == (D, 1)  # class-agnostic objectness
  assert set(params['mask_embed']) == {'layers_0', 'layers_1', 'layers_2'}
  assert params['mask_embed']['layers_2']['kernel'].shape == (D, 24)
  out, first = dec.apply(variables, multi_scale, mask_features, prev, method=_block0)
  assert out.shape == (B, Q, D)
  assert first.logits.shape == (B, Q) and first.masks.shape == (B, Q, 16, 16)
  emb = np.asarray(first.embedding)
  mlp = params['mask_embed']
  x = emb
  for i in range(3):
    x = x @ np.asarray(mlp[f'layers_{i}']['kernel']) + np.asarray(mlp[f'layers_{i}']['bias'])
    x = np.maximum(x, 0) if i < 2 else x
  # float32 einsum vs numpy: 1e-4.
  np.testing.assert_allclose(np.asarray(first.masks),
                             np.einsum('bqc,bhwc->bqhw', x, mask_features), atol=1e-4)


def test_cross_attention_is_masked_by_previous_prediction():
  dec = _decoder()
  multi_scale, mask_features = _inputs()
  full = jnp.full((B, Q, 16, 16), 5.0)  # every pixel allowed
  empty = jnp.full((B, Q, 16, 16), -5.0)  # no pixel allowed -> rows reset to everywhere
  left = jnp.concatenate([jnp.full((B, Q, 16, 8), 5.0), jnp.full((B, Q, 16, 8), -5.0)],
                         axis=-1)  # left half; at block 0's 2x2 scale the left column
  variables = dec.init(jax.random.PRNGKey(0), multi_scale, mask_features, full,
                       method=_block0)
  run = lambda ms, prev: np.asarray(dec.apply(variables, ms, mask_features, prev,
                                              method=_block0)[0])
  out_full, out_empty, out_left = run(multi_scale, full), run(multi_scale, empty), run(
      multi_scale, left)
  np.testing.assert_allclose(out_empty, out_full, atol=1e-6)
  assert np.abs(out_left - out_full).max() > 1e-3
  # Changing the features the mask hides (right column of the 1/32 scale) changes
  # nothing under the left-half mask, but does without a mask.
  changed = [x.copy() for x in multi_scale]
  changed[0][:, :, 1] = np.random.default_rng(1).normal(size=(B, 2, 24))
  np.testing.assert_allclose(run(changed, left), out_left, atol=1e-6)
  assert np.abs(run(changed, full) - out_full).max() > 1e-3


class TorchLayers(torch.nn.Module):
  """Transcription of Mask2Former's CrossAttention/SelfAttention/FFN layers (post and pre)."""

  def __init__(self, d, heads, ffn):
    super().__init__()
    self.cross = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    self.self_attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(d) for _ in range(3)])
    self.linear1 = torch.nn.Linear(d, ffn)
    self.linear2 = torch.nn.Linear(ffn, d)
    self.heads = heads
    with torch.no_grad():
      for m in (self.cross, self.self_attn):
        m.in_proj_bias.normal_()
        m.out_proj.bias.normal_()
      for n in self.norms:
        n.weight.normal_()
        n.bias.normal_()

  def forward(self, tgt, memory, query_pos, pos, allowed, pre_norm):
    blocked = ~allowed.repeat_interleave(self.heads, dim=0)  # [B*Hh, Q, HW]
    n0, n1, n2 = self.norms
    if pre_norm:
      t = n0(tgt)
      tgt = tgt + self.cross(t + query_pos, memory + pos, memory, attn_mask=blocked)[0]
      t = n1(tgt)
      tgt = tgt + self.self_attn(t + query_pos, t + query_pos, t)[0]
      return tgt + self.linear2(torch.relu(self.linear1(n2(tgt))))
    tgt = n0(tgt + self.cross(tgt + query_pos, memory + pos, memory, attn_mask=blocked)[0])
    tgt = n1(tgt + self.self_attn(tgt + query_pos, tgt + query_pos, tgt)[0])
    return n2(tgt + self.linear2(torch.relu(self.linear1(tgt))))

  def flax_params(self):
    t = lambda p: jnp.asarray(p.detach().numpy())

    def mha(m):
      d = m.embed_dim
      w, b = m.in_proj_weight, m.in_proj_bias
      out = {n: {'kernel': t(w[i * d:(i + 1) * d]).T, 'bias': t(b[i * d:(i + 1) * d])}
             for i, n in enumerate(('q_proj', 'k_proj', 'v_proj'))}
      out['out_proj'] = {'kernel': t(m.out_proj.weight).T, 'bias': t(m.out_proj.bias)}
      return out

    norm = lambda n: {'scale': t(n.weight), 'bias': t(n.bias)}
    return {'cross': {'attn': mha(self.cross), 'norm': norm(self.norms[0])},
            'self': {'attn': mha(self.self_attn), 'norm': norm(self.norms[1])},
            'ffn': {'linear1': {'kernel': t(self.linear1.weight).T, 'bias': t(self.linear1.bias)},
                    'linear2': {'kernel': t(self.linear2.weight).T, 'bias': t(self.linear2.bias)},
                    'norm': norm(self.norms[2])}}


class _Block(nn.Module):
  """Cross -> self -> FFN with the level decoder's layers."""
  pre_norm: bool

  @nn.compact
  def __call__(self, tgt, memory, query_pos, pos, allowed):
    tgt = CrossAttentionLayer(4, pre_norm=self.pre_norm, name='cross')(
        tgt, memory, query_pos, pos, allowed)
    tgt = SelfAttentionLayer(4, pre_norm=self.pre_norm, name='self')(tgt, query_pos)
    return FFNLayer(64, pre_norm=self.pre_norm, name='ffn')(tgt)


@pytest.mark.parametrize('pre_norm', [False, True])
def test_block_layers_match_torch_mask2former(pre_norm):
  rng = np.random.default_rng(0)
  hw = 12
  tgt, query_pos = (rng.normal(size=(B, Q, D)).astype(np.float32) for _ in range(2))
  memory, pos = (rng.normal(size=(B, hw, D)).astype(np.float32) for _ in range(2))
  allowed = rng.random((B, Q, hw)) > 0.5
  allowed[:, :, 0] = True  # no empty row
  torch.manual_seed(0)
  ref = TorchLayers(D, 4, 64)
  expected = ref(*(torch.from_numpy(x) for x in (tgt, memory, query_pos, pos, allowed)),
                 pre_norm=pre_norm).detach().numpy()
  block = _Block(pre_norm)
  params = {'params': ref.flax_params()}
  shapes = jax.eval_shape(block.init, jax.random.PRNGKey(0), tgt, memory, query_pos, pos,
                          allowed)
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, params)
  out = block.apply(params, tgt, memory, query_pos, pos, allowed)
  # float32, same operations in a different order: 1e-5 absolute.
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
