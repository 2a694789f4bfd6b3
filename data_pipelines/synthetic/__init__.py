"""The synthetic hierarchical-shapes dataset, written in the native formats of the real datasets.

`generate` renders deterministic scenes (stuff, composite objects with parts, contact relations,
unique referring expressions) and writes them once, images shared, as COCO panoptic, COCO instances,
PACO, Pascal-Panoptic-Parts, COCO-PSG and RefCOCO files (layout in `writers`), so the default run
reads them through the same readers as the real datasets. `reader_kwargs` gives the reader
arguments for each format and split
(`layout` the same with paths relative to the root).
"""

from __future__ import annotations

import os
import time
from typing import Any

from data_pipelines.synthetic import scene as scene_lib
from data_pipelines.synthetic import taxonomy
from data_pipelines.synthetic import writers


def image_ids(num_train: int, num_val: int) -> dict[str, list[int]]:
  """Image ids of each split.

  Args:
    num_train: number of training images.
    num_val: number of validation images.

  Returns:
    {"train": [1..num_train], "val": [num_train+1..num_train+num_val]}.
  """
  return {"train": list(range(1, num_train + 1)),
          "val": list(range(num_train + 1, num_train + num_val + 1))}


def layout(split: str) -> dict[str, dict[str, Any]]:
  """Reader arguments (besides `name`) of each format for a split, paths relative to the root.

  Keys ending in `_file` or `_root` are paths; `data_pipelines.dataset_config` joins them with a
  dataset root, and configs use this to declare the synthetic default in `config.datasets`.

  Args:
    split: "train" or "val".

  Returns:
    {format name: kwargs} for `data_pipelines.readers.build_reader`, with relative paths.

  Raises:
    ValueError: for an unknown split.
  """
  if split not in writers.SPLITS:
    raise ValueError(f"unknown synthetic split {split!r}; expected one of {writers.SPLITS}")
  images = os.path.join("images", split)
  return {
      "coco_panoptic": {
          "annotation_file": os.path.join("panoptic", f"panoptic_{split}.json"),
          "panoptic_root": os.path.join("panoptic", f"panoptic_{split}"),
          "image_root": images},
      "coco_instances": {
          "annotation_file": os.path.join("instances", f"instances_{split}.json"),
          "image_root": images},
      "paco": {"annotation_file": os.path.join("paco", f"paco_{split}.json"),
               "image_root": images},
      "pascal_panoptic_parts": {
          "labels_root": os.path.join("ppp", "labels"), "image_root": images,
          "split": writers.PPP_SPLITS[split], "image_ext": ".png",
          "thing_sids": [taxonomy.CATEGORY_IDS[c] for c in taxonomy.THING_CLASSES]},
      "psg": {"annotation_file": os.path.join("psg", "psg.json"), "image_root": "",
              "split": writers.PSG_SPLITS[split]},
      "refcoco": {"refs_file": os.path.join("refcoco", "refs(unc).p"),
                  "instances_file": os.path.join("refcoco", "instances.json"),
                  "image_root": "images", "split": split},
  }


def is_path_key(key: str) -> bool:
  """Whether a reader argument of `layout` is a path (joined with the dataset root).

  Args:
    key: a reader keyword argument.

  Returns:
    True for keys ending in `_file` or `_root`.
  """
  return key.endswith(("_file", "_root"))


def reader_kwargs(out: str, split: str) -> dict[str, dict[str, Any]]:
  """Constructor arguments (besides `name`) of each format's reader for a written split.

  Args:
    out: the dataset root given to `generate`.
    split: "train" or "val".

  Returns:
    {format name: kwargs} for `data_pipelines.readers.build_reader`, with absolute paths.

  Raises:
    ValueError: for an unknown split.
  """
  out = os.path.abspath(out)
  return {fmt: {k: os.path.normpath(os.path.join(out, v)) if is_path_key(k) else v
                for k, v in kwargs.items()}
          for fmt, kwargs in layout(split).items()}


def generate(out: str, num_train: int, num_val: int, image_size: int, seed: int) -> dict[str, Any]:
  """Renders and writes the synthetic dataset.

  Args:
    out: output root (created if needed). Files of an earlier run are replaced: its per-image
      files (12-digit stems) in the image, panoptic and label directories are deleted first.
    num_train: number of training images (>= 1).
    num_val: number of validation images (>= 1).
    image_size: image side in pixels (>= 64).
    seed: dataset seed; the same arguments give byte-identical files.

  Returns:
    Summary: {"out", "image_size", "seed", "seconds", "counts": {split: {...}},
    "readers": {split: reader_kwargs(out, split)}}.

  Raises:
    ValueError: for non-positive counts or too small an image size.
  """
  if num_train < 1 or num_val < 1:
    raise ValueError(f"need at least one image per split, got train={num_train} val={num_val}")
  if image_size < 64:
    raise ValueError(f"image_size must be at least 64 pixels, got {image_size}")
  start = time.perf_counter()
  writer = writers.DatasetWriter(out, image_size, seed)
  for split, ids in image_ids(num_train, num_val).items():
    for image_id in ids:
      writer.add(split, image_id, scene_lib.make_scene(seed, image_id, image_size))
  writer.finish()
  return {"out": os.path.abspath(out), "image_size": image_size, "seed": seed,
          "seconds": round(time.perf_counter() - start, 3), "counts": writer.counts,
          "readers": {split: reader_kwargs(out, split) for split in writers.SPLITS}}
