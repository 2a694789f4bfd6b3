"""HIPIE's stuff decoder: MaskDINO (two-stage, denoising, 9 deformable layers) with VL_Align heads.

Facts followed (berkeley-hipie/HIPIE: `maskdino_decoder.py`, `dino_decoder.py`,
`maskdino/utils/utils.py`, `ddetrs_dn.py`; the r50 MaskDINO config
`maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml`; IDEA-Research/MaskDINO for the
base), for one image batch without padding (valid ratios 1):

* Memory: the pixel decoder's four levels in reverse order (stride 64, 32, 16,
  8), flattened and concatenated, used as they are (their width equals the
  decoder width, so MaskDINO's input projections are identities).
* Two-stage selection: every memory token gets a proposal box (centre of its
  cell, side 0.05 * 2^level in that reverse level order; tokens with any
  coordinate outside (0.01, 0.99) get an infinite box logit and zeroed memory),
  then `enc_output` (Linear) + `enc_output_norm` (LayerNorm). HIPIE builds
  MaskDINO with num_classes = hidden width, so `class_embed` is a Linear D -> D
  producing a query *embedding*, and the top `num_queries` tokens are chosen by
  the maximum channel of that embedding (text-agnostic). The selected tokens'
  boxes (`bbox_embed` + proposal) and features give the intermediate ('enc')
  prediction; detached, they are the decoder's initial boxes and content.
* Denoising (training only, MaskDINO's "seg" DN with HIPIE's dynamic label
  encoding): with N target slots per image, G = dn_num // N groups; every
  group holds one noised copy of each target box (cx, cy, w, h each moved by
  U(-1, 1) * (w/2, h/2, w, h) * noise_scale, clamped to [0, 1], then
  inverse-sigmoid). The content of every real DN query is the same per image:
  `label_enc` (Linear L -> D, LayerNorm eps 1e-12, dropout 0.1) of the
  average-pooled prompt feature; so MaskDINO's label noise has no effect in
  HIPIE and is not drawn. Empty slots hold zero content and a zero box logit.
  Self-attention mask: matching queries cannot see DN queries, and each DN
  group sees only itself and the matching queries (`query_utils.cdn_attention_mask`).
* Prediction heads (`forward_prediction_heads`): LayerNorm `decoder_norm`,
  then `class_embed` and masks = einsum(`mask_embed` 3-layer MLP(q), mask
  features). A prediction is made from the initial queries and after each of
  the `num_layers` layers. The decoder's per-layer outputs are themselves
  `decoder_norm`-ed before the heads normalise them again (MaskDINO does this
  twice, and so do we).
* Decoder layer (DINO `DeformableTransformerDecoderLayer`, post-norm):
  self-attention with q = k = tgt + pos, v = tgt (-> norm2), deformable
  cross-attention from tgt + pos with the 4-d reference box on every level
  (-> norm1), FFN with ReLU (-> norm3). pos = `ref_point_head` (2-layer MLP
  2D -> D -> D) of the sine embedding of the reference box (y, x, w, h, D/2
  features each; the reference hard-codes 128 for D = 256).
* Box refinement: one `bbox_embed` MLP (last layer zero-initialised) is shared
  by all layers. Inside the decoder the next reference is
  sigmoid(bbox_embed(raw layer output) + inverse_sigmoid(reference)), detached
  for the next layer; the output boxes of layer l are
  sigmoid(bbox_embed(normed layer output) + inverse_sigmoid(reference of layer
  l)) with the references kept attached, and the initial prediction's boxes
  are the initial references.
* Classification (HIPIE `post_process_maskdino`): `num_layers + 2` VL_Align
  heads, deep copies of one another at initialisation (here: one vmapped
  VLAlign with `split_rngs={'params': False}`, parameters stacked on a leading
  axis). Head i scores auxiliary prediction i (i < num_layers), head
  num_layers the 'enc' prediction and head num_layers + 1 the final one; each
  maps the class embedding against the text features to logits.

Text: HIPIE scores stuff queries against the *token* features of the class
prompt (the fused BERT hidden states) with a text mask, giving token logits
[B, Q, T] that the loss compares with the positive map and inference turns
into class scores with `hiseg_jax.text.prompts.pool_token_logits` (mean over
each class's tokens, `convert_grounding_to_od_logits`); for referring batches
it passes the pooled sentence feature as a single token and switches the stuff
losses off. Passing per-class features [B, C, L] instead (e.g. from
`pool_token_features`) gives [B, Q, C] logits from the same heads.

Randomness: box noise draws from the 'dropout' rng stream (as does dropout).

Deviations from the reference: with static shapes the DN group size is the
padded number of target slots N rather than the batch's largest target count,
so there may be more empty DN slots (they never influence the matching
queries).

Shared with the thing decoder (`query_utils`, `decoder_layer`): `inverse_sigmoid`, the sine box
embedding, the proposals (called without a padding mask), the denoising attention mask, the
decoder layer and the head MLPs (`bbox_embed` torch-default with a zero last layer, `mask_embed`
torch-default, `ref_point_head` Xavier weights as under MaskDINO's decoder reset).
"""

import functools
from typing import Any, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hiseg_jax.hipie.decoder_layer import DeformableDecoderLayer
from hiseg_jax.hipie.query_utils import HeadMLP
from hiseg_jax.hipie.query_utils import cdn_attention_mask
from hiseg_jax.hipie.query_utils import encoder_output_proposals
from hiseg_jax.hipie.query_utils import inverse_sigmoid
from hiseg_jax.hipie.query_utils import sine_box_embedding
from hiseg_jax.hipie.stuff_pixel_decoder import MaskDINOEncoder
from hiseg_jax.hipie.vl_align import VLAlign
from hiseg_jax.layers.init import torch_default_bias
from hiseg_jax.layers.init import torch_default_kernel
from hiseg_jax.text.prompts import pool_sentence_features


class MaskDINODecoder(nn.Module):
  """MaskDINO's transformer decoder as HIPIE uses it for stuff (see the module docstring).

  Parameter names: `enc_output`, `enc_output_norm`, `class_embed`, `bbox_embed`
  (`layers_0..2`), `mask_embed` (`layers_0..2`), `decoder_norm`, `ref_point_head`
  (`layers_0..1`), `label_enc_fc`, `label_enc_norm` (HIPIE's FeatureResizer
  `resizer.fc` / `.layer_norm`), `decoder_layer_{i}`, and `class_heads` (the
  VL_Align heads stacked on a leading axis of num_layers + 2).

  Attributes:
    hidden_dim: decoder width D; must equal the width of the memory levels.
    mask_dim: width of the mask embedding (the mask features' width).
    num_queries: matching queries Q (300).
    num_layers: decoder layers (9).
    ffn_dim: decoder FFN width (2048).
    num_heads: attention heads (8).
    num_points: deformable sampling points (4).
    dropout: decoder dropout (0.0).
    dn_num: denoising query budget (100).
    dn_noise_scale: box noise scale (0.4).
    label_enc_dropout: dropout of the DN label encoder (0.1).
    prior_prob: VL_Align prior for `bias0`.
    log_scale_init: VL_Align initial log scale.
    dtype: computation dtype.
  """
  hidden_dim: int = 256
  mask_dim: int = 256
  num_queries: int = 300
  num_layers: int = 9
  ffn_dim: int = 2048
  num_heads: int = 8
  num_points: int = 4
  dropout: float = 0.0
  dn_num: int = 100
  dn_noise_scale: float = 0.4
  label_enc_dropout: float = 0.1
  prior_prob: float = 0.01
  log_scale_init: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, multi_scale: List[jnp.ndarray], mask_features: jnp.ndarray,
               text: jnp.ndarray, text_mask: Optional[jnp.ndarray] = None,
               pooled_text: Optional[jnp.ndarray] = None,
               dn_targets: Optional[Dict[str, jnp.ndarray]] = None,
               train: bool = False) -> Dict[str, Any]:
    """Decodes stuff queries.

    Args:
      multi_scale: pixel-decoder levels, high resolution first ([B, h_l, w_l, D] each).
      mask_features: [B, H/4, W/4, mask_dim].
      text: [B, T, L] text token features (or [T, L] shared by the batch).
      text_mask: optional [B, T] (or [T]) 1 on real tokens.
      pooled_text: optional [B, L] prompt feature for the DN content; default the
        masked average of `text` (HIPIE's `agg_lang_feat`).
      dn_targets: optional {'boxes': [B, N, 4] normalised cxcywh, 'valid': [B, N]};
        used only when `train` (other keys are ignored).
      train: training mode (dropout, denoising, masks of every layer).

    Returns:
      See `StuffDecoder`.
    """
    d, q_num = self.hidden_dim, self.num_queries
    b = mask_features.shape[0]
    levels = list(multi_scale)[::-1]  # low resolution first
    for i, x in enumerate(levels):
      if x.ndim != 4 or x.shape[0] != b or x.shape[-1] != d:
        raise ValueError(f'MaskDINODecoder: multi_scale level {i} (from the lowest resolution) '
                         f'has shape {x.shape}, not [{b}, h, w, {d}]')
    if mask_features.ndim != 4 or mask_features.shape[-1] != self.mask_dim:
      raise ValueError(f'MaskDINODecoder: mask_features shape {mask_features.shape} is not '
                       f'[B, H/4, W/4, {self.mask_dim}]')
    if text.ndim == 2:
      text = jnp.broadcast_to(text[None], (b,) + text.shape)  # [B, T, L]
    if text.ndim != 3 or text.shape[0] != b:
      raise ValueError(f'MaskDINODecoder: text shape {text.shape} is not [{b}, T, L] or [T, L]')
    if text_mask is None:
      text_mask = jnp.ones(text.shape[:2], jnp.int32)  # [B, T]
    elif text_mask.ndim == 1:
      text_mask = jnp.broadcast_to(text_mask[None], text.shape[:2])  # [B, T]
    if text_mask.shape != text.shape[:2]:
      raise ValueError(f'MaskDINODecoder: text_mask shape {text_mask.shape} is not '
                       f'{text.shape[:2]}')
    shapes = tuple((int(x.shape[1]), int(x.shape[2])) for x in levels)
    memory = jnp.concatenate([x.reshape(b, -1, d) for x in levels], axis=1).astype(
        self.dtype)  # [B, S, D]
    if memory.shape[1] < q_num:
      raise ValueError(f'MaskDINODecoder: {memory.shape[1]} memory tokens < num_queries={q_num}')
    mask_features = mask_features.astype(self.dtype)  # [B, H/4, W/4, M]
    norm = functools.partial(nn.LayerNorm, epsilon=1e-5, dtype=self.dtype)
    class_embed = nn.Dense(d, dtype=self.dtype, kernel_init=torch_default_kernel,
                           bias_init=torch_default_bias(d), name='class_embed')
    bbox_embed = HeadMLP(d, 4, 3, zero_last=True, dtype=self.dtype, name='bbox_embed')
    mask_embed = HeadMLP(d, self.mask_dim, 3, dtype=self.dtype, name='mask_embed')
    decoder_norm = norm(name='decoder_norm')

    def heads(queries, with_mask):
      """MaskDINO's forward_prediction_heads: class embedding and (optionally) mask logits."""
      normed = decoder_norm(queries)  # [B, n, D]
      masks = None
      if with_mask:
        masks = jnp.einsum('bqc,bhwc->bqhw', mask_embed(normed), mask_features)  # [B, n, H/4, W/4]
      return class_embed(normed), masks  # [B, n, D], [B, n, H/4, W/4]

    # Two-stage query selection.
    proposals, keep = encoder_output_proposals(None, shapes, batch=b)  # [B, S, 4], [B, S]
    enc_memory = jnp.where(keep[..., None], memory, 0).astype(memory.dtype)  # [B, S, D]
    enc_memory = nn.Dense(d, dtype=self.dtype, kernel_init=torch_default_kernel,
                          bias_init=torch_default_bias(d),
                          name='enc_output')(enc_memory)  # [B, S, D]
    enc_memory = norm(name='enc_output_norm')(enc_memory)  # [B, S, D]
    enc_scores = class_embed(enc_memory).max(-1)  # [B, S]
    enc_boxes = bbox_embed(enc_memory).astype(jnp.float32) + proposals  # [B, S, 4]
    _, top = jax.lax.top_k(enc_scores.astype(jnp.float32), q_num)  # [B, Q]
    enc_ref = jnp.take_along_axis(enc_boxes, top[..., None], axis=1)  # [B, Q, 4]
    enc_tgt = jnp.take_along_axis(enc_memory, top[..., None], axis=1)  # [B, Q, D]
    enc_class, enc_masks = heads(enc_tgt, True)  # [B, Q, D], [B, Q, H/4, W/4]
    tgt = jax.lax.stop_gradient(enc_tgt)  # [B, Q, D]
    ref_logits = jax.lax.stop_gradient(enc_ref)  # [B, Q, 4]

    # Denoising queries. The label encoder always runs so that its parameters exist.
    if pooled_text is None:
      pooled_text = pool_sentence_features(text, text_mask)  # [B, L]
    label_content = nn.Dense(d, dtype=self.dtype, kernel_init=torch_default_kernel,
                             bias_init=torch_default_bias(pooled_text.shape[-1]),
                             name='label_enc_fc')(pooled_text.astype(self.dtype))  # [B, D]
    label_content = nn.LayerNorm(epsilon=1e-12, dtype=self.dtype,
                                 name='label_enc_norm')(label_content)  # [B, D]
    label_content = nn.Dropout(self.label_enc_dropout)(
        label_content, deterministic=not train)  # [B, D]
    pad, self_mask, dn_valid, dn_index = 0, None, None, None
    if train and dn_targets is not None:
      gt_boxes = jnp.asarray(dn_targets['boxes'], jnp.float32)  # [B, N, 4]
      n = gt_boxes.shape[1]
      if gt_boxes.shape != (b, n, 4) or dn_targets['valid'].shape != (b, n):
        raise ValueError(f"MaskDINODecoder: dn_targets boxes {gt_boxes.shape} / valid "
                         f"{dn_targets['valid'].shape} are not [{b}, N, 4] / [{b}, N]")
      groups = self.dn_num // n if n else 0
      pad = groups * n
      if pad:
        dn_index = np.tile(np.arange(n, dtype=np.int32), groups)  # [G*N]
        dn_valid = jnp.asarray(dn_targets['valid']).astype(bool)[:, dn_index]  # [B, G*N]
        noisy = gt_boxes[:, dn_index]  # [B, G*N, 4]
        if self.dn_noise_scale > 0:
          diff = jnp.concatenate([noisy[..., 2:] / 2, noisy[..., 2:]], -1)  # [B, G*N, 4]
          u = jax.random.uniform(self.make_rng('dropout'), noisy.shape)  # [B, G*N, 4]
          noise = (u * 2 - 1) * diff * self.dn_noise_scale  # [B, G*N, 4]
          noisy = jnp.clip(noisy + noise, 0.0, 1.0)  # [B, G*N, 4]
        dn_ref = jnp.where(dn_valid[..., None], inverse_sigmoid(noisy), 0.0)  # [B, G*N, 4]
        dn_tgt = jnp.where(dn_valid[..., None], label_content[:, None, :],
                           0.0).astype(self.dtype)  # [B, G*N, D]
        tgt = jnp.concatenate([dn_tgt, tgt], axis=1)  # [B, T, D]
        ref_logits = jnp.concatenate([dn_ref, ref_logits], axis=1)  # [B, T, 4]
        self_mask = jnp.broadcast_to(jnp.asarray(cdn_attention_mask(groups, n, q_num))[None],
                                     (b, pad + q_num, pad + q_num))  # [B, T, T]

    # Initial prediction and the decoder layers.
    embeds, masks = [], []
    e, m = heads(tgt, train)  # [B, T, D], [B, T, H/4, W/4]
    embeds.append(e)
    masks.append(m)
    ref_point_head = HeadMLP(d, d, 2, kernel='xavier', dtype=self.dtype, name='ref_point_head')
    reference = jax.nn.sigmoid(ref_logits)  # [B, T, 4]
    references = [reference]
    outputs = []
    out = tgt  # [B, T, D]
    for i in range(self.num_layers):
      query_pos = ref_point_head(
          sine_box_embedding(reference, d // 2).astype(self.dtype))  # [B, T, D]
      ref_levels = jnp.broadcast_to(reference[:, :, None, :],
                                    reference.shape[:2] + (len(shapes), 4))  # [B, T, L, 4]
      out = DeformableDecoderLayer(d_model=d, ffn_dim=self.ffn_dim, num_heads=self.num_heads,
                                   num_levels=len(shapes), num_points=self.num_points,
                                   dropout=self.dropout, dtype=self.dtype,
                                   name=f'decoder_layer_{i}')(
                                       out, query_pos, ref_levels, memory, shapes,
                                       attn_mask=self_mask, deterministic=not train)  # [B, T, D]
      new_reference = jax.nn.sigmoid(bbox_embed(out).astype(jnp.float32)
                                     + inverse_sigmoid(reference))  # [B, T, 4]
      references.append(new_reference)
      reference = jax.lax.stop_gradient(new_reference)  # [B, T, 4]
      outputs.append(decoder_norm(out))  # [B, T, D]
    boxes = [references[0]]
    for i, hs in enumerate(outputs):
      e, m = heads(hs, train or i == self.num_layers - 1)  # [B, T, D], [B, T, H/4, W/4]
      embeds.append(e)
      masks.append(m)
      boxes.append(jax.nn.sigmoid(bbox_embed(hs).astype(jnp.float32)
                                  + inverse_sigmoid(references[i])))  # [B, T, 4]

    # VL_Align heads: aux i -> head i, enc -> head num_layers, final -> head num_layers + 1.
    total = pad + q_num
    enc_padded = jnp.pad(enc_class, ((0, 0), (0, total - q_num), (0, 0)))  # [B, T, D]
    stacked = jnp.stack(embeds[:-1] + [enc_padded, embeds[-1]], axis=0)  # [L+2, B, T, D]
    class_heads = nn.vmap(VLAlign, variable_axes={'params': 0}, split_rngs={'params': False},
                          in_axes=(0, None, None), out_axes=0, axis_size=self.num_layers + 2)(
                              hidden_dim=d, prior_prob=self.prior_prob,
                              log_scale_init=self.log_scale_init, dtype=self.dtype,
                              name='class_heads')
    logits = class_heads(stacked, text, text_mask)  # [L+2, B, T, T_text]
    layer_logits = [logits[i] for i in range(self.num_layers)] + [logits[-1]]

    def prediction(k, part):
      """Prediction k (0 = initial queries) restricted to the query slice `part`."""
      entry = {'logits': layer_logits[k][:, part], 'boxes': boxes[k][:, part]}
      if masks[k] is not None:
        entry['masks'] = masks[k][:, part]
      return entry

    def predictions(part):
      """The final prediction of the query slice `part`, with its auxiliary ones."""
      final = prediction(self.num_layers, part)
      final['aux'] = [prediction(k, part) for k in range(self.num_layers)]
      return final

    result = predictions(slice(pad, total))
    result['enc'] = {'logits': logits[self.num_layers][:, :q_num], 'masks': enc_masks,
                     'boxes': jax.nn.sigmoid(enc_ref)}
    result['dn'] = None
    if pad:
      result['dn'] = predictions(slice(0, pad))
      result['dn']['valid'] = dn_valid
      result['dn']['target_index'] = jnp.asarray(dn_index)
    return result


class StuffDecoder(nn.Module):
  """HIPIE's stuff branch: MaskDINO pixel decoder on raw backbone features + MaskDINO decoder.

  Output contract of `__call__` (Q = num_queries, T = text length, M = H/4 x W/4):
    {'logits': [B, Q, T] final VL_Align logits,
     'masks': [B, Q, H/4, W/4] final mask logits,
     'boxes': [B, Q, 4] final normalised (cx, cy, w, h),
     'aux': num_decoder_layers dicts {'logits', 'boxes', 'masks'} (the initial
       prediction, then layers 1 .. L-1; 'masks' only when train),
     'enc': {'logits', 'masks', 'boxes'} of the two-stage selected tokens,
     'dn': None, or (train with dn_targets) the same structure as the top level
       for the G*N denoising queries plus 'valid' [B, G*N] (slot holds a real
       target) and 'target_index' [G*N] (target slot each query reconstructs)}.

  Sizes default to HIPIE's r50 values.

  Attributes:
    hidden_dim: pixel-decoder and decoder width (256).
    mask_dim: mask feature width (256).
    num_encoder_layers: pixel-decoder deformable layers (6).
    encoder_ffn_dim: pixel-decoder FFN width (2048).
    num_queries: matching queries (300).
    num_decoder_layers: decoder layers (9).
    decoder_ffn_dim: decoder FFN width (2048).
    num_heads: attention heads (8).
    num_points: deformable sampling points (4).
    norm_groups: GroupNorm groups (32).
    dropout: transformer dropout (0.0).
    dn_num: denoising budget (100).
    dn_noise_scale: DN box noise (0.4).
    label_enc_dropout: DN label-encoder dropout (0.1).
    prior_prob: VL_Align prior.
    log_scale_init: VL_Align initial log scale.
    dtype: computation dtype.
  """
  hidden_dim: int = 256
  mask_dim: int = 256
  num_encoder_layers: int = 6
  encoder_ffn_dim: int = 2048
  num_queries: int = 300
  num_decoder_layers: int = 9
  decoder_ffn_dim: int = 2048
  num_heads: int = 8
  num_points: int = 4
  norm_groups: int = 32
  dropout: float = 0.0
  dn_num: int = 100
  dn_noise_scale: float = 0.4
  label_enc_dropout: float = 0.1
  prior_prob: float = 0.01
  log_scale_init: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Dict[str, jnp.ndarray], text: jnp.ndarray,
               dn_targets: Optional[Dict[str, jnp.ndarray]] = None, train: bool = False,
               text_mask: Optional[jnp.ndarray] = None,
               pooled_text: Optional[jnp.ndarray] = None) -> Dict[str, Any]:
    """Runs the pixel decoder (`pixel_decoder`) and the decoder (`predictor`).

    Args:
      features: raw backbone features {'res3', 'res4', 'res5'} ([B, h, w, C]; 'res2' ignored).
      text: [B, T, L] (or [T, L]) text features the queries are scored against
        (HIPIE: the fused prompt token features; or per-class features [B, C, L]).
      dn_targets: optional {'boxes': [B, N, 4], 'valid': [B, N]} for denoising
        (all targets of the image, things and stuff, as in HIPIE).
      train: training mode.
      text_mask: optional [B, T] 1 on real tokens.
      pooled_text: optional [B, L] prompt feature for the DN content.

    Returns:
      The dict of the class docstring.
    """
    mask_features, multi_scale = MaskDINOEncoder(
        **self.pixel_decoder_fields(), name='pixel_decoder')(
            features, deterministic=not train)  # [B, H/4, W/4, M], 4 x [B, h, w, D]
    return MaskDINODecoder(**self.predictor_fields(), name='predictor')(
        multi_scale, mask_features, text, text_mask, pooled_text, dn_targets, train)

  def pixel_decoder_fields(self) -> Dict[str, Any]:
    """Fields of the `MaskDINOEncoder` held as `pixel_decoder` (params['pixel_decoder']).

    Returns:
      Keyword arguments of MaskDINOEncoder.
    """
    return dict(conv_dim=self.hidden_dim, mask_dim=self.mask_dim,
                num_encoder_layers=self.num_encoder_layers, ffn_dim=self.encoder_ffn_dim,
                num_heads=self.num_heads, num_points=self.num_points,
                norm_groups=self.norm_groups, dropout=self.dropout, dtype=self.dtype)

  def predictor_fields(self) -> Dict[str, Any]:
    """Fields of the `MaskDINODecoder` held as `predictor` (params['predictor']).

    Returns:
      Keyword arguments of MaskDINODecoder.
    """
    return dict(hidden_dim=self.hidden_dim, mask_dim=self.mask_dim,
                num_queries=self.num_queries, num_layers=self.num_decoder_layers,
                ffn_dim=self.decoder_ffn_dim, num_heads=self.num_heads,
                num_points=self.num_points, dropout=self.dropout, dn_num=self.dn_num,
                dn_noise_scale=self.dn_noise_scale, label_enc_dropout=self.label_enc_dropout,
                prior_prob=self.prior_prob, log_scale_init=self.log_scale_init,
                dtype=self.dtype)
