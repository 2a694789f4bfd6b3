"""Native-format dataset readers, built by format name.

Every reader returns `data_pipelines.records.ImageRecord`s (see `base.NativeReader` for the
random-access contract). Formats: coco_panoptic, coco_instances (also EntitySeg), paco,
pascal_panoptic_parts, psg, refcoco.
"""

from __future__ import annotations

from typing import Any

from data_pipelines.readers.base import NativeReader
from data_pipelines.readers.coco_instances import CocoInstancesReader
from data_pipelines.readers.coco_panoptic import CocoPanopticReader
from data_pipelines.readers.paco import PacoReader
from data_pipelines.readers.pascal_panoptic_parts import PascalPanopticPartsReader
from data_pipelines.readers.psg import PsgReader
from data_pipelines.readers.refcoco import RefCocoReader

READERS: dict[str, type[NativeReader]] = {
    CocoPanopticReader.FORMAT: CocoPanopticReader,
    CocoInstancesReader.FORMAT: CocoInstancesReader,
    PacoReader.FORMAT: PacoReader,
    PascalPanopticPartsReader.FORMAT: PascalPanopticPartsReader,
    PsgReader.FORMAT: PsgReader,
    RefCocoReader.FORMAT: RefCocoReader,
}


def build_reader(format: str, **kwargs: Any) -> NativeReader:  # pylint: disable=redefined-builtin
  """Builds the reader of a format.

  Args:
    format: one of `READERS` (coco_panoptic, coco_instances, paco, pascal_panoptic_parts, psg,
      refcoco).
    **kwargs: the reader's constructor arguments (`name`, annotation paths, image root, split...).

  Returns:
    The reader.

  Raises:
    ValueError: for an unknown format.
  """
  if format not in READERS:
    raise ValueError(f"unknown dataset format {format!r}; known formats: {sorted(READERS)}")
  return READERS[format](**kwargs)
