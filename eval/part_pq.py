"""PartPQ on Pascal-Panoptic-Parts with the semantics of panoptic_parts 2.0rc6 `eval_PartPQ`.

The eval spec is `ppq_ppp_59_57_cvpr21_default` (59 scene classes, 57 grouped part classes); its
facts live in `eval/ppp_partpq_spec.json` (extracted from the package by
tests/reference/extract_ppp_spec.py).

Ground truth: uint32-style uids per pixel (sid, sid·10³+iid, or sid·10⁵+iid·10²+pid) in a .tif.
A file pid is mapped to its grouped eval pid through the spec; pid 0 / no pid means "no part
information". Predictions: a 3-channel PNG of (scene eval id, instance id, part eval id), part id 0
for "no part", 255 for "unknown" (its pixels are not counted against the prediction).

Per image and scene class (reference semantics, reproduced exactly):
  * VOID = pixels whose sid is not an evaluated scene class; CROWD(c) = pixels of thing class c
    without an instance id, plus instances of a part class whose part labels are all 0 (those
    instances are removed from the ground truth);
  * segments are the distinct instance ids of the class (stuff: one segment per class). The first
    ground-truth segment lying entirely in CROWD(c) is dropped;
  * a ground-truth g (minus CROWD(c)) matches prediction p when
    |g ∩ p| / (|g ∪ p| − |VOID ∩ p|) > 0.5;
  * the IoU of a match is that IoU for classes without parts; for classes with parts it is the
    mean, over the part labels present, of the part IoUs computed on the whole image except VOID,
    CROWD(c) and the pixels of g without part label — labels include 0 ("not this segment's
    part", which covers the background outside both segments), and the 255 label is left out;
  * an unmatched prediction is a false positive unless more than half of it lies in VOID ∪
    CROWD(c); unmatched ground truth is a false negative.
PartPQ per class = Σ IoU / (TP + ½FP + ½FN); averages over classes with TP + FP + FN > 0, also
split into classes with parts and without. An average over no class is reported as 0 (the
reference divides by zero there).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Mapping

import numpy as np
from PIL import Image

SPEC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppp_partpq_spec.json")


@dataclasses.dataclass(frozen=True)
class PartPQSpec:
  """The facts of a PartPQ eval spec.

  Attributes:
    name: spec name.
    ignore_label: the prediction's "unknown part" value (255).
    sids: evaluated scene class ids, ascending.
    things: scene class ids with instances.
    parts: scene class id -> its eval part ids, for classes evaluated with parts.
    file_to_eval: int32 [10000] file sid_pid -> eval sid_pid (-1 for ids the dataset lacks).
    scene_labels: scene class id -> name.
  """

  name: str
  ignore_label: int
  sids: tuple[int, ...]
  things: frozenset[int]
  parts: Mapping[int, tuple[int, ...]]
  file_to_eval: np.ndarray
  scene_labels: Mapping[int, str]


@functools.lru_cache(maxsize=None)
def load_spec(path: str = SPEC_PATH) -> PartPQSpec:
  """Loads the eval spec facts.

  Args:
    path: JSON written by tests/reference/extract_ppp_spec.py.

  Returns:
    The spec.
  """
  with open(path) as f:
    d = json.load(f)
  file_to_eval = np.full([10000], -1, np.int32)  # [10000]
  for k, v in d["file_sid_pid2eval_sid_pid"].items():
    file_to_eval[int(k)] = v
  return PartPQSpec(
      name=d["name"], ignore_label=int(d["ignore_label"]),
      sids=tuple(sorted(d["eval_sid_things"] + d["eval_sid_stuff"])),
      things=frozenset(d["eval_sid_things"]),
      parts={int(k): tuple(v) for k, v in d["eval_sid2parts"].items()},
      file_to_eval=file_to_eval,
      scene_labels={int(k): v for k, v in d["eval_sid2scene_label"].items()})


def decode_gt(uids: np.ndarray, spec: PartPQSpec, where: str):
  """Splits ground-truth uids into scene ids, instance ids, eval part ids and crowd flags.

  Args:
    uids: int [H, W] Pascal-Panoptic-Parts uids.
    spec: the eval spec.
    where: the file, for error messages.

  Returns:
    (sids, iids, pids): int [H, W] scene ids, instance ids (0 where none) and eval part ids (0
    where none).

  Raises:
    ValueError: naming the file and uid when a uid is negative, too large, or has a part id the
      dataset does not define.
  """
  uids = uids.astype(np.int64)  # [H, W]
  if uids.size and (uids.min() < 0 or uids.max() > 99_999_99):
    raise ValueError(f"{where}: uids must lie in [0, 9999999], got [{uids.min()}, {uids.max()}]")
  short = uids <= 99  # [H, W]
  mid = (uids > 99) & (uids <= 99_999)  # [H, W]
  padded = np.where(short, uids * 10 ** 5, np.where(mid, uids * 10 ** 2, uids))  # [H, W]
  sids = padded // 10 ** 5  # [H, W]
  iids = np.where(short, 0, padded // 10 ** 2 % 1000)  # [H, W]
  file_pids = np.where(short | mid, 0, padded % 100)  # [H, W]
  file_sid_pid = np.where(file_pids == 0, sids, sids * 100 + file_pids)  # [H, W]
  eval_sid_pid = spec.file_to_eval[file_sid_pid]  # [H, W]
  if np.any(eval_sid_pid < 0):
    bad = int(uids[eval_sid_pid < 0].flat[0])
    raise ValueError(f"{where}: uid {bad} has a scene/part id that {spec.name} does not define")
  pids = np.where(eval_sid_pid >= 100, eval_sid_pid % 100, 0)  # [H, W]
  return sids, iids, pids


def _segments(sem: np.ndarray, inst: np.ndarray, sid: int) -> list[np.ndarray]:
  """Masks of the distinct instance ids of scene class `sid`, by ascending instance id."""
  selected = sem == sid  # [H, W]
  if not selected.any():
    return []
  return [selected & (inst == i) for i in np.unique(inst[selected]).tolist()]


def _part_miou(gt_parts: np.ndarray, pred_parts: np.ndarray, evaluated: np.ndarray,
               ignore_label: int) -> float:
  """Mean part IoU over the labels present in the evaluated region (reference semantics)."""
  g = gt_parts[evaluated].astype(np.int64)  # [M]
  p = pred_parts[evaluated].astype(np.int64)  # [M]
  if g.size == 0:
    raise ValueError("a matched segment has no evaluated pixel")
  labels = np.union1d(g, p)  # [L]
  gi = np.searchsorted(labels, g)  # [M]
  pi = np.searchsorted(labels, p)  # [M]
  cm = np.bincount(gi * labels.size + pi, minlength=labels.size ** 2).reshape(
      labels.size, labels.size)  # [L, L]
  inter = np.diag(cm).astype(np.float64)  # [L]
  union = cm.sum(0) + cm.sum(1) - np.diag(cm)  # [L]
  ious = inter / np.where(union > 0, union, 1)  # [L]
  if ignore_label in p:
    ious = ious[labels != ignore_label]
  return float(np.mean(ious))


@dataclasses.dataclass
class PartStat:
  """Accumulated matches of one scene class.

  Attributes:
    iou: sum of (part-level) IoUs of true positives.
    tp: true positives.
    fp: false positives.
    fn: false negatives.
  """

  iou: float = 0.0
  tp: int = 0
  fp: int = 0
  fn: int = 0


def part_pq_image_stats(gt_uids: np.ndarray, pred: np.ndarray, spec: PartPQSpec, where: str,
                        stats: dict[int, PartStat]) -> None:
  """Adds one image's PartPQ matches to `stats`.

  Args:
    gt_uids: int [H, W] ground-truth uids.
    pred: int [H, W, 3] prediction (scene eval id, instance id, part eval id).
    spec: the eval spec.
    where: text naming the image and files, for error messages.
    stats: per scene class statistics, updated in place.

  Raises:
    ValueError: naming `where` when the prediction's size differs from the ground truth's or an
      id is invalid.
  """
  if pred.ndim != 3 or pred.shape[2] != 3 or pred.shape[:2] != gt_uids.shape:
    raise ValueError(f"{where}: prediction shape {pred.shape} does not match the ground truth "
                     f"{gt_uids.shape} + 3 channels")
  sids, iids, pids = decode_gt(gt_uids, spec, where)
  uids = gt_uids.astype(np.int64)  # [H, W]
  sid_iid = np.where(uids <= 99_999, uids, uids // 100)  # [H, W]
  void = ~np.isin(sids, spec.sids)  # [H, W]
  crowd_sid = np.where(np.isin(sids, list(spec.things)) & (sid_iid < 1000), sids, 0)  # [H, W]
  pred_sem = pred[..., 0].astype(np.int64)  # [H, W]
  pred_inst = pred[..., 1].astype(np.int64)  # [H, W]
  pred_part = pred[..., 2].astype(np.int64)  # [H, W]

  gt_by_sid = {}
  for sid in spec.sids:
    segs = []
    for mask in _segments(sids, iids, sid):
      parts = np.where(mask, pids, 0)  # [H, W]
      if sid in spec.parts and not np.any(parts[mask] != 0):
        crowd_sid[mask] = sid
        continue
      segs.append((mask, parts))
    gt_by_sid[sid] = segs

  for sid in spec.sids:
    has_parts = sid in spec.parts
    crowd = crowd_sid == sid  # [H, W]
    ignored = void | crowd  # [H, W]
    gts = gt_by_sid[sid]
    for i, (mask, _) in enumerate(gts):
      if not np.any(mask & ~crowd):
        gts = gts[:i] + gts[i + 1:]
        break
    preds = [(m, np.where(m, pred_part, 0) if has_parts else None)
             for m in _segments(pred_sem, pred_inst, sid)]
    stat = stats.setdefault(sid, PartStat())
    unmatched = list(range(len(preds)))
    tp = 0
    for mask, parts in gts:
      g = mask & ~crowd  # [H, W]
      for j in unmatched:
        p = preds[j][0]
        inter = np.count_nonzero(g & p)
        union = np.count_nonzero(g | p) - np.count_nonzero(void & p)
        iou = inter / union if union > 0 else 0.0
        if iou > 0.5:
          unmatched.remove(j)
          if has_parts:
            evaluated = ~(ignored | ((parts == 0) & g))  # [H, W]
            iou = _part_miou(parts, preds[j][1], evaluated, spec.ignore_label)
          stat.tp += 1
          stat.iou += iou
          tp += 1
          break
    for j in unmatched:
      p = preds[j][0]
      if np.count_nonzero(ignored & p) / np.count_nonzero(p) <= 0.5:
        stat.fp += 1
    stat.fn += len(gts) - tp


def part_pq_average(stats: Mapping[int, PartStat], spec: PartPQSpec) -> dict:
  """Averages per-class statistics.

  Args:
    stats: per scene class statistics.
    spec: the eval spec.

  Returns:
    {"PartPQ", "PartSQ", "PartRQ", "n", "PartPQ_parts", ..., "n_p", "PartPQ_noparts", ...,
    "n_np", "per_class": {sid: {"PartPQ", "PartSQ", "PartRQ"}}}.
  """
  sums = {"": [0.0, 0.0, 0.0, 0], "_parts": [0.0, 0.0, 0.0, 0], "_noparts": [0.0, 0.0, 0.0, 0]}
  per_class = {}
  for sid in spec.sids:
    s = stats.get(sid, PartStat())
    if s.tp + s.fp + s.fn == 0:
      per_class[sid] = {"PartPQ": 0.0, "PartSQ": 0.0, "PartRQ": 0.0}
      continue
    denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
    vals = (s.iou / denom, s.iou / s.tp if s.tp else 0.0, s.tp / denom)
    per_class[sid] = dict(zip(("PartPQ", "PartSQ", "PartRQ"), vals))
    for key in ("", "_parts" if sid in spec.parts else "_noparts"):
      acc = sums[key]
      for k in range(3):
        acc[k] += vals[k]
      acc[3] += 1
  out = {}
  for key, count_name in (("", "n"), ("_parts", "n_p"), ("_noparts", "n_np")):
    pq, sq, rq, n = sums[key]
    out[f"PartPQ{key}"] = pq / n if n else 0.0
    out[f"PartSQ{key}"] = sq / n if n else 0.0
    out[f"PartRQ{key}"] = rq / n if n else 0.0
    out[count_name] = n
  out["per_class"] = per_class
  return out


def read_prediction(path: str) -> np.ndarray:
  """Reads a 3-channel part-aware panoptic prediction PNG.

  Args:
    path: the PNG.

  Returns:
    int32 [H, W, 3].

  Raises:
    ValueError: naming the file when it does not have 3 channels.
  """
  with Image.open(path) as im:
    arr = np.array(im, dtype=np.int32)  # [H, W, C]
  if arr.ndim != 3 or arr.shape[2] != 3:
    raise ValueError(f"{path}: expected a 3-channel PNG (scene id, instance id, part id), got "
                     f"shape {arr.shape}")
  return arr


def part_pq_compute(basepath_gt: str, basepath_pred: str, images_json: str,
                    spec: PartPQSpec | None = None) -> dict:
  """Computes PartPQ from files, as panoptic_parts' `eval_PartPQ.evaluate` does.

  Args:
    basepath_gt: folder with `<image id>.tif` ground truth (also looked up one folder deeper).
    basepath_pred: folder with `<image id>.png` predictions (also one folder deeper).
    images_json: JSON with `images: [{"id": ...}]` listing the evaluated images.
    spec: eval spec (default `ppq_ppp_59_57_cvpr21_default`).

  Returns:
    See `part_pq_average`.

  Raises:
    FileNotFoundError: naming the image id when a ground-truth or prediction file is missing.
    ValueError: naming the file for bad sizes or ids.
  """
  spec = spec if spec is not None else load_spec()
  with open(images_json) as f:
    images = json.load(f)["images"]
  gt_files = _index_files(basepath_gt, ".tif")
  pred_files = _index_files(basepath_pred, ".png")
  known = {str(im["id"]) for im in images}
  for name in pred_files:
    if name not in known:
      raise KeyError(f"{pred_files[name]}: prediction for image id {name}, which {images_json} "
                     f"does not list")
  stats: dict[int, PartStat] = {}
  for im in images:
    image_id = str(im["id"])
    if image_id not in gt_files:
      raise FileNotFoundError(f"no ground truth {image_id}.tif under {basepath_gt}")
    if image_id not in pred_files:
      raise FileNotFoundError(f"no prediction {image_id}.png under {basepath_pred}")
    with Image.open(gt_files[image_id]) as gim:
      gt = np.array(gim).astype(np.int64)  # [H, W]
    pred = read_prediction(pred_files[image_id])  # [H, W, 3]
    part_pq_image_stats(gt, pred, spec, f"image id {image_id} ({pred_files[image_id]})", stats)
  return part_pq_average(stats, spec)


def _index_files(folder: str, ext: str) -> dict[str, str]:
  """Maps file stem -> path for files with `ext` in `folder` and its subfolders (one level)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"folder {folder} does not exist")
  out = {}
  for root, _, files in os.walk(folder):
    if os.path.relpath(root, folder).count(os.sep) > 0:
      continue
    for name in sorted(files):
      if name.endswith(ext):
        stem = name[:-len(ext)]
        if stem in out:
          raise ValueError(f"image id {stem} has two files: {out[stem]} and "
                           f"{os.path.join(root, name)}")
        out[stem] = os.path.join(root, name)
  return out

