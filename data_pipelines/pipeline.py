"""grain input pipelines for AIMS: the training mixture stream and the evaluation pass.

Training, as a grain graph (all random-access `MapDataset`s until the very end):

  per (sample type t, dataset d): the eligible image indices -> shuffle (reshuffled every epoch)
    -> repeat forever
  per type: mix over its datasets with equal weights (round robin: uniform over datasets, then
    uniform over images by the shuffle)
  all types: mix with equal weights -> global element g has type `sample_types[g % K]`, so every K
    (= 8 with the full table) consecutive elements hold each type once
  random_map(build the sample)  -- grain's rng is keyed by (seed, g): a sample depends only on g
  host slice -> batch -> iterator (-> `mp_prefetch` worker processes)

Global vs per-host batch. The global batch b is the elements [b*G, (b+1)*G) of the global stream
(G = `batch_size`). Process p of P takes the contiguous slice [b*G + p*G/P, b*G + (p+1)*G/P) as its
per-host batch of G/P samples, so the processes read disjoint samples and concatenating the host
batches in process order (what `jax.make_array_from_process_local_data` does along the batch axis)
gives exactly the global batch, whatever P is. With G a multiple of 8 every global batch holds each
type G/8 times; with G/P a multiple of 8 so does every host batch.

Batching happens on the `MapDataset` (one element = one host batch), so `mp_prefetch` workers
each produce whole batches: the batches are identical for 0, 1 or N workers, and the iterator state
(`get_state`/`set_state`) is just the next batch index. In an orbax `CheckpointManager` the
iterator is one item of a `Composite`: `grain.checkpoint.CheckpointSave(iterator)` to save and
`grain.checkpoint.CheckpointRestore(fresh_iterator)` to restore (grain's handler writes one
`process_<i>-of-<n>.json` per process), as `hiseg_jax/train/checkpoint.py` does. A restore needs the
same config and process count.

Config keys read from the section passed in (e.g. `config.input`):
  image_size (int)          canvas side S, a multiple of 4
  batch_size (int)          global training batch G, divisible by the process count
  eval_batch_size (int)     global evaluation batch (evaluation only)
  scale_range (2 floats)    scale jitter, multipliers of the canvas-fitting scale (training only)
  flip_prob (float)         probability of a left-right mirror (training only)
  max_parts, max_entities, max_relations (int)   instance slots per level
  class_agnostic (bool)     labels -1 and same-pair relations merged (AIMS: True)
  strict_maxima (bool)      raise instead of truncating beyond the slots
  mask_stride (int)         target masks are S / mask_stride on a side: 1, 2 or 4 (DESIGN's 4
                            saves memory at 1024 px; small canvases keep thin parts with 1)
  sample_types (ints)       the AIMS sample types in use, in cycle order (all 8: 1..8) (training)
  seed (int)                the pipeline seed (training)
  num_workers (int)         grain worker processes; 0 runs in the calling process

Batch keys (numpy, leading axis = per-host batch B): see `aims_mixture.build_sample`, plus
`image_id` int32 [B] (-1 for evaluation padding) and `dataset` int32 [B] (index into
`InputPipeline.dataset_names`). `stats/truncated` int32 [B, 3] counts instances beyond the maxima
per level (part, entity, relation); the trainer should sum and log it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import grain
import jax
import ml_collections
import numpy as np

from data_pipelines import aims_mixture
from data_pipelines import grain_utils

RecordSource = grain_utils.RecordSource
InputPipeline = grain_utils.InputPipeline
_DOC = "data_pipelines/pipeline.py"


def _get(section: ml_collections.ConfigDict, key: str, kind: Any) -> Any:
  """Reads `section.key`, checking its presence and type."""
  return grain_utils.read_key(section, key, kind, _DOC)


def _settings(section: ml_collections.ConfigDict, train: bool) -> aims_mixture.SampleSettings:
  """The `SampleSettings` a config section describes."""
  if train:
    scale_range = tuple(float(v) for v in _get(section, "scale_range", tuple))
    if len(scale_range) != 2:
      raise ValueError(f"input config 'scale_range' must be (low, high), got {scale_range}")
    flip_prob = _get(section, "flip_prob", float)
  else:
    scale_range, flip_prob = (1.0, 1.0), 0.0
  return aims_mixture.SampleSettings(
      canvas=_get(section, "image_size", int),
      max_instances={"part": _get(section, "max_parts", int),
                     "entity": _get(section, "max_entities", int),
                     "relation": _get(section, "max_relations", int)},
      scale_range=scale_range,
      flip_prob=flip_prob,
      class_agnostic=_get(section, "class_agnostic", bool),
      strict=_get(section, "strict_maxima", bool),
      mask_stride=_get(section, "mask_stride", int))


class _Tag(grain.transforms.Map):
  """(index) -> (task, dataset position, index)."""

  def __init__(self, task: int, dataset_pos: int):
    self._task = task
    self._dataset_pos = dataset_pos

  def map(self, index: int) -> tuple[int, int, int]:
    return self._task, self._dataset_pos, int(index)


class _TrainSample(grain.transforms.RandomMap):
  """(task, dataset position, index) -> sample arrays, randomness from grain's rng."""

  def __init__(self, sources: Mapping[str, RecordSource], names: tuple[str, ...],
               settings: aims_mixture.SampleSettings):
    self._sources = sources
    self._names = names
    self._settings = settings

  def random_map(self, element: tuple[int, int, int], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    task, pos, index = element
    record = self._sources[self._names[pos]][index]
    out = aims_mixture.build_sample(record, aims_mixture.sample_type(task), self._settings, rng)
    out["image_id"] = grain_utils.image_id_int32(record)
    out["dataset"] = np.int32(pos)
    return out


class _EvalSample(grain.transforms.Map):
  """Global position -> evaluation sample of image `position`, or padding past the end."""

  def __init__(self, source: RecordSource, pos: int, settings: aims_mixture.SampleSettings):
    self._source = source
    self._pos = pos
    self._settings = settings

  def map(self, position: int) -> dict[str, np.ndarray]:
    if position >= len(self._source):
      out = aims_mixture.padding_sample(self._settings)
      out["image_id"] = np.int32(-1)
    else:
      record = self._source[int(position)]
      out = aims_mixture.build_sample(record, aims_mixture.EVAL_TYPE, self._settings, None)
      out["image_id"] = grain_utils.image_id_int32(record)
    out["dataset"] = np.int32(self._pos)
    return out


def build_train_pipeline(section: ml_collections.ConfigDict, sources: Mapping[str, RecordSource],
                         process_index: Optional[int] = None,
                         process_count: Optional[int] = None) -> InputPipeline:
  """The endless AIMS training stream.

  Args:
    section: the input config section (keys in the module docstring).
    sources: already-built readers keyed by `config.datasets` name (names from the AIMS table).
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    The `InputPipeline`.
  """
  settings = _settings(section, train=True)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  global_batch = _get(section, "batch_size", int)
  host_batch = grain_utils.host_batch_size(global_batch, process_count)
  task_ids = tuple(int(t) for t in _get(section, "sample_types", tuple))
  if not task_ids or len(set(task_ids)) != len(task_ids):
    raise ValueError(f"input config 'sample_types' must list distinct types, got {task_ids}")
  seed = _get(section, "seed", int)
  names = tuple(sorted(sources))
  pools = aims_mixture.eligible_indices(sources, task_ids)

  per_type = []
  for task in task_ids:
    streams = [
        grain.MapDataset.source(pool)
        .shuffle(seed=grain_utils.derive_seed(seed, task, names.index(name)))
        .repeat().map(_Tag(task, names.index(name)))
        for name, pool in pools[task].items()
    ]
    per_type.append(grain.MapDataset.mix(streams))
  stream = grain.MapDataset.mix(per_type).random_map(
      _TrainSample(dict(sources), names, settings), seed=grain_utils.derive_seed(seed, 0))
  host = grain_utils.HostSlice(stream, process_index, process_count, host_batch)
  return InputPipeline(
      dataset=grain_utils.finish(host, host_batch, _get(section, "num_workers", int)),
      dataset_names=names,
      global_batch_size=global_batch,
      host_batch_size=host_batch,
      pools={t: {d: len(p) for d, p in pools[t].items()} for t in task_ids},
      num_batches=None)


def build_eval_pipeline(section: ml_collections.ConfigDict, sources: Mapping[str, RecordSource],
                        dataset_name: str, process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> InputPipeline:
  """One deterministic pass over a split: no jitter, no flip, full-image prompt, `task` 0.

  Image i of the source is global element i; the last global batch is filled with padding samples
  (`image_id` -1, nothing valid), so every process yields `num_batches` batches. A prediction on
  the canvas maps back to the original (H, W) = `orig_size` by taking the top-left
  round(H * s) x round(W * s) window, s = image_size / max(H, W), and resizing it to H x W.

  Args:
    section: the input config section (keys in the module docstring).
    sources: readers keyed by `config.datasets` name.
    dataset_name: the one to evaluate.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    The `InputPipeline`.
  """
  if dataset_name not in sources:
    raise KeyError(f"no source named '{dataset_name}'; have {sorted(sources)}")
  settings = _settings(section, train=False)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  global_batch = _get(section, "eval_batch_size", int)
  host_batch = grain_utils.host_batch_size(global_batch, process_count)
  names = tuple(sorted(sources))
  source = sources[dataset_name]
  if len(source) == 0:
    raise ValueError(f"evaluation dataset '{dataset_name}' is empty")
  num_batches = -(-len(source) // global_batch)
  ds = grain.MapDataset.range(num_batches * global_batch).map(
      _EvalSample(source, names.index(dataset_name), settings))
  host = grain_utils.HostSlice(ds, process_index, process_count, host_batch)
  return InputPipeline(
      dataset=grain_utils.finish(host, host_batch, _get(section, "num_workers", int)),
      dataset_names=names,
      global_batch_size=global_batch,
      host_batch_size=host_batch,
      pools={},
      num_batches=num_batches)

