"""HIPIE's VL_Align head: token-level classification logits from query-text similarity.

For queries `q` [B, Q, D] and text tokens `e` [B, T, L] (the reference's
`VL_Align`, a GLIP dot-product token head)::

  e_hat  = e / max(||e||_2, 1e-12)
  tokens = Linear_{L -> D}(e_hat / 2)                        [B, T, D]
  bias   = e_hat . bias_lang + bias0                          [B, T]
  logits = clamp(q tokens^T / exp(log_scale) + bias, +-5e4)   [B, Q, T]

`log_scale` is a learned scalar initialised to 0, `bias_lang` a learned [L]
vector initialised to 0 and `bias0` a learned scalar initialised to
`-log((1 - p) / p)` with prior probability p = 0.01 (= -log 99). The image-side
projection is the identity.

The reference returns the logits of padded tokens unchanged and drops them in
the loss (`masked_select` on the text mask). With static shapes we instead set
them to `PADDED_TOKEN_LOGIT` when a text mask is given: sigmoid underflows to
exactly 0 there, so a token sigmoid focal loss summed over all tokens equals
the reference's sum over the real tokens, and the value stays finite (no NaN
in BCE-with-logits or its gradient).

Parameter names follow the torch module: `dot_product_projection_text`
(Dense, torch-default init), `log_scale` [1], `bias_lang` [L], `bias0` [1].
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from hiseg_jax.layers.init import prior_bias
from hiseg_jax.layers.init import torch_default_bias
from hiseg_jax.layers.init import torch_default_kernel

# Logit clamp of the reference (float16-safe bound).
LOGIT_CLAMP = 50000.0
# Logit given to padded text tokens when a text mask is passed.
PADDED_TOKEN_LOGIT = -LOGIT_CLAMP


class VLAlign(nn.Module):
  """Query-to-text-token logits of HIPIE (reference `VL_Align`).

  Attributes:
    hidden_dim: query width D (256); the text projection maps L -> D.
    prior_prob: prior probability that sets the initial `bias0` (0.01).
    log_scale_init: initial `log_scale` (the reference's `DYHEAD.LOG_SCALE`, 0.0).
    dtype: computation dtype (normalisation and logits are float32).
  """
  hidden_dim: int = 256
  prior_prob: float = 0.01
  log_scale_init: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self,
               queries: jnp.ndarray,
               text: jnp.ndarray,
               text_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Computes token logits.

    Args:
      queries: [B, Q, hidden_dim] decoder query features.
      text: [B, T, L] text token features (L = 768 for BERT-base).
      text_mask: optional [B, T] bool or {0, 1}, 1 on real tokens; padded
        tokens then get `PADDED_TOKEN_LOGIT`.

    Returns:
      [B, Q, T] float32 logits.

    Raises:
      ValueError: on inconsistent shapes.
    """
    if (queries.ndim != 3 or text.ndim != 3 or queries.shape[0] != text.shape[0]
        or queries.shape[-1] != self.hidden_dim
        or (text_mask is not None and text_mask.shape != text.shape[:2])):
      raise ValueError(
          f'VLAlign: expected queries [B, Q, {self.hidden_dim}], text [B, T, L] and '
          f'text_mask [B, T]; got queries {queries.shape}, text {text.shape}, text_mask '
          f'{None if text_mask is None else text_mask.shape}')
    lang_dim = text.shape[-1]
    log_scale = self.param('log_scale', nn.initializers.constant(self.log_scale_init),
                           (1,))  # [1]
    bias_lang = self.param('bias_lang', nn.initializers.zeros, (lang_dim,))  # [L]
    bias0 = self.param('bias0', prior_bias(self.prior_prob), (1,))  # [1]

    text = text.astype(jnp.float32)  # [B, T, L]
    norm = jnp.sqrt(jnp.sum(text * text, axis=-1, keepdims=True))  # [B, T, 1]
    text = text / jnp.maximum(norm, 1e-12)  # [B, T, L]
    tokens = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=torch_default_kernel,
                      bias_init=torch_default_bias(lang_dim),
                      name='dot_product_projection_text')(text / 2.0)  # [B, T, D]
    token_bias = text @ bias_lang + bias0  # [B, T]
    logits = jnp.einsum('bqd,btd->bqt', queries, tokens,
                        preferred_element_type=jnp.float32)  # [B, Q, T]
    logits = logits / jnp.exp(log_scale) + token_bias[:, None, :]  # [B, Q, T]
    logits = jnp.clip(logits, -LOGIT_CLAMP, LOGIT_CLAMP)  # [B, Q, T]
    if text_mask is not None:
      logits = jnp.where(text_mask.astype(bool)[:, None, :], logits,
                         PADDED_TOKEN_LOGIT)  # [B, Q, T]
    return logits
