"""Samples and renders one synthetic scene with its full ground truth.

A scene is a few stuff regions (sky or wall above, ground or floor below, maybe a road) and a row of
composite objects standing on the ground, some touching, a ladder leaning on a house, balls and
boxes on tables. Colours, sizes and shapes vary; regions carry a mild texture and the image mild
noise. The ground truth (visible entity and part masks, contact relations, referring expressions)
is derived from the rendered label maps, so it is exactly what the pixels show.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from data_pipelines import mask_codec
from data_pipelines.synthetic import expressions as expressions_lib
from data_pipelines.synthetic import shapes
from data_pipelines.synthetic import taxonomy

_OUTDOOR = ("house", "car", "tree", "lamp", "snowman", "person")
_INDOOR = ("table", "person", "lamp", "table")
_MAX_TRIES = 100


@dataclasses.dataclass
class ScenePart:
  """One visible part instance.

  Attributes:
    name: part class.
    mask: bool [S, S] visible pixels.
  """

  name: str
  mask: np.ndarray


@dataclasses.dataclass
class SceneEntity:
  """One thing or stuff region.

  Attributes:
    category: class name.
    isthing: thing or stuff.
    colour: colour word of the main part (things) or of the region (stuff).
    mask: bool [S, S] visible pixels.
    polygons: the full shape's polygons (things); rasterising them gives `mask` unless occluded.
    occluded: True when `mask` differs from the rasterised `polygons`.
    parts: visible part instances, in paint order.
  """

  category: str
  isthing: bool
  colour: str
  mask: np.ndarray
  polygons: list[list[float]]
  occluded: bool
  parts: list[ScenePart]


@dataclasses.dataclass
class SceneRelation:
  """A contact relation between two entities (indices into `Scene.entities`).

  Attributes:
    subject: subject entity index.
    object: object entity index.
    predicate: predicate from `taxonomy.PREDICATES`.
  """

  subject: int
  object: int
  predicate: str


@dataclasses.dataclass
class Scene:
  """A rendered scene with its ground truth.

  Attributes:
    image: uint8 [S, S, 3].
    entities: stuff regions first, then things in paint order.
    relations: contact relations.
    expressions: referring expressions, each naming one thing.
    void: bool [S, S] pixels written as void (uid 0) in the Pascal-Panoptic-Parts labels: the
      one-pixel ring of stuff around every thing.
  """

  image: np.ndarray
  entities: list[SceneEntity]
  relations: list[SceneRelation]
  expressions: list[expressions_lib.SceneExpression]
  void: np.ndarray


@dataclasses.dataclass
class _Planned:
  category: str
  isthing: bool
  pieces: list[shapes.Piece]
  colour: str = ""
  support: Optional[int] = None


def _clip_round(polygon: list[float], size: int) -> list[float]:
  return [round(min(max(float(v), 0.0), float(size)), 2) for v in polygon]


def _stuff(rng: np.random.Generator, size: int, indoor: bool) -> tuple[list[_Planned], dict]:
  """Plans the stuff regions; returns them and the bands where objects stand."""
  s = float(size)
  horizon = rng.uniform(0.5, 0.62) if indoor else rng.uniform(0.4, 0.55)
  top = _Planned("wall" if indoor else "sky", False, [(None, [shapes.rect(0, 0, s, s)])])
  if indoor:
    ground_poly = shapes.rect(0, horizon * s, s, s)
  else:
    xs = np.linspace(0.0, s, int(rng.integers(3, 7)))
    ys = horizon * s + rng.uniform(-0.025, 0.025, xs.size) * s
    ground_poly = [0.0, s] + np.stack([xs, ys], -1).reshape(-1).tolist() + [s, s]
  bottom = _Planned("floor" if indoor else "ground", False, [(None, [ground_poly])])
  planned = [top, bottom]
  bands = {"ground": (horizon + 0.12, 0.97), "road": None}
  if not indoor and rng.random() < 0.5:
    r0, r1 = rng.uniform(0.8, 0.87), rng.uniform(-0.03, 0.03)
    road_top = max(r0, r0 + r1)
    planned.append(_Planned("road", False, [(None, [[0.0, r0 * s, s, (r0 + r1) * s, s, s,
                                                     0.0, s]])]))
    bands = {"ground": (horizon + 0.1, road_top - 0.015), "road": (road_top + 0.05, 0.98)}
  return planned, bands


def _object_size(rng: np.random.Generator, cls: str) -> tuple[float, float]:
  """Width and height of an object as fractions of the image size."""
  if cls == "house":
    w = rng.uniform(0.26, 0.36)
    return w, w * rng.uniform(0.95, 1.2)
  if cls == "car":
    w = rng.uniform(0.3, 0.4)
    return w, w * rng.uniform(0.5, 0.62)
  if cls == "tree":
    return rng.uniform(0.18, 0.28), rng.uniform(0.34, 0.5)
  if cls == "lamp":
    return rng.uniform(0.12, 0.18), rng.uniform(0.34, 0.48)
  if cls == "snowman":
    w = rng.uniform(0.15, 0.21)
    return w, shapes.snowman_height(w)
  if cls == "person":
    return rng.uniform(0.1, 0.14), rng.uniform(0.3, 0.42)
  w = rng.uniform(0.32, 0.44)
  return w, rng.uniform(0.17, 0.24)


def _plan(rng: np.random.Generator, size: int) -> tuple[list[_Planned], list[tuple[int, int, str]]]:
  """Plans every entity's polygons and the relations meant to hold."""
  s = float(size)
  indoor = rng.random() < 0.3
  planned, bands = _stuff(rng, size, indoor)
  road = 2 if bands["road"] is not None else None
  bottom = 1
  pool = _INDOOR if indoor else _OUTDOOR
  n = int(rng.integers(2, 4 if indoor else 5))
  objects = []
  for cls in rng.choice(pool, size=n):
    w, h = _object_size(rng, str(cls))
    ladder_side = None
    slot = w
    if cls == "house" and rng.random() < 0.45:
      ladder_side = "left" if rng.random() < 0.5 else "right"
      slot = w + rng.uniform(0.07, 0.1)
    objects.append({"cls": str(cls), "w": w, "h": h, "slot": slot, "ladder": ladder_side})
  while len(objects) > 2 and sum(o["slot"] for o in objects) > 0.94:
    objects.pop()
  total = sum(o["slot"] for o in objects)
  if total > 0.94:
    scale = 0.94 / total
    for o in objects:
      o["w"] *= scale
      o["h"] *= scale
      o["slot"] *= scale
  free = 0.96 - sum(o["slot"] for o in objects)
  gaps = rng.dirichlet(np.ones(len(objects) + 1)) * free
  touching = [bool(rng.random() < 0.35) for _ in range(len(objects) - 1)]
  x = 0.02 + gaps[0]
  for i, o in enumerate(objects):
    o["x"] = x
    x += o["slot"]
    if i < len(touching):
      x += -0.015 if touching[i] else gaps[i + 1]
  for i, o in enumerate(objects):
    band = bands["road"] if (o["cls"] == "car" and road is not None) else bands["ground"]
    lo, hi = band
    base = rng.uniform(lo, max(lo, hi))
    if i > 0 and touching[i - 1] and objects[i - 1]["band"] == band:
      base = objects[i - 1]["base"]
    o["band"] = band
    o["base"] = max(base, o["h"] + 0.03)

  relations: list[tuple[int, int, str]] = []
  order = sorted(range(len(objects)), key=lambda k: (objects[k]["base"], objects[k]["x"]))
  entity_of = {}
  for k in order:
    o = objects[k]
    cls, base, w, h = o["cls"], o["base"] * s, o["w"] * s, o["h"] * s
    x0 = o["x"] * s
    if o["ladder"] == "left":
      x0 += (o["slot"] - o["w"]) * s
    if cls == "house":
      pieces = shapes.house(rng, x0, base, w, h)
    elif cls == "car":
      pieces = shapes.car(rng, x0, base, w, h)
    elif cls == "tree":
      pieces = shapes.tree(rng, x0, base, w, h)
    elif cls == "lamp":
      pieces = shapes.lamp(rng, x0, base, w, h, size)
    elif cls == "snowman":
      pieces = shapes.snowman(rng, x0, base, w)
    elif cls == "person":
      pieces = shapes.person(rng, x0, base, w, h)
    else:
      pieces = shapes.table(rng, x0, base, w, h)
    entity_of[k] = len(planned)
    planned.append(_Planned(cls, True, pieces))
    if cls in ("person", "snowman"):
      relations.append((entity_of[k], bottom, "standing on"))
    if cls == "car":
      relations.append((entity_of[k], road if road is not None else bottom, "parked on"))
    if o["ladder"] is not None:
      body_top = min(pieces[0][1][0][1::2])
      top_y = body_top + rng.uniform(0.05, 0.2) * (base - body_top)
      lean = rng.uniform(0.02, 0.045) * s
      rail = 0.11 * s
      if o["ladder"] == "left":
        foot_x, top_x = x0 - (o["slot"] - o["w"]) * s + 0.005 * s, x0 + lean - rail
      else:
        foot_x, top_x = x0 + (o["slot"] - 0.005) * s - rail, x0 + w - lean
      relations.append((len(planned), entity_of[k], "leaning on"))
      planned.append(_Planned("ladder", True, shapes.ladder(rng, foot_x, base, top_x, top_y, size),
                              support=entity_of[k]))
    if cls == "table" and rng.random() < 0.8:
      top_y = base - h
      slots = [(x0 + 0.05 * w, x0 + 0.48 * w), (x0 + 0.52 * w, x0 + 0.95 * w)]
      for lo, hi in slots[:int(rng.integers(1, 3))]:
        if rng.random() < 0.5:
          r = rng.uniform(0.04, 0.055) * s
          cx = rng.uniform(lo + r, max(lo + r, hi - r))
          item = _Planned("ball", True, shapes.ball(cx, top_y, r), support=entity_of[k])
        else:
          bw, bh = rng.uniform(0.07, 0.1) * s, rng.uniform(0.06, 0.09) * s
          bx = rng.uniform(lo, max(lo, hi - bw))
          item = _Planned("box", True, shapes.box(bx, top_y, bw, bh), support=entity_of[k])
        relations.append((len(planned), entity_of[k], "on"))
        planned.append(item)
  for i, t in enumerate(touching):
    if t:
      relations.append((entity_of[i], entity_of[i + 1], "touching"))
  return planned, relations


def _assign_colours(rng: np.random.Generator, planned: list[_Planned]) -> list[list[str]]:
  """Picks a colour name per piece: distinct within an entity and from the stuff behind it."""
  names = list(taxonomy.COLOUR_NAMES)
  stuff_colours: list[str] = []
  piece_colours = []
  for p in planned:
    if not p.isthing:
      c = str(rng.choice([n for n in names if n not in stuff_colours]))
      stuff_colours.append(c)
      p.colour = c
      piece_colours.append([c])
  for p in planned:
    if not p.isthing:
      continue
    banned = set(stuff_colours)
    if p.support is not None:
      banned.add(planned[p.support].colour)
    choices = [n for n in names if n not in banned]
    order = [str(c) for c in rng.permutation(choices)]
    main = taxonomy.MAIN_PART.get(p.category)
    p.colour = order[0]
    part_names = [piece[0] for piece in p.pieces]
    colours = []
    others = iter(order[1:])
    per_part: dict[str, str] = {}
    for name in part_names:
      if name is None or name == main:
        colours.append(p.colour)
      else:
        if name not in per_part:
          per_part[name] = next(others)
        colours.append(per_part[name])
    piece_colours.append(colours)
  return piece_colours


def _texture(rng: np.random.Generator, region_map: np.ndarray, colours: np.ndarray,
             size: int) -> np.ndarray:
  """Fills regions with their colours plus a per-region wave texture, shading and noise."""
  n = colours.shape[0]
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # [S, S] each
  amp = rng.uniform(0.0, 16.0, n).astype(np.float32)  # [R]
  freq = (rng.uniform(0.15, 0.7, n) * 128.0 / size).astype(np.float32)  # [R]
  theta = rng.uniform(0.0, np.pi, n).astype(np.float32)  # [R]
  phase = rng.uniform(0.0, 2 * np.pi, n).astype(np.float32)  # [R]
  shade = rng.uniform(-28.0, 28.0, n).astype(np.float32)  # [R]
  r = region_map  # [S, S]
  wave = amp[r] * np.sin(freq[r] * (xx * np.cos(theta[r]) + yy * np.sin(theta[r])) + phase[r])
  tex = wave + shade[r] * (yy / size - 0.5)  # [S, S]
  noise = rng.normal(0.0, 4.0, (size, size, 3)).astype(np.float32)  # [S, S, 3]
  img = colours[r] + tex[..., None] + noise  # [S, S, 3]
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)  # [S, S, 3]


def _touch_count(a: np.ndarray, b: np.ndarray) -> int:
  """Number of pixels of `b` 4-adjacent to `a`."""
  grown = a.copy()  # [S, S]
  grown[1:] |= a[:-1]
  grown[:-1] |= a[1:]
  grown[:, 1:] |= a[:, :-1]
  grown[:, :-1] |= a[:, 1:]
  return int(np.count_nonzero(grown & b))


def _render(rng: np.random.Generator, planned: list[_Planned],
            planned_relations: list[tuple[int, int, str]], size: int) -> Optional[Scene]:
  """Rasterises the plan; returns None when some entity or part ends up too small."""
  piece_colours = _assign_colours(rng, planned)
  region_map = np.zeros((size, size), dtype=np.int32)  # [S, S]
  region_entity, region_part, region_rgb = [], [], []
  entity_polys: list[list[list[float]]] = []
  for e, (p, colours) in enumerate(zip(planned, piece_colours)):
    polys_e = []
    for (part, polys), colour in zip(p.pieces, colours):
      polys = [_clip_round(poly, size) for poly in polys]
      polys_e.extend(polys)
      mask = mask_codec.polygons_to_mask(polys, size, size)  # [S, S]
      region_map[mask] = len(region_entity)
      region_entity.append(e)
      region_part.append(part)
      jitter = rng.uniform(-20, 20, 3)
      region_rgb.append(np.clip(np.asarray(taxonomy.PALETTE[colour]) + jitter, 0, 255))
    entity_polys.append(polys_e)
  region_entity_arr = np.asarray(region_entity)  # [R]
  entity_map = region_entity_arr[region_map]  # [S, S]
  scale = (size / 128.0) ** 2
  min_part, min_thing, min_stuff = 40 * scale, 60 * scale, 100 * scale
  entities = []
  for e, p in enumerate(planned):
    mask = entity_map == e  # [S, S]
    area = int(mask.sum())
    if area < (min_thing if p.isthing else min_stuff):
      return None
    parts = []
    for r in np.flatnonzero(region_entity_arr == e):
      if region_part[r] is None:
        continue
      pmask = region_map == r  # [S, S]
      if pmask.sum() < min_part:
        return None
      parts.append(ScenePart(region_part[r], pmask))
    occluded = False
    if p.isthing:
      full = mask_codec.polygons_to_mask(entity_polys[e], size, size)  # [S, S]
      occluded = not np.array_equal(full, mask)
    entities.append(SceneEntity(p.category, p.isthing, p.colour, mask,
                                entity_polys[e] if p.isthing else [], occluded, parts))
  relations = [SceneRelation(s, o, pred) for s, o, pred in planned_relations
               if _touch_count(entities[s].mask, entities[o].mask) >= 2]
  things = np.isin(entity_map, [e for e, p in enumerate(planned) if p.isthing])  # [S, S]
  ring = things.copy()  # [S, S]
  ring[1:] |= things[:-1]
  ring[:-1] |= things[1:]
  ring[:, 1:] |= things[:, :-1]
  ring[:, :-1] |= things[:, 1:]
  void = ring & ~things  # [S, S]
  image = _texture(rng, region_map, np.stack(region_rgb).astype(np.float32), size)
  exprs = expressions_lib.make_expressions(rng, entities, relations)
  return Scene(image, entities, relations, exprs, void)


def make_scene(seed: int, image_id: int, size: int) -> Scene:
  """Samples and renders the scene of one image, deterministically.

  Args:
    seed: dataset seed.
    image_id: the image's id (scenes of different images are independent).
    size: image side in pixels.

  Returns:
    The scene.

  Raises:
    RuntimeError: when no valid scene is found (image size far too small).
  """
  rng = np.random.default_rng([seed, image_id])
  for _ in range(_MAX_TRIES):
    planned, relations = _plan(rng, size)
    scene = _render(rng, planned, relations, size)
    if scene is not None:
      return scene
  raise RuntimeError(f"no valid synthetic scene for image {image_id} at size {size} after "
                     f"{_MAX_TRIES} tries; use a larger --image-size")
