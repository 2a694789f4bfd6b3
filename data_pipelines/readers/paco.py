"""Reader of PACO (LVIS-style JSON with object and part annotations in one list).

An annotation is an object when it has no `obj_ann_id` or `obj_ann_id == id`; otherwise it is a
part of the object annotation `obj_ann_id`, which must exist in the same file and image. Part
categories are named "object:part". PACO annotates only some objects of an image, so a record's
`annotated` area is the union of its annotated object masks.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from data_pipelines import records
from data_pipelines.readers import base
from data_pipelines.readers import coco_json


def _is_object(ann: dict) -> bool:
  return "obj_ann_id" not in ann or int(ann["obj_ann_id"]) == int(ann["id"])


class PacoReader(base.NativeReader):
  """PACO: objects (entity level) and their parts (part level), partially annotated.

  Args:
    name: dataset name (config key).
    annotation_file: paco_*.json.
    image_root: directory of the images (image `file_name`s are relative to it).
  """

  FORMAT = "paco"
  LEVELS = frozenset({"entity", "part"})

  def __init__(self, name: str, annotation_file: str, image_root: str):
    super().__init__(name)
    self.annotation_file = os.path.abspath(annotation_file)
    self.image_root = image_root
    data = base.load_json(annotation_file, "PACO annotation file")
    self._index = coco_json.index_coco(data, self.annotation_file)
    self._objects: dict[int, list[dict]] = {}
    self._parts: dict[int, list[dict]] = {}
    for iid, anns in self._index.anns_by_image.items():
      self._objects[iid] = [a for a in anns if _is_object(a)]
      self._parts[iid] = []
    for ann in self._index.ann_by_id.values():
      if _is_object(ann):
        continue
      parent = self._index.ann_by_id.get(int(ann["obj_ann_id"]))
      if parent is None or not _is_object(parent):
        raise ValueError(f"{self.annotation_file}: part annotation {ann['id']} has obj_ann_id "
                         f"{ann['obj_ann_id']}, which names no object annotation")
      if int(parent["image_id"]) != int(ann["image_id"]):
        raise ValueError(f"{self.annotation_file}: part annotation {ann['id']} (image "
                         f"{ann['image_id']}) points at object {parent['id']} of image "
                         f"{parent['image_id']}")
      self._parts[int(ann["image_id"])].append(ann)
    base.validate_nonempty(len(self._index.images), self.annotation_file)

  def __len__(self) -> int:
    return len(self._index.images)

  def _record(self, i: int) -> records.ImageRecord:
    img = self._index.images[i]
    iid, h, w = int(img["id"]), int(img["height"]), int(img["width"])
    file_name = os.path.abspath(os.path.join(self.image_root, img["file_name"]))
    base.check_image(file_name, h, w, f"{self.name}: {self.annotation_file}: image {iid}")
    segments = [coco_json.ann_to_segment(a, img, self._index) for a in self._objects[iid]]
    parts = []
    for ann in self._parts[iid]:
      mask, bbox = coco_json.decode_ann(ann, img, self.annotation_file)
      parts.append(records.Part(id=int(ann["id"]), category_id=int(ann["category_id"]),
                                parent_id=int(ann["obj_ann_id"]), mask=mask, bbox=bbox,
                                area=int(mask.sum())))
    annotated = np.zeros((h, w), dtype=bool)  # [H, W]
    for s in segments:
      annotated |= s.mask
    return records.ImageRecord(image_id=iid, file_name=file_name, height=h, width=w,
                               dataset=self.name, levels=self.LEVELS, segments=segments,
                               parts=parts, annotated=annotated)

  def meta(self, i: int) -> records.RecordMeta:
    i = self._check_index(i)
    iid = int(self._index.images[i]["id"])
    with_parts = tuple(sorted({int(a["obj_ann_id"]) for a in self._parts[iid]}))
    return records.RecordMeta(image_id=iid, levels=self.LEVELS,
                              num_segments=len(self._objects[iid]), entities_with_parts=with_parts)

  def _counts(self) -> dict[str, Any]:
    objects = [a for anns in self._objects.values() for a in anns]
    parts = [a for anns in self._parts.values() for a in anns]
    return {
        "images": len(self),
        "images_without_annotations": sum(not v for v in self._objects.values()),
        "objects": len(objects),
        "parts": len(parts),
        "objects_with_parts": len({int(a["obj_ann_id"]) for a in parts}),
        "crowd_regions": sum(bool(a.get("iscrowd", 0)) for a in objects),
        "void_pixels": None,
    }
