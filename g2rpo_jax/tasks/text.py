"""OCR: a short rendered code → its transcription; reward = clip(1 − CER, 0, 1) (sparse continuous).

Codes are drawn from capitals and digits without the look-alikes (0/O, 1/I, 5/S, 8/B, 2/Z, Q),
rendered in Pillow's bundled TrueType font at the largest size (at most 11 pt at 32 px) that fits
the image, in a dark colour on a light one, at a random offset. Longer codes force a smaller font:
word length is the main difficulty knob; `clutter` adds random line strokes.

Splits: the content key is the code itself, so a code seen in training is never a validation or
test target (whatever its colours or position).

Must not import jax, TFDS or the trainer.
"""
from __future__ import annotations

import numpy as np
from PIL import ImageDraw

from g2rpo_jax.tasks import base, render

ALPHABET = "ACDEFGHJKLMNPRTUVWXY34679"


class Ocr(base.Task):
  """'Text in the image?' -> the code; reward = 1 − edit distance / length, clipped at 0.

  Knobs: length (characters in the code, 2..8; default 3), clutter (random line strokes; default 0).
  """
  name = "ocr"
  reward_type = "ocr"
  role = "perception"
  default_difficulty = {"length": 3, "clutter": 0}

  def _check_difficulty(self, d):
    base.check_int_knob(self.name, d, "length", 2, 8)
    base.check_int_knob(self.name, d, "clutter", 0, 8)

  def _generate(self, rng, split, d):
    del split
    size = self.image_size
    code = "".join(ALPHABET[i] for i in rng.integers(0, len(ALPHABET), size=d["length"]))
    bg = tuple(int(v) for v in rng.integers(215, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    img = render.canvas(size, bg)
    draw = ImageDraw.Draw(img)
    font = render.fitted_font(code, size - 2, max(6, round(size * 11 / 32)))
    x0, y0, x1, y1 = draw.textbbox((0, 0), code, font=font)
    x = int(rng.integers(0, max(0, size - (x1 - x0)) + 1)) - x0
    y = int(rng.integers(0, max(0, size - (y1 - y0)) + 1)) - y0
    for _ in range(d["clutter"]):
      pts = [tuple(int(v) for v in rng.integers(0, size, size=2)) for _ in range(2)]
      shade = tuple(int(v) for v in rng.integers(120, 200, size=3))
      draw.line(pts, fill=shade, width=1)
    draw.text((x, y), code, fill=ink, font=font)
    return render.to_array(img), "Text in the image?", code, {}

  def _content_key(self, image, prompt, answer, meta):
    return b"ocr|" + answer.encode()

  def _think_answer(self, example):
    return "-".join(example.answer), example.answer
