"""HIPIE evaluation: panoptic, instance, detection and semantic, referring and part passes.

Each pass runs `data_pipelines.hipie_pipeline.build_eval_pipeline` (fixed class prompt, canvas-
fitting geometry) over one dataset, batches over the mesh (`sharding.global_batch`), calls the
caller's `forward(batch, task)` and post-processes every image with `hiseg_jax.postprocess` at the
reference's inference settings (`eval_config`, below). Predictions live on the canvas; the image's
window is `eval.aims_eval.valid_window` and the post-processing crops it and resizes to the
original size (`orig_size`). Padding samples (`image_id` -1) are skipped.

`forward(batch, task)` gets the pipeline's batch arrays as they are (uint8 `image`, `text/ids`,
`text/mask`, ...), task "panoptic" | "referring" | "part", and returns the `HIPIEModel` output dict
{'things': {'logits' [B, Q, T'], 'boxes' [B, Q, 4], 'ious' [B, Q], 'masks' [B, Q, S/r, S/r]},
'stuff': {'logits' [B, Qs, T'], 'masks' [B, Qs, S/r, S/r]}} (other keys are ignored): T' = T for
the class passes (the model's 'detection' task), 1 for the referring pass ('grounding'). Boxes are
normalised cxcywh relative to the canvas side S, the convention of the pipeline's `things/boxes`
targets (the model run without `image_sizes`). The mask stride r is S / the masks' side.

Passes (an `eval_config` key that is '' skips its pass):
  * panoptic: class logits = mean of the token logits over each class's tokens
    (`pool_token_logits` with the prompt's `text/positive_map`); instances from the thing decoder
    (stuff classes masked, score sqrt(σ(cls)·σ(iou)), class-aware NMS at `nms_threshold`, top
    `top_k` (query, class) pairs, empty boxes dropped; pairs of non-thing classes are not
    instance results); semantic and panoptic from the NMS-surviving thing queries plus all stuff
    queries (softmax(σ(logit) / `temperature`), Mask2Former merging with
    `object_mask_threshold` / `overlap_threshold`). Scores: PQ / SQ / RQ (All, Things, Stuff;
    `eval.panoptic_quality`, against the ground-truth segments of the records, crowd segments
    kept as crowd and unlabelled pixels void), class-aware mask AP and box AP (pycocotools,
    `eval.coco_eval`, ground truth = the non-crowd and crowd thing segments; predicted boxes from
    the thing decoder), semantic mIoU (`eval.miou`, every class of the vocabulary, ground truth =
    each segment's class, unlabelled pixels ignored).
  * referring: one element per (image, expression); the top-1 query for the sentence
    (`postprocess.referring_inference`; a prediction whose clipped box is empty is an empty mask
    and an empty box). oIoU, mIoU and Prec@0.5 of the masks (`refer_mask_P50`) and P@0.5 of
    the boxes (`refer_box_P50`) (`eval.referring`) against the expression's target segment.
  * part: the part vocabulary ("object part" classes, part-less objects, stuff); the fine part
    label map is the semantic output of the pass (as in the panoptic pass). part mIoU is the mIoU
    (`eval.miou.miou_from_confusion`) over P + 1 labels: label 1 + k for the k-th part class of the
    vocabulary (in vocabulary order) and 0 = background, i.e. every other class
    (`postprocess.part_group_lookup` / `coarse_part_labels`, HIPIE's `label_group` with one group
    per part class). Ground truth per pixel: 1 + k where a part of class k lies; 0 on segments of
    classes without parts (part-less objects, stuff); ignored on pixels of objects whose class has
    parts but that no part covers (the part-level void of Pascal-Panoptic-Parts) and on
    unlabelled pixels. The 57-group mIoU_PartS of real Pascal-Panoptic-Parts is
    `eval.miou.miou_parts`; it needs the real PASCAL ids, which this pass does not assume.

Files under `out_dir` (written by process 0):
  panoptic/gt_panoptic.json + gt_panoptic/<id>.png     COCO panoptic ground truth scored against
  panoptic/pred_panoptic.json + pred_panoptic/<id>.png  COCO panoptic predictions (dataset ids)
  panoptic/instances_gt.json                            COCO instance ground truth (thing classes)
  panoptic/instances_segm.json, instances_bbox.json     COCO results (RLE masks; boxes)
  panoptic/semantic/<id>.png, semantic_gt/<id>.png      class-index label maps (255 = ignored)
  panoptic/classes.json                                 class index -> name
  referring/results.json                                one entry per (image, expression)
  part/labels/<id>.png                                  fine part labels (part vocabulary index)
  part/groups/<id>.png, groups_gt/<id>.png              scored labels (0 background, 255 ignored)
  part/groups.json                                      label -> name
  metrics.json                                          the returned metrics
Metrics (percent): PQ, SQ, RQ, PQ_th, SQ_th, RQ_th, PQ_st, SQ_st, RQ_st, mask_AP, mask_AP50,
mask_AP75, box_AP, box_AP50, box_AP75, mIoU (panoptic pass); refer_oIoU, refer_mIoU,
refer_mask_P50, refer_box_P50 (referring); part_mIoU (part). Keys of a skipped pass are absent.
An empty prediction set scores 0.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import transformers
import tqdm
from jax.experimental import multihost_utils
from PIL import Image
from pycocotools import mask as mask_utils

from data_pipelines import hipie_pipeline
from data_pipelines import hipie_samples
from data_pipelines import records as records_lib
from eval import coco_eval
from eval import miou as miou_lib
from eval import panoptic_quality
from eval import referring as referring_lib
from eval import writers
from eval.aims_eval import valid_window
from eval.panoptic_png import id2rgb
from hiseg_jax import postprocess
from hiseg_jax.text.prompts import pool_token_logits
from hiseg_jax.train import sharding

Forward = Callable[[Dict[str, jax.Array], str], Dict[str, Any]]

PASSES = ('panoptic', 'referring', 'part')
_THING_KEYS = ('logits', 'boxes', 'ious', 'masks')
_STUFF_KEYS = ('logits', 'masks')
_INT_KEYS = ('top_k',)
_FLOAT_KEYS = ('nms_threshold', 'temperature', 'object_mask_threshold', 'overlap_threshold')
EVAL_KEYS = PASSES + _INT_KEYS + _FLOAT_KEYS


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """The HIPIE evaluation settings (`eval_config`).

  Attributes:
    panoptic: dataset of the panoptic pass ('' skips it).
    referring: dataset of the referring pass ('' skips it).
    part: dataset of the part pass ('' skips it).
    top_k: instances kept per image (reference 100).
    nms_threshold: class-aware NMS IoU threshold (reference 0.7).
    temperature: panoptic / semantic class temperature (reference PANO_TEMPERATURE 0.06).
    object_mask_threshold: panoptic keep threshold (reference 0.25).
    overlap_threshold: panoptic overlap threshold (reference 0.8).
  """

  panoptic: str
  referring: str
  part: str
  top_k: int
  nms_threshold: float
  temperature: float
  object_mask_threshold: float
  overlap_threshold: float


def read_eval_config(eval_config: ml_collections.ConfigDict) -> EvalSettings:
  """Validates `eval_config` and returns its settings.

  Args:
    eval_config: ConfigDict with exactly the keys `EVAL_KEYS`.

  Returns:
    The `EvalSettings`.

  Raises:
    ValueError: naming unknown or missing keys, wrong types and out-of-range values.
  """
  keys = set(eval_config.keys())
  unknown, missing = sorted(keys - set(EVAL_KEYS)), sorted(set(EVAL_KEYS) - keys)
  if unknown or missing:
    raise ValueError(f'HIPIE eval config: unknown keys {unknown}, missing keys {missing} '
                     f'(eval/hipie_eval.py reads {list(EVAL_KEYS)})')
  for key in PASSES:
    if not isinstance(eval_config[key], str):
      raise ValueError(f"HIPIE eval config '{key}' must be a dataset name or '', got "
                       f'{eval_config[key]!r}')
  top_k = eval_config.top_k
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f"HIPIE eval config 'top_k' must be an int >= 1, got {top_k!r}")
  values = {}
  for key in _FLOAT_KEYS:
    value = eval_config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"HIPIE eval config '{key}' must be a number, got {value!r}")
    values[key] = float(value)
  if not values['temperature'] > 0:
    raise ValueError(f"HIPIE eval config 'temperature' must be > 0, got {values['temperature']}")
  for key in ('nms_threshold', 'object_mask_threshold', 'overlap_threshold'):
    if not 0.0 <= values[key] <= 1.0:
      raise ValueError(f"HIPIE eval config '{key}' must lie in [0, 1], got {values[key]}")
  return EvalSettings(panoptic=eval_config.panoptic, referring=eval_config.referring,
                      part=eval_config.part, top_k=top_k, **values)


def class_category_ids(vocabulary: hipie_samples.Vocabulary, name: str) -> np.ndarray:
  """Dataset category id of every class of a panoptic vocabulary.

  Args:
    vocabulary: the dataset's panoptic vocabulary.
    name: the dataset, for error messages.

  Returns:
    int64 [C] category ids.

  Raises:
    ValueError: naming the classes without (or with several) dataset categories.
  """
  owners: Dict[int, List[int]] = {}
  for cid, c in vocabulary.segment_class.items():
    owners.setdefault(c, []).append(int(cid))
  bad = [vocabulary.names[c] for c in range(len(vocabulary.names)) if len(owners.get(c, [])) != 1]
  if bad:
    raise ValueError(f"dataset '{name}': panoptic vocabulary classes {bad} do not have exactly "
                     'one dataset category id')
  return np.array([owners[c][0] for c in range(len(vocabulary.names))], np.int64)  # [C]


def _segment_class(vocabulary: hipie_samples.Vocabulary, record: records_lib.ImageRecord,
                   segment: records_lib.Segment) -> int:
  """The class index of a segment, or an error naming the image and the category."""
  if segment.category_id not in vocabulary.segment_class:
    raise KeyError(f'{record.dataset}: image {record.image_id} ({record.file_name}) has segment '
                   f'{segment.id} of category {segment.category_id}, which the vocabulary does '
                   f'not have (known {sorted(vocabulary.segment_class)})')
  return vocabulary.segment_class[segment.category_id]


def semantic_ground_truth(record: records_lib.ImageRecord,
                          vocabulary: hipie_samples.Vocabulary) -> np.ndarray:
  """Semantic labels of one image: each segment's class, `miou.IGNORE` elsewhere.

  Args:
    record: the image.
    vocabulary: the dataset's panoptic vocabulary (at most 255 classes).

  Returns:
    int64 [H, W] class indices, 255 on unlabelled pixels.
  """
  labels = np.full((record.height, record.width), miou_lib.IGNORE, np.int64)  # [H, W]
  for s in record.segments:
    labels[s.mask] = _segment_class(vocabulary, record, s)
  return labels


def panoptic_ground_truth(record: records_lib.ImageRecord, vocabulary: hipie_samples.Vocabulary,
                          category_ids: np.ndarray) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
  """COCO panoptic ground truth of one image from its record.

  Args:
    record: the image.
    vocabulary: the dataset's panoptic vocabulary.
    category_ids: int [C] from `class_category_ids`.

  Returns:
    (id map int64 [H, W] with the record's segment ids, 0 void; `segments_info` with id,
    category_id, iscrowd, isthing, area, bbox).
  """
  hw = (record.height, record.width)
  masks = np.stack([s.mask for s in record.segments]) if record.segments else np.zeros(
      (0,) + hw, bool)  # [S, H, W]
  id_map = writers.panoptic_id_map(masks, [s.id for s in record.segments])  # [H, W]
  segments = []
  for s in record.segments:
    c = _segment_class(vocabulary, record, s)
    rle = writers.encode_mask(s.mask)
    segments.append({'id': int(s.id), 'category_id': int(category_ids[c]),
                     'iscrowd': int(s.iscrowd), 'isthing': int(vocabulary.isthing[c]),
                     'area': int(s.mask.sum()),
                     'bbox': [float(v) for v in mask_utils.toBbox(rle)]})
  return id_map, segments


def instance_ground_truth(record: records_lib.ImageRecord, vocabulary: hipie_samples.Vocabulary,
                          category_ids: np.ndarray, first_id: int) -> List[Dict[str, Any]]:
  """COCO instance annotations of one image: its thing segments (crowd ones as `iscrowd` 1).

  Args:
    record: the image.
    vocabulary: the dataset's panoptic vocabulary.
    category_ids: int [C] from `class_category_ids`.
    first_id: annotation id of the first annotation.

  Returns:
    Annotations with RLE `segmentation`, `area`, `bbox`, `iscrowd` and the dataset category id.
  """
  out = []
  for s in record.segments:
    k = _segment_class(vocabulary, record, s)
    if not vocabulary.isthing[k]:
      continue
    rle = writers.encode_mask(s.mask)
    out.append({'id': first_id + len(out), 'image_id': record.image_id,
                'category_id': int(category_ids[k]), 'segmentation': rle,
                'area': float(mask_utils.area(rle)),
                'bbox': [float(v) for v in mask_utils.toBbox(rle)], 'iscrowd': int(s.iscrowd)})
  return out


def part_classes(vocabulary: hipie_samples.Vocabulary) -> np.ndarray:
  """The part classes of a part vocabulary, in vocabulary order.

  Args:
    vocabulary: the part vocabulary.

  Returns:
    int64 [P] class indices of the "object part" classes (those with an object).
  """
  return np.array([c for c, obj in enumerate(vocabulary.objects) if obj is not None], np.int64)


def part_label_lookup(vocabulary: hipie_samples.Vocabulary) -> np.ndarray:
  """Fine class index -> scored part label (1 + part rank; 0 background).

  Args:
    vocabulary: the part vocabulary.

  Returns:
    int64 [C] lookup (`postprocess.part_group_lookup`).
  """
  groups = {int(c): k + 1 for k, c in enumerate(part_classes(vocabulary))}
  return postprocess.part_group_lookup(len(vocabulary.names), groups)  # [C]


def part_ground_truth(record: records_lib.ImageRecord,
                      vocabulary: hipie_samples.Vocabulary) -> np.ndarray:
  """Scored part labels of one image (see the module docstring).

  Args:
    record: the image.
    vocabulary: the part vocabulary.

  Returns:
    int64 [H, W]: 1 + part rank on parts, 0 on segments of classes without parts, 255 on pixels of
    objects with parts outside every part and on unlabelled pixels.
  """
  lookup = part_label_lookup(vocabulary)  # [C]
  labels = np.full((record.height, record.width), miou_lib.IGNORE, np.int64)  # [H, W]
  for s in record.segments:
    if s.category_id in vocabulary.segment_class:
      labels[s.mask] = 0
  where = f'{record.dataset}: image {record.image_id} ({record.file_name})'
  for p in record.parts:
    if p.category_id not in vocabulary.part_class:
      raise KeyError(f'{where}: part {p.id} has category {p.category_id}, which the part '
                     f'vocabulary does not have (known {sorted(vocabulary.part_class)})')
    labels[p.mask] = lookup[vocabulary.part_class[p.category_id]]
  return labels


def _mask_stride(masks_shape: Tuple[int, ...], canvas: int, what: str) -> int:
  """The stride of canvas mask logits [..., S/r, S/r]."""
  side = masks_shape[-1]
  if masks_shape[-2] != side or side < 1 or canvas % side:
    raise ValueError(f'forward output {what} has shape {masks_shape}; its last two axes must be '
                     f'equal and divide the canvas side {canvas}')
  return canvas // side


def _select_outputs(outputs: Mapping[str, Any], task: str) -> Dict[str, Dict[str, Any]]:
  """The arrays of `forward`'s output the evaluation reads, or an error naming what is missing."""
  selected = {}
  for branch, keys in (('things', _THING_KEYS), ('stuff', _STUFF_KEYS)):
    part = outputs.get(branch) if isinstance(outputs, Mapping) else None
    missing = [k for k in keys if part is None or k not in part]
    if missing:
      raise ValueError(f"forward(batch, '{task}') output lacks {branch}/{missing}; it must be "
                       "the HIPIEModel output dict {'things': {...}, 'stuff': {...}}")
    selected[branch] = {k: part[k] for k in keys}
  return selected


@functools.partial(jax.jit, static_argnames=('top_k', 'nms_threshold'))
def _class_candidates(things: Dict[str, jax.Array], stuff: Dict[str, jax.Array],
                      positive_map: jax.Array, is_thing: jax.Array, box_scale: jax.Array,
                      top_k: int, nms_threshold: float) -> Dict[str, jax.Array]:
  """Per-class logits, instance scores and the thing + stuff candidates of one image."""
  thing_cls = postprocess.thing_class_logits(
      pool_token_logits(things['logits'], positive_map), is_thing)  # [Q, C]
  stuff_cls = postprocess.stuff_class_logits(
      pool_token_logits(stuff['logits'], positive_map), is_thing)  # [Qs, C]
  scores = postprocess.instance_scores(thing_cls, things['ious'])  # [Q, C]
  boxes = things['boxes'].astype(jnp.float32) * box_scale  # [Q, 4]
  sel = postprocess.select_instances(scores, boxes, top_k, nms_threshold)
  logits, masks, valid = postprocess.thing_stuff_candidates(
      thing_cls, things['masks'], sel['nms_order'], sel['nms_keep'], stuff_cls,
      stuff['masks'])  # [N, C], [N, h, w], [N]
  return {'thing_logits': thing_cls, 'scores': scores, 'boxes': boxes, 'logits': logits,
          'masks': masks, 'valid': valid}


def _box_scale(window: np.ndarray, canvas: int) -> np.ndarray:
  """Factors taking canvas-normalised cxcywh boxes to boxes normalised by the window (h, w)."""
  h, w = float(window[0]), float(window[1])
  return np.array([canvas / w, canvas / h, canvas / w, canvas / h], np.float32)  # [4]


@dataclasses.dataclass
class _Image:
  """One evaluated element of a pass, on the host."""

  record: records_lib.ImageRecord
  window: np.ndarray
  size: Tuple[int, int]
  expression: int
  positive_map: np.ndarray
  outputs: Dict[str, Dict[str, np.ndarray]]


class _Pass:
  """Runs `forward` over one evaluation pipeline and yields its images on the host."""

  def __init__(self, forward: Forward, sources: Mapping[str, Any], dataset: str, task: str,
               vocabulary: Optional[hipie_samples.Vocabulary],
               tokenizer: transformers.PreTrainedTokenizerBase,
               section: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.built = hipie_pipeline.build_eval_pipeline(section, sources, dataset, task, vocabulary,
                                                    tokenizer)
    self.forward = forward
    self.source = sources[dataset]
    self.dataset, self.task = dataset, task
    self.canvas = int(section.image_size)
    self.mesh = mesh
    self.by_id = {int(self.source.meta(i).image_id): i for i in range(len(self.source))}

  def __iter__(self) -> Iterator[_Image]:
    batch_sharding = sharding.batch_sharding(self.mesh)
    for host_batch in tqdm.tqdm(iter(self.built.dataset), total=self.built.num_batches,
                                desc=f'eval {self.task} {self.dataset}', leave=False):
      inputs = sharding.global_batch(host_batch, batch_sharding, self.built.host_batch_size)
      outputs = _select_outputs(self.forward(inputs, self.task), self.task)
      outputs = multihost_utils.process_allgather(outputs, tiled=True)
      info = multihost_utils.process_allgather(
          {k: host_batch[k] for k in ('image_id', 'orig_size', 'expression', 'text/positive_map')},
          tiled=True)
      windows = valid_window(np.maximum(info['orig_size'], 1), self.canvas)  # [B, 2]
      for b, image_id in enumerate(np.asarray(info['image_id']).tolist()):
        if image_id < 0:
          continue
        size = tuple(int(v) for v in info['orig_size'][b])
        yield _Image(
            record=self.source[self.by_id[int(image_id)]], window=windows[b], size=size,
            expression=int(info['expression'][b]),
            positive_map=np.asarray(info['text/positive_map'][b]),
            outputs={branch: {k: np.asarray(v[b]) for k, v in arrays.items()}
                     for branch, arrays in outputs.items()})


def _write_png(path: str, labels: np.ndarray) -> None:
  """Writes a label map (process 0 only)."""
  if jax.process_index() == 0:
    writers.write_semantic_png(path, labels)


def _class_image(image: _Image, vocabulary: hipie_samples.Vocabulary, settings: EvalSettings,
                 canvas: int, instances: bool) -> Dict[str, Any]:
  """Post-processes one image of a class pass (panoptic or part)."""
  c = len(vocabulary.names)
  is_thing = np.asarray(vocabulary.isthing, bool)  # [C]
  things, stuff = image.outputs['things'], image.outputs['stuff']
  stride = _mask_stride(things['masks'].shape, canvas, 'things/masks')
  window, size = tuple(int(v) for v in image.window), image.size
  cand = _class_candidates(things, stuff, image.positive_map[:c], is_thing,
                           _box_scale(image.window, canvas), settings.top_k,
                           settings.nms_threshold)
  out = postprocess.postprocess_semantic_panoptic(
      cand['logits'], cand['masks'], cand['valid'], is_thing, window, size, mask_stride=stride,
      temperature=settings.temperature, object_mask_threshold=settings.object_mask_threshold,
      overlap_threshold=settings.overlap_threshold)
  if instances:
    out['instances'] = postprocess.postprocess_instances(
        cand['thing_logits'], cand['boxes'], things['masks'], things['ious'], is_thing, window,
        size, top_k=settings.top_k, nms_threshold=settings.nms_threshold, mask_stride=stride,
        scores=cand['scores'])
  return out


def _coco_metrics(gt: dict, results: List[dict], iou_type: str, prefix: str, gt_path: str,
                  results_path: str) -> Dict[str, float]:
  """AP, AP50, AP75 (percent) of one COCO evaluation."""
  stats = coco_eval.coco_evaluate(gt, results, iou_type, gt_name=gt_path,
                                  results_name=results_path)
  return {f'{prefix}_{name}': 100.0 * stats[name] for name in ('AP', 'AP50', 'AP75')}


def _panoptic_pass(run: _Pass, vocabulary: hipie_samples.Vocabulary, settings: EvalSettings,
                   out_dir: str) -> Dict[str, float]:
  """The panoptic pass: PQ, mask / box AP and semantic mIoU."""
  c = len(vocabulary.names)
  if c > miou_lib.IGNORE:
    raise ValueError(f"dataset '{run.dataset}': {c} classes do not fit semantic labels with the "
                     f'ignore label {miou_lib.IGNORE}')
  category_ids = class_category_ids(vocabulary, run.dataset)  # [C]
  is_thing = np.asarray(vocabulary.isthing, bool)  # [C]
  categories = [{'id': int(category_ids[k]), 'name': vocabulary.names[k],
                 'isthing': int(is_thing[k])} for k in range(c)]
  by_category = {cat['id']: cat for cat in categories}
  gt_folder = os.path.join(out_dir, 'gt_panoptic')
  pred_folder = os.path.join(out_dir, 'pred_panoptic')
  writes = jax.process_index() == 0
  stats: Dict[int, panoptic_quality.CategoryStat] = {}
  confusion = np.zeros((c + 1, c + 1), np.int64)  # [C+1, C+1]
  images, gt_annotations, pred_annotations, instance_gt = [], [], [], []
  segm_results, bbox_results = [], []
  for image in run:
    rec = image.record
    file_name = f'{rec.image_id}.png'
    where = f"dataset '{run.dataset}' image {rec.image_id} ({rec.file_name})"
    out = _class_image(image, vocabulary, settings, run.canvas, instances=True)
    images.append({'id': rec.image_id, 'file_name': os.path.basename(rec.file_name),
                   'height': rec.height, 'width': rec.width})

    gt_ids, gt_segments = panoptic_ground_truth(rec, vocabulary, category_ids)  # [H, W]
    pred_segments = [{'id': s['id'], 'category_id': int(category_ids[s['category_id']]),
                      'isthing': int(s['isthing'])} for s in out['segments_info']]
    panoptic_quality.pq_image_stats(gt_ids, gt_segments, out['id_map'], pred_segments,
                                    by_category, where, stats)
    gt_annotations.append({'image_id': rec.image_id, 'file_name': file_name,
                           'segments_info': gt_segments})
    masks, classes, things = postprocess.segment_masks(out['id_map'], out['segments_info'])
    if writes:
      os.makedirs(gt_folder, exist_ok=True)
      Image.fromarray(id2rgb(gt_ids)).save(os.path.join(gt_folder, file_name))
      pred_annotations.append(writers.write_panoptic_prediction(
          pred_folder, rec.image_id, file_name, masks, category_ids[classes], things))

    semantic_gt = semantic_ground_truth(rec, vocabulary)  # [H, W]
    confusion += miou_lib.confusion_matrix(semantic_gt, out['semantic'], c, where)
    _write_png(os.path.join(out_dir, 'semantic', file_name), out['semantic'])
    _write_png(os.path.join(out_dir, 'semantic_gt', file_name), semantic_gt)

    instance_gt += instance_ground_truth(rec, vocabulary, category_ids, len(instance_gt) + 1)
    inst = out['instances']
    keep = is_thing[inst['labels']]  # [N]
    labels = category_ids[inst['labels'][keep]]  # [N']
    scores = inst['scores'][keep]  # [N']
    segm_results += writers.coco_instance_results(rec.image_id, inst['masks'][keep], scores,
                                                  labels)
    for box, score, label in zip(inst['boxes'][keep], scores, labels):
      x0, y0, x1, y1 = (float(v) for v in box)
      bbox_results.append({'image_id': rec.image_id, 'category_id': int(label),
                           'bbox': [x0, y0, x1 - x0, y1 - y0], 'score': float(score)})

  instances = {'images': images, 'annotations': instance_gt,
               'categories': [cat for cat in categories if cat['isthing']]}
  paths = {name: os.path.join(out_dir, f'{name}.json') for name in (
      'gt_panoptic', 'pred_panoptic', 'instances_gt', 'instances_segm', 'instances_bbox',
      'classes')}
  if writes:
    writers.write_json(paths['gt_panoptic'], {'images': images, 'annotations': gt_annotations,
                                              'categories': categories})
    writers.write_panoptic_json(paths['pred_panoptic'], pred_annotations, categories)
    writers.write_json(paths['instances_gt'], instances)
    writers.write_json(paths['instances_segm'], segm_results)
    writers.write_json(paths['instances_bbox'], bbox_results)
    writers.write_json(paths['classes'], list(vocabulary.names))

  metrics = {}
  for suffix, isthing in (('', None), ('_th', True), ('_st', False)):
    avg, _ = panoptic_quality.pq_average(stats, by_category, isthing)
    for name in ('pq', 'sq', 'rq'):
      metrics[f'{name.upper()}{suffix}'] = 100.0 * avg[name]
  metrics.update(_coco_metrics(instances, segm_results, 'segm', 'mask', paths['instances_gt'],
                               paths['instances_segm']))
  metrics.update(_coco_metrics(instances, bbox_results, 'bbox', 'box', paths['instances_gt'],
                               paths['instances_bbox']))
  metrics['mIoU'] = miou_lib.miou_from_confusion(confusion)['mIoU']
  return metrics


def _referring_pass(run: _Pass, out_dir: str) -> Dict[str, float]:
  """The referring pass: oIoU, mIoU, Prec@0.5 of the masks and P@0.5 of the boxes."""
  gt_masks, pred_masks, gt_boxes, pred_boxes, results = [], [], [], [], []
  for image in run:
    rec = image.record
    things = image.outputs['things']
    stride = _mask_stride(things['masks'].shape, run.canvas, 'things/masks')
    if things['logits'].shape[-1] != 1:
      raise ValueError(f"forward(batch, 'referring') gives things/logits {things['logits'].shape}"
                       '; the referring pass needs one token (the grounding task)')
    pred = postprocess.referring_inference(
        things['logits'], things['boxes'] * _box_scale(image.window, run.canvas),
        things['masks'], things['ious'], tuple(int(v) for v in image.window), image.size,
        mask_stride=stride)
    expr = rec.expressions[image.expression]
    target = rec.segment(expr.target_id)
    x0, y0, x1, y1 = (float(v) for v in pred['box'])
    mask = pred['mask'] if pred['valid'] else np.zeros(image.size, bool)  # [H, W]
    box = [x0, y0, x1 - x0, y1 - y0] if pred['valid'] else [0.0, 0.0, 0.0, 0.0]
    gt_masks.append(target.mask)
    pred_masks.append(mask)
    gt_boxes.append(list(target.bbox))
    pred_boxes.append(box)
    union = int(np.count_nonzero(mask | target.mask))
    results.append({'image_id': rec.image_id, 'expression': image.expression,
                    'ref_id': expr.ref_id, 'sentence': expr.sentence,
                    'target_id': expr.target_id, 'score': pred['score'],
                    'bbox': box, 'segmentation': writers.encode_mask(mask),
                    'iou': int(np.count_nonzero(mask & target.mask)) / union if union else 0.0})
  if jax.process_index() == 0:
    writers.write_json(os.path.join(out_dir, 'results.json'), results)
  masks = referring_lib.referring_masks(gt_masks, pred_masks)
  boxes = referring_lib.referring_boxes(np.asarray(gt_boxes).reshape(-1, 4),
                                        np.asarray(pred_boxes).reshape(-1, 4))
  return {'refer_oIoU': masks['oIoU'], 'refer_mIoU': masks['mIoU'],
          'refer_mask_P50': masks['Prec@0.5'], 'refer_box_P50': boxes['P@0.5']}


def _part_pass(run: _Pass, vocabulary: hipie_samples.Vocabulary, settings: EvalSettings,
               out_dir: str) -> Dict[str, float]:
  """The part pass: part mIoU over the part classes and background."""
  lookup = part_label_lookup(vocabulary)  # [C]
  parts = part_classes(vocabulary)  # [P]
  if not len(parts):
    raise ValueError(f"dataset '{run.dataset}': the part vocabulary has no 'object part' class")
  if len(parts) + 1 > miou_lib.IGNORE:
    raise ValueError(f"dataset '{run.dataset}': {len(parts)} part classes do not fit part labels "
                     f'with the ignore label {miou_lib.IGNORE}')
  confusion = np.zeros((len(parts) + 2, len(parts) + 2), np.int64)  # [P+2, P+2]
  for image in run:
    rec = image.record
    file_name = f'{rec.image_id}.png'
    out = _class_image(image, vocabulary, settings, run.canvas, instances=False)
    pred = postprocess.coarse_part_labels(out['semantic'], lookup)  # [H, W]
    gt = part_ground_truth(rec, vocabulary)  # [H, W]
    confusion += miou_lib.confusion_matrix(
        gt, pred, len(parts) + 1, f"dataset '{run.dataset}' image {rec.image_id}")
    _write_png(os.path.join(out_dir, 'labels', file_name), out['semantic'])
    _write_png(os.path.join(out_dir, 'groups', file_name), pred)
    _write_png(os.path.join(out_dir, 'groups_gt', file_name), gt)
  if jax.process_index() == 0:
    names = {'0': 'background'}
    names.update({str(k + 1): vocabulary.names[c] for k, c in enumerate(parts.tolist())})
    writers.write_json(os.path.join(out_dir, 'groups.json'), names)
  return {'part_mIoU': miou_lib.miou_from_confusion(confusion)['mIoU']}


def evaluate_hipie(forward: Forward, sources: Mapping[str, Any],
                   vocabularies: Mapping[str, hipie_samples.Vocabulary],
                   tokenizer: transformers.PreTrainedTokenizerBase,
                   section: ml_collections.ConfigDict, eval_config: ml_collections.ConfigDict,
                   out_dir: str, mesh: jax.sharding.Mesh) -> Dict[str, float]:
  """Evaluates HIPIE on the configured passes and writes the files and metrics.json.

  Args:
    forward: (batch of global arrays, task) -> HIPIEModel outputs (module docstring).
    sources: readers by `config.datasets` name (`dataset_config.build_sources`).
    vocabularies: class vocabularies of the panoptic and part datasets.
    tokenizer: the BERT tokenizer.
    section: the input config section `hipie_pipeline.build_eval_pipeline` reads.
    eval_config: the keys `EVAL_KEYS` (`read_eval_config`).
    out_dir: output folder (created if needed).
    mesh: the device mesh the batch is split over.

  Returns:
    The metrics of the module docstring, in percent (keys of skipped passes absent).

  Raises:
    ValueError / KeyError: for a bad eval config, a missing source or vocabulary, or a forward
      output without the keys read.
  """
  settings = read_eval_config(eval_config)
  metrics: Dict[str, float] = {}
  for task in PASSES:
    dataset = getattr(settings, task)
    if not dataset:
      continue
    vocabulary = None
    if task != 'referring':
      if dataset not in vocabularies:
        raise KeyError(f"HIPIE eval: the {task} dataset '{dataset}' has no vocabulary; "
                       f'vocabularies are given for {sorted(vocabularies)}')
      vocabulary = vocabularies[dataset]
    run = _Pass(forward, sources, dataset, task, vocabulary, tokenizer, section, mesh)
    folder = os.path.join(out_dir, task)
    if task == 'panoptic':
      metrics.update(_panoptic_pass(run, vocabulary, settings, folder))
    elif task == 'referring':
      metrics.update(_referring_pass(run, folder))
    else:
      metrics.update(_part_pass(run, vocabulary, settings, folder))
  if jax.process_index() == 0:
    writers.write_json(os.path.join(out_dir, 'metrics.json'), metrics)
  return metrics
