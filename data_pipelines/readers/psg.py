"""Reader of COCO-PSG (OpenPSG's psg.json): panoptic segments plus relations between them.

psg.json conventions: `data` is a list of images with `file_name` and `pan_seg_file_name`
(relative to the COCO root), `segments_info` (ids are rgb2id values of the panoptic PNG;
`category_id` is a 0-based index into thing_classes + stuff_classes), `annotations` (one per
segment, `bbox` in xyxy pixels) and `relations` [[subject index, object index, predicate index]]
(indices into `segments_info`, 0-based index into `predicate_classes`). The test split is the
images listed in `test_image_ids`; train is every other image.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from data_pipelines import records
from data_pipelines.readers import base
from data_pipelines.readers import coco_panoptic

# AIMS keeps only physical-contact predicates of COCO-PSG (the paper gives no list; DESIGN.md).
AIMS_CONTACT_PREDICATES: tuple[str, ...] = (
    "on", "attached to", "hanging from", "on back of", "painted on", "walking on", "standing on",
    "lying on", "sitting on", "leaning on", "wearing", "holding", "carrying", "riding",
    "parked on", "driving on", "touching", "pushing", "pulling", "kicking", "biting", "eating",
    "drinking", "climbing", "picking", "opening", "cleaning", "kissing")

SPLITS = ("train", "test")


def _int_id(value: Any, where: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: image_id {value!r} is not an integer") from e


class PsgReader(base.NativeReader):
  """COCO-PSG: entities / stuff (panoptic PNG) and relations between them.

  Args:
    name: dataset name (config key).
    annotation_file: psg.json.
    image_root: directory that `file_name`s are relative to (the COCO root).
    split: "train" (images not in test_image_ids) or "test".
    seg_root: directory that `pan_seg_file_name`s are relative to (default: `image_root`).
    keep_predicates: predicate names to keep; None keeps all. Relations with other predicates are
      left out of records and counted in the summary as `relations_filtered_out`.
  """

  FORMAT = "psg"
  LEVELS = frozenset({"entity", "relation"})

  def __init__(self, name: str, annotation_file: str, image_root: str, split: str,
               seg_root: Optional[str] = None,
               keep_predicates: Optional[Sequence[str]] = AIMS_CONTACT_PREDICATES):
    super().__init__(name)
    if split not in SPLITS:
      raise ValueError(f"{name}: PSG split must be one of {SPLITS}, got {split!r}")
    self.annotation_file = path = os.path.abspath(annotation_file)
    self.image_root = image_root
    self.seg_root = image_root if seg_root is None else seg_root
    data = base.load_json(annotation_file, "COCO-PSG annotation file")
    base.require_keys(data, ("data", "thing_classes", "stuff_classes", "predicate_classes",
                             "test_image_ids"), path)
    self.classes = list(data["thing_classes"]) + list(data["stuff_classes"])
    self.num_thing_classes = len(data["thing_classes"])
    self.predicates = list(data["predicate_classes"])
    keep = None if keep_predicates is None else set(keep_predicates)
    self.unknown_keep_predicates = sorted(keep - set(self.predicates)) if keep else []
    test_ids = {str(t) for t in data["test_image_ids"]}
    self._items = []
    self._relations: list[list[tuple[int, int, int]]] = []
    self._filtered = 0
    seen: set[int] = set()
    for d in data["data"]:
      base.require_keys(d, ("file_name", "height", "width", "image_id", "pan_seg_file_name",
                            "segments_info", "annotations", "relations"), f"{path}: data entry")
      where = f"{path}: image {d['image_id']}"
      if (str(d["image_id"]) in test_ids) != (split == "test"):
        continue
      iid = _int_id(d["image_id"], where)
      if iid in seen:
        raise ValueError(f"{where}: duplicate image id")
      seen.add(iid)
      n = len(d["segments_info"])
      if len(d["annotations"]) != n:
        raise ValueError(f"{where}: {len(d['annotations'])} annotations for {n} segments_info")
      for s in d["segments_info"]:
        base.require_keys(s, ("id", "category_id"), f"{where}: segment")
        if not 0 <= int(s["category_id"]) < len(self.classes):
          raise ValueError(f"{where}: segment {s['id']} has category {s['category_id']} outside "
                           f"[0, {len(self.classes)})")
      kept = []
      for k, rel in enumerate(d["relations"]):
        if len(rel) != 3:
          raise ValueError(f"{where}: relation {k} {rel} is not [subject, object, predicate]")
        s_idx, o_idx, p_idx = (int(v) for v in rel)
        if not (0 <= s_idx < n and 0 <= o_idx < n):
          raise ValueError(f"{where}: relation {k} {rel} indexes segments_info out of range "
                           f"[0, {n})")
        if not 0 <= p_idx < len(self.predicates):
          raise ValueError(f"{where}: relation {k} {rel} has predicate index {p_idx} outside "
                           f"[0, {len(self.predicates)})")
        if keep is not None and self.predicates[p_idx] not in keep:
          self._filtered += 1
          continue
        kept.append((s_idx, o_idx, p_idx))
      self._items.append(d)
      self._relations.append(kept)
    base.validate_nonempty(len(self._items), f"{path} (split {split!r})")

  def __len__(self) -> int:
    return len(self._items)

  def _isthing(self, s: dict) -> bool:
    return bool(s["isthing"]) if "isthing" in s else int(s["category_id"]) < self.num_thing_classes

  def _record(self, i: int) -> records.ImageRecord:
    d = self._items[i]
    iid, h, w = int(d["image_id"]), int(d["height"]), int(d["width"])
    where = f"{self.name}: {self.annotation_file}: image {d['image_id']}"
    file_name = os.path.abspath(os.path.join(self.image_root, d["file_name"]))
    base.check_image(file_name, h, w, where)
    infos = []
    for s, a in zip(d["segments_info"], d["annotations"]):
      x0, y0, x1, y1 = (float(v) for v in a["bbox"])
      infos.append(dict(s, bbox=[x0, y0, x1 - x0, y1 - y0], isthing=self._isthing(s)))
    png = os.path.join(self.seg_root, d["pan_seg_file_name"])
    segments, annotated = coco_panoptic.decode_panoptic(png, infos, h, w, {}, where)
    relations = [records.Relation(subject_id=segments[s].id, object_id=segments[o].id,
                                  predicate=p, predicate_name=self.predicates[p])
                 for s, o, p in self._relations[i]]
    return records.ImageRecord(image_id=iid, file_name=file_name, height=h, width=w,
                               dataset=self.name, levels=self.LEVELS, segments=segments,
                               relations=relations, annotated=annotated)

  def meta(self, i: int) -> records.RecordMeta:
    i = self._check_index(i)
    d = self._items[i]
    return records.RecordMeta(image_id=int(d["image_id"]), levels=self.LEVELS,
                              num_segments=len(d["segments_info"]),
                              num_relations=len(self._relations[i]))

  def _counts(self) -> dict[str, Any]:
    segs = [s for d in self._items for s in d["segments_info"]]
    void: Optional[int] = 0
    for d in self._items:
      if any("area" not in s for s in d["segments_info"]):
        void = None
        break
      void += int(d["height"]) * int(d["width"]) - sum(int(s["area"]) for s in d["segments_info"])
    return {
        "images": len(self),
        "images_without_annotations": sum(not d["segments_info"] for d in self._items),
        "images_without_relations": sum(not r for r in self._relations),
        "segments": len(segs),
        "things": sum(self._isthing(s) for s in segs),
        "stuff": sum(not self._isthing(s) for s in segs),
        "crowd_regions": sum(bool(s.get("iscrowd", 0)) for s in segs),
        "relations": sum(len(r) for r in self._relations),
        "relations_filtered_out": self._filtered,
        "keep_predicates_not_in_dataset": len(self.unknown_keep_predicates),
        "void_pixels": void,
    }
