"""Tests for hiseg_jax.hipie.fused_encoder against a PyTorch transcription of HIPIE's encoder side.

Transcribed (facts, not code): `DeformableDETRDINO.input_proj` (1x1 conv + GN per backbone level,
3x3 stride-2 conv + GN on raw res5), the padding masks of `MaskedBackbone` / `coco_forward`
(nearest resize), Deformable DETR's `PositionEmbeddingSine` (normalised with the -0.5 offset),
`get_valid_ratio`, `DeformableTransformerEncoder.get_reference_points`, and
`DeformableTransformerEncoderVL.forward` with one fusion block before the first layer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiseg_jax.hipie.fused_encoder import FusedEncoder
from hiseg_jax.hipie.fused_encoder import detr_position_encoding
from hiseg_jax.hipie.fused_encoder import encoder_reference_points_padded
from hiseg_jax.hipie.fused_encoder import level_valid_masks
from hiseg_jax.hipie.fused_encoder import valid_ratios_of
from test_hipie_fusion import TorchBiAttentionBlock
from torch_references import TorchMSDeformAttn

TINY = dict(d_model=32, num_heads=4, ffn_dim=64, num_layers=2, num_levels=4, num_points=2,
            norm_groups=8, text_dim=48, fusion_embed_dim=64, fusion_heads=4)
CHANNELS = {'res3': 12, 'res4': 16, 'res5': 24}
STRIDES = {'res3': 8, 'res4': 16, 'res5': 32}
# float32 through GroupNorm, the fusion block and two deformable layers; observed ~3e-6 on
# outputs of magnitude ~3: 2e-5 absolute.
ATOL = 2e-5
# With padding the sampling locations are divided by the valid ratios and the positions by the
# valid extents, which rounds differently from torch; observed ~4e-5 (ignoring the padding
# mask gives ~0.6): 1e-4 absolute.
PADDED_ATOL = 1e-4


def torch_position_embedding(mask, num_pos_feats):
  """Deformable DETR `PositionEmbeddingSine(normalize=True)`; mask True at padding -> NCHW."""
  not_mask = ~mask
  y_embed = not_mask.cumsum(1, dtype=torch.float32)
  x_embed = not_mask.cumsum(2, dtype=torch.float32)
  scale = 2 * np.pi
  y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + 1e-6) * scale
  x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + 1e-6) * scale
  dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
  dim_t = 10000 ** (2 * (dim_t // 2) / num_pos_feats)
  pos_x = x_embed[:, :, :, None] / dim_t
  pos_y = y_embed[:, :, :, None] / dim_t
  pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
  pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
  return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def torch_level_masks(image_mask, shapes):
  """Masks of the levels: nearest resize of the image mask, the extra level from level 0."""
  masks = []
  for lvl, shape in enumerate(shapes):
    src = image_mask if lvl < 3 else masks[0]
    masks.append(F.interpolate(src[None].float(), size=shape).to(torch.bool)[0])
  return masks


def torch_valid_ratio(mask):
  """`get_valid_ratio`."""
  _, h, w = mask.shape
  valid_h = torch.sum(~mask[:, :, 0], 1)
  valid_w = torch.sum(~mask[:, 0, :], 1)
  return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def torch_reference_points(shapes, valid_ratios):
  """`DeformableTransformerEncoder.get_reference_points`."""
  points = []
  for lvl, (h, w) in enumerate(shapes):
    ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w),
                                  indexing='ij')
    ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
    ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
    points.append(torch.stack((ref_x, ref_y), -1))
  points = torch.cat(points, 1)
  return points[:, :, None] * valid_ratios[:, None]


class _TorchEncoderLayer(torch.nn.Module):
  """`DeformableTransformerEncoderLayer` (post-norm, ReLU FFN, dropout 0)."""

  def __init__(self, d, ffn, heads, levels, points):
    super().__init__()
    self.self_attn = TorchMSDeformAttn(d, levels, heads, points)
    self.norm1 = torch.nn.LayerNorm(d)
    self.linear1 = torch.nn.Linear(d, ffn)
    self.linear2 = torch.nn.Linear(ffn, d)
    self.norm2 = torch.nn.LayerNorm(d)

  def forward(self, src, pos, ref, shapes, padding_mask):
    src = self.norm1(src + self.self_attn(src + pos, ref, src, shapes, padding_mask))
    return self.norm2(src + self.linear2(torch.relu(self.linear1(src))))


class _TorchFusedEncoder(torch.nn.Module):
  """Input projections + masks + positions + VLFuse + encoder layers of HIPIE (NCHW inputs)."""

  def __init__(self, d_model, num_heads, ffn_dim, num_layers, num_levels, num_points,
               norm_groups, text_dim, fusion_embed_dim, fusion_heads):
    super().__init__()
    self.d = d_model
    chans = [CHANNELS[k] for k in ('res3', 'res4', 'res5')]
    self.input_proj = torch.nn.ModuleList(
        [torch.nn.Sequential(torch.nn.Conv2d(c, d_model, 1),
                             torch.nn.GroupNorm(norm_groups, d_model)) for c in chans]
        + [torch.nn.Sequential(torch.nn.Conv2d(chans[-1], d_model, 3, stride=2, padding=1),
                               torch.nn.GroupNorm(norm_groups, d_model))])
    self.level_embed = torch.nn.Parameter(torch.randn(num_levels, d_model))
    self.fusion = TorchBiAttentionBlock(d_model, text_dim, fusion_embed_dim, fusion_heads,
                                        init_values=1.0 / num_layers)
    self.layers = torch.nn.ModuleList(
        [_TorchEncoderLayer(d_model, ffn_dim, num_heads, num_levels, num_points)
         for _ in range(num_layers)])

  def forward(self, feats, image_mask, text, text_mask):
    srcs = [proj(feats[k]) for proj, k in zip(self.input_proj, ('res3', 'res4', 'res5'))]
    srcs.append(self.input_proj[3](feats['res5']))
    shapes = [tuple(s.shape[-2:]) for s in srcs]
    masks = torch_level_masks(image_mask, shapes)
    pos = [torch_position_embedding(m, self.d // 2) for m in masks]
    src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    lvl_pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1)
                         for i, p in enumerate(pos)], 1)
    padding = torch.cat([m.flatten(1) for m in masks], 1)
    ratios = torch.stack([torch_valid_ratio(m) for m in masks], 1)
    ref = torch_reference_points(shapes, ratios)
    for i, layer in enumerate(self.layers):
      if i == 0:
        src, text, _ = self.fusion(src, text, text_mask)
      src = layer(src, lvl_pos, ref, shapes, padding)
    return src, text


def _convert(ref):
  """Torch encoder weights -> Flax params of FusedEncoder."""
  t = lambda x: jnp.asarray(x.detach().numpy())
  conv = lambda m: {'kernel': t(m.weight).transpose(2, 3, 1, 0), 'bias': t(m.bias)}
  dense = lambda m: {'kernel': t(m.weight).T, 'bias': t(m.bias)}
  norm = lambda m: {'scale': t(m.weight), 'bias': t(m.bias)}
  fusion = ref.fusion
  params = {
      'level_embed': t(ref.level_embed),
      'fusion': {'layer_norm_v': norm(fusion.layer_norm_v),
                 'layer_norm_l': norm(fusion.layer_norm_l),
                 'gamma_v': t(fusion.gamma_v), 'gamma_l': t(fusion.gamma_l),
                 'attn': {n: dense(getattr(fusion.attn, n)) for n in
                          ('v_proj', 'l_proj', 'values_v_proj', 'values_l_proj', 'out_v_proj',
                           'out_l_proj')}}}
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


def _inputs(batch, size, seed, t=6):
  rng = np.random.default_rng(seed)
  feats = {k: rng.normal(size=(batch, size // s, size // s, CHANNELS[k])).astype(np.float32)
           for k, s in STRIDES.items()}
  text = rng.normal(size=(batch, t, TINY['text_dim'])).astype(np.float32)
  text_mask = np.ones((batch, t), bool)
  text_mask[1, 4:] = False
  return feats, text, text_mask


@pytest.mark.parametrize('sizes', [None, ((64, 40), (48, 64))])
def test_fused_encoder_matches_torch_transcription(sizes):
  torch.manual_seed(0)
  ref = _TorchFusedEncoder(**TINY).eval()
  with torch.no_grad():  # random weights everywhere, including the zero/constant-initialised ones
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  feats, text, text_mask = _inputs(2, 64, 0)
  image_mask = torch.zeros(2, 64, 64, dtype=torch.bool)
  for i, (h, w) in enumerate(sizes or ()):
    image_mask[i, h:] = image_mask[i, :, w:] = True
  with torch.no_grad():
    ref_mem, ref_text = ref({k: torch.from_numpy(v.transpose(0, 3, 1, 2))
                             for k, v in feats.items()},
                            image_mask, torch.from_numpy(text),
                            torch.from_numpy(text_mask.astype(np.int64)))
  model = FusedEncoder(**TINY)
  variables = _convert(ref)
  image_sizes = None if sizes is None else jnp.asarray(sizes, jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), feats, text, text_mask, image_sizes)
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, variables)
  out, spatial = jax.jit(model.apply)(variables, feats, text, text_mask, image_sizes)
  assert jax.tree.map(int, spatial) == ((8, 8), (4, 4), (2, 2), (1, 1))
  assert out['memory'].shape == (2, 85, 32) and out['text'].shape == (2, 6, 48)
  levels = torch_level_masks(image_mask, jax.tree.map(int, spatial))
  padding = torch.cat([m.flatten(1) for m in levels], 1)
  np.testing.assert_array_equal(np.asarray(out['padding_mask']), padding.numpy())
  assert bool(out['padding_mask'].any()) == (sizes is not None)
  if sizes is None:
    np.testing.assert_allclose(np.asarray(out['valid_ratios']), 1.0)
  atol = ATOL if sizes is None else PADDED_ATOL
  np.testing.assert_allclose(np.asarray(out['memory']), ref_mem.numpy(), atol=atol)
  np.testing.assert_allclose(np.asarray(out['text']), ref_text.numpy(), atol=atol)


def test_padding_masks_positions_and_reference_points_match_torch():
  sizes = np.array([[64, 40], [23, 64]], np.int32)  # (h, w) of the valid image on a 64 canvas
  shapes = ((8, 8), (4, 4), (2, 2), (1, 1))
  image_mask = torch.ones(2, 64, 64, dtype=torch.bool)
  for i, (h, w) in enumerate(sizes):
    image_mask[i, :h, :w] = False
  ref_masks = torch_level_masks(image_mask, shapes)
  masks = level_valid_masks(jnp.asarray(sizes), 2, (64, 64), shapes)
  for ours, theirs in zip(masks, ref_masks):
    np.testing.assert_array_equal(np.asarray(ours), ~theirs.numpy())
  for m, rm in zip(masks, ref_masks):
    # Padded cells get sin/cos of ~1e6-radian arguments in both (rounding noise): valid cells only.
    valid = np.asarray(m)
    theirs = torch_position_embedding(rm, 16).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(detr_position_encoding(m, 16))[valid], theirs[valid],
                               atol=1e-5)
  ratios = valid_ratios_of(masks)
  ref_ratios = torch.stack([torch_valid_ratio(m) for m in ref_masks], 1)
  np.testing.assert_allclose(np.asarray(ratios), ref_ratios.numpy(), atol=1e-7)
  assert float(ratios[1, 0, 1]) == 3 / 8  # 23 rows of 64 -> ceil(23 / 8) = 3 of 8 cells
  np.testing.assert_allclose(np.asarray(encoder_reference_points_padded(shapes, ratios)),
                             torch_reference_points(shapes, ref_ratios).numpy(), atol=1e-6)


def test_padded_canvas_marks_padding_and_keeps_shapes():
  feats, text, text_mask = _inputs(2, 64, 1)
  model = FusedEncoder(**(TINY | dict(num_layers=1, num_levels=3)))
  sizes = jnp.asarray([[64, 64], [30, 50]])
  variables = jax.jit(model.init)(jax.random.key(0), feats, text, text_mask, sizes)
  out, spatial = jax.jit(model.apply)(variables, feats, text, text_mask, sizes)
  assert jax.tree.map(int, spatial) == ((8, 8), (4, 4), (2, 2))
  pad = np.asarray(out['padding_mask'])
  assert not pad[0].any()
  assert pad[1, :64].reshape(8, 8)[4:].all() and not pad[1, :64].reshape(8, 8)[:4, :7].any()
  assert np.isfinite(np.asarray(out['memory'])).all()


@pytest.mark.parametrize('bad', ['missing', 'shape', 'text', 'sizes'])
def test_bad_inputs_raise_clear_errors(bad):
  feats, text, text_mask = _inputs(2, 64, 2)
  sizes = None
  if bad == 'missing':
    del feats['res4']
  elif bad == 'shape':
    feats['res4'] = feats['res4'][:, :3]
  elif bad == 'text':
    text_mask = text_mask[:, :3]
  else:
    sizes = jnp.zeros((3, 2), jnp.int32)
  with pytest.raises(ValueError, match='FusedEncoder'):
    jax.eval_shape(FusedEncoder(**TINY).init, jax.random.key(0), feats, text, text_mask, sizes)
