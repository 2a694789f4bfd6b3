"""Reader of COCO instance annotations (EntitySeg style): one segment per annotation, masks from
polygons or (un)compressed RLE."""

from __future__ import annotations

import os
from typing import Any

from data_pipelines import records
from data_pipelines.readers import base
from data_pipelines.readers import coco_json


class CocoInstancesReader(base.NativeReader):
  """COCO instances / EntitySeg: entities of every image (images without annotations included).

  Args:
    name: dataset name (config key).
    annotation_file: instances JSON.
    image_root: directory of the images (image `file_name`s are relative to it).
  """

  FORMAT = "coco_instances"
  LEVELS = frozenset({"entity"})

  def __init__(self, name: str, annotation_file: str, image_root: str):
    super().__init__(name)
    self.annotation_file = os.path.abspath(annotation_file)
    self.image_root = image_root
    data = base.load_json(annotation_file, "COCO instances annotation file")
    self._index = coco_json.index_coco(data, self.annotation_file)
    base.validate_nonempty(len(self._index.images), self.annotation_file)

  def __len__(self) -> int:
    return len(self._index.images)

  def _record(self, i: int) -> records.ImageRecord:
    img = self._index.images[i]
    iid, h, w = int(img["id"]), int(img["height"]), int(img["width"])
    file_name = os.path.abspath(os.path.join(self.image_root, img["file_name"]))
    base.check_image(file_name, h, w, f"{self.name}: {self.annotation_file}: image {iid}")
    segments = [coco_json.ann_to_segment(a, img, self._index)
                for a in self._index.anns_by_image[iid]]
    return records.ImageRecord(image_id=iid, file_name=file_name, height=h, width=w,
                               dataset=self.name, levels=self.LEVELS, segments=segments)

  def meta(self, i: int) -> records.RecordMeta:
    i = self._check_index(i)
    iid = int(self._index.images[i]["id"])
    return records.RecordMeta(image_id=iid, levels=self.LEVELS,
                              num_segments=len(self._index.anns_by_image[iid]))

  def _counts(self) -> dict[str, Any]:
    anns = list(self._index.ann_by_id.values())
    return {
        "images": len(self),
        "images_without_annotations": sum(not v for v in self._index.anns_by_image.values()),
        "segments": len(anns),
        "crowd_regions": sum(bool(a.get("iscrowd", 0)) for a in anns),
        "void_pixels": None,
    }
