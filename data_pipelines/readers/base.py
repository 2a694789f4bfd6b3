"""What every native-format reader shares: the random-access contract and file checks.

A reader is a random-access source over one split of one dataset:
`len(reader)`, `reader[i] -> ImageRecord` (masks decoded on access, at the image's full size),
`reader.meta(i) -> RecordMeta` (from the annotation index, no mask decoding),
`reader.summary() -> dict` of counts and `reader.format_summary() -> str`.
Errors name the dataset, the file and the annotation id at fault.
"""

from __future__ import annotations

import abc
import json
import os
from typing import Any, Optional

import numpy as np
from PIL import Image

from data_pipelines import records


def require_file(path: str, what: str) -> str:
  """Checks that a file exists.

  Args:
    path: the file.
    what: what the file is, for the message.

  Returns:
    The absolute path.

  Raises:
    FileNotFoundError: naming the file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} not found: {path}")
  return os.path.abspath(path)


def require_dir(path: str, what: str) -> str:
  """Checks that a directory exists.

  Args:
    path: the directory.
    what: what the directory is, for the message.

  Returns:
    The absolute path.

  Raises:
    FileNotFoundError: naming the directory.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} not found: {path}")
  return os.path.abspath(path)


def load_json(path: str, what: str) -> Any:
  """Reads a JSON annotation file.

  Args:
    path: the file.
    what: what the file is, for the message.

  Returns:
    The parsed JSON.

  Raises:
    FileNotFoundError: naming the file when missing.
    ValueError: naming the file when it is not valid JSON.
  """
  require_file(path, what)
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e


def require_keys(obj: dict, keys: tuple[str, ...], where: str) -> None:
  """Checks that a JSON object has the keys a format requires.

  Args:
    obj: the JSON object.
    keys: required keys.
    where: names the file / annotation for the message.

  Raises:
    ValueError: naming `where` and the missing keys.
  """
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  missing = [k for k in keys if k not in obj]
  if missing:
    raise ValueError(f"{where}: missing key(s) {missing}")


def check_image(path: str, height: Optional[int], width: Optional[int],
                where: str) -> tuple[int, int]:
  """Opens an image header and checks its size (no pixel decoding).

  Args:
    path: the image file.
    height: expected height, or None to accept any.
    width: expected width, or None to accept any.
    where: names the dataset and image for the message.

  Returns:
    (height, width) of the file.

  Raises:
    FileNotFoundError: naming the file when missing.
    ValueError: naming the file when it is not a readable image or its size differs.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{where}: image file not found: {path}")
  try:
    with Image.open(path) as im:
      w, h = im.size
  except Exception as e:  # PIL raises several types for unreadable files; all mean "corrupt image"
    raise ValueError(f"{where}: corrupt or unreadable image {path} ({e})") from e
  if (height is not None and h != height) or (width is not None and w != width):
    raise ValueError(f"{where}: image {path} is {h}x{w}, the annotation says {height}x{width}")
  return h, w


def read_image(path: str, where: str) -> np.ndarray:
  """Decodes an image to RGB.

  Args:
    path: the image file.
    where: names the dataset and image for the message.

  Returns:
    uint8 [H, W, 3].

  Raises:
    FileNotFoundError: naming the file when missing.
    ValueError: naming the file when it cannot be decoded.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{where}: image file not found: {path}")
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))  # [H, W, 3]
  except Exception as e:  # PIL raises several types for unreadable files; all mean "corrupt image"
    raise ValueError(f"{where}: corrupt or unreadable image {path} ({e})") from e


def read_png_rgb(path: str, height: int, width: int, where: str) -> np.ndarray:
  """Reads a panoptic PNG as RGB and checks its size.

  Args:
    path: the PNG file.
    height: expected height.
    width: expected width.
    where: names the dataset and image for the message.

  Returns:
    uint8 [H, W, 3].

  Raises:
    FileNotFoundError: naming the file when missing.
    ValueError: naming the file when it is unreadable or its size differs.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{where}: panoptic PNG not found: {path}")
  try:
    with Image.open(path) as im:
      rgb = np.asarray(im.convert("RGB"))  # [H, W, 3]
  except Exception as e:  # PIL raises several types for unreadable files; all mean "corrupt PNG"
    raise ValueError(f"{where}: corrupt or unreadable panoptic PNG {path} ({e})") from e
  if rgb.shape[:2] != (height, width):
    raise ValueError(f"{where}: panoptic PNG {path} is {rgb.shape[0]}x{rgb.shape[1]}, "
                     f"the image is {height}x{width}")
  return rgb


class NativeReader(abc.ABC):
  """Random-access reader of one split of a dataset in its native format.

  Subclasses set `FORMAT` and implement `__len__`, `_record`, `meta` and `_counts`.

  Args:
    name: the dataset's name (config key), stored in every record.
  """

  FORMAT = ""

  def __init__(self, name: str):
    self.name = name
    self._summary: Optional[dict[str, Any]] = None

  @abc.abstractmethod
  def __len__(self) -> int:
    """Number of images."""

  @abc.abstractmethod
  def _record(self, i: int) -> records.ImageRecord:
    """Builds the record of image `i` (0 <= i < len)."""

  @abc.abstractmethod
  def meta(self, i: int) -> records.RecordMeta:
    """Eligibility info of image `i` without decoding masks.

    Args:
      i: image index.

    Returns:
      The image's `RecordMeta`.
    """

  @abc.abstractmethod
  def _counts(self) -> dict[str, Any]:
    """Format-specific counts for `summary`."""

  def _check_index(self, i: int) -> int:
    n = len(self)
    if not isinstance(i, (int, np.integer)) or not 0 <= i < n:
      raise IndexError(f"{self.name} ({self.FORMAT}): index {i!r} out of range [0, {n})")
    return int(i)

  def __getitem__(self, i: int) -> records.ImageRecord:
    """Reads image `i`'s record, decoding its masks.

    Args:
      i: image index in [0, len).

    Returns:
      The `ImageRecord`.

    Raises:
      IndexError: when `i` is out of range.
    """
    return self._record(self._check_index(i))

  def summary(self) -> dict[str, Any]:
    """Counts over the whole split (computed once).

    Returns:
      {"dataset", "format", "images", "images_without_annotations", ..., "dropped": 0}; void
      pixels are None where the format does not mark them.
    """
    if self._summary is None:
      self._summary = {"dataset": self.name, "format": self.FORMAT, **self._counts(), "dropped": 0}
    return self._summary

  def format_summary(self) -> str:
    """The summary as readable text, one count per line.

    Returns:
      Text such as "coco (coco_panoptic)\\n  images: 5000\\n  ...".
    """
    s = self.summary()
    lines = [f"{s['dataset']} ({s['format']})"]
    lines += [f"  {k.replace('_', ' ')}: {'unknown' if v is None else v}"
              for k, v in s.items() if k not in ("dataset", "format")]
    return "\n".join(lines)


def validate_nonempty(n: int, what: str) -> None:
  """Raises on an empty dataset.

  Args:
    n: number of images found.
    what: names the file / directory and split.

  Raises:
    ValueError: naming `what` when `n == 0`.
  """
  if n == 0:
    raise ValueError(f"{what}: the dataset has no images")
