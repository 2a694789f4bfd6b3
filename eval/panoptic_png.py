"""COCO panoptic PNG encoding: segment id = R + 256·G + 256²·B, and checked PNG reading."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def rgb2id(rgb: np.ndarray) -> np.ndarray:
  """Decodes a COCO panoptic RGB image into segment ids.

  Args:
    rgb: uint8 [H, W, 3].

  Returns:
    uint32 [H, W] segment ids (0 is VOID).
  """
  rgb = rgb.astype(np.uint32)  # [H, W, 3]
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]  # [H, W]


def id2rgb(ids: np.ndarray) -> np.ndarray:
  """Encodes segment ids as a COCO panoptic RGB image.

  Args:
    ids: integer [H, W] segment ids in [0, 256³).

  Returns:
    uint8 [H, W, 3].

  Raises:
    ValueError: when an id does not fit in 24 bits.
  """
  ids = np.asarray(ids, dtype=np.int64)  # [H, W]
  if ids.size and (ids.min() < 0 or ids.max() >= 256 ** 3):
    raise ValueError(f"segment ids must lie in [0, 256^3), got [{ids.min()}, {ids.max()}]")
  rgb = np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256)], axis=-1)  # [H, W, 3]
  return rgb.astype(np.uint8)


def read_id_png(path: str, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
  """Reads a COCO panoptic PNG as segment ids, checking its size.

  Args:
    path: the PNG file.
    expected_hw: (height, width) it must have, or None.

  Returns:
    uint32 [H, W] segment ids.

  Raises:
    FileNotFoundError: naming the file when it is missing.
    ValueError: naming the file when it is not RGB or its size differs from `expected_hw`.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"panoptic PNG {path} does not exist")
  with Image.open(path) as im:
    rgb = np.array(im.convert("RGB") if im.mode != "RGB" else im, dtype=np.uint8)  # [H, W, 3]
  if expected_hw is not None and tuple(rgb.shape[:2]) != tuple(expected_hw):
    raise ValueError(f"{path}: size {rgb.shape[0]}x{rgb.shape[1]} (HxW) differs from the ground "
                     f"truth's {expected_hw[0]}x{expected_hw[1]}")
  return rgb2id(rgb)
