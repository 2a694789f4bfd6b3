"""Datasets declared in a config (`config.datasets.<name>`) -> built native-format readers.

An entry is a ConfigDict with
  format: a reader format (`data_pipelines.readers.READERS`: coco_panoptic, coco_instances, paco,
    pascal_panoptic_parts, psg, refcoco);
  root: the dataset root; '' means the run's default root (the synthetic dataset the trainer
    generates, or `config.data_root`);
  every other key: a keyword argument of that format's reader. Arguments ending in `_file` or
    `_root` are paths and are joined with `root` when relative, so
    `--config.datasets.coco.root=/data/coco` retargets a whole dataset.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import jax
import ml_collections

from data_pipelines import readers
from data_pipelines import synthetic
from data_pipelines.synthetic import is_path_key
from data_pipelines.synthetic import layout

SYNTHETIC_DONE = "DONE"


def synthetic_entry(fmt: str, split: str) -> ml_collections.ConfigDict:
  """A `config.datasets` entry for one format and split of the synthetic layout.

  Args:
    fmt: reader format.
    split: "train" or "val".

  Returns:
    ConfigDict with `format`, `root` '' (the default root) and the reader's arguments.
  """
  entry = {"format": fmt, "root": ""}
  entry.update(layout(split)[fmt])
  return ml_collections.ConfigDict(entry)


def reader_arguments(name: str, entry: Mapping[str, Any], default_root: str) -> dict[str, Any]:
  """The reader keyword arguments of one entry, paths resolved.

  Args:
    name: the entry's name (the reader's `name`).
    entry: the `config.datasets.<name>` entry.
    default_root: root used when `entry.root` is ''.

  Returns:
    Keyword arguments for `readers.build_reader` (without `format`).

  Raises:
    ValueError: naming the entry when `format` or `root` is missing or the format is unknown.
  """
  if "format" not in entry or "root" not in entry:
    raise ValueError(f"config.datasets.{name}: needs 'format' and 'root', has {sorted(entry)}")
  if entry["format"] not in readers.READERS:
    raise ValueError(f"config.datasets.{name}: unknown format {entry['format']!r}; known formats: "
                     f"{sorted(readers.READERS)}")
  root = entry["root"] or default_root
  kwargs = {"name": name}
  for key, value in entry.items():
    if key in ("format", "root"):
      continue
    if is_path_key(key):
      value = os.path.normpath(os.path.join(root, value))
    kwargs[key] = list(value) if isinstance(value, tuple) else value
  return kwargs


def build_sources(datasets: ml_collections.ConfigDict, names: Iterable[str],
                  default_root: str) -> dict[str, readers.NativeReader]:
  """Builds the readers of some `config.datasets` entries.

  Args:
    datasets: `config.datasets`.
    names: the entries to build.
    default_root: root of entries whose `root` is ''.

  Returns:
    {name: reader}.

  Raises:
    KeyError: naming a missing entry.
    ValueError: for a malformed entry; reader errors name the file at fault.
  """
  out = {}
  for name in names:
    if name not in datasets:
      raise KeyError(f"config.datasets has no entry '{name}'; it has {sorted(datasets.keys())}")
    entry = datasets[name]
    kwargs = reader_arguments(name, entry, default_root)
    try:
      out[name] = readers.build_reader(entry["format"], **kwargs)
    except TypeError as e:
      raise ValueError(f"config.datasets.{name}: arguments {sorted(kwargs)} do not fit the "
                       f"{entry['format']} reader: {e}") from e
  return out


def default_root(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The default dataset root: `config.data_root`, or the synthetic dataset in the workdir.

  The synthetic dataset is generated on first use into `workdir/data/synthetic` from
  `config.synthetic` (num_train, num_val, image_size, seed) by process 0 (the others wait) and
  marked complete with a `DONE` file, so a run killed while generating regenerates it.

  Args:
    config: the run config (`data_root`, `synthetic`).
    workdir: the run's directory.

  Returns:
    The root path.

  Raises:
    FileNotFoundError: when `config.data_root` does not exist.
  """
  if config.data_root:
    if not os.path.isdir(config.data_root):
      raise FileNotFoundError(f"config.data_root {config.data_root!r} is not a directory")
    return config.data_root
  root = os.path.join(workdir, "data", "synthetic")
  done = os.path.join(root, SYNTHETIC_DONE)
  if jax.process_index() == 0 and not os.path.exists(done):
    s = config.synthetic
    summary = synthetic.generate(root, s.num_train, s.num_val, s.image_size, s.seed)
    with open(done, "w") as f:
      f.write(f"{summary['seconds']}\n")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("synthetic data")
  return root
