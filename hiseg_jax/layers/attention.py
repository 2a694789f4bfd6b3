"""Multi-head attention and Mask2Former's masked-attention mask."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


class MultiHeadAttention(nn.Module):
  """Multi-head scaled dot-product attention, laid out like torch `nn.MultiheadAttention`.

  Parameters: Dense layers `q_proj`, `k_proj`, `v_proj` and `out_proj`, each a
  [D, D] kernel and a [D] bias. A torch state dict converts by splitting
  `in_proj_weight` [3D, D] / `in_proj_bias` [3D] into q, k, v thirds and
  transposing every weight (`out_proj.weight` -> `out_proj/kernel`).
  Kernels are Xavier-uniform and biases zero, as torch initialises them.

  Attributes:
    num_heads: number of heads; must divide the model width D.
    dropout: dropout rate on the attention probabilities.
    dtype: computation dtype (logits and softmax are computed in float32).
  """
  num_heads: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self,
               query: jnp.ndarray,
               key: jnp.ndarray,
               value: jnp.ndarray,
               mask: Optional[jnp.ndarray] = None,
               deterministic: bool = True) -> jnp.ndarray:
    """Attends from `query` to `key`/`value`.

    Args:
      query: [B, Nq, D] queries.
      key: [B, Nk, D] keys.
      value: [B, Nk, D] values.
      mask: optional bool [B, Nq, Nk] or [B, num_heads, Nq, Nk]; True where a
        query may attend. A row with no True entry attends uniformly (callers
        such as `masked_attention_mask` never produce one).
      deterministic: when False, applies dropout to the attention
        probabilities (needs a 'dropout' rng).

    Returns:
      [B, Nq, D] attended values after the output projection.
    """
    b, nq, d = query.shape
    nk = key.shape[1]
    if key.shape != (b, nk, d) or value.shape != (b, nk, d):
      raise ValueError(f'MultiHeadAttention: query {query.shape}, key {key.shape} '
                       f'and value {value.shape} must be [B,Nq,D], [B,Nk,D], [B,Nk,D]')
    if d % self.num_heads:
      raise ValueError(f'MultiHeadAttention: width {d} is not divisible by '
                       f'num_heads={self.num_heads}')
    dh = d // self.num_heads
    dense = lambda name: nn.Dense(
        d, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.zeros, name=name)
    q = dense('q_proj')(query).reshape(b, nq, self.num_heads, dh)  # [B, Nq, Hh, Dh]
    k = dense('k_proj')(key).reshape(b, nk, self.num_heads, dh)  # [B, Nk, Hh, Dh]
    v = dense('v_proj')(value).reshape(b, nk, self.num_heads, dh)  # [B, Nk, Hh, Dh]
    q = q * (dh ** -0.5)  # [B, Nq, Hh, Dh]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                        preferred_element_type=jnp.float32)  # [B, Hh, Nq, Nk]
    if mask is not None:
      if mask.ndim == 3 and mask.shape == (b, nq, nk):
        mask = mask[:, None]  # [B, 1, Nq, Nk]
      elif mask.shape != (b, self.num_heads, nq, nk):
        raise ValueError(f'MultiHeadAttention: mask shape {mask.shape} is neither '
                         f'[{b}, {nq}, {nk}] nor [{b}, {self.num_heads}, {nq}, {nk}]')
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)  # [B, Hh, Nq, Nk]
    probs = jax.nn.softmax(logits, axis=-1)  # [B, Hh, Nq, Nk]
    probs = nn.Dropout(self.dropout)(probs, deterministic=deterministic)  # [B, Hh, Nq, Nk]
    out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), v)  # [B, Nq, Hh, Dh]
    out = out.reshape(b, nq, d)  # [B, Nq, D]
    return dense('out_proj')(out)  # [B, Nq, D]


def masked_attention_mask(mask_logits: jnp.ndarray,
                          num_heads: Optional[int] = None) -> jnp.ndarray:
  """Mask2Former masked-attention mask from the previous mask prediction.

  A query may attend to a pixel where sigmoid(logit) >= 0.5 (Mask2Former masks
  where sigmoid < 0.5); a query whose row would be entirely masked attends
  everywhere instead. No gradient flows through the result.

  Args:
    mask_logits: [B, Nq, H, W] or [B, Nq, HW] mask logits, already resized to
      the attended feature map.
    num_heads: when given, the mask is broadcast to [B, num_heads, Nq, HW].

  Returns:
    bool [B, Nq, HW] (or [B, num_heads, Nq, HW]); True where attention is allowed.
  """
  if mask_logits.ndim == 4:
    b, nq, h, w = mask_logits.shape
    mask_logits = mask_logits.reshape(b, nq, h * w)  # [B, Nq, HW]
  elif mask_logits.ndim != 3:
    raise ValueError(f'masked_attention_mask: mask_logits shape {mask_logits.shape} '
                     'is neither [B, Nq, H, W] nor [B, Nq, HW]')
  mask_logits = jax.lax.stop_gradient(mask_logits)  # [B, Nq, HW]
  allowed = jax.nn.sigmoid(mask_logits.astype(jnp.float32)) >= 0.5  # [B, Nq, HW]
  empty = ~jnp.any(allowed, axis=-1, keepdims=True)  # [B, Nq, 1]
  allowed = allowed | empty  # [B, Nq, HW]
  if num_heads is not None:
    b, nq, hw = allowed.shape
    allowed = jnp.broadcast_to(allowed[:, None], (b, num_heads, nq, hw))  # [B, Hh, Nq, HW]
  return allowed
