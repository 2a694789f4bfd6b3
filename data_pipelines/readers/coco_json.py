"""Indexing and decoding of COCO-style instance JSON, shared by the COCO instances (EntitySeg),
PACO and RefCOCO readers."""

from __future__ import annotations

import dataclasses
from typing import Any

from data_pipelines import mask_codec
from data_pipelines import records
from data_pipelines.readers import base


@dataclasses.dataclass
class CocoIndex:
  """A validated COCO instance file.

  Attributes:
    path: the JSON file.
    images: image entries in file order.
    image_by_id: image id -> entry.
    anns_by_image: image id -> its annotations in file order.
    ann_by_id: annotation id -> annotation.
    categories: category id -> category entry.
  """

  path: str
  images: list[dict]
  image_by_id: dict[int, dict]
  anns_by_image: dict[int, list[dict]]
  ann_by_id: dict[int, dict]
  categories: dict[int, dict]


def index_coco(data: Any, path: str) -> CocoIndex:
  """Validates and indexes a COCO instance JSON object.

  Args:
    data: the parsed JSON.
    path: the file it came from, named in errors.

  Returns:
    The index.

  Raises:
    ValueError: naming the file and id for missing keys, duplicate ids, an annotation whose image
      or category does not exist.
  """
  base.require_keys(data, ("images", "annotations", "categories"), path)
  categories = {}
  for c in data["categories"]:
    base.require_keys(c, ("id",), f"{path}: category entry")
    categories[int(c["id"])] = c
  image_by_id: dict[int, dict] = {}
  for img in data["images"]:
    base.require_keys(img, ("id", "file_name", "height", "width"), f"{path}: image entry")
    iid = int(img["id"])
    if iid in image_by_id:
      raise ValueError(f"{path}: duplicate image id {iid}")
    image_by_id[iid] = img
  anns_by_image: dict[int, list[dict]] = {i: [] for i in image_by_id}
  ann_by_id: dict[int, dict] = {}
  for ann in data["annotations"]:
    base.require_keys(ann, ("id", "image_id", "category_id", "segmentation"),
                      f"{path}: annotation {ann.get('id', '?') if isinstance(ann, dict) else '?'}")
    aid = int(ann["id"])
    if aid in ann_by_id:
      raise ValueError(f"{path}: duplicate annotation id {aid}")
    if int(ann["image_id"]) not in image_by_id:
      raise ValueError(f"{path}: annotation {aid} names image {ann['image_id']}, which is not in "
                       "'images'")
    if int(ann["category_id"]) not in categories:
      raise ValueError(f"{path}: annotation {aid} has unknown category {ann['category_id']}")
    ann_by_id[aid] = ann
    anns_by_image[int(ann["image_id"])].append(ann)
  return CocoIndex(path, list(data["images"]), image_by_id, anns_by_image, ann_by_id, categories)


def decode_ann(ann: dict, image: dict, path: str) -> tuple[Any, tuple[float, float, float, float]]:
  """Decodes an annotation's mask and box.

  Args:
    ann: the annotation.
    image: its image entry.
    path: the JSON file, named in errors.

  Returns:
    (bool [H, W] mask, [x, y, w, h] box; the file's box when given, else the mask's).

  Raises:
    ValueError: naming the file and annotation id when the segmentation is malformed or its size
      differs from the image.
  """
  h, w = int(image["height"]), int(image["width"])
  where = f"{path}: annotation {ann['id']} (image {image['id']})"
  mask = mask_codec.decode_segmentation(ann["segmentation"], h, w, where)  # [H, W]
  box = ann.get("bbox")
  bbox = tuple(float(v) for v in box) if box is not None and len(box) == 4 else (
      mask_codec.mask_bbox(mask))
  return mask, bbox


def ann_to_segment(ann: dict, image: dict, index: CocoIndex) -> records.Segment:
  """Builds a `Segment` from a COCO annotation.

  Args:
    ann: the annotation.
    image: its image entry.
    index: the file's index (for the category's `isthing`, default thing).

  Returns:
    The segment with its decoded mask.
  """
  mask, bbox = decode_ann(ann, image, index.path)
  cat = index.categories[int(ann["category_id"])]
  return records.Segment(id=int(ann["id"]), category_id=int(ann["category_id"]),
                         isthing=bool(cat.get("isthing", 1)), mask=mask, bbox=bbox,
                         iscrowd=bool(ann.get("iscrowd", 0)), area=int(mask.sum()))
