"""Tasks on scenes of coloured shapes: grounding (IoU), counting (binary), spatial relation (binary).

Coordinates are pixels of the square image, origin top-left, y downwards; a box is
[x0, y0, x1, y1] with x1, y1 exclusive, so a box of one pixel is [x, y, x + 1, y + 1].

Must not import jax, TFDS or the trainer.
"""
from __future__ import annotations

import numpy as np
from PIL import ImageDraw

from g2rpo_jax.tasks import base, render

_BASIC_COLORS = ("red", "green", "blue", "yellow")
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
_SCENE_TRIES = 50


def _draw_scene(image_size: int, objects) -> np.ndarray:
  """objects: iterable of (shape, color name, box)."""
  img = render.canvas(image_size)
  draw = ImageDraw.Draw(img)
  for shape, color, box in objects:
    render.draw_shape(draw, shape, render.COLORS[color], box)
  return render.to_array(img)


def _place_or_fail(task: str, rng, image_size: int, sizes, d: dict):
  for _ in range(_SCENE_TRIES):
    boxes = render.place_boxes(rng, image_size, sizes)
    if boxes is not None:
      return boxes
  raise ValueError(f"task {task!r}: cannot place {len(sizes)} objects without overlap in a "
                   f"{image_size}x{image_size} image (difficulty {d}); use fewer objects or a "
                   "larger image_size")


def _center(box) -> tuple[int, int]:
  return (box[0] + box[2]) // 2, (box[1] + box[3]) // 2


class Grounding(base.Task):
  """'Box of the red circle?' -> `x0,y0,x1,y1`; reward = IoU with the true box (dense).

  Knobs: n_objects (objects in the scene, all with distinct colour+shape; default 3),
  size_contrast (add a same colour+shape twin of the other size, so the expression must say
  'small' / 'big'; default False).
  """
  name = "grounding"
  reward_type = "iou"
  role = "perception"
  default_difficulty = {"n_objects": 3, "size_contrast": False}

  def _check_difficulty(self, d):
    base.check_int_knob(self.name, d, "n_objects", 1, len(_BASIC_COLORS) * len(render.SHAPES))
    if not isinstance(d["size_contrast"], bool):
      raise ValueError(f"task {self.name!r}: difficulty knob 'size_contrast' must be a bool, "
                       f"got {d['size_contrast']!r}")

  def _generate(self, rng, split, d):
    del split
    combos = [(c, s) for c in _BASIC_COLORS for s in render.SHAPES]
    picks = rng.choice(len(combos), size=d["n_objects"], replace=False)
    objects = [combos[i] + (bool(rng.integers(2)),) for i in picks]  # (color, shape, big)
    color, shape, big = objects[0]
    if d["size_contrast"]:
      objects.append((color, shape, not big))
    sides = [render.object_side(self.image_size, b) for _, _, b in objects]
    boxes = _place_or_fail(self.name, rng, self.image_size, sides, d)
    image = _draw_scene(self.image_size, [(s, c, b) for (c, s, _), b in zip(objects, boxes)])
    size_word = ("big " if big else "small ") if d["size_contrast"] else ""
    prompt = f"Box of the {size_word}{color} {shape}?"
    return image, prompt, list(boxes[0]), {}

  def _think_answer(self, example):
    x0, y0, x1, y1 = example.answer
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    third = self.image_size / 3
    row = ("top", "middle", "bottom")[min(2, int(cy // third))]
    col = ("left", "center", "right")[min(2, int(cx // third))]
    return f"{row} {col}", f"{x0},{y0},{x1},{y1}"


class Counting(base.Task):
  """'How many red shapes?' / 'How many circles?' -> an integer; exact match (binary).

  Knobs: max_count (the answer is uniform in 1..max_count; default 4), distractors (up to this
  many objects that do not match the question; default 2).
  """
  name = "counting"
  reward_type = "binary"
  role = "perception"
  default_difficulty = {"max_count": 4, "distractors": 2}

  def _check_difficulty(self, d):
    base.check_int_knob(self.name, d, "max_count", 1, 9)
    base.check_int_knob(self.name, d, "distractors", 0, 8)

  def _generate(self, rng, split, d):
    del split
    count = int(rng.integers(1, d["max_count"] + 1))
    n_other = int(rng.integers(0, d["distractors"] + 1))
    colors, shapes = list(_BASIC_COLORS), list(render.SHAPES)
    by_color = bool(rng.integers(2))
    if by_color:
      target = colors[rng.integers(len(colors))]
      others = [c for c in colors if c != target]
      objects = [(target, shapes[rng.integers(3)]) for _ in range(count)]
      objects += [(others[rng.integers(len(others))], shapes[rng.integers(3)])
                  for _ in range(n_other)]
      prompt = f"How many {target} shapes?"
    else:
      target = shapes[rng.integers(len(shapes))]
      others = [s for s in shapes if s != target]
      objects = [(colors[rng.integers(4)], target) for _ in range(count)]
      objects += [(colors[rng.integers(4)], others[rng.integers(len(others))])
                  for _ in range(n_other)]
      prompt = f"How many {_PLURAL[target]}?"
    sides = [render.object_side(self.image_size)] * len(objects)
    boxes = _place_or_fail(self.name, rng, self.image_size, sides, d)
    image = _draw_scene(self.image_size, [(s, c, b) for (c, s), b in zip(objects, boxes)])
    return image, prompt, count, {}

  def _think_answer(self, example):
    n = int(example.answer)
    return ",".join(str(i) for i in range(1, n + 1)), str(n)


class Spatial(base.Task):
  """'Where is red vs blue? left/right/above/below' -> one of the four words (binary).

  The asked relation holds along one axis with a displacement at least twice the other axis's, so
  the answer is never ambiguous. Knob: distractors (extra objects in other colours; default 0).
  """
  name = "spatial"
  reward_type = "binary"
  role = "hybrid"
  default_difficulty = {"distractors": 0}
  RELATIONS = ("left", "right", "above", "below")

  def _check_difficulty(self, d):
    base.check_int_knob(self.name, d, "distractors", 0, len(render.COLORS) - 2)

  @staticmethod
  def _relation(a_box, b_box) -> str | None:
    (ax, ay), (bx, by) = _center(a_box), _center(b_box)
    dx, dy = ax - bx, ay - by
    if abs(dx) >= 2 * abs(dy) and abs(dx) >= 2:
      return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx) and abs(dy) >= 2:
      return "above" if dy < 0 else "below"
    return None

  def _generate(self, rng, split, d):
    del split
    names = list(render.COLORS)
    order = rng.permutation(len(names))
    a, b = names[order[0]], names[order[1]]
    others = [names[i] for i in order[2:2 + d["distractors"]]]
    want = self.RELATIONS[rng.integers(4)]
    side = render.object_side(self.image_size)
    for _ in range(_SCENE_TRIES * 4):
      boxes = _place_or_fail(self.name, rng, self.image_size, [side] * (2 + len(others)), d)
      if self._relation(boxes[0], boxes[1]) == want:
        break
    else:
      raise ValueError(f"task {self.name!r}: could not draw a scene with relation {want!r} "
                       f"(difficulty {d}, image_size {self.image_size})")
    shapes = [render.SHAPES[rng.integers(3)] for _ in boxes]
    image = _draw_scene(self.image_size, zip(shapes, [a, b] + others, boxes))
    prompt = f"Where is {a} vs {b}? left/right/above/below"
    meta = {"colors": [a, b], "centers": [list(_center(boxes[0])), list(_center(boxes[1]))]}
    return image, prompt, want, meta

  def _think_answer(self, example):
    (a, b), ((ax, ay), (bx, by)) = example.meta["colors"], example.meta["centers"]
    return f"{a} {ax},{ay} {b} {bx},{by}", example.answer
