"""HIPIE's thing decoder: two-stage DINO decoder with CondInst masks on the fused encoder memory.

Reference: HIPIE `DDETRSegmUniDN` (models/ddetrs_dn.py), `DeformableTransformerVLDINO` and its
decoder (deformable_transformer_dino.py), `DeformableDETRDINO` heads, with the r50 training
config (TWO_STAGE, MIXED_SELECTION, LOOK_FORWARD_TWICE, USE_DINO, DYNAMIC_LABEL_ENC,
DECOUPLE_TGT + STILL_TGT_FOR_BOTH, STILL_CLS_FOR_ENCODER, USE_IOU_BRANCH, 900 proposals, 10
background proposals, DN_NUMBER 100, BOX_NOISE_SCALE 1.0, DROPOUT 0.0, FFN 2048).

Pipeline:

1. Input: the outputs of `hiseg_jax.hipie.fused_encoder.FusedEncoder` (res3-res5 + a stride-64
   level, early fusion, 6 deformable encoder layers), which the model runs first.
2. Two-stage proposals: every unpadded encoder cell whose anchor box (cell centre, side
   0.05 * 2^level) lies inside (0.01, 0.99) gives `LN(Linear(memory))`; a class-agnostic
   objectness Linear (the reference's `Still_Classifier`, bias -log 99) scores it and a box MLP
   refines its anchor in inverse-sigmoid space (invalid cells get +inf there, box 1.0). The
   top-K cells by objectness logit become the reference boxes of the K matching queries
   (not detached, as in HIPIE).
3. Mixed query selection: the matching queries' content is a learned `tgt_embed` [K, D]
   (STILL_TGT_FOR_BOTH: also for referring). `num_bg_queries` extra queries with learned
   content and learned raw reference boxes sit before them (`TWO_STAGE_NUM_BG_PROPOSALS`).
4. Contrastive denoising (DINO `prepare_for_cdn`, HIPIE's DYNAMIC_LABEL_ENC variant): with N
   ground-truth slots, G = max(1, dn_number // N) groups of 2N queries (N positive, N negative)
   come first. Box noise moves each corner by U(0, 1) (positive) or U(1, 2) (negative) times
   half the box size with a random sign, clipped to [0, 1]. Content: HIPIE gives every
   denoising query of an image the same vector, `FeatureResizer(mean of the (unfused) text
   features over the prompt)` (`dn_label_source='prompt'`); `'tokens'` instead pools each
   ground truth's own tokens (its positive map). Padded slots get zero content and a zero
   inverse-sigmoid box, as the reference's padding. Attention mask: matching/background
   queries do not see denoising queries, and groups do not see each other.
5. Six decoder layers (self-attention -> deformable cross-attention -> FFN, each post-norm;
   `query_pos = MLP(sine(reference box))`), iterative box refinement
   `box_l = sigmoid(bbox_embed_l(h_l) + inverse_sigmoid(ref_l))`; the next layer's reference is
   `box_l` detached, while the reported box uses the previous layer's undetached box
   (look-forward-twice).
6. Per layer: VL_Align token logits (`class_embed_l`), IoU logit (`iou_head_l`, bias -log 99),
   controller `MLP(D, D, P, 3)` -> CondInst parameters; masks by `dynamic_mask_logits` on the
   `MaskHeadSmallConv` features of the encoder memory (stride 8, d/32 channels), located at the
   layer's input reference point (normalised by the valid image size, scaled by `image_sizes`).

Output contract of `ThingDecoder.__call__` (Q = num_queries, matching queries only;
T' = T, or 1 when `grounding` is True):

* 'logits' [B, Q, T'] token logits of the last layer (padded tokens -5e4).
* 'boxes' [B, Q, 4] normalised cxcywh (relative to the valid image).
* 'ious' [B, Q] IoU logits.
* 'masks' [B, Q, H/4, W/4] mask logits (H, W = canvas).
* 'mask_params' [B, Q, P], 'mask_locations' [B, Q, 2] normalised (x, y): the inputs of
  `dynamic_mask_logits`, so that a loss can compute masks of matched queries only.
* 'aux': one dict per earlier decoder layer with the keys above ('masks' only when training
  with `masks_every_layer`, the default; inference computes the last layer's masks only, as the
  reference's `coco_inference`).
* 'enc': {'logits' [B, S, 1] objectness logits, 'boxes' [B, S, 4] (1.0 at invalid cells),
  'topk_index' [B, Q] int32} over all S encoder cells.
* 'dn': None without `dn_targets`; otherwise the same keys as the top level for the 2GN
  denoising queries (incl. 'aux', 'masks' of the last layer) plus 'groups' G,
  'group_size' 2N, 'padding_size' 2GN and 'query_gt' int32 [2GN] (the ground-truth slot of
  each positive denoising query, -1 for negatives); the reference supervises the positive ones.
* 'bg': None when `num_bg_queries` is 0, else the last layer's keys for the background
  queries (the reference weights their loss 0 and lists them before the matching queries at
  inference).
* 'text' [B, T, text_dim] fused text features (the stuff decoder's class head uses them),
  'text_mask' [B, T'] bool, 'mask_feats' [B, H/8, W/8, D/32].

Known deviations from the reference: the denoising queries' masks use their own reference
points (the reference indexes the matching queries' references for them); the denoising
padding N is the static number of ground-truth slots rather than the batch's largest count;
the transformer's query-level `FeatureResizer` is omitted (HIPIE multiplies it by 0).
"""

import functools
from typing import Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hiseg_jax.hipie.decoder_layer import DeformableDecoderLayer
from hiseg_jax.hipie.dynamic_mask_head import dynamic_mask_logits
from hiseg_jax.hipie.dynamic_mask_head import dynamic_param_counts
from hiseg_jax.hipie.query_utils import HeadMLP
from hiseg_jax.hipie.query_utils import cdn_attention_mask
from hiseg_jax.hipie.query_utils import encoder_output_proposals
from hiseg_jax.hipie.query_utils import inverse_sigmoid
from hiseg_jax.hipie.query_utils import sine_box_embedding
from hiseg_jax.hipie.vl_align import VLAlign
from hiseg_jax.layers.init import kaiming_uniform_a1
from hiseg_jax.layers.init import prior_bias
from hiseg_jax.layers.init import torch_default_bias
from hiseg_jax.layers.init import torch_default_kernel
from hiseg_jax.text.prompts import sentence_as_first_token


def cdn_num_groups(dn_number: int, num_slots: int) -> int:
  """Denoising groups for `num_slots` ground-truth slots: max(1, 2*dn_number // (2*num_slots))."""
  if num_slots < 1:
    raise ValueError(f'cdn_num_groups: num_slots={num_slots} must be >= 1')
  return max(1, (2 * dn_number) // (2 * num_slots))


def cdn_query_gt(num_groups: int, num_slots: int) -> np.ndarray:
  """Ground-truth slot of every denoising query (`compute_gt_indices`), -1 for negatives.

  Args:
    num_groups: denoising groups G.
    num_slots: ground-truth slots N.

  Returns:
    int32 [2 * G * N]: block 2g holds the positives of group g (slot j at 2gN + j), block
    2g + 1 its negatives.
  """
  blocks = np.full((2 * num_groups, num_slots), -1, np.int32)  # [2G, N]
  blocks[0::2] = np.arange(num_slots, dtype=np.int32)
  return blocks.reshape(-1)  # [2GN]


def cdn_noised_boxes(key: jax.Array, boxes: jnp.ndarray, num_groups: int,
                     box_noise_scale: float) -> jnp.ndarray:
  """Noised copies of the ground-truth boxes for every denoising block.

  Args:
    key: PRNG key.
    boxes: [B, N, 4] normalised cxcywh ground-truth boxes.
    num_groups: denoising groups G.
    box_noise_scale: noise scale (1.0); 0 disables the noise.

  Returns:
    [B, 2G, N, 4] cxcywh boxes; even blocks are positives (corner shifts below half the box
    size), odd blocks negatives (shifts between one and two halves), clipped to [0, 1].
  """
  b, n, _ = boxes.shape
  known = jnp.broadcast_to(boxes[:, None].astype(jnp.float32),
                           (b, 2 * num_groups, n, 4))  # [B, 2G, N, 4]
  if box_noise_scale <= 0:
    return known  # [B, 2G, N, 4]
  xyxy = jnp.concatenate([known[..., :2] - known[..., 2:] / 2,
                          known[..., :2] + known[..., 2:] / 2], axis=-1)  # [B, 2G, N, 4]
  diff = jnp.concatenate([known[..., 2:] / 2, known[..., 2:] / 2], axis=-1)  # [B, 2G, N, 4]
  sign_key, part_key = jax.random.split(key)
  sign = jax.random.randint(sign_key, known.shape, 0, 2).astype(jnp.float32)  # [B, 2G, N, 4]
  sign = sign * 2.0 - 1.0  # [B, 2G, N, 4] in {-1, 1}
  part = jax.random.uniform(part_key, known.shape)  # [B, 2G, N, 4]
  negative = (np.arange(2 * num_groups) % 2).astype(np.float32)  # [2G] 1 on negative blocks
  negative = negative[None, :, None, None]  # [1, 2G, 1, 1]
  part = (part + negative) * sign  # [B, 2G, N, 4]
  xyxy = jnp.clip(xyxy + part * diff * box_noise_scale, 0.0, 1.0)  # [B, 2G, N, 4]
  return jnp.concatenate([(xyxy[..., :2] + xyxy[..., 2:]) / 2,
                          xyxy[..., 2:] - xyxy[..., :2]], axis=-1)  # [B, 2G, N, 4]


def _masked_mean(features: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
  """sum_t w_t f_t / sum_t w_t over the token axis ([B, ..., T] weights, [B, T, C] features)."""
  weights = weights.astype(jnp.float32)  # [B, ..., T]
  total = jnp.einsum('b...t,btc->b...c', weights, features.astype(jnp.float32))  # [B, ..., C]
  return total / jnp.maximum(weights.sum(-1, keepdims=True), 1e-9)  # [B, ..., C]


def _nearest_resize(x: jnp.ndarray, size: Tuple[int, int]) -> jnp.ndarray:
  """torch `F.interpolate(mode='nearest')` of [B, h, w, C] to [B, H, W, C]."""
  h, w = x.shape[1:3]
  rows = np.floor(np.arange(size[0]) * (h / size[0])).astype(np.int32)  # [H]
  cols = np.floor(np.arange(size[1]) * (w / size[1])).astype(np.int32)  # [W]
  return x[:, rows][:, :, cols]  # [B, H, W, C]


class MaskHeadSmallConv(nn.Module):
  """UNINEXT / HIPIE mask branch (`MaskHeadSmallConv` without FPN inputs or RAFT).

  From the encoder memory at strides 8, 16, 32:
  relu(lay3(p32)) -> + p16 (nearest up) -> relu(lay4) -> + p8 (nearest up) -> relu(jia_dcn)
  -> relu(lay1: D -> D/4) -> relu(lay2: D/4 -> D/32). All 3x3 convs with padding 1,
  kaiming-uniform (a = 1) weights and zero biases.

  Attributes:
    dim: memory width D.
    dtype: computation dtype.
  """
  dim: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, p8: jnp.ndarray, p16: jnp.ndarray, p32: jnp.ndarray) -> jnp.ndarray:
    """Computes the mask-branch features.

    Args:
      p8: [B, H/8, W/8, D] encoder memory at stride 8.
      p16: [B, H/16, W/16, D] at stride 16.
      p32: [B, H/32, W/32, D] at stride 32.

    Returns:
      [B, H/8, W/8, D/32] features (after ReLU).
    """
    conv = lambda features, name: nn.Conv(
        features, (3, 3), padding=[(1, 1), (1, 1)], kernel_init=kaiming_uniform_a1,
        bias_init=nn.initializers.zeros, dtype=self.dtype, name=name)
    d = self.dim
    x = jax.nn.relu(conv(d, 'lay3')(p32))  # [B, H/32, W/32, D]
    x = p16 + _nearest_resize(x, p16.shape[1:3])  # [B, H/16, W/16, D]
    x = jax.nn.relu(conv(d, 'lay4')(x))  # [B, H/16, W/16, D]
    x = p8 + _nearest_resize(x, p8.shape[1:3])  # [B, H/8, W/8, D]
    x = jax.nn.relu(conv(d, 'jia_dcn')(x))  # [B, H/8, W/8, D]
    x = jax.nn.relu(conv(d // 4, 'lay1')(x))  # [B, H/8, W/8, D/4]
    return jax.nn.relu(conv(d // 32, 'lay2')(x))  # [B, H/8, W/8, D/32]


class ThingDecoder(nn.Module):
  """HIPIE's thing decoder from the fused encoder memory to boxes, token logits and masks.

  See the module docstring for the pipeline and the output contract.

  Attributes:
    d_model: width D (256); must equal the encoder memory's width.
    num_heads: attention heads (8).
    ffn_dim: FFN width of the decoder layers (2048).
    num_decoder_layers: decoder layers (6).
    num_levels: memory levels (4).
    num_points: sampling points per head and level (4).
    num_queries: two-stage proposals = matching queries K (900).
    num_bg_queries: background queries (10 in HIPIE's configs; 0 disables them).
    dn_number: DINO's `DN_NUMBER` (100): G = max(1, dn_number // N) groups.
    box_noise_scale: denoising box noise (1.0).
    dn_label_source: 'prompt' (HIPIE: pooled prompt) or 'tokens' (each ground truth's tokens).
    look_forward_twice: report boxes refined from the previous layer's undetached box (True).
    dropout: dropout of the decoder layers and the label resizer (0.0).
    text_dim: text feature width (768 for BERT-base).
    dynamic_channels: hidden width of the dynamic mask convs (8).
    dynamic_layers: dynamic 1x1 convs (`CTRL_LAYERS`, 3).
    mask_out_stride: stride of the mask logits (4; the mask features are at stride 8).
    masks_every_layer: when training, also compute full masks for the 'aux' layers of the
      matching and denoising queries (True). The reference computes masks of matched queries
      only; at r50 sizes (900 queries, 1024 px) all-query masks on 6 layers cost several GB,
      and a loss can instead gather matched queries' 'mask_params' / 'mask_locations' and call
      `dynamic_mask_logits` on 'mask_feats' with this False. Inference computes the last
      layer's masks only.
    prior_prob: focal prior of the objectness, IoU and VL_Align biases (0.01).
    dtype: computation dtype.
  """
  d_model: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  num_decoder_layers: int = 6
  num_levels: int = 4
  num_points: int = 4
  num_queries: int = 900
  num_bg_queries: int = 10
  dn_number: int = 100
  box_noise_scale: float = 1.0
  dn_label_source: str = 'prompt'
  look_forward_twice: bool = True
  dropout: float = 0.0
  text_dim: int = 768
  dynamic_channels: int = 8
  dynamic_layers: int = 3
  mask_out_stride: int = 4
  masks_every_layer: bool = True
  prior_prob: float = 0.01
  dtype: jnp.dtype = jnp.float32

  def _check(self, encoded, spatial_shapes, text_features, text_mask, dn_targets, image_sizes):
    """Raises ValueError on inputs that do not fit the contract; returns the batch size."""
    if self.d_model % 32 or self.d_model % self.num_heads:
      raise ValueError(f'ThingDecoder: d_model={self.d_model} must be a multiple of 32 and of '
                       f'num_heads={self.num_heads}')
    if self.dn_label_source not in ('prompt', 'tokens'):
      raise ValueError(f'ThingDecoder: dn_label_source={self.dn_label_source!r} is not '
                       "'prompt' or 'tokens'")
    missing = [k for k in ('memory', 'text', 'padding_mask', 'valid_ratios') if k not in encoded]
    if missing:
      raise ValueError(f'ThingDecoder: encoded lacks {missing}; got {sorted(encoded)} '
                       '(pass the outputs of FusedEncoder)')
    memory = encoded['memory']
    s = sum(h * w for h, w in spatial_shapes)
    if (memory.ndim != 3 or memory.shape[1:] != (s, self.d_model)
        or len(spatial_shapes) != self.num_levels):
      raise ValueError(f'ThingDecoder: encoded["memory"] shape {memory.shape} is not '
                       f'[B, {s}, {self.d_model}] for the {self.num_levels} levels '
                       f'{tuple(spatial_shapes)}')
    batch = memory.shape[0]
    if encoded['padding_mask'].shape != (batch, s):
      raise ValueError(f'ThingDecoder: encoded["padding_mask"] shape '
                       f'{encoded["padding_mask"].shape} is not [{batch}, {s}]')
    if (text_features.ndim != 3 or text_features.shape[0] != batch
        or text_features.shape[-1] != self.text_dim or text_mask.shape != text_features.shape[:2]
        or encoded['text'].shape != text_features.shape):
      raise ValueError(f'ThingDecoder: text_features {text_features.shape} / text_mask '
                       f'{text_mask.shape} / fused text {encoded["text"].shape} are not '
                       f'[{batch}, T, {self.text_dim}] / [{batch}, T] / [{batch}, T, '
                       f'{self.text_dim}]')
    if image_sizes is not None and image_sizes.shape != (batch, 2):
      raise ValueError(f'ThingDecoder: image_sizes shape {image_sizes.shape} is not [{batch}, 2]')
    if dn_targets is not None:
      need = ['boxes', 'valid'] + (['positive_map'] if self.dn_label_source == 'tokens' else [])
      missing = [k for k in need if k not in dn_targets]
      if missing:
        raise ValueError(f'ThingDecoder: dn_targets lack {missing}; got {sorted(dn_targets)}')
      boxes = dn_targets['boxes']
      if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4:
        raise ValueError(f'ThingDecoder: dn_targets["boxes"] shape {boxes.shape} is not '
                         f'[{batch}, N, 4]')
      if dn_targets['valid'].shape != boxes.shape[:2]:
        raise ValueError(f'ThingDecoder: dn_targets["valid"] shape {dn_targets["valid"].shape} '
                         f'is not {boxes.shape[:2]}')
      if ('positive_map' in need
          and dn_targets['positive_map'].shape != boxes.shape[:2] + text_mask.shape[1:]):
        raise ValueError(f'ThingDecoder: dn_targets["positive_map"] shape '
                         f'{dn_targets["positive_map"].shape} is not '
                         f'{boxes.shape[:2] + text_mask.shape[1:]}')
    if self.num_queries > s:
      raise ValueError(f'ThingDecoder: num_queries={self.num_queries} exceeds the {s} encoder '
                       f'cells of levels {tuple(spatial_shapes)}')
    return batch

  @nn.compact
  def __call__(self, encoded: Dict[str, jnp.ndarray],
               spatial_shapes: Sequence[Tuple[int, int]], text_features: jnp.ndarray,
               text_mask: jnp.ndarray, dn_targets: Optional[Dict[str, jnp.ndarray]] = None,
               image_sizes: Optional[jnp.ndarray] = None, train: bool = False,
               grounding: Union[bool, jnp.ndarray] = False) -> Dict:
    """Runs the thing decoder.

    Args:
      encoded: the first output of `FusedEncoder`: 'memory' [B, S, D], 'text' [B, T, text_dim]
        fused text, 'padding_mask' bool [B, S], 'valid_ratios' [B, L, 2].
      spatial_shapes: the second output of `FusedEncoder`, static ((H_l, W_l), ...), level 0
        at stride 8 of the H x W canvas.
      text_features: [B, T, text_dim] text-encoder token features before fusion (the
        denoising content pools them, as the reference does).
      text_mask: [B, T] bool or {0, 1}, True on real tokens.
      dn_targets: None, or ground truth for denoising: 'boxes' [B, N, 4] normalised cxcywh,
        'valid' [B, N] bool, and for `dn_label_source='tokens'` 'positive_map' [B, N, T].
        HIPIE denoises all ground-truth segments (things and stuff). The box noise draws from
        the 'dropout' rng.
      image_sizes: optional int [B, 2] (height, width) of the valid image on the canvas;
        None means the whole canvas.
      train: enables dropout (needs the 'dropout' rng) and the 'aux' masks.
      grounding: True: referring mode, logits against the mean-pooled fused text, T' = 1;
        a bool array [B]: per-sample referring mode for a batch mixing tasks, T' = T, with a
        referring sample's pooled-sentence logit at token 0 and the output 'text_mask' one-hot
        there (`hiseg_jax.text.prompts.sentence_as_first_token`).

    Returns:
      The dict described in the module docstring.
    """
    spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    b = self._check(encoded, spatial_shapes, text_features, text_mask, dn_targets, image_sizes)
    deterministic = not train
    d = self.d_model
    k = self.num_queries
    text_mask = text_mask.astype(bool)  # [B, T]
    memory = encoded['memory'].astype(self.dtype)  # [B, S, D]
    fused_text = encoded['text']  # [B, T, Lt]
    padding_mask = encoded['padding_mask']  # [B, S]
    valid_ratios = encoded['valid_ratios']  # [B, L, 2]
    shapes = spatial_shapes

    # Two-stage proposals and mixed query selection.
    anchors, keep = encoder_output_proposals(padding_mask, shapes)  # [B, S, 4], [B, S]
    out_mem = jnp.where(keep[..., None], memory, 0.0)  # [B, S, D]
    out_mem = nn.Dense(d, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                       bias_init=torch_default_bias(d), name='enc_output')(out_mem)  # [B, S, D]
    out_mem = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype,
                           name='enc_output_norm')(out_mem)  # [B, S, D]
    enc_logits = nn.Dense(1, dtype=self.dtype, kernel_init=torch_default_kernel,
                          bias_init=prior_bias(self.prior_prob),
                          name='enc_class')(out_mem).astype(jnp.float32)  # [B, S, 1]
    enc_unact = HeadMLP(d, 4, 3, zero_last=True, dtype=self.dtype, name='enc_bbox')(
        out_mem).astype(jnp.float32) + anchors  # [B, S, 4]
    topk_index = jax.lax.top_k(enc_logits[..., 0], k)[1]  # [B, K]
    topk_unact = jnp.take_along_axis(enc_unact, topk_index[..., None], axis=1)  # [B, K, 4]
    xavier = nn.initializers.xavier_uniform()
    tgt_embed = self.param('tgt_embed', xavier, (k, d))  # [K, D]
    contents = [jnp.broadcast_to(tgt_embed, (b, k, d))]  # [B, K, D]
    refs = [jax.nn.sigmoid(topk_unact)]  # [B, K, 4]
    nbg = self.num_bg_queries
    if nbg:
      bg_embed = self.param('tgt_embed_bg', xavier, (nbg, d))  # [Nbg, D]
      bg_refs = self.param('bg_query_refs', xavier, (nbg, 4))  # [Nbg, 4]
      contents.insert(0, jnp.broadcast_to(bg_embed, (b, nbg, d)))  # [B, Nbg, D]
      refs.insert(0, jnp.broadcast_to(bg_refs, (b, nbg, 4)))  # [B, Nbg, 4]

    # Contrastive denoising queries. The label resizer always runs so that its parameters
    # exist when the model is initialised without denoising targets.
    attn_mask = None
    pad = 0
    if dn_targets is None or self.dn_label_source == 'prompt':
      weights = text_mask[:, None, :]  # [B, 1, T]
    else:
      weights = dn_targets['positive_map']  # [B, N, T]
    pooled = _masked_mean(text_features, weights)  # [B, 1|N, Lt]
    label = nn.Dense(d, dtype=self.dtype, kernel_init=torch_default_kernel,
                     bias_init=torch_default_bias(self.text_dim),
                     name='label_resizer_fc')(pooled)  # [B, 1|N, D]
    label = nn.LayerNorm(epsilon=1e-12, dtype=self.dtype, name='label_resizer_norm')(label)
    label = nn.Dropout(self.dropout)(label, deterministic=deterministic)  # [B, 1|N, D]
    if dn_targets is not None:
      n = dn_targets['boxes'].shape[1]
      groups = cdn_num_groups(self.dn_number, n)
      pad = 2 * groups * n
      valid = dn_targets['valid'].astype(bool)[:, None, :, None]  # [B, 1, N, 1]
      content = jnp.where(valid, label[:, None], 0.0)  # [B, 2G|1, N, D]
      content = jnp.broadcast_to(content, (b, 2 * groups, n, d)).reshape(b, pad, d)  # [B, P, D]
      noised = cdn_noised_boxes(self.make_rng('dropout'), dn_targets['boxes'], groups,
                                self.box_noise_scale)  # [B, 2G, N, 4]
      noised = jnp.where(valid, inverse_sigmoid(noised), 0.0).reshape(b, pad, 4)  # [B, P, 4]
      contents.insert(0, content.astype(self.dtype))
      refs.insert(0, jax.nn.sigmoid(noised))  # [B, P, 4]
      allowed = cdn_attention_mask(groups, 2 * n, nbg + k)  # [Q', Q']
      attn_mask = jnp.broadcast_to(jnp.asarray(allowed), (b,) + allowed.shape)  # [B, Q', Q']
    tgt = jnp.concatenate(contents, axis=1)  # [B, Q', D]
    reference = jnp.concatenate(refs, axis=1).astype(jnp.float32)  # [B, Q', 4]

    # Mask branch features.
    starts = np.cumsum([0] + [h * w for h, w in shapes])  # [L + 1]
    levels = [memory[:, starts[i]:starts[i + 1]].reshape(b, h, w, d)
              for i, (h, w) in enumerate(shapes[:3])]  # 3 x [B, h, w, D]
    mask_feats = MaskHeadSmallConv(d, dtype=self.dtype, name='mask_head')(*levels)  # [B, h8, w8, C]
    canvas = jnp.asarray([shapes[0][0] * 8, shapes[0][1] * 8], jnp.int32)  # [2]
    sizes = image_sizes if image_sizes is not None else jnp.broadcast_to(canvas, (b, 2))  # [B, 2]
    weight_nums, bias_nums = dynamic_param_counts(d // 32, self.dynamic_channels,
                                                  self.dynamic_layers)
    masks_of = functools.partial(dynamic_mask_logits, mask_feats, image_sizes=sizes,
                                 mask_feat_stride=8, mask_out_stride=self.mask_out_stride,
                                 channels=self.dynamic_channels, num_layers=self.dynamic_layers)

    # Decoder with iterative box refinement and per-layer heads.
    if isinstance(grounding, bool) and grounding:
      cls_text = _masked_mean(fused_text, text_mask[:, None, :])  # [B, 1, Lt]
      cls_mask = None
      out_text_mask = jnp.ones((b, 1), bool)  # [B, 1]
    elif not isinstance(grounding, bool):
      cls_text, cls_mask = sentence_as_first_token(fused_text, text_mask,
                                                   grounding)  # [B, T, Lt], [B, T]
      out_text_mask = cls_mask
    else:
      cls_text, cls_mask, out_text_mask = fused_text, text_mask, text_mask
    ratios4 = jnp.concatenate([valid_ratios, valid_ratios], axis=-1)  # [B, L, 4]
    ref_point_head = HeadMLP(d, d, 2, kernel='xavier', dtype=self.dtype, name='ref_point_head')
    controller = HeadMLP(d, sum(weight_nums) + sum(bias_nums), 3, kernel='xavier', bias='zeros',
                         dtype=self.dtype, name='controller')
    ref_in = reference  # [B, Q', 4]
    ref_prev = reference  # [B, Q', 4]
    hs = tgt  # [B, Q', D]
    layers = []
    for lid in range(self.num_decoder_layers):
      ref_input = ref_in[:, :, None, :] * ratios4[:, None]  # [B, Q', L, 4]
      query_pos = ref_point_head(sine_box_embedding(ref_input[:, :, 0], d // 2))  # [B, Q', D]
      hs = DeformableDecoderLayer(
          d_model=d, num_heads=self.num_heads, ffn_dim=self.ffn_dim, num_levels=self.num_levels,
          num_points=self.num_points, dropout=self.dropout, dtype=self.dtype,
          name=f'decoder_layer_{lid}')(hs, query_pos, ref_input, memory, shapes, padding_mask,
                                       attn_mask, deterministic)  # [B, Q', D]
      delta = HeadMLP(d, 4, 3, zero_last=True, dtype=self.dtype,
                      name=f'bbox_embed_{lid}')(hs).astype(jnp.float32)  # [B, Q', 4]
      new_ref = jax.nn.sigmoid(delta + inverse_sigmoid(ref_in))  # [B, Q', 4]
      base = ref_prev if self.look_forward_twice else ref_in  # [B, Q', 4]
      layers.append({
          'logits': VLAlign(d, prior_prob=self.prior_prob, dtype=self.dtype,
                            name=f'class_embed_{lid}')(hs, cls_text, cls_mask),  # [B, Q', T']
          'boxes': jax.nn.sigmoid(delta + inverse_sigmoid(base)),  # [B, Q', 4]
          'ious': nn.Dense(1, dtype=self.dtype, kernel_init=torch_default_kernel,
                           bias_init=prior_bias(self.prior_prob),
                           name=f'iou_head_{lid}')(hs)[..., 0].astype(jnp.float32),  # [B, Q']
          'mask_params': controller(hs).astype(jnp.float32),  # [B, Q', P]
          'mask_locations': jax.nn.sigmoid(inverse_sigmoid(base))[..., :2],  # [B, Q', 2]
      })
      ref_prev = new_ref
      ref_in = jax.lax.stop_gradient(new_ref)  # [B, Q', 4]

    def part(start, stop, with_masks_last, with_masks_aux):
      """Per-layer outputs of queries [start, stop): the last layer's dict plus 'aux'."""
      outs = []
      for lid, layer in enumerate(layers):
        out = {key: value[:, start:stop] for key, value in layer.items()}
        last = lid == len(layers) - 1
        if (with_masks_last and last) or (with_masks_aux and not last):
          out['masks'] = masks_of(out['mask_params'], out['mask_locations'])  # [B, n, H/4, W/4]
        outs.append(out)
      final = outs[-1]
      final['aux'] = outs[:-1]
      return final

    aux_masks = self.masks_every_layer and train
    outputs = part(pad + nbg, pad + nbg + k, True, aux_masks)
    outputs['enc'] = {'logits': enc_logits, 'boxes': jax.nn.sigmoid(enc_unact),
                      'topk_index': topk_index.astype(jnp.int32)}
    outputs['dn'] = None
    if dn_targets is not None:
      dn = part(0, pad, True, aux_masks)
      dn.update(groups=groups, group_size=2 * n, padding_size=pad,
                query_gt=jnp.asarray(cdn_query_gt(groups, n)))
      outputs['dn'] = dn
    outputs['bg'] = None
    if nbg:
      bg = part(pad, pad + nbg, True, False)
      del bg['aux']
      outputs['bg'] = bg
    outputs['text'] = fused_text
    outputs['text_mask'] = out_text_mask
    outputs['mask_feats'] = mask_feats
    return outputs
