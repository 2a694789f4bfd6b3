"""Reader of COCO panoptic segmentation: panoptic_{split}.json + PNGs of ids R + 256·G + 256²·B."""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from data_pipelines import mask_codec
from data_pipelines import records
from data_pipelines.readers import base


def decode_panoptic(png_path: str, segments_info: list[dict], height: int, width: int,
                    isthing_of: dict[int, bool], where: str) -> tuple[list[records.Segment],
                                                                     Optional[np.ndarray]]:
  """Decodes a panoptic PNG into segments, checking it against `segments_info`.

  Args:
    png_path: the PNG file.
    segments_info: the image's segments ({"id", "category_id", "iscrowd", "bbox"?, ...}).
    height: image height.
    width: image width.
    isthing_of: category id -> isthing (categories missing here take the segment's own `isthing`).
    where: names the annotation file and image for messages.

  Returns:
    (segments in `segments_info` order, annotated mask bool [H, W] or None when no pixel is void).

  Raises:
    ValueError: naming the PNG and id when a PNG id has no `segments_info` entry, a segment has no
      pixels, or ids repeat.
  """
  ids = mask_codec.rgb_to_id(base.read_png_rgb(png_path, height, width, where))  # [H, W]
  by_id: dict[int, dict] = {}
  for s in segments_info:
    sid = int(s["id"])
    if sid in by_id:
      raise ValueError(f"{where}: segment id {sid} appears twice in segments_info")
    by_id[sid] = s
  present = np.unique(ids)  # [K]
  for pid in present.tolist():
    if pid != 0 and pid not in by_id:
      raise ValueError(f"{where}: panoptic PNG {png_path} contains id {pid} with no "
                       "segments_info entry")
  segments = []
  for s in segments_info:
    sid, cat = int(s["id"]), int(s["category_id"])
    mask = ids == sid  # [H, W]
    if not mask.any():
      raise ValueError(f"{where}: segment {sid} of segments_info has no pixels in {png_path}")
    box = s.get("bbox")
    bbox = tuple(float(v) for v in box) if box is not None else mask_codec.mask_bbox(mask)
    isthing = isthing_of.get(cat, bool(s.get("isthing", 1)))
    segments.append(records.Segment(id=sid, category_id=cat, isthing=isthing, mask=mask,
                                    bbox=bbox, iscrowd=bool(s.get("iscrowd", 0)),
                                    area=int(mask.sum())))
  annotated = ids != 0 if 0 in present else None  # [H, W]
  return segments, annotated


class CocoPanopticReader(base.NativeReader):
  """COCO panoptic: entities and stuff of every image; PNG id 0 is void (annotated False).

  Args:
    name: dataset name (config key).
    annotation_file: panoptic_{split}.json.
    panoptic_root: directory of the panoptic PNGs (annotation `file_name`s are relative to it).
    image_root: directory of the images (image `file_name`s are relative to it).
  """

  FORMAT = "coco_panoptic"
  LEVELS = frozenset({"entity"})

  def __init__(self, name: str, annotation_file: str, panoptic_root: str, image_root: str):
    super().__init__(name)
    self.annotation_file = os.path.abspath(annotation_file)
    self.panoptic_root = panoptic_root
    self.image_root = image_root
    data = base.load_json(annotation_file, "COCO panoptic annotation file")
    path = self.annotation_file
    base.require_keys(data, ("images", "annotations", "categories"), path)
    self._isthing = {}
    for c in data["categories"]:
      base.require_keys(c, ("id", "isthing"), f"{path}: category entry")
      self._isthing[int(c["id"])] = bool(c["isthing"])
    self._images = []
    image_ids = set()
    for img in data["images"]:
      base.require_keys(img, ("id", "file_name", "height", "width"), f"{path}: image entry")
      if int(img["id"]) in image_ids:
        raise ValueError(f"{path}: duplicate image id {img['id']}")
      image_ids.add(int(img["id"]))
      self._images.append(img)
    self._anns: dict[int, dict] = {}
    for ann in data["annotations"]:
      base.require_keys(ann, ("image_id", "file_name", "segments_info"), f"{path}: annotation")
      iid = int(ann["image_id"])
      if iid not in image_ids:
        raise ValueError(f"{path}: annotation {ann['file_name']} names image {iid}, which is not "
                         "in 'images'")
      if iid in self._anns:
        raise ValueError(f"{path}: image {iid} has two annotations")
      for s in ann["segments_info"]:
        base.require_keys(s, ("id", "category_id"), f"{path}: image {iid} segment")
        if int(s["category_id"]) not in self._isthing:
          raise ValueError(f"{path}: image {iid} segment {s['id']} has unknown category "
                           f"{s['category_id']}")
      self._anns[iid] = ann
    base.validate_nonempty(len(self._images), path)

  def __len__(self) -> int:
    return len(self._images)

  def _segments_info(self, i: int) -> list[dict]:
    ann = self._anns.get(int(self._images[i]["id"]))
    return [] if ann is None else ann["segments_info"]

  def _record(self, i: int) -> records.ImageRecord:
    img = self._images[i]
    iid, h, w = int(img["id"]), int(img["height"]), int(img["width"])
    where = f"{self.name}: {self.annotation_file}: image {iid}"
    file_name = os.path.abspath(os.path.join(self.image_root, img["file_name"]))
    base.check_image(file_name, h, w, where)
    ann = self._anns.get(iid)
    if ann is None:
      segments, annotated = [], np.zeros((h, w), dtype=bool)
    else:
      png = os.path.join(self.panoptic_root, ann["file_name"])
      segments, annotated = decode_panoptic(png, ann["segments_info"], h, w, self._isthing, where)
    return records.ImageRecord(image_id=iid, file_name=file_name, height=h, width=w,
                               dataset=self.name, levels=self.LEVELS, segments=segments,
                               annotated=annotated)

  def meta(self, i: int) -> records.RecordMeta:
    i = self._check_index(i)
    return records.RecordMeta(image_id=int(self._images[i]["id"]), levels=self.LEVELS,
                              num_segments=len(self._segments_info(i)))

  def _counts(self) -> dict[str, Any]:
    segs = [s for i in range(len(self)) for s in self._segments_info(i)]
    void: Optional[int] = 0
    for i, img in enumerate(self._images):
      infos = self._segments_info(i)
      if any("area" not in s for s in infos):
        void = None
        break
      covered = sum(int(s["area"]) for s in infos) if int(img["id"]) in self._anns else 0
      void += int(img["height"]) * int(img["width"]) - covered
    return {
        "images": len(self),
        "images_without_annotations": sum(not self._segments_info(i) for i in range(len(self))),
        "segments": len(segs),
        "things": sum(self._isthing[int(s["category_id"])] for s in segs),
        "stuff": sum(not self._isthing[int(s["category_id"])] for s in segs),
        "crowd_regions": sum(bool(s.get("iscrowd", 0)) for s in segs),
        "void_pixels": void,
    }
