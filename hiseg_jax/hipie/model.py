"""The HIPIE model: ResNet + BERT, early fusion for things, decoupled thing and stuff decoders.

Data flow (HIPIE Eq. 1 and Sec. 3.3-3.5; `DDETRSegmUniDN.coco_forward` / `coco_inference`):

  image -> backbone -> res3, res4, res5 (F_v)
  prompt tokens -> BERT (`text_encoder`; prompts over 512 tokens run as chunks) -> F_t [B, T, L]
  things: `thing_encoder` (input projections, the `fusion` bi-attention block, 6 deformable
          layers) -> memory and fused text F'_t -> `thing_decoder` (two-stage DINO decoder,
          CondInst masks, VL_Align token logits against F'_t, IoU head)
  stuff:  `stuff_decoder` (MaskDINO pixel decoder on the raw backbone features, MaskDINO decoder)
          with its VL_Align heads scored against the fused text F'_t (detection) or the
          mean-pooled fused text as a single token (grounding), as the reference's
          `post_process_maskdino` receives `language_dict_features` after the transformer.

Parameter groups are the top-level names: `backbone`, `text_encoder`, `fusion` (the reference's
`vl_layers`), `thing_encoder`, `thing_decoder`, `stuff_decoder`; the fusion block is held by the
model and used inside `thing_encoder`.

The stuff branch ignores `image_sizes`: MaskDINO's encoder builds all-valid masks and its
decoder uses valid ratios of 1, as in the reference.
"""

import dataclasses
from typing import Any, Dict, Optional

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from hiseg_jax.backbones.resnet import ResNet
from hiseg_jax.hipie.fused_encoder import FusedEncoder
from hiseg_jax.hipie.fusion import BiAttentionBlock
from hiseg_jax.hipie.stuff_decoder import StuffDecoder
from hiseg_jax.hipie.thing_decoder import ThingDecoder
from hiseg_jax.text.bert import Bert
from hiseg_jax.text.bert import BertConfig
from hiseg_jax.text.prompts import pool_sentence_features
from hiseg_jax.text.prompts import sentence_as_first_token

TASKS = ('detection', 'grounding')


class HIPIEModel(nn.Module):
  """Hierarchical open-vocabulary universal segmentation model (HIPIE).

  Attributes:
    backbone: module mapping (image [B, H, W, 3], train=bool) to {'res2'..'res5'} NHWC features.
    text_encoder: `Bert`, (ids [N, L], mask [N, L], deterministic=bool) -> [N, L, text_dim].
    fusion: the `BiAttentionBlock` of the thing branch.
    thing_encoder: `FusedEncoder` whose `fusion_block` is `fusion`.
    thing_decoder: `ThingDecoder`.
    stuff_decoder: `StuffDecoder`.
  """
  backbone: nn.Module
  text_encoder: nn.Module
  fusion: nn.Module
  thing_encoder: nn.Module
  thing_decoder: nn.Module
  stuff_decoder: nn.Module

  def encode_text(self, text_ids: jnp.ndarray, text_mask: jnp.ndarray,
                  text_index: Optional[jnp.ndarray] = None, deterministic: bool = True):
    """Runs BERT on the prompt tokens, chunk by chunk when `text_index` is given.

    Args:
      text_ids: int [B, T] token ids (T <= BERT's max positions), or with `text_index`
        int [B, K, L] chunk ids (`hiseg_jax.text.prompts.PromptChunks.input_ids` per image).
      text_mask: [B, T] (or [B, K, L] with `text_index`), 1 on real tokens.
      text_index: optional int [B, T]: position t of image b is row text_index[b, t] of that
        image's chunks flattened to [K * L] (`PromptChunks.token_index`), -1 past its prompt.
      deterministic: disables BERT's dropout when True.

    Returns:
      (features [B, T, text_dim] last hidden states, mask bool [B, T]).
    """
    if text_index is None:
      if text_ids.ndim != 2 or text_mask.shape != text_ids.shape:
        raise ValueError(f'HIPIEModel: text_ids {text_ids.shape} / text_mask {text_mask.shape} '
                         'are not both [B, T] (pass text_index for chunked prompts)')
      features = self.text_encoder(text_ids, text_mask,
                                   deterministic=deterministic)  # [B, T, L]
      return features, text_mask.astype(bool)
    if text_ids.ndim != 3 or text_mask.shape != text_ids.shape or text_index.ndim != 2:
      raise ValueError(f'HIPIEModel: chunked text_ids {text_ids.shape} / text_mask '
                       f'{text_mask.shape} are not both [B, K, L], or text_index '
                       f'{text_index.shape} is not [B, T]')
    b, k, l = text_ids.shape
    if text_index.shape[0] != b:
      raise ValueError(f'HIPIEModel: text_index {text_index.shape} does not match the '
                       f'{b} images of text_ids {text_ids.shape}')
    hidden = self.text_encoder(text_ids.reshape(b * k, l), text_mask.reshape(b * k, l),
                               deterministic=deterministic)  # [B*K, L, H]
    hidden = hidden.reshape(b, k * l, hidden.shape[-1])  # [B, K*L, H]
    index = jnp.maximum(text_index, 0)  # [B, T]
    features = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [B, T, H]
    chunk_mask = jnp.take_along_axis(text_mask.reshape(b, k * l), index, axis=1)  # [B, T]
    mask = (text_index >= 0) & (chunk_mask > 0)  # [B, T]
    return features, mask

  @nn.compact
  def __call__(self, image: jnp.ndarray, text_ids: jnp.ndarray, text_mask: jnp.ndarray,
               dn_targets: Optional[Dict[str, jnp.ndarray]] = None,
               image_sizes: Optional[jnp.ndarray] = None, train: bool = False,
               task: str = 'detection',
               text_index: Optional[jnp.ndarray] = None,
               grounding: Optional[jnp.ndarray] = None) -> Dict[str, Any]:
    """Runs HIPIE on a batch.

    Args:
      image: float [B, H, W, 3] normalised image canvas; H and W multiples of 32.
      text_ids: int [B, T] prompt token ids (class prompt or referring sentence), or chunks
        [B, K, L] with `text_index` (see `encode_text`).
      text_mask: 1 on real tokens, same shape as `text_ids`.
      dn_targets: optional ground truth for the denoising queries of both decoders, used when
        `train`: 'boxes' [B, N, 4] normalised cxcywh (all segments, things and stuff),
        'valid' [B, N] bool, and 'positive_map' [B, N, T] for the thing decoder's
        `dn_label_source='tokens'`. The box noise draws from the 'dropout' rng.
      image_sizes: optional int [B, 2] (height, width) of the valid image on the canvas
        (None: the whole canvas); honoured by the thing branch.
      train: training mode (dropout, denoising, masks of every decoder layer).
      task: 'detection' (token logits against the class prompt) or 'grounding' (one logit per
        query against the pooled sentence).
      text_index: optional int [B, T] for chunked prompts (see `encode_text`).
      grounding: optional bool [B] for a batch that mixes tasks (with `task='detection'`): the
        samples marked True run in referring mode on the full token axis, their pooled sentence
        at token 0 (`hiseg_jax.text.prompts.sentence_as_first_token`), for both decoders.

    Returns:
      {'things': the `ThingDecoder` outputs (incl. 'text' [B, T, text_dim] fused text and
      'text_mask'), 'stuff': the `StuffDecoder` outputs}; token axes are T (detection, and with
      `grounding`) or 1 (task 'grounding').
    """
    if task not in TASKS:
      raise ValueError(f'HIPIEModel: task {task!r} is not one of {TASKS}')
    if grounding is not None and (task != 'detection' or grounding.shape != image.shape[:1]):
      raise ValueError(f'HIPIEModel: per-sample grounding {grounding.shape} needs '
                       f"task='detection' (got {task!r}) and one flag per image")
    if image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(f'HIPIEModel: image shape {image.shape} is not [B, H, W, 3]')
    b, h, w, _ = image.shape
    if h % 32 or w % 32:
      raise ValueError(f'HIPIEModel: image size {h}x{w} must be divisible by 32 (pad the '
                       'canvas as the reference does)')
    if text_ids.shape[0] != b:
      raise ValueError(f'HIPIEModel: text_ids {text_ids.shape} does not match the {b} images')
    deterministic = not train
    dn = dn_targets if train else None

    features = self.backbone(image, train=train)  # {'res2'..'res5': [B, h_s, w_s, C_s]}
    text, mask = self.encode_text(text_ids, text_mask, text_index,
                                  deterministic)  # [B, T, L], [B, T]
    encoded, shapes = self.thing_encoder(features, text, mask, image_sizes,
                                         deterministic)  # memory [B, S, D], text [B, T, L]
    things = self.thing_decoder(encoded, shapes, text, mask, dn, image_sizes, train,
                                grounding=task == 'grounding' if grounding is None else grounding)
    fused = encoded['text']  # [B, T, L]
    if task == 'grounding':
      stuff_text = pool_sentence_features(fused, mask)[:, None, :]  # [B, 1, L]
      stuff_mask = jnp.ones((b, 1), bool)  # [B, 1]
    elif grounding is not None:
      stuff_text, stuff_mask = sentence_as_first_token(fused, mask, grounding)  # [B, T, L]
    else:
      stuff_text, stuff_mask = fused, mask  # [B, T, L], [B, T]
    stuff = self.stuff_decoder(features, stuff_text, dn, train, text_mask=stuff_mask)
    return {'things': things, 'stuff': stuff}


# Keys of config.model.things read by the thing encoder and the thing decoder.
_THING_SHARED = ('d_model', 'num_heads', 'ffn_dim', 'num_levels', 'num_points', 'dropout')
_THING_ENCODER = {'num_encoder_layers': 'num_layers', 'norm_groups': 'norm_groups'}
_THING_DECODER = ('num_decoder_layers', 'num_queries', 'num_bg_queries', 'dn_number',
                  'box_noise_scale', 'dn_label_source', 'look_forward_twice', 'dynamic_channels',
                  'dynamic_layers', 'mask_out_stride', 'masks_every_layer', 'prior_prob')
# Keys of config.model.fusion.
_FUSION = ('embed_dim', 'num_heads', 'dropout')
_SECTIONS = ('backbone', 'text_encoder', 'fusion', 'things', 'stuff')


def _section(model_config: ml_collections.ConfigDict, key: str, allowed) -> Dict[str, Any]:
  """config.model.<key> as a dict, rejecting keys outside `allowed`."""
  values = model_config[key].to_dict()
  unknown = sorted(set(values) - set(allowed))
  if unknown:
    raise ValueError(f'config.model.{key}: unknown keys {unknown}; allowed {sorted(allowed)}')
  return values


def build_hipie_model(model_config: ml_collections.ConfigDict) -> HIPIEModel:
  """Builds HIPIEModel from `config.model`.

  Args:
    model_config: `config.model` with `name` and the sections `backbone` (ResNet fields:
      depths, widths, stem_width, norm), `text_encoder` (BertConfig fields), `fusion`
      (embed_dim, num_heads, dropout), `things` (d_model, num_heads, ffn_dim, num_levels,
      num_points, dropout, num_encoder_layers, norm_groups and the ThingDecoder fields
      num_decoder_layers, num_queries, num_bg_queries, dn_number, box_noise_scale,
      dn_label_source, look_forward_twice, dynamic_channels, dynamic_layers, mask_out_stride,
      masks_every_layer, prior_prob) and `stuff` (StuffDecoder fields). A section's missing
      keys take the module defaults (the r50 sizes). The text width of the fusion block and
      the thing branch is BERT's hidden size; the fusion layer scale starts at
      1 / num_encoder_layers.

  Returns:
    The HIPIEModel.

  Raises:
    ValueError: naming unknown or missing sections or unknown keys of config.model.
  """
  present = set(model_config.keys())
  known = set(_SECTIONS) | {'name'}
  if present != known:
    raise ValueError(f'config.model: unknown keys {sorted(present - known)}, missing keys '
                     f'{sorted(known - present)} (HIPIE reads {sorted(known)})')
  backbone = ResNet(**_section(model_config, 'backbone',
                               [f.name for f in dataclasses.fields(ResNet)
                                if f.name not in ('parent', 'name', 'dtype')]))
  text_config = BertConfig(**_section(model_config, 'text_encoder',
                                      [f.name for f in dataclasses.fields(BertConfig)]))
  if text_config.hidden_size % text_config.num_attention_heads:
    raise ValueError(f'config.model.text_encoder: hidden_size {text_config.hidden_size} is not '
                     f'divisible by num_attention_heads {text_config.num_attention_heads}')
  text_dim = text_config.hidden_size
  things = _section(model_config, 'things',
                    _THING_SHARED + tuple(_THING_ENCODER) + _THING_DECODER)
  shared = {k: things[k] for k in _THING_SHARED if k in things}
  encoder_fields = {field: things[k] for k, field in _THING_ENCODER.items() if k in things}
  decoder_fields = {k: things[k] for k in _THING_DECODER if k in things}
  d_model = shared.get('d_model', ThingDecoder.d_model)
  num_layers = encoder_fields.get('num_layers', FusedEncoder.num_layers)
  fusion_fields = _section(model_config, 'fusion', _FUSION)
  fusion = BiAttentionBlock(v_dim=d_model, l_dim=text_dim, init_values=1.0 / num_layers,
                            **fusion_fields)
  stuff_keys = [f.name for f in dataclasses.fields(StuffDecoder)
                if f.name not in ('parent', 'name', 'dtype')]
  return HIPIEModel(
      backbone=backbone,
      text_encoder=Bert(text_config),
      fusion=fusion,
      thing_encoder=FusedEncoder(text_dim=text_dim, fusion_block=fusion, **shared,
                                 **encoder_fields),
      thing_decoder=ThingDecoder(text_dim=text_dim, **shared, **decoder_fields),
      stuff_decoder=StuffDecoder(**_section(model_config, 'stuff', stuff_keys)))


def model_config(variant: str) -> ml_collections.ConfigDict:
  """`config.model` of a HIPIE variant.

  Args:
    variant: 'r50' (the reference's ResNet-50 model: bert-base-uncased, fusion 2048-d with 8
      heads, thing branch d 256 with 6 + 6 layers and 900 queries, MaskDINO stuff branch with
      300 queries and 9 layers) or 'runlocal' (every module present at small sizes: a 2-layer,
      64-wide BERT, one bottleneck per ResNet stage, 2 + 2 thing layers, 3 stuff layers).

  Returns:
    The ConfigDict `build_hipie_model` reads.
  """
  if variant not in ('r50', 'runlocal'):
    raise ValueError(f"hipie model_config: unknown variant {variant!r}; use 'r50' or 'runlocal'")
  small = variant == 'runlocal'
  config = ml_collections.ConfigDict()
  config.name = 'hipie'
  config.backbone = ml_collections.ConfigDict({
      'depths': (1, 1, 1, 1) if small else (3, 4, 6, 3),
      'widths': (16, 32, 64, 128) if small else (64, 128, 256, 512),
      'stem_width': 16 if small else 64,
      'norm': 'frozen_bn',
  })
  config.text_encoder = ml_collections.ConfigDict({
      'vocab_size': 30522,
      'hidden_size': 64 if small else 768,
      'num_hidden_layers': 2 if small else 12,
      'num_attention_heads': 4 if small else 12,
      'intermediate_size': 128 if small else 3072,
      'hidden_act': 'gelu',
      'hidden_dropout_prob': 0.1,
      'attention_probs_dropout_prob': 0.1,
      'max_position_embeddings': 512,
      'type_vocab_size': 2,
      'layer_norm_eps': 1e-12,
      'initializer_range': 0.02,
  })
  config.fusion = ml_collections.ConfigDict({
      'embed_dim': 128 if small else 2048,
      'num_heads': 4 if small else 8,
      'dropout': 0.1,
  })
  config.things = ml_collections.ConfigDict({
      'd_model': 64 if small else 256,
      'num_heads': 4 if small else 8,
      'ffn_dim': 128 if small else 2048,
      'num_levels': 4,
      'num_points': 2 if small else 4,
      'dropout': 0.0,
      'num_encoder_layers': 2 if small else 6,
      'norm_groups': 8 if small else 32,
      'num_decoder_layers': 2 if small else 6,
      'num_queries': 50 if small else 900,
      'num_bg_queries': 4 if small else 10,
      'dn_number': 20 if small else 100,
      'box_noise_scale': 1.0,
      'dn_label_source': 'prompt',
      'look_forward_twice': True,
      'dynamic_channels': 8,
      'dynamic_layers': 3,
      'mask_out_stride': 4,
      'masks_every_layer': True,
      'prior_prob': 0.01,
  })
  config.stuff = ml_collections.ConfigDict({
      'hidden_dim': 64 if small else 256,
      'mask_dim': 64 if small else 256,
      'num_encoder_layers': 2 if small else 6,
      'encoder_ffn_dim': 128 if small else 2048,
      'num_queries': 30 if small else 300,
      'num_decoder_layers': 3 if small else 9,
      'decoder_ffn_dim': 128 if small else 2048,
      'num_heads': 4 if small else 8,
      'num_points': 2 if small else 4,
      'norm_groups': 8 if small else 32,
      'dropout': 0.0,
      'dn_num': 20 if small else 100,
      'dn_noise_scale': 0.4,
      'label_enc_dropout': 0.1,
      'prior_prob': 0.01,
      'log_scale_init': 0.0,
  })
  return config
