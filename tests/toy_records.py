"""Tiny hand-built `ImageRecord`s and an in-memory reader source for the data-pipeline tests.

Each image has a rectangle "box" entity with two parts (top and bottom halves), a disc entity with
one part, and a stuff "ground" band; the box stands on the ground and the disc touches the box,
which gives two relations; one referring expression names the box by its side.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from data_pipelines import records as records_lib

BOX, DISC, GROUND = 1, 2, 3
BOX_TOP, BOX_BOTTOM, DISC_CORE = 11, 12, 21


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
  """COCO [x, y, w, h] of a bool mask."""
  ys, xs = np.nonzero(mask)
  return (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
          float(ys.max() - ys.min() + 1))


def make_record(directory: str, image_id: int, dataset: str, levels: frozenset[str],
                seed: int, height: int = 48, width: int = 64,
                annotated_fraction: float = 1.0) -> records_lib.ImageRecord:
  """Writes a PNG and returns its record.

  Args:
    directory: where the PNG goes.
    image_id: the image id.
    dataset: the dataset name of the record.
    levels: the levels the record claims.
    seed: positions and colours.
    height: image height.
    width: image width.
    annotated_fraction: the top fraction of rows outside `annotated` is void (1.0 = none).

  Returns:
    The `ImageRecord` (parts / relations only for the levels claimed).
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:height, :width]
  ground_top = height - height // 5
  ground = yy >= ground_top
  bw, bh = int(rng.integers(width // 5, width // 3)), int(rng.integers(height // 4, height // 2))
  bx = int(rng.integers(2, width // 2 - bw // 2))
  box = (xx >= bx) & (xx < bx + bw) & (yy >= ground_top - bh) & (yy < ground_top)
  r = int(rng.integers(height // 10, height // 6)) + 1
  cx, cy = bx + bw + r - 1, ground_top - bh // 2
  disc = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) & ~box
  top = box & (yy < ground_top - bh // 2)
  bottom = box & ~top
  core = ((xx - cx) ** 2 + (yy - cy) ** 2 <= (r // 2) ** 2) & disc

  image = np.zeros((height, width, 3), np.uint8)
  image[:] = rng.integers(0, 255, 3)
  for mask in (ground, top, bottom, disc, core):
    image[mask] = rng.integers(0, 255, 3)
  file_name = os.path.join(directory, f"{dataset}_{image_id}.png")
  Image.fromarray(image).save(file_name)

  def seg(sid, cat, thing, mask):
    return records_lib.Segment(id=sid, category_id=cat, isthing=thing, mask=mask,
                               bbox=_bbox(mask), area=int(mask.sum()))

  segments = [seg(BOX, 5, True, box), seg(DISC, 6, True, disc), seg(GROUND, 7, False, ground)]
  parts, relations, expressions = [], [], []
  if "part" in levels:
    parts = [records_lib.Part(BOX_TOP, 50, BOX, top, _bbox(top), int(top.sum())),
             records_lib.Part(BOX_BOTTOM, 51, BOX, bottom, _bbox(bottom), int(bottom.sum())),
             records_lib.Part(DISC_CORE, 60, DISC, core, _bbox(core), int(core.sum()))]
  if "relation" in levels:
    relations = [records_lib.Relation(BOX, GROUND, 0, "on"),
                 records_lib.Relation(DISC, BOX, 1, "touching"),
                 records_lib.Relation(BOX, DISC, 1, "touching")]
  expressions = [records_lib.Expression(image_id, "the box left of the disc", BOX)]
  annotated = None
  if annotated_fraction < 1.0:
    annotated = yy >= int(height * (1 - annotated_fraction))
  return records_lib.ImageRecord(
      image_id=image_id, file_name=file_name, height=height, width=width, dataset=dataset,
      levels=frozenset(levels), segments=segments, parts=parts, relations=relations,
      expressions=expressions, annotated=annotated)


def meta_of(record: records_lib.ImageRecord) -> records_lib.RecordMeta:
  """The `RecordMeta` a reader would build for `record`."""
  return records_lib.RecordMeta(
      image_id=record.image_id, levels=record.levels, num_segments=len(record.segments),
      entities_with_parts=tuple(sorted({p.parent_id for p in record.parts})),
      num_relations=len(record.relations), num_expressions=len(record.expressions))


class ToySource:
  """A reader-shaped source over records held in memory."""

  def __init__(self, records: list[records_lib.ImageRecord]):
    self._records = records

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> records_lib.ImageRecord:
    return self._records[index]

  def meta(self, index: int) -> records_lib.RecordMeta:
    return meta_of(self._records[index])


DATASET_LEVELS = {
    "coco": frozenset({"entity"}),
    "entityseg": frozenset({"entity"}),
    "ppp": frozenset({"entity", "part"}),
    "psg": frozenset({"entity", "relation"}),
    "paco": frozenset({"entity", "part"}),
}


def make_sources(directory: str, per_dataset: int = 3) -> dict[str, ToySource]:
  """One toy source per AIMS table dataset, with varied image sizes.

  Args:
    directory: where the PNGs go.
    per_dataset: images per dataset.

  Returns:
    {name: ToySource}; PACO images are annotated only on their lower 60%.
  """
  sources = {}
  for k, (name, levels) in enumerate(sorted(DATASET_LEVELS.items())):
    recs = []
    for i in range(per_dataset):
      image_id = 100 * (k + 1) + i
      h, w = (48, 64) if i % 2 == 0 else (72, 56)
      recs.append(make_record(directory, image_id, name, levels, seed=image_id, height=h,
                              width=w, annotated_fraction=0.6 if name == "paco" else 1.0))
    sources[name] = ToySource(recs)
  return sources
