"""Polygon builders for the composite objects of the synthetic dataset.

Every builder takes the object's slot (left x, base y, width, height, in pixels) and returns its
pieces in paint order as (part name or None, polygons); a piece is one part instance (two wheels are
two pieces). Polygons are flat [x1, y1, x2, y2, ...] lists; occlusion comes from paint order.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

Piece = tuple[Optional[str], list[list[float]]]


def rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
  """Axis-aligned rectangle polygon.

  Args:
    x0: left.
    y0: top.
    x1: right.
    y1: bottom.

  Returns:
    Flat polygon.
  """
  return [x0, y0, x1, y0, x1, y1, x0, y1]


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28) -> list[float]:
  """Ellipse approximated by a polygon.

  Args:
    cx: centre x.
    cy: centre y.
    rx: x radius.
    ry: y radius.
    n: number of vertices.

  Returns:
    Flat polygon.
  """
  t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)  # [n]
  pts = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=-1)  # [n, 2]
  return pts.reshape(-1).tolist()


def house(rng: np.random.Generator, x0: float, base: float, w: float, h: float) -> list[Piece]:
  """House = body + door + roof (triangular or flat-topped).

  Args:
    rng: random generator.
    x0: left of the body.
    base: bottom y.
    w: body width.
    h: total height.

  Returns:
    Pieces in paint order.
  """
  roof_h = h * rng.uniform(0.3, 0.42)
  top = base - (h - roof_h)
  over = w * rng.uniform(0.0, 0.06)
  body = rect(x0, top, x0 + w, base)
  dw = w * rng.uniform(0.2, 0.3)
  dh = (base - top) * rng.uniform(0.45, 0.65)
  dx = x0 + rng.uniform(0.28 * w, 0.72 * w - dw)
  door = rect(dx, base - dh, dx + dw, base)
  if rng.random() < 0.7:
    apex = x0 + w * rng.uniform(0.35, 0.65)
    roof = [x0 - over, top + 1, x0 + w + over, top + 1, apex, base - h]
  else:
    inset = w * rng.uniform(0.1, 0.25)
    roof = [x0 - over, top + 1, x0 + w + over, top + 1, x0 + w - inset, base - h,
            x0 + inset, base - h]
  return [("body", [body]), ("door", [door]), ("roof", [roof])]


def car(rng: np.random.Generator, x0: float, base: float, w: float, h: float) -> list[Piece]:
  """Car = body (lower box + cabin) + window + two wheels.

  Args:
    rng: random generator.
    x0: left.
    base: bottom y (wheel bottoms).
    w: width.
    h: height.

  Returns:
    Pieces in paint order.
  """
  r = w * rng.uniform(0.11, 0.13)
  lower_top = base - h * rng.uniform(0.5, 0.6)
  lower = rect(x0, lower_top, x0 + w, base - 0.8 * r)
  a0, a1 = rng.uniform(0.1, 0.22), rng.uniform(0.78, 0.9)
  b0, b1 = a0 + rng.uniform(0.08, 0.14), a1 - rng.uniform(0.08, 0.14)
  roof_y = base - h
  cabin = [x0 + a0 * w, lower_top + 1, x0 + a1 * w, lower_top + 1, x0 + b1 * w, roof_y,
           x0 + b0 * w, roof_y]
  ch = lower_top - roof_y
  window = rect(x0 + (b0 + 0.06) * w, roof_y + 0.2 * ch, x0 + (b1 - 0.06) * w,
                lower_top - 0.08 * ch)
  wheels = [("wheel", [ellipse(x0 + w * rng.uniform(lo, hi), base - r, r, r)])
            for lo, hi in ((0.18, 0.24), (0.76, 0.82))]
  return [("body", [lower, cabin]), ("window", [window])] + wheels


def tree(rng: np.random.Generator, x0: float, base: float, w: float, h: float) -> list[Piece]:
  """Tree = trunk + crown (round or pine).

  Args:
    rng: random generator.
    x0: left.
    base: bottom y.
    w: crown width.
    h: height.

  Returns:
    Pieces in paint order.
  """
  cx = x0 + w / 2
  tw = w * rng.uniform(0.2, 0.3)
  th = h * rng.uniform(0.3, 0.42)
  trunk = rect(cx - tw / 2, base - th, cx + tw / 2, base)
  crown_bottom = base - th + 0.15 * th
  if rng.random() < 0.6:
    ry = (crown_bottom - (base - h)) / 2
    crown = ellipse(cx, crown_bottom - ry, w / 2, ry)
  else:
    crown = [x0, crown_bottom, x0 + w, crown_bottom, cx, base - h]
  return [("trunk", [trunk]), ("crown", [crown])]


def lamp(rng: np.random.Generator, x0: float, base: float, w: float, h: float,
         size: int) -> list[Piece]:
  """Lamp = pole + shade.

  Args:
    rng: random generator.
    x0: left of the shade.
    base: bottom y.
    w: shade width.
    h: height.
    size: image size (the pole width scales with it).

  Returns:
    Pieces in paint order.
  """
  cx = x0 + w / 2
  pw = size * rng.uniform(0.03, 0.042)
  sh = h * rng.uniform(0.22, 0.3)
  top = base - h
  i0, i1 = w * rng.uniform(0.12, 0.28), w * rng.uniform(0.12, 0.28)
  shade = [x0, top + sh, x0 + w, top + sh, x0 + w - i1, top, x0 + i0, top]
  pole = rect(cx - pw / 2, top + sh - 1, cx + pw / 2, base)
  return [("pole", [pole]), ("shade", [shade])]


def snowman(rng: np.random.Generator, x0: float, base: float, w: float) -> list[Piece]:
  """Snowman = body + head + hat.

  Args:
    rng: random generator.
    x0: left.
    base: bottom y.
    w: body width.

  Returns:
    Pieces in paint order.
  """
  rb = w / 2
  cx = x0 + rb
  ryb = rb * rng.uniform(0.88, 1.0)
  body = ellipse(cx, base - ryb, rb, ryb)
  rh = rb * rng.uniform(0.6, 0.72)
  head_cy = base - 2 * ryb - 0.75 * rh
  head = ellipse(cx, head_cy, rh, rh)
  hw, hh = rh * rng.uniform(1.4, 1.8), rh * rng.uniform(0.8, 1.1)
  hat_bottom = head_cy - 0.6 * rh
  hat = rect(cx - hw / 2, hat_bottom - hh, cx + hw / 2, hat_bottom)
  return [("body", [body]), ("head", [head]), ("hat", [hat])]


def snowman_height(w: float) -> float:
  """Upper bound of a snowman's height for a body width.

  Args:
    w: body width.

  Returns:
    Height in pixels.
  """
  return 2 * w + 0.7 * w


def person(rng: np.random.Generator, x0: float, base: float, w: float, h: float) -> list[Piece]:
  """Person = legs (two polygons, one part) + torso + head.

  Args:
    rng: random generator.
    x0: left.
    base: bottom y.
    w: width.
    h: height.

  Returns:
    Pieces in paint order.
  """
  cx = x0 + w / 2
  r = w * rng.uniform(0.3, 0.38)
  lh = h * rng.uniform(0.36, 0.44)
  th = h - lh - 2 * r
  legs = [rect(cx - 0.36 * w, base - lh, cx - 0.05 * w, base),
          rect(cx + 0.05 * w, base - lh, cx + 0.36 * w, base)]
  torso_top = base - lh - th
  torso = rect(x0, torso_top, x0 + w, base - lh + 1)
  head = ellipse(cx, torso_top - r + 1, r, r * 1.08)
  return [("legs", legs), ("torso", [torso]), ("head", [head])]


def table(rng: np.random.Generator, x0: float, base: float, w: float, h: float) -> list[Piece]:
  """Table = top + two legs.

  Args:
    rng: random generator.
    x0: left.
    base: bottom y.
    w: width.
    h: height.

  Returns:
    Pieces in paint order.
  """
  tt = h * rng.uniform(0.2, 0.28)
  top = rect(x0, base - h, x0 + w, base - h + tt)
  lw = w * rng.uniform(0.07, 0.1)
  inset = w * rng.uniform(0.04, 0.1)
  legs = [("leg", [rect(x0 + inset, base - h + tt - 1, x0 + inset + lw, base)]),
          ("leg", [rect(x0 + w - inset - lw, base - h + tt - 1, x0 + w - inset, base)])]
  return [("top", [top])] + legs


def ladder(rng: np.random.Generator, foot_x: float, foot_y: float, top_x: float, top_y: float,
           size: int) -> list[Piece]:
  """Ladder = two slanted rails joined by rungs, one entity without parts.

  Args:
    rng: random generator.
    foot_x: x of the left rail's foot.
    foot_y: y of the feet.
    top_x: x of the left rail's top.
    top_y: y of the top.
    size: image size (rail and rung thickness scale with it).

  Returns:
    One piece without a part name.
  """
  rw = size * rng.uniform(0.022, 0.03)
  lw = size * rng.uniform(0.07, 0.09)
  polys = []
  for off in (0.0, lw):
    polys.append([foot_x + off, foot_y, foot_x + off + rw, foot_y, top_x + off + rw, top_y,
                  top_x + off, top_y])
  for t in np.linspace(0.15, 0.9, int(rng.integers(4, 6))):
    x = foot_x + t * (top_x - foot_x) + rw
    y = foot_y + t * (top_y - foot_y)
    polys.append(rect(x, y - rw / 2, x + lw - rw, y + rw / 2))
  return [(None, polys)]


def ball(cx: float, surface_y: float, r: float) -> list[Piece]:
  """Ball resting on a surface (overlapping it by one pixel so they touch).

  Args:
    cx: centre x.
    surface_y: y of the supporting surface.
    r: radius.

  Returns:
    One piece without a part name.
  """
  return [(None, [ellipse(cx, surface_y - r + 1, r, r)])]


def box(x0: float, surface_y: float, w: float, h: float) -> list[Piece]:
  """Box resting on a surface.

  Args:
    x0: left.
    surface_y: y of the supporting surface.
    w: width.
    h: height.

  Returns:
    One piece without a part name.
  """
  return [(None, [rect(x0, surface_y - h, x0 + w, surface_y + 1)])]
