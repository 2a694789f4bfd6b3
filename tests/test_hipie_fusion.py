"""Tests for hiseg_jax.hipie.fusion against a PyTorch transcription of HIPIE's BiAttentionBlock."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from hiseg_jax.hipie.fusion import BiAttentionBlock

# float32 with 2048-wide sums in different orders: agreement to 2e-5 relative + 2e-5 absolute.
RTOL = 2e-5
ATOL = 2e-5
V_DIM, L_DIM, EMBED, HEADS = 256, 768, 2048, 8


class TorchBiMultiHeadAttention(torch.nn.Module):
  """Transcription of the reference BiMultiHeadAttention (clamps on, stable 2-D softmax off)."""

  def __init__(self, v_dim, l_dim, embed_dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.head_dim = embed_dim // num_heads
    self.embed_dim = embed_dim
    self.scale = self.head_dim ** -0.5
    self.v_proj = torch.nn.Linear(v_dim, embed_dim)
    self.l_proj = torch.nn.Linear(l_dim, embed_dim)
    self.values_v_proj = torch.nn.Linear(v_dim, embed_dim)
    self.values_l_proj = torch.nn.Linear(l_dim, embed_dim)
    self.out_v_proj = torch.nn.Linear(embed_dim, v_dim)
    self.out_l_proj = torch.nn.Linear(embed_dim, l_dim)

  def _heads(self, x, bsz):
    return x.view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

  def forward(self, v, l, attention_mask_l):
    bsz, tgt_len, _ = v.size()
    proj_shape = (bsz * self.num_heads, -1, self.head_dim)
    query = self._heads(self.v_proj(v) * self.scale, bsz).view(*proj_shape)
    key = self._heads(self.l_proj(l), bsz).view(*proj_shape)
    value_v = self._heads(self.values_v_proj(v), bsz).view(*proj_shape)
    value_l = self._heads(self.values_l_proj(l), bsz).view(*proj_shape)
    src_len = key.size(1)
    attn = torch.bmm(query, key.transpose(1, 2))
    raw_logits = attn
    attn = torch.clamp(attn, min=-50000)
    attn = torch.clamp(attn, max=50000)
    attn_t = attn.transpose(1, 2)
    attn_l = attn_t - torch.max(attn_t, dim=-1, keepdim=True)[0]
    attn_l = torch.clamp(attn_l, min=-50000)
    attn_l = torch.clamp(attn_l, max=50000)
    attn_l = attn_l.softmax(dim=-1)
    mask = attention_mask_l.unsqueeze(1).unsqueeze(1).expand(bsz, 1, tgt_len, src_len)
    mask = mask.masked_fill(mask == 0, -9e15)
    attn = attn.view(bsz, self.num_heads, tgt_len, src_len) + mask
    attn = attn.view(bsz * self.num_heads, tgt_len, src_len)
    attn_v = torch.nn.functional.softmax(attn, dim=-1)
    out_v = torch.bmm(attn_v, value_l)
    out_l = torch.bmm(attn_l, value_v)
    out_v = out_v.view(bsz, self.num_heads, tgt_len, self.head_dim).transpose(1, 2)
    out_v = out_v.reshape(bsz, tgt_len, self.embed_dim)
    out_l = out_l.view(bsz, self.num_heads, src_len, self.head_dim).transpose(1, 2)
    out_l = out_l.reshape(bsz, src_len, self.embed_dim)
    return self.out_v_proj(out_v), self.out_l_proj(out_l), raw_logits


class TorchBiAttentionBlock(torch.nn.Module):
  """Transcription of the reference BiAttentionBlockForCheckpoint (drop-path 0)."""

  def __init__(self, v_dim, l_dim, embed_dim, num_heads, init_values):
    super().__init__()
    self.layer_norm_v = torch.nn.LayerNorm(v_dim)
    self.layer_norm_l = torch.nn.LayerNorm(l_dim)
    self.attn = TorchBiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads)
    self.gamma_v = torch.nn.Parameter(init_values * torch.ones(v_dim))
    self.gamma_l = torch.nn.Parameter(init_values * torch.ones(l_dim))

  def forward(self, v, l, attention_mask_l):
    v = self.layer_norm_v(v)
    l = self.layer_norm_l(l)
    delta_v, delta_l, logits = self.attn(v, l, attention_mask_l)
    return v + self.gamma_v * delta_v, l + self.gamma_l * delta_l, logits


def _reference_and_params(seed, proj_gain=1.0):
  """A torch block on random weights (all params perturbed) and the same weights as Flax params."""
  torch.manual_seed(seed)
  block = TorchBiAttentionBlock(V_DIM, L_DIM, EMBED, HEADS, init_values=1.0 / 6.0)
  with torch.no_grad():
    for p in block.parameters():
      p.add_(0.1 * torch.randn_like(p))
    block.attn.v_proj.weight.mul_(proj_gain)
    block.attn.l_proj.weight.mul_(proj_gain)
  block.eval()
  t = lambda x: x.detach().numpy()
  attn = {name: {'kernel': t(getattr(block.attn, name).weight).T,
                 'bias': t(getattr(block.attn, name).bias)}
          for name in ['v_proj', 'l_proj', 'values_v_proj', 'values_l_proj',
                       'out_v_proj', 'out_l_proj']}
  params = {
      'layer_norm_v': {'scale': t(block.layer_norm_v.weight), 'bias': t(block.layer_norm_v.bias)},
      'layer_norm_l': {'scale': t(block.layer_norm_l.weight), 'bias': t(block.layer_norm_l.bias)},
      'gamma_v': t(block.gamma_v),
      'gamma_l': t(block.gamma_l),
      'attn': attn,
  }
  return block, {'params': jax.tree.map(jnp.asarray, params)}


def _inputs(seed, b=2, nv=40, t=7):
  rng = np.random.default_rng(seed)
  visual = rng.normal(size=(b, nv, V_DIM)).astype(np.float32)
  text = rng.normal(size=(b, t, L_DIM)).astype(np.float32)
  mask = np.ones((b, t), np.int64)
  mask[1, 4:] = 0  # second sentence has 3 padded tokens
  return visual, text, mask


def _compare(block, params, visual, text, mask):
  with torch.no_grad():
    ref_v, ref_l, logits = block(torch.from_numpy(visual), torch.from_numpy(text),
                                 torch.from_numpy(mask))
  out_v, out_l = BiAttentionBlock().apply(params, visual, text, mask)
  assert out_v.shape == visual.shape and out_l.shape == text.shape
  np.testing.assert_allclose(np.asarray(out_v), ref_v.numpy(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(out_l), ref_l.numpy(), rtol=RTOL, atol=ATOL)
  return logits


def test_fusion_matches_torch_reference_with_text_padding():
  block, params = _reference_and_params(seed=0)
  _compare(block, params, *_inputs(seed=0))


def test_fusion_matches_torch_reference_when_logits_clamp():
  # Projections scaled so that raw logits exceed the +-5e4 clamp and the
  # max-subtracted text-direction logits fall below -5e4.
  block, params = _reference_and_params(seed=1, proj_gain=60.0)
  visual, text, mask = _inputs(seed=1)
  logits = _compare(block, params, visual, text, mask)
  assert float(logits.abs().max()) > 50000.0
  shifted = logits.transpose(1, 2) - logits.transpose(1, 2).max(-1, keepdim=True)[0]
  assert float(shifted.min()) < -50000.0


def test_padded_text_tokens_do_not_reach_visual_tokens():
  _, params = _reference_and_params(seed=2)
  visual, text, mask = _inputs(seed=2)
  changed = text.copy()
  changed[1, 4:] = 100.0 * np.random.default_rng(3).normal(size=changed[1, 4:].shape)
  out_a, _ = BiAttentionBlock().apply(params, visual, text, mask)
  out_b, _ = BiAttentionBlock().apply(params, visual, changed, mask)
  np.testing.assert_allclose(np.asarray(out_a), np.asarray(out_b), rtol=0, atol=1e-6)


def test_init_layer_scale_and_parameter_shapes():
  visual, text, mask = _inputs(seed=4, nv=5)
  params = BiAttentionBlock().init(jax.random.PRNGKey(0), visual, text, mask)['params']
  np.testing.assert_allclose(np.asarray(params['gamma_v']), np.full((V_DIM,), 1 / 6), rtol=1e-7)
  np.testing.assert_allclose(np.asarray(params['gamma_l']), np.full((L_DIM,), 1 / 6), rtol=1e-7)
  assert params['attn']['v_proj']['kernel'].shape == (V_DIM, EMBED)
  assert params['attn']['l_proj']['kernel'].shape == (L_DIM, EMBED)
  assert params['attn']['out_l_proj']['kernel'].shape == (EMBED, L_DIM)
  assert not np.any(np.asarray(params['attn']['out_v_proj']['bias']))


def test_attention_dropout_only_in_training():
  _, params = _reference_and_params(seed=5)
  visual, text, mask = _inputs(seed=5)
  block = BiAttentionBlock()
  eval_v, _ = block.apply(params, visual, text, mask, deterministic=True)
  train_v, _ = block.apply(params, visual, text, mask, deterministic=False,
                           rngs={'dropout': jax.random.PRNGKey(1)})
  assert np.abs(np.asarray(eval_v) - np.asarray(train_v)).max() > 1e-3


def test_bad_shapes_raise_clear_error():
  visual, text, mask = _inputs(seed=6)
  try:
    BiAttentionBlock().init(jax.random.PRNGKey(0), visual, text, mask[:, :3])
  except ValueError as err:
    assert 'text_mask' in str(err)
  else:
    raise AssertionError('expected ValueError for a text mask of the wrong length')
