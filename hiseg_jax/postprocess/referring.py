"""HIPIE referring (grounding) post-processing: the top-1 query for the sentence.

For a referring expression the thing decoder scores each query against the whole sentence (one
"class"). As in berkeley-hipie/HIPIE `HIPIE_IMG.inference` with task "grounding" (at most one
instance), the score is sqrt(sigmoid(logit) · sigmoid(iou_logit)); NMS cannot remove the best
box, so the prediction is the query with the highest score. Its box and mask follow the
instance rules (`instances.instance_boxes`, `instances.instance_masks`, with the crop and
resize to the image's own size on the host); the reference drops a prediction whose clipped
box is empty, reported here as `valid=False`.
"""

import functools
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hiseg_jax.postprocess.instances import instance_boxes, instance_scores
from hiseg_jax.postprocess.resize import nearest_source_index, upsample_mask_logits


@functools.partial(jax.jit, static_argnames=('mask_stride', 'mask_threshold'))
def _referring_on_device(logits: jnp.ndarray, boxes: jnp.ndarray, mask_logits: jnp.ndarray,
                         iou_logits: Optional[jnp.ndarray], mask_stride: int,
                         mask_threshold: float) -> Dict[str, jnp.ndarray]:
  """Top-1 query, its box and canvas-resolution mask (static shapes)."""
  scores = instance_scores(logits, iou_logits)[:, 0]  # [Q]
  best = jnp.argmax(scores)  # []
  up = upsample_mask_logits(mask_logits[best][None], mask_stride)  # [1, H, W]
  return {'query': best, 'score': scores[best], 'box': boxes[best][None],  # [1, 4]
          'canvas_mask': jax.nn.sigmoid(up[0]) > mask_threshold}  # [H, W]


def referring_inference(logits: jnp.ndarray, boxes: jnp.ndarray, mask_logits: jnp.ndarray,
                        iou_logits: Optional[jnp.ndarray], image_hw: Sequence[int],
                        output_hw: Sequence[int], mask_stride: int = 4,
                        mask_threshold: float = 0.5) -> Dict[str, np.ndarray]:
  """Top-1 referring prediction of one image and sentence.

  Args:
    logits: [Q] or [Q, 1] sentence logits of the thing decoder.
    boxes: [Q, 4] normalised cxcywh boxes.
    mask_logits: [Q, h, w] mask logits at 1/mask_stride of the padded canvas.
    iou_logits: [Q] IoU-head logits, or None.
    image_hw: valid image area on the canvas.
    output_hw: original image size.
    mask_stride: mask stride.
    mask_threshold: mask probability threshold (strictly greater).

  Returns:
    'query' int, 'score' float, 'box' [4] xyxy output pixels, 'mask' bool [H_out, W_out],
    'valid' bool (False when the clipped box is empty, where the reference returns nothing).
  """
  q = boxes.shape[0]
  logits = jnp.asarray(logits)
  if logits.shape not in ((q,), (q, 1)):
    raise ValueError(f'referring_inference: logits {logits.shape} is not [{q}] or [{q}, 1]')
  out = _referring_on_device(logits.reshape(q, 1), jnp.asarray(boxes), jnp.asarray(mask_logits),
                             None if iou_logits is None else jnp.asarray(iou_logits),
                             int(mask_stride), float(mask_threshold))
  (h, w), (ho, wo) = (tuple(int(v) for v in hw) for hw in (image_hw, output_hw))
  box = instance_boxes(out['box'], (h, w), (ho, wo))
  canvas = np.asarray(out['canvas_mask'])  # [H, W]
  if h > canvas.shape[0] or w > canvas.shape[1]:
    raise ValueError(f'referring_inference: image_hw {(h, w)} exceeds the canvas {canvas.shape}')
  iy, ix = nearest_source_index(h, ho), nearest_source_index(w, wo)  # [H_out], [W_out]
  return {
      'query': int(out['query']),
      'score': float(out['score']),
      'box': np.asarray(box['boxes'][0]),
      'mask': canvas[:h, :w][iy][:, ix],  # [H_out, W_out]
      'valid': bool(box['nonempty'][0]),
  }
