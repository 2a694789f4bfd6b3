"""The six native-format readers read the synthetic dataset back to the generator's ground truth."""

import numpy as np
import pytest

from data_pipelines import readers
from data_pipelines import synthetic
from data_pipelines.synthetic import scene as scene_lib
from data_pipelines.synthetic import taxonomy
from data_pipelines.synthetic import writers

SEED, SIZE, N_TRAIN, N_VAL = 5, 96, 4, 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("syn"))
  summary = synthetic.generate(out, N_TRAIN, N_VAL, SIZE, SEED)
  ids = synthetic.image_ids(N_TRAIN, N_VAL)
  scenes = {i: scene_lib.make_scene(SEED, i, SIZE) for split in ids.values() for i in split}
  return out, summary, ids, scenes


def _reader(out, fmt, split, **extra):
  kwargs = dict(synthetic.reader_kwargs(out, split)[fmt], **extra)
  return readers.build_reader(fmt, name=f"syn_{fmt}", **kwargs)


def _seg_id(image_id, e):
  return image_id * writers.IDS_PER_IMAGE + e + 1


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_panoptic(dataset, split):
  out, _, ids, scenes = dataset
  r = _reader(out, "coco_panoptic", split)
  assert len(r) == len(ids[split])
  for i, image_id in enumerate(ids[split]):
    rec, scene = r[i], scenes[image_id]
    assert rec.image_id == image_id and rec.levels == {"entity"} and rec.annotated is None
    assert rec.height == rec.width == SIZE and rec.dataset == "syn_coco_panoptic"
    assert len(rec.segments) == len(scene.entities)
    for e, (seg, ent) in enumerate(zip(rec.segments, scene.entities)):
      assert seg.id == _seg_id(image_id, e)
      assert seg.category_id == taxonomy.CATEGORY_IDS[ent.category]
      assert seg.isthing == ent.isthing and seg.area == ent.mask.sum()
      np.testing.assert_array_equal(seg.mask, ent.mask)
    assert r.meta(i).num_segments == len(scene.entities)
  assert r.summary()["dropped"] == 0 and r.summary()["void_pixels"] == 0


def test_coco_instances(dataset):
  out, _, ids, scenes = dataset
  r = _reader(out, "coco_instances", "train")
  for i, image_id in enumerate(ids["train"]):
    rec, scene = r[i], scenes[image_id]
    things = [(e, ent) for e, ent in enumerate(scene.entities) if ent.isthing]
    assert [s.id for s in rec.segments] == [_seg_id(image_id, e) for e, _ in things]
    for seg, (_, ent) in zip(rec.segments, things):
      np.testing.assert_array_equal(seg.mask, ent.mask)
      assert seg.isthing and not seg.iscrowd
  assert r.summary()["segments"] == sum(
      e.isthing for i in ids["train"] for e in scenes[i].entities)


def test_paco_parts_link_to_objects(dataset):
  out, _, ids, scenes = dataset
  r = _reader(out, "paco", "train")
  n_parts = 0
  for i, image_id in enumerate(ids["train"]):
    rec, scene = r[i], scenes[image_id]
    assert rec.levels == {"entity", "part"}
    by_id = {_seg_id(image_id, e): ent for e, ent in enumerate(scene.entities)}
    union = np.zeros((SIZE, SIZE), bool)
    for seg in rec.segments:
      np.testing.assert_array_equal(seg.mask, by_id[seg.id].mask)
      union |= seg.mask
      got = [p for p in rec.parts if p.parent_id == seg.id]
      want = by_id[seg.id].parts
      assert len(got) == len(want)
      for p, q in zip(got, want):
        np.testing.assert_array_equal(p.mask, q.mask)
        assert p.category_id == taxonomy.PART_CATEGORY_IDS[(by_id[seg.id].category, q.name)]
      n_parts += len(got)
    assert {p.parent_id for p in rec.parts} <= {s.id for s in rec.segments}
    np.testing.assert_array_equal(rec.annotated, union)
    assert set(r.meta(i).entities_with_parts) == {p.parent_id for p in rec.parts}
  assert r.summary()["parts"] == n_parts > 0


def test_pascal_panoptic_parts(dataset):
  out, _, ids, scenes = dataset
  r = _reader(out, "pascal_panoptic_parts", "val")
  void_total = 0
  for i, image_id in enumerate(ids["val"]):
    rec, scene = r[i], scenes[image_id]
    np.testing.assert_array_equal(rec.annotated, ~scene.void)
    void_total += int(scene.void.sum())
    counter = {}
    expected = {}
    for ent in scene.entities:
      sid = taxonomy.CATEGORY_IDS[ent.category]
      if ent.isthing:
        counter[sid] = counter.get(sid, 0) + 1
        eid = sid * 1000 + counter[sid]
      else:
        eid = sid
      expected[eid] = ent
    assert {s.id for s in rec.segments} == set(expected)
    for seg in rec.segments:
      ent = expected[seg.id]
      assert seg.isthing == ent.isthing and not seg.iscrowd
      np.testing.assert_array_equal(seg.mask, ent.mask & ~scene.void)
      groups = {}
      for p in ent.parts:
        groups[p.name] = groups.get(p.name, np.zeros((SIZE, SIZE), bool)) | p.mask
      got = {p.category_id: p for p in rec.parts if p.parent_id == seg.id}
      sid = seg.category_id
      assert set(got) == {sid * 100 + taxonomy.part_pid(ent.category, n) for n in groups}
      for name, mask in groups.items():
        np.testing.assert_array_equal(got[sid * 100 + taxonomy.part_pid(ent.category, name)].mask,
                                      mask)
  assert r.summary()["void_pixels"] == void_total > 0


def test_psg_relations(dataset):
  out, _, ids, scenes = dataset
  for split, psg_split in (("train", "train"), ("val", "test")):
    r = _reader(out, "psg", split)
    assert [r.meta(i).image_id for i in range(len(r))] == ids[split]
    for i, image_id in enumerate(ids[split]):
      rec, scene = r[i], scenes[image_id]
      assert rec.levels == {"entity", "relation"}
      want = [(_seg_id(image_id, x.subject), _seg_id(image_id, x.object), x.predicate)
              for x in scene.relations]
      assert [(x.subject_id, x.object_id, x.predicate_name) for x in rec.relations] == want
      assert all(taxonomy.PREDICATES[x.predicate] == x.predicate_name for x in rec.relations)
      for seg, ent in zip(rec.segments, scene.entities):
        np.testing.assert_array_equal(seg.mask, ent.mask)
  total = sum(len(scenes[i].relations) for i in ids["train"])
  assert total > 0
  assert _reader(out, "psg", "train").summary()["relations"] == total
  only_on = _reader(out, "psg", "train", keep_predicates=["on"])
  kept = sum(x.predicate == "on" for i in ids["train"] for x in scenes[i].relations)
  assert only_on.summary()["relations"] == kept
  assert only_on.summary()["relations_filtered_out"] == total - kept


def test_refcoco_expressions(dataset):
  out, _, ids, scenes = dataset
  for split in ("train", "val"):
    r = _reader(out, "refcoco", split)
    with_refs = [i for i in ids[split] if scenes[i].expressions]
    assert [r.meta(k).image_id for k in range(len(r))] == with_refs
    for k, image_id in enumerate(with_refs):
      rec, scene = r[k], scenes[image_id]
      want = [(_seg_id(image_id, x.target), s) for x in scene.expressions for s in x.sentences]
      assert [(x.target_id, x.sentence) for x in rec.expressions] == want
      for x in rec.expressions:
        target = rec.segment(x.target_id)
        ent = scene.entities[x.target_id - image_id * writers.IDS_PER_IMAGE - 1]
        assert target.isthing and target.category_id == taxonomy.CATEGORY_IDS[ent.category]
        np.testing.assert_array_equal(target.mask, ent.mask)
        assert ent.category in x.sentence


def test_index_and_format_errors(dataset):
  out = dataset[0]
  r = _reader(out, "coco_panoptic", "val")
  with pytest.raises(IndexError, match="out of range"):
    r[len(r)]
  with pytest.raises(ValueError, match="unknown dataset format 'voc'"):
    readers.build_reader("voc", name="x")
  text = r.format_summary()
  assert text.startswith("syn_coco_panoptic (coco_panoptic)") and "dropped: 0" in text
