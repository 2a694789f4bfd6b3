"""Mask encodings of the native dataset formats, shared by the readers and the synthetic writer.

* COCO panoptic PNGs: segment id = R + 256·G + 256²·B (0 = void / unlabeled).
* COCO segmentations: polygons (a list of [x1, y1, x2, y2, ...]), uncompressed RLE
  (`counts` a list of run lengths, column-major, starting with a run of zeros) and compressed RLE
  (`counts` a string), all decoded through pycocotools.
* Pascal-Panoptic-Parts uids: up to 7 digits, uid = sid·10⁵ + iid·10² + pid, where 1–2 digit uids
  carry only the semantic id (sid), 4–5 digit uids sid·10³ + iid, 6–7 digit uids all three; 3-digit
  uids are not allowed; uid 0 is void; pid 0 inside a 6–7 digit uid marks part-level void pixels.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pycocotools import mask as coco_mask

UID_MAX = 99_999_99


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
  """Converts a panoptic PNG to segment ids.

  Args:
    rgb: uint8 [H, W, 3] panoptic PNG pixels.

  Returns:
    uint32 [H, W] ids R + 256·G + 256²·B.
  """
  rgb = rgb.astype(np.uint32)  # [H, W, 3]
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]  # [H, W]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
  """Converts segment ids to panoptic PNG pixels.

  Args:
    ids: integer [H, W] segment ids below 256³.

  Returns:
    uint8 [H, W, 3] with R = id mod 256, G = id // 256 mod 256, B = id // 256².

  Raises:
    ValueError: when an id is negative or does not fit in three bytes.
  """
  ids = np.asarray(ids, dtype=np.int64)  # [H, W]
  if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
    raise ValueError(f"panoptic ids must lie in [0, 256^3), got [{ids.min()}, {ids.max()}]")
  channels = [ids % 256, (ids // 256) % 256, ids // (256 * 256)]  # 3 x [H, W]
  return np.stack(channels, axis=-1).astype(np.uint8)  # [H, W, 3]


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
  """Rasterises COCO polygons (their union) with pycocotools.

  Args:
    polygons: list of flat [x1, y1, x2, y2, ...] polygons in pixels.
    height: mask height.
    width: mask width.

  Returns:
    bool [height, width].
  """
  rles = coco_mask.frPyObjects([list(map(float, p)) for p in polygons], height, width)
  rle = coco_mask.merge(rles)
  return np.ascontiguousarray(coco_mask.decode(rle), dtype=bool)  # [H, W]


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
  """Encodes a mask as compressed COCO RLE with a JSON-ready string `counts`.

  Args:
    mask: bool [H, W].

  Returns:
    {"size": [H, W], "counts": str}.
  """
  rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
  size = [int(rle["size"][0]), int(rle["size"][1])]
  return {"size": size, "counts": rle["counts"].decode("ascii")}


def encode_uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
  """Encodes a mask as uncompressed COCO RLE (the form COCO uses for crowd regions).

  Args:
    mask: bool [H, W].

  Returns:
    {"size": [H, W], "counts": [run lengths]}, column-major, starting with a run of zeros.
  """
  flat = mask.flatten(order="F").astype(np.int8)  # [H*W]
  changes = np.flatnonzero(np.diff(flat)) + 1  # [K]
  bounds = np.concatenate([[0], changes, [flat.size]])  # [K+2]
  runs = np.diff(bounds).tolist()
  if flat.size and flat[0] == 1:
    runs = [0] + runs
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def decode_segmentation(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
  """Decodes a COCO `segmentation` field (polygons, uncompressed or compressed RLE).

  Args:
    segmentation: the annotation's `segmentation` value.
    height: image height the mask must have.
    width: image width the mask must have.
    where: names the file and annotation for error messages.

  Returns:
    bool [height, width].

  Raises:
    ValueError: naming `where` when the encoding is malformed or its size differs from the image.
  """
  if isinstance(segmentation, list):
    if not segmentation:
      raise ValueError(f"{where}: empty polygon list")
    for k, polygon in enumerate(segmentation):
      if not isinstance(polygon, (list, tuple)) or len(polygon) < 6 or len(polygon) % 2:
        raise ValueError(f"{where}: polygon {k} must be a flat list of at least 3 (x, y) pairs")
    return polygons_to_mask(segmentation, height, width)
  if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
    size = [int(s) for s in segmentation["size"]]
    if size != [height, width]:
      raise ValueError(f"{where}: RLE size {size} differs from the image size [{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, list):
      if sum(int(c) for c in counts) != height * width:
        raise ValueError(
            f"{where}: uncompressed RLE counts sum to {sum(counts)}, expected {height * width}")
      rle = coco_mask.frPyObjects(segmentation, height, width)
    elif isinstance(counts, (str, bytes)):
      rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
      raise ValueError(
          f"{where}: RLE counts must be a list or a string, got {type(counts).__name__}")
    return np.ascontiguousarray(coco_mask.decode(rle), dtype=bool)  # [H, W]
  raise ValueError(f"{where}: unrecognised segmentation of type {type(segmentation).__name__}")


def mask_bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
  """COCO box of a mask.

  Args:
    mask: bool [H, W].

  Returns:
    (x, y, w, h) in pixels, covering whole pixels; zeros for an empty mask.
  """
  cols = np.flatnonzero(mask.any(axis=0))  # [K]
  rows = np.flatnonzero(mask.any(axis=1))  # [L]
  if not cols.size:
    return (0.0, 0.0, 0.0, 0.0)
  return (float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1),
          float(rows[-1] - rows[0] + 1))


def decode_uids(uids: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Splits Pascal-Panoptic-Parts uids into semantic, instance and part ids.

  Follows the panoptic_parts label format: 1–2 digit uids are sids, 4–5 digit uids are
  sid·10³ + iid, 6–7 digit uids are sid·10⁵ + iid·10² + pid.

  Args:
    uids: integer [H, W] uids.
    where: names the label file for error messages.

  Returns:
    (sids, iids, pids), int32 [H, W] each, with -1 where the level is absent (iids for 1–2 digit
    uids; pids for uids up to 5 digits). pid 0 in a 6–7 digit uid is kept (part-level void).

  Raises:
    ValueError: naming `where` and the bad uid when a uid is negative, has 3 digits or exceeds
      7 digits.
  """
  u = np.asarray(uids, dtype=np.int64)  # [H, W]
  bad = (u < 0) | (u > UID_MAX) | ((u >= 100) & (u <= 999))  # [H, W]
  if bad.any():
    raise ValueError(f"{where}: invalid Pascal-Panoptic-Parts uid {int(u[bad][0])} "
                     "(uids have 1-2, 4-5 or 6-7 digits)")
  short = u <= 99  # [H, W]
  middle = (u > 99) & (u <= 99_999)  # [H, W]
  sids = np.where(short, u, np.where(middle, u // 1000, u // 100_000))  # [H, W]
  iids = np.where(short, -1, np.where(middle, u % 1000, (u // 100) % 1000))  # [H, W]
  pids = np.where(u <= 99_999, -1, u % 100)  # [H, W]
  return sids.astype(np.int32), iids.astype(np.int32), pids.astype(np.int32)


def encode_uids(sids: np.ndarray, iids: np.ndarray, pids: np.ndarray) -> np.ndarray:
  """Inverse of `decode_uids`.

  Args:
    sids: integer [H, W] semantic ids in [0, 99].
    iids: integer [H, W] instance ids in [0, 999], -1 where absent.
    pids: integer [H, W] part ids in [0, 99], -1 where absent (requires an iid).

  Returns:
    int32 [H, W] uids.

  Raises:
    ValueError: when an id is out of its digit range or a pid comes without an iid.
  """
  sids, iids, pids = (np.asarray(a, dtype=np.int64) for a in (sids, iids, pids))
  if sids.min(initial=0) < 0 or sids.max(initial=0) > 99:
    raise ValueError("sids must lie in [0, 99]")
  if iids.min(initial=-1) < -1 or iids.max(initial=0) > 999:
    raise ValueError("iids must lie in [-1, 999]")
  if pids.min(initial=-1) < -1 or pids.max(initial=0) > 99:
    raise ValueError("pids must lie in [-1, 99]")
  if np.any((pids >= 0) & (iids < 0)):
    raise ValueError("a pid needs an iid")
  sids_iids = np.where(iids < 0, sids, sids * 1000 + iids)  # [H, W]
  return np.where(pids < 0, sids_iids, sids_iids * 100 + pids).astype(np.int32)  # [H, W]
