"""Writes the committed reference inputs under tests/reference/data/ (deterministic).

  python tests/reference/make_inputs.py

* pq_coco/: predictions derived from the real COCO panoptic fixture
  (../shared/fixtures/coco_panoptic_sample): one segment dropped, two merged, one shifted, one
  relabelled, one false positive added;
* pq_synth/: three small images with crowd and VOID regions, true positives, false positives
  (counted and ignored), misses and a class confusion;
* partpq/: five Pascal-Panoptic-Parts-style ground truths (.tif uids) and 3-channel predictions;
* psg/: a psg.json with panoptic PNGs and an OpenPSG-style submission.
The reference numbers for them come from tests/reference/compute_reference_numbers.py.
"""

import json
import os

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
FIXTURE = os.path.join(HERE, "..", "..", "..", "shared", "fixtures", "coco_panoptic_sample")


def _id2rgb(ids):
  ids = np.asarray(ids, np.int64)
  return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def _rgb2id(rgb):
  rgb = rgb.astype(np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _save_ids(path, ids):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(_id2rgb(ids)).save(path)


def _dump(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=1)


def make_pq_coco():
  """Perturbed predictions of the COCO fixture."""
  with open(os.path.join(FIXTURE, "panoptic_examples.json")) as f:
    gt = json.load(f)
  out_dir = os.path.join(DATA, "pq_coco")
  annotations = []
  for k, ann in enumerate(gt["annotations"]):
    ids = _rgb2id(np.array(Image.open(os.path.join(FIXTURE, "panoptic_examples",
                                                   ann["file_name"]))))
    segs = {s["id"]: dict(category_id=s["category_id"]) for s in ann["segments_info"]
            if s["iscrowd"] == 0}
    order = sorted(segs, key=lambda i: -np.count_nonzero(ids == i))
    pred = np.where(np.isin(ids, list(segs)), ids, 0)
    if k == 0:
      dropped = order[3]
      pred[pred == dropped] = 0
      del segs[dropped]
      a, b = order[1], order[4]
      pred[pred == b] = a
      del segs[b]
      shifted = order[5]
      m = pred == shifted
      pred[m] = 0
      pred[np.roll(m, 9, axis=1)] = shifted
      segs[order[2]]["category_id"] = 1 if segs[order[2]]["category_id"] != 1 else 2
    else:
      fp_id = 999999
      pred[20:60, 30:110] = fp_id
      segs[fp_id] = dict(category_id=3)
      relabel = order[0]
      segs[relabel]["category_id"] = [c["id"] for c in gt["categories"]
                                      if c["id"] != segs[relabel]["category_id"]][7]
      shifted = order[6]
      m = pred == shifted
      pred[m] = 0
      pred[np.roll(m, 3, axis=0)] = shifted
    present = set(np.unique(pred).tolist())
    infos = [dict(id=i, category_id=s["category_id"]) for i, s in segs.items() if i in present]
    _save_ids(os.path.join(out_dir, "pred", ann["file_name"]), pred)
    annotations.append(dict(image_id=ann["image_id"], file_name=ann["file_name"],
                            segments_info=infos))
  _dump(os.path.join(out_dir, "pred.json"), dict(annotations=annotations))


def make_pq_synth():
  """Small panoptic set with crowd and VOID."""
  out_dir = os.path.join(DATA, "pq_synth")
  categories = [dict(id=1, name="person", isthing=1), dict(id=2, name="car", isthing=1),
                dict(id=3, name="sky", isthing=0), dict(id=4, name="road", isthing=0),
                dict(id=5, name="tree", isthing=0)]
  gt_anns, pred_anns, images = [], [], []
  for k in range(3):
    h, w = 48, 64
    gt = np.zeros([h, w], np.int64)
    gt[:16] = 30
    gt[32:] = 40
    gt[18:30, 2:14] = 11
    gt[20:32, 20:30] = 12
    gt[30:44, 40:60] = 21
    gt[16:20, 40:64] = 0
    gt_info = [dict(id=30, category_id=3, iscrowd=0), dict(id=40, category_id=4, iscrowd=0),
               dict(id=11, category_id=1, iscrowd=0), dict(id=12, category_id=1, iscrowd=0),
               dict(id=21, category_id=2, iscrowd=0)]
    if k >= 1:
      gt[2:12, 44:62] = 13
      gt_info.append(dict(id=13, category_id=1, iscrowd=1))
    if k == 2:
      gt[36:46, 2:12] = 14
      gt_info.append(dict(id=14, category_id=1, iscrowd=0))
    for s in gt_info:
      s["area"] = int(np.count_nonzero(gt == s["id"]))
      ys, xs = np.nonzero(gt == s["id"])
      s["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                   int(ys.max() - ys.min() + 1)]
    pred = np.zeros([h, w], np.int64)
    pred[:17] = 3
    pred[31:] = 4
    pred[19:31, 3:14] = 101
    pred[20:30, 21 + 3 * k:31] = 102
    pred[29:44, 41:60] = 201
    pred[16:20, 44:62] = 103
    pred_info = [dict(id=3, category_id=3), dict(id=4, category_id=4 if k != 1 else 5),
                 dict(id=101, category_id=1), dict(id=102, category_id=1 if k != 2 else 2),
                 dict(id=201, category_id=2), dict(id=103, category_id=1)]
    if k >= 1:
      pred[3:11, 45:60] = 104
      pred_info.append(dict(id=104, category_id=1))
    pred[40:46, 50:62] = 202
    pred_info.append(dict(id=202, category_id=2))
    name = f"{k:06d}.png"
    _save_ids(os.path.join(out_dir, "gt", name), gt)
    _save_ids(os.path.join(out_dir, "pred", name), pred)
    images.append(dict(id=k + 1, file_name=f"{k:06d}.jpg", height=h, width=w))
    gt_anns.append(dict(image_id=k + 1, file_name=name, segments_info=gt_info))
    present = set(np.unique(pred).tolist())
    pred_anns.append(dict(image_id=k + 1, file_name=name,
                          segments_info=[s for s in pred_info if s["id"] in present]))
  _dump(os.path.join(out_dir, "gt.json"),
        dict(images=images, annotations=gt_anns, categories=categories))
  _dump(os.path.join(out_dir, "pred.json"), dict(annotations=pred_anns))


def _uid(sid, iid=None, pid=None):
  if iid is None:
    return sid
  if pid is None:
    return sid * 1000 + iid
  return sid * 100000 + iid * 100 + pid


def make_partpq():
  """Pascal-Panoptic-Parts style ground truth and predictions."""
  out_dir = os.path.join(DATA, "partpq")
  names = []
  for n in range(5):
    k = n % 3
    h, w = 48, 64
    gt = np.full([h, w], _uid(84), np.int64)
    gt[30:] = _uid(95)
    gt[40:, :10] = 0
    gt[36:40, 50:64] = _uid(22)
    gt[10:20, 4:16] = _uid(15, 1, 1)
    gt[20:34, 4:16] = _uid(15, 1, 11)
    gt[34:44, 4:10] = _uid(15, 1, 19)
    gt[34:44, 10:16] = _uid(15, 1, 20)
    gt[12:20, 20:28] = _uid(15, 2, 1)
    gt[20:30, 20:28] = _uid(15, 2, 13)
    gt[22:28, 22:26] = _uid(15, 2)
    gt[24:40, 32:52] = _uid(7, 1, 2)
    gt[34:40, 34:40] = _uid(7, 1, 21)
    gt[34:40, 44:50] = _uid(7, 1, 22)
    gt[26:30, 36:48] = _uid(7, 1, 41)
    if k >= 1:
      gt[2:10, 40:60] = _uid(15)
      gt[12:20, 52:62] = _uid(9, 1)
    if k == 2:
      gt[4:12, 20:30] = _uid(7, 2)
      gt[42:47, 20:30] = _uid(4, 3)
    pred = np.zeros([h, w, 3], np.int64)
    pred[..., 0] = 84
    pred[31:, :, 0] = 95
    pred[10:44, 4:16] = (15, 1, 0)
    pred[10:20, 4:16, 2] = 1
    pred[20:35, 4:16, 2] = 2
    pred[35:44, 4:10, 2] = 5
    pred[35:44, 10:16, 2] = 6 if k != 1 else 255
    pred[12:30, 20:28 - k - n // 3] = (15, 2, 3)
    pred[12:19 + n // 3, 20:28 - k, 2] = 1
    pred[24:40, 32:52] = (7, 1, 5)
    pred[34:40, 34:40, 2] = 2
    pred[34:40, 44:50, 2] = 2 if k != 2 else 0
    pred[26:30, 36:48, 2] = 1
    if k >= 1:
      pred[3:10, 42:58] = (15, 5, 1)
      pred[40:47, 54:64] = (9, 2, 0)
    if n == 3:
      pred[12:30, 20:28] = (95, 0, 0)
    if n == 4:
      pred[12:20, 51:62] = (9, 4, 0)
    if k == 2:
      pred[4:12, 20:30] = (7, 3, 5)
      pred[14:22, 40:50] = (12, 1, 1)
    name = f"2008_{n:06d}"
    names.append(name)
    os.makedirs(os.path.join(out_dir, "gt"), exist_ok=True)
    Image.fromarray(gt.astype(np.int32)).save(os.path.join(out_dir, "gt", name + ".tif"))
    os.makedirs(os.path.join(out_dir, "pred"), exist_ok=True)
    Image.fromarray(pred.astype(np.uint8)).save(os.path.join(out_dir, "pred", name + ".png"))
  _dump(os.path.join(out_dir, "images.json"), dict(images=[dict(id=n) for n in names]))


def make_psg():
  """COCO-PSG style ground truth and an OpenPSG-style submission."""
  out_dir = os.path.join(DATA, "psg")
  rng = np.random.default_rng(7)
  data, entries = [], []
  for k in range(5):
    h, w = 40, 48
    seg = np.zeros([h, w], np.int64)
    boxes = [(0, 0, 12, 48), (28, 0, 40, 48), (12, 2, 26, 12), (12, 14, 26, 24),
             (12, 26, 22, 34), (14, 36, 26, 46)]
    infos = []
    for i, (y0, x0, y1, x1) in enumerate(boxes):
      seg[y0:y1, x0:x1] = 10 + i
      infos.append(dict(id=10 + i, category_id=[4, 5, 0, 1, 2, 3][i], iscrowd=0,
                        isthing=int(i >= 2), area=int((y1 - y0) * (x1 - x0))))
    rels = [[2, 1, 0], [3, 1, 0], [4, 3, 1], [5, 1, 2], [2, 3, 3], [3, 1, 0], [4, 0, 4]]
    rels = rels[:3 + k] if k != 4 else []
    name = f"{k:04d}.png"
    _save_ids(os.path.join(out_dir, "gt", name), seg)
    data.append(dict(image_id=100 + k, file_name=f"{k:04d}.jpg", height=h, width=w,
                     pan_seg_file_name=name, segments_info=infos, relations=rels,
                     annotations=[dict(bbox=[0, 0, 1, 1], category_id=s["category_id"])
                                  for s in infos]))
    if k == 4:
      continue
    pseg = seg.copy()
    pseg[12:26, 24 - 2 * k:24] = 0
    if k == 3:
      pseg[12:22, 26:34] = 12
    pinfos = [dict(id=s["id"], category_id=s["category_id"] + 1) for s in infos]
    if k == 2:
      pinfos[4]["category_id"] = 1
    cands = [[s, o, p] for s in range(6) for o in range(6) if s != o for p in (1, 2, 3, 4, 5)]
    order = rng.permutation(len(cands))
    ranked = [cands[i] for i in order[:90]]
    boost = [[r[0], r[1], r[2] + 1] for r in rels]
    ranked = boost[:2] + ranked[:25] + boost[2:] + ranked[25:]
    if k == 1:
      ranked = ranked[:10]
    _save_ids(os.path.join(out_dir, "submission", "panseg", name), pseg)
    entries.append(dict(image_id=100 + k, relations=ranked, segments_info=pinfos,
                        pan_seg_file_name=name))
  data.append(dict(image_id=999, file_name="x.jpg", height=40, width=48,
                   pan_seg_file_name="0000.png", segments_info=data[0]["segments_info"],
                   relations=[[0, 1, 0]], annotations=data[0]["annotations"]))
  _dump(os.path.join(out_dir, "psg.json"),
        dict(data=data, test_image_ids=[100, 101, 102, 103, 104],
             thing_classes=["person", "car", "dog", "chair"], stuff_classes=["sky", "road"],
             predicate_classes=["on", "next to", "holding", "riding", "leaning on"]))
  _dump(os.path.join(out_dir, "submission", "relation.json"), entries)


if __name__ == "__main__":
  make_pq_coco()
  make_pq_synth()
  make_partpq()
  make_psg()
  print("wrote", DATA)
