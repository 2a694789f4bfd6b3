"""Tests for HIPIE's stuff branch (hiseg_jax.hipie.stuff_pixel_decoder / stuff_decoder).

The PyTorch classes below are transcriptions, written for these tests, of HIPIE's MaskDINO
modules (berkeley-hipie/HIPIE: `MaskDINOEncoder.forward_features`, `MaskDINODecoder.forward`
with `prepare_for_dn`, `DeformableTransformerDecoderLayer`, `gen_encoder_output_proposals`,
`gen_sineembed_for_position`, `VL_Align` and `post_process_maskdino`'s head indexing).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiseg_jax.hipie.decoder_layer import DeformableDecoderLayer
from hiseg_jax.hipie.query_utils import cdn_attention_mask
from hiseg_jax.hipie.stuff_decoder import MaskDINODecoder
from hiseg_jax.hipie.stuff_decoder import StuffDecoder
from hiseg_jax.hipie.stuff_pixel_decoder import MaskDINOEncoder
from torch_references import TorchMSDeformAttn, torch_sine_position_encoding

D, FFN, HEADS, POINTS, GROUPS = 32, 64, 4, 2, 8
CHANNELS = {'res3': 12, 'res4': 16, 'res5': 24}
STRIDES = {'res3': 8, 'res4': 16, 'res5': 32}
TEXT_DIM = 24
# float32 through convs, norms and two deformable encoder layers (observed ~2e-6 on values ~3).
PIXEL_ATOL = 2e-5
# One decoder layer, float32 (observed ~1e-6 on values ~2).
LAYER_ATOL = 1e-5
# Whole decoder, float32, two layers + five prediction heads; logits and mask logits reach ~8
# (observed ~4e-6 absolute).
DECODER_ATOL = 3e-5


def _t2j(x):
  return jnp.asarray(x.detach().numpy())


def _dense(m):
  return {'kernel': _t2j(m.weight).T, 'bias': _t2j(m.bias)}


def _norm(m):
  return {'scale': _t2j(m.weight), 'bias': _t2j(m.bias)}


def _conv(m):
  return {'kernel': _t2j(m.weight).transpose(2, 3, 1, 0)} | (
      {'bias': _t2j(m.bias)} if m.bias is not None else {})


def _perturb(module, seed):
  """Adds noise to every parameter, so zero/constant initialisations hide nothing."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return module


class _TorchMLP(torch.nn.Module):
  """DETR MLP: Linear layers with ReLU between them."""

  def __init__(self, dims):
    super().__init__()
    self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

  def forward(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
    return x


def _convert_mlp(m):
  return {f'layers_{i}': _dense(layer) for i, layer in enumerate(m.layers)}


class _TorchEncoderLayer(torch.nn.Module):
  """MSDeformAttnTransformerEncoderLayer: deformable self-attention + FFN, post-norm."""

  def __init__(self, levels):
    super().__init__()
    self.self_attn = TorchMSDeformAttn(D, levels, HEADS, POINTS)
    self.norm1 = torch.nn.LayerNorm(D)
    self.linear1 = torch.nn.Linear(D, FFN)
    self.linear2 = torch.nn.Linear(FFN, D)
    self.norm2 = torch.nn.LayerNorm(D)

  def forward(self, src, pos, ref, shapes):
    src = self.norm1(src + self.self_attn(src + pos, ref, src, shapes))
    return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class _TorchMaskDINOEncoder(torch.nn.Module):
  """HIPIE's MaskDINOEncoder.forward_features on res3..res5, 4 levels, low2high, NCHW."""

  def __init__(self, num_layers):
    super().__init__()
    gn = lambda: torch.nn.GroupNorm(GROUPS, D)
    self.input_proj = torch.nn.ModuleList(
        [torch.nn.Sequential(torch.nn.Conv2d(CHANNELS[f], D, 1), gn()) for f in STRIDES]
        + [torch.nn.Sequential(torch.nn.Conv2d(CHANNELS['res5'], D, 3, stride=2, padding=1),
                               gn())])
    self.level_embed = torch.nn.Parameter(torch.randn(4, D))
    self.layers = torch.nn.ModuleList(_TorchEncoderLayer(4) for _ in range(num_layers))
    self.adapter = torch.nn.Conv2d(CHANNELS['res3'], D, 1, bias=False)
    self.adapter_norm = gn()
    self.layer = torch.nn.Conv2d(D, D, 3, padding=1, bias=False)
    self.layer_norm = gn()
    self.mask_features = torch.nn.Sequential(torch.nn.ConvTranspose2d(D, D, 2, stride=2), gn(),
                                             torch.nn.ReLU(), torch.nn.Conv2d(D, D, 1))

  def forward(self, features):
    maps = [proj(features[f]) for proj, f in zip(self.input_proj, STRIDES)]
    maps.append(self.input_proj[3](features['res5']))
    srcs, pos, shapes = [], [], []
    for lvl, x in enumerate(maps):
      b, _, h, w = x.shape
      shapes.append((h, w))
      srcs.append(x.flatten(2).transpose(1, 2))
      pe = torch.from_numpy(torch_sine_position_encoding(
          torch.zeros(b, h, w, dtype=torch.bool), D // 2, 10000., True, 2 * np.pi))
      pos.append(pe.flatten(1, 2) + self.level_embed[lvl].view(1, 1, -1))
    src, pos = torch.cat(srcs, 1), torch.cat(pos, 1)
    refs = []
    for h, w in shapes:
      ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h),
                                    torch.linspace(0.5, w - 0.5, w), indexing='ij')
      refs.append(torch.stack((ref_x.reshape(-1)[None] / w, ref_y.reshape(-1)[None] / h), -1))
    ref = torch.cat(refs, 1)[:, :, None].repeat(src.shape[0], 1, 4, 1)
    for layer in self.layers:
      src = layer(src, pos, ref, shapes)
    outs = [z.transpose(1, 2).reshape(src.shape[0], -1, h, w)
            for z, (h, w) in zip(src.split([h * w for h, w in shapes], dim=1), shapes)]
    cur = self.adapter_norm(self.adapter(features['res3']))
    y = cur + F.interpolate(outs[0], size=cur.shape[-2:], mode='bilinear', align_corners=False)
    y = F.relu(self.layer_norm(self.layer(y)))
    return self.mask_features(y), outs


def _convert_encoder(ref):
  params = {'level_embed': _t2j(ref.level_embed), 'lateral_conv': _conv(ref.adapter),
            'lateral_norm': _norm(ref.adapter_norm), 'output_conv': _conv(ref.layer),
            'output_norm': _norm(ref.layer_norm),
            'mask_features_deconv': {'kernel': _t2j(ref.mask_features[0].weight).transpose(
                2, 3, 1, 0), 'bias': _t2j(ref.mask_features[0].bias)},
            'mask_features_norm': _norm(ref.mask_features[1]),
            'mask_features_conv': _conv(ref.mask_features[3])}
  for i, proj in enumerate(ref.input_proj):
    params[f'input_proj_{i}_conv'] = _conv(proj[0])
    params[f'input_proj_{i}_norm'] = _norm(proj[1])
  for i, layer in enumerate(ref.layers):
    attn = layer.self_attn
    params[f'encoder_layer_{i}'] = {
        'self_attn': {n: _dense(getattr(attn, n)) for n in
                      ('sampling_offsets', 'attention_weights', 'value_proj', 'output_proj')},
        'norm1': _norm(layer.norm1), 'linear1': _dense(layer.linear1),
        'linear2': _dense(layer.linear2), 'norm2': _norm(layer.norm2)}
  return params


class _TorchDecoderLayer(torch.nn.Module):
  """DeformableTransformerDecoderLayer (self-attn -> norm2, cross-attn -> norm1, FFN -> norm3)."""

  def __init__(self, levels):
    super().__init__()
    self.cross_attn = TorchMSDeformAttn(D, levels, HEADS, POINTS)
    self.norm1 = torch.nn.LayerNorm(D)
    self.self_attn = torch.nn.MultiheadAttention(D, HEADS, batch_first=True)
    self.norm2 = torch.nn.LayerNorm(D)
    self.linear1 = torch.nn.Linear(D, FFN)
    self.linear2 = torch.nn.Linear(FFN, D)
    self.norm3 = torch.nn.LayerNorm(D)

  def forward(self, tgt, query_pos, ref, memory, shapes, attn_mask=None):
    q = tgt + query_pos
    tgt = self.norm2(tgt + self.self_attn(q, q, tgt, attn_mask=attn_mask)[0])
    tgt = self.norm1(tgt + self.cross_attn(tgt + query_pos, ref, memory, shapes))
    return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


def _convert_decoder_layer(layer):
  w, bias = _t2j(layer.self_attn.in_proj_weight), _t2j(layer.self_attn.in_proj_bias)
  attn = {name: {'kernel': w[i * D:(i + 1) * D].T, 'bias': bias[i * D:(i + 1) * D]}
          for i, name in enumerate(('q_proj', 'k_proj', 'v_proj'))}
  attn['out_proj'] = _dense(layer.self_attn.out_proj)
  cross = layer.cross_attn
  return {'self_attn': attn, 'norm2': _norm(layer.norm2),
          'cross_attn': {n: _dense(getattr(cross, n)) for n in
                         ('sampling_offsets', 'attention_weights', 'value_proj', 'output_proj')},
          'norm1': _norm(layer.norm1), 'linear1': _dense(layer.linear1),
          'linear2': _dense(layer.linear2), 'norm3': _norm(layer.norm3)}


class _TorchVLAlign(torch.nn.Module):
  """HIPIE's VL_Align: token logits of queries against L2-normalised text features."""

  def __init__(self):
    super().__init__()
    self.dot_product_projection_text = torch.nn.Linear(TEXT_DIM, D)
    self.log_scale = torch.nn.Parameter(torch.zeros(1))
    self.bias_lang = torch.nn.Parameter(torch.zeros(TEXT_DIM))
    self.bias0 = torch.nn.Parameter(torch.tensor([-math.log(99.0)]))

  def forward(self, x, embedding):
    embedding = F.normalize(embedding, p=2, dim=-1)
    tokens = self.dot_product_projection_text(embedding / 2.0)
    bias = (embedding @ self.bias_lang + self.bias0)[:, None, :]
    return torch.clamp(x @ tokens.transpose(-1, -2) / self.log_scale.exp() + bias, -5e4, 5e4)


def _torch_inverse_sigmoid(x, eps=1e-5):
  x = x.clamp(min=0, max=1)
  return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _torch_proposals(memory, shapes):
  """gen_encoder_output_proposals without padding."""
  proposals = []
  for lvl, (h, w) in enumerate(shapes):
    gy, gx = torch.meshgrid(torch.linspace(0, h - 1, h), torch.linspace(0, w - 1, w),
                            indexing='ij')
    grid = (torch.stack([gx, gy], -1) + 0.5) / torch.tensor([w, h], dtype=torch.float32)
    wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
    proposals.append(torch.cat((grid, wh), -1).view(1, -1, 4))
  proposals = torch.cat(proposals, 1).expand(memory.shape[0], -1, -1)
  valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
  proposals = torch.log(proposals / (1 - proposals)).masked_fill(~valid, float('inf'))
  return memory.masked_fill(~valid, 0.0), proposals


def _torch_sine_embed(boxes, num_feats):
  """gen_sineembed_for_position for 4-d boxes (num_feats = 128 in the reference, D/2 here)."""
  dim_t = torch.arange(num_feats, dtype=torch.float32)
  dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode='trunc') / num_feats)

  def embed(c):
    p = c[..., None] * 2 * math.pi / dim_t
    return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)

  return torch.cat([embed(boxes[..., 1]), embed(boxes[..., 0]), embed(boxes[..., 2]),
                    embed(boxes[..., 3])], -1)


def _reference_dn_mask(scalar, single_pad, num_queries):
  """prepare_for_dn's attention mask (True = blocked), transcribed loop for loop."""
  pad_size = scalar * single_pad
  mask = torch.ones(pad_size + num_queries, pad_size + num_queries) < 0
  mask[pad_size:, :pad_size] = True
  for i in range(scalar):
    if i == 0:
      mask[single_pad * i:single_pad * (i + 1), single_pad * (i + 1):pad_size] = True
    if i == scalar - 1:
      mask[single_pad * i:single_pad * (i + 1), :single_pad * i] = True
    else:
      mask[single_pad * i:single_pad * (i + 1), single_pad * (i + 1):pad_size] = True
      mask[single_pad * i:single_pad * (i + 1), :single_pad * i] = True
  return mask


class _TorchMaskDINODecoder(torch.nn.Module):
  """HIPIE's MaskDINODecoder.forward (two-stage, initial prediction, DN with dynamic label
  encoding and no noise) followed by post_process_maskdino's VL_Align heads."""

  def __init__(self, num_queries, num_layers, levels):
    super().__init__()
    self.num_queries, self.num_layers = num_queries, num_layers
    self.enc_output = torch.nn.Linear(D, D)
    self.enc_output_norm = torch.nn.LayerNorm(D)
    self.class_embed = torch.nn.Linear(D, D)
    self.bbox_embed = _TorchMLP([D, D, D, 4])
    self.mask_embed = _TorchMLP([D, D, D, D])
    self.decoder_norm = torch.nn.LayerNorm(D)
    self.ref_point_head = _TorchMLP([2 * D, D, D])
    self.resizer_fc = torch.nn.Linear(TEXT_DIM, D)
    self.resizer_norm = torch.nn.LayerNorm(D, eps=1e-12)
    self.layers = torch.nn.ModuleList(_TorchDecoderLayer(levels) for _ in range(num_layers))
    self.vl = torch.nn.ModuleList(_TorchVLAlign() for _ in range(num_layers + 2))

  def heads(self, out, mask_features):
    normed = self.decoder_norm(out)
    masks = torch.einsum('bqc,bchw->bqhw', self.mask_embed(normed), mask_features)
    return self.class_embed(normed), masks

  def forward(self, levels, mask_features, text, text_mask, dn_boxes=None, dn_valid=None):
    x = levels[::-1]
    shapes = [tuple(t.shape[-2:]) for t in x]
    memory = torch.cat([t.flatten(2).transpose(1, 2) for t in x], 1)
    out_mem, proposals = _torch_proposals(memory, shapes)
    out_mem = self.enc_output_norm(self.enc_output(out_mem))
    enc_class = self.class_embed(out_mem)
    enc_coord = self.bbox_embed(out_mem) + proposals
    topk = torch.topk(enc_class.max(-1)[0], self.num_queries, dim=1)[1]
    ref_undetach = torch.gather(enc_coord, 1, topk.unsqueeze(-1).repeat(1, 1, 4))
    tgt_undetach = torch.gather(out_mem, 1, topk.unsqueeze(-1).repeat(1, 1, D))
    interm_class, interm_mask = self.heads(tgt_undetach, mask_features)
    tgt, refpoint = tgt_undetach.detach(), ref_undetach.detach()
    attn_mask, pad = None, 0
    if dn_boxes is not None:
      b, n = dn_valid.shape
      scalar = 100 // n if n else 0
      pad = scalar * n
      m = text_mask.float()[..., None]
      label = self.resizer_norm(self.resizer_fc((text * m).sum(1) / m.sum(1)))
      query_label = torch.zeros(b, pad, D)
      query_bbox = torch.zeros(b, pad, 4)
      for bi in range(b):
        for g in range(scalar):
          for j in range(n):
            if dn_valid[bi, j]:
              query_label[bi, g * n + j] = label[bi]
              query_bbox[bi, g * n + j] = _torch_inverse_sigmoid(dn_boxes[bi, j])
      tgt = torch.cat([query_label, tgt], 1)
      refpoint = torch.cat([query_bbox, refpoint], 1)
      attn_mask = _reference_dn_mask(scalar, n, self.num_queries)
    classes, masks = map(list, zip(self.heads(tgt, mask_features)))
    reference = refpoint.sigmoid()
    references, hs = [reference], []
    out = tgt
    for layer in self.layers:
      ref_in = reference[:, :, None].repeat(1, 1, len(shapes), 1)
      query_pos = self.ref_point_head(_torch_sine_embed(ref_in[:, :, 0], D // 2))
      out = layer(out, query_pos, ref_in, memory, shapes, attn_mask)
      new_reference = (self.bbox_embed(out) + _torch_inverse_sigmoid(reference)).sigmoid()
      reference = new_reference.detach()
      references.append(new_reference)
      hs.append(self.decoder_norm(out))
    boxes = [refpoint.sigmoid()]
    for r, h in zip(references[:-1], hs):
      c, mk = self.heads(h, mask_features)
      classes.append(c)
      masks.append(mk)
      boxes.append((self.bbox_embed(h) + _torch_inverse_sigmoid(r)).sigmoid())
    logits = [self.vl[i](c, text) for i, c in enumerate(classes[:-1])]
    logits.append(self.vl[-1](classes[-1], text))

    def split(part):
      return [{'logits': lg[:, part], 'masks': mk[:, part], 'boxes': bx[:, part]}
              for lg, mk, bx in zip(logits, masks, boxes)]

    enc = {'logits': self.vl[-2](interm_class, text), 'masks': interm_mask,
           'boxes': ref_undetach.sigmoid()}
    return split(slice(pad, None)), enc, split(slice(0, pad)) if pad else None


def _convert_decoder(ref):
  heads = [{'dot_product_projection_text': _dense(v.dot_product_projection_text),
            'log_scale': _t2j(v.log_scale), 'bias_lang': _t2j(v.bias_lang),
            'bias0': _t2j(v.bias0)} for v in ref.vl]
  params = {'enc_output': _dense(ref.enc_output), 'enc_output_norm': _norm(ref.enc_output_norm),
            'class_embed': _dense(ref.class_embed), 'bbox_embed': _convert_mlp(ref.bbox_embed),
            'mask_embed': _convert_mlp(ref.mask_embed), 'decoder_norm': _norm(ref.decoder_norm),
            'ref_point_head': _convert_mlp(ref.ref_point_head),
            'label_enc_fc': _dense(ref.resizer_fc), 'label_enc_norm': _norm(ref.resizer_norm),
            'class_heads': jax.tree.map(lambda *xs: jnp.stack(xs), *heads)}
  for i, layer in enumerate(ref.layers):
    params[f'decoder_layer_{i}'] = _convert_decoder_layer(layer)
  return params


def _features(batch, height, width, seed):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=(batch, -(-height // s), -(-width // s), CHANNELS[k])).astype(
      np.float32) for k, s in STRIDES.items()}


def _nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _nhwc(x):
  return x.detach().numpy().transpose(0, 2, 3, 1)


def _text(batch, length, seed):
  rng = np.random.default_rng(seed)
  text = rng.normal(size=(batch, length, TEXT_DIM)).astype(np.float32)
  mask = np.ones((batch, length), np.int32)
  mask[-1, length - 2:] = 0
  return text, mask


def test_pixel_decoder_matches_hipie_maskdino_encoder_transcription():
  torch.manual_seed(0)
  ref = _perturb(_TorchMaskDINOEncoder(num_layers=2), 1).eval()
  feats = _features(2, 64, 96, 0)
  with torch.no_grad():
    ref_mask, ref_levels = ref({k: _nchw(v) for k, v in feats.items()})
  model = MaskDINOEncoder(conv_dim=D, mask_dim=D, num_encoder_layers=2, ffn_dim=FFN,
                          num_heads=HEADS, num_points=POINTS, norm_groups=GROUPS)
  params = _convert_encoder(ref)
  shapes = jax.eval_shape(model.init, jax.random.key(0), feats)['params']
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, params)
  mask_features, levels = jax.jit(model.apply)({'params': params}, feats)
  assert mask_features.shape == (2, 16, 24, D)
  assert [x.shape[1:3] for x in levels] == [(8, 12), (4, 6), (2, 3), (1, 2)]
  np.testing.assert_allclose(np.asarray(mask_features), _nhwc(ref_mask), atol=PIXEL_ATOL)
  for ours, theirs in zip(levels, ref_levels):
    np.testing.assert_allclose(np.asarray(ours), _nhwc(theirs), atol=PIXEL_ATOL)


def test_decoder_layer_matches_transcription_with_dn_mask():
  torch.manual_seed(1)
  ref = _perturb(_TorchDecoderLayer(levels=2), 2).eval()
  shapes = ((2, 3), (4, 5))
  rng = np.random.default_rng(3)
  b, groups, size, queries = 2, 2, 3, 5
  t = groups * size + queries
  tgt, pos = (rng.normal(size=(b, t, D)).astype(np.float32) for _ in range(2))
  memory = rng.normal(size=(b, 26, D)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.2, 0.8, (b, t, 1, 2)), rng.uniform(0.1, 0.5, (b, t, 1, 2))],
                         -1).astype(np.float32).repeat(2, axis=2)
  allowed = cdn_attention_mask(groups, size, queries)
  with torch.no_grad():
    expected = ref(*map(torch.from_numpy, (tgt, pos, boxes, memory)), shapes,
                   torch.from_numpy(~allowed))
  layer = DeformableDecoderLayer(d_model=D, ffn_dim=FFN, num_heads=HEADS, num_levels=2,
                                 num_points=POINTS)
  got = jax.jit(lambda p, *x: layer.apply(p, *x, shapes, attn_mask=jnp.broadcast_to(
      allowed, (b, t, t))))({'params': _convert_decoder_layer(ref)}, tgt, pos, boxes, memory)
  np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=LAYER_ATOL)


@pytest.mark.parametrize('groups,size,queries', [(1, 3, 4), (3, 2, 5), (4, 1, 3), (2, 5, 0)])
def test_dn_attention_mask_matches_reference_construction(groups, size, queries):
  expected = ~_reference_dn_mask(groups, size, queries).numpy()
  np.testing.assert_array_equal(cdn_attention_mask(groups, size, queries), expected)


DEC = dict(hidden_dim=D, mask_dim=D, num_queries=12, num_layers=2, ffn_dim=FFN, num_heads=HEADS,
           num_points=POINTS, dn_noise_scale=0.0, label_enc_dropout=0.0)


@pytest.fixture(scope='module')
def decoder_run():
  """One torch run with and one without DN, and one jitted Flax run with DN."""
  torch.manual_seed(4)
  ref = _perturb(_TorchMaskDINODecoder(DEC['num_queries'], DEC['num_layers'], levels=4), 5).eval()
  rng = np.random.default_rng(6)
  levels = [rng.normal(size=(2, h, w, D)).astype(np.float32)
            for h, w in ((8, 12), (4, 6), (2, 3), (1, 2))]
  mask_features = rng.normal(size=(2, 16, 24, D)).astype(np.float32)
  text, text_mask = _text(2, 6, 7)
  dn_boxes = np.concatenate([rng.uniform(0.2, 0.8, (2, 3, 2)), rng.uniform(0.05, 0.4, (2, 3, 2))],
                            -1).astype(np.float32)
  dn_valid = np.array([[True, True, False], [True, False, False]])
  with torch.no_grad():
    args = ([_nchw(x) for x in levels], _nchw(mask_features), torch.from_numpy(text),
            torch.from_numpy(text_mask))
    expected = ref(*args, torch.from_numpy(dn_boxes), torch.from_numpy(dn_valid))
    expected_no_dn = ref(*args)
  model = MaskDINODecoder(**DEC)
  params = _convert_decoder(ref)
  shapes = jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0), levels,
                          mask_features, text, text_mask)['params']
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, params)
  got, state = jax.jit(functools.partial(
      model.apply, train=True, capture_intermediates=lambda mdl, _: mdl.name == 'mask_embed'))(
      {'params': params}, levels, mask_features, text, text_mask, None,
      {'boxes': dn_boxes, 'valid': dn_valid})
  return dict(expected=expected, expected_no_dn=expected_no_dn, got=got,
              intermediates=state['intermediates'], mask_features=mask_features,
              text_mask=text_mask)


def _assert_prediction(got, expected, valid_tokens):
  tokens = valid_tokens[:, None, :].astype(bool)
  np.testing.assert_allclose(np.where(tokens, np.asarray(got['logits']), 0),
                             np.where(tokens, expected['logits'].numpy(), 0), atol=DECODER_ATOL)
  np.testing.assert_allclose(np.asarray(got['masks']), expected['masks'].numpy(),
                             atol=DECODER_ATOL)
  np.testing.assert_allclose(np.asarray(got['boxes']), expected['boxes'].numpy(),
                             atol=DECODER_ATOL)


def test_decoder_matches_hipie_maskdino_decoder_transcription(decoder_run):
  got, (matching, enc, dn) = decoder_run['got'], decoder_run['expected']
  valid = decoder_run['text_mask']
  assert got['logits'].shape == (2, 12, 6) and got['masks'].shape == (2, 12, 16, 24)
  assert len(got['aux']) == 2 and got['dn']['logits'].shape == (2, 99, 6)
  for ours, theirs in zip(got['aux'] + [got], matching):
    _assert_prediction(ours, theirs, valid)
  _assert_prediction(got['enc'], enc, valid)
  for ours, theirs in zip(got['dn']['aux'] + [got['dn']], dn):
    _assert_prediction(ours, theirs, valid)
  np.testing.assert_array_equal(got['dn']['target_index'], np.tile(np.arange(3), 33))
  slots = np.array([[1, 1, 0], [1, 0, 0]], bool)
  np.testing.assert_array_equal(got['dn']['valid'], slots[:, np.tile(np.arange(3), 33)])
  assert (np.asarray(got['logits'])[1, :, -2:] == -5e4).all()  # padded tokens


def test_denoising_queries_do_not_change_the_matching_queries(decoder_run):
  got, (matching, _, _) = decoder_run['got'], decoder_run['expected_no_dn']
  for ours, theirs in zip(got['aux'] + [got], matching):
    _assert_prediction(ours, theirs, decoder_run['text_mask'])


def test_mask_einsum_equals_direct_computation(decoder_run):
  got, inter = decoder_run['got'], decoder_run['intermediates']
  # The last mask_embed call is the final layer's; its output covers DN + matching queries.
  embed = np.asarray(inter['mask_embed']['__call__'][-1])  # [B, T, M]
  features = decoder_run['mask_features']  # [B, H, W, M]
  b, t, m = embed.shape
  _, h, w, _ = features.shape
  direct = np.zeros((b, t, h, w), np.float64)
  for bi in range(b):
    for c in range(m):
      direct[bi] += embed[bi, :, c, None, None] * features[bi, None, :, :, c]
  masks = np.concatenate([np.asarray(got['dn']['masks']), np.asarray(got['masks'])], axis=1)
  np.testing.assert_allclose(masks, direct, rtol=1e-5, atol=1e-4)


TINY = dict(hidden_dim=D, mask_dim=D, num_encoder_layers=2, encoder_ffn_dim=FFN, num_queries=20,
            num_decoder_layers=2, decoder_ffn_dim=FFN, num_heads=HEADS, num_points=POINTS,
            norm_groups=GROUPS, dn_num=10)


def test_stuff_decoder_shapes_on_tiny_config():
  model = StuffDecoder(**TINY)
  feats = _features(2, 128, 96, 8)
  text, text_mask = _text(2, 7, 9)
  dn = {'boxes': np.full((2, 4, 4), 0.3, np.float32), 'valid': np.ones((2, 4), bool),
        'labels': np.zeros((2, 4), np.int32)}
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  out, variables = jax.eval_shape(
      functools.partial(model.init_with_output, train=True, text_mask=text_mask), rngs, feats,
      text, dn)
  params = variables['params']
  assert params['predictor']['class_heads']['bias0'].shape == (4, 1)
  assert params['pixel_decoder']['level_embed'].shape == (4, D)
  assert out['logits'].shape == (2, 20, 7)
  assert out['masks'].shape == (2, 20, 32, 24)
  assert out['boxes'].shape == (2, 20, 4)
  assert [sorted(a) for a in out['aux']] == [['boxes', 'logits', 'masks']] * 2
  assert out['enc']['masks'].shape == (2, 20, 32, 24)
  assert out['dn']['logits'].shape == (2, 8, 7) and out['dn']['target_index'].shape == (8,)
  assert len(out['dn']['aux']) == 2
  # Inference: no denoising, aux without masks; per-class features [C, L] give [B, Q, C].
  out = jax.eval_shape(model.apply, variables, feats, np.zeros((5, TEXT_DIM), np.float32), dn)
  assert out['dn'] is None and out['logits'].shape == (2, 20, 5)
  assert [sorted(a) for a in out['aux']] == [['boxes', 'logits']] * 2
  # More target slots than the DN budget: no denoising groups, as in the reference.
  big = {'boxes': np.zeros((2, 11, 4), np.float32), 'valid': np.ones((2, 11), bool)}
  out = jax.eval_shape(functools.partial(model.apply, train=True), variables, feats, text, big,
                       rngs={'dropout': jax.random.key(2)})
  assert out['dn'] is None


def test_stuff_decoder_r50_defaults_trace_on_a_320x569_image():
  model = StuffDecoder()
  feats = {k: jax.ShapeDtypeStruct((1, -(-320 // s), -(-569 // s), c), jnp.float32)
           for k, s, c in (('res3', 8, 512), ('res4', 16, 1024), ('res5', 32, 2048))}
  text = jax.ShapeDtypeStruct((1, 12, 768), jnp.float32)
  out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), feats, text)
  assert out['logits'].shape == (1, 300, 12) and out['masks'].shape == (1, 300, 80, 144)
  assert len(out['aux']) == 9
  assert variables['params']['predictor']['class_heads']['log_scale'].shape == (11, 1)


def test_stuff_decoder_gradients_are_finite():
  # 32 x 416 px: 208 + 52 + 13 + 7 tokens; every one is a query, including the 8 stride-8
  # tokens whose proposals are invalid (x centre 0.5/52 < 0.01 or > 0.99: +inf box logits).
  config = TINY | dict(num_encoder_layers=1, num_decoder_layers=1, num_queries=280)
  model = StuffDecoder(**config)
  feats = _features(1, 32, 416, 10)
  text, text_mask = _text(1, 5, 11)
  dn = {'boxes': np.array([[[0.5, 0.5, 0.4, 0.3], [0.2, 0.7, 0.2, 0.2]]], np.float32),
        'valid': np.array([[True, False]])}

  def loss(params, f):
    out = model.apply({'params': params}, f, text, dn, True, text_mask=text_mask,
                      rngs={'dropout': jax.random.key(2)})
    preds = [out, out['enc'], out['dn']] + out['aux'] + out['dn']['aux']
    total = sum(jnp.mean(jnp.where(text_mask[:, None] > 0, p['logits'], 0)) + jnp.mean(p['masks'])
                + jnp.mean(p['boxes']) for p in preds)
    return total, out['dn']['aux'][0]['boxes']  # the initial DN boxes are the noised inputs

  @jax.jit
  def init_and_grad(f):
    params = model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, f, text, dn,
                        True, text_mask=text_mask)['params']
    return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, f)

  grads, dn_boxes = init_and_grad(feats)
  # Box noise: 5 groups of 2 slots; |noised - box| <= 0.4 * (w/2, h/2, w, h), clamped to
  # [0, 1] (up to inverse_sigmoid's 1e-5 clamp); the empty slot stays at sigmoid(0) = 0.5.
  dn_boxes = np.asarray(dn_boxes)[0].reshape(5, 2, 4)
  box = dn['boxes'][0, 0]
  bound = 0.4 * np.concatenate([box[2:] / 2, box[2:]])
  assert (np.abs(dn_boxes[:, 0] - box) <= bound + 1e-5).all()
  assert np.unique(dn_boxes[:, 0, 0]).size == 5  # a fresh draw per group
  np.testing.assert_allclose(dn_boxes[:, 1], 0.5)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  pred = grads[0]['predictor']
  heads = np.abs(np.asarray(pred['class_heads']['dot_product_projection_text']['kernel']))
  assert (heads.sum(axis=(1, 2)) > 0).all()  # every VL_Align head is used
  layer = pred['decoder_layer_0']
  for leaf in (pred['label_enc_fc']['kernel'], pred['bbox_embed']['layers_2']['kernel'],
               pred['enc_output']['kernel'], layer['self_attn']['q_proj']['kernel'],
               layer['cross_attn']['sampling_offsets']['kernel'],
               grads[0]['pixel_decoder']['input_proj_3_conv']['kernel'], grads[1]['res5']):
    assert np.abs(np.asarray(leaf)).sum() > 0


def test_stuff_decoder_rejects_bad_inputs():
  model = StuffDecoder(**TINY)
  feats = _features(1, 64, 64, 0)
  text = np.zeros((1, 3, TEXT_DIM), np.float32)
  with pytest.raises(ValueError, match="lack \\['res4'\\]"):
    jax.eval_shape(model.init, jax.random.key(0), {k: v for k, v in feats.items() if k != 'res4'},
                   text)
  with pytest.raises(ValueError, match='text shape'):
    jax.eval_shape(model.init, jax.random.key(0), feats, np.zeros((2, 3, TEXT_DIM), np.float32))
  with pytest.raises(ValueError, match='num_queries=20'):
    jax.eval_shape(model.init, jax.random.key(0), _features(1, 16, 16, 0), text)
