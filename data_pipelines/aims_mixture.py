"""The AIMS sample-type mixture (AIMS appendix, Table 6) and the per-sample target building.

The table, as data (`SAMPLE_TYPES`); dataset names are the `config.datasets.<name>` keys:

  id  prompt         decoder   targets   eligible datasets
  1   full image     entity    entity    coco, entityseg, ppp, psg
  2   full image     part      part      coco, entityseg, ppp, psg
  3   full image     relation  relation  coco, entityseg, ppp, psg
  4   partial image  entity    entity    coco, entityseg, ppp, psg, paco
  5   partial image  part      part      coco, entityseg, ppp, psg, paco
  6   partial image  relation  relation  coco, entityseg, ppp, psg, paco
  7   one entity     part      part      ppp, paco
  8   two entities   relation  entity    psg

On top of the dataset column an image must annotate what the type needs (`is_eligible`), so e.g.
type 2 draws only from datasets with parts and type 3 only from those with relations. Each training
iteration of 8 samples holds each type once; a type's images are drawn uniformly over its eligible
datasets, then over that dataset's eligible images (the pipeline does the drawing).

Type 8. The paper: "subdividing two merged entities with relationships to two independent
entities", and Table 6 names the Relation decoder. We follow the table literally: the prompt is the
union of a related (subject, object) pair, the *relation* decoder's outputs are supervised, and its
targets are the two entities (`target_level == "entity"`). The trainer reads `decoder` and
`target_level` from this table instead of assuming they agree.

Prompt and supervised region per prompt kind (all on the canvas):
  * full: prompt = the image's valid area; region = valid ∩ annotated, minus crowd regions.
  * partial: the "annotated area" of the type's level: the union of the entities annotated at that
    level (entity: every entity; part: entities that have parts; relation: entities in a relation);
    prompt = region = that union.
  * one entity: a uniformly chosen entity with parts; prompt = region = its mask.
  * two entities: a uniformly chosen related pair; prompt = region = their union.
For one- and two-entity prompts the training crop is drawn among the positions that keep the
prompt entities' box on the canvas, so the prompt is never cropped away.

Targets. The prompt selects a set of entities E (all of them for the full image); then every level
the record annotates is filled: entities = E, parts = parts whose parent is in E, relations = the
relations between two members of E, with the mask = subject ∪ object. Class-agnostic relations with
the same (unordered) pair have identical masks and are merged; class-aware ones stay one per
(subject, object, predicate). Associations: ep[e, p] = part p belongs to entity e, re[r, e] = entity
e is the subject or object of relation r, marked valid only when the record has both levels. The
trainer supervises only the type's decoder; the other levels ride along (for the association loss
and for debugging).

Crowd segments (and the parts and relations hanging on them) are never targets; their pixels leave
the full-image region. Instances cropped away entirely are dropped (legitimate, their association
rows / columns go with them); instances beyond the configured maxima keep the largest and are
counted in `stats/truncated` (or raise when `strict`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Protocol, Sequence

import numpy as np

from data_pipelines import records as records_lib
from data_pipelines import transforms

PROMPTS = ("full", "partial", "one_entity", "two_entities")
EVAL_TASK = 0

_FULL = ("coco", "entityseg", "ppp", "psg")
_PARTIAL = ("coco", "entityseg", "ppp", "psg", "paco")


@dataclasses.dataclass(frozen=True)
class SampleType:
  """One row of AIMS Table 6.

  Attributes:
    id: the sample id 1..8 (the batch's `task`).
    prompt: one of `PROMPTS`.
    decoder: the decoder ("part", "entity", "relation") whose outputs are supervised.
    target_level: the level whose targets supervise that decoder.
    datasets: the eligible `config.datasets` names.
  """

  id: int
  prompt: str
  decoder: str
  target_level: str
  datasets: tuple[str, ...]

  def __post_init__(self):
    if self.prompt not in PROMPTS:
      raise ValueError(f"sample type {self.id}: prompt {self.prompt!r} is not one of {PROMPTS}")
    for level in (self.decoder, self.target_level):
      if level not in records_lib.LEVELS:
        raise ValueError(f"sample type {self.id}: {level!r} is not one of {records_lib.LEVELS}")


SAMPLE_TYPES = (
    SampleType(1, "full", "entity", "entity", _FULL),
    SampleType(2, "full", "part", "part", _FULL),
    SampleType(3, "full", "relation", "relation", _FULL),
    SampleType(4, "partial", "entity", "entity", _PARTIAL),
    SampleType(5, "partial", "part", "part", _PARTIAL),
    SampleType(6, "partial", "relation", "relation", _PARTIAL),
    SampleType(7, "one_entity", "part", "part", ("ppp", "paco")),
    SampleType(8, "two_entities", "relation", "entity", ("psg",)),
)
TABLE_DATASETS = tuple(sorted({d for t in SAMPLE_TYPES for d in t.datasets}))
# Evaluation: full-image prompt and every level's targets; all decoders predict, so `decoder` and
# `target_level` are not used; the batch's `task` is EVAL_TASK.
EVAL_TYPE = SampleType(EVAL_TASK, "full", "entity", "entity", ())


def sample_type(task: int) -> SampleType:
  """The table row with id `task`.

  Args:
    task: 1..8.

  Returns:
    The `SampleType`.
  """
  for t in SAMPLE_TYPES:
    if t.id == task:
      return t
  raise ValueError(f"AIMS sample type must be one of 1..{len(SAMPLE_TYPES)}, got {task}")


def is_eligible(st: SampleType, dataset: str, meta: records_lib.RecordMeta) -> bool:
  """Whether an image may be drawn for a sample type.

  Args:
    st: the sample type.
    dataset: the image's `config.datasets` name.
    meta: the image's `RecordMeta`.

  Returns:
    True when the dataset is in the type's row and the image annotates what the prompt and the
    targets need (entities; parts for part targets / one-entity prompts; relations for relation
    targets / two-entity prompts; for partial prompts a non-empty annotated area at that level).
  """
  levels = meta.levels
  if dataset not in st.datasets or "entity" not in levels or meta.num_segments == 0:
    return False
  if st.prompt == "one_entity":
    return "part" in levels and len(meta.entities_with_parts) > 0
  if st.prompt == "two_entities":
    return "relation" in levels and meta.num_relations > 0
  if st.target_level not in levels:
    return False
  if st.prompt == "partial" and st.target_level == "part":
    return len(meta.entities_with_parts) > 0
  if st.prompt == "partial" and st.target_level == "relation":
    return meta.num_relations > 0
  return True


class MetaSource(Protocol):
  """What the mixture needs from a reader: its length and cheap per-image metadata."""

  def __len__(self) -> int:
    ...

  def meta(self, index: int) -> records_lib.RecordMeta:
    ...


def eligible_indices(sources: Mapping[str, MetaSource], task_ids: Sequence[int]
                    ) -> dict[int, dict[str, list[int]]]:
  """Per sample type and dataset, the indices of the eligible images.

  Args:
    sources: reader sources keyed by `config.datasets` name.
    task_ids: the sample types in use.

  Returns:
    {task: {dataset: [index, ...]}} with only non-empty pools, datasets in sorted order.

  Raises:
    ValueError: for a source whose name is in no row of the table, or a type with no eligible
      image in any source (naming the type and the datasets it accepts).
  """
  unknown = sorted(set(sources) - set(TABLE_DATASETS))
  if unknown:
    raise ValueError(f"datasets {unknown} are in no AIMS sample type; the table uses "
                     f"{list(TABLE_DATASETS)}")
  metas = {name: [src.meta(i) for i in range(len(src))] for name, src in sources.items()}
  pools = {}
  for task in task_ids:
    st = sample_type(task)
    pools[task] = {}
    for name in sorted(sources):
      idx = [i for i, m in enumerate(metas[name]) if is_eligible(st, name, m)]
      if idx:
        pools[task][name] = idx
    if not pools[task]:
      raise ValueError(
          f"AIMS sample type {task} ({st.prompt} -> {st.decoder}) has no eligible image: it takes "
          f"{list(st.datasets)}, the sources are {sorted(sources)}")
  return pools


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How samples are built.

  Attributes:
    canvas: canvas side S (divisible by 4).
    max_instances: slots per level, {"part": N_p, "entity": N_e, "relation": N_r}.
    scale_range: training scale jitter (multipliers of the canvas-fitting scale).
    flip_prob: training probability of a left-right mirror.
    class_agnostic: labels are -1 and same-pair relations merge; otherwise dataset category ids
      (entities, parts) and predicate indices (relations).
    strict: raise instead of truncating when a level has more instances than slots.
    mask_stride: the target masks are S / mask_stride on a side (1, 2 or 4): area votes of the
      canvas masks, point-sampled by the losses at normalised coordinates, so any stride fits
      the stride-4 predictions; 1 keeps every canvas pixel.
  """

  canvas: int
  max_instances: Mapping[str, int]
  scale_range: tuple[float, float]
  flip_prob: float
  class_agnostic: bool
  strict: bool
  mask_stride: int

  def __post_init__(self):
    if self.canvas <= 0 or self.canvas % 4:
      raise ValueError(f"canvas must be a positive multiple of 4, got {self.canvas}")
    if self.mask_stride not in (1, 2, 4):
      raise ValueError(f"mask_stride must be 1, 2 or 4, got {self.mask_stride}")
    if sorted(self.max_instances) != sorted(records_lib.LEVELS):
      raise ValueError(f"max_instances needs keys {records_lib.LEVELS}, got {self.max_instances}")


@dataclasses.dataclass(frozen=True)
class Selection:
  """The instances a sample's prompt selects (before any geometry).

  Attributes:
    entities: selected non-crowd segments, in record order.
    parts: their parts.
    relations: (subject_id, object_id, label) among them.
    prompt_ids: ids of the entities forming the prompt, or None for the full image.
  """

  entities: tuple[records_lib.Segment, ...]
  parts: tuple[records_lib.Part, ...]
  relations: tuple[tuple[int, int, int], ...]
  prompt_ids: Optional[tuple[int, ...]]


def select(record: records_lib.ImageRecord, st: SampleType, class_agnostic: bool,
           rng: Optional[np.random.Generator]) -> Selection:
  """Chooses the prompt and the instances it selects.

  Args:
    record: the image.
    st: the sample type.
    class_agnostic: merge same-pair relations and use label -1.
    rng: grain's per-sample generator (one-entity / two-entity prompts draw from it).

  Returns:
    The `Selection`.

  Raises:
    ValueError: naming the image when it lacks what the type needs (it was not eligible).
  """
  where = f"{record.dataset}: image {record.image_id} ({record.file_name})"
  entities = [s for s in record.segments if not s.iscrowd] if "entity" in record.levels else []
  ids = {s.id for s in entities}
  parts = [p for p in record.parts if p.parent_id in ids] if "part" in record.levels else []
  relations = []
  if "relation" in record.levels:
    seen = set()
    for r in record.relations:
      if r.subject_id not in ids or r.object_id not in ids:
        continue
      key = (frozenset((r.subject_id, r.object_id)) if class_agnostic
             else (r.subject_id, r.object_id, r.predicate))
      if key not in seen:
        seen.add(key)
        relations.append((r.subject_id, r.object_id, -1 if class_agnostic else r.predicate))

  if st.prompt == "full":
    chosen = ids
  elif st.prompt == "partial":
    if st.target_level == "part":
      chosen = {p.parent_id for p in parts}
    elif st.target_level == "relation":
      chosen = {i for s, o, _ in relations for i in (s, o)}
    else:
      chosen = ids
  elif st.prompt == "one_entity":
    candidates = sorted({p.parent_id for p in parts})
    if not candidates or rng is None:
      raise ValueError(f"{where}: sample type {st.id} needs an entity with parts and an rng")
    chosen = {candidates[int(rng.integers(len(candidates)))]}
  else:
    pairs = sorted({(s, o) for s, o, _ in relations})
    if not pairs or rng is None:
      raise ValueError(f"{where}: sample type {st.id} needs a relation and an rng")
    chosen = set(pairs[int(rng.integers(len(pairs)))])
  if not chosen and st.prompt != "full":
    raise ValueError(f"{where}: sample type {st.id} finds no annotated {st.target_level} area")
  return Selection(
      entities=tuple(s for s in entities if s.id in chosen),
      parts=tuple(p for p in parts if p.parent_id in chosen),
      relations=tuple(r for r in relations if r[0] in chosen and r[1] in chosen),
      prompt_ids=None if st.prompt == "full" else tuple(s.id for s in entities if s.id in chosen))


def _union_box(boxes: Sequence[Sequence[float]]) -> tuple[float, float, float, float]:
  """The COCO [x, y, w, h] box around several COCO boxes."""
  b = np.asarray(boxes, np.float64)  # [K, 4]
  x0, y0 = b[:, 0].min(), b[:, 1].min()
  x1, y1 = (b[:, 0] + b[:, 2]).max(), (b[:, 1] + b[:, 3]).max()
  return (x0, y0, x1 - x0, y1 - y0)


def _level_arrays(canvas_masks: np.ndarray, labels: np.ndarray, max_count: int, level: str,
                  strict: bool, mask_stride: int,
                  where: str) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
  """Drops cropped-away instances, keeps the largest `max_count`, pads.

  Returns:
    (arrays keyed "masks", "valid", "labels", "boxes"; kept indices into the input; number of
    visible instances that did not fit).
  """
  areas = canvas_masks.sum(axis=(1, 2))  # [N]
  visible = np.flatnonzero(areas > 0)  # [V]
  kept = visible[transforms.keep_largest(areas[visible], max_count)]  # [K]
  truncated = len(visible) - len(kept)
  if truncated and strict:
    raise ValueError(f"{where}: {len(visible)} {level} instances exceed max {max_count} "
                     "(strict maxima)")
  kept_masks = canvas_masks[kept]  # [K, S, S]
  arrays = {
      "masks": transforms.pad_to(transforms.downsample_masks(kept_masks, mask_stride),
                                 max_count),  # [N, S/stride, S/stride]
      "valid": transforms.pad_to(np.ones(len(kept), bool), max_count),  # [N]
      "labels": transforms.pad_to(labels[kept].astype(np.int32) + 1, max_count) - 1,  # [N]
      "boxes": transforms.pad_to(transforms.masks_to_boxes(kept_masks), max_count),  # [N, 4]
  }
  return arrays, kept, truncated


def build_sample(record: records_lib.ImageRecord, st: SampleType, settings: SampleSettings,
                 rng: Optional[np.random.Generator]) -> dict[str, np.ndarray]:
  """One training (or, with `rng=None`, evaluation) sample with static shapes.

  Args:
    record: the image.
    st: the sample type (`EVAL_TYPE` for evaluation).
    settings: canvas, maxima, jitter.
    rng: grain's per-sample generator; None means the evaluation geometry (fit, no flip, no crop).

  Returns:
    Arrays without the batch axis: image uint8 [S,S,3], valid bool [S,S], prompt/mask and
    prompt/region bool [S,S], task int32 [], orig_size int32 [2] (H, W); per level L:
    L/masks bool [N_L,S/k,S/k] (k = `settings.mask_stride`), L/valid bool [N_L], L/labels int32
    [N_L], L/boxes float32 [N_L,4];
    assoc/ep bool [N_e,N_p], assoc/re bool [N_r,N_e], assoc/ep_valid and assoc/re_valid bool [];
    stats/truncated int32 [3] (instances beyond the maxima, in `records.LEVELS` order).
  """
  where = f"{record.dataset}: image {record.image_id} ({record.file_name})"
  sel = select(record, st, settings.class_agnostic, rng)
  image = transforms.decode_image(record)  # [H, W, 3]
  if rng is None:
    geom = transforms.eval_geometry(record.height, record.width, settings.canvas)
  else:
    anchor = None
    if st.prompt in ("one_entity", "two_entities"):
      anchor = _union_box([s.bbox for s in sel.entities if s.id in sel.prompt_ids])
    geom = transforms.random_geometry(record.height, record.width, settings.canvas, rng,
                                      settings.scale_range, settings.flip_prob, anchor)
  image, valid = transforms.warp_image(image, geom)  # [S, S, 3], [S, S]

  ent = transforms.warp_masks([s.mask for s in sel.entities], geom)  # [Ne, S, S]
  part = transforms.warp_masks([p.mask for p in sel.parts], geom)  # [Np, S, S]
  row = {s.id: i for i, s in enumerate(sel.entities)}
  subj = np.array([row[r[0]] for r in sel.relations], np.int64)  # [Nr]
  obj = np.array([row[r[1]] for r in sel.relations], np.int64)  # [Nr]
  rel = ent[subj] | ent[obj]  # [Nr, S, S]

  if sel.prompt_ids is None:
    prompt = valid
    region = valid.copy()  # [S, S]
    if record.annotated is not None:
      region &= transforms.warp_masks([record.annotated], geom)[0]
    crowd = [s.mask for s in record.segments if s.iscrowd]
    if crowd:
      region &= ~transforms.warp_masks([np.logical_or.reduce(crowd)], geom)[0]
  else:
    prompt = ent[[row[i] for i in sel.prompt_ids]].any(axis=0)  # [S, S]
    region = prompt

  cls = not settings.class_agnostic
  labels = {
      "entity": np.array([s.category_id if cls else -1 for s in sel.entities], np.int64),
      "part": np.array([p.category_id if cls else -1 for p in sel.parts], np.int64),
      "relation": np.array([r[2] for r in sel.relations], np.int64),
  }
  canvas_masks = {"entity": ent, "part": part, "relation": rel}
  out = {
      "image": image,
      "valid": valid,
      "prompt/mask": prompt,
      "prompt/region": region,
      "task": np.int32(st.id),
      "orig_size": np.array([record.height, record.width], np.int32),
  }
  kept, truncated = {}, []
  for level in records_lib.LEVELS:
    arrays, kept[level], n = _level_arrays(canvas_masks[level], labels[level],
                                           settings.max_instances[level], level, settings.strict,
                                           settings.mask_stride, where)
    truncated.append(n)
    out.update({f"{level}/{k}": v for k, v in arrays.items()})

  parent_row = np.array([row[p.parent_id] for p in sel.parts], np.int64)  # [Np]
  entity_rows = np.arange(len(sel.entities))  # [Ne]
  ep = parent_row[None, :] == entity_rows[:, None]  # [Ne, Np]
  rel_ent = ((subj[:, None] == entity_rows[None, :])
             | (obj[:, None] == entity_rows[None, :]))  # [Nr, Ne]
  n_p, n_e, n_r = (settings.max_instances[k] for k in ("part", "entity", "relation"))
  out["assoc/ep"] = transforms.pad_to(transforms.pad_to(
      ep[np.ix_(kept["entity"], kept["part"])], n_e, 0), n_p, 1)  # [N_e, N_p]
  out["assoc/re"] = transforms.pad_to(transforms.pad_to(
      rel_ent[np.ix_(kept["relation"], kept["entity"])], n_r, 0), n_e, 1)  # [N_r, N_e]
  out["assoc/ep_valid"] = np.bool_({"entity", "part"} <= record.levels)
  out["assoc/re_valid"] = np.bool_({"entity", "relation"} <= record.levels)
  out["stats/truncated"] = np.array(truncated, np.int32)  # [3]
  return out


def padding_sample(settings: SampleSettings) -> dict[str, np.ndarray]:
  """An all-invalid sample (zero image, no targets) that fills the last evaluation batch.

  Args:
    settings: canvas and maxima.

  Returns:
    Arrays with the keys and shapes of `build_sample`, task `EVAL_TASK`, everything zero / False.
  """
  s = settings.canvas
  out = {
      "image": np.zeros((s, s, 3), np.uint8),
      "valid": np.zeros((s, s), bool),
      "prompt/mask": np.zeros((s, s), bool),
      "prompt/region": np.zeros((s, s), bool),
      "task": np.int32(EVAL_TASK),
      "orig_size": np.zeros(2, np.int32),
  }
  for level in records_lib.LEVELS:
    n = settings.max_instances[level]
    m = s // settings.mask_stride
    out[f"{level}/masks"] = np.zeros((n, m, m), bool)
    out[f"{level}/valid"] = np.zeros(n, bool)
    out[f"{level}/labels"] = np.full(n, -1, np.int32)
    out[f"{level}/boxes"] = np.zeros((n, 4), np.float32)
  n_p, n_e, n_r = (settings.max_instances[k] for k in ("part", "entity", "relation"))
  out["assoc/ep"] = np.zeros((n_e, n_p), bool)
  out["assoc/re"] = np.zeros((n_r, n_e), bool)
  out["assoc/ep_valid"] = np.bool_(False)
  out["assoc/re_valid"] = np.bool_(False)
  out["stats/truncated"] = np.zeros(3, np.int32)
  return out
