"""grain building blocks shared by the AIMS and HIPIE input pipelines.

Both pipelines are random-access `MapDataset` graphs that end in the same way: a global stream of
samples, process p's contiguous slice of every global batch (`HostSlice`), batching on the
`MapDataset` and an iterator with optional `mp_prefetch` worker processes (`finish`). Batching
before the iterator makes one element one host batch, so the batches are identical for 0, 1 or N
workers and the iterator state is just the next batch index (see `data_pipelines/pipeline.py` for
how the trainer checkpoints it with orbax).

Also here: strict reading of config keys (`read_key`), the per-host batch size, seed derivation,
the reader protocol (`RecordSource`) and the built-pipeline record (`InputPipeline`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Protocol

from absl import flags
import grain
import ml_collections
import numpy as np

from data_pipelines import records as records_lib

# Each process computes whole batches in 2 threads and keeps up to 4 batches ready.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


class RecordSource(Protocol):
  """A native-format reader: random access to `ImageRecord`s plus cheap metadata."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> records_lib.ImageRecord:
    ...

  def meta(self, index: int) -> records_lib.RecordMeta:
    ...


@dataclasses.dataclass(frozen=True)
class InputPipeline:
  """A built pipeline.

  Attributes:
    dataset: the grain `IterDataset` of per-host batches; `iter()` it for a checkpointable iterator.
    dataset_names: the source names, in the order the batch's `dataset` index uses.
    global_batch_size: samples per global batch.
    host_batch_size: samples per batch on this process.
    pools: eligible element count per task (or sample type) and dataset (training), or {}
      (evaluation).
    num_batches: batches in one evaluation pass, or None for the endless training stream.
  """

  dataset: grain.IterDataset
  dataset_names: tuple[str, ...]
  global_batch_size: int
  host_batch_size: int
  pools: Mapping[int, Mapping[str, int]]
  num_batches: Optional[int]


def read_key(section: ml_collections.ConfigDict, key: str, kind: Any, doc: str) -> Any:
  """Reads `section.key`, checking its presence and type.

  Args:
    section: a config section.
    key: the key.
    kind: the expected type (int, float, bool, str, or tuple / list for a sequence, returned as a
      tuple); an int is accepted where a float is expected.
    doc: the module whose docstring lists the keys, named in the error.

  Returns:
    The value.

  Raises:
    KeyError: naming the key and `doc` when it is missing.
    TypeError: naming the key when the value has the wrong type.
  """
  if key not in section:
    raise KeyError(f"input config section has no key '{key}' (see {doc} for the keys it reads); "
                   f"it has {sorted(section.keys())}")
  value = section[key]
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if kind in (tuple, list):
    if not isinstance(value, (tuple, list)):
      raise TypeError(f"input config '{key}' must be a sequence, got {value!r}")
    return tuple(value)
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise TypeError(f"input config '{key}' must be {kind.__name__}, got {value!r}")
  return value


def host_batch_size(global_batch: int, process_count: int) -> int:
  """The per-host batch, checking divisibility.

  Args:
    global_batch: samples per global batch.
    process_count: number of processes.

  Returns:
    global_batch / process_count.

  Raises:
    ValueError: when the global batch is not a positive multiple of the process count.
  """
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f"global batch size {global_batch} must be a positive multiple of the "
                     f"process count {process_count}")
  return global_batch // process_count


def derive_seed(*parts: int) -> int:
  """A 32-bit seed derived from integers.

  Args:
    *parts: non-negative integers (e.g. the pipeline seed and a stream id).

  Returns:
    The seed.
  """
  return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def image_id_int32(record: records_lib.ImageRecord) -> np.int32:
  """The record's image id as int32 (what the device batch holds).

  Args:
    record: the image record.

  Returns:
    The id.

  Raises:
    ValueError: naming the image when the id does not fit int32.
  """
  if not 0 <= record.image_id < 2**31:
    raise ValueError(f"{record.dataset}: image id {record.image_id} ({record.file_name}) does not "
                     "fit the batch's int32 image_id")
  return np.int32(record.image_id)


class HostSlice(grain.MapDataset):
  """Process p's contiguous slice of every global batch, in order.

  The global batch b is the elements [b*G, (b+1)*G) of the parent stream (G = host_batch *
  process_count); process p takes [b*G + p*G/P, b*G + (p+1)*G/P), so concatenating the host
  batches in process order gives the global batch.

  Args:
    parent: the global stream.
    process_index: this process.
    process_count: number of processes.
    host_batch: samples per host batch.
  """

  def __init__(self, parent: grain.MapDataset, process_index: int, process_count: int,
               host_batch: int):
    super().__init__(parent)
    if not 0 <= process_index < process_count:
      raise ValueError(f"process index {process_index} is outside [0, {process_count})")
    self._offset = process_index * host_batch
    self._host_batch = host_batch
    self._global_batch = host_batch * process_count

  def __len__(self) -> int:
    return len(self._parent) // self._global_batch * self._host_batch

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, r = divmod(index, self._host_batch)
    return self._parent[step * self._global_batch + self._offset + r]


def finish(ds: grain.MapDataset, host_batch: int, num_workers: int) -> grain.IterDataset:
  """Batch -> iterator -> optional worker processes.

  Args:
    ds: the host's stream of samples.
    host_batch: samples per host batch.
    num_workers: grain worker processes (0 runs in the calling process).

  Returns:
    The `IterDataset` of host batches.
  """
  if num_workers < 0:
    raise ValueError(f"input config 'num_workers' must be >= 0, got {num_workers}")
  it = ds.batch(host_batch, drop_remainder=True).to_iter_dataset(READ_OPTIONS)
  if num_workers:
    # grain's worker start-up reads an absl flag; outside an absl app (tests, notebooks, the
    # benchmark) the flags were never parsed, so let their defaults apply. No-op under app.run.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it
