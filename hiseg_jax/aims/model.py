"""The AIMS model: image encoder, mask prompt encoder, three level decoders, TCM and AM.

Data flow (AIMS Sec. 3, Fig. 3):
  image -> backbone -> pixel decoder -> F_2 (mask features, stride 4) and
  F_3, F_4, F_5 (strides 8, 16, 32) (Eq. 1), plus stride-2 mask features F_1
  for the levels of `fine_mask_levels` (our option for small canvases, see
  `MSDeformAttnPixelDecoder`; empty in the paper's model);
  [MPE] prompt -> M_2..M_5, F'_s = F_s + M_s for s = 2..5 (Eq. 10-11), and
  F'_1 = F_1 + M_2 upscaled by 2;
  three level decoders (part, entity, relation) run block by block in lock
  step: masked cross-attention (to F'_5, F'_4, F'_3 round-robin in the paper;
  `decoder_strides` can shift this one scale finer, to F'_4, F'_3, F'_2, for
  small canvases) -> self-attention -> [TCM E-P and R-E] -> FFN
  (Eq. 2, 5-7), with a prediction (objectness logit, mask logits on F'_2, or
  on F'_1 for the fine levels, Eq. 3) from the learnable queries and after
  every block;
  [AM] association logits from the final LayerNorm'd query embeddings (the
  embeddings the heads read) (Eq. 8). AM is applied to the final embeddings
  only; the auxiliary predictions carry no association maps.

With `use_mpe`, `use_tcm` or `use_am` False the corresponding module is not
built: its parameters are absent from the tree (AIMS Table 3a ablations), and
without MPE the prompt is ignored.
"""

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from hiseg_jax.aims.association import AssociationModule
from hiseg_jax.aims.level_decoder import LevelDecoder
from hiseg_jax.aims.mask_prompt_encoder import MaskPromptEncoder
from hiseg_jax.aims.task_complementarity import TaskComplementarityBlock
from hiseg_jax.backbones.resnet import ResNet
from hiseg_jax.pixel_decoder import MSDeformAttnPixelDecoder

LEVELS = ('part', 'entity', 'relation')


class AIMSModel(nn.Module):
  """All-Inclusive Multi-Level Segmentation model.

  Parameter tree: `backbone`, `pixel_decoder`, `mpe` (with use_mpe),
  `part_decoder`, `entity_decoder`, `relation_decoder`, `tcm_{i}` per block
  (with use_tcm), `association` (with use_am).

  Attributes:
    backbone: module mapping (image [B, H, W, 3], train=bool) to a dict of
      'res2'..'res5' NHWC features.
    pixel_decoder: module mapping (features, deterministic=bool) to
      (mask_features [B, H/4, W/4, mask_dim], [F_5, F_4, F_3] low resolution
      first, each [B, h, w, conv_dim], stride-2 mask features
      [B, H/2, W/2, mask_dim] or None).
    num_queries: queries per level, (part, entity, relation).
    hidden_dim: query width D.
    num_heads: attention heads.
    ffn_dim: FFN hidden width.
    dec_layers: attention blocks per level decoder.
    pre_norm: pre-norm instead of post-norm decoder layers.
    dropout: dropout rate of the decoder layers (0 in AIMS).
    use_mpe: build the mask prompt encoder.
    use_tcm: build the task complementarity modules.
    use_am: build the association module.
    assoc_dim: projection width of the association module.
    mpe_hidden_dims: widths of the MPE's two stride-2 blocks.
    fine_mask_levels: levels whose masks are predicted on the stride-2 mask
      features (the pixel decoder must output them exactly when this is
      non-empty).
    decoder_strides: strides of the feature maps the level decoders attend to
      round-robin, low resolution first: (32, 16, 8) is F_5, F_4, F_3 (the
      paper's); 4 names the (prompt-fused) mask features F_2.
  """
  backbone: nn.Module
  pixel_decoder: nn.Module
  num_queries: Tuple[int, int, int] = (100, 100, 100)
  hidden_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  dec_layers: int = 9
  pre_norm: bool = False
  dropout: float = 0.0
  use_mpe: bool = True
  use_tcm: bool = True
  use_am: bool = True
  assoc_dim: int = 256
  mpe_hidden_dims: Tuple[int, int] = (4, 16)
  fine_mask_levels: Tuple[str, ...] = ()
  decoder_strides: Tuple[int, ...] = (32, 16, 8)

  @nn.compact
  def __call__(self, image: jnp.ndarray, prompt_mask: Optional[jnp.ndarray] = None,
               train: bool = False) -> Dict[str, Any]:
    """Runs AIMS on a batch.

    Args:
      image: float [B, H, W, 3] normalised image; H and W divisible by 32.
      prompt_mask: [B, H, W] binary mask prompt (the area to segment); None
        means the full image. Ignored without MPE.
      train: training mode (dropout on, backbone in training mode).

    Returns:
      {'part' | 'entity' | 'relation': {'logits': [B, Q_T] objectness logits,
      'masks': [B, Q_T, H/s, W/s] mask logits (s = 2 for the fine levels, else
      4), 'aux': list of dec_layers dicts
      with the same two keys for the earlier predictions (the learnable
      queries first)}, and with use_am 'assoc_ep': [B, Qe, Qp] and
      'assoc_re': [B, Qr, Qe] association logits}.
    """
    if image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(f'AIMSModel: image shape {image.shape} is not [B, H, W, 3]')
    b, h, w, _ = image.shape
    if h % 32 or w % 32:
      raise ValueError(f'AIMSModel: image size {h}x{w} must be divisible by 32')
    if prompt_mask is not None and prompt_mask.shape != (b, h, w):
      raise ValueError(f'AIMSModel: prompt_mask shape {prompt_mask.shape} is not '
                       f'{(b, h, w)} (the image batch and size)')
    if len(self.num_queries) != len(LEVELS):
      raise ValueError(f'AIMSModel: num_queries {self.num_queries} must give '
                       f'{len(LEVELS)} counts (part, entity, relation)')
    deterministic = not train

    features = self.backbone(image, train=train)  # {'stem', 'res2'..'res5': [B, h_s, w_s, C_s]}
    unknown = set(self.fine_mask_levels) - set(LEVELS)
    if unknown:
      raise ValueError(f'AIMSModel: fine_mask_levels {sorted(unknown)} are not in {LEVELS}')
    # [B, H/4, W/4, M], 3 x [B, h, w, C], [B, H/2, W/2, M] or None
    mask_features, multi_scale, fine = self.pixel_decoder(features, deterministic=deterministic)
    multi_scale = list(multi_scale)
    if mask_features.shape[1:3] != (h // 4, w // 4):
      raise ValueError(f'AIMSModel: mask features {mask_features.shape} are not at '
                       f'stride 4 of the {h}x{w} image')
    if (fine is not None) != bool(self.fine_mask_levels):
      raise ValueError(f'AIMSModel: fine_mask_levels {tuple(self.fine_mask_levels)} needs the '
                       'pixel decoder to output stride-2 mask features exactly when non-empty')
    if fine is not None and fine.shape[1:] != (h // 2, w // 2, mask_features.shape[-1]):
      raise ValueError(f'AIMSModel: stride-2 mask features {fine.shape} are not '
                       f'[B, {h // 2}, {w // 2}, {mask_features.shape[-1]}]')

    if self.use_mpe:
      if prompt_mask is None:
        prompt_mask = jnp.ones((b, h, w), jnp.float32)  # [B, H, W]
      widths = {x.shape[-1] for x in multi_scale} | {mask_features.shape[-1]}
      if len(widths) != 1:
        raise ValueError('AIMSModel: MPE adds one map to every feature scale, so F_2..F_5 '
                         f'must share their width; got {sorted(widths)}')
      sizes = [mask_features.shape[1:3]] + [x.shape[1:3] for x in multi_scale]
      if fine is not None:
        sizes.append(fine.shape[1:3])
      prompts = MaskPromptEncoder(widths.pop(), tuple(self.mpe_hidden_dims), name='mpe')(
          prompt_mask, sizes)  # M_2 [B, H/4, W/4, C], then one map per scale
      mask_features = mask_features + prompts[0]  # [B, H/4, W/4, C]
      multi_scale = [x + m for x, m in zip(multi_scale, prompts[1:4])]  # 3 x [B, h, w, C]
      if fine is not None:
        fine = fine + prompts[4]  # [B, H/2, W/2, C]
    level_features = {level: fine if level in self.fine_mask_levels else mask_features
                      for level in LEVELS}  # each [B, H/s, W/s, M]
    by_stride = {h // x.shape[1]: x for x in multi_scale + [mask_features]}  # F'_5 .. F'_2
    strides = tuple(self.decoder_strides)
    if not strides or not set(strides) <= set(by_stride) or list(strides) != sorted(
        set(strides), reverse=True):
      raise ValueError(f'AIMSModel: decoder_strides {strides} must be distinct strides from '
                       f'{sorted(by_stride, reverse=True)}, low resolution (large stride) first')
    attended_maps = [by_stride[s] for s in strides]  # each [B, H/s, W/s, C]

    decoders, memory, tgt, query_pos, preds = {}, {}, {}, {}, {}
    for level, nq in zip(LEVELS, self.num_queries):
      decoders[level] = LevelDecoder(
          num_queries=nq, hidden_dim=self.hidden_dim, input_dim=attended_maps[0].shape[-1],
          mask_dim=mask_features.shape[-1], num_heads=self.num_heads, ffn_dim=self.ffn_dim,
          num_layers=self.dec_layers, num_feature_levels=len(attended_maps),
          pre_norm=self.pre_norm, dropout=self.dropout, name=f'{level}_decoder')
      memory[level] = decoders[level].memory(attended_maps)  # per scale [B, hw, D]
      tgt[level], query_pos[level] = decoders[level].initial_queries(b)  # [B, Q, D] x 2
      # logits [B, Q], masks [B, Q, H/s, W/s], embedding [B, Q, D]
      preds[level] = [decoders[level].predict(tgt[level], level_features[level])]

    for i in range(self.dec_layers):
      attended = {
          level: decoders[level].attend(i, tgt[level], query_pos[level], memory[level],
                                        preds[level][-1], deterministic)  # [B, Q, D]
          for level in LEVELS}
      if self.use_tcm:
        attended = TaskComplementarityBlock(
            self.num_heads, self.ffn_dim, self.dropout, self.pre_norm,
            name=f'tcm_{i}')(attended, query_pos, deterministic)  # each [B, Q, D]
      for level in LEVELS:
        tgt[level] = decoders[level].feed_forward(i, attended[level], deterministic)  # [B, Q, D]
        preds[level].append(
            decoders[level].predict(tgt[level], level_features[level]))  # as above

    outputs: Dict[str, Any] = {}
    for level in LEVELS:
      final = preds[level][-1]
      outputs[level] = {
          'logits': final.logits,  # [B, Q]
          'masks': final.masks,  # [B, Q, H/s, W/s]
          'aux': [{'logits': p.logits, 'masks': p.masks} for p in preds[level][:-1]],
      }
    if self.use_am:
      outputs.update(AssociationModule(self.assoc_dim, name='association')(
          {level: preds[level][-1].embedding for level in LEVELS}))  # [B, Qe, Qp], [B, Qr, Qe]
    return outputs


# config.model keys read by `build_aims_model` (besides `name`, `backbone`, `pixel_decoder`).
_MODEL_KEYS = ('num_queries', 'hidden_dim', 'num_heads', 'ffn_dim', 'dec_layers', 'pre_norm',
               'dropout', 'use_mpe', 'use_tcm', 'use_am', 'assoc_dim', 'mpe_hidden_dims',
               'fine_mask_levels', 'decoder_strides')


def build_aims_model(model_config: ml_collections.ConfigDict) -> AIMSModel:
  """Builds AIMSModel from `config.model`.

  Args:
    model_config: `config.model` with `name`, `backbone` (ResNet fields:
      depths, widths, stem_width, norm), `pixel_decoder`
      (MSDeformAttnPixelDecoder fields: conv_dim, mask_dim,
      num_encoder_layers, ffn_dim, num_heads, num_points, norm_groups and
      optionally dropout), and the AIMSModel fields num_queries (one int for
      every level or (part, entity, relation)), hidden_dim, num_heads,
      ffn_dim, dec_layers, pre_norm, dropout, use_mpe, use_tcm, use_am,
      assoc_dim, mpe_hidden_dims, fine_mask_levels (the pixel decoder outputs
      stride-2 mask features exactly when these are non-empty), decoder_strides.

  Returns:
    The AIMSModel.

  Raises:
    ValueError: naming unknown or missing keys of config.model.
  """
  known = set(_MODEL_KEYS) | {'name', 'backbone', 'pixel_decoder'}
  present = set(model_config.keys())
  if present != known:
    raise ValueError(f'config.model: unknown keys {sorted(present - known)}, missing keys '
                     f'{sorted(known - present)} (AIMS reads {sorted(known)})')
  num_queries = model_config.num_queries
  if isinstance(num_queries, int):
    num_queries = (num_queries,) * len(LEVELS)
  subs = {}
  fine_mask_levels = tuple(model_config.fine_mask_levels)
  for key, cls, extra in (
      ('backbone', ResNet, {}),
      ('pixel_decoder', MSDeformAttnPixelDecoder,
       {'fine_mask_features': bool(fine_mask_levels)})):
    try:
      subs[key] = cls(**model_config[key].to_dict(), **extra)
    except TypeError as e:
      raise ValueError(f'config.model.{key}: {e}') from e
  fields = {k: model_config[k] for k in _MODEL_KEYS if k != 'num_queries'}
  fields['mpe_hidden_dims'] = tuple(fields['mpe_hidden_dims'])
  fields['fine_mask_levels'] = fine_mask_levels
  fields['decoder_strides'] = tuple(fields['decoder_strides'])
  return AIMSModel(num_queries=tuple(num_queries), **subs, **fields)
