"""AIMS evaluation: class-agnostic mask AP per level and association AR@100 (AIMS Sec. 4).

Federated evaluation as in the paper: two subsets, each annotated at two levels,
  entity–part (`config.eval.entity_part`, a Pascal-Panoptic-Parts style dataset): AP_part,
    AP_entity and AR_ep;
  relation–entity (`config.eval.relation_entity`, a COCO-PSG style dataset): AP_relation,
    AP_entity_re (entity AP on that subset) and AR_re.
Every image is resized (longer side) onto a canvas of `config.eval.image_size` (which may differ
from the training canvas `config.image_size`) and run once with the full-image prompt (one-step
inference, `hiseg_jax.aims.inference.one_step`, top `config.eval.top_k` per level, scores decayed
by Matrix NMS when `config.eval.mask_nms` is "matrix", as given when "none"); the kept masks'
logits are upsampled to the canvas, cut to the image's window, resized (bilinear) to the original
image size and binarised there (`to_original`). The masks of the levels in
`config.eval.split_components` are then split into their connected components
(`hiseg_jax.postprocess.components.split_components`; each component scored by its mask's score
times its share of the mask's area, with its query's association row and column); the papers'
inference splits nothing (`()`).

Files, under the output folder (`W/eval/<step>/` in training, `--out` of `eval.evaluate`): for
each subset `<subset>/<level>_gt.json` (class-agnostic COCO ground truth,
`eval.writers.class_agnostic_ground_truth`) and `<subset>/<level>_results.json` (COCO results,
RLE masks, category 1), and `metrics.json` with AP/AP50/AP75 per level and AR_ep, AR_re
(percentages). AP is pycocotools' segm AP (IoU .50:.95, maxDets 100) with every category
set to 1; AR is `eval.association.association_recall` (its docstring has the definition), pair
scores = association probability × both mask scores.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
import tqdm

from data_pipelines import dataset_config
from data_pipelines import pipeline
from data_pipelines import records as records_lib
from eval import association
from eval import coco_eval
from eval import writers
from hiseg_jax import config_validation
from hiseg_jax.postprocess import components
from hiseg_jax.postprocess import resize
from hiseg_jax.train import sharding

# config.eval.mask_nms: "none" (the paper's scoring) or "matrix" (Matrix NMS score decay).
MASK_NMS = ('none', 'matrix')
# config.eval.image_size must be a multiple of the backbone's largest stride.
CANVAS_MULTIPLE = 32

# config.eval.split_components: the levels whose predicted masks are split into their connected
# components (`hiseg_jax.postprocess.components`). Relation masks, unions of two entities, are
# disconnected by nature.
SPLIT_LEVELS = ('part', 'entity')

# Subset name -> (config.eval key, the two levels (higher, lower), association output key).
SUBSETS = {
    'entity_part': ('entity_part', ('entity', 'part'), 'assoc_ep'),
    'relation_entity': ('relation_entity', ('relation', 'entity'), 'assoc_re'),
}


def valid_window(orig_size: np.ndarray, canvas: int) -> np.ndarray:
  """The canvas window an image occupies under the evaluation geometry.

  Args:
    orig_size: int [B, 2] original (H, W).
    canvas: canvas side S.

  Returns:
    int32 [B, 2] (round(H·s), round(W·s)) with s = S / max(H, W).
  """
  orig = np.asarray(orig_size, np.float64)  # [B, 2]
  scale = canvas / np.maximum(orig.max(axis=1, keepdims=True), 1)  # [B, 1]
  return np.clip(np.round(orig * scale), 1, canvas).astype(np.int32)  # [B, 2]


def to_original(mask_logits: np.ndarray, canvas: int, window: Sequence[int],
                size: Sequence[int]) -> np.ndarray:
  """Binary masks at the original image size from mask logits on the canvas.

  As Mask2Former's inference (`sem_seg_postprocess`): the logits are upsampled bilinearly to
  the canvas, cut to the image window, resized bilinearly to the original size and then
  binarised at probability 0.5 (binarising on the canvas and resizing the binary masks loses
  boundary detail: AP_part 26.7 against 27.1 on the 3,300-step runlocal checkpoint).

  Args:
    mask_logits: [K, h, w] logits at 1/stride of the S x S canvas (h = S / stride).
    canvas: canvas side S.
    window: (h_img, w_img) valid window at the canvas' top left.
    size: original (H, W).

  Returns:
    bool [K, H, W].

  Raises:
    ValueError: when the logits' side does not divide the canvas side.
  """
  if mask_logits.ndim != 3 or canvas % mask_logits.shape[1]:
    raise ValueError(f'to_original: mask logits {mask_logits.shape} are not [K, h, w] with h '
                     f'dividing the canvas side {canvas}')
  stride = canvas // mask_logits.shape[1]
  return resize.host_mask_logits_to_output(mask_logits, stride, window, size) > 0  # [K, H, W]


def association_ground_truth(record: records_lib.ImageRecord, levels: Sequence[str]
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Ground-truth masks and pairs of one image for a pair of levels.

  Entity–part: every non-crowd segment and every part, paired by `parent_id`. Relation–entity:
  one union mask per related unordered (subject, object) pair, in first-appearance order as in
  `writers.class_agnostic_ground_truth`, paired with both its entities.

  Args:
    record: the image.
    levels: ('entity', 'part') or ('relation', 'entity').

  Returns:
    (high bool [Gh, H, W], low bool [Gl, H, W], pairs int [K, 2]).
  """
  hw = (record.height, record.width)
  if tuple(levels) == ('entity', 'part'):
    entities = [s for s in record.segments if not s.iscrowd]
    row = {s.id: i for i, s in enumerate(entities)}
    pairs = [(row[p.parent_id], j) for j, p in enumerate(record.parts) if p.parent_id in row]
    high = [s.mask for s in entities]
    low = [p.mask for p in record.parts]
  else:
    row = {s.id: i for i, s in enumerate(record.segments)}
    high, pairs, seen = [], [], set()
    for r in record.relations:
      key = frozenset((r.subject_id, r.object_id))
      if key in seen:
        continue
      seen.add(key)
      pairs += [(len(high), row[r.subject_id]), (len(high), row[r.object_id])]
      high.append(record.segment(r.subject_id).mask | record.segment(r.object_id).mask)
    low = [s.mask for s in record.segments]
  stack = lambda ms: np.stack(ms) if ms else np.zeros((0,) + hw, bool)
  return stack(high), stack(low), np.asarray(pairs, np.int64).reshape(-1, 2)


def image_predictions(pred: Dict[str, Any], levels: Sequence[str], assoc_key: str,
                      canvas: int, window: Sequence[int], size: Sequence[int],
                      split_levels: Sequence[str]
                      ) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray],
                                 Optional[np.ndarray]]:
  """One image's binary masks and scores per level at its original size, and their association.

  Args:
    pred: one image's one-step inference outputs: per level {'mask_logits': [K, h, w] on the
      S x S canvas, 'scores': [K]}, and `assoc_key` [K_high, K_low] when the model has it.
    levels: (higher, lower) level.
    assoc_key: the association output of the two levels.
    canvas: canvas side S.
    window: (h_img, w_img) the image's window on the canvas.
    size: original (H, W).
    split_levels: levels whose masks are split into their connected components.

  Returns:
    (masks {level: bool [K', H, W]}, scores {level: [K']}, association [K'_high, K'_low] or
    None): a split mask's components each take its query's association row (column).
  """
  masks, scores, query = {}, {}, {}
  for level in levels:
    masks[level] = to_original(pred[level]['mask_logits'], canvas, window, size)  # [K, H, W]
    scores[level] = np.asarray(pred[level]['scores'])  # [K]
    query[level] = np.arange(len(scores[level]))  # [K]
    if level in split_levels:
      masks[level], scores[level], query[level] = components.split_components(
          masks[level], scores[level])  # [K', H, W], [K'], [K']
  assoc = None
  if assoc_key in pred:
    assoc = np.asarray(pred[assoc_key])[query[levels[0]]][:, query[levels[1]]]  # [K'_h, K'_l]
  return masks, scores, assoc


def check_eval_config(config: ml_collections.ConfigDict) -> None:
  """Checks `config.eval` (the trainer runs this at start, through the AIMS spec).

  Args:
    config: the run config (`config.eval`, `config.datasets`).

  Raises:
    ValueError: listing unknown or missing keys of `config.eval`, a `mask_nms` outside
      `MASK_NMS`, a `top_k` that is not a positive int, an `image_size` that is not a positive
      multiple of `CANVAS_MULTIPLE`, a `split_components` that is not a tuple of distinct
      levels from `SPLIT_LEVELS`, and subset datasets that are not in `config.datasets`.
  """
  if 'eval' not in config:
    raise ValueError('config.eval: missing (the AIMS evaluation section)')
  expected = ({'top_k', 'mask_nms', 'image_size', 'split_components'}
              | {key for key, _, _ in SUBSETS.values()})
  problems = config_validation.key_problems('config.eval', config.eval.keys(), expected)
  if not problems:
    if config.eval.mask_nms not in MASK_NMS:
      problems.append(f'config.eval.mask_nms must be one of {MASK_NMS}, got '
                      f'{config.eval.mask_nms!r}')
    top_k = config.eval.top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
      problems.append(f'config.eval.top_k must be an int >= 1, got {top_k!r}')
    size = config.eval.image_size
    if (isinstance(size, bool) or not isinstance(size, int) or size < CANVAS_MULTIPLE
        or size % CANVAS_MULTIPLE):
      problems.append(f'config.eval.image_size must be a positive multiple of '
                      f'{CANVAS_MULTIPLE}, got {size!r}')
    split = config.eval.split_components
    if (not isinstance(split, (tuple, list)) or len(set(split)) != len(split)
        or not set(split) <= set(SPLIT_LEVELS)):
      problems.append(f'config.eval.split_components must be a tuple of distinct levels from '
                      f'{SPLIT_LEVELS}, got {split!r}')
    for key, _, _ in SUBSETS.values():
      name = config.eval[key]
      if not isinstance(name, str) or (name and name not in config.datasets):
        problems.append(f"config.eval.{key} must be '' or one of config.datasets "
                        f'{sorted(config.datasets.keys())}, got {name!r}')
  if problems:
    raise ValueError('; '.join(problems))


def _predict_fn(module, config: ml_collections.ConfigDict):
  """The jitted one-step inference of a batch, without the canvas masks (`to_original`)."""
  from hiseg_jax.aims import inference  # pylint: disable=g-import-not-at-top
  from hiseg_jax.aims.model import LEVELS  # pylint: disable=g-import-not-at-top
  from hiseg_jax.aims import spec  # pylint: disable=g-import-not-at-top

  check_eval_config(config)

  @jax.jit
  def predict(variables, batch, window):
    outputs = spec.apply_model(module, variables, batch, train=False)
    result = inference.one_step(outputs, window, batch['image'].shape[1:3],
                                top_k=config.eval.top_k,
                                mask_nms=config.eval.mask_nms == 'matrix')
    for level in LEVELS:
      del result[level]['masks']  # binarised at the original size instead
    return result
  return predict


def _evaluate_subset(predict, variables, config, sources, dataset_name: str,
                     levels: Sequence[str], assoc_key: str, out_dir: str, mesh
                     ) -> Dict[str, float]:
  """Runs one subset and scores it."""
  from hiseg_jax.aims import spec  # pylint: disable=g-import-not-at-top
  source = sources[dataset_name]
  section = spec.input_section(config)
  section.image_size = canvas = config.eval.image_size
  built = pipeline.build_eval_pipeline(section, sources, dataset_name)
  by_id = {}
  for i in range(len(source)):
    by_id[int(source.meta(i).image_id)] = i
  results = {level: [] for level in levels}
  records, assoc_images = [], []
  batch_sharding = sharding.batch_sharding(mesh)
  for host_batch in tqdm.tqdm(iter(built.dataset), total=built.num_batches,
                              desc=f'eval {dataset_name}', leave=False):
    inputs = {k: host_batch[k] for k in ('image', 'prompt/mask')}
    inputs['window'] = valid_window(host_batch['orig_size'], canvas)  # [B, 2]
    inputs = sharding.global_batch(inputs, batch_sharding, built.host_batch_size)
    pred = predict(variables, inputs, inputs.pop('window'))
    pred = jax.tree.map(np.asarray, multihost_utils.process_allgather(pred, tiled=True))
    ids = multihost_utils.process_allgather(host_batch['image_id'], tiled=True)
    sizes = multihost_utils.process_allgather(host_batch['orig_size'], tiled=True)
    windows = valid_window(sizes, canvas)
    for b, image_id in enumerate(np.asarray(ids)):
      if image_id < 0:
        continue
      record = source[by_id[int(image_id)]]
      records.append(record)
      image_pred = jax.tree.map(lambda x: x[b], pred)
      masks, scores, assoc = image_predictions(image_pred, levels, assoc_key, canvas,
                                               windows[b], sizes[b],
                                               config.eval.split_components)
      for level in levels:
        results[level] += writers.coco_instance_results(
            int(image_id), masks[level], scores[level], np.ones(len(masks[level])))
      if assoc is not None:
        gt_high, gt_low, gt_pairs = association_ground_truth(record, levels)
        pairs, pair_scores = association.pair_scores(assoc, scores[levels[0]],
                                                     scores[levels[1]])
        assoc_images.append(association.AssociationImage(
            gt_high, gt_low, gt_pairs, masks[levels[0]], masks[levels[1]], pairs, pair_scores))
  metrics = {}
  for level in levels:
    gt = writers.class_agnostic_ground_truth(records, level)
    gt_path = os.path.join(out_dir, f'{level}_gt.json')
    res_path = os.path.join(out_dir, f'{level}_results.json')
    if jax.process_index() == 0:
      writers.write_json(gt_path, gt)
      writers.write_json(res_path, results[level])
    stats = coco_eval.coco_evaluate(gt, results[level], 'segm', class_agnostic_eval=True,
                                    gt_name=gt_path, results_name=res_path)
    for name in ('AP', 'AP50', 'AP75'):
      metrics[f'{name}_{level}'] = 100.0 * stats[name]
  if assoc_images:
    metrics['AR'] = association.association_recall(assoc_images)['AR']
  return metrics


def evaluate(module, variables: Any, config: ml_collections.ConfigDict, workdir: str, out_dir: str,
             mesh: jax.sharding.Mesh) -> Dict[str, float]:
  """Evaluates AIMS on both subsets and writes the result files and metrics.json to `out_dir`.

  Args:
    module: the AIMSModel.
    variables: its variables.
    config: the run config (`config.eval`, `config.datasets`, `config.input`).
    workdir: the run directory (the synthetic default dataset lives in it).
    out_dir: the output folder (created if needed).
    mesh: the device mesh (the batch is split over all its axes).

  Returns:
    {'AP_part', 'AP50_part', 'AP75_part', 'AP_entity', 'AP50_entity', 'AP75_entity', 'AR_ep',
    'AP_relation', 'AP50_relation', 'AP75_relation', 'AP_entity_re', 'AP50_entity_re',
    'AP75_entity_re', 'AR_re'} in percent; the keys of a subset whose dataset is '' are absent.
  """
  from hiseg_jax.aims import spec  # pylint: disable=g-import-not-at-top
  names = [config.eval[key] for key, _, _ in SUBSETS.values() if config.eval[key]]
  sources = dataset_config.build_sources(config.datasets, names,
                                         dataset_config.default_root(config, workdir))
  predict = _predict_fn(module, config)
  metrics: Dict[str, float] = {}
  for subset, (key, levels, assoc_key) in SUBSETS.items():
    if not config.eval[key]:
      continue
    m = _evaluate_subset(predict, variables, config, sources, config.eval[key], levels,
                         assoc_key, os.path.join(out_dir, subset), mesh)
    suffix = '' if subset == 'entity_part' else '_re'
    for name, value in m.items():
      if name == 'AR':
        metrics['AR_ep' if subset == 'entity_part' else 'AR_re'] = value
      elif name.endswith('_entity'):
        metrics[name + suffix] = value
      else:
        metrics[name] = value
  if jax.process_index() == 0:
    writers.write_json(os.path.join(out_dir, 'metrics.json'), metrics)
  return metrics
