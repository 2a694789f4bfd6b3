"""Reader of RefCOCO / RefCOCO+ / RefCOCOg (refs(unc).p + instances.json, the `refer` layout).

The refs pickle is a list of refs {ref_id, ann_id, image_id, split, sentences: [{sent, tokens,
raw, sent_id}], category_id, ...}; it is read with a restricted unpickler (no code runs).
instances.json is COCO instance JSON with the images and the annotations refs point at. A record is
an image with at least one ref of the split; its segments are the image's annotations and its
expressions every sentence of its refs (the `raw` sentence, `sent` when there is no `raw`).
"""

from __future__ import annotations

import os
from typing import Any

from data_pipelines import records
from data_pipelines import safe_pickle
from data_pipelines.readers import base
from data_pipelines.readers import coco_json


class RefCocoReader(base.NativeReader):
  """RefCOCO: entities with referring expressions.

  Args:
    name: dataset name (config key).
    refs_file: refs(unc).p (or refs(google).p, refs(umd).p).
    instances_file: instances.json.
    image_root: directory that image `file_name`s are relative to (e.g. COCO train2014).
    split: ref split ("train", "val", "testA", "testB", "test").
  """

  FORMAT = "refcoco"
  LEVELS = frozenset({"entity"})

  def __init__(self, name: str, refs_file: str, instances_file: str, image_root: str, split: str):
    super().__init__(name)
    self.refs_file = base.require_file(refs_file, "RefCOCO refs pickle")
    self.instances_file = os.path.abspath(instances_file)
    self.image_root = image_root
    self.split = split
    refs = safe_pickle.load_pickle(self.refs_file)
    if not isinstance(refs, list):
      raise ValueError(f"{self.refs_file}: expected a list of refs, got {type(refs).__name__}")
    self._index = coco_json.index_coco(
        base.load_json(instances_file, "RefCOCO instances file"), self.instances_file)
    self._refs_by_image: dict[int, list[dict]] = {}
    splits = set()
    for k, ref in enumerate(refs):
      base.require_keys(ref, ("ref_id", "ann_id", "image_id", "split", "sentences"),
                        f"{self.refs_file}: ref #{k}")
      splits.add(ref["split"])
      if ref["split"] != split:
        continue
      rid, aid, iid = int(ref["ref_id"]), int(ref["ann_id"]), int(ref["image_id"])
      ann = self._index.ann_by_id.get(aid)
      if ann is None:
        raise ValueError(f"{self.refs_file}: ref {rid} names annotation {aid}, which is not in "
                         f"{self.instances_file}")
      if int(ann["image_id"]) != iid:
        raise ValueError(f"{self.refs_file}: ref {rid} is on image {iid} but its annotation {aid} "
                         f"is on image {ann['image_id']}")
      for s in ref["sentences"]:
        if not isinstance(s, dict) or not ("raw" in s or "sent" in s):
          raise ValueError(f"{self.refs_file}: ref {rid} has a sentence without 'raw' or 'sent'")
      self._refs_by_image.setdefault(iid, []).append(ref)
    self._image_ids = sorted(self._refs_by_image)
    base.validate_nonempty(len(self._image_ids),
                           f"{self.refs_file} (split {split!r}; splits present: {sorted(splits)})")

  def __len__(self) -> int:
    return len(self._image_ids)

  def _record(self, i: int) -> records.ImageRecord:
    iid = self._image_ids[i]
    img = self._index.image_by_id[iid]
    h, w = int(img["height"]), int(img["width"])
    file_name = os.path.abspath(os.path.join(self.image_root, img["file_name"]))
    base.check_image(file_name, h, w, f"{self.name}: {self.instances_file}: image {iid}")
    segments = [coco_json.ann_to_segment(a, img, self._index)
                for a in self._index.anns_by_image[iid]]
    expressions = [records.Expression(ref_id=int(ref["ref_id"]),
                                      sentence=str(s.get("raw", s.get("sent"))),
                                      target_id=int(ref["ann_id"]))
                   for ref in self._refs_by_image[iid] for s in ref["sentences"]]
    return records.ImageRecord(image_id=iid, file_name=file_name, height=h, width=w,
                               dataset=self.name, levels=self.LEVELS, segments=segments,
                               expressions=expressions)

  def meta(self, i: int) -> records.RecordMeta:
    i = self._check_index(i)
    iid = self._image_ids[i]
    return records.RecordMeta(
        image_id=iid, levels=self.LEVELS, num_segments=len(self._index.anns_by_image[iid]),
        num_expressions=sum(len(r["sentences"]) for r in self._refs_by_image[iid]))

  def _counts(self) -> dict[str, Any]:
    refs = [r for rs in self._refs_by_image.values() for r in rs]
    anns = [a for iid in self._image_ids for a in self._index.anns_by_image[iid]]
    return {
        "images": len(self),
        "images_without_annotations": 0,
        "segments": len(anns),
        "crowd_regions": sum(bool(a.get("iscrowd", 0)) for a in anns),
        "refs": len(refs),
        "sentences": sum(len(r["sentences"]) for r in refs),
        "refs_without_sentences": sum(not r["sentences"] for r in refs),
        "void_pixels": None,
    }
