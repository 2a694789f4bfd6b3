"""Reader of Pascal-Panoptic-Parts labels (one .tif of uids per image).

uid digit rules (panoptic_parts label format): 1–2 digits = sid only, 4–5 digits = sid·10³ + iid,
6–7 digits = sid·10⁵ + iid·10² + pid; uid 0 = void (annotated False); pid 0 = part-level void (the
pixel belongs to the instance but to none of its parts). Records hold:
  * one thing segment per (sid, iid), id sid·10³ + iid, category sid;
  * one segment per sid-only region, id sid: stuff, or, when sid is a thing class, a thing region
    without instance labels, kept as a crowd region (iscrowd=True);
  * one part per 6–7 digit uid with pid > 0, id = uid, category sid·10² + pid, parent sid·10³ + iid.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np
import tifffile

from data_pipelines import mask_codec
from data_pipelines import records
from data_pipelines.readers import base

# PASCAL VOC's 20 object classes are the things of PASCAL-Panoptic-Parts (sids 1..20).
PPP_THING_SIDS: tuple[int, ...] = tuple(range(1, 21))


def _image_id(stem: str, position: int) -> int:
  digits = stem.replace("_", "")
  return int(digits) if digits.isdigit() else position


class PascalPanopticPartsReader(base.NativeReader):
  """Pascal-Panoptic-Parts: entities and parts from uid label files.

  Args:
    name: dataset name (config key).
    labels_root: directory holding one sub-directory of .tif labels per split.
    image_root: directory of the images, named <label stem><image_ext>.
    split: the split's sub-directory of `labels_root` ("training" or "validation").
    image_ext: image file extension (".jpg" for PASCAL VOC).
    thing_sids: semantic ids that are things (default: PASCAL's 20 object classes).
  """

  FORMAT = "pascal_panoptic_parts"
  LEVELS = frozenset({"entity", "part"})

  def __init__(self, name: str, labels_root: str, image_root: str, split: str,
               image_ext: str = ".jpg", thing_sids: Optional[Sequence[int]] = None):
    super().__init__(name)
    self.labels_dir = base.require_dir(os.path.join(labels_root, split),
                                       "Pascal-Panoptic-Parts label directory")
    self.image_root = image_root
    self.image_ext = image_ext
    self.thing_sids = frozenset(PPP_THING_SIDS if thing_sids is None else thing_sids)
    stems = sorted(f[:-4] for f in os.listdir(self.labels_dir) if f.endswith(".tif"))
    base.validate_nonempty(len(stems), f"{self.labels_dir} (no .tif label files)")
    self._stems = stems
    self._ids = [_image_id(s, k) for k, s in enumerate(stems)]
    self._cache: dict[int, dict[str, Any]] = {}

  def __len__(self) -> int:
    return len(self._stems)

  def _label_path(self, i: int) -> str:
    return os.path.join(self.labels_dir, self._stems[i] + ".tif")

  def _read_uids(self, i: int) -> np.ndarray:
    path = self._label_path(i)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{self.name}: label file not found: {path}")
    try:
      uids = tifffile.imread(path)
    except Exception as e:  # tifffile raises several types for unreadable files
      raise ValueError(f"{self.name}: corrupt or unreadable label file {path} ({e})") from e
    if uids.ndim != 2 or not np.issubdtype(uids.dtype, np.integer):
      raise ValueError(f"{self.name}: label file {path} must hold a 2-D integer image, got "
                       f"{uids.dtype} {uids.shape}")
    return uids.astype(np.int64)  # [H, W]

  def _info(self, i: int) -> dict[str, Any]:
    """The label file's uid histogram (cached): the annotation index of this format."""
    if i not in self._cache:
      uids = self._read_uids(i)
      values, counts = np.unique(uids, return_counts=True)  # [K], [K]
      sids, iids, pids = mask_codec.decode_uids(values, self._label_path(i))
      entities: dict[int, dict] = {}
      part_void = 0
      for v, c, sid, iid, pid in zip(values.tolist(), counts.tolist(), sids.tolist(),
                                     iids.tolist(), pids.tolist()):
        if sid == 0:
          continue
        eid = sid if iid < 0 else sid * 1000 + iid
        ent = entities.setdefault(eid, {"sid": sid, "instance": iid >= 0, "parts": set()})
        if pid > 0:
          ent["parts"].add(v)
        elif pid == 0:
          part_void += c
      void = int(counts[values == 0].sum())
      self._cache[i] = {"shape": uids.shape, "entities": entities, "void": void,
                        "part_void": part_void}
    return self._cache[i]

  def _record(self, i: int) -> records.ImageRecord:
    uids = self._read_uids(i)
    info = self._info(i)
    h, w = uids.shape
    file_name = os.path.abspath(os.path.join(self.image_root, self._stems[i] + self.image_ext))
    base.check_image(file_name, h, w, f"{self.name}: {self._label_path(i)}")
    sids, iids, pids = mask_codec.decode_uids(uids, self._label_path(i))  # [H, W] each
    entity_ids = np.where(iids < 0, sids, sids * 1000 + iids)  # [H, W]
    segments, parts = [], []
    for eid, ent in sorted(info["entities"].items()):
      mask = entity_ids == eid  # [H, W]
      isthing = ent["instance"] or ent["sid"] in self.thing_sids
      segments.append(records.Segment(
          id=eid, category_id=ent["sid"], isthing=isthing, mask=mask,
          bbox=mask_codec.mask_bbox(mask), iscrowd=isthing and not ent["instance"],
          area=int(mask.sum())))
      for uid in sorted(ent["parts"]):
        pmask = uids == uid  # [H, W]
        parts.append(records.Part(id=uid, category_id=ent["sid"] * 100 + uid % 100, parent_id=eid,
                                  mask=pmask, bbox=mask_codec.mask_bbox(pmask),
                                  area=int(pmask.sum())))
    annotated = sids != 0 if info["void"] else None  # [H, W]
    return records.ImageRecord(image_id=self._ids[i], file_name=file_name, height=h, width=w,
                               dataset=self.name, levels=self.LEVELS, segments=segments,
                               parts=parts, annotated=annotated)

  def meta(self, i: int) -> records.RecordMeta:
    i = self._check_index(i)
    ents = self._info(i)["entities"]
    return records.RecordMeta(
        image_id=self._ids[i], levels=self.LEVELS, num_segments=len(ents),
        entities_with_parts=tuple(sorted(e for e, v in ents.items() if v["parts"])))

  def _counts(self) -> dict[str, Any]:
    infos = [self._info(i) for i in range(len(self))]
    ents = [e for info in infos for e in info["entities"].values()]
    things = [e for e in ents if e["instance"] or e["sid"] in self.thing_sids]
    return {
        "images": len(self),
        "images_without_annotations": sum(not info["entities"] for info in infos),
        "segments": len(ents),
        "things": len(things),
        "stuff": len(ents) - len(things),
        "parts": sum(len(e["parts"]) for e in ents),
        "crowd_regions": sum(not e["instance"] for e in things),
        "void_pixels": sum(info["void"] for info in infos),
        "part_void_pixels": sum(info["part_void"] for info in infos),
    }
