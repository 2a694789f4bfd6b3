"""One HIPIE training or evaluation sample from an `ImageRecord`, per task, with static shapes.

Tasks (the batch's `task`, `TASK_IDS`):
  * panoptic (0): the text is a class prompt (class names joined by ". "); every non-crowd thing
    segment is a `things/*` instance with its box, mask and positive map (the tokens of its class
    name), every non-crowd stuff segment a `stuff/*` region with its class. Detection and instance
    segmentation read the same sample (boxes are the tight boxes of the masks, as the reference's
    `gt_masks.get_bounding_boxes()`).
  * referring (1): the text is one expression (cleaned as the reference's `clean_string`: lower
    case, . , ' ! ? " ( ) * # : ; removed, - and / turned into spaces); its target is the only
    `things/*` instance, with label 0; no stuff. The sentence is one "class" whose tokens are all
    its real tokens ([CLS] and [SEP] included: HIPIE pools the sentence feature over every valid
    token), so `text/positive_map[0]` = `things/positive_map[0]` = `text/mask > 0`. A mirrored
    image swaps left and right in the sentence (`transforms.flip_sentence`, whole words; the
    reference replaces substrings). As in the reference, an expression whose ref has an ordinal word
    (first .. tenth) in any of its sentences is never cropped (the scale jitter is capped at the
    canvas-fitting scale); otherwise the crop keeps the target's box on the canvas (the reference
    instead re-draws a sample whose target was cropped away).
  * part (2): the Pascal-Panoptic-Parts / PACO training of HIPIE's hierarchical stage: the class
    prompt is the part vocabulary ("object part" names, e.g. "car wheel", then the objects without
    parts and the stuff classes, as the reference's `pascal_parts_pano` label list); things are the
    parts (labelled "object part") and the thing segments of part-less classes; stuff the stuff
    segments. A thing segment of a class that has parts contributes only through its parts. With
    `part_object_tokens` (the reference's PART_MODE) a part's positive map also covers the object
    word of every other prompt class of the same object (all the "car"s of "car wheel. car door"),
    so a mask embedding is contrasted with both its part and its object label (HIPIE Sec. 3.7,
    L_clsPart + L_clsThing). The reference matches such words token by token (single-piece words
    only); here the object's name span is used, which also covers multi-piece names.

Class prompts. The vocabulary of a dataset (`Vocabulary`) fixes the class index c; the text order
varies. `prompt="fixed"` (the reference's evaluation prompt) lists every class in vocabulary order.
`prompt="sampled"` is the reference's training prompt (GLIP's
`convert_object_detection_to_grounding_optimized_for_od` with control probabilities
(0, 0, 0.5, 0)): the present classes ("positives", those of the visible targets), shuffled and kept
while their "name. " tokens fit in T - 2 (targets of dropped classes are dropped and counted in
`stats/truncated`); then K classes drawn without replacement from the whole vocabulary, K =
min(max_negatives, C_vocab) with probability 0.5, else uniform in 1..that; those not present are
the negatives, shuffled and kept while the remaining budget stays positive; finally negatives and
positives are shuffled together. (The reference's draw can also pick its "__background__" entry;
ours cannot.) Either way `text/positive_map[c]` marks the tokens of vocabulary class c wherever it
sits in this sample's text, and is empty for classes not in the text and for padding rows, so
labels are stable vocabulary indices.

Arrays without the batch axis (S = canvas, T = max_text_len, C = max_classes, N = max_things,
Ns = max_stuff):
  image uint8 [S,S,3], valid bool [S,S], task int32 [], orig_size int32 [2] (H, W),
  expression int32 [] (index into `record.expressions`, -1 for non-referring samples),
  text/ids int32 [T], text/mask int32 [T] (1 on real tokens), text/positive_map bool [C,T],
  things/masks bool [N,S/4,S/4], things/boxes float32 [N,4] (normalised cxcywh),
  things/labels int32 [N] (vocabulary index, -1 on padding), things/positive_map bool [N,T],
  things/valid bool [N], and the same five `stuff/*` keys with Ns slots,
  stats/truncated int32 [2] (things, stuff beyond the slots or dropped from an overflowing prompt).
Masks follow `transforms`: nearest warping to the canvas, area vote to S/4, empty instances (cropped
away) dropped, the largest kept when there are more than the slots (the reference keeps a random
subset of MAX_INSTANCES). Crowd segments are never targets (the reference drops them).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional, Sequence

import numpy as np
import transformers

from data_pipelines import records as records_lib
from data_pipelines import transforms
from data_pipelines.readers import base as readers_base
from data_pipelines.synthetic import taxonomy
from hiseg_jax.text import prompts

TASKS = ("panoptic", "referring", "part")
TASK_IDS = {name: i for i, name in enumerate(TASKS)}
PROMPT_MODES = ("fixed", "sampled")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
            "tenth")
_SENTENCE_PUNCTUATION = re.compile(r"[.,'!?\"()*#:;]")
# GLIP's control probability of "all negatives" (else a uniform number of negatives).
_FULL_NEGATIVE_PROBABILITY = 0.5


def clean_sentence(sentence: str) -> str:
  """A referring expression as the reference feeds it to BERT.

  Args:
    sentence: the raw sentence.

  Returns:
    Lower-cased, with . , ' ! ? " ( ) * # : ; removed and - and / replaced by spaces.
  """
  return _SENTENCE_PUNCTUATION.sub("", sentence.lower()).replace("-", " ").replace("/", " ")


def has_ordinal(sentence: str) -> bool:
  """Whether a sentence names an ordinal (the reference then disables cropping).

  Args:
    sentence: a referring expression.

  Returns:
    True when one of `ORDINALS` occurs in its lower-cased text (substring test, as the reference).
  """
  low = sentence.lower()
  return any(word in low for word in ORDINALS)


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """The classes of one dataset for one task; the class index is the position in `names`.

  Attributes:
    names: cleaned prompt names (`prompts.clean_class_name` applied), unique.
    isthing: per class, thing (True) or stuff.
    objects: per class, the object name a part class starts with ("car" for "car wheel"), None
      for other classes.
    segment_class: dataset category id of a segment -> class index.
    part_class: dataset category id of a part -> class index.
  """

  names: tuple[str, ...]
  isthing: tuple[bool, ...]
  objects: tuple[Optional[str], ...]
  segment_class: Mapping[int, int]
  part_class: Mapping[int, int]

  def __post_init__(self):
    n = len(self.names)
    if not n or len(set(self.names)) != n:
      raise ValueError(f"vocabulary names must be non-empty and unique, got {self.names}")
    if len(self.isthing) != n or len(self.objects) != n:
      raise ValueError(f"vocabulary has {n} names, {len(self.isthing)} isthing flags and "
                       f"{len(self.objects)} objects")
    for name, obj in zip(self.names, self.objects):
      if name != prompts.clean_class_name(name):
        raise ValueError(f"vocabulary name {name!r} is not cleaned (clean_class_name)")
      if obj is not None and not name.startswith(obj + " "):
        raise ValueError(f"vocabulary part class {name!r} does not start with its object {obj!r}")
    for what, table in (("segment", self.segment_class), ("part", self.part_class)):
      bad = {k: v for k, v in table.items() if not 0 <= v < n}
      if bad:
        raise ValueError(f"vocabulary {what} categories {bad} point outside [0, {n})")


def vocabulary_from_categories(categories: Sequence[Mapping], task: str) -> Vocabulary:
  """A vocabulary from COCO-style category entries.

  Part categories are those named "object:part" (PACO's convention); their prompt name is
  "object part".

  Args:
    categories: entries with "id", "name" and optionally "isthing" (default 1).
    task: "panoptic" (every non-part category, in the given order) or "part" (the part
      categories, then the non-part categories that are not the object of any part).

  Returns:
    The `Vocabulary`.

  Raises:
    ValueError: for a malformed entry, a duplicate id or name, or another task.
  """
  if task not in ("panoptic", "part"):
    raise ValueError(f"class vocabularies exist for 'panoptic' and 'part', not {task!r}")
  seen = set()
  parts, others = [], []
  for k, c in enumerate(categories):
    if not isinstance(c, Mapping) or "id" not in c or "name" not in c:
      raise ValueError(f"category entry #{k} needs 'id' and 'name', got {c!r}")
    cid = int(c["id"])
    if cid in seen:
      raise ValueError(f"category id {cid} appears twice")
    seen.add(cid)
    name = str(c["name"])
    if ":" in name:
      obj, part = (prompts.clean_class_name(x).strip() for x in name.split(":", 1))
      parts.append((cid, f"{obj} {part}", obj))
    else:
      others.append((cid, prompts.clean_class_name(name).strip(), bool(c.get("isthing", 1))))
  if task == "panoptic":
    entries = [(cid, name, thing, None, False) for cid, name, thing in others]
  else:
    with_parts = {obj for _, _, obj in parts}
    entries = [(cid, name, True, obj, True) for cid, name, obj in parts]
    entries += [(cid, name, thing, None, False) for cid, name, thing in others
                if name not in with_parts]
  if not entries:
    raise ValueError(f"no {task} classes among {len(categories)} categories")
  return Vocabulary(
      names=tuple(e[1] for e in entries),
      isthing=tuple(e[2] for e in entries),
      objects=tuple(e[3] for e in entries),
      segment_class={e[0]: i for i, e in enumerate(entries) if not e[4]},
      part_class={e[0]: i for i, e in enumerate(entries) if e[4]})


def load_vocabulary(path: str, task: str) -> Vocabulary:
  """A vocabulary from the `categories` of a COCO / COCO panoptic / PACO JSON file.

  Args:
    path: the JSON file.
    task: "panoptic" or "part".

  Returns:
    The `Vocabulary`.
  """
  data = readers_base.load_json(path, "category file")
  readers_base.require_keys(data, ("categories",), path)
  try:
    return vocabulary_from_categories(data["categories"], task)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def synthetic_vocabulary(task: str, fmt: str) -> Vocabulary:
  """The vocabulary of the synthetic dataset as a reader format numbers it.

  Args:
    task: "panoptic" or "part".
    fmt: the reader format ("coco_panoptic", "coco_instances", "pascal_panoptic_parts", "paco");
      part ids are sid·100 + pid for Pascal-Panoptic-Parts and the PACO ids otherwise.

  Returns:
    The `Vocabulary` (taxonomy order: things, stuff; parts first for "part").
  """
  cats = [{"id": taxonomy.CATEGORY_IDS[c], "name": c, "isthing": int(c in taxonomy.THING_CLASSES)}
          for c in taxonomy.THING_CLASSES + taxonomy.STUFF_CLASSES]
  for obj, part in taxonomy.PART_CATEGORIES:
    cid = (taxonomy.CATEGORY_IDS[obj] * 100 + taxonomy.part_pid(obj, part)
           if fmt == "pascal_panoptic_parts" else taxonomy.PART_CATEGORY_IDS[(obj, part)])
    cats.append({"id": cid, "name": f"{obj}:{part}"})
  return vocabulary_from_categories(cats, task)


def resolve_vocabulary(spec: str, task: str, fmt: str) -> Vocabulary:
  """The vocabulary a config names.

  Args:
    spec: "synthetic" (the taxonomy, numbered as `fmt` numbers it) or the path of a JSON file with
      COCO-style `categories` (COCO panoptic / instances JSON, PACO JSON, or a hand-made file for
      formats without one, such as Pascal-Panoptic-Parts with part ids sid·100 + pid).
    task: "panoptic" or "part".
    fmt: the dataset's reader format.

  Returns:
    The `Vocabulary`.
  """
  if spec == "synthetic":
    return synthetic_vocabulary(task, fmt)
  return load_vocabulary(spec, task)


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How HIPIE samples are built.

  Attributes:
    canvas: canvas side S (divisible by 4).
    max_things: thing slots N.
    max_stuff: stuff slots Ns.
    max_classes: class rows C of `text/positive_map` (>= every vocabulary in use).
    max_text_len: token length T.
    scale_range: training scale jitter (multipliers of the canvas-fitting scale).
    flip_prob: training probability of a left-right mirror.
    strict: raise instead of dropping targets beyond the slots or the prompt budget.
    prompt: "fixed" or "sampled" training class prompts (evaluation is always fixed).
    max_negatives: GLIP's `random_sample_negative` (85).
    part_object_tokens: part positive maps also cover the object words (reference PART_MODE).
  """

  canvas: int
  max_things: int
  max_stuff: int
  max_classes: int
  max_text_len: int
  scale_range: tuple[float, float]
  flip_prob: float
  strict: bool
  prompt: str
  max_negatives: int
  part_object_tokens: bool

  def __post_init__(self):
    if self.canvas <= 0 or self.canvas % 4:
      raise ValueError(f"canvas must be a positive multiple of 4, got {self.canvas}")
    for key in ("max_things", "max_stuff", "max_classes", "max_negatives"):
      if getattr(self, key) < 1:
        raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
    if self.max_text_len < 4:
      raise ValueError(f"max_text_len must be >= 4, got {self.max_text_len}")
    if self.prompt not in PROMPT_MODES:
      raise ValueError(f"prompt must be one of {PROMPT_MODES}, got {self.prompt!r}")


@dataclasses.dataclass(frozen=True)
class _Targets:
  """Instances of one kind on the canvas, before slot selection."""

  masks: np.ndarray  # [K, S, S] bool
  classes: np.ndarray  # [K] int64 vocabulary index


def _class_of(table: Mapping[int, int], category_id: int, what: str, where: str) -> int:
  """The class index of a category id, or an error naming the image and the id."""
  if category_id not in table:
    raise ValueError(f"{where}: {what} category {category_id} is not in the {what} vocabulary "
                     f"(known ids {sorted(table)[:20]}...)")
  return table[category_id]


class SampleBuilder:
  """Builds HIPIE samples (see the module docstring); fixed prompts are tokenised once.

  Args:
    tokenizer: the fast BERT tokenizer (`hiseg_jax.text.load_bert_tokenizer`).
    settings: the `SampleSettings`.
  """

  def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase, settings: SampleSettings):
    self._tokenizer = tokenizer
    self._settings = settings
    self._fixed: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    self._lengths: dict[str, int] = {}

  def build(self, record: records_lib.ImageRecord, task: str, vocabulary: Optional[Vocabulary],
            rng: Optional[np.random.Generator], expression: int = -1) -> dict[str, np.ndarray]:
    """One sample.

    Args:
      record: the image.
      task: one of `TASKS`.
      vocabulary: the dataset's vocabulary for "panoptic" / "part"; None for "referring".
      rng: grain's per-sample generator; None gives the evaluation sample (canvas-fitting scale,
        no flip, fixed prompt).
      expression: for "referring", the index into `record.expressions`.

    Returns:
      The arrays of the module docstring.
    """
    where = f"{record.dataset}: image {record.image_id} ({record.file_name})"
    if task not in TASKS:
      raise ValueError(f"{where}: task must be one of {TASKS}, got {task!r}")
    if task == "referring":
      return self._referring(record, rng, expression, where)
    if vocabulary is None:
      raise ValueError(f"{where}: task {task!r} needs a class vocabulary")
    if len(vocabulary.names) > self._settings.max_classes:
      raise ValueError(f"{where}: the {task} vocabulary has {len(vocabulary.names)} classes, "
                       f"more than max_classes={self._settings.max_classes}")
    return self._classes(record, task, vocabulary, rng, where)

  def padding(self, task: str) -> dict[str, np.ndarray]:
    """An all-invalid sample (zero image, no text, no targets) that fills an evaluation batch.

    Args:
      task: the task of the evaluation pass.

    Returns:
      Arrays with the keys, shapes and dtypes of `build`.
    """
    st = self._settings
    s, t = st.canvas, st.max_text_len
    out = {
        "image": np.zeros((s, s, 3), np.uint8),
        "valid": np.zeros((s, s), bool),
        "task": np.int32(TASK_IDS[task]),
        "orig_size": np.zeros(2, np.int32),
        "expression": np.int32(-1),
        "text/ids": np.zeros(t, np.int32),
        "text/mask": np.zeros(t, np.int32),
        "text/positive_map": np.zeros((st.max_classes, t), bool),
        "stats/truncated": np.zeros(2, np.int32),
    }
    for kind, n in (("things", st.max_things), ("stuff", st.max_stuff)):
      out.update(self._slots(kind, np.zeros((0, s, s), bool), np.zeros(0, np.int64),
                             np.zeros((0, t), bool), n, where="")[0])
    return out

  # Geometry and slots.

  def _geometry(self, record: records_lib.ImageRecord, rng: Optional[np.random.Generator],
                scale_range: tuple[float, float],
                anchor: Optional[Sequence[float]] = None) -> transforms.Geometry:
    """Evaluation geometry without an rng, else jitter, flip and a crop keeping `anchor`."""
    if rng is None:
      return transforms.eval_geometry(record.height, record.width, self._settings.canvas)
    return transforms.random_geometry(record.height, record.width, self._settings.canvas, rng,
                                      scale_range, self._settings.flip_prob, anchor)

  def _slots(self, kind: str, masks: np.ndarray, classes: np.ndarray, positive: np.ndarray,
             n: int, where: str) -> tuple[dict[str, np.ndarray], int]:
    """Keeps the visible instances (largest first when too many) and pads to `n` slots."""
    areas = masks.sum(axis=(1, 2))  # [K]
    visible = np.flatnonzero(areas > 0)  # [V]
    kept = visible[transforms.keep_largest(areas[visible], n)]  # [M]
    dropped = len(visible) - len(kept)
    if dropped and self._settings.strict:
      raise ValueError(f"{where}: {len(visible)} {kind} exceed max {n} (strict maxima)")
    kept_masks = masks[kept]  # [M, S, S]
    arrays = {
        f"{kind}/masks": transforms.pad_to(
            transforms.downsample_masks(kept_masks, 4), n),  # [n, S/4, S/4]
        f"{kind}/boxes": transforms.pad_to(transforms.masks_to_boxes(kept_masks), n),  # [n, 4]
        f"{kind}/labels": transforms.pad_to(classes[kept].astype(np.int32) + 1, n) - 1,  # [n]
        f"{kind}/positive_map": transforms.pad_to(positive[kept], n),  # [n, T]
        f"{kind}/valid": transforms.pad_to(np.ones(len(kept), bool), n),  # [n]
    }
    return arrays, dropped

  # Class prompts.

  def _prompt_arrays(self, names: Sequence[str], order: Sequence[int], vocabulary: Vocabulary
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ids [T], mask [T], class -> tokens [C, T] and class -> object-word tokens [C, T]."""
    st = self._settings
    prompt = prompts.build_class_prompt([names[c] for c in order], self._tokenizer, clean=False)
    t = st.max_text_len
    if prompt.num_tokens > t:
      raise ValueError(f"a prompt of {len(order)} classes has {prompt.num_tokens} tokens, more "
                       f"than max_text_len={t}")
    ids, mask = prompt.padded(t)  # [T], [T]
    text_map = np.zeros((st.max_classes, t), bool)  # [C, T]
    text_map[np.asarray(order, np.int64)] = prompt.positive_map(t)  # [len(order), T]
    object_map = np.zeros((st.max_classes, t), bool)  # [C, T]
    if any(vocabulary.objects[c] is not None for c in order):
      enc = self._tokenizer(prompt.text, add_special_tokens=True, return_offsets_mapping=True)
      starts = np.asarray(enc["offset_mapping"], np.int64)[:, 0]  # [T']
      for row, c in enumerate(order):
        obj = vocabulary.objects[c]
        if obj is None:
          continue
        first, end = prompt.token_spans[row]
        word_end = prompt.char_spans[row, 0] + len(obj)
        object_map[c, first:end] = starts[first:end] < word_end  # [end - first]
    return ids, mask, text_map, object_map

  def _name_length(self, name: str) -> int:
    """Tokens of "name. " (GLIP's budget unit)."""
    if name not in self._lengths:
      self._lengths[name] = len(self._tokenizer.tokenize(name + prompts.SEPARATOR))
    return self._lengths[name]

  def _sampled_order(self, vocabulary: Vocabulary, present: Sequence[int],
                     rng: np.random.Generator) -> list[int]:
    """GLIP's training prompt: positives that fit, sampled negatives, shuffled together."""
    st = self._settings
    budget = st.max_text_len - 2
    positives = [int(c) for c in rng.permutation(np.asarray(sorted(present), np.int64))]
    kept, used = [], 0
    for c in positives:
      used += self._name_length(vocabulary.names[c])
      if used > budget:
        break
      kept.append(c)
    num_classes = len(vocabulary.names)
    full = min(st.max_negatives, num_classes)
    if rng.random() < _FULL_NEGATIVE_PROBABILITY:
      count = full
    else:
      count = int(rng.integers(max(1, full))) + 1
    drawn = rng.choice(num_classes, size=count, replace=False)  # [count]
    present_set = set(positives)
    negatives = [int(c) for c in rng.permutation(drawn) if int(c) not in present_set]
    remaining = budget - used
    screened = []
    for c in negatives:
      remaining -= self._name_length(vocabulary.names[c])
      if remaining <= 0:
        break
      screened.append(c)
    if not screened + kept:
      raise ValueError(f"max_text_len={st.max_text_len} leaves no room for any class name")
    return [int(c) for c in rng.permutation(np.asarray(screened + kept, np.int64))]

  # Tasks.

  def _classes(self, record: records_lib.ImageRecord, task: str, vocabulary: Vocabulary,
               rng: Optional[np.random.Generator], where: str) -> dict[str, np.ndarray]:
    """A panoptic or part sample: class prompt, things and stuff."""
    st = self._settings
    image = transforms.decode_image(record)  # [H, W, 3]
    geom = self._geometry(record, rng, st.scale_range)
    image, valid = transforms.warp_image(image, geom)  # [S, S, 3], [S, S]
    things, stuff = self._targets(record, task, vocabulary, geom, where)

    present = sorted(set(things.classes[things.masks.any(axis=(1, 2))].tolist())
                     | set(stuff.classes[stuff.masks.any(axis=(1, 2))].tolist()))
    if rng is None or st.prompt == "fixed":
      key = vocabulary.names
      if key not in self._fixed:
        self._fixed[key] = self._prompt_arrays(vocabulary.names, range(len(key)), vocabulary)
      ids, mask, text_map, object_map = self._fixed[key]
    else:
      order = self._sampled_order(vocabulary, present, rng)
      ids, mask, text_map, object_map = self._prompt_arrays(vocabulary.names, order, vocabulary)

    in_prompt = text_map.any(axis=1)  # [C]
    out = {
        "image": image,
        "valid": valid,
        "task": np.int32(TASK_IDS[task]),
        "orig_size": np.array([record.height, record.width], np.int32),
        "expression": np.int32(-1),
        "text/ids": ids,
        "text/mask": mask,
        "text/positive_map": text_map,
    }
    truncated = []
    for kind, targets, n in (("things", things, st.max_things), ("stuff", stuff, st.max_stuff)):
      visible = targets.masks.any(axis=(1, 2))  # [K]
      fits = in_prompt[targets.classes] if len(targets.classes) else np.zeros(0, bool)  # [K]
      overflow = int((visible & ~fits).sum())
      if overflow and st.strict:
        raise ValueError(f"{where}: {overflow} {kind} have classes that do not fit the prompt "
                         f"of max_text_len={st.max_text_len} (strict maxima)")
      keep = np.flatnonzero(fits)  # [K']
      classes = targets.classes[keep]  # [K']
      positive = text_map[classes]  # [K', T]
      if task == "part" and st.part_object_tokens and kind == "things":
        positive = positive | self._object_tokens(vocabulary, classes, object_map)  # [K', T]
      arrays, dropped = self._slots(kind, targets.masks[keep], classes, positive, n, where)
      out.update(arrays)
      truncated.append(overflow + dropped)
    out["stats/truncated"] = np.array(truncated, np.int32)  # [2]
    return out

  @staticmethod
  def _object_tokens(vocabulary: Vocabulary, classes: np.ndarray, object_map: np.ndarray
                     ) -> np.ndarray:
    """Per instance, the object-word tokens of every prompt class sharing its object."""
    out = np.zeros((len(classes), object_map.shape[1]), bool)  # [K, T]
    for k, c in enumerate(classes.tolist()):
      obj = vocabulary.objects[c]
      if obj is None:
        continue
      same = [j for j, o in enumerate(vocabulary.objects) if o == obj]
      out[k] = object_map[same].any(axis=0)  # [T]
    return out

  def _targets(self, record: records_lib.ImageRecord, task: str, vocabulary: Vocabulary,
               geom: transforms.Geometry, where: str) -> tuple[_Targets, _Targets]:
    """Thing and stuff targets of a panoptic or part sample, on the canvas."""
    segments = [s for s in record.segments if not s.iscrowd]
    thing_masks, thing_classes, stuff_masks, stuff_classes = [], [], [], []
    if task == "part":
      alive = {s.id for s in segments}
      with_parts = set()
      for p in record.parts:
        if p.parent_id in alive:
          with_parts.add(p.parent_id)
          thing_masks.append(p.mask)
          thing_classes.append(_class_of(vocabulary.part_class, p.category_id, "part", where))
      for s in segments:
        if s.isthing and (s.id in with_parts or s.category_id not in vocabulary.segment_class):
          continue
        c = _class_of(vocabulary.segment_class, s.category_id, "segment", where)
        (thing_masks if s.isthing else stuff_masks).append(s.mask)
        (thing_classes if s.isthing else stuff_classes).append(c)
    else:
      for s in segments:
        c = _class_of(vocabulary.segment_class, s.category_id, "segment", where)
        (thing_masks if s.isthing else stuff_masks).append(s.mask)
        (thing_classes if s.isthing else stuff_classes).append(c)
    return (_Targets(transforms.warp_masks(thing_masks, geom), np.asarray(thing_classes, np.int64)),
            _Targets(transforms.warp_masks(stuff_masks, geom), np.asarray(stuff_classes, np.int64)))

  def _sentence_tokens(self, sentence: str) -> tuple[np.ndarray, np.ndarray]:
    """ids [T] and mask [T] of a sentence, truncated to T (keeping [SEP]) and zero-padded."""
    ids, mask = prompts.tokenize_sentences([sentence], self._tokenizer,
                                           self._settings.max_text_len)  # [1, T] x 2
    return ids[0], mask[0]

  def _referring(self, record: records_lib.ImageRecord, rng: Optional[np.random.Generator],
                 expression: int, where: str) -> dict[str, np.ndarray]:
    """A referring sample: the sentence and its one target."""
    st = self._settings
    if not 0 <= expression < len(record.expressions):
      raise ValueError(f"{where}: expression index {expression} is outside "
                       f"[0, {len(record.expressions)})")
    expr = record.expressions[expression]
    target = record.segment(expr.target_id)
    scale_range = st.scale_range
    if any(has_ordinal(e.sentence) for e in record.expressions if e.ref_id == expr.ref_id):
      scale_range = (min(scale_range[0], 1.0), min(scale_range[1], 1.0))
    image = transforms.decode_image(record)  # [H, W, 3]
    geom = self._geometry(record, rng, scale_range, anchor=target.bbox)
    image, valid = transforms.warp_image(image, geom)  # [S, S, 3], [S, S]
    sentence = transforms.warp_sentences([clean_sentence(expr.sentence)], geom)[0]
    ids, mask = self._sentence_tokens(sentence)  # [T], [T]
    text_map = np.zeros((st.max_classes, st.max_text_len), bool)  # [C, T]
    text_map[0] = mask > 0
    masks = transforms.warp_masks([target.mask], geom)  # [1, S, S]
    things, _ = self._slots("things", masks, np.zeros(1, np.int64), text_map[:1], st.max_things,
                            where)
    stuff, _ = self._slots("stuff", np.zeros((0, st.canvas, st.canvas), bool),
                           np.zeros(0, np.int64), np.zeros((0, st.max_text_len), bool),
                           st.max_stuff, where)
    return {
        "image": image,
        "valid": valid,
        "task": np.int32(TASK_IDS["referring"]),
        "orig_size": np.array([record.height, record.width], np.int32),
        "expression": np.int32(expression),
        "text/ids": ids,
        "text/mask": mask,
        "text/positive_map": text_map,
        **things,
        **stuff,
        "stats/truncated": np.zeros(2, np.int32),
    }
