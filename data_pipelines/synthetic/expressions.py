"""Template referring expressions that identify exactly one thing in a synthetic scene.

Each candidate expression is a small spec (colour word, class, spatial or relational clause)
evaluated against every thing in the scene; it is kept only when exactly one thing satisfies it.
Spatial words are "left"/"right" ("left of the tree", "the leftmost car"), so a horizontal flip
turns a true expression into a true one by swapping the two words.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

# Centres closer than this many pixels are neither left nor right of each other.
_MARGIN = 2.0


@dataclasses.dataclass
class SceneExpression:
  """Referring expressions of one thing.

  Attributes:
    target: index of the thing in `Scene.entities`.
    sentences: distinct sentences, each true of the target only.
  """

  target: int
  sentences: list[str]


@dataclasses.dataclass(frozen=True)
class _Spec:
  colour: Optional[str]
  category: str
  kind: str  # plain | left_of | right_of | leftmost | rightmost | relation
  ref: Optional[int] = None
  predicate: Optional[str] = None

  def text(self, entities: Sequence) -> str:
    head = f"{self.colour} {self.category}" if self.colour else self.category
    if self.kind == "plain":
      return f"the {head}"
    if self.kind in ("leftmost", "rightmost"):
      return f"the {self.kind} {head}"
    ref = entities[self.ref].category
    if self.kind == "relation":
      return f"the {head} {self.predicate} the {ref}"
    return f"the {head} {self.kind.replace('_', ' ')} the {ref}"


def _centre_x(mask: np.ndarray) -> float:
  return float(np.flatnonzero(mask.any(axis=0)).mean())


def _satisfies(spec: _Spec, i: int, entities: Sequence, cx: list[float],
               relations: Sequence) -> bool:
  """Whether entity `i` could be meant by `spec` (ambiguous spatial cases count as yes)."""
  e = entities[i]
  if not e.isthing or e.category != spec.category:
    return False
  if spec.colour is not None and e.colour != spec.colour:
    return False
  if spec.kind == "plain":
    return True
  if spec.kind in ("left_of", "right_of"):
    if i == spec.ref:
      return False
    d = cx[i] - cx[spec.ref]
    return d < _MARGIN if spec.kind == "left_of" else d > -_MARGIN
  if spec.kind == "relation":
    return any(r.subject == i and r.object == spec.ref and r.predicate == spec.predicate
               for r in relations)
  peers = [j for j in range(len(entities)) if entities[j].isthing
           and entities[j].category == spec.category
           and (spec.colour is None or entities[j].colour == spec.colour)]
  sign = 1.0 if spec.kind == "leftmost" else -1.0
  return all(sign * (cx[j] - cx[i]) > -_MARGIN for j in peers if j != i) and len(peers) > 1


def make_expressions(rng: np.random.Generator, entities: Sequence,
                     relations: Sequence) -> list[SceneExpression]:
  """Builds one or two unique expressions for each thing that can be singled out.

  Args:
    rng: random generator.
    entities: the scene's entities (`SceneEntity`).
    relations: the scene's relations (`SceneRelation`).

  Returns:
    Expressions; every sentence is unique in the image and true of exactly one thing.
  """
  cx = [_centre_x(e.mask) for e in entities]
  counts: dict[str, int] = {}
  for e in entities:
    counts[e.category] = counts.get(e.category, 0) + 1
  unique_refs = [j for j, e in enumerate(entities) if counts[e.category] == 1]
  used: set[str] = set()
  result = []
  for i, e in enumerate(entities):
    if not e.isthing:
      continue
    specs = []
    for colour in (None, e.colour):
      specs.append(_Spec(colour, e.category, "plain"))
      specs += [_Spec(colour, e.category, k) for k in ("leftmost", "rightmost")]
      for j in unique_refs:
        if j != i and entities[j].isthing:
          specs += [_Spec(colour, e.category, k, ref=j) for k in ("left_of", "right_of")]
      for r in relations:
        if r.subject == i and r.object in unique_refs:
          specs.append(_Spec(colour, e.category, "relation", ref=r.object, predicate=r.predicate))
    want = int(rng.integers(1, 3))
    sentences = []
    for k in rng.permutation(len(specs)):
      spec = specs[int(k)]
      matches = [j for j in range(len(entities)) if _satisfies(spec, j, entities, cx, relations)]
      text = spec.text(entities)
      if matches == [i] and text not in used:
        sentences.append(text)
        used.add(text)
        if len(sentences) == want:
          break
    if sentences:
      result.append(SceneExpression(i, sentences))
  return result
