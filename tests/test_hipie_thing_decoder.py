"""Tests for hiseg_jax.hipie.thing_decoder against PyTorch transcriptions of HIPIE's thing decoder.

Transcribed (facts, not code): `DeformableTransformerDecoderLayer` (DINO order; torch's own
`nn.MultiheadAttention` is used), `prepare_for_cdn`'s attention-mask loop, `inverse_sigmoid`,
`get_sine_pos_embed`, `gen_encoder_output_proposals`, `MaskHeadSmallConv.forward` and the box
refinement of `DDETRSegmUniDN.coco_forward` (`sigmoid(bbox_embed(hs) + inverse_sigmoid(ref))`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiseg_jax.hipie.decoder_layer import DeformableDecoderLayer
from hiseg_jax.hipie.fused_encoder import FusedEncoder
from hiseg_jax.hipie.query_utils import cdn_attention_mask
from hiseg_jax.hipie.query_utils import encoder_output_proposals
from hiseg_jax.hipie.query_utils import inverse_sigmoid
from hiseg_jax.hipie.query_utils import sine_box_embedding
from hiseg_jax.hipie.thing_decoder import MaskHeadSmallConv
from hiseg_jax.hipie.thing_decoder import ThingDecoder
from hiseg_jax.hipie.thing_decoder import cdn_noised_boxes
from hiseg_jax.hipie.thing_decoder import cdn_num_groups
from hiseg_jax.hipie.thing_decoder import cdn_query_gt
from torch_references import TorchMSDeformAttn

TINY = dict(d_model=32, num_heads=4, ffn_dim=64, num_decoder_layers=2, num_points=2,
            num_queries=20, num_bg_queries=3, dn_number=6, text_dim=48)
# The encoder in front of the decoder; no fusion dropout, so that training mode is
# deterministic apart from the denoising box noise.
ENCODER = dict(d_model=32, num_heads=4, ffn_dim=64, num_layers=2, num_points=2, text_dim=48,
               fusion_embed_dim=64, fusion_heads=4, fusion_dropout=0.0, norm_groups=8)
CHANNELS = {'res3': 12, 'res4': 16, 'res5': 24}
STRIDES = {'res3': 8, 'res4': 16, 'res5': 32}
B, SIZE, T, N = 2, 64, 7, 3
# One float32 decoder layer (attention, bilinear sampling, LayerNorms) of width 32: observed
# ~1e-6; 1e-5 absolute.
LAYER_ATOL = 1e-5
# Box refinement recomputed from captured hidden states: float32 sigmoid/log, 1e-5 absolute.
BOX_ATOL = 1e-5


def torch_inverse_sigmoid(x, eps=1e-5):
  """The reference's util.misc.inverse_sigmoid."""
  x = x.clamp(min=0, max=1)
  return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def torch_sine_pos_embed(pos, num_pos_feats):
  """The reference's get_sine_pos_embed (exchange_xy=True)."""
  dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
  dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode='floor') / num_pos_feats)

  def sine(x):
    x = x * 2 * np.pi / dim_t
    return torch.stack((x[:, :, 0::2].sin(), x[:, :, 1::2].cos()), dim=3).flatten(2)

  res = [sine(x) for x in pos.split([1] * pos.shape[-1], dim=-1)]
  res[0], res[1] = res[1], res[0]
  return torch.cat(res, dim=2)


def torch_cdn_attention_mask(dn_number, single_padding, num_queries):
  """The attention-mask part of prepare_for_cdn (dp_number 0); True = blocked."""
  pad_size = single_padding * 2 * dn_number
  tgt_size = pad_size + num_queries
  attn_mask = torch.ones(tgt_size, tgt_size) < 0
  attn_mask[pad_size:, :pad_size] = True
  for i in range(dn_number):
    if i == 0:
      attn_mask[single_padding * 2 * i:single_padding * 2 * (i + 1),
                single_padding * 2 * (i + 1):pad_size] = True
    if i == dn_number - 1:
      attn_mask[single_padding * 2 * i:single_padding * 2 * (i + 1), :single_padding * i * 2] = True
    else:
      attn_mask[single_padding * 2 * i:single_padding * 2 * (i + 1),
                single_padding * 2 * (i + 1):pad_size] = True
      attn_mask[single_padding * 2 * i:single_padding * 2 * (i + 1), :single_padding * 2 * i] = True
  return attn_mask


def torch_encoder_output_proposals(padding_mask, shapes):
  """The box part of gen_encoder_output_proposals."""
  n = padding_mask.shape[0]
  proposals, cur = [], 0
  for lvl, (h, w) in enumerate(shapes):
    mask = padding_mask[:, cur:cur + h * w].view(n, h, w, 1)
    valid_h = torch.sum(~mask[:, :, 0, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :, 0], 1)
    grid_y, grid_x = torch.meshgrid(torch.linspace(0, h - 1, h), torch.linspace(0, w - 1, w),
                                    indexing='ij')
    grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
    scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
    grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
    wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
    proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
    cur += h * w
  out = torch.cat(proposals, 1)
  valid = ((out > 0.01) & (out < 0.99)).all(-1, keepdim=True)
  out = torch.log(out / (1 - out))
  out = out.masked_fill(padding_mask.unsqueeze(-1), float('inf'))
  return out.masked_fill(~valid, float('inf'))


class _TorchDecoderLayer(torch.nn.Module):
  """DeformableTransformerDecoderLayer of deformable_transformer_dino.py (dropout 0)."""

  def __init__(self, d, ffn, heads, levels, points):
    super().__init__()
    self.cross_attn = TorchMSDeformAttn(d, levels, heads, points)
    self.norm1 = torch.nn.LayerNorm(d)
    self.self_attn = torch.nn.MultiheadAttention(d, heads, dropout=0.0)
    self.norm2 = torch.nn.LayerNorm(d)
    self.linear1 = torch.nn.Linear(d, ffn)
    self.linear2 = torch.nn.Linear(ffn, d)
    self.norm3 = torch.nn.LayerNorm(d)

  def forward(self, tgt, query_pos, ref, src, shapes, padding_mask, attn_mask):
    q = k = tgt + query_pos
    tgt2 = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1),
                          attn_mask=attn_mask)[0].transpose(0, 1)
    tgt = self.norm2(tgt + tgt2)
    tgt2 = self.cross_attn(tgt + query_pos, ref, src, shapes, padding_mask)
    tgt = self.norm1(tgt + tgt2)
    return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class _TorchMaskHeadSmallConv(torch.nn.Module):
  """MaskHeadSmallConv (no FPN inputs, no RAFT)."""

  def __init__(self, dim):
    super().__init__()
    conv = lambda i, o: torch.nn.Conv2d(i, o, 3, padding=1)
    self.lay3, self.lay4, self.jia_dcn = conv(dim, dim), conv(dim, dim), conv(dim, dim)
    self.lay1, self.lay2 = conv(dim, dim // 4), conv(dim // 4, dim // 32)

  def forward(self, x):
    fused = F.relu(self.lay3(x[-1]))
    fused = F.relu(self.lay4(x[-2] + F.interpolate(fused, size=x[-2].shape[-2:], mode='nearest')))
    fused = x[-3] + F.interpolate(fused, size=x[-3].shape[-2:], mode='nearest')
    fused = F.relu(self.jia_dcn(fused))
    return F.relu(self.lay2(F.relu(self.lay1(fused))))


def _t(x):
  return jnp.asarray(x.detach().numpy())


def _dense(m):
  return {'kernel': _t(m.weight).T, 'bias': _t(m.bias)}


def _norm(m):
  return {'scale': _t(m.weight), 'bias': _t(m.bias)}


def _conv(m):
  return {'kernel': _t(m.weight).transpose(2, 3, 1, 0), 'bias': _t(m.bias)}


def _perturb(tree, seed, scale=0.1):
  """Random weights everywhere: N(0, scale) offsets on every leaf (LayerNorm scales around 1)."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [jnp.asarray(np.asarray(x) + scale * rng.normal(
      size=x.shape).astype(np.float32)) for x in leaves])


def test_decoder_layer_matches_torch_transcription():
  d, heads, levels, points, q = 32, 4, 3, 2, 9
  shapes = ((6, 6), (3, 3), (2, 2))
  s = sum(h * w for h, w in shapes)
  torch.manual_seed(0)
  ref = _TorchDecoderLayer(d, 64, heads, levels, points).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  rng = np.random.default_rng(0)
  tgt, pos = (rng.normal(size=(2, q, d)).astype(np.float32) for _ in range(2))
  src = rng.normal(size=(2, s, d)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.2, 0.8, (2, q, 1, 2)), rng.uniform(0.1, 0.4, (2, q, 1, 2))],
                         -1).astype(np.float32) * np.ones((1, 1, levels, 1), np.float32)
  padding = np.zeros((2, s), bool)
  padding[1, :36] = np.arange(36) % 6 >= 4  # last two columns of level 0 padded
  allowed = cdn_attention_mask(2, 4, q - 8)  # two groups of 2 + 2 queries, 1 matching query
  with torch.no_grad():
    expected = ref(*(torch.from_numpy(x) for x in (tgt, pos, boxes, src)), shapes,
                   torch.from_numpy(padding), torch.from_numpy(~allowed))
  w = ref.self_attn.in_proj_weight.detach().numpy()
  bias = ref.self_attn.in_proj_bias.detach().numpy()
  self_attn = {name: {'kernel': jnp.asarray(w[i * d:(i + 1) * d].T),
                      'bias': jnp.asarray(bias[i * d:(i + 1) * d])}
               for i, name in enumerate(('q_proj', 'k_proj', 'v_proj'))}
  self_attn['out_proj'] = _dense(ref.self_attn.out_proj)
  params = {'self_attn': self_attn, 'norm2': _norm(ref.norm2), 'norm1': _norm(ref.norm1),
            'cross_attn': {n: _dense(getattr(ref.cross_attn, n)) for n in
                           ('sampling_offsets', 'attention_weights', 'value_proj', 'output_proj')},
            'linear1': _dense(ref.linear1), 'linear2': _dense(ref.linear2),
            'norm3': _norm(ref.norm3)}
  layer = DeformableDecoderLayer(d_model=d, num_heads=heads, ffn_dim=64, num_levels=levels,
                                 num_points=points)
  mask = jnp.broadcast_to(jnp.asarray(allowed), (2, q, q))
  shapes_tree = jax.eval_shape(
      lambda k: layer.init(k, tgt, pos, boxes, src, shapes, padding, mask), jax.random.key(0))
  assert (jax.tree.map(lambda x: x.shape, shapes_tree['params'])
          == jax.tree.map(lambda x: x.shape, params))
  out = jax.jit(layer.apply, static_argnums=5)({'params': params}, tgt, pos, boxes, src, shapes,
                                               padding, mask)
  np.testing.assert_allclose(np.asarray(out), expected.numpy(), atol=LAYER_ATOL)


@pytest.mark.parametrize('num_slots,num_other', [(1, 5), (3, 4), (7, 2), (60, 3)])
def test_cdn_attention_mask_equals_reference_construction(num_slots, num_other):
  groups = cdn_num_groups(100, num_slots)
  expected = torch_cdn_attention_mask(groups, num_slots, num_other).numpy()
  np.testing.assert_array_equal(cdn_attention_mask(groups, 2 * num_slots, num_other), ~expected)
  assert groups == max(1, 200 // (2 * num_slots))


def test_cdn_noise_positive_and_negative_ranges_and_gt_layout():
  boxes = jnp.asarray([[[0.5, 0.5, 0.2, 0.1], [0.4, 0.6, 0.1, 0.2]]])  # no clipping at [0, 1]
  noised = np.asarray(jax.jit(cdn_noised_boxes, static_argnums=(2, 3))(
      jax.random.key(3), boxes, 4, 1.0))  # [1, 8, 2, 4]
  xyxy = lambda x: np.concatenate([x[..., :2] - x[..., 2:] / 2, x[..., :2] + x[..., 2:] / 2], -1)
  shift = np.abs(xyxy(noised) - xyxy(np.asarray(boxes))[:, None])  # [1, 8, 2, 4]
  half = np.concatenate([np.asarray(boxes)[..., 2:] / 2] * 2, -1)[:, None]  # [1, 1, 2, 4]
  ratio = shift / half
  assert (ratio[:, 0::2] <= 1 + 1e-5).all() and (ratio[:, 1::2] >= 1 - 1e-5).all()
  assert (ratio[:, 1::2] <= 2 + 1e-5).all()
  np.testing.assert_array_equal(cdn_query_gt(2, 3), [0, 1, 2, -1, -1, -1, 0, 1, 2, -1, -1, -1])


def test_inverse_sigmoid_and_sine_box_embedding_match_torch():
  x = np.array([-0.5, 0.0, 1e-7, 0.3, 0.999999, 1.0, 1.5], np.float32)
  np.testing.assert_allclose(np.asarray(inverse_sigmoid(jnp.asarray(x))),
                             torch_inverse_sigmoid(torch.from_numpy(x)).numpy(), atol=1e-6)
  boxes = np.random.default_rng(0).uniform(size=(2, 5, 4)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(sine_box_embedding(jnp.asarray(boxes), 16)),
                             torch_sine_pos_embed(torch.from_numpy(boxes), 16).numpy(), atol=1e-5)


def test_encoder_output_proposals_match_torch():
  shapes = ((8, 8), (4, 4), (2, 2), (1, 1))
  padding = np.zeros((2, 85), bool)
  padding[1, :64] = (np.arange(64) // 8) >= 5  # rows 5..7 of level 0 padded
  padding[1, 64:80] = (np.arange(16) // 4) >= 3
  padding[1, 80:84] = (np.arange(4) // 2) >= 2
  ours, keep = jax.jit(encoder_output_proposals, static_argnums=1)(jnp.asarray(padding), shapes)
  theirs = torch_encoder_output_proposals(torch.from_numpy(padding), shapes).numpy()
  np.testing.assert_array_equal(np.isinf(np.asarray(ours)), np.isinf(theirs))
  np.testing.assert_array_equal(np.asarray(keep), ~np.isinf(theirs).any(-1))
  finite = np.isfinite(theirs)
  np.testing.assert_allclose(np.asarray(ours)[finite], theirs[finite], atol=1e-5)


def test_mask_head_small_conv_matches_torch():
  torch.manual_seed(1)
  ref = _TorchMaskHeadSmallConv(64).eval()
  rng = np.random.default_rng(1)
  feats = [rng.normal(size=(2, h, h, 64)).astype(np.float32) for h in (7, 4, 2)]
  with torch.no_grad():
    expected = ref([torch.from_numpy(f.transpose(0, 3, 1, 2)) for f in feats])
  params = {n: _conv(getattr(ref, n)) for n in ('lay3', 'lay4', 'jia_dcn', 'lay1', 'lay2')}
  out = jax.jit(MaskHeadSmallConv(64).apply)({'params': params}, *feats)
  assert out.shape == (2, 7, 7, 2)
  np.testing.assert_allclose(np.asarray(out), expected.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def _inputs(seed):
  """Images 0 and 1 are identical apart from their denoising targets; image 2 differs."""
  rng = np.random.default_rng(seed)
  feats = {}
  for k, s in STRIDES.items():
    x = rng.normal(size=(B, SIZE // s, SIZE // s, CHANNELS[k]))
    feats[k] = jnp.asarray(np.concatenate([x[:1], x], 0), jnp.float32)  # [3, h, w, C]
  text = rng.normal(size=(B, T, TINY['text_dim']))
  text = jnp.asarray(np.concatenate([text[:1], text], 0), jnp.float32)
  text_mask = jnp.asarray(np.arange(T)[None] < np.array([[5], [5], [7]]))
  centres = rng.uniform(0.3, 0.7, size=(B + 1, N, 2))
  sizes = rng.uniform(0.1, 0.3, size=(B + 1, N, 2))
  positive = np.zeros((B + 1, N, T), np.float32)
  positive[:, 0, 1:3] = positive[:, 1, 3] = 1.0
  dn = {'boxes': jnp.asarray(np.concatenate([centres, sizes], -1), jnp.float32),
        'valid': jnp.asarray([[True, True, False], [True, False, False], [True, True, True]]),
        'positive_map': jnp.asarray(positive)}
  image_sizes = jnp.asarray([[64, 48], [64, 48], [56, 64]])
  return feats, text, text_mask, dn, image_sizes


class _ThingBranch(nn.Module):
  """FusedEncoder ('encoder') then ThingDecoder ('decoder'), chained as HIPIEModel does."""
  decoder: dict

  @nn.compact
  def __call__(self, feats, text, text_mask, dn=None, sizes=None, train=False, grounding=False):
    encoded, shapes = FusedEncoder(**ENCODER, name='encoder')(feats, text, text_mask, sizes,
                                                              not train)
    return ThingDecoder(**self.decoder, name='decoder')(encoded, shapes, text, text_mask, dn,
                                                        sizes, train, grounding)


@pytest.fixture(scope='module')
def run():
  """One compile: training-mode outputs with denoising, captured decoder states, gradients."""
  model = _ThingBranch(TINY)
  feats, text, text_mask, dn, sizes = _inputs(0)
  key = jax.random.key(0)
  shapes = jax.eval_shape(lambda k: model.init({'params': k, 'dropout': k}, feats, text,
                                               text_mask, dn, sizes), key)
  params = _perturb(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes['params']), 0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 1.0 if 'scale' in jax.tree_util.keystr(path) else x, params)
  capture = lambda mdl, _: mdl.name is not None and mdl.name.startswith('decoder_layer')

  def forward(p):
    out, state = model.apply({'params': p}, feats, text, text_mask, dn, sizes, train=True,
                             rngs={'dropout': jax.random.key(1)},
                             capture_intermediates=capture, mutable=['intermediates'])
    return out, state['intermediates']['decoder']

  def loss(p):
    out, inter = forward(p)
    terms = [out['logits'], out['boxes'], out['ious'], out['masks'], out['enc']['boxes'],
             out['dn']['masks'], out['dn']['logits'], out['aux'][0]['boxes']]
    total = sum(jnp.where(jnp.abs(x) < 1e4, x, 0.0).astype(jnp.float32).sum() for x in terms)
    return total, (out, inter)

  (_, (out, inter)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return dict(params=params, out=out, inter=inter, grads=grads)


def test_thing_decoder_output_contract_shapes(run):
  out = run['out']
  b = B + 1
  q, p = TINY['num_queries'], 113  # (1 + 2) * 8 + 8 * 8 + 8 + 8 + 8 + 1 for d/32 = 1 channel
  groups = cdn_num_groups(TINY['dn_number'], N)
  dn = out['dn']
  assert out['logits'].shape == (b, q, T) and out['boxes'].shape == (b, q, 4)
  assert out['ious'].shape == (b, q) and out['masks'].shape == (b, q, 16, 16)
  assert out['mask_params'].shape == (b, q, p) and out['mask_locations'].shape == (b, q, 2)
  assert len(out['aux']) == 1 and out['aux'][0]['masks'].shape == (b, q, 16, 16)
  assert dn['aux'][0]['masks'].shape == (b, 12, 16, 16) and 'aux' not in out['bg']
  assert out['enc']['logits'].shape == (b, 85, 1) and out['enc']['boxes'].shape == (b, 85, 4)
  assert int(dn['groups']) == groups == 2 and int(dn['padding_size']) == 2 * groups * N
  assert dn['logits'].shape == (b, 2 * groups * N, T) and dn['masks'].shape == (b, 12, 16, 16)
  assert out['bg']['boxes'].shape == (b, 3, 4)
  assert out['text'].shape == (b, T, TINY['text_dim']) and out['mask_feats'].shape == (b, 8, 8, 1)
  padded = np.asarray(out['logits'])[0, :, 5:]
  assert (padded == -5e4).all()


def test_denoising_queries_do_not_change_matching_queries(run):
  out = run['out']  # images 0 and 1 differ only in their denoising queries
  assert not np.allclose(np.asarray(out['dn']['boxes'][0]), np.asarray(out['dn']['boxes'][1]))
  for key in ('logits', 'boxes', 'ious', 'masks'):
    np.testing.assert_allclose(np.asarray(out[key][0]), np.asarray(out[key][1]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out['bg']['boxes'][0]), np.asarray(out['bg']['boxes'][1]),
                             atol=1e-5)


def test_two_stage_selects_top_k_by_objectness_logit(run):
  out = run['out']
  logits = np.asarray(out['enc']['logits'])[..., 0]  # [B, S]
  index = np.asarray(out['enc']['topk_index'])
  np.testing.assert_array_equal(index, np.argsort(-logits, axis=1, kind='stable')[:, :20])
  chosen = np.take_along_axis(np.asarray(out['enc']['boxes']), index[..., None], 1)  # [B, K, 4]
  np.testing.assert_allclose(np.asarray(out['aux'][0]['mask_locations']), chosen[..., :2],
                             atol=1e-6)


def test_box_refinement_step_matches_reference_arithmetic(run):
  out, params, inter = run['out'], run['params']['decoder'], run['inter']
  start = 2 * cdn_num_groups(TINY['dn_number'], N) * N + TINY['num_bg_queries']

  def torch_bbox_embed(name, hs):
    x = torch.from_numpy(np.array(hs))
    layers = params[name]
    for i in range(3):
      layer = layers[f'layers_{i}']
      x = x @ torch.from_numpy(np.array(layer['kernel'])) + torch.from_numpy(
          np.array(layer['bias']))
      x = F.relu(x) if i < 2 else x
    return x

  index = np.asarray(out['enc']['topk_index'])
  init = torch.from_numpy(np.take_along_axis(np.asarray(out['enc']['boxes']), index[..., None], 1))
  previous = [init, torch.from_numpy(np.array(out['aux'][0]['boxes']))]
  reported = [out['aux'][0]['boxes'], out['boxes']]
  for lid in range(2):
    hs = inter[f'decoder_layer_{lid}']['__call__'][0][:, start:]  # [B, K, D]
    tmp = torch_bbox_embed(f'bbox_embed_{lid}', hs) + torch_inverse_sigmoid(previous[lid])
    np.testing.assert_allclose(np.asarray(reported[lid]), tmp.sigmoid().numpy(), atol=BOX_ATOL)
  np.testing.assert_allclose(np.asarray(out['mask_locations']),
                             np.asarray(out['aux'][0]['boxes'])[..., :2], atol=1e-6)


def test_gradients_are_finite_and_reach_every_module(run):
  grads = run['grads']
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(g)).all(), jax.tree_util.keystr(path)
  modules = [grads['encoder']] + [grads['decoder'][name] for name in (
      'tgt_embed', 'controller', 'mask_head', 'label_resizer_fc', 'enc_bbox', 'decoder_layer_1',
      'bbox_embed_0', 'class_embed_1', 'iou_head_1')]
  for i, tree in enumerate(modules):
    norm = sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(tree))
    assert norm > 0, i


def test_grounding_token_labels_and_final_layer_masks_only():
  feats, text, text_mask, dn, sizes = _inputs(1)
  model = _ThingBranch(TINY | dict(dn_label_source='tokens', num_bg_queries=0,
                                   masks_every_layer=False))
  key = jax.random.key(0)
  init = lambda k: model.init({'params': k, 'dropout': k}, feats, text, text_mask, dn, sizes)
  params = jax.eval_shape(init, key)
  out = jax.eval_shape(lambda p: model.apply(p, feats, text, text_mask, dn, sizes, train=True,
                                             grounding=True, rngs={'dropout': key}), params)
  assert out['logits'].shape == (B + 1, 20, 1) and out['text_mask'].shape == (B + 1, 1)
  assert out['bg'] is None and out['dn']['logits'].shape == (B + 1, 12, 1)
  assert 'masks' not in out['aux'][0] and out['masks'].shape == (B + 1, 20, 16, 16)
  plain = jax.eval_shape(lambda p: model.apply(p, feats, text, text_mask), params)
  assert plain['dn'] is None and plain['logits'].shape == (B + 1, 20, T)


def test_inference_computes_last_layer_masks_only():
  feats, text, text_mask, _, sizes = _inputs(1)
  model = _ThingBranch(TINY)  # masks_every_layer=True applies to training only
  params = jax.eval_shape(lambda k: model.init(k, feats, text, text_mask, None, sizes),
                          jax.random.key(0))
  out = jax.eval_shape(lambda p: model.apply(p, feats, text, text_mask, None, sizes), params)
  assert out['masks'].shape == (B + 1, 20, 16, 16)
  assert all('masks' not in aux for aux in out['aux'])


@pytest.mark.parametrize('bad', ['dn_keys', 'dn_shape', 'positive_map', 'sizes', 'queries'])
def test_bad_inputs_raise_clear_errors(bad):
  feats, text, text_mask, dn, sizes = _inputs(2)
  config = dict(TINY)
  if bad == 'dn_keys':
    del dn['valid']
  elif bad == 'dn_shape':
    dn['boxes'] = dn['boxes'][..., :3]
  elif bad == 'positive_map':
    config['dn_label_source'] = 'tokens'
    dn['positive_map'] = dn['positive_map'][..., :3]
  elif bad == 'sizes':
    sizes = sizes[:1]
  else:
    config['num_queries'] = 200
  model = _ThingBranch(config)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='ThingDecoder: |FusedEncoder: image_sizes'):
    jax.eval_shape(lambda k: model.init({'params': k, 'dropout': k}, feats, text, text_mask, dn,
                                        sizes), key)
