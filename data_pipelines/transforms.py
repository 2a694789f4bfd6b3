"""Transforms from an `ImageRecord` onto the fixed square canvas: decode, resize, flip, crop / pad.

Every batch has static shapes: an image of any size is resized (with scale jitter in training),
optionally mirrored, then cropped / padded to a `canvas x canvas` square anchored at the top-left
corner; `valid` marks the real image pixels. Instance masks follow the same geometry:

* at the canvas each pixel takes the original mask value under its centre (nearest: exact under
  flips and crops, one cheap gather per mask; the image itself is resized bilinearly);
* at 1/4 of the canvas (what the losses use) a cell is foreground when at least half of its 4x4
  canvas pixels are (area vote: unbiased in area and centred, where nearest sampling would shift
  every boundary by 1.5 px and alias thin parts). An instance that still covers canvas pixels but
  wins no cell keeps its best-covered cell, so no visible instance ever has an empty 1/4 mask;
* boxes are the tight box of the canvas-resolution mask, normalised cxcywh in [0, 1].

Randomness only ever comes from the `np.random.Generator` grain hands to a `random_map`, so a
sample is a pure function of (seed, global element index).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from data_pipelines import records as records_lib

_LEFT_RIGHT = re.compile(r"\b(left|right)(?=(?:most|ward|wards|hand|side)?\b)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """How an image of `height x width` maps onto the canvas.

  The image is (1) resized to `resized_height x resized_width`, (2) mirrored left-right when
  `flip`, (3) cropped so that canvas pixel (y, x) is resized pixel (y + offset_y, x + offset_x),
  and padded with zeros at the bottom / right when smaller than the canvas.

  Attributes:
    height: original image height.
    width: original image width.
    canvas: side S of the square canvas.
    scale: resize factor applied to the original image.
    resized_height: round(height * scale), at least 1.
    resized_width: round(width * scale), at least 1.
    flip: whether the image is mirrored left-right (after resizing).
    offset_y: crop offset in the resized image, 0 when it fits.
    offset_x: crop offset in the resized image, 0 when it fits.
  """

  height: int
  width: int
  canvas: int
  scale: float
  resized_height: int
  resized_width: int
  flip: bool
  offset_y: int
  offset_x: int


def fit_scale(height: int, width: int, canvas: int) -> float:
  """The scale that fits the longer image side exactly onto the canvas.

  Args:
    height: image height.
    width: image width.
    canvas: canvas side.

  Returns:
    canvas / max(height, width).
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"image size must be positive, got {height}x{width}")
  return canvas / max(height, width)


def _make_geometry(height: int, width: int, canvas: int, scale: float, flip: bool,
                   offset_y: int, offset_x: int) -> Geometry:
  """Builds a `Geometry` with the resized size implied by `scale`."""
  return Geometry(height=height, width=width, canvas=canvas, scale=scale,
                  resized_height=max(1, int(round(height * scale))),
                  resized_width=max(1, int(round(width * scale))),
                  flip=flip, offset_y=offset_y, offset_x=offset_x)


def eval_geometry(height: int, width: int, canvas: int) -> Geometry:
  """The deterministic evaluation geometry: fit to the canvas, no flip, no crop.

  Args:
    height: image height.
    width: image width.
    canvas: canvas side.

  Returns:
    A `Geometry` whose resized image fits inside the canvas.
  """
  return _make_geometry(height, width, canvas, fit_scale(height, width, canvas), False, 0, 0)


def _crop_offset(resized: int, canvas: int, anchor: Optional[tuple[float, float]],
                 rng: np.random.Generator) -> int:
  """Random crop offset along one axis, keeping `anchor` (resized coords) inside when possible."""
  slack = resized - canvas
  if slack <= 0:
    return 0
  lo, hi = 0, slack
  if anchor is not None:
    a0, a1 = anchor
    if a1 - a0 <= canvas:
      lo, hi = max(lo, int(np.ceil(a1 - canvas))), min(hi, int(np.floor(a0)))
    else:
      lo, hi = max(lo, int(np.ceil(a0))), min(hi, int(np.floor(a1 - canvas)))
    if lo > hi:
      lo = hi = int(np.clip(round((a0 + a1 - canvas) / 2), 0, slack))
  return int(rng.integers(lo, hi + 1))


def random_geometry(height: int, width: int, canvas: int, rng: np.random.Generator,
                    scale_range: tuple[float, float], flip_prob: float,
                    anchor_box: Optional[Sequence[float]] = None) -> Geometry:
  """Training geometry: scale jitter, random flip and random crop.

  The scale is `fit_scale * u` with `u` uniform in `scale_range`; when the resized image is larger
  than the canvas the crop offset is uniform over the positions that keep `anchor_box` (when given)
  inside the canvas, or, for an anchor larger than the canvas, the canvas inside the anchor.

  Args:
    height: image height.
    width: image width.
    canvas: canvas side.
    rng: the generator grain passes to `random_map`.
    scale_range: (low, high) multipliers of the canvas-fitting scale.
    flip_prob: probability of a left-right mirror.
    anchor_box: optional COCO [x, y, w, h] box (original pixels) the crop should keep.

  Returns:
    A `Geometry`.
  """
  low, high = scale_range
  if not 0 < low <= high:
    raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
  scale = fit_scale(height, width, canvas) * float(rng.uniform(low, high))
  flip = bool(rng.random() < flip_prob)
  geom = _make_geometry(height, width, canvas, scale, flip, 0, 0)
  anchor_x = anchor_y = None
  if anchor_box is not None:
    x, y, w, h = (float(v) for v in anchor_box)
    x0, x1 = x * geom.resized_width / width, (x + w) * geom.resized_width / width
    if flip:
      x0, x1 = geom.resized_width - x1, geom.resized_width - x0
    anchor_x = (x0, x1)
    anchor_y = (y * geom.resized_height / height, (y + h) * geom.resized_height / height)
  offset_y = _crop_offset(geom.resized_height, canvas, anchor_y, rng)
  offset_x = _crop_offset(geom.resized_width, canvas, anchor_x, rng)
  return dataclasses.replace(geom, offset_y=offset_y, offset_x=offset_x)


def decode_image(record: records_lib.ImageRecord) -> np.ndarray:
  """Reads the record's image as RGB.

  Args:
    record: the image record.

  Returns:
    uint8 [H, W, 3].

  Raises:
    FileNotFoundError / ValueError: naming the file and image id when the file is missing, cannot be
      decoded, or its size differs from the record's.
  """
  if not os.path.exists(record.file_name):
    raise FileNotFoundError(
        f"{record.dataset}: image {record.image_id}: file {record.file_name} does not exist")
  try:
    with Image.open(record.file_name) as img:
      image = np.asarray(img.convert("RGB"))  # [H, W, 3]
  except OSError as e:
    raise ValueError(
        f"{record.dataset}: image {record.image_id}: cannot decode {record.file_name}: {e}") from e
  if image.shape[:2] != (record.height, record.width):
    raise ValueError(
        f"{record.dataset}: image {record.image_id}: {record.file_name} is "
        f"{image.shape[0]}x{image.shape[1]} but the annotation says {record.height}x{record.width}")
  return image


def _place(resized: np.ndarray, geom: Geometry) -> np.ndarray:
  """Mirrors, crops and zero-pads one resized array [h, w, ...] onto the canvas."""
  if geom.flip:
    resized = resized[:, ::-1]
  s = geom.canvas
  window = resized[geom.offset_y:geom.offset_y + s, geom.offset_x:geom.offset_x + s]
  out = np.zeros((s, s) + resized.shape[2:], resized.dtype)  # [S, S, ...]
  out[:window.shape[0], :window.shape[1]] = window
  return out


def warp_image(image: np.ndarray, geom: Geometry) -> tuple[np.ndarray, np.ndarray]:
  """Puts an image on the canvas.

  Args:
    image: uint8 [H, W, 3].
    geom: the geometry.

  Returns:
    (image uint8 [S, S, 3], valid bool [S, S]) where `valid` marks real image pixels.
  """
  if image.shape[:2] != (geom.height, geom.width):
    raise ValueError(f"image is {image.shape}, geometry expects {geom.height}x{geom.width}")
  resized = np.asarray(Image.fromarray(image).resize(
      (geom.resized_width, geom.resized_height), Image.Resampling.BILINEAR))  # [h, w, 3]
  valid = np.ones((geom.resized_height, geom.resized_width), bool)  # [h, w]
  return _place(resized, geom), _place(valid, geom)


def _source_index(size: int, resized: int, offset: int, canvas: int, flip: bool
                  ) -> np.ndarray:
  """Original-image index under the centre of each canvas position along one axis.

  Returns:
    int [min(canvas, resized - offset)]: canvas position i shows resized pixel offset + i (mirrored
    when `flip`), whose centre lies over original pixel floor((j + 0.5) * size / resized).
  """
  j = offset + np.arange(max(0, min(canvas, resized - offset)))  # [n]
  if flip:
    j = resized - 1 - j
  return np.minimum(((j + 0.5) * size / resized).astype(np.int64), size - 1)  # [n]


def warp_masks(masks: Sequence[np.ndarray], geom: Geometry) -> np.ndarray:
  """Puts full-size boolean masks on the canvas.

  Each canvas pixel takes the mask value under its centre in the original image (exact for flips
  and crops, and one gather per mask over the canvas window only; the coarser masks the losses use
  are then area votes of these, see `downsample_masks`).

  Args:
    masks: N bool arrays [H, W].
    geom: the geometry.

  Returns:
    bool [N, S, S].
  """
  ys = _source_index(geom.height, geom.resized_height, geom.offset_y, geom.canvas, False)  # [h]
  xs = _source_index(geom.width, geom.resized_width, geom.offset_x, geom.canvas, geom.flip)  # [w]
  out = np.zeros((len(masks), geom.canvas, geom.canvas), bool)  # [N, S, S]
  for i, mask in enumerate(masks):
    if mask.shape != (geom.height, geom.width):
      raise ValueError(f"mask {i} is {mask.shape}, geometry expects {geom.height}x{geom.width}")
    out[i, :len(ys), :len(xs)] = mask[ys[:, None], xs[None, :]]  # [h, w]
  return out


def downsample_masks(masks: np.ndarray, stride: int) -> np.ndarray:
  """Downsamples canvas masks by an area vote over stride x stride cells.

  Args:
    masks: bool [N, S, S] with S divisible by `stride`.
    stride: cell side, >= 1 (1 returns the masks themselves, as bool).

  Returns:
    bool [N, S/stride, S/stride]: cells with at least half of their pixels foreground; a mask
    with foreground but no such cell keeps its best-covered cell.
  """
  n, s, _ = masks.shape
  if stride < 1 or s % stride:
    raise ValueError(f"canvas side must be divisible by the mask stride {stride}, got masks of "
                     f"shape {masks.shape}")
  if stride == 1:
    return np.asarray(masks, bool)
  m = s // stride
  # Explicit adds of strided views: several times faster than a sum over axes (2, 4).
  cells = np.ascontiguousarray(masks, bool).view(np.uint8).reshape(n, s, m, stride)  # [N,S,m,k]
  cols = cells[..., 0].copy()  # [N, S, m]
  for i in range(1, stride):
    cols += cells[..., i]
  rows = cols.reshape(n, m, stride, m)  # [N, m, k, m]
  counts = rows[:, :, 0].copy()  # [N, m, m]
  for i in range(1, stride):
    counts += rows[:, :, i]
  out = 2 * counts.astype(np.int32) >= stride * stride  # [N, m, m]
  lost = np.flatnonzero(~out.any(axis=(1, 2)) & (counts.max(axis=(1, 2), initial=0) > 0))
  for i in lost:
    y, x = np.unravel_index(np.argmax(counts[i]), counts[i].shape)
    out[i, y, x] = True
  return out


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
  """Tight boxes of canvas masks, normalised by the canvas side.

  Args:
    masks: bool [N, S, S].

  Returns:
    float32 [N, 4] (cx, cy, w, h) in [0, 1]; zeros for empty masks.
  """
  n, s, _ = masks.shape
  boxes = np.zeros((n, 4), np.float32)  # [N, 4]
  rows = masks.any(axis=2)  # [N, S]
  cols = masks.any(axis=1)  # [N, S]
  for i in range(n):
    ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
    if ys.size == 0:
      continue
    x0, x1, y0, y1 = xs[0], xs[-1] + 1, ys[0], ys[-1] + 1
    boxes[i] = ((x0 + x1) / 2 / s, (y0 + y1) / 2 / s, (x1 - x0) / s, (y1 - y0) / s)
  return boxes


def flip_sentence(sentence: str) -> str:
  """Swaps the words left and right (also leftmost, right-hand, ...) for a mirrored image.

  Args:
    sentence: a referring expression.

  Returns:
    The sentence with "left" and "right" exchanged as whole words (case kept: Left -> Right).
  """

  def swap(m: re.Match) -> str:
    word = m.group(1)
    new = "right" if word.lower() == "left" else "left"
    if word.isupper():
      return new.upper()
    if word[0].isupper():
      return new.capitalize()
    return new

  return _LEFT_RIGHT.sub(swap, sentence)


def warp_sentences(sentences: Sequence[str], geom: Geometry) -> list[str]:
  """Referring expressions as they read on the transformed image.

  Args:
    sentences: the record's sentences.
    geom: the geometry.

  Returns:
    The sentences, with left / right swapped when the geometry mirrors the image.
  """
  return [flip_sentence(s) for s in sentences] if geom.flip else list(sentences)


def keep_largest(areas: np.ndarray, max_count: int) -> np.ndarray:
  """Chooses which instances fit into `max_count` slots.

  Args:
    areas: [N] instance areas.
    max_count: number of slots.

  Returns:
    int [min(N, max_count)] indices of the largest instances, in their original order (ties keep
    the earlier instance).
  """
  if len(areas) <= max_count:
    return np.arange(len(areas))
  order = np.argsort(-np.asarray(areas), kind="stable")  # [N]
  return np.sort(order[:max_count])


def pad_to(x: np.ndarray, n: int, axis: int = 0) -> np.ndarray:
  """Zero-pads `x` along `axis` to length `n`.

  Args:
    x: an array whose `axis` length is at most `n`.
    n: the target length.
    axis: the axis to pad.

  Returns:
    The padded array (same dtype).
  """
  if x.shape[axis] > n:
    raise ValueError(f"cannot pad axis {axis} of shape {x.shape} down to {n}")
  shape = list(x.shape)
  shape[axis] = n
  out = np.zeros(shape, x.dtype)
  out[tuple(slice(0, d) for d in x.shape)] = x
  return out
