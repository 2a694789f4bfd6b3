"""grain input pipelines for HIPIE: the training batch mixture and one evaluation pass per task.

The reference mixture (berkeley-hipie/HIPIE, `configs/training/r50*.yaml` and
`hipie/data/custom_dataset_dataloader.py`): `MultiDatasetSampler` draws every image from dataset d
with probability ∝ DATASET_RATIO[d] (uniformly within d), and `DIFFMDAspectRatioGroupedDataset`
groups each GPU's stream into per-GPU batches of DATASET_BS[d] = 2 images from ONE dataset (hence
one task: the text is a class prompt or a sentence for the whole per-GPU batch). Stage III
(parts) uses pascal_parts : coco panoptic : refcoco-mixed = 3 : 1 : 1, stage II coco : refcoco =
1 : 1. The global batch of 32 thus mixes tasks across GPUs.

Here the unit of the mixture is a *task group* of `task_group_size` consecutive samples of the
global stream (the reference's per-GPU batch; 2 reproduces it, `batch_size` gives whole batches
of one task): groups come from the `mixture` datasets in proportion to their `ratio` (grain's
`MapDataset.mix`: a deterministic weighted interleave, so the ratio holds exactly over every
window of sum(ratios) groups, where the reference draws i.i.d. with the same expectation), and
every sample of a group comes from the group's dataset. A task group never straddles two
processes (the per-host batch must be a multiple of it). Within a dataset the elements are
shuffled per epoch (the reference draws with replacement). A panoptic / part element is an image;
a referring element is one (image, expression) pair, as the reference's refcoco datasets have one
entry per ref and pick one of its sentences.

Graph (random-access `MapDataset`s until the batching, as `data_pipelines/pipeline.py`):

  per dataset d: its eligible elements -> shuffle (seed, d) -> repeat -> groups of
  `task_group_size` -> tag (task, d)
  all datasets: mix by ratio -> ungroup -> random_map(build the sample; grain's rng is keyed by
  (seed, global element index), so a sample depends only on its position)
  -> host slice -> batch -> iterator (-> `mp_prefetch` workers); the iterator state is the next
  batch index, checkpointed with the train state as `pipeline.py` describes.

Config keys read from the section passed in (e.g. `config.input`):
  image_size (int)          canvas side S, a multiple of 4
  batch_size (int)          global training batch G, a multiple of process count x task_group_size
  eval_batch_size (int)     global evaluation batch (evaluation only)
  scale_range (2 floats)    scale jitter, multipliers of the canvas-fitting scale (training only)
  flip_prob (float)         probability of a left-right mirror (training only)
  max_things (int)          thing slots N
  max_stuff (int)           stuff slots Ns
  max_classes (int)         class rows C of text/positive_map (>= the largest vocabulary)
  max_text_len (int)        token length T (reference MAX_QUERY_LEN: 512; 1024 for parts, which
                            a BERT encodes in 512-token chunks, `hiseg_jax.text.chunk_token_ids`)
  strict_maxima (bool)      raise instead of dropping targets beyond the slots / prompt budget
  prompt (str)              training class prompt: "fixed" (every class, vocabulary order) or
                            "sampled" (the reference's shuffled positives + sampled negatives)
  max_negatives (int)       negatives drawn for a sampled prompt (reference 85)
  part_object_tokens (bool) part positive maps also mark the object words (reference PART_MODE)
  task_group_size (int)     samples per task group (reference 2, the per-GPU batch) (training)
  mixture (ConfigDict)      {dataset name: {task: "panoptic" | "referring" | "part",
                            ratio: float > 0}}, one entry per training source (training)
  seed (int)                the pipeline seed (training)
  num_workers (int)         grain worker processes; 0 runs in the calling process

Batch keys (numpy, leading axis = per-host batch B): those of `hipie_samples` (image, valid, task,
orig_size, expression, text/*, things/*, stuff/*, stats/truncated), plus `image_id` int32 [B]
(-1 for evaluation padding) and `dataset` int32 [B] (index into `InputPipeline.dataset_names`).
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Optional

import grain
import jax
import ml_collections
import numpy as np
import transformers

from data_pipelines import grain_utils
from data_pipelines import hipie_samples
from data_pipelines import records as records_lib
from hiseg_jax.text import prompts

_DOC = "data_pipelines/hipie_pipeline.py"
_MIXTURE_KEYS = ("ratio", "task")


def _get(section: ml_collections.ConfigDict, key: str, kind: Any) -> Any:
  """Reads `section.key`, checking its presence and type."""
  return grain_utils.read_key(section, key, kind, _DOC)


def sample_settings(section: ml_collections.ConfigDict, train: bool
                    ) -> hipie_samples.SampleSettings:
  """The `SampleSettings` a config section describes.

  Args:
    section: the input config section (keys in the module docstring).
    train: training (jitter and flip read from the config) or evaluation (none).

  Returns:
    The settings.
  """
  if train:
    scale_range = tuple(float(v) for v in _get(section, "scale_range", tuple))
    if len(scale_range) != 2:
      raise ValueError(f"input config 'scale_range' must be (low, high), got {scale_range}")
    flip_prob = _get(section, "flip_prob", float)
  else:
    scale_range, flip_prob = (1.0, 1.0), 0.0
  return hipie_samples.SampleSettings(
      canvas=_get(section, "image_size", int),
      max_things=_get(section, "max_things", int),
      max_stuff=_get(section, "max_stuff", int),
      max_classes=_get(section, "max_classes", int),
      max_text_len=_get(section, "max_text_len", int),
      scale_range=scale_range,
      flip_prob=flip_prob,
      strict=_get(section, "strict_maxima", bool),
      prompt=_get(section, "prompt", str),
      max_negatives=_get(section, "max_negatives", int),
      part_object_tokens=_get(section, "part_object_tokens", bool))


def read_mixture(section: ml_collections.ConfigDict) -> dict[str, tuple[str, float]]:
  """The `mixture` entries.

  Args:
    section: the input config section.

  Returns:
    {dataset name: (task, ratio)}.

  Raises:
    KeyError / TypeError / ValueError: naming the entry that is missing, malformed or unknown.
  """
  mixture = _get(section, "mixture", ml_collections.ConfigDict)
  if not mixture:
    raise ValueError("input config 'mixture' is empty; it needs one entry per training dataset")
  out = {}
  for name in mixture.keys():
    entry = mixture[name]
    if not isinstance(entry, ml_collections.ConfigDict) or sorted(entry.keys()) != sorted(
        _MIXTURE_KEYS):
      raise ValueError(f"input config 'mixture.{name}' must have exactly the keys "
                       f"{list(_MIXTURE_KEYS)}, got {entry!r}")
    task = grain_utils.read_key(entry, "task", str, _DOC)
    ratio = grain_utils.read_key(entry, "ratio", float, _DOC)
    if task not in hipie_samples.TASKS:
      raise ValueError(f"input config 'mixture.{name}.task' must be one of "
                       f"{hipie_samples.TASKS}, got {task!r}")
    if not ratio > 0:
      raise ValueError(f"input config 'mixture.{name}.ratio' must be > 0, got {ratio}")
    out[name] = (task, ratio)
  return out


def is_eligible(task: str, meta: records_lib.RecordMeta) -> bool:
  """Whether an image can give a sample of a task.

  Args:
    task: one of `hipie_samples.TASKS`.
    meta: the image's `RecordMeta`.

  Returns:
    panoptic: annotated entities, at least one segment; part: annotated parts, at least one
    segment; referring: at least one expression.
  """
  if task == "referring":
    return meta.num_expressions > 0
  level = "entity" if task == "panoptic" else "part"
  return level in meta.levels and meta.num_segments > 0


def task_elements(task: str, source: grain_utils.RecordSource, train: bool
                  ) -> list[tuple[int, int]]:
  """The elements of a source for a task: (image index, expression index or -1).

  Args:
    task: one of `hipie_samples.TASKS`.
    source: the reader.
    train: training draws only eligible images (`is_eligible`); evaluation visits every image
      (panoptic, part), since an image without annotations still scores its predictions.

  Returns:
    Every (i, k) for the expressions k of the images (referring), or (i, -1) per image
    (panoptic, part), in source order.
  """
  out = []
  for i in range(len(source)):
    meta = source.meta(i)
    if task == "referring":
      out.extend((i, k) for k in range(meta.num_expressions))
    elif not train or is_eligible(task, meta):
      out.append((i, -1))
  return out


def _check_vocabularies(tasks: Mapping[str, str],
                        vocabularies: Mapping[str, hipie_samples.Vocabulary],
                        settings: hipie_samples.SampleSettings,
                        tokenizer: Optional[transformers.PreTrainedTokenizerBase]) -> None:
  """Every class task has a vocabulary that fits `max_classes` (and, given a tokenizer, whose
  fixed prompt fits `max_text_len`), so a bad config fails at start rather than in a worker."""
  for name, task in tasks.items():
    if task == "referring":
      continue
    if name not in vocabularies:
      raise KeyError(f"dataset '{name}' ({task}) has no class vocabulary; vocabularies are given "
                     f"for {sorted(vocabularies)}")
    n = len(vocabularies[name].names)
    if n > settings.max_classes:
      raise ValueError(f"dataset '{name}': its vocabulary has {n} classes, more than input "
                       f"config 'max_classes'={settings.max_classes}")
    if tokenizer is not None:
      length = prompts.build_class_prompt(vocabularies[name].names, tokenizer,
                                          clean=False).num_tokens
      if length > settings.max_text_len:
        raise ValueError(f"dataset '{name}': its fixed prompt of {n} classes has {length} "
                         f"tokens, more than input config 'max_text_len'={settings.max_text_len}")


class _Groups(grain.MapDataset):
  """Element k = (task, dataset position, [parent[k*g], ..., parent[k*g + g - 1]])."""

  def __init__(self, parent: grain.MapDataset, size: int, task: str, dataset_pos: int):
    super().__init__(parent)
    self._size = size
    self._task = task
    self._dataset_pos = dataset_pos

  def __len__(self) -> int:
    return len(self._parent) // self._size

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    start = index * self._size
    return self._task, self._dataset_pos, [self._parent[start + j] for j in range(self._size)]


class _Ungroup(grain.MapDataset):
  """Element i = (task, dataset position, image index, expression) of group i // g."""

  def __init__(self, parent: grain.MapDataset, size: int):
    super().__init__(parent)
    self._size = size

  def __len__(self) -> int:
    return min(sys.maxsize, len(self._parent) * self._size)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    group, j = divmod(index, self._size)
    task, pos, members = self._parent[group]
    image, expression = members[j]
    return task, pos, int(image), int(expression)


class _TrainSample(grain.transforms.RandomMap):
  """(task, dataset position, image index, expression) -> sample, randomness from grain's rng."""

  def __init__(self, builder: hipie_samples.SampleBuilder,
               sources: Mapping[str, grain_utils.RecordSource], names: tuple[str, ...],
               vocabularies: Mapping[str, hipie_samples.Vocabulary]):
    self._builder = builder
    self._sources = sources
    self._names = names
    self._vocabularies = vocabularies

  def random_map(self, element: tuple[str, int, int, int], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    task, pos, index, expression = element
    name = self._names[pos]
    record = self._sources[name][index]
    out = self._builder.build(record, task, self._vocabularies.get(name), rng, expression)
    out["image_id"] = grain_utils.image_id_int32(record)
    out["dataset"] = np.int32(pos)
    return out


class _EvalSample(grain.transforms.Map):
  """Global position -> evaluation sample of element `position`, or padding past the end."""

  def __init__(self, builder: hipie_samples.SampleBuilder, source: grain_utils.RecordSource,
               elements: list[tuple[int, int]], task: str,
               vocabulary: Optional[hipie_samples.Vocabulary], pos: int):
    self._builder = builder
    self._source = source
    self._elements = elements
    self._task = task
    self._vocabulary = vocabulary
    self._pos = pos

  def map(self, position: int) -> dict[str, np.ndarray]:
    if position >= len(self._elements):
      out = self._builder.padding(self._task)
      out["image_id"] = np.int32(-1)
    else:
      index, expression = self._elements[position]
      record = self._source[index]
      out = self._builder.build(record, self._task, self._vocabulary, None, expression)
      out["image_id"] = grain_utils.image_id_int32(record)
    out["dataset"] = np.int32(self._pos)
    return out


def build_train_pipeline(section: ml_collections.ConfigDict,
                         sources: Mapping[str, grain_utils.RecordSource],
                         vocabularies: Mapping[str, hipie_samples.Vocabulary],
                         tokenizer: transformers.PreTrainedTokenizerBase,
                         process_index: Optional[int] = None,
                         process_count: Optional[int] = None) -> grain_utils.InputPipeline:
  """The endless HIPIE training stream with the batch mixture.

  Args:
    section: the input config section (keys in the module docstring).
    sources: readers keyed by `config.datasets` name; exactly the `mixture` datasets.
    vocabularies: class vocabularies of the panoptic and part datasets
      (`hipie_samples.resolve_vocabulary`).
    tokenizer: the BERT tokenizer (`hiseg_jax.text.load_bert_tokenizer`).
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    The `InputPipeline`; `pools` maps each task id to {dataset: number of elements}.
  """
  settings = sample_settings(section, train=True)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  global_batch = _get(section, "batch_size", int)
  host_batch = grain_utils.host_batch_size(global_batch, process_count)
  group = _get(section, "task_group_size", int)
  if group < 1 or host_batch % group:
    raise ValueError(f"input config 'task_group_size' ({group}) must be >= 1 and divide the "
                     f"per-host batch ({global_batch} / {process_count} processes = {host_batch})")
  seed = _get(section, "seed", int)
  mixture = read_mixture(section)
  if sorted(mixture) != sorted(sources):
    raise ValueError(f"input config 'mixture' names {sorted(mixture)} but the training sources "
                     f"are {sorted(sources)}; they must be the same datasets")
  _check_vocabularies({n: t for n, (t, _) in mixture.items()}, vocabularies, settings,
                      tokenizer if settings.prompt == "fixed" else None)
  names = tuple(sorted(sources))
  pools: dict[int, dict[str, int]] = {}
  streams, ratios = [], []
  for pos, name in enumerate(names):
    task, ratio = mixture[name]
    elements = task_elements(task, sources[name], train=True)
    if not elements:
      raise ValueError(f"dataset '{name}' has no image eligible for the {task} task")
    pools.setdefault(hipie_samples.TASK_IDS[task], {})[name] = len(elements)
    stream = grain.MapDataset.source(elements).shuffle(
        seed=grain_utils.derive_seed(seed, 1, pos)).repeat()
    streams.append(_Groups(stream, group, task, pos))
    ratios.append(ratio)
  builder = hipie_samples.SampleBuilder(tokenizer, settings)
  mixed = _Ungroup(grain.MapDataset.mix(streams, ratios), group).random_map(
      _TrainSample(builder, dict(sources), names, dict(vocabularies)),
      seed=grain_utils.derive_seed(seed, 0))
  host = grain_utils.HostSlice(mixed, process_index, process_count, host_batch)
  return grain_utils.InputPipeline(
      dataset=grain_utils.finish(host, host_batch, _get(section, "num_workers", int)),
      dataset_names=names,
      global_batch_size=global_batch,
      host_batch_size=host_batch,
      pools=pools,
      num_batches=None)


def build_eval_pipeline(section: ml_collections.ConfigDict,
                        sources: Mapping[str, grain_utils.RecordSource], dataset_name: str,
                        task: str, vocabulary: Optional[hipie_samples.Vocabulary],
                        tokenizer: transformers.PreTrainedTokenizerBase,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> grain_utils.InputPipeline:
  """One deterministic pass of a task over a split: no jitter, no flip, the fixed class prompt.

  Panoptic and part passes visit every image (in source order); referring passes visit every
  (image, expression) pair. Element i is global element i; the last
  global batch is filled with padding samples (`image_id` -1, nothing valid). A canvas prediction
  maps back to the original (H, W) = `orig_size` as in `pipeline.build_eval_pipeline`.

  Args:
    section: the input config section (keys in the module docstring).
    sources: readers keyed by `config.datasets` name.
    dataset_name: the one to evaluate.
    task: one of `hipie_samples.TASKS`.
    vocabulary: its class vocabulary (None for referring).
    tokenizer: the BERT tokenizer.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    The `InputPipeline`.
  """
  if dataset_name not in sources:
    raise KeyError(f"no source named '{dataset_name}'; have {sorted(sources)}")
  if task not in hipie_samples.TASKS:
    raise ValueError(f"evaluation task must be one of {hipie_samples.TASKS}, got {task!r}")
  settings = sample_settings(section, train=False)
  vocabularies = {} if vocabulary is None else {dataset_name: vocabulary}
  _check_vocabularies({dataset_name: task}, vocabularies, settings, tokenizer)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  global_batch = _get(section, "eval_batch_size", int)
  host_batch = grain_utils.host_batch_size(global_batch, process_count)
  names = tuple(sorted(sources))
  source = sources[dataset_name]
  elements = task_elements(task, source, train=False)
  if not elements:
    raise ValueError(f"evaluation dataset '{dataset_name}' has no image for the {task} task")
  num_batches = -(-len(elements) // global_batch)
  builder = hipie_samples.SampleBuilder(tokenizer, settings)
  ds = grain.MapDataset.range(num_batches * global_batch).map(
      _EvalSample(builder, source, elements, task, vocabulary, names.index(dataset_name)))
  host = grain_utils.HostSlice(ds, process_index, process_count, host_batch)
  return grain_utils.InputPipeline(
      dataset=grain_utils.finish(host, host_batch, _get(section, "num_workers", int)),
      dataset_names=names,
      global_batch_size=global_batch,
      host_batch_size=host_batch,
      pools={},
      num_batches=num_batches)
