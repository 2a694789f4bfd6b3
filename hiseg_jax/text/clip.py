"""Flax CLIP (Hugging Face `CLIPModel` semantics): image and text towers, mask embeddings.

Both towers are pre-LN transformers (LayerNorm -> self-attention -> residual,
LayerNorm -> MLP with `hidden_act`, quick_gelu for OpenAI CLIP -> residual).

* Image tower: non-overlapping patch convolution (no bias), a learned class
  token prepended, absolute position embeddings, `pre_layrnorm`, the encoder,
  `post_layernorm` on the class token, `visual_projection` (no bias).
* Text tower: token + position embeddings, causal self-attention (padding keys
  also masked when an attention mask is given), `final_layer_norm`, pooling at
  the end-of-text token, `text_projection` (no bias). End-of-text position:
  with the legacy `eos_token_id == 2` the argmax of the ids (the EOT id is the
  largest in OpenAI's vocabulary), otherwise the first position holding
  `eos_token_id` (transformers 5.x `CLIPTextTransformer`).

Mask embeddings for HIPIE's CLIP ensemble (`get_mask_embeddings`) follow the
reference (MaskCLIP, as HIPIE's `open_vocab/clip.py` does it): for M masks,
M extra tokens initialised from the class token (after `pre_layrnorm`) are
prepended; every layer runs with an attention mask in which no token attends
to the mask tokens, and mask token m attends to the class token and to the
patches where mask m is on (max of the mask probability over the patch >= 0.5).
Image and class tokens are computed exactly as without masks. The mask tokens
then go through `post_layernorm` and `visual_projection`. A mask covering the
whole image gives the image embedding.

`mask_pool` is the simpler alternative: the average of dense projected patch
features (`get_dense_image_features`) inside each mask, resized to the patch
grid.

Parameter names mirror the Hugging Face module tree (`text_model/...`,
`vision_model/...`, `visual_projection`, `text_projection`, `logit_scale`), so
`clip_convert` maps them one to one.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from hiseg_jax.layers.attention import MultiHeadAttention
from hiseg_jax.text.activations import get_activation

LOGIT_SCALE_MAX = 100.0


@dataclasses.dataclass(frozen=True)
class CLIPTowerConfig:
  """One CLIP transformer tower (text or vision).

  Attributes:
    hidden_size: width D.
    intermediate_size: MLP width.
    num_hidden_layers: number of encoder layers.
    num_attention_heads: heads per attention.
    hidden_act: MLP activation ('quick_gelu' for OpenAI CLIP).
    layer_norm_eps: LayerNorm epsilon.
    vocab_size: text only, number of token ids.
    max_position_embeddings: text only, longest sequence.
    eos_token_id: text only, end-of-text id (2 selects the legacy argmax rule).
    image_size: vision only, input side in pixels.
    patch_size: vision only, patch side in pixels.
    num_channels: vision only, input channels.
  """
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  vocab_size: int = 0
  max_position_embeddings: int = 0
  eos_token_id: int = 0
  image_size: int = 0
  patch_size: int = 0
  num_channels: int = 3


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A CLIP model: the two towers and the shared embedding width.

  Attributes:
    text: text tower config.
    vision: vision tower config.
    projection_dim: width of the joint embedding space.
    logit_scale_init_value: initial log of the logit scale.
  """
  text: CLIPTowerConfig
  vision: CLIPTowerConfig
  projection_dim: int
  logit_scale_init_value: float = 2.6592


def _layer_norm(config: CLIPTowerConfig, dtype: Any, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=dtype,
                      name=name)


class CLIPMLP(nn.Module):
  """fc1 -> activation -> fc2.

  Attributes:
    config: the tower.
    dtype: computation dtype.
  """
  config: CLIPTowerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Applies the MLP.

    Args:
      x: [B, T, D] tokens.

    Returns:
      [B, T, D] tokens.
    """
    h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name='fc1')(x)  # [B, T, I]
    h = get_activation(self.config.hidden_act)(h)  # [B, T, I]
    return nn.Dense(self.config.hidden_size, dtype=self.dtype, name='fc2')(h)  # [B, T, D]


class CLIPEncoderLayer(nn.Module):
  """One pre-LN layer: LayerNorm -> self-attention -> residual, LayerNorm -> MLP -> residual.

  Attributes:
    config: the tower.
    dtype: computation dtype.
  """
  config: CLIPTowerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, attend: Optional[jnp.ndarray]) -> jnp.ndarray:
    """Applies the layer.

    Args:
      x: [B, T, D] tokens.
      attend: optional [B, T, T] bool, True where a query may attend to a key.

    Returns:
      [B, T, D] tokens.
    """
    cfg = self.config
    h = _layer_norm(cfg, self.dtype, 'layer_norm1')(x)  # [B, T, D]
    x = x + MultiHeadAttention(cfg.num_attention_heads, dtype=self.dtype, name='self_attn')(
        h, h, h, mask=attend)  # [B, T, D]
    h = _layer_norm(cfg, self.dtype, 'layer_norm2')(x)  # [B, T, D]
    return x + CLIPMLP(cfg, self.dtype, name='mlp')(h)  # [B, T, D]


class CLIPEncoder(nn.Module):
  """Stack of `CLIPEncoderLayer`s named `layers_{i}`.

  Attributes:
    config: the tower.
    dtype: computation dtype.
  """
  config: CLIPTowerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, attend: Optional[jnp.ndarray]) -> jnp.ndarray:
    """Runs the layers.

    Args:
      x: [B, T, D] tokens.
      attend: optional [B, T, T] bool, True where a query may attend to a key.

    Returns:
      [B, T, D] tokens.
    """
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, self.dtype, name=f'layers_{i}')(x, attend)  # [B, T, D]
    return x


class CLIPTextEmbeddings(nn.Module):
  """Token + absolute position embeddings.

  Attributes:
    config: the text tower.
  """
  config: CLIPTowerConfig

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray) -> jnp.ndarray:
    """Embeds token ids.

    Args:
      input_ids: [B, T] int ids.

    Returns:
      [B, T, D] embeddings.
    """
    cfg = self.config
    init = nn.initializers.normal(0.02)
    tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init,
                   name='token_embedding')(input_ids)  # [B, T, D]
    pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                   name='position_embedding')(jnp.arange(input_ids.shape[1]))  # [T, D]
    return tok + pos[None]  # [B, T, D]


class CLIPTextTransformer(nn.Module):
  """CLIP text tower up to the pooled end-of-text feature (before projection).

  Attributes:
    config: the text tower.
    dtype: computation dtype.
  """
  config: CLIPTowerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray,
               attention_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Encodes token ids.

    Args:
      input_ids: [B, T] int ids, T <= max_position_embeddings.
      attention_mask: optional [B, T], 1 on real tokens.

    Returns:
      [B, D] final-LayerNormed feature at each sequence's end-of-text token.
    """
    cfg = self.config
    if input_ids.ndim != 2:
      raise ValueError(f'CLIP text: input_ids must be [B, T], got {input_ids.shape}')
    b, t = input_ids.shape
    if t > cfg.max_position_embeddings:
      raise ValueError(f'CLIP text: length {t} exceeds max_position_embeddings '
                       f'{cfg.max_position_embeddings}')
    attend = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None], (b, t, t))  # [B, T, T]
    if attention_mask is not None:
      if attention_mask.shape != (b, t):
        raise ValueError(f'CLIP text: attention_mask {attention_mask.shape} != {(b, t)}')
      attend = attend & (attention_mask[:, None, :] > 0)  # [B, T, T]
    x = CLIPTextEmbeddings(cfg, name='embeddings')(input_ids)  # [B, T, D]
    x = CLIPEncoder(cfg, self.dtype, name='encoder')(x, attend)  # [B, T, D]
    x = _layer_norm(cfg, self.dtype, 'final_layer_norm')(x)  # [B, T, D]
    if cfg.eos_token_id == 2:
      eos = jnp.argmax(input_ids, axis=-1)  # [B]
    else:
      eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)  # [B]
    return jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]  # [B, D]


class CLIPVisionEmbeddings(nn.Module):
  """Patch embedding, class token and position embeddings.

  Attributes:
    config: the vision tower.
    dtype: computation dtype.
  """
  config: CLIPTowerConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jnp.ndarray) -> jnp.ndarray:
    """Embeds an image.

    Args:
      pixel_values: [B, S, S, C] normalised image, S = image_size.

    Returns:
      [B, 1 + N, D] class token then N = (S / patch)^2 patch tokens, row-major.
    """
    cfg = self.config
    p, d = cfg.patch_size, cfg.hidden_size
    cls = self.param('class_embedding', nn.initializers.normal(d ** -0.5), (d,))  # [D]
    x = nn.Conv(d, (p, p), strides=(p, p), padding='VALID', use_bias=False, dtype=self.dtype,
                name='patch_embedding')(pixel_values)  # [B, S/p, S/p, D]
    b = x.shape[0]
    x = x.reshape(b, -1, d)  # [B, N, D]
    cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d))  # [B, 1, D]
    x = jnp.concatenate([cls, x], axis=1)  # [B, 1+N, D]
    n = (cfg.image_size // p) ** 2 + 1
    pos = nn.Embed(n, d, embedding_init=nn.initializers.normal(0.02),
                   name='position_embedding')(jnp.arange(n))  # [1+N, D]
    return x + pos[None]  # [B, 1+N, D]


class CLIPVisionTransformer(nn.Module):
  """CLIP image tower: embeddings, pre-LN, encoder; post-LN applied by the callers.

  Attributes:
    config: the vision tower.
    dtype: computation dtype.
  """
  config: CLIPTowerConfig
  dtype: Any = jnp.float32

  def setup(self):
    self.embeddings = CLIPVisionEmbeddings(self.config, self.dtype)
    self.pre_layrnorm = _layer_norm(self.config, self.dtype, None)
    self.encoder = CLIPEncoder(self.config, self.dtype)
    self.post_layernorm = _layer_norm(self.config, self.dtype, None)

  def _check(self, pixel_values: jnp.ndarray):
    cfg = self.config
    want = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
      raise ValueError(f'CLIP vision: pixel_values must be [B, {want[0]}, {want[1]}, {want[2]}]'
                       f' (NHWC), got {pixel_values.shape}')

  def __call__(self, pixel_values: jnp.ndarray) -> jnp.ndarray:
    """Encodes an image.

    Args:
      pixel_values: [B, S, S, C] normalised image.

    Returns:
      [B, 1 + N, D] post-LayerNormed tokens (class token first).
    """
    self._check(pixel_values)
    x = self.pre_layrnorm(self.embeddings(pixel_values))  # [B, 1+N, D]
    x = self.encoder(x, None)  # [B, 1+N, D]
    return self.post_layernorm(x)  # [B, 1+N, D]

  def mask_tokens(self, pixel_values: jnp.ndarray, visible: jnp.ndarray) -> jnp.ndarray:
    """MaskCLIP: class-token copies that only see their mask's patches.

    Args:
      pixel_values: [B, S, S, C] normalised image.
      visible: [B, M, N] bool, patch n is inside mask m.

    Returns:
      [B, M, D] post-LayerNormed mask tokens.
    """
    self._check(pixel_values)
    x = self.pre_layrnorm(self.embeddings(pixel_values))  # [B, 1+N, D]
    b, n1, d = x.shape
    m = visible.shape[1]
    if visible.shape != (b, m, n1 - 1):
      raise ValueError(f'CLIP mask tokens: visible {visible.shape} is not [{b}, M, {n1 - 1}]')
    x = jnp.concatenate([jnp.broadcast_to(x[:, :1], (b, m, d)), x], axis=1)  # [B, M+1+N, D]
    t = m + n1
    attend = jnp.ones((b, t, t), bool).at[:, :, :m].set(False)  # [B, T, T]
    attend = attend.at[:, :m, m + 1:].set(visible)  # [B, T, T]
    x = self.encoder(x, attend)  # [B, M+1+N, D]
    return self.post_layernorm(x[:, :m])  # [B, M, D]


class CLIP(nn.Module):
  """CLIP with both towers; call the methods through `apply(..., method=...)`.

  Attributes:
    config: the model.
    dtype: computation dtype.
  """
  config: CLIPConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.text_model = CLIPTextTransformer(cfg.text, self.dtype)
    self.vision_model = CLIPVisionTransformer(cfg.vision, self.dtype)
    self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
    self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
    self.logit_scale = self.param('logit_scale', nn.initializers.constant(
        cfg.logit_scale_init_value), ())

  def __call__(self, input_ids: jnp.ndarray, pixel_values: jnp.ndarray,
               attention_mask: Optional[jnp.ndarray] = None):
    """Image and text embeddings (used to initialise all parameters).

    Args:
      input_ids: [Bt, T] int text ids.
      pixel_values: [Bi, S, S, C] normalised images.
      attention_mask: optional [Bt, T] text mask.

    Returns:
      image embeddings [Bi, P] and text embeddings [Bt, P] (not normalised).
    """
    return (self.get_image_features(pixel_values),
            self.get_text_features(input_ids, attention_mask))

  def get_text_features(self, input_ids: jnp.ndarray,
                        attention_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Text embeddings.

    Args:
      input_ids: [B, T] int ids with an end-of-text token per row.
      attention_mask: optional [B, T], 1 on real tokens.

    Returns:
      [B, P] projected (not normalised) text embeddings.
    """
    return self.text_projection(self.text_model(input_ids, attention_mask))  # [B, P]

  def get_image_features(self, pixel_values: jnp.ndarray) -> jnp.ndarray:
    """Image embeddings.

    Args:
      pixel_values: [B, S, S, C] normalised images.

    Returns:
      [B, P] projected (not normalised) image embeddings.
    """
    return self.visual_projection(self.vision_model(pixel_values)[:, 0])  # [B, P]

  def get_dense_image_features(self, pixel_values: jnp.ndarray) -> jnp.ndarray:
    """Projected patch tokens of the last layer (post-LayerNorm, as the class token).

    Args:
      pixel_values: [B, S, S, C] normalised images.

    Returns:
      [B, S/p, S/p, P] per-patch embeddings.
    """
    x = self.visual_projection(self.vision_model(pixel_values)[:, 1:])  # [B, N, P]
    g = self.config.vision.image_size // self.config.vision.patch_size
    return x.reshape(x.shape[0], g, g, x.shape[-1])  # [B, g, g, P]

  def get_mask_embeddings(self, pixel_values: jnp.ndarray,
                          mask_probs: jnp.ndarray) -> jnp.ndarray:
    """Per-mask embeddings by MaskCLIP attention masking (HIPIE's CLIP ensemble).

    Args:
      pixel_values: [B, S, S, C] normalised images.
      mask_probs: [B, M, S, S] mask probabilities at the image resolution
        (HIPIE passes sigmoid(mask logits) resized bilinearly to S x S; binary
        masks work as they are).

    Returns:
      [B, M, P] projected (not normalised) mask embeddings.
    """
    v = self.config.vision
    s, p = v.image_size, v.patch_size
    b, m = mask_probs.shape[:2]
    if mask_probs.shape != (pixel_values.shape[0], m, s, s):
      raise ValueError(f'CLIP mask embeddings: mask_probs {mask_probs.shape} is not '
                       f'[{pixel_values.shape[0]}, M, {s}, {s}]')
    g = s // p
    patch_max = mask_probs.reshape(b, m, g, p, g, p).max(axis=(3, 5))  # [B, M, g, g]
    visible = patch_max.reshape(b, m, g * g) >= 0.5  # [B, M, N]
    return self.visual_projection(self.vision_model.mask_tokens(pixel_values, visible))  # [B, M, P]

  def similarity_logits(self, image_embeds: jnp.ndarray, text_embeds: jnp.ndarray) -> jnp.ndarray:
    """Scaled cosine similarity, scale = min(exp(logit_scale), 100) as in HIPIE's MaskCLIP.

    Args:
      image_embeds: [..., P] image or mask embeddings.
      text_embeds: [K, P] text embeddings.

    Returns:
      [..., K] logits.
    """
    a = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)  # [..., P]
    t = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)  # [K, P]
    scale = jnp.minimum(jnp.exp(self.logit_scale), LOGIT_SCALE_MAX)  # []
    return scale * jnp.einsum('...p,kp->...k', a, t)  # [..., K]


def mask_pool(dense_features: jnp.ndarray, masks: jnp.ndarray) -> jnp.ndarray:
  """Average of dense patch features inside each mask (resized to the patch grid).

  Args:
    dense_features: [B, h, w, C] per-patch features (`get_dense_image_features`).
    masks: [B, M, H, W] binary masks or probabilities at any resolution; they
      are resized bilinearly to [h, w] and used as weights.

  Returns:
    [B, M, C] weighted means (zeros for a mask with no weight on the grid).
  """
  b, h, w, c = dense_features.shape
  if masks.ndim != 4 or masks.shape[0] != b:
    raise ValueError(f'mask_pool: masks {masks.shape} is not [{b}, M, H, W]')
  m = masks.shape[1]
  weights = jax.image.resize(masks.astype(jnp.float32), (b, m, h, w), 'linear')  # [B, M, h, w]
  weights = jnp.clip(weights, 0.0, None)  # [B, M, h, w]
  total = jnp.einsum('bmhw,bhwc->bmc', weights, dense_features.astype(jnp.float32))  # [B, M, C]
  area = weights.sum(axis=(2, 3))[..., None]  # [B, M, 1]
  return total / jnp.maximum(area, 1e-12)  # [B, M, C]
