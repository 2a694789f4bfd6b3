"""Writes synthetic scenes in the native file formats of the real datasets.

One `DatasetWriter` collects the annotations of every image and writes, under the output root:

  images/{train,val}/<stem>.png                       RGB images, shared by every format
  panoptic/panoptic_{train,val}.json + panoptic_{train,val}/<stem>.png   COCO panoptic
  instances/instances_{train,val}.json                COCO instances of the things (polygons where
                                                      the thing is unoccluded, compressed RLE else)
  paco/paco_{train,val}.json                          PACO-LVIS style objects + parts (obj_ann_id)
  ppp/labels/{training,validation}/<stem>.tif         Pascal-Panoptic-Parts int32 uids
  psg/psg.json                                        COCO-PSG (both splits; val = test_image_ids)
  refcoco/refs(unc).p + refcoco/instances.json        RefCOCO layout (polygons / uncompressed RLE)
  text/vocab.txt                                      a whole-word BERT vocabulary of every class,
                                                      part and colour name, predicate and sentence

Ids: image ids are 1..N (train) then N+1..N+M (val), stem = 12-digit zero-padded id; the thing or
stuff segment e of an image has id image_id·100 + e + 1 in every format; part annotations follow
in the same per-image range.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from data_pipelines import mask_codec
from data_pipelines.synthetic import scene as scene_lib
from data_pipelines.synthetic import taxonomy
from hiseg_jax.text import prompts
from hiseg_jax.text.tokenizer import write_word_vocab

SPLITS = ("train", "val")
PPP_SPLITS = {"train": "training", "val": "validation"}
PSG_SPLITS = {"train": "train", "val": "test"}
IDS_PER_IMAGE = 100
VOCAB_FILE = os.path.join("text", "vocab.txt")
PACO_OBJECTS = tuple(c for c, parts in taxonomy.THING_PARTS.items() if parts)


def stem(image_id: int) -> str:
  """File stem of an image.

  Args:
    image_id: image id.

  Returns:
    12-digit zero-padded id.
  """
  return f"{image_id:012d}"


def _bbox(mask: np.ndarray) -> list[float]:
  return list(mask_codec.mask_bbox(mask))


def _remove_previous_images(directory: str) -> None:
  """Deletes per-image files an earlier run left (12-digit stems), so no stale label is read."""
  for f in os.listdir(directory):
    name, ext = os.path.splitext(f)
    if ext in (".png", ".tif") and len(name) == 12 and name.isdigit():
      os.remove(os.path.join(directory, f))


def _dump_json(obj: Any, path: str) -> None:
  with open(path, "w") as f:
    f.write(json.dumps(obj, separators=(",", ":")))


class DatasetWriter:
  """Accumulates scenes and writes every native-format file.

  Args:
    out: output root.
    size: image side in pixels.
    seed: dataset seed (drives which PACO objects are annotated).
  """

  def __init__(self, out: str, size: int, seed: int):
    self.out = out
    self.size = size
    self.seed = seed
    for split in SPLITS:
      for d in (f"images/{split}", f"panoptic/panoptic_{split}", f"ppp/labels/{PPP_SPLITS[split]}"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
        _remove_previous_images(os.path.join(out, d))
    for d in ("instances", "paco", "psg", "refcoco"):
      os.makedirs(os.path.join(out, d), exist_ok=True)
    self.panoptic = {s: {"images": [], "annotations": []} for s in SPLITS}
    self.instances = {s: {"images": [], "annotations": []} for s in SPLITS}
    self.paco = {s: {"images": [], "annotations": []} for s in SPLITS}
    self.psg_data: list[dict] = []
    self.psg_test_ids: list[str] = []
    self.ref_images: list[dict] = []
    self.ref_annotations: list[dict] = []
    self.refs: list[dict] = []
    self.num_sentences = 0
    self.counts = {s: {"images": 0, "things": 0, "stuff": 0, "parts": 0, "relations": 0,
                       "refs": 0, "sentences": 0, "paco_objects": 0, "paco_parts": 0,
                       "occluded_things": 0, "ppp_void_pixels": 0} for s in SPLITS}

  def add(self, split: str, image_id: int, scene: scene_lib.Scene) -> None:
    """Writes the image's own files and records its annotations.

    Args:
      split: "train" or "val".
      image_id: the image id.
      scene: the rendered scene.

    Raises:
      ValueError: when the scene has more annotations than the per-image id range holds.
    """
    s, size = stem(image_id), self.size
    seg_ids = [image_id * IDS_PER_IMAGE + e + 1 for e in range(len(scene.entities))]
    n_parts = sum(len(e.parts) for e in scene.entities)
    if len(seg_ids) + n_parts >= IDS_PER_IMAGE:
      raise ValueError(f"image {image_id}: {len(seg_ids) + n_parts} annotations exceed the "
                       f"{IDS_PER_IMAGE - 1} ids reserved per image")
    counts = self.counts[split]
    counts["images"] += 1
    Image.fromarray(scene.image).save(os.path.join(self.out, "images", split, f"{s}.png"),
                                      compress_level=1)
    self._write_panoptic_png(split, s, scene, seg_ids)
    self._write_ppp(split, s, scene)
    image_info = {"id": image_id, "file_name": f"{s}.png", "height": size, "width": size}

    segments_info, psg_anns = [], []
    for e, ent in enumerate(scene.entities):
      cat = taxonomy.CATEGORY_IDS[ent.category]
      area, box = int(ent.mask.sum()), _bbox(ent.mask)
      segments_info.append({"id": seg_ids[e], "category_id": cat, "area": area, "bbox": box,
                            "iscrowd": 0})
      psg_anns.append({"bbox": [box[0], box[1], box[0] + box[2], box[1] + box[3]],
                       "bbox_mode": 0, "category_id": cat - 1})
      counts["things" if ent.isthing else "stuff"] += 1
      counts["occluded_things"] += int(ent.isthing and ent.occluded)
    self.panoptic[split]["images"].append(image_info)
    self.panoptic[split]["annotations"].append(
        {"image_id": image_id, "file_name": f"{s}.png", "segments_info": segments_info})

    self.instances[split]["images"].append(dict(image_info))
    for e, ent in enumerate(scene.entities):
      if ent.isthing:
        segm = mask_codec.encode_rle(ent.mask) if ent.occluded else ent.polygons
        self.instances[split]["annotations"].append(self._coco_ann(seg_ids[e], image_id, ent, segm))

    self._add_paco(split, image_id, image_info, scene, seg_ids)

    relations = [[r.subject, r.object, taxonomy.PREDICATES.index(r.predicate)]
                 for r in scene.relations]
    counts["relations"] += len(relations)
    self.psg_data.append({
        "file_name": f"images/{split}/{s}.png", "height": size, "width": size,
        "image_id": str(image_id), "coco_image_id": str(image_id),
        "pan_seg_file_name": f"panoptic/panoptic_{split}/{s}.png",
        "segments_info": [{"id": seg_ids[e], "category_id": taxonomy.CATEGORY_IDS[ent.category] - 1,
                           "iscrowd": 0, "isthing": int(ent.isthing), "area": int(ent.mask.sum())}
                          for e, ent in enumerate(scene.entities)],
        "annotations": psg_anns, "relations": relations})
    if split == "val":
      self.psg_test_ids.append(str(image_id))

    self.ref_images.append({"id": image_id, "file_name": f"{split}/{s}.png", "height": size,
                            "width": size})
    for e, ent in enumerate(scene.entities):
      if ent.isthing:
        segm = mask_codec.encode_uncompressed_rle(ent.mask) if ent.occluded else ent.polygons
        self.ref_annotations.append(self._coco_ann(seg_ids[e], image_id, ent, segm))
    for expr in scene.expressions:
      ann_id = seg_ids[expr.target]
      ref_id = len(self.refs) + 1
      sentences = [{"tokens": t.split(), "raw": t, "sent_id": self.num_sentences + k + 1,
                    "sent": t} for k, t in enumerate(expr.sentences)]
      self.num_sentences += len(sentences)
      self.refs.append({
          "sent_ids": [x["sent_id"] for x in sentences], "file_name": f"{s}_{ann_id}.png",
          "ann_id": ann_id, "ref_id": ref_id, "image_id": image_id, "split": split,
          "sentences": sentences,
          "category_id": taxonomy.CATEGORY_IDS[scene.entities[expr.target].category]})
      counts["refs"] += 1
      counts["sentences"] += len(sentences)

  def _coco_ann(self, ann_id: int, image_id: int, ent: scene_lib.SceneEntity, segm: Any) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": taxonomy.CATEGORY_IDS[ent.category],
            "segmentation": segm, "area": int(ent.mask.sum()), "bbox": _bbox(ent.mask),
            "iscrowd": 0}

  def _write_panoptic_png(self, split: str, s: str, scene: scene_lib.Scene,
                          seg_ids: list[int]) -> None:
    ids = np.zeros((self.size, self.size), dtype=np.int64)  # [S, S]
    for e, ent in enumerate(scene.entities):
      ids[ent.mask] = seg_ids[e]
    Image.fromarray(mask_codec.id_to_rgb(ids)).save(
        os.path.join(self.out, "panoptic", f"panoptic_{split}", f"{s}.png"))

  def _write_ppp(self, split: str, s: str, scene: scene_lib.Scene) -> None:
    uids = np.zeros((self.size, self.size), dtype=np.int32)  # [S, S]
    instance_counter: dict[str, int] = {}
    for ent in scene.entities:
      sid = taxonomy.CATEGORY_IDS[ent.category]
      if not ent.isthing:
        uids[ent.mask] = sid
        continue
      iid = instance_counter.get(ent.category, 0) + 1
      instance_counter[ent.category] = iid
      uids[ent.mask] = sid * 1000 + iid
      for part in ent.parts:
        uids[part.mask] = sid * 100_000 + iid * 100 + taxonomy.part_pid(ent.category, part.name)
    uids[scene.void] = 0
    self.counts[split]["ppp_void_pixels"] += int(scene.void.sum())
    tifffile.imwrite(os.path.join(self.out, "ppp", "labels", PPP_SPLITS[split], f"{s}.tif"), uids,
                     compression="zlib")

  def _add_paco(self, split: str, image_id: int, image_info: dict, scene: scene_lib.Scene,
                seg_ids: list[int]) -> None:
    rng = np.random.default_rng([self.seed, image_id, 1])
    candidates = [e for e, ent in enumerate(scene.entities) if ent.category in PACO_OBJECTS]
    chosen = [e for e in candidates if rng.random() < 0.75]
    if candidates and not chosen:
      chosen = [candidates[int(rng.integers(len(candidates)))]]
    present = {scene.entities[e].category for e in candidates}
    partial = {scene.entities[e].category for e in candidates if e not in chosen}
    info = dict(image_info)
    info.update({
        "neg_category_ids": [taxonomy.CATEGORY_IDS[c] for c in PACO_OBJECTS if c not in present],
        "not_exhaustive_category_ids": sorted(taxonomy.CATEGORY_IDS[c] for c in partial),
        "neg_category_ids_attrs": [], "not_exhaustive_category_ids_attrs": [], "license": 1})
    self.paco[split]["images"].append(info)
    anns = self.paco[split]["annotations"]
    next_id = image_id * IDS_PER_IMAGE + len(seg_ids) + 1
    for e in chosen:
      ent = scene.entities[e]
      anns.append(self._paco_ann(seg_ids[e], image_id, taxonomy.CATEGORY_IDS[ent.category],
                                 ent.mask, seg_ids[e]))
      self.counts[split]["paco_objects"] += 1
      for part in ent.parts:
        cat = taxonomy.PART_CATEGORY_IDS[(ent.category, part.name)]
        anns.append(self._paco_ann(next_id, image_id, cat, part.mask, seg_ids[e]))
        next_id += 1
        self.counts[split]["paco_parts"] += 1
    self.counts[split]["parts"] += sum(len(ent.parts) for ent in scene.entities)

  def _paco_ann(self, ann_id: int, image_id: int, cat: int, mask: np.ndarray,
                obj_ann_id: int) -> dict:
    return {"id": ann_id, "bbox": _bbox(mask), "area": int(mask.sum()), "category_id": cat,
            "image_id": image_id, "segmentation": mask_codec.encode_rle(mask),
            "attribute_ids": [], "dom_color_ids": [], "obj_ann_id": obj_ann_id,
            "unknown_color": 0, "unknown_pattern_marking": 0, "unknown_material": 0,
            "unknown_transparency": 0}

  def finish(self) -> None:
    """Writes the per-split and shared annotation files."""
    out = self.out
    panoptic_cats = [{"id": taxonomy.CATEGORY_IDS[c], "name": c, "supercategory": c,
                      "isthing": int(c in taxonomy.THING_CLASSES),
                      "color": list(taxonomy.PALETTE[taxonomy.COLOUR_NAMES[i % 12]])}
                     for i, c in enumerate(taxonomy.THING_CLASSES + taxonomy.STUFF_CLASSES)]
    thing_cats = [{"id": taxonomy.CATEGORY_IDS[c], "name": c, "supercategory": c, "isthing": 1}
                  for c in taxonomy.THING_CLASSES]
    part_names = sorted({p for _, p in taxonomy.PART_CATEGORIES})
    paco_cats = [{"supercategory": "OBJECT", "id": taxonomy.CATEGORY_IDS[c], "name": c,
                  "synset": f"{c}.n.01", "frequency": "f"} for c in PACO_OBJECTS]
    paco_cats += [{"supercategory": "PART", "id": taxonomy.PART_CATEGORY_IDS[key],
                   "name": f"{key[0]}:{key[1]}"} for key in taxonomy.PART_CATEGORIES]
    for split in SPLITS:
      _dump_json(dict(self.panoptic[split], categories=panoptic_cats),
                 os.path.join(out, "panoptic", f"panoptic_{split}.json"))
      _dump_json(dict(self.instances[split], categories=thing_cats),
                 os.path.join(out, "instances", f"instances_{split}.json"))
      paco = dict(self.paco[split], categories=paco_cats,
                  part_categories=[{"supercategory": "PART", "id": i + 1, "name": n}
                                   for i, n in enumerate(part_names)],
                  attributes=[], attr_type_to_attr_idxs={})
      _dump_json(paco, os.path.join(out, "paco", f"paco_{split}.json"))
    _dump_json({"data": self.psg_data, "thing_classes": list(taxonomy.THING_CLASSES),
                "stuff_classes": list(taxonomy.STUFF_CLASSES),
                "predicate_classes": list(taxonomy.PREDICATES),
                "test_image_ids": self.psg_test_ids}, os.path.join(out, "psg", "psg.json"))
    _dump_json({"images": self.ref_images, "annotations": self.ref_annotations,
                "categories": thing_cats}, os.path.join(out, "refcoco", "instances.json"))
    with open(os.path.join(out, "refcoco", "refs(unc).p"), "wb") as f:
      pickle.dump(self.refs, f, protocol=2)
    texts = list(taxonomy.THING_CLASSES + taxonomy.STUFF_CLASSES + taxonomy.COLOUR_NAMES
                 + taxonomy.PREDICATES) + part_names
    texts += [x["sent"] for ref in self.refs for x in ref["sentences"]]
    texts.append(prompts.SEPARATOR)  # joins the class names of a prompt
    write_word_vocab(os.path.join(out, VOCAB_FILE), texts)
