"""HIPIE instance (and detection) post-processing of the thing decoder's outputs.

Rules (berkeley-hipie/HIPIE `HIPIE_IMG.inference`, detection task, OTA on):

1. Class logits of classes the thing decoder must not predict are set to -9999 (`MASKED_LOGIT`):
   when the vocabulary has at least one thing class, every stuff class is masked ("FG" mode);
   a vocabulary without thing classes masks nothing.
2. Score of query q for class c: sqrt(sigmoid(logit[q, c]) · sigmoid(iou_logit[q])), or
   sigmoid(logit[q, c]) without an IoU head.
3. Duplicates are removed by class-aware NMS at IoU 0.7 on the normalised xyxy boxes, with each
   query scored by its best class (max over classes) and grouped by that class (argmax).
4. The top 100 (query, class) pairs over all classes of the surviving queries are kept (a query
   can appear with several classes), num = min(100, survivors · C).
5. Boxes: cxcywh -> xyxy, scaled by the valid image size, then by output / image size, clipped
   to the output image; predictions whose clipped box is empty are dropped.
6. Masks: logits upsampled bilinearly by the mask stride to the canvas, sigmoid > 0.5, cropped to
   the valid image area, nearest-resized to the output (original) size.

`select_instances` (rules 3-4) and the scoring functions have static shapes and run under
`jax.jit`; `postprocess_instances` runs the whole chain for one image (compiled per canvas,
not per image size) and returns NumPy arrays of the kept predictions.
"""

import functools
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hiseg_jax.postprocess.boxes import box_cxcywh_to_xyxy, nms
from hiseg_jax.postprocess.resize import nearest_resize, nearest_source_index
from hiseg_jax.postprocess.resize import upsample_mask_logits

MASKED_LOGIT = -9999.0


def restrict_class_logits(class_logits: jnp.ndarray, allowed: jnp.ndarray) -> jnp.ndarray:
  """Sets the logits of disallowed classes to `MASKED_LOGIT`.

  Args:
    class_logits: [..., C] class logits.
    allowed: bool [C].

  Returns:
    [..., C] logits.
  """
  if allowed.shape != class_logits.shape[-1:]:
    raise ValueError(f'restrict_class_logits: allowed {allowed.shape} does not match logits '
                     f'{class_logits.shape}')
  return jnp.where(allowed, class_logits.astype(jnp.float32), MASKED_LOGIT)  # [..., C]


def thing_class_logits(class_logits: jnp.ndarray, is_thing: jnp.ndarray) -> jnp.ndarray:
  """Thing-decoder logits with stuff classes masked when the vocabulary has a thing class.

  Args:
    class_logits: [Q, C] class logits of the thing decoder.
    is_thing: bool [C].

  Returns:
    [Q, C] logits.
  """
  is_thing = jnp.asarray(is_thing, bool)  # [C]
  return restrict_class_logits(class_logits, is_thing | ~jnp.any(is_thing))  # [Q, C]


def instance_scores(class_logits: jnp.ndarray,
                    iou_logits: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Per (query, class) scores sqrt(sigmoid(cls) · sigmoid(iou)).

  Args:
    class_logits: [Q, C] class logits (already restricted).
    iou_logits: optional [Q] (or [Q, 1]) IoU-head logits.

  Returns:
    [Q, C] scores in [0, 1].
  """
  prob = jax.nn.sigmoid(class_logits.astype(jnp.float32))  # [Q, C]
  if iou_logits is None:
    return prob
  iou = jax.nn.sigmoid(iou_logits.astype(jnp.float32).reshape(-1, 1))  # [Q, 1]
  if iou.shape[0] != prob.shape[0]:
    raise ValueError(f'instance_scores: iou_logits {iou_logits.shape} does not match '
                     f'class_logits {class_logits.shape}')
  return jnp.sqrt(prob * iou)  # [Q, C]


def select_instances(scores: jnp.ndarray, boxes: jnp.ndarray, top_k: int = 100,
                     nms_threshold: float = 0.7) -> Dict[str, jnp.ndarray]:
  """Class-aware NMS on the best class of each query, then the top-k (query, class) pairs.

  Args:
    scores: [Q, C] scores (`instance_scores` or the CLIP-ensembled ones).
    boxes: [Q, 4] normalised cxcywh boxes.
    top_k: pairs kept (static); K = min(top_k, Q · C).
    nms_threshold: IoU above which a lower-scored box of the same class is removed.

  Returns:
    'scores' [K] descending (0 where invalid), 'labels' int32 [K] class indices, 'queries'
    int32 [K] query indices, 'valid' bool [K] (False past survivors · C pairs), 'nms_order'
    int32 [Q] queries by descending best score, 'nms_keep' bool [Q] whether nms_order[i]
    survives NMS.
  """
  q, c = scores.shape
  if boxes.shape != (q, 4):
    raise ValueError(f'select_instances: boxes {boxes.shape} is not [{q}, 4]')
  scores = scores.astype(jnp.float32)  # [Q, C]
  order, keep = nms(box_cxcywh_to_xyxy(boxes.astype(jnp.float32)), jnp.max(scores, axis=1),
                    nms_threshold, classes=jnp.argmax(scores, axis=1))  # [Q], [Q]
  flat = jnp.where(keep[:, None], scores[order], -jnp.inf).reshape(-1)  # [Q·C]
  k = min(top_k, q * c)
  values, index = jax.lax.top_k(flat, k)  # [K], [K]
  valid = values > -jnp.inf  # [K]
  return {
      'scores': jnp.where(valid, values, 0.0),  # [K]
      'labels': (index % c).astype(jnp.int32),  # [K]
      'queries': order[index // c],  # [K]
      'valid': valid,  # [K]
      'nms_order': order,  # [Q]
      'nms_keep': keep,  # [Q]
  }


def instance_boxes(boxes: jnp.ndarray, image_hw: Sequence[int],
                   output_hw: Sequence[int]) -> Dict[str, jnp.ndarray]:
  """Normalised cxcywh boxes to clipped xyxy pixel boxes of the output image.

  Args:
    boxes: [K, 4] normalised cxcywh boxes.
    image_hw: (h, w) valid (resized, unpadded) input image size the boxes are relative to.
    output_hw: (H_out, W_out) original image size.

  Returns:
    'boxes' [K, 4] xyxy in output pixels, 'nonempty' bool [K] (positive width and height).
  """
  (h, w), (ho, wo) = image_hw, output_hw
  xyxy = box_cxcywh_to_xyxy(boxes.astype(jnp.float32))  # [K, 4]
  xyxy = xyxy * jnp.array([w, h, w, h], jnp.float32)  # [K, 4]
  xyxy = xyxy * jnp.array([wo / w, ho / h, wo / w, ho / h], jnp.float32)  # [K, 4]
  xyxy = jnp.clip(xyxy, 0.0, jnp.array([wo, ho, wo, ho], jnp.float32))  # [K, 4]
  nonempty = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])  # [K]
  return {'boxes': xyxy, 'nonempty': nonempty}


def instance_masks(mask_logits: jnp.ndarray, mask_stride: int, image_hw: Sequence[int],
                   output_hw: Sequence[int], mask_threshold: float = 0.5) -> jnp.ndarray:
  """Binary instance masks at the output size.

  Args:
    mask_logits: [K, h, w] mask logits at 1/mask_stride of the padded canvas.
    mask_stride: the mask stride (4).
    image_hw: (h_img, w_img) valid image area at the canvas' top-left.
    output_hw: (H_out, W_out) original image size.
    mask_threshold: probability threshold (strictly greater).

  Returns:
    bool [K, H_out, W_out].
  """
  h, w = (int(v) for v in image_hw)
  up = upsample_mask_logits(mask_logits, mask_stride)  # [K, H, W]
  if h > up.shape[1] or w > up.shape[2]:
    raise ValueError(f'instance_masks: image_hw {(h, w)} exceeds the canvas {up.shape[1:]}')
  binary = jax.nn.sigmoid(up) > mask_threshold  # [K, H, W]
  return nearest_resize(binary[:, :h, :w], output_hw)  # [K, H_out, W_out]


@functools.partial(jax.jit, static_argnames=('top_k', 'nms_threshold', 'mask_stride',
                                             'mask_threshold'))
def _instances_on_device(scores: jnp.ndarray, boxes: jnp.ndarray, mask_logits: jnp.ndarray,
                         top_k: int, nms_threshold: float, mask_stride: int,
                         mask_threshold: float) -> Dict[str, jnp.ndarray]:
  """Rules 3-4 and the canvas-resolution masks of all K selected pairs (static shapes)."""
  sel = select_instances(scores, boxes, top_k, nms_threshold)
  up = upsample_mask_logits(mask_logits[sel['queries']], mask_stride)  # [K, H, W]
  return {'scores': sel['scores'], 'labels': sel['labels'], 'queries': sel['queries'],
          'valid': sel['valid'], 'boxes': boxes[sel['queries']],  # [K, 4]
          'canvas_masks': jax.nn.sigmoid(up) > mask_threshold}  # [K, H, W]


def postprocess_instances(class_logits: jnp.ndarray, boxes: jnp.ndarray,
                          mask_logits: jnp.ndarray, iou_logits: Optional[jnp.ndarray],
                          is_thing: np.ndarray, image_hw: Sequence[int],
                          output_hw: Sequence[int], top_k: int = 100,
                          nms_threshold: float = 0.7, mask_stride: int = 4,
                          mask_threshold: float = 0.5,
                          scores: Optional[jnp.ndarray] = None) -> Dict[str, np.ndarray]:
  """Instance predictions of one image, ready for the COCO writers.

  Args:
    class_logits: [Q, C] pooled class logits of the thing decoder.
    boxes: [Q, 4] normalised cxcywh boxes.
    mask_logits: [Q, h, w] mask logits at 1/mask_stride of the padded canvas.
    iou_logits: [Q] IoU-head logits, or None.
    is_thing: bool [C] thing classes of the vocabulary.
    image_hw: valid image area on the canvas.
    output_hw: original image size.
    top_k: predictions kept before the empty-box filter.
    nms_threshold: NMS IoU threshold.
    mask_stride: mask stride.
    mask_threshold: mask probability threshold.
    scores: optional [Q, C] scores replacing rule 2 (e.g. CLIP-ensembled ones).

  Returns:
    NumPy arrays over the N kept predictions, by descending score: 'scores' [N], 'labels' [N]
    class indices, 'queries' [N], 'boxes' [N, 4] xyxy output pixels, 'masks' bool
    [N, H_out, W_out]. The compiled part depends only on the array shapes; cropping and
    resizing to the image's own size happen on the host.
  """
  if scores is None:
    scores = instance_scores(thing_class_logits(jnp.asarray(class_logits), is_thing),
                             None if iou_logits is None else jnp.asarray(iou_logits))  # [Q, C]
  out = _instances_on_device(jnp.asarray(scores), jnp.asarray(boxes), jnp.asarray(mask_logits),
                             int(top_k), float(nms_threshold), int(mask_stride),
                             float(mask_threshold))
  (h, w), (ho, wo) = (tuple(int(v) for v in hw) for hw in (image_hw, output_hw))
  box = instance_boxes(out['boxes'], (h, w), (ho, wo))
  keep = np.asarray(out['valid'] & box['nonempty'])  # [K]
  canvas = np.asarray(out['canvas_masks'])[keep]  # [N, H, W]
  if h > canvas.shape[1] or w > canvas.shape[2]:
    raise ValueError(f'postprocess_instances: image_hw {(h, w)} exceeds the canvas '
                     f'{canvas.shape[1:]}')
  iy, ix = nearest_source_index(h, ho), nearest_source_index(w, wo)  # [H_out], [W_out]
  return {
      'scores': np.asarray(out['scores'])[keep],
      'labels': np.asarray(out['labels'])[keep],
      'queries': np.asarray(out['queries'])[keep],
      'boxes': np.asarray(box['boxes'])[keep],
      'masks': canvas[:, :h, :w][:, iy][:, :, ix],  # [N, H_out, W_out]
  }
