"""Drawing helpers shared by the tasks: colours, shapes, non-overlapping placement, the font.

Images are tiny (default 32×32), so everything is drawn without anti-aliasing in a few saturated
colours that stay distinct after a patch encoder averages them. The font is Pillow's bundled
default TrueType font (`ImageFont.load_default(size=...)`, Pillow >= 10.1), never a system font,
so renders are identical on every machine with the pinned Pillow.

Must not import jax, TFDS or the trainer.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (245, 245, 245)
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 230),
    "yellow": (235, 195, 20),
    "purple": (150, 40, 190),
    "orange": (245, 120, 10),
}
SHAPES = ("circle", "square", "triangle")


def canvas(size: int, color=BACKGROUND) -> Image.Image:
  return Image.new("RGB", (size, size), color)


def to_array(img: Image.Image) -> np.ndarray:
  return np.asarray(img, dtype=np.uint8).copy()


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color, box) -> None:
  """Draws `shape` filling the pixel box (x0, y0, x1, y1), x1/y1 exclusive."""
  x0, y0, x1, y1 = box
  # PIL boxes are inclusive of the last pixel.
  xy = (x0, y0, x1 - 1, y1 - 1)
  if shape == "circle":
    draw.ellipse(xy, fill=color)
  elif shape == "square":
    draw.rectangle(xy, fill=color)
  elif shape == "triangle":
    draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=color)
  else:
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def place_boxes(rng: np.random.Generator, image_size: int, sizes, gap: int = 1,
                margin: int = 1, max_tries: int = 200) -> list[tuple[int, int, int, int]] | None:
  """Random non-overlapping square boxes of the given side lengths (with `gap` pixels between).

  Returns None if rejection sampling fails; callers redraw the whole scene.
  """
  boxes = []
  for side in sizes:
    for _ in range(max_tries):
      x0 = int(rng.integers(margin, image_size - margin - side + 1))
      y0 = int(rng.integers(margin, image_size - margin - side + 1))
      box = (x0, y0, x0 + side, y0 + side)
      if all(box[0] >= b[2] + gap or b[0] >= box[2] + gap or box[1] >= b[3] + gap
             or b[1] >= box[3] + gap for b in boxes):
        boxes.append(box)
        break
    else:
      return None
  return boxes


def object_side(image_size: int, big: bool = False) -> int:
  """Side of a small / big object at this resolution (6 / 9 px at 32)."""
  return max(3, round(image_size * (9 if big else 6) / 32))


@functools.lru_cache(maxsize=32)
def font(size: int) -> ImageFont.FreeTypeFont:
  return ImageFont.load_default(size=size)


def fitted_font(text: str, max_width: int, size: int, min_size: int = 6):
  """The largest font of at most `size` points whose rendering of `text` fits in `max_width`."""
  for s in range(size, min_size - 1, -1):
    f = font(s)
    x0, _, x1, _ = f.getbbox(text)
    if x1 - x0 <= max_width:
      return f
  return font(min_size)
