"""Tests for data_pipelines.pipeline: determinism, resumable state, mixture, shapes, sharding."""

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

import toy_records
from data_pipelines import aims_mixture
from data_pipelines import pipeline
from data_pipelines import readers
from data_pipelines import synthetic
from hiseg_jax.aims import spec as aims_spec

S, B = 64, 8
MAX = {"part": 4, "entity": 4, "relation": 3}


def _config(**overrides):
  values = dict(
      image_size=S, batch_size=B, eval_batch_size=4, scale_range=(0.5, 1.5), flip_prob=0.5,
      max_parts=MAX["part"], max_entities=MAX["entity"], max_relations=MAX["relation"],
      class_agnostic=True, strict_maxima=False, mask_stride=4, sample_types=tuple(range(1, 9)),
      seed=0, num_workers=0)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


@pytest.fixture(name="sources", scope="module")
def _sources(tmp_path_factory):
  return toy_records.make_sources(str(tmp_path_factory.mktemp("toy")), per_dataset=3)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _contract(batch_size, n_p, n_e, n_r):
  q = S // 4
  spec = {
      "image": ((batch_size, S, S, 3), np.uint8), "valid": ((batch_size, S, S), np.bool_),
      "prompt/mask": ((batch_size, S, S), np.bool_),
      "prompt/region": ((batch_size, S, S), np.bool_),
      "task": ((batch_size,), np.int32), "image_id": ((batch_size,), np.int32),
      "dataset": ((batch_size,), np.int32), "orig_size": ((batch_size, 2), np.int32),
      "assoc/ep": ((batch_size, n_e, n_p), np.bool_),
      "assoc/re": ((batch_size, n_r, n_e), np.bool_),
      "assoc/ep_valid": ((batch_size,), np.bool_), "assoc/re_valid": ((batch_size,), np.bool_),
      "stats/truncated": ((batch_size, 3), np.int32),
  }
  for level, n in (("part", n_p), ("entity", n_e), ("relation", n_r)):
    spec[f"{level}/masks"] = ((batch_size, n, q, q), np.bool_)
    spec[f"{level}/valid"] = ((batch_size, n), np.bool_)
    spec[f"{level}/labels"] = ((batch_size, n), np.int32)
    spec[f"{level}/boxes"] = ((batch_size, n, 4), np.float32)
  return spec


def _check_contract(batch, batch_size):
  spec = _contract(batch_size, MAX["part"], MAX["entity"], MAX["relation"])
  assert sorted(batch) == sorted(spec)
  for k, (shape, dtype) in spec.items():
    assert batch[k].shape == shape and batch[k].dtype == dtype, (k, batch[k].shape, batch[k].dtype)


def test_same_seed_same_batches_and_static_shapes(sources):
  a = _take(iter(pipeline.build_train_pipeline(_config(), sources, 0, 1).dataset), 3)
  b = _take(iter(pipeline.build_train_pipeline(_config(), sources, 0, 1).dataset), 3)
  _assert_same(a, b)
  for batch in a:
    _check_contract(batch, B)
    assert (batch["entity/boxes"][~batch["entity/valid"]] == 0).all()
    assert (batch["part/labels"] == -1).all()
  c = next(iter(pipeline.build_train_pipeline(_config(seed=1), sources, 0, 1).dataset))
  assert not np.array_equal(a[0]["image"], c["image"])


def test_restored_state_continues_like_the_uninterrupted_iterator(sources):
  ds = pipeline.build_train_pipeline(_config(), sources, 0, 1).dataset
  reference = _take(iter(ds), 5)
  it = iter(ds)
  _take(it, 2)
  state = it.get_state()
  resumed = iter(ds)
  resumed.set_state(state)
  _assert_same(_take(resumed, 3), reference[2:])


def test_orbax_checkpoint_manager_restores_the_iterator(sources, tmp_path):
  ds = pipeline.build_train_pipeline(_config(), sources, 0, 1).dataset
  reference = _take(iter(ds), 4)
  it = iter(ds)
  _take(it, 3)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
    restored = manager.restore(
        3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iter(ds))))["data"]
  _assert_same([next(restored)], reference[3:])


def test_mixture_has_each_type_once_per_8_from_eligible_datasets(sources):
  p = pipeline.build_train_pipeline(_config(), sources, 0, 1)
  assert p.pools[7] == {"paco": 3, "ppp": 3} and p.pools[8] == {"psg": 3}
  drawn = {t: set() for t in range(1, 9)}
  for batch in _take(iter(p.dataset), 6):
    assert batch["task"].tolist() == list(range(1, 9))
    for task, pos, image_id in zip(batch["task"], batch["dataset"], batch["image_id"]):
      name = p.dataset_names[pos]
      st = aims_mixture.sample_type(int(task))
      src = sources[name]
      index = [src[i].image_id for i in range(len(src))].index(image_id)
      assert aims_mixture.is_eligible(st, name, src.meta(index)), (task, name)
      drawn[int(task)].add(name)
  # Round robin over the eligible datasets: in 6 draws each type met all of them (at most 5).
  assert drawn == {t: set(p.pools[t]) for t in range(1, 9)}


def test_sample_types_subset_cycles_in_config_order(sources):
  p = pipeline.build_train_pipeline(_config(sample_types=(7, 1), batch_size=4), sources, 0, 1)
  assert next(iter(p.dataset))["task"].tolist() == [7, 1, 7, 1]


def test_loss_layout_is_the_pipelines_batch_layout(sources):
  # The AIMS loss scores each level on the positions `static_sample_tasks` gives its types.
  for types, batch_size in (((7, 1), 4), (tuple(range(1, 9)), 8)):
    p = pipeline.build_train_pipeline(_config(sample_types=types, batch_size=batch_size),
                                      sources, 0, 1)
    run = ml_collections.ConfigDict({"input": {"sample_types": types}})
    layout = aims_spec.static_sample_tasks(run, batch_size, train=True)
    for batch in _take(iter(p.dataset), 3):
      assert batch["task"].tolist() == list(layout)
  run = ml_collections.ConfigDict({"input": {"sample_types": tuple(range(1, 9))}})
  assert aims_spec.static_sample_tasks(run, 12, train=True) is None  # layout varies by batch
  assert aims_spec.static_sample_tasks(run, 8, train=False) is None


def test_process_shards_concatenate_to_the_global_batch(sources):
  cfg = _config(batch_size=8)
  whole = _take(iter(pipeline.build_train_pipeline(cfg, sources, 0, 1).dataset), 2)
  shards = [_take(iter(pipeline.build_train_pipeline(cfg, sources, p, 2).dataset), 2)
            for p in range(2)]
  for step in range(2):
    assert shards[0][step]["image"].shape[0] == 4
    joined = {k: np.concatenate([shards[0][step][k], shards[1][step][k]]) for k in whole[step]}
    _assert_same([joined], [whole[step]])
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    pipeline.build_train_pipeline(cfg, sources, 0, 3)


def test_worker_processes_give_the_same_batches_and_state(sources):
  ds0 = pipeline.build_train_pipeline(_config(), sources, 0, 1).dataset
  ds1 = pipeline.build_train_pipeline(_config(num_workers=1), sources, 0, 1).dataset
  reference = _take(iter(ds0), 3)
  it = iter(ds1)
  _assert_same(_take(it, 2), reference[:2])
  state = it.get_state()
  it.close()
  resumed = iter(ds1)
  resumed.set_state(state)
  _assert_same(_take(resumed, 1), reference[2:])
  resumed.close()


def test_eval_pipeline_is_one_deterministic_pass(sources):
  cfg = _config(eval_batch_size=2)
  p = pipeline.build_eval_pipeline(cfg, sources, "psg", 0, 1)
  batches = list(p.dataset)
  assert p.num_batches == len(batches) == 2
  for batch in batches:
    _check_contract(batch, 2)
  ids = np.concatenate([b["image_id"] for b in batches]).tolist()
  assert ids == [500, 501, 502, -1]
  assert (np.concatenate([b["task"] for b in batches]) == aims_mixture.EVAL_TASK).all()
  last = batches[-1]
  assert not last["valid"][1].any() and not last["entity/valid"][1].any()
  first = batches[0]
  np.testing.assert_array_equal(first["prompt/mask"], first["valid"])
  # No jitter: the image fills the canvas along its longer side.
  assert first["valid"][0].sum() == 64 * 48 and first["orig_size"][0].tolist() == [48, 64]
  _assert_same(batches, list(pipeline.build_eval_pipeline(cfg, sources, "psg", 0, 1).dataset))
  halves = [list(pipeline.build_eval_pipeline(cfg, sources, "psg", p, 2).dataset)
            for p in range(2)]
  assert [len(h) for h in halves] == [2, 2]
  assert sorted(int(i) for h in halves for b in h for i in b["image_id"]) == [-1, 500, 501, 502]


def test_config_errors_are_clear(sources):
  cfg = _config()
  del cfg["max_parts"]
  with pytest.raises(KeyError, match="no key 'max_parts'"):
    pipeline.build_train_pipeline(cfg, sources, 0, 1)
  with pytest.raises(TypeError, match="'batch_size' must be int"):
    pipeline.build_train_pipeline(_config(batch_size=8.0), sources, 0, 1)
  with pytest.raises(KeyError, match="no source named 'coco2'"):
    pipeline.build_eval_pipeline(_config(), sources, "coco2", 0, 1)


def test_on_the_generated_synthetic_dataset_through_the_native_readers(tmp_path):
  summary = synthetic.generate(str(tmp_path), 6, 2, 64, 0)
  formats = {"coco": "coco_panoptic", "entityseg": "coco_instances",
             "ppp": "pascal_panoptic_parts", "psg": "psg", "paco": "paco"}
  split_sources = {
      split: {name: readers.build_reader(fmt, name=name, **summary["readers"][split][fmt])
              for name, fmt in formats.items()}
      for split in ("train", "val")}
  cfg = _config(max_parts=16, max_entities=12, max_relations=8)
  p = pipeline.build_train_pipeline(cfg, split_sources["train"], 0, 1)
  for batch in _take(iter(p.dataset), 2):
    spec = _contract(B, 16, 12, 8)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: (shape, np.dtype(dtype)) for k, (shape, dtype) in spec.items()}
    assert batch["task"].tolist() == list(range(1, 9))
    for task, pos in zip(batch["task"], batch["dataset"]):
      assert p.dataset_names[pos] in aims_mixture.sample_type(int(task)).datasets
    assert batch["part/valid"][1].any()  # type 2: full image -> parts
    # Type 8: the two related entities and their relation.
    assert batch["entity/valid"][7].sum() == 2 and batch["relation/valid"][7].sum() == 1
  ppp_val = split_sources["val"]["ppp"]
  e = pipeline.build_eval_pipeline(cfg, split_sources["val"], "ppp", 0, 1)
  batches = list(e.dataset)
  ids = [int(i) for b in batches for i in b["image_id"] if i >= 0]
  assert ids == [ppp_val[i].image_id for i in range(len(ppp_val))]
  first = ppp_val[0]
  n_entities = sum(not s.iscrowd for s in first.segments)
  assert batches[0]["entity/valid"][0].sum() == min(n_entities, 12)
  assert batches[0]["part/valid"][0].sum() == min(len(first.parts), 16)
