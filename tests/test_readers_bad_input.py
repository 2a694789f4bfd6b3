"""Bad input raises errors naming the file and id; legitimate oddities are handled and counted."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import tifffile
from pycocotools import mask as coco_mask

from data_pipelines import mask_codec
from data_pipelines import readers
from data_pipelines import safe_pickle
from data_pipelines import synthetic


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("syn_src"))
  synthetic.generate(out, 3, 1, 96, seed=2)
  return out


@pytest.fixture
def syn(source, tmp_path):
  out = str(tmp_path / "syn")
  shutil.copytree(source, out)
  return out


def _build(out, fmt, **overrides):
  kwargs = dict(synthetic.reader_kwargs(out, "train")[fmt], **overrides)
  return readers.build_reader(fmt, name="bad", **kwargs)


def _edit_json(path, fn):
  with open(path) as f:
    data = json.load(f)
  fn(data)
  with open(path, "w") as f:
    json.dump(data, f)


def test_missing_annotation_file(syn):
  path = os.path.join(syn, "panoptic", "panoptic_train.json")
  os.remove(path)
  with pytest.raises(FileNotFoundError, match="panoptic_train.json"):
    _build(syn, "coco_panoptic")
  os.remove(os.path.join(syn, "refcoco", "refs(unc).p"))
  with pytest.raises(FileNotFoundError, match=r"refs\(unc\).p"):
    _build(syn, "refcoco")


def test_missing_image_names_file_and_image_id(syn):
  os.remove(os.path.join(syn, "images", "train", "000000000002.png"))
  for fmt in ("coco_panoptic", "coco_instances", "paco", "psg"):
    r = _build(syn, fmt)
    r[0]
    with pytest.raises(FileNotFoundError, match=r"image 2\b.*000000000002.png"):
      r[1]
  with pytest.raises(FileNotFoundError, match="000000000002.png"):
    _build(syn, "pascal_panoptic_parts")[1]


def test_corrupt_image_names_file(syn):
  with open(os.path.join(syn, "images", "train", "000000000003.png"), "wb") as f:
    f.write(b"this is not a png")
  r = _build(syn, "coco_instances")
  with pytest.raises(ValueError, match=r"image 3\b.*corrupt.*000000000003.png"):
    r[2]


def test_png_id_without_segments_info(syn):
  path = os.path.join(syn, "panoptic", "panoptic_train.json")
  _edit_json(path, lambda d: d["annotations"][0]["segments_info"].pop(1))
  with pytest.raises(ValueError, match="contains id 102 with no segments_info entry"):
    _build(syn, "coco_panoptic")[0]


def test_segment_without_pixels(syn):
  path = os.path.join(syn, "panoptic", "panoptic_train.json")
  _edit_json(path, lambda d: d["annotations"][0]["segments_info"].append(
      {"id": 199, "category_id": 1, "iscrowd": 0, "area": 5, "bbox": [0, 0, 1, 1]}))
  with pytest.raises(ValueError, match="segment 199 of segments_info has no pixels"):
    _build(syn, "coco_panoptic")[0]


def test_rle_size_mismatch_names_annotation(syn):
  path = os.path.join(syn, "paco", "paco_train.json")
  with open(path) as f:
    ann_id = json.load(f)["annotations"][0]["id"]

  def shrink(d):
    d["annotations"][0]["segmentation"]["size"] = [48, 96]
  _edit_json(path, shrink)
  with pytest.raises(ValueError, match=rf"annotation {ann_id} .*RLE size \[48, 96\] differs"):
    _build(syn, "paco")[0]


def test_part_with_unknown_object(syn):
  path = os.path.join(syn, "paco", "paco_train.json")
  holder = {}

  def orphan(d):
    part = next(a for a in d["annotations"] if a["obj_ann_id"] != a["id"])
    part["obj_ann_id"] = 987654
    holder["id"] = part["id"]
  _edit_json(path, orphan)
  with pytest.raises(ValueError, match=rf"part annotation {holder['id']} has obj_ann_id 987654"):
    _build(syn, "paco")


def test_relation_index_out_of_range(syn):
  path = os.path.join(syn, "psg", "psg.json")
  _edit_json(path, lambda d: d["data"][1]["relations"].append([0, 40, 0]))
  with pytest.raises(ValueError, match=r"image 2: relation \d+ \[0, 40, 0\] indexes segments_info"):
    _build(syn, "psg")
  _edit_json(path, lambda d: d["data"][1]["relations"].__setitem__(-1, [0, 1, 17]))
  with pytest.raises(ValueError, match=r"image 2: relation \d+ .*predicate index 17"):
    _build(syn, "psg")


def test_ref_with_unknown_annotation(syn):
  path = os.path.join(syn, "refcoco", "refs(unc).p")
  with open(path, "rb") as f:
    refs = pickle.load(f)
  refs[0]["ann_id"] = 555555
  with open(path, "wb") as f:
    pickle.dump(refs, f, protocol=2)
  with pytest.raises(ValueError, match=f"ref {refs[0]['ref_id']} names annotation 555555"):
    _build(syn, "refcoco")


def test_empty_dataset(syn, tmp_path):
  path = os.path.join(syn, "instances", "instances_train.json")
  _edit_json(path, lambda d: (d.__setitem__("images", []), d.__setitem__("annotations", [])))
  with pytest.raises(ValueError, match="instances_train.json: the dataset has no images"):
    _build(syn, "coco_instances")
  empty = tmp_path / "labels" / "training"
  empty.mkdir(parents=True)
  with pytest.raises(ValueError, match="no .tif label files"):
    readers.build_reader("pascal_panoptic_parts", name="bad", labels_root=str(tmp_path / "labels"),
                         image_root=str(tmp_path), split="training")
  with pytest.raises(ValueError, match=r"split 'testA'.*splits present: \['train', 'val'\]"):
    _build(syn, "refcoco", split="testA")


def test_malicious_pickle_is_refused(tmp_path):
  marker = tmp_path / "pwned"

  class Exploit:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))
  path = tmp_path / "refs(unc).p"
  with open(path, "wb") as f:
    pickle.dump([{"ref_id": 1, "payload": Exploit()}], f, protocol=2)
  with pytest.raises(pickle.UnpicklingError, match=r"refs\(unc\).p: refusing to load global"):
    safe_pickle.load_pickle(str(path))
  assert not marker.exists()
  plain = {"a": [1, 2.5, "x", None, True], "b": (b"raw", {3, 4}), "c": frozenset({"y"})}
  with open(path, "wb") as f:
    pickle.dump(plain, f, protocol=2)
  assert safe_pickle.load_pickle(str(path)) == plain
  with open(path, "wb") as f:
    f.write(b"\x80\x02]q")
  with pytest.raises(pickle.UnpicklingError, match="not a readable pickle"):
    safe_pickle.load_pickle(str(path))


def test_legitimate_oddities_are_counted(syn):
  def add_empty_image_and_crowd(d):
    d["images"].append({"id": 77, "file_name": "000000000001.png", "height": 96, "width": 96})
    ann = d["annotations"][0]
    mask = mask_codec.decode_segmentation(ann["segmentation"], 96, 96, "test")
    ann["segmentation"] = mask_codec.encode_uncompressed_rle(mask)
    ann["iscrowd"] = 1
  _edit_json(os.path.join(syn, "instances", "instances_train.json"), add_empty_image_and_crowd)
  r = _build(syn, "coco_instances")
  s = r.summary()
  assert s["images"] == 4 and s["images_without_annotations"] == 1 and s["crowd_regions"] == 1
  assert s["dropped"] == 0
  assert r[3].segments == [] and r[0].segments[0].iscrowd
  assert "images without annotations: 1" in r.format_summary()


def test_uncompressed_rle_matches_pycocotools():
  rng = np.random.default_rng(0)
  mask = rng.random((7, 5)) < 0.4
  mask[0, 0] = True
  rle = mask_codec.encode_uncompressed_rle(mask)
  ref = coco_mask.decode(coco_mask.frPyObjects(rle, 7, 5)).astype(bool)
  np.testing.assert_array_equal(ref, mask)
  np.testing.assert_array_equal(mask_codec.decode_segmentation(rle, 7, 5, "t"), mask)
  with pytest.raises(ValueError, match="counts sum to"):
    mask_codec.decode_segmentation({"size": [7, 5], "counts": [3, 4]}, 7, 5, "t")


def test_decode_uids_follows_panoptic_parts_rules():
  # Examples from panoptic_parts.utils.format.decode_uids' documentation; 2401000 is the docs'
  # "void parts pixels of instance 10" (pid 0 kept).
  uids = np.array([1, 12, 1234, 12345, 123456, 1234567, 23, 23003, 2300304, 2401000, 0])
  sids, iids, pids = mask_codec.decode_uids(uids, "t")
  assert sids.tolist() == [1, 12, 1, 12, 1, 12, 23, 23, 23, 24, 0]
  assert iids.tolist() == [-1, -1, 234, 345, 234, 345, -1, 3, 3, 10, -1]
  assert pids.tolist() == [-1, -1, -1, -1, 56, 67, -1, -1, 4, 0, -1]
  np.testing.assert_array_equal(mask_codec.encode_uids(sids, iids, pids), uids)
  with pytest.raises(ValueError, match="label.tif: invalid Pascal-Panoptic-Parts uid 123"):
    mask_codec.decode_uids(np.array([5, 123]), "label.tif")


def test_ppp_thing_without_instance_is_crowd(syn):
  path = os.path.join(syn, "ppp", "labels", "training", "000000000001.tif")
  uids = tifffile.imread(path)
  uids[:4, :4] = 7  # sid 7 (a thing class here) labelled on the semantic level only
  tifffile.imwrite(path, uids)
  r = _build(syn, "pascal_panoptic_parts")
  crowd = [s for s in r[0].segments if s.iscrowd]
  assert len(crowd) == 1 and crowd[0].id == 7 and crowd[0].isthing and crowd[0].area >= 16
  assert r.summary()["crowd_regions"] == 1
