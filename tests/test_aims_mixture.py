"""Tests for data_pipelines.aims_mixture: the Table 6 data, eligibility and per-type targets."""

import dataclasses

import numpy as np
import pytest

import toy_records
from data_pipelines import aims_mixture
from data_pipelines import records
from data_pipelines import transforms

CANVAS = 64
ALL_LEVELS = frozenset({"entity", "part", "relation"})


def _settings(**kw):
  base = dict(canvas=CANVAS, max_instances={"part": 5, "entity": 4, "relation": 4},
              scale_range=(0.75, 1.25), flip_prob=0.5, class_agnostic=True, strict=False,
              mask_stride=4)
  base.update(kw)
  return aims_mixture.SampleSettings(**base)


@pytest.fixture(name="record")
def _record(tmp_path):
  return toy_records.make_record(str(tmp_path), 5, "ppp", ALL_LEVELS, seed=3)


def _canvas(record, ids):
  """Eval-geometry canvas masks of the given segment ids, as the sample builder makes them."""
  geom = transforms.eval_geometry(record.height, record.width, CANVAS)
  return transforms.warp_masks([record.segment(i).mask for i in ids], geom)


def test_table_is_aims_table_6():
  four = ("coco", "entityseg", "ppp", "psg")
  five = four + ("paco",)
  expected = [
      (1, "full", "entity", "entity", four), (2, "full", "part", "part", four),
      (3, "full", "relation", "relation", four), (4, "partial", "entity", "entity", five),
      (5, "partial", "part", "part", five), (6, "partial", "relation", "relation", five),
      (7, "one_entity", "part", "part", ("ppp", "paco")),
      (8, "two_entities", "relation", "entity", ("psg",)),
  ]
  got = [(t.id, t.prompt, t.decoder, t.target_level, t.datasets)
         for t in aims_mixture.SAMPLE_TYPES]
  assert got == expected
  assert aims_mixture.sample_type(7).prompt == "one_entity"
  with pytest.raises(ValueError, match="1..8"):
    aims_mixture.sample_type(9)


def test_eligibility_follows_the_table_and_the_annotations(tmp_path):
  sources = toy_records.make_sources(str(tmp_path), per_dataset=1)
  eligible = {name: [t.id for t in aims_mixture.SAMPLE_TYPES
                     if aims_mixture.is_eligible(t, name, src.meta(0))]
              for name, src in sources.items()}
  assert eligible == {
      "coco": [1, 4], "entityseg": [1, 4], "ppp": [1, 2, 4, 5, 7], "psg": [1, 3, 4, 6, 8],
      "paco": [4, 5, 7]}
  empty = records.RecordMeta(image_id=1, levels=ALL_LEVELS, num_segments=0)
  assert not any(aims_mixture.is_eligible(t, "ppp", empty) for t in aims_mixture.SAMPLE_TYPES)
  pools = aims_mixture.eligible_indices(sources, range(1, 9))
  assert sorted(pools[7]) == ["paco", "ppp"] and list(pools[8]) == ["psg"]
  with pytest.raises(ValueError, match=r"datasets \['refcoco'\] are in no AIMS sample type"):
    aims_mixture.eligible_indices({"refcoco": sources["coco"]}, [1])
  with pytest.raises(ValueError, match="type 8 .* no eligible image"):
    aims_mixture.eligible_indices({"coco": sources["coco"]}, [1, 8])


def test_full_image_targets_and_associations(record):
  out = aims_mixture.build_sample(record, aims_mixture.sample_type(3), _settings(), None)
  assert out["task"] == 3
  np.testing.assert_array_equal(out["prompt/mask"], out["valid"])
  np.testing.assert_array_equal(out["prompt/region"], out["valid"])
  assert out["entity/valid"].tolist() == [True, True, True, False]
  assert out["part/valid"].tolist() == [True, True, True, False, False]
  # box-ground and disc-box (the box-disc duplicate pair is merged, class-agnostic).
  assert out["relation/valid"].tolist() == [True, True, False, False]
  assert (out["entity/labels"] == -1).all() and (out["relation/labels"] == -1).all()
  ent = _canvas(record, [toy_records.BOX, toy_records.DISC, toy_records.GROUND])
  np.testing.assert_array_equal(out["entity/masks"][:3], transforms.downsample_masks(ent, 4))
  np.testing.assert_array_equal(out["relation/masks"][:2],
                                transforms.downsample_masks(np.stack([ent[0] | ent[2],
                                                                      ent[1] | ent[0]]), 4))
  np.testing.assert_allclose(out["relation/boxes"][0],
                             transforms.masks_to_boxes((ent[0] | ent[2])[None])[0])
  # Parts: box top, box bottom -> box (row 0); disc core -> disc (row 1).
  np.testing.assert_array_equal(out["assoc/ep"][:3, :3], [[1, 1, 0], [0, 0, 1], [0, 0, 0]])
  assert not out["assoc/ep"][:, 3:].any() and not out["assoc/ep"][3:].any()
  np.testing.assert_array_equal(out["assoc/re"][:2, :3], [[1, 0, 1], [1, 1, 0]])
  assert out["assoc/ep_valid"] and out["assoc/re_valid"]


def test_class_aware_keeps_each_triplet_and_category_ids(record):
  out = aims_mixture.build_sample(record, aims_mixture.sample_type(3),
                                  _settings(class_agnostic=False), None)
  assert out["relation/labels"].tolist() == [0, 1, 1, -1]
  assert out["entity/labels"].tolist() == [5, 6, 7, -1]
  assert out["part/labels"].tolist() == [50, 51, 60, -1, -1]


def test_one_entity_prompt_selects_that_entity_and_its_parts(record):
  seen = set()
  for seed in range(12):
    out = aims_mixture.build_sample(record, aims_mixture.sample_type(7), _settings(),
                                    np.random.default_rng(seed))
    assert out["entity/valid"].sum() == 1 and out["relation/valid"].sum() == 0
    np.testing.assert_array_equal(out["prompt/region"], out["prompt/mask"])
    prompt_q = transforms.downsample_masks(out["prompt/mask"][None], 4)[0]
    np.testing.assert_array_equal(out["entity/masks"][0], prompt_q)
    n_parts = int(out["part/valid"].sum())
    seen.add(n_parts)
    assert out["assoc/ep"][0, :n_parts].all() and not out["assoc/ep"][:, n_parts:].any()
    for p in range(n_parts):  # every part lies inside the prompt
      assert not (out["part/masks"][p] & ~prompt_q).any()
  assert seen == {1, 2}  # both the disc (1 part) and the box (2 parts) were drawn


def test_two_entity_prompt_targets_the_related_pair(record):
  for seed in range(6):
    out = aims_mixture.build_sample(record, aims_mixture.sample_type(8), _settings(),
                                    np.random.default_rng(seed))
    st = aims_mixture.sample_type(8)
    assert (st.decoder, st.target_level) == ("relation", "entity")
    assert out["entity/valid"].sum() == 2 and out["relation/valid"].sum() == 1
    # The relation mask is the canvas union (= the prompt) at 1/4; it covers both entities.
    prompt_q = transforms.downsample_masks(out["prompt/mask"][None], 4)[0]
    np.testing.assert_array_equal(out["relation/masks"][0], prompt_q)
    assert not ((out["entity/masks"][0] | out["entity/masks"][1]) & ~prompt_q).any()
    np.testing.assert_array_equal(out["prompt/region"], out["prompt/mask"])
    np.testing.assert_array_equal(out["assoc/re"][0, :2], [True, True])


def test_partial_prompt_is_the_levels_annotated_area(record):
  geom = transforms.eval_geometry(record.height, record.width, CANVAS)
  ent = transforms.warp_masks([s.mask for s in record.segments], geom)  # box, disc, ground
  part_area = aims_mixture.build_sample(record, aims_mixture.sample_type(5), _settings(), None)
  np.testing.assert_array_equal(part_area["prompt/mask"], ent[0] | ent[1])
  assert part_area["entity/valid"].sum() == 2 and part_area["part/valid"].sum() == 3
  entity_area = aims_mixture.build_sample(record, aims_mixture.sample_type(4), _settings(), None)
  np.testing.assert_array_equal(entity_area["prompt/region"], ent.any(0))
  assert entity_area["task"] == 4


def test_full_region_excludes_void_and_crowd(tmp_path):
  rec = toy_records.make_record(str(tmp_path), 9, "ppp", ALL_LEVELS, seed=1,
                                annotated_fraction=0.5)
  crowd_mask = np.zeros_like(rec.annotated)
  crowd_mask[-4:, :8] = True
  crowd = records.Segment(id=99, category_id=1, isthing=True, mask=crowd_mask,
                          bbox=(0, 44, 8, 4), iscrowd=True, area=32)
  rec = dataclasses.replace(rec, segments=rec.segments + [crowd])
  out = aims_mixture.build_sample(rec, aims_mixture.sample_type(1), _settings(), None)
  geom = transforms.eval_geometry(rec.height, rec.width, CANVAS)
  annotated, crowd_c = transforms.warp_masks([rec.annotated, crowd_mask], geom)
  np.testing.assert_array_equal(out["prompt/region"], out["valid"] & annotated & ~crowd_c)
  assert out["entity/valid"].sum() == 3  # the crowd region is no target


def test_cropped_instances_drop_with_their_associations(record):
  dropped = 0
  for seed in range(30):
    out = aims_mixture.build_sample(record, aims_mixture.sample_type(2),
                                    _settings(scale_range=(2.5, 3.0)),
                                    np.random.default_rng(seed))
    ev, pv = out["entity/valid"], out["part/valid"]
    dropped += ev.sum() < 3
    # Associations only between valid slots; a valid part is linked to at most one entity, and
    # only when its parent survived (the part then lies inside it).
    assert not out["assoc/ep"][~ev].any() and not out["assoc/ep"][:, ~pv].any()
    assert (out["assoc/ep"].sum(0) <= 1).all()
    for e, p in zip(*np.nonzero(out["assoc/ep"])):
      assert (out["part/masks"][p] & out["entity/masks"][e]).any()
    assert not out["entity/masks"][~ev].any() and (out["entity/masks"][ev].any(axis=(1, 2))).all()
  assert dropped > 0


def test_truncation_keeps_the_largest_counts_or_raises(record):
  small = {"part": 1, "entity": 2, "relation": 1}
  out = aims_mixture.build_sample(record, aims_mixture.sample_type(1),
                                  _settings(max_instances=small), None)
  ent = _canvas(record, [toy_records.BOX, toy_records.DISC, toy_records.GROUND])
  areas = ent.sum(axis=(1, 2))
  keep = sorted(np.argsort(-areas)[:2])
  np.testing.assert_array_equal(out["entity/masks"], transforms.downsample_masks(ent[keep], 4))
  assert out["stats/truncated"].tolist() == [2, 1, 1]
  assert out["assoc/ep"].shape == (2, 1) and out["assoc/re"].shape == (1, 2)
  with pytest.raises(ValueError, match=r"ppp: image 5 .* 3 part instances exceed max 1"):
    aims_mixture.build_sample(record, aims_mixture.sample_type(1),
                              _settings(max_instances=small, strict=True), None)


@pytest.mark.parametrize("stride", [1, 2])
def test_mask_stride_sets_the_target_resolution(record, stride):
  out = aims_mixture.build_sample(record, aims_mixture.sample_type(3), _settings(
      mask_stride=stride), None)
  ent = _canvas(record, [toy_records.BOX, toy_records.DISC, toy_records.GROUND])
  np.testing.assert_array_equal(out["entity/masks"][:3], transforms.downsample_masks(ent, stride))
  for level in ("part", "entity", "relation"):
    assert out[f"{level}/masks"].shape[1:] == (CANVAS // stride, CANVAS // stride), level
  with pytest.raises(ValueError, match="mask_stride must be 1, 2 or 4, got 3"):
    _settings(mask_stride=3)


@pytest.mark.parametrize("stride", [1, 4])
def test_padding_sample_matches_build_sample_layout(record, stride):
  settings = _settings(mask_stride=stride)
  real = aims_mixture.build_sample(record, aims_mixture.EVAL_TYPE, settings, None)
  pad = aims_mixture.padding_sample(settings)
  assert sorted(real) == sorted(pad)
  for k in real:
    assert (np.shape(real[k]), np.asarray(real[k]).dtype) == (
        np.shape(pad[k]), np.asarray(pad[k]).dtype), k
  assert real["task"] == aims_mixture.EVAL_TASK


def test_ineligible_record_raises_naming_the_image(tmp_path):
  rec = toy_records.make_record(str(tmp_path), 4, "coco", frozenset({"entity"}), seed=0)
  with pytest.raises(ValueError, match=r"coco: image 4 .* needs an entity with parts"):
    aims_mixture.build_sample(rec, aims_mixture.sample_type(7), _settings(),
                              np.random.default_rng(0))
