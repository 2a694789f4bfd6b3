"""Classes, parts, predicates and colours of the synthetic hierarchical-shapes dataset.

Category ids are shared by every written format: things 1..10, stuff 11..15 (COCO panoptic and
instances ids, Pascal-Panoptic-Parts sids, PACO object ids; COCO-PSG uses id - 1 as its 0-based
index into thing_classes + stuff_classes). A part's Pascal-Panoptic-Parts pid is its 1-based
position in its object's part list; its PACO category id is `PART_CATEGORY_BASE` + its position in
`PART_CATEGORIES`.
"""

from __future__ import annotations

THING_PARTS: dict[str, tuple[str, ...]] = {
    "house": ("roof", "body", "door"),
    "car": ("body", "window", "wheel"),
    "tree": ("trunk", "crown"),
    "lamp": ("pole", "shade"),
    "snowman": ("body", "head", "hat"),
    "person": ("head", "torso", "legs"),
    "table": ("top", "leg"),
    "ladder": (),
    "ball": (),
    "box": (),
}
THING_CLASSES: tuple[str, ...] = tuple(THING_PARTS)
STUFF_CLASSES: tuple[str, ...] = ("sky", "ground", "road", "wall", "floor")
CATEGORY_IDS: dict[str, int] = {
    name: i + 1 for i, name in enumerate(THING_CLASSES + STUFF_CLASSES)}

# The part that carries an object's colour word in referring expressions.
MAIN_PART: dict[str, str] = {
    "house": "body", "car": "body", "tree": "crown", "lamp": "shade", "snowman": "body",
    "person": "torso", "table": "top"}

PART_CATEGORIES: tuple[tuple[str, str], ...] = tuple(
    (obj, part) for obj, parts in THING_PARTS.items() for part in parts)
PART_CATEGORY_BASE = 100
PART_CATEGORY_IDS: dict[tuple[str, str], int] = {
    key: PART_CATEGORY_BASE + i + 1 for i, key in enumerate(PART_CATEGORIES)}


def part_pid(obj: str, part: str) -> int:
  """Pascal-Panoptic-Parts pid of a part.

  Args:
    obj: object class.
    part: part class of that object.

  Returns:
    1-based position of the part in the object's part list.
  """
  return THING_PARTS[obj].index(part) + 1


# Physical-contact predicates the generator emits (all in the AIMS default keep-list).
PREDICATES: tuple[str, ...] = ("on", "standing on", "parked on", "leaning on", "touching")

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "green": (50, 160, 60),
    "blue": (50, 80, 200),
    "yellow": (230, 210, 50),
    "orange": (235, 140, 40),
    "purple": (140, 60, 170),
    "pink": (235, 130, 180),
    "brown": (130, 85, 50),
    "gray": (128, 128, 128),
    "white": (235, 235, 235),
    "black": (35, 35, 35),
    "cyan": (60, 190, 200),
}
COLOUR_NAMES: tuple[str, ...] = tuple(PALETTE)
