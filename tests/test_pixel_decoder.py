"""Tests for hiseg_jax.pixel_decoder against a torch Mask2Former pixel-decoder transcription."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiseg_jax.pixel_decoder import MSDeformAttnPixelDecoder
from torch_references import TorchMSDeformAttn, torch_sine_position_encoding

TINY = dict(conv_dim=32, mask_dim=16, num_encoder_layers=2, ffn_dim=64, num_heads=4,
            num_points=2, norm_groups=8)
CHANNELS = {'stem': 6, 'res2': 8, 'res3': 12, 'res4': 16, 'res5': 24}
STRIDES = {'stem': 2, 'res2': 4, 'res3': 8, 'res4': 16, 'res5': 32}
# float32 through convs, GroupNorm/LayerNorm and two deformable layers (observed ~2e-6 on
# outputs of magnitude ~3): 1e-5 absolute.
ATOL = 1e-5


class _TorchEncoderLayer(torch.nn.Module):
  """Transcription of MSDeformAttnTransformerEncoderLayer (post-norm, ReLU FFN, no dropout)."""

  def __init__(self, d, ffn, heads, levels, points):
    super().__init__()
    self.self_attn = TorchMSDeformAttn(d, levels, heads, points)
    self.norm1 = torch.nn.LayerNorm(d)
    self.linear1 = torch.nn.Linear(d, ffn)
    self.linear2 = torch.nn.Linear(ffn, d)
    self.norm2 = torch.nn.LayerNorm(d)

  def forward(self, src, pos, ref, shapes):
    src = self.norm1(src + self.self_attn(src + pos, ref, src, shapes))
    return self.norm2(src + self.linear2(torch.relu(self.linear1(src))))


class _TorchPixelDecoder(torch.nn.Module):
  """Transcription of Mask2Former's MSDeformAttnPixelDecoder.forward_features (NCHW).

  With fine_mask_features, our stride-2 level: a 1x1 conv of
  ReLU(GN(1x1 conv(stem)) + upsampled stride-4 map).
  """

  def __init__(self, conv_dim, mask_dim, num_encoder_layers, ffn_dim, num_heads, num_points,
               norm_groups, fine_mask_features=False):
    super().__init__()
    self.fine = fine_mask_features
    self.d = conv_dim
    self.input_proj = torch.nn.ModuleList([
        torch.nn.Sequential(torch.nn.Conv2d(CHANNELS[f], conv_dim, 1),
                            torch.nn.GroupNorm(norm_groups, conv_dim))
        for f in ('res5', 'res4', 'res3')])
    self.level_embed = torch.nn.Parameter(torch.randn(3, conv_dim))
    self.layers = torch.nn.ModuleList([
        _TorchEncoderLayer(conv_dim, ffn_dim, num_heads, 3, num_points)
        for _ in range(num_encoder_layers)])
    self.lateral = torch.nn.Conv2d(CHANNELS['res2'], conv_dim, 1, bias=False)
    self.lateral_norm = torch.nn.GroupNorm(norm_groups, conv_dim)
    self.output = torch.nn.Conv2d(conv_dim, conv_dim, 3, padding=1, bias=False)
    self.output_norm = torch.nn.GroupNorm(norm_groups, conv_dim)
    self.mask_features = torch.nn.Conv2d(conv_dim, mask_dim, 1)
    if fine_mask_features:
      self.stem_lateral = torch.nn.Conv2d(CHANNELS['stem'], conv_dim, 1, bias=False)
      self.stem_lateral_norm = torch.nn.GroupNorm(norm_groups, conv_dim)
      self.fine_mask_features = torch.nn.Conv2d(conv_dim, mask_dim, 1)

  def forward(self, features):
    srcs, pos, shapes = [], [], []
    for lvl, f in enumerate(('res5', 'res4', 'res3')):
      x = features[f]
      b, _, h, w = x.shape
      shapes.append((h, w))
      srcs.append(self.input_proj[lvl](x).flatten(2).transpose(1, 2))
      pe = torch.from_numpy(torch_sine_position_encoding(
          torch.zeros(b, h, w, dtype=torch.bool), self.d // 2, 10000., True, 2 * np.pi))
      pos.append(pe.flatten(1, 2) + self.level_embed[lvl].view(1, 1, -1))
    src, pos = torch.cat(srcs, 1), torch.cat(pos, 1)
    refs = []
    for h, w in shapes:
      ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h),
                                    torch.linspace(0.5, w - 0.5, w), indexing='ij')
      refs.append(torch.stack((ref_x.reshape(-1)[None] / w, ref_y.reshape(-1)[None] / h), -1))
    ref = torch.cat(refs, 1)[:, :, None].repeat(src.shape[0], 1, 3, 1)
    for layer in self.layers:
      src = layer(src, pos, ref, shapes)
    outs = []
    for z, (h, w) in zip(src.split([h * w for h, w in shapes], dim=1), shapes):
      outs.append(z.transpose(1, 2).reshape(src.shape[0], -1, h, w))
    cur = self.lateral_norm(self.lateral(features['res2']))
    y = cur + F.interpolate(outs[-1], size=cur.shape[-2:], mode='bilinear', align_corners=False)
    y = torch.relu(self.output_norm(self.output(y)))
    fine = None
    if self.fine:
      cur = self.stem_lateral_norm(self.stem_lateral(features['stem']))
      fine = self.fine_mask_features(torch.relu(
          cur + F.interpolate(y, size=cur.shape[-2:], mode='bilinear', align_corners=False)))
    return self.mask_features(y), outs, fine


def _convert(ref):
  """Torch pixel-decoder weights -> Flax params of MSDeformAttnPixelDecoder."""
  t = lambda x: jnp.asarray(x.detach().numpy())
  conv = lambda m: ({'kernel': t(m.weight).transpose(2, 3, 1, 0)}
                    | ({'bias': t(m.bias)} if m.bias is not None else {}))
  dense = lambda m: {'kernel': t(m.weight).T, 'bias': t(m.bias)}
  norm = lambda m: {'scale': t(m.weight), 'bias': t(m.bias)}
  params = {'level_embed': t(ref.level_embed), 'lateral_conv': conv(ref.lateral),
            'lateral_norm': norm(ref.lateral_norm), 'output_conv': conv(ref.output),
            'output_norm': norm(ref.output_norm), 'mask_features': conv(ref.mask_features)}
  if ref.fine:
    params['stem_lateral_conv'] = conv(ref.stem_lateral)
    params['stem_lateral_norm'] = norm(ref.stem_lateral_norm)
    params['fine_mask_features'] = conv(ref.fine_mask_features)
  for i, proj in enumerate(ref.input_proj):
    params[f'input_proj_{i}_conv'] = conv(proj[0])
    params[f'input_proj_{i}_norm'] = norm(proj[1])
  for i, layer in enumerate(ref.layers):
    attn = layer.self_attn
    params[f'encoder_layer_{i}'] = {
        'self_attn': {n: dense(getattr(attn, n)) for n in
                      ('sampling_offsets', 'attention_weights', 'value_proj', 'output_proj')},
        'norm1': norm(layer.norm1), 'linear1': dense(layer.linear1),
        'linear2': dense(layer.linear2), 'norm2': norm(layer.norm2)}
  return {'params': params}


def _features(batch, size, seed):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=(batch, size // s, size // s, CHANNELS[k])).astype(np.float32)
          for k, s in STRIDES.items()}


@pytest.mark.parametrize('fine', [False, True])
def test_pixel_decoder_matches_mask2former_transcription(fine):
  torch.manual_seed(0)
  ref = _TorchPixelDecoder(**TINY, fine_mask_features=fine).eval()
  with torch.no_grad():  # random weights everywhere, including the zero-initialised ones
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  feats = _features(2, 64, 0)
  with torch.no_grad():
    ref_mask, ref_scales, ref_fine = ref({k: torch.from_numpy(v.transpose(0, 3, 1, 2))
                                for k, v in feats.items()})
  model = MSDeformAttnPixelDecoder(**TINY, fine_mask_features=fine)
  variables = _convert(ref)
  shapes = jax.eval_shape(model.init, jax.random.key(0), feats)
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, variables)
  mask_features, multi_scale, fine_features = jax.jit(model.apply)(variables, feats)
  assert mask_features.shape == (2, 16, 16, 16)
  if fine:
    assert fine_features.shape == (2, 32, 32, 16)
    np.testing.assert_allclose(np.asarray(fine_features),
                               ref_fine.numpy().transpose(0, 2, 3, 1), atol=ATOL)
  else:
    assert fine_features is None
  assert [x.shape for x in multi_scale] == [(2, 2, 2, 32), (2, 4, 4, 32), (2, 8, 8, 32)]
  np.testing.assert_allclose(np.asarray(mask_features), ref_mask.numpy().transpose(0, 2, 3, 1),
                             atol=ATOL)
  for ours, theirs in zip(multi_scale, ref_scales):
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy().transpose(0, 2, 3, 1), atol=ATOL)


def test_pixel_decoder_gradients_are_finite_and_nonzero():
  config = TINY | dict(num_encoder_layers=1)
  model = MSDeformAttnPixelDecoder(**config)
  feats = _features(1, 64, 1)
  variables = _convert(_TorchPixelDecoder(**config))

  def loss(params, f):
    mask_features, multi_scale, _ = model.apply({'params': params}, f)
    return jnp.mean(mask_features ** 2) + sum(jnp.mean(x ** 2) for x in multi_scale)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables['params'], feats)
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert all(np.abs(np.asarray(grads[1][k])).sum() > 0 for k in STRIDES if k != 'stem')
  assert not np.asarray(grads[1]['stem']).any()  # read only with fine_mask_features


def test_pixel_decoder_rejects_bad_features():
  model = MSDeformAttnPixelDecoder(**TINY)
  feats = _features(1, 64, 0)
  with pytest.raises(ValueError, match="lack \\['res4'\\]"):
    jax.eval_shape(model.init, jax.random.key(0), {k: v for k, v in feats.items() if k != 'res4'})
  feats['res3'] = feats['res3'][:, :4]
  with pytest.raises(ValueError, match="features\\['res3'\\] shape"):
    jax.eval_shape(model.init, jax.random.key(0), feats)
  feats = _features(1, 64, 0)
  with pytest.raises(ValueError, match="lack \\['stem'\\]"):
    jax.eval_shape(MSDeformAttnPixelDecoder(**TINY, fine_mask_features=True).init,
                   jax.random.key(0), {k: v for k, v in feats.items() if k != 'stem'})
