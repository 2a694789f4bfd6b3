"""HIPIE part segmentation: hierarchical assembly of parts onto instances, and part groups.

HIPIE segments parts with a second forward pass on the same image whose vocabulary is
"object part" names (e.g. "car wheel", "person lower arm"); the semantic output of that pass
(`panoptic.semantic_inference`, argmax over classes) is the fine part label map. Following
berkeley-hipie/HIPIE (`demo_lib/part_segm_demo.py`, `sem_to_instance_map_by_instances`):

* Assembly: for every part class present in the label map (ascending, an ignore label skipped)
  and every instance (in order), the part mask is the class region ∩ the instance mask; it is
  kept when it has more than 100 pixels, its class name splits at the first space into an object
  word and a non-empty part ("boat " has no part), and, when instance class names are given, the
  object word equals the instance's name. Its label is the part, or the object word when the
  part is "body".
* Coarse groups (mIoU_PartS): fine part classes map to grouped classes through a lookup table
  (HIPIE's `label_group`; classes outside every group become background 0). For
  Pascal-Panoptic-Parts the groups are de Geus et al.'s 57 (`ppp_part_groups` builds the table
  from the eval spec `ppq_ppp_59_57_cvpr21_default`, the one `eval.miou.ppp_part_labels` uses).
* Part queries: a query word selects the assembled parts whose label equals or contains it, its
  children in a hierarchy ("head" → ear, eye, nose, muzzle, horn) or a synonym ("nose" ~
  "muzzle"); their union is the query's mask.

These run on the host (NumPy): their outputs are ragged.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np

PART_HIERARCHY: dict[str, tuple[str, ...]] = {'head': ('ear', 'eye', 'nose', 'muzzle', 'horn')}
PART_SYNONYMS: tuple[tuple[str, ...], ...] = (('nose', 'muzzle'),)


@dataclasses.dataclass
class InstancePart:
  """One part of one instance.

  Attributes:
    mask: bool [H, W].
    label: part name ("wheel"; the object name for a "body" part).
    part_class: index of the fine part class in the part vocabulary.
    instance: index of the instance it belongs to.
  """

  mask: np.ndarray
  label: str
  part_class: int
  instance: int


def split_part_name(name: str) -> tuple[str, str]:
  """Splits an "object part" class name at its first space.

  Args:
    name: e.g. "person lower arm".

  Returns:
    (object word, part) e.g. ("person", "lower arm"); part is "" when there is none.
  """
  pieces = name.split(' ', 1)
  return pieces[0], (pieces[1] if len(pieces) > 1 else '')


def assemble_parts(part_labels: np.ndarray, part_class_names: Sequence[str],
                   instance_masks: np.ndarray,
                   instance_names: Optional[Sequence[str]] = None,
                   ignore_label: Optional[int] = None, min_area: int = 100
                   ) -> list[InstancePart]:
  """Attaches part regions to the instances whose object word matches.

  Args:
    part_labels: int [H, W] fine part label map (indices into `part_class_names`).
    part_class_names: the part vocabulary, "object part" names.
    instance_masks: bool [N, H, W] instance masks of the same image.
    instance_names: optional N class names of the instances; without them any object word
      matches.
    ignore_label: label value that is not a part class (e.g. background), skipped.
    min_area: a part needs strictly more pixels than this.

  Returns:
    Parts in (part class ascending, instance) order.

  Raises:
    ValueError: for mismatched shapes or labels outside the vocabulary.
  """
  part_labels = np.asarray(part_labels)  # [H, W]
  instance_masks = np.asarray(instance_masks, bool)  # [N, H, W]
  if instance_masks.ndim != 3 or instance_masks.shape[1:] != part_labels.shape:
    raise ValueError(f'assemble_parts: instance masks {instance_masks.shape} do not match the '
                     f'part label map {part_labels.shape}')
  if instance_names is not None and len(instance_names) != len(instance_masks):
    raise ValueError(f'assemble_parts: {len(instance_names)} instance names for '
                     f'{len(instance_masks)} instance masks')
  present = [int(v) for v in np.unique(part_labels) if ignore_label is None or v != ignore_label]
  bad = [v for v in present if not 0 <= v < len(part_class_names)]
  if bad:
    raise ValueError(f'assemble_parts: labels {bad} are outside the {len(part_class_names)}-class '
                     f'part vocabulary')
  parts = []
  for v in present:
    obj, part = split_part_name(part_class_names[v])
    if not part:
      continue
    region = part_labels == v  # [H, W]
    for i, inst in enumerate(instance_masks):
      if instance_names is not None and obj != instance_names[i]:
        continue
      mask = region & inst  # [H, W]
      if mask.sum() > min_area:
        parts.append(InstancePart(mask, obj if part == 'body' else part, v, i))
  return parts


def part_group_lookup(num_classes: int, class_to_group: Mapping[int, int],
                      background: int = 0) -> np.ndarray:
  """Lookup table from fine part class indices to group ids.

  Args:
    num_classes: size of the fine part vocabulary.
    class_to_group: group id of each grouped fine class index.
    background: group of every other class.

  Returns:
    int64 [num_classes] table.

  Raises:
    ValueError: for class indices outside the vocabulary.
  """
  table = np.full([num_classes], background, np.int64)  # [C]
  for k, g in class_to_group.items():
    if not 0 <= int(k) < num_classes:
      raise ValueError(f'part_group_lookup: class {k} is outside the {num_classes}-class '
                       f'vocabulary')
    table[int(k)] = int(g)
  return table


def coarse_part_labels(part_labels: np.ndarray, lookup: np.ndarray) -> np.ndarray:
  """Maps a fine part label map to grouped part labels.

  Args:
    part_labels: int [H, W] fine part class indices.
    lookup: int [C] from `part_group_lookup`.

  Returns:
    int64 [H, W] group ids.
  """
  part_labels = np.asarray(part_labels, np.int64)  # [H, W]
  if part_labels.size and (part_labels.min() < 0 or part_labels.max() >= len(lookup)):
    raise ValueError(f'coarse_part_labels: labels [{part_labels.min()}, {part_labels.max()}] '
                     f'outside the {len(lookup)}-entry lookup')
  return np.asarray(lookup, np.int64)[part_labels]  # [H, W]


def ppp_part_groups(part_category_ids: Sequence[int], spec: Mapping) -> dict[int, int]:
  """mIoU_PartS groups of Pascal-Panoptic-Parts part classes.

  Args:
    part_category_ids: the part vocabulary as dataset scene-part ids, one per fine class index:
      sid·100 + pid for a part (what `data_pipelines.readers.pascal_panoptic_parts` assigns),
      sid for a class evaluated as one part (boat, chair, table, sofa).
    spec: the eval spec JSON (`eval/ppp_partpq_spec.json`), with
      'file_sid_pid2eval_sid_pid' and 'eval_sid_pid2eval_pid_flat'.

  Returns:
    {fine class index: flat group id 1..57} for the grouped classes (others are background).
  """
  to_eval = spec['file_sid_pid2eval_sid_pid']
  to_flat = spec['eval_sid_pid2eval_pid_flat']
  groups = {}
  for k, cid in enumerate(part_category_ids):
    eval_sid_pid = to_eval.get(str(int(cid)))
    if eval_sid_pid is not None and str(eval_sid_pid) in to_flat:
      groups[k] = int(to_flat[str(eval_sid_pid)])
  return groups


def matches_part_query(query: str, part_label: str,
                       hierarchy: Mapping[str, Sequence[str]] = PART_HIERARCHY,
                       synonyms: Sequence[Sequence[str]] = PART_SYNONYMS) -> bool:
  """Whether an assembled part answers a part query.

  Args:
    query: the queried part, e.g. "head".
    part_label: an `InstancePart.label`.
    hierarchy: coarse part -> its finer parts.
    synonyms: groups of interchangeable part names.

  Returns:
    True when the label equals or contains the query, is a child of it, or a synonym.
  """
  if query == part_label or query in part_label:
    return True
  if part_label in hierarchy.get(query, ()):
    return True
  return any(query in group and part_label in group for group in synonyms)


def part_query_mask(query: str, parts: Sequence[InstancePart], shape: Sequence[int],
                    hierarchy: Mapping[str, Sequence[str]] = PART_HIERARCHY,
                    synonyms: Sequence[Sequence[str]] = PART_SYNONYMS) -> np.ndarray:
  """Union of the assembled parts that answer a part query.

  Args:
    query: the queried part.
    parts: from `assemble_parts`.
    shape: (H, W) of the image.
    hierarchy: coarse part -> its finer parts.
    synonyms: groups of interchangeable part names.

  Returns:
    bool [H, W].
  """
  out = np.zeros(tuple(shape), bool)  # [H, W]
  for p in parts:
    if matches_part_query(query, p.label, hierarchy, synonyms):
      out |= p.mask
  return out
