"""Sigmoid focal losses of HIPIE: elementwise, and over token logits (GLIP/UNINEXT).

`sigmoid_focal_loss` is RetinaNet's binary focal loss per element,
`FL = alpha_t (1 - p_t)^gamma BCE(logit, target)` with
`p_t = p t + (1 - p)(1 - t)` and `alpha_t = alpha t + (1 - alpha)(1 - t)`
(fvcore's `sigmoid_focal_loss`, reduction "none").

`token_sigmoid_focal_loss` is the reference's `token_sigmoid_binary_focal_loss`:
every (query, text token) logit is a binary problem whose target is the
positive map of the query's matched object (all zero for unmatched queries);
padded text tokens (`text_mask` 0) are dropped. The reference sums over every
remaining element; here the token sum is returned per query so the criterion
can drop inactive samples before summing, then divides by its normaliser.
The thing point-mask loss is `sigmoid_focal_loss(...).mean(-1)` over points.
"""

from typing import Optional

import jax
import jax.numpy as jnp


def sigmoid_focal_loss(logits: jax.Array,
                       targets: jax.Array,
                       alpha: float = 0.25,
                       gamma: float = 2.0) -> jax.Array:
  """Binary sigmoid focal loss per element.

  Args:
    logits: `[...]` logits.
    targets: `[...]` targets in `[0, 1]`, same shape.
    alpha: weight of the positive class (the negative class gets `1 - alpha`);
      a negative value disables the weighting, as fvcore.
    gamma: focusing exponent.

  Returns:
    `[...]` float32 loss.

  Raises:
    ValueError: on different shapes.
  """
  if logits.shape != targets.shape:
    raise ValueError(f'sigmoid_focal_loss: logits {logits.shape} and targets {targets.shape} '
                     f'must have one shape')
  logits = logits.astype(jnp.float32)  # [...]
  targets = targets.astype(jnp.float32)  # [...]
  prob = jax.nn.sigmoid(logits)  # [...]
  ce = targets * jax.nn.softplus(-logits) + (1 - targets) * jax.nn.softplus(logits)  # [...]
  p_t = prob * targets + (1 - prob) * (1 - targets)  # [...]
  loss = ce * (1 - p_t) ** gamma  # [...]
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss  # [...]
  return loss


def token_sigmoid_focal_loss(logits: jax.Array,
                             targets: jax.Array,
                             text_mask: Optional[jax.Array] = None,
                             alpha: float = 0.25,
                             gamma: float = 2.0) -> jax.Array:
  """Token-level sigmoid focal loss, summed over the real text tokens of each query.

  Args:
    logits: `[B, Q, T]` token logits.
    targets: `[B, Q, T]` targets: the positive map of each query's matched object,
      zero rows for unmatched queries.
    text_mask: optional `[B, T]` bool / {0, 1}, 1 on real tokens; None keeps all.
    alpha: focal alpha (0.25).
    gamma: focal gamma (2).

  Returns:
    `[B, Q]` per-query sums over tokens; `.sum()` is the reference's loss before
    its division by the number of boxes.

  Raises:
    ValueError: on inconsistent shapes.
  """
  if logits.ndim != 3 or targets.shape != logits.shape:
    raise ValueError(f'token_sigmoid_focal_loss: expected logits and targets [B, Q, T] of one '
                     f'shape; got {logits.shape} and {targets.shape}')
  loss = sigmoid_focal_loss(logits, targets, alpha, gamma)  # [B, Q, T]
  if text_mask is not None:
    if text_mask.shape != (logits.shape[0], logits.shape[2]):
      raise ValueError(f'token_sigmoid_focal_loss: text_mask must be [B, T] = '
                       f'{(logits.shape[0], logits.shape[2])}, got {text_mask.shape}')
    loss = jnp.where(text_mask[:, None, :] > 0, loss, 0.0)  # [B, Q, T]
  return loss.sum(-1)  # [B, Q]
