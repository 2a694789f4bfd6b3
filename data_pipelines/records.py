"""The per-image record every native-format reader returns.

All readers (COCO panoptic, COCO instances / EntitySeg, PACO, Pascal-Panoptic-Parts, COCO-PSG,
RefCOCO) turn one image of their dataset into one `ImageRecord`. Transforms, the AIMS sample-type
mixture and the HIPIE batch mixture only ever see `ImageRecord`s, so a new dataset needs only a
reader.

Conventions:
  * masks are boolean numpy arrays of the image's full size [H, W];
  * boxes are COCO `[x, y, w, h]` in pixels (float);
  * ids are the dataset's own annotation ids (unique within the image), so an error can name them;
  * `levels` says which hierarchy levels the dataset annotates for this image ("part", "entity",
    "relation"); a level that is absent is unknown, not empty.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

LEVELS = ("part", "entity", "relation")


@dataclasses.dataclass
class Segment:
  """An entity (thing instance) or a stuff region.

  Attributes:
    id: the dataset's annotation / segment id.
    category_id: the dataset's category id.
    isthing: True for countable objects, False for stuff.
    mask: bool [H, W].
    bbox: [x, y, w, h] in pixels.
    iscrowd: COCO crowd flag; crowd regions are kept and never used as positives.
    area: number of mask pixels.
  """

  id: int
  category_id: int
  isthing: bool
  mask: np.ndarray
  bbox: tuple[float, float, float, float]
  iscrowd: bool = False
  area: int = 0


@dataclasses.dataclass
class Part:
  """A part of an entity.

  Attributes:
    id: the dataset's part annotation id.
    category_id: the dataset's part category id.
    parent_id: `Segment.id` of the entity the part belongs to.
    mask: bool [H, W].
    bbox: [x, y, w, h] in pixels.
    area: number of mask pixels.
  """

  id: int
  category_id: int
  parent_id: int
  mask: np.ndarray
  bbox: tuple[float, float, float, float]
  area: int = 0


@dataclasses.dataclass
class Relation:
  """A (subject, predicate, object) triplet between two entities.

  Attributes:
    subject_id: `Segment.id` of the subject.
    object_id: `Segment.id` of the object.
    predicate: 0-based predicate index into the dataset's predicate list.
    predicate_name: the predicate as text (e.g. "on").
  """

  subject_id: int
  object_id: int
  predicate: int
  predicate_name: str


@dataclasses.dataclass
class Expression:
  """A referring expression.

  Attributes:
    ref_id: the dataset's ref id.
    sentence: the raw sentence.
    target_id: `Segment.id` of the referred entity.
  """

  ref_id: int
  sentence: str
  target_id: int


@dataclasses.dataclass
class ImageRecord:
  """Everything a reader knows about one image.

  Attributes:
    image_id: the dataset's image id.
    file_name: absolute path of the image file.
    height: image height in pixels.
    width: image width in pixels.
    dataset: the name of the dataset (config key) the record came from.
    levels: the hierarchy levels annotated for this image.
    segments: entities and stuff regions.
    parts: parts, each linked to a segment by `parent_id`.
    relations: relations between segments.
    expressions: referring expressions, each naming a segment.
    annotated: bool [H, W] area where annotation is valid (False on void / unlabeled pixels), or
      None when the whole image is annotated.
  """

  image_id: int
  file_name: str
  height: int
  width: int
  dataset: str
  levels: frozenset[str]
  segments: list[Segment] = dataclasses.field(default_factory=list)
  parts: list[Part] = dataclasses.field(default_factory=list)
  relations: list[Relation] = dataclasses.field(default_factory=list)
  expressions: list[Expression] = dataclasses.field(default_factory=list)
  annotated: Optional[np.ndarray] = None

  def segment(self, segment_id: int) -> Segment:
    """Returns the segment with `id == segment_id`.

    Raises:
      KeyError: naming the image and the id when there is none.
    """
    for s in self.segments:
      if s.id == segment_id:
        return s
    raise KeyError(
        f"{self.dataset}: image {self.image_id} ({self.file_name}) has no segment {segment_id}")


@dataclasses.dataclass(frozen=True)
class RecordMeta:
  """What a mixture needs to know about an image without decoding any mask.

  Readers build these from their annotation index (cheap), so sample-type eligibility
  (e.g. "has an entity with parts", "has a relation") is decided without reading images.

  Attributes:
    image_id: the dataset's image id.
    levels: the hierarchy levels annotated for this image.
    num_segments: number of entities and stuff regions.
    entities_with_parts: ids of segments that have at least one part.
    num_relations: number of relations.
    num_expressions: number of referring expressions.
  """

  image_id: int
  levels: frozenset[str]
  num_segments: int
  entities_with_parts: tuple[int, ...] = ()
  num_relations: int = 0
  num_expressions: int = 0
