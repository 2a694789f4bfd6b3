"""Writers of prediction files in the official formats the reference evaluators read.

* COCO instance results: [{"image_id", "category_id", "segmentation" (RLE), "bbox", "score"}];
* class-agnostic COCO ground truth / results of one AIMS level (every category 1);
* COCO panoptic predictions: PNG (id = R + 256·G + 256²·B) + JSON `annotations`;
* semantic label maps: single-channel PNG;
* Pascal-Panoptic-Parts predictions: 3-channel PNG (scene eval id, instance id, part eval id;
  255 = unknown part), what panoptic_parts' `eval_PartPQ` reads;
* PSG relation predictions: OpenPSG submission (`relation.json` + `panseg/*.png`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from data_pipelines.records import ImageRecord
from eval.panoptic_png import id2rgb


def write_json(path: str, obj: Any) -> None:
  """Writes JSON, creating the parent folder.

  Args:
    path: output file.
    obj: JSON-serialisable object.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def encode_mask(mask: np.ndarray) -> dict:
  """COCO RLE of a binary mask with a str `counts`.

  Args:
    mask: bool [H, W].

  Returns:
    {"size": [H, W], "counts": str}.
  """
  rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  rle["counts"] = rle["counts"].decode("ascii")
  return rle


def coco_instance_results(image_id: int, masks: np.ndarray, scores: np.ndarray,
                          category_ids: np.ndarray | Sequence[int]) -> list[dict]:
  """COCO instance-segmentation results of one image.

  Args:
    image_id: the image's id in the ground truth.
    masks: bool [N, H, W].
    scores: float [N].
    category_ids: int [N] ground-truth category ids (1 for class-agnostic levels).

  Returns:
    N result dicts with RLE `segmentation`, `bbox` [x, y, w, h] of the mask, `score`,
    `category_id`.

  Raises:
    ValueError: when the lengths differ.
  """
  masks = np.asarray(masks, bool)  # [N, H, W]
  scores = np.asarray(scores, np.float64).reshape(-1)  # [N]
  category_ids = np.asarray(category_ids, np.int64).reshape(-1)  # [N]
  if not len(masks) == len(scores) == len(category_ids):
    raise ValueError(f"image {image_id}: {len(masks)} masks, {len(scores)} scores, "
                     f"{len(category_ids)} category ids")
  out = []
  for m, s, c in zip(masks, scores, category_ids):
    rle = encode_mask(m)
    out.append({"image_id": image_id, "category_id": int(c), "segmentation": rle,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "score": float(s)})
  return out


def _level_masks(record: ImageRecord, level: str) -> list[tuple[np.ndarray, bool]]:
  """(mask, iscrowd) of every ground-truth region of a level."""
  if level == "entity":
    return [(s.mask, bool(s.iscrowd)) for s in record.segments]
  if level == "part":
    return [(p.mask, False) for p in record.parts]
  if level == "relation":
    out, seen = [], set()
    for r in record.relations:
      key = frozenset((r.subject_id, r.object_id))
      if key in seen:
        continue
      seen.add(key)
      out.append((record.segment(r.subject_id).mask | record.segment(r.object_id).mask, False))
    return out
  raise ValueError(f"unknown level {level!r}; expected one of part, entity, relation")


def class_agnostic_ground_truth(records: Sequence[ImageRecord], level: str) -> dict:
  """Class-agnostic COCO ground truth of one AIMS level.

  Entities are all segments (things and stuff; crowd kept as `iscrowd` 1), parts are all parts,
  relations are the union masks of each related (subject, object) pair, one per unordered pair
  whatever its predicates. Only images that annotate the level are included.

  Args:
    records: the evaluated images.
    level: "part", "entity" or "relation".

  Returns:
    COCO dict with `images`, `annotations` (RLE, area, bbox, iscrowd, category_id 1) and
    `categories` [{"id": 1, "name": "object"}].

  Raises:
    ValueError: naming the image for duplicated image ids or masks of the wrong size.
  """
  images, annotations, seen = [], [], set()
  for rec in records:
    if level not in rec.levels:
      continue
    if rec.image_id in seen:
      raise ValueError(f"{rec.dataset}: image id {rec.image_id} ({rec.file_name}) appears twice")
    seen.add(rec.image_id)
    images.append({"id": rec.image_id, "file_name": os.path.basename(rec.file_name),
                   "height": rec.height, "width": rec.width})
    for mask, crowd in _level_masks(rec, level):
      if mask.shape != (rec.height, rec.width):
        raise ValueError(f"{rec.dataset}: image {rec.image_id} ({rec.file_name}) has a {level} "
                         f"mask of shape {mask.shape}, expected {(rec.height, rec.width)}")
      rle = encode_mask(mask)
      annotations.append({"id": len(annotations) + 1, "image_id": rec.image_id, "category_id": 1,
                          "segmentation": rle, "area": float(mask_utils.area(rle)),
                          "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                          "iscrowd": int(crowd)})
  return {"images": images, "annotations": annotations,
          "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}


def panoptic_id_map(masks: np.ndarray, segment_ids: Sequence[int]) -> np.ndarray:
  """Paints non-overlapping segment masks into an id map.

  Args:
    masks: bool [N, H, W], pairwise disjoint.
    segment_ids: N distinct ids > 0.

  Returns:
    int64 [H, W], 0 where no segment.

  Raises:
    ValueError: for overlapping masks, duplicated or non-positive ids.
  """
  masks = np.asarray(masks, bool)  # [N, H, W]
  ids = [int(i) for i in segment_ids]
  if len(set(ids)) != len(ids) or any(i <= 0 for i in ids):
    raise ValueError(f"segment ids must be distinct and > 0, got {ids}")
  if len(masks) and masks.sum(0).max() > 1:
    raise ValueError("panoptic segment masks overlap")
  out = np.zeros(masks.shape[1:], np.int64)  # [H, W]
  for m, i in zip(masks, ids):
    out[m] = i
  return out


def write_panoptic_prediction(png_folder: str, image_id: Any, file_name: str, masks: np.ndarray,
                              category_ids: Sequence[int], isthing: Sequence[bool] | None = None
                              ) -> dict:
  """Writes one image's COCO panoptic PNG and returns its JSON annotation.

  Segment ids are 1..N in the given order; empty masks are dropped (the evaluators refuse
  segments listed in the JSON but absent from the PNG).

  Args:
    png_folder: the prediction PNG folder.
    image_id: the ground-truth image id.
    file_name: PNG name inside `png_folder`.
    masks: bool [N, H, W], pairwise disjoint.
    category_ids: N ground-truth category ids.
    isthing: optional N flags stored in `segments_info`.

  Returns:
    {"image_id", "file_name", "segments_info": [{"id", "category_id", "area", "bbox",
    "iscrowd"[, "isthing"]}]}.
  """
  masks = np.asarray(masks, bool)  # [N, H, W]
  keep = [i for i in range(len(masks)) if masks[i].any()]
  ids = list(range(1, len(keep) + 1))
  id_map = panoptic_id_map(masks[keep], ids)  # [H, W]
  os.makedirs(png_folder, exist_ok=True)
  Image.fromarray(id2rgb(id_map)).save(os.path.join(png_folder, file_name))
  segments = []
  for sid, k in zip(ids, keep):
    rle = encode_mask(masks[k])
    seg = {"id": sid, "category_id": int(category_ids[k]), "area": int(masks[k].sum()),
           "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0}
    if isthing is not None:
      seg["isthing"] = int(bool(isthing[k]))
    segments.append(seg)
  return {"image_id": image_id, "file_name": file_name, "segments_info": segments}


def write_panoptic_json(path: str, annotations: Sequence[dict],
                        categories: Sequence[dict] | None = None) -> None:
  """Writes a COCO panoptic prediction JSON.

  Args:
    path: output file (its PNG folder is conventionally `path` without `.json`).
    annotations: from `write_panoptic_prediction`.
    categories: optional category list to embed.
  """
  obj = {"annotations": list(annotations)}
  if categories is not None:
    obj["categories"] = list(categories)
  write_json(path, obj)


def write_semantic_png(path: str, labels: np.ndarray) -> None:
  """Writes a semantic label map as a single-channel PNG (8-bit, or 16-bit above 255).

  Args:
    path: output file.
    labels: int [H, W] label ids in [0, 65535].

  Raises:
    ValueError: for ids outside [0, 65535].
  """
  labels = np.asarray(labels, np.int64)  # [H, W]
  if labels.size and (labels.min() < 0 or labels.max() > 65535):
    raise ValueError(f"{path}: label ids must lie in [0, 65535], got [{labels.min()}, "
                     f"{labels.max()}]")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arr = labels.astype(np.uint8) if labels.max(initial=0) <= 255 else labels.astype(np.uint16)
  Image.fromarray(arr).save(path)


def read_semantic_png(path: str, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
  """Reads a single-channel label PNG.

  Args:
    path: the PNG.
    expected_hw: (H, W) it must have, or None.

  Returns:
    int64 [H, W].

  Raises:
    ValueError: naming the file for a size mismatch or more than one channel.
  """
  with Image.open(path) as im:
    arr = np.array(im).astype(np.int64)  # [H, W]
  if arr.ndim != 2:
    raise ValueError(f"{path}: expected a single-channel label PNG, got shape {arr.shape}")
  if expected_hw is not None and arr.shape != tuple(expected_hw):
    raise ValueError(f"{path}: size {arr.shape} differs from the ground truth's "
                     f"{tuple(expected_hw)}")
  return arr


def write_part_panoptic_png(path: str, scene: np.ndarray, instance: np.ndarray,
                            part: np.ndarray) -> None:
  """Writes a part-aware panoptic prediction as panoptic_parts' 3-channel PNG.

  Args:
    path: output file, `<image id>.png`.
    scene: int [H, W] scene-class eval ids (0 / unevaluated ids for void).
    instance: int [H, W] instance ids (0 for stuff).
    part: int [H, W] part eval ids (0 = none, 255 = unknown).

  Raises:
    ValueError: for shape mismatches or values outside [0, 255].
  """
  chans = [np.asarray(c, np.int64) for c in (scene, instance, part)]
  if not chans[0].shape == chans[1].shape == chans[2].shape:
    raise ValueError(f"{path}: channel shapes differ: {[c.shape for c in chans]}")
  for name, c in zip(("scene", "instance", "part"), chans):
    if c.size and (c.min() < 0 or c.max() > 255):
      raise ValueError(f"{path}: {name} ids must lie in [0, 255], got [{c.min()}, {c.max()}]")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(np.stack(chans, axis=-1).astype(np.uint8)).save(path)


def psg_prediction_entry(submission_dir: str, image_id: Any, masks: np.ndarray,
                         category_ids: Sequence[int], pair_predicate_scores: np.ndarray,
                         pairs: np.ndarray, max_triplets: int = 100) -> dict:
  """Writes one image's OpenPSG panseg PNG and returns its `relation.json` entry.

  With the graph constraint each (subject, object) pair gets its arg-max predicate; triplets are
  ranked by that predicate score (stable) and the top `max_triplets` written.

  Args:
    submission_dir: the submission folder (PNG goes to `panseg/<image_id>.png`).
    image_id: the ground-truth image id.
    masks: bool [N, H, W] pairwise-disjoint segment masks.
    category_ids: N psg.json (0-based) category ids; written 1-based, as OpenPSG's submission.
    pair_predicate_scores: float [R, C] per candidate pair, scores of the C predicates (psg.json
      order).
    pairs: int [R, 2] (subject index, object index) into `masks`.
    max_triplets: triplets kept.

  Returns:
    {"image_id", "relations": [[s, o, predicate (1-based)]], "segments_info": [{"id",
    "category_id" (1-based)}], "pan_seg_file_name"}.
  """
  masks = np.asarray(masks, bool)  # [N, H, W]
  scores = np.asarray(pair_predicate_scores, np.float64).reshape(len(pairs), -1)  # [R, C]
  pairs = np.asarray(pairs, np.int64).reshape(-1, 2)  # [R, 2]
  if len(pairs) and (pairs.min() < 0 or pairs.max() >= len(masks)):
    raise ValueError(f"image {image_id}: a pair indexes a segment that does not exist "
                     f"({len(masks)} segments)")
  file_name = f"{image_id}.png"
  ids = list(range(1, len(masks) + 1))
  id_map = panoptic_id_map(masks, ids)  # [H, W]
  os.makedirs(os.path.join(submission_dir, "panseg"), exist_ok=True)
  Image.fromarray(id2rgb(id_map)).save(os.path.join(submission_dir, "panseg", file_name))
  best = scores.argmax(1) if len(pairs) else np.zeros([0], np.int64)  # [R]
  best_score = scores.max(1) if len(pairs) else np.zeros([0])  # [R]
  order = np.argsort(-best_score, kind="stable")[:max_triplets]  # [R']
  relations = [[int(pairs[r, 0]), int(pairs[r, 1]), int(best[r]) + 1] for r in order]
  return {"image_id": image_id, "relations": relations,
          "segments_info": [{"id": i, "category_id": int(c) + 1}
                            for i, c in zip(ids, category_ids)],
          "pan_seg_file_name": file_name}


def write_psg_submission(submission_dir: str, entries: Sequence[dict]) -> None:
  """Writes `relation.json` of an OpenPSG submission.

  Args:
    submission_dir: the submission folder.
    entries: from `psg_prediction_entry`, one per image.
  """
  write_json(os.path.join(submission_dir, "relation.json"), list(entries))
