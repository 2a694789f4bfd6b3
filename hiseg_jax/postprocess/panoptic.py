"""HIPIE semantic and panoptic post-processing from thing + stuff queries.

Rules (berkeley-hipie/HIPIE `HIPIE_IMG.inference` / `panoptic_inference` /
`semantic_inference`, detection task):

* Candidates: the thing queries that survive NMS (in NMS order, descending best score) with
  their thing-restricted logits (`instances.thing_class_logits`), followed by all stuff-decoder
  queries with thing classes masked to -9999 ("BG" mode; `stuff_class_agnostic=True`, the
  reference's TEST.BG_CLS_AGNOSTIC used for its open-vocabulary evaluations, keeps every class).
* Class probabilities: softmax over classes of sigmoid(logit) / T with T = 0.06
  (PANO_TEMPERATURE; `temperature=None` gives plain sigmoid). A masked class keeps
  sigmoid(-9999) = 0 inside the softmax, i.e. weight exp(0), as in the reference.
* Masks: logits upsampled ×stride, cropped to the valid image, resized to the original size
  (`resize.mask_logits_to_output`); mask probability = sigmoid.
* Semantic: per-class map einsum('qc,qhw->chw', probs, mask probs); labels by argmax.
* Panoptic (Mask2Former's merging without a no-object class): score, label = max, argmax of the
  probabilities; queries with score > 0.25 are kept; each pixel goes to the kept query with the
  largest score · mask probability; query k becomes a segment on {pixel assigned to k} ∩
  {mask prob ≥ 0.5} when that set is non-empty and |assigned to k| / |mask prob ≥ 0.5| ≥ 0.8.
  Segments of stuff classes are merged per class (every later segment of a stuff class takes
  the id of the first one); ids count from 1 in query order; category ids are class indices.

`semantic_inference` and `panoptic_inference` are vectorised with static shapes (the sequential
loop of the reference becomes counts and a cumulative sum) and run under `jax.jit`;
`postprocess_semantic_panoptic` runs the chain for one image after `thing_stuff_candidates`.
"""

import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hiseg_jax.postprocess.instances import restrict_class_logits
from hiseg_jax.postprocess.resize import mask_logits_to_output


def stuff_class_logits(class_logits: jnp.ndarray, is_thing: jnp.ndarray,
                       class_agnostic: bool = False) -> jnp.ndarray:
  """Stuff-decoder logits with thing classes masked ("BG" mode) unless class-agnostic.

  Args:
    class_logits: [Qs, C] class logits of the stuff decoder.
    is_thing: bool [C].
    class_agnostic: keep every class (the reference's TEST.BG_CLS_AGNOSTIC).

  Returns:
    [Qs, C] logits.
  """
  if class_agnostic:
    return class_logits.astype(jnp.float32)
  return restrict_class_logits(class_logits, ~jnp.asarray(is_thing, bool))  # [Qs, C]


def thing_stuff_candidates(thing_logits: jnp.ndarray, thing_masks: jnp.ndarray,
                           nms_order: jnp.ndarray, nms_keep: jnp.ndarray,
                           stuff_logits: jnp.ndarray, stuff_masks: jnp.ndarray
                           ) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Concatenates NMS-ordered thing queries and stuff queries.

  Args:
    thing_logits: [Q, C] restricted thing logits (`instances.thing_class_logits`).
    thing_masks: [Q, h, w] thing mask logits.
    nms_order: int [Q] from `instances.select_instances`.
    nms_keep: bool [Q] from `instances.select_instances` (aligned with nms_order).
    stuff_logits: [Qs, C] restricted stuff logits (`stuff_class_logits`).
    stuff_masks: [Qs, h, w] stuff mask logits (same resolution as the thing masks).

  Returns:
    logits [Q + Qs, C], mask logits [Q + Qs, h, w], valid bool [Q + Qs] (False for thing
    queries removed by NMS).
  """
  if thing_masks.shape[1:] != stuff_masks.shape[1:]:
    raise ValueError(f'thing_stuff_candidates: thing masks {thing_masks.shape} and stuff masks '
                     f'{stuff_masks.shape} differ in resolution')
  if thing_logits.shape[1] != stuff_logits.shape[1]:
    raise ValueError(f'thing_stuff_candidates: thing logits {thing_logits.shape} and stuff '
                     f'logits {stuff_logits.shape} differ in classes')
  logits = jnp.concatenate([thing_logits[nms_order], stuff_logits], axis=0)  # [N, C]
  masks = jnp.concatenate([thing_masks[nms_order], stuff_masks], axis=0)  # [N, h, w]
  valid = jnp.concatenate([nms_keep, jnp.ones((stuff_logits.shape[0],), bool)])  # [N]
  return logits, masks, valid


def candidate_class_probs(logits: jnp.ndarray, temperature: Optional[float] = 0.06
                          ) -> jnp.ndarray:
  """Class probabilities softmax(sigmoid(logits) / T) (sigmoid alone when T is None).

  Args:
    logits: [N, C] restricted logits.
    temperature: PANO_TEMPERATURE (0.06) or None.

  Returns:
    [N, C] probabilities.
  """
  prob = jax.nn.sigmoid(logits.astype(jnp.float32))  # [N, C]
  if temperature is None:
    return prob
  return jax.nn.softmax(prob / temperature, axis=-1)  # [N, C]


def _valid(valid: Optional[jnp.ndarray], n: int) -> jnp.ndarray:
  if valid is None:
    return jnp.ones((n,), bool)
  if valid.shape != (n,):
    raise ValueError(f'valid {valid.shape} is not [{n}]')
  return valid.astype(bool)


def semantic_inference(class_probs: jnp.ndarray, mask_logits: jnp.ndarray,
                       valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Per-class semantic scores einsum('qc,qhw->chw', probs, sigmoid(mask logits)).

  Args:
    class_probs: [N, C] candidate class probabilities.
    mask_logits: [N, H, W] candidate mask logits at the output size.
    valid: optional bool [N]; invalid candidates contribute nothing.

  Returns:
    [C, H, W] scores; the label map is their argmax over C.
  """
  n = class_probs.shape[0]
  if mask_logits.shape[0] != n:
    raise ValueError(f'semantic_inference: mask_logits {mask_logits.shape} does not match '
                     f'class_probs {class_probs.shape}')
  probs = jnp.where(_valid(valid, n)[:, None], class_probs.astype(jnp.float32), 0.0)  # [N, C]
  return jnp.einsum('qc,qhw->chw', probs,
                    jax.nn.sigmoid(mask_logits.astype(jnp.float32)))  # [C, H, W]


def panoptic_inference(class_probs: jnp.ndarray, mask_logits: jnp.ndarray,
                       is_thing: jnp.ndarray, valid: Optional[jnp.ndarray] = None,
                       object_mask_threshold: float = 0.25,
                       overlap_threshold: float = 0.8) -> Dict[str, jnp.ndarray]:
  """Mask2Former-style panoptic merging with HIPIE's thresholds.

  Args:
    class_probs: [N, C] candidate class probabilities.
    mask_logits: [N, H, W] candidate mask logits at the output size.
    is_thing: bool [C].
    valid: optional bool [N]; invalid candidates are ignored.
    object_mask_threshold: a candidate is kept when its best probability is strictly above.
    overlap_threshold: minimum |assigned| / |mask ≥ 0.5| of a segment.

  Returns:
    'id_map' int32 [H, W] segment ids (0 = void); per candidate: 'segment_id' int32 [N] (the id
    its pixels carry, 0 when it is not a segment), 'new_segment' bool [N] (it opens a segment;
    merged stuff candidates do not), 'category' int32 [N] class index, 'isthing' bool [N].
  """
  n, c = class_probs.shape
  if mask_logits.ndim != 3 or mask_logits.shape[0] != n:
    raise ValueError(f'panoptic_inference: mask_logits {mask_logits.shape} does not match '
                     f'class_probs {class_probs.shape}')
  is_thing = jnp.asarray(is_thing, bool)
  if is_thing.shape != (c,):
    raise ValueError(f'panoptic_inference: is_thing {is_thing.shape} is not [{c}]')
  probs = class_probs.astype(jnp.float32)  # [N, C]
  scores, labels = jnp.max(probs, axis=1), jnp.argmax(probs, axis=1).astype(jnp.int32)  # [N]
  keep = _valid(valid, n) & (scores > object_mask_threshold)  # [N]
  mask_prob = jax.nn.sigmoid(mask_logits.astype(jnp.float32))  # [N, H, W]
  on = mask_prob >= 0.5  # [N, H, W]
  weighted = jnp.where(keep[:, None, None], scores[:, None, None] * mask_prob, -1.0)  # [N, H, W]
  owner = jnp.argmax(weighted, axis=0)  # [H, W]
  owner_on = jnp.take_along_axis(on, owner[None], axis=0)[0]  # [H, W]
  assigned = jnp.zeros((n,), jnp.int32).at[owner.reshape(-1)].add(1)  # [N]
  inside = jnp.zeros((n,), jnp.int32).at[owner.reshape(-1)].add(
      owner_on.reshape(-1).astype(jnp.int32))  # [N]
  original = jnp.sum(on, axis=(1, 2), dtype=jnp.int32)  # [N]
  ratio = assigned.astype(jnp.float32) / jnp.maximum(original, 1).astype(jnp.float32)  # [N]
  accepted = keep & (assigned > 0) & (original > 0) & (inside > 0) & (
      ratio >= overlap_threshold)  # [N]
  isthing = is_thing[labels]  # [N]
  stuff = accepted & ~isthing  # [N]
  earlier = jnp.tril(jnp.ones((n, n), bool), k=-1)  # [N, N] j < k
  same_stuff = stuff[None, :] & (labels[:, None] == labels[None, :])  # [N, N] (k, j)
  new_segment = accepted & (isthing | ~jnp.any(same_stuff & earlier, axis=1))  # [N]
  opened = jnp.cumsum(new_segment.astype(jnp.int32))  # [N]
  first_stuff = jnp.argmax(same_stuff, axis=1)  # [N] first j of the same stuff class
  segment_id = jnp.where(new_segment, opened,
                         jnp.where(stuff, opened[first_stuff], 0)).astype(jnp.int32)  # [N]
  id_map = jnp.where(owner_on & accepted[owner], segment_id[owner], 0)  # [H, W]
  return {
      'id_map': id_map.astype(jnp.int32),  # [H, W]
      'segment_id': segment_id,  # [N]
      'new_segment': new_segment,  # [N]
      'category': labels,  # [N]
      'isthing': isthing,  # [N]
  }


def segments_info(result: Dict[str, Any]) -> List[Dict[str, Any]]:
  """The reference's `segments_info` list from a `panoptic_inference` result.

  Args:
    result: output of `panoptic_inference` (JAX or NumPy arrays).

  Returns:
    [{'id', 'isthing', 'category_id'}] in creation order (ids 1, 2, ...).
  """
  opened = np.flatnonzero(np.asarray(result['new_segment']))
  ids, cats = np.asarray(result['segment_id']), np.asarray(result['category'])
  things = np.asarray(result['isthing'])
  return [{'id': int(ids[k]), 'isthing': bool(things[k]), 'category_id': int(cats[k])}
          for k in opened]


def segment_masks(id_map: np.ndarray, segments: List[Dict[str, Any]]
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-segment masks for `eval.writers.write_panoptic_prediction`.

  Args:
    id_map: int [H, W] panoptic id map.
    segments: `segments_info` output.

  Returns:
    masks bool [S, H, W], category ids int64 [S], isthing bool [S].
  """
  id_map = np.asarray(id_map)  # [H, W]
  ids = np.array([s['id'] for s in segments], np.int64)  # [S]
  masks = id_map[None] == ids[:, None, None]  # [S, H, W]
  cats = np.array([s['category_id'] for s in segments], np.int64)  # [S]
  things = np.array([s['isthing'] for s in segments], bool)  # [S]
  return masks, cats, things


@functools.partial(jax.jit, static_argnames=('mask_stride', 'image_hw', 'output_hw',
                                             'object_mask_threshold', 'overlap_threshold'))
def _semantic_panoptic_on_device(class_probs: jnp.ndarray, mask_logits: jnp.ndarray,
                                 valid: jnp.ndarray, is_thing: jnp.ndarray, mask_stride: int,
                                 image_hw: Tuple[int, int], output_hw: Tuple[int, int],
                                 object_mask_threshold: float,
                                 overlap_threshold: float) -> Dict[str, jnp.ndarray]:
  """Mask resizing, semantic labels and panoptic merging (static shapes)."""
  masks = mask_logits_to_output(mask_logits, mask_stride, image_hw, output_hw)  # [N, Ho, Wo]
  semantic = jnp.argmax(semantic_inference(class_probs, masks, valid), axis=0)  # [Ho, Wo]
  out = panoptic_inference(class_probs, masks, is_thing, valid, object_mask_threshold,
                           overlap_threshold)
  out['semantic'] = semantic.astype(jnp.int32)  # [Ho, Wo]
  return out


def postprocess_semantic_panoptic(candidate_logits: jnp.ndarray, candidate_masks: jnp.ndarray,
                                  valid: jnp.ndarray, is_thing: np.ndarray,
                                  image_hw: Sequence[int], output_hw: Sequence[int],
                                  mask_stride: int = 4, temperature: Optional[float] = 0.06,
                                  object_mask_threshold: float = 0.25,
                                  overlap_threshold: float = 0.8,
                                  class_probs: Optional[jnp.ndarray] = None
                                  ) -> Dict[str, Any]:
  """Semantic labels and panoptic segments of one image (compiled once per shape).

  Args:
    candidate_logits: [N, C] from `thing_stuff_candidates`.
    candidate_masks: [N, h, w] mask logits at 1/mask_stride of the padded canvas.
    valid: bool [N] from `thing_stuff_candidates`.
    is_thing: bool [C].
    image_hw: valid image area on the canvas.
    output_hw: original image size.
    mask_stride: mask stride.
    temperature: PANO_TEMPERATURE (None: sigmoid probabilities).
    object_mask_threshold: panoptic keep threshold.
    overlap_threshold: panoptic overlap threshold.
    class_probs: optional [N, C] probabilities replacing `candidate_class_probs` (e.g. from
      `hiseg_jax.hipie.clip_ensemble.ensemble_class_probs`).

  Returns:
    'semantic' int32 [H_out, W_out] class indices (for `eval.writers.write_semantic_png`),
    'id_map' int32 [H_out, W_out] panoptic ids and 'segments_info' (`segments_info`), as NumPy.
  """
  if class_probs is None:
    class_probs = candidate_class_probs(jnp.asarray(candidate_logits), temperature)  # [N, C]
  out = _semantic_panoptic_on_device(
      jnp.asarray(class_probs), jnp.asarray(candidate_masks), jnp.asarray(valid, bool),
      jnp.asarray(is_thing, bool), int(mask_stride), tuple(int(v) for v in image_hw),
      tuple(int(v) for v in output_hw), float(object_mask_threshold), float(overlap_threshold))
  return {'semantic': np.asarray(out['semantic']), 'id_map': np.asarray(out['id_map']),
          'segments_info': segments_info(out)}
