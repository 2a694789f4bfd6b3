"""AIMS inference: one-step (all three levels) and prompt inference (one level within a mask).

Both functions have static output shapes and run under `jax.jit` (with
`canvas_hw`, `top_k`, `level`, `min_inside`, `mask_nms` and the model static).

One-step inference (full-image prompt): per level, the `top_k` queries with the
highest objectness probability are kept (all of them when Q <= top_k, the AIMS
default of 100 queries and top 100), their mask logits are bilinearly upsampled
to the padded input canvas and binarised at probability 0.5 inside the valid
(unpadded) area, and each is scored as objectness probability x mean mask
probability inside its binarised mask; the kept predictions are returned sorted
by that score. With `mask_nms` (our addition, off in the paper's setting) the
sorted scores are then decayed by Matrix NMS (`hiseg_jax.postprocess.matrix_nms`)
and the predictions re-sorted by the decayed scores. The association maps A_EP
and A_RE are the sigmoid of the association logits at the kept entity/part and
relation/entity queries, in the same order as the returned masks.

Masks come back at canvas size with everything outside the valid area False;
the caller crops them to `image_valid_hw` and resizes them to the original
image size. Their logits also come back, at the mask-feature stride, for
callers that resize the logits before binarising (as the evaluation does,
`eval.aims_eval.to_original`).
"""

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from hiseg_jax.aims.level_decoder import resize_mask_logits
from hiseg_jax.aims.model import LEVELS
from hiseg_jax.postprocess.matrix_nms import matrix_nms_decay


def _level_predictions(logits: jnp.ndarray, masks: jnp.ndarray, valid: jnp.ndarray,
                       top_k: int, mask_nms: bool) -> Dict[str, jnp.ndarray]:
  """Top-k binary masks and scores of one level.

  Args:
    logits: [B, Q] objectness logits.
    masks: [B, Q, h, w] mask logits at the mask-feature stride.
    valid: bool [B, H, W] valid canvas area (the masks are resized to H x W).
    top_k: number of predictions kept (at most Q).
    mask_nms: decay the scores by Matrix NMS (`hiseg_jax.postprocess.matrix_nms`) and re-sort.

  Returns:
    {'masks': bool [B, K, H, W], 'scores': [B, K] descending, 'indices':
    int32 [B, K] query indices, 'mask_logits': [B, K, h, w] float32}.
  """
  k = min(top_k, logits.shape[1])
  prob = jax.nn.sigmoid(logits.astype(jnp.float32))  # [B, Q]
  prob, idx = jax.lax.top_k(prob, k)  # [B, K], [B, K]
  low = jnp.take_along_axis(masks, idx[:, :, None, None], axis=1).astype(
      jnp.float32)  # [B, K, h, w]
  mask_prob = jax.nn.sigmoid(resize_mask_logits(low, valid.shape[1:]))  # [B, K, H, W]
  binary = (mask_prob > 0.5) & valid[:, None]  # [B, K, H, W]
  area = jnp.sum(binary, axis=(2, 3))  # [B, K]
  mask_score = jnp.sum(mask_prob * binary, axis=(2, 3)) / (area + 1e-6)  # [B, K]
  scores = prob * mask_score  # [B, K]
  scores, order = jax.lax.top_k(scores, k)  # [B, K], [B, K]
  if mask_nms:
    ranked = jnp.take_along_axis(binary, order[:, :, None, None], axis=1)  # [B, K, H, W]
    scores, resort = jax.lax.top_k(matrix_nms_decay(ranked, scores), k)  # [B, K], [B, K]
    order = jnp.take_along_axis(order, resort, axis=1)  # [B, K]
  return {
      'masks': jnp.take_along_axis(binary, order[:, :, None, None], axis=1),  # [B, K, H, W]
      'scores': scores,  # [B, K]
      'indices': jnp.take_along_axis(idx, order, axis=1).astype(jnp.int32),  # [B, K]
      'mask_logits': jnp.take_along_axis(low, order[:, :, None, None], axis=1),  # [B, K, h, w]
  }


def _gather_assoc(logits: jnp.ndarray, rows: jnp.ndarray, cols: jnp.ndarray) -> jnp.ndarray:
  """Association probabilities at kept query pairs.

  Args:
    logits: [B, Qa, Qb] association logits.
    rows: int [B, Ka] kept queries of the higher level.
    cols: int [B, Kb] kept queries of the lower level.

  Returns:
    [B, Ka, Kb] sigmoid probabilities.
  """
  sel = jnp.take_along_axis(logits, rows[:, :, None], axis=1)  # [B, Ka, Qb]
  sel = jnp.take_along_axis(sel, cols[:, None, :], axis=2)  # [B, Ka, Kb]
  return jax.nn.sigmoid(sel.astype(jnp.float32))  # [B, Ka, Kb]


def _valid_area(image_valid_hw: jnp.ndarray, batch: int, height: int,
                width: int) -> jnp.ndarray:
  """Boolean valid area of the canvas.

  Args:
    image_valid_hw: int [B, 2] valid (height, width) of each image.
    batch: B.
    height: canvas height H.
    width: canvas width W.

  Returns:
    bool [B, H, W], True inside the valid area.
  """
  if image_valid_hw.shape != (batch, 2):
    raise ValueError(f'AIMS inference: image_valid_hw shape {image_valid_hw.shape} is not '
                     f'[{batch}, 2]')
  rows = jnp.arange(height)[None, :, None] < image_valid_hw[:, 0, None, None]  # [B, H, 1]
  cols = jnp.arange(width)[None, None, :] < image_valid_hw[:, 1, None, None]  # [B, 1, W]
  return rows & cols  # [B, H, W]


def one_step(outputs: Dict[str, Any], image_valid_hw: jnp.ndarray, canvas_hw: Tuple[int, int],
             top_k: int = 100, mask_nms: bool = False) -> Dict[str, Any]:
  """One-step inference: part, entity and relation masks with scores, plus A_EP and A_RE.

  Args:
    outputs: the AIMSModel output dict (only the final 'logits' / 'masks' and
      the association logits are read).
    image_valid_hw: int [B, 2] valid (height, width) of each image inside the
      padded canvas.
    canvas_hw: static (H, W) of the canvas (the model's input image); the mask
      logits are resized to it.
    top_k: predictions kept per level (static; clipped to the query count).
    mask_nms: decay each level's scores by Matrix NMS and re-sort (static).

  Returns:
    {'part' | 'entity' | 'relation': {'masks': bool [B, K_T, H, W], 'scores':
    [B, K_T] sorted descending, 'indices': int32 [B, K_T] query indices,
    'mask_logits': float32 [B, K_T, h_T, w_T] the masks' logits at the level's
    mask-feature resolution}, and
    when the model has AM 'assoc_ep': [B, K_e, K_p] and 'assoc_re':
    [B, K_r, K_e] association probabilities between the returned predictions}.
  """
  b = outputs['entity']['masks'].shape[0]
  valid = _valid_area(image_valid_hw, b, *canvas_hw)  # [B, H, W]
  result: Dict[str, Any] = {
      level: _level_predictions(outputs[level]['logits'], outputs[level]['masks'], valid,
                                top_k, mask_nms)
      for level in LEVELS}
  if 'assoc_ep' in outputs:
    result['assoc_ep'] = _gather_assoc(outputs['assoc_ep'], result['entity']['indices'],
                                       result['part']['indices'])  # [B, Ke, Kp]
    result['assoc_re'] = _gather_assoc(outputs['assoc_re'], result['relation']['indices'],
                                       result['entity']['indices'])  # [B, Kr, Ke]
  return result


def restrict_to_prompt(predictions: Dict[str, jnp.ndarray], prompt_mask: jnp.ndarray,
                       min_inside: float = 0.5) -> Dict[str, jnp.ndarray]:
  """Keeps the predictions that lie mostly inside a prompt and cuts them to it.

  A prediction is kept when its mask has pixels inside the prompt and more than
  `min_inside` of its area lies inside; kept masks are intersected with the
  prompt, dropped ones get score 0, and the result is re-sorted by score
  (stable, so dropped predictions keep their order after the kept ones).

  Args:
    predictions: one level of `one_step`: {'masks': bool [B, K, H, W],
      'scores': [B, K], 'indices': int32 [B, K]}.
    prompt_mask: [B, H, W] binary prompt.
    min_inside: fraction of a mask that must lie inside the prompt.

  Returns:
    {'masks': bool [B, K, H, W] within the prompt, 'scores': [B, K]
    descending, 'keep': bool [B, K], 'indices': int32 [B, K]}.
  """
  if prompt_mask.shape != (predictions['masks'].shape[0],) + predictions['masks'].shape[2:]:
    raise ValueError(f'restrict_to_prompt: prompt_mask shape {prompt_mask.shape} does not '
                     f'match masks {predictions["masks"].shape}')
  prompt = prompt_mask.astype(bool)[:, None]  # [B, 1, H, W]
  inside = predictions['masks'] & prompt  # [B, K, H, W]
  inside_area = jnp.sum(inside, axis=(2, 3))  # [B, K]
  area = jnp.sum(predictions['masks'], axis=(2, 3))  # [B, K]
  keep = (inside_area > 0) & (inside_area > min_inside * area)  # [B, K]
  scores = jnp.where(keep, predictions['scores'], 0.0)  # [B, K]
  order = jnp.argsort(-scores, axis=1, stable=True)  # [B, K]
  return {
      'masks': jnp.take_along_axis(inside, order[:, :, None, None], axis=1),  # [B, K, H, W]
      'scores': jnp.take_along_axis(scores, order, axis=1),  # [B, K]
      'keep': jnp.take_along_axis(keep, order, axis=1),  # [B, K]
      'indices': jnp.take_along_axis(predictions['indices'], order, axis=1),  # [B, K]
  }


def prompt_inference(model: nn.Module, variables: Any, image: jnp.ndarray,
                     prompt_mask: jnp.ndarray, level: str,
                     image_valid_hw: Optional[jnp.ndarray] = None, top_k: int = 100,
                     min_inside: float = 0.5, mask_nms: bool = False) -> Dict[str, jnp.ndarray]:
  """Prompt inference: splits a given mask at the target level.

  The model runs with `prompt_mask` through the MPE (so the decoders see which
  area to segment); the predictions of the `level` decoder are then those of
  one-step inference, restricted to the prompt: a prediction is kept when more
  than `min_inside` of its mask lies inside the prompt, its mask is cut to the
  prompt, and dropped predictions get score 0 and sort last. For a model built
  without MPE the prompt only acts through this restriction.

  Args:
    model: the AIMSModel.
    variables: its variables ({'params': ...} and any collections).
    image: float [B, H, W, 3] normalised image.
    prompt_mask: [B, H, W] binary prompt (e.g. an entity mask to split into
      parts, with level 'part').
    level: 'part', 'entity' or 'relation'.
    image_valid_hw: int [B, 2] valid (height, width); None means the whole
      canvas.
    top_k: predictions considered (static).
    min_inside: fraction of a mask that must lie inside the prompt.
    mask_nms: decay the scores by Matrix NMS before the restriction (static).

  Returns:
    {'masks': bool [B, K, H, W] within the prompt, 'scores': [B, K] descending
    (0 for dropped predictions), 'keep': bool [B, K], 'indices': int32 [B, K]}.
  """
  if level not in LEVELS:
    raise ValueError(f'prompt_inference: level {level!r} is not one of {LEVELS}')
  b, h, w, _ = image.shape
  if prompt_mask.shape != (b, h, w):
    raise ValueError(f'prompt_inference: prompt_mask shape {prompt_mask.shape} is not '
                     f'{(b, h, w)}')
  if image_valid_hw is None:
    image_valid_hw = jnp.broadcast_to(jnp.array([h, w], jnp.int32), (b, 2))  # [B, 2]
  outputs = model.apply(variables, image, prompt_mask, train=False)
  valid = _valid_area(image_valid_hw, b, h, w)  # [B, H, W]
  pred = _level_predictions(outputs[level]['logits'], outputs[level]['masks'], valid,
                            top_k, mask_nms)
  return restrict_to_prompt(pred, prompt_mask, min_inside)
