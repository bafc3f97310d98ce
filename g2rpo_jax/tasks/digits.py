"""Digit arithmetic on real handwritten digits (scikit-learn's bundled `load_digits`, no download).

The image shows n digits (8×8 scans, upscaled) in reading order; the prompt asks for their sum or
for a small expression over them (`Digits a,b,c: a*b-c?`). The answer is an integer, scored by
exact match (binary). The demonstration reads the digits and then writes the evaluation step by
step (multiplications first, then left to right), the chain the warm start teaches.

Splits: every distinct 8×8 scan belongs to exactly one split, chosen by a hash of its pixels, so
no handwritten digit seen in training appears in validation or test (duplicated scans in the
dataset land in the same split).

Must not import jax, TFDS or the trainer.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np
from PIL import Image

from g2rpo_jax.tasks import base, render

_LETTERS = "abcdefghi"
_OPS = "+-*"


@functools.lru_cache(maxsize=1)
def digit_pools() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """split -> (images f32[n, 8, 8] in [0, 16], labels int[n]); disjoint by pixel content."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  data = load_digits()
  images, labels = data.images.astype(np.float32), data.target.astype(np.int64)
  owner = np.array([base.split_of(b"digits|" + hashlib.sha256(im.tobytes()).digest())
                    for im in images])
  return {s: (images[owner == s], labels[owner == s]) for s in base.SPLITS}


def evaluation_steps(values, ops) -> tuple[list[str], int]:
  """Evaluates values[0] ops[0] values[1] … with * before +/-, returning the written steps."""
  vals, ops, steps = list(values), list(ops), []
  while "*" in ops:
    i = ops.index("*")
    r = vals[i] * vals[i + 1]
    steps.append(f"{vals[i]}*{vals[i + 1]}={r}")
    vals[i:i + 2], ops[i:i + 1] = [r], []
  acc = vals[0]
  for op, v in zip(ops, vals[1:]):
    r = acc + v if op == "+" else acc - v
    steps.append(f"{acc}{op}{v}={r}")
    acc = r
  return steps, acc


class DigitArithmetic(base.Task):
  """'Sum of the digits?' or 'Digits a,b: a*b?' over handwritten digits -> an integer (binary).

  Knobs: n_digits (1..9; default 2; in reading order, two per row up to 4 digits, then three),
  ops (the operators the expression may use, a subset of '+-*'; default '+', a plain sum).
  """
  name = "arithmetic"
  reward_type = "binary"
  role = "reasoning"
  default_difficulty = {"n_digits": 2, "ops": "+"}

  def _check_difficulty(self, d):
    base.check_int_knob(self.name, d, "n_digits", 1, 9)
    ops = d["ops"]
    if not isinstance(ops, str) or not ops or set(ops) - set(_OPS):
      raise ValueError(f"task {self.name!r}: difficulty knob 'ops' must be a non-empty subset of "
                       f"{_OPS!r}, got {ops!r}")

  def _generate(self, rng, split, d):
    images, labels = digit_pools()[split]
    n = d["n_digits"]
    picks = rng.integers(0, len(labels), size=n)
    values = [int(labels[i]) for i in picks]
    ops = [d["ops"][rng.integers(len(d["ops"]))] for _ in range(n - 1)]
    image = self._render([images[i] for i in picks], rng)
    if set(ops) <= {"+"}:
      prompt = "Sum of the digits?"
    else:
      letters = _LETTERS[:n]
      expr = letters[0] + "".join(o + l for o, l in zip(ops, letters[1:]))
      prompt = f"Digits {','.join(letters)}: {expr}?"
    _, result = evaluation_steps(values, ops)
    return image, prompt, result, {"digits": values, "ops": ops}

  def _render(self, scans, rng) -> np.ndarray:
    size = self.image_size
    cols = 2 if len(scans) <= 4 else 3
    rows = -(-len(scans) // cols)
    cw, ch = size // cols, size // rows
    side = min(cw, ch) - 2
    img = render.canvas(size, (255, 255, 255))
    for k, scan in enumerate(scans):
      # Ink dark on white, like the scanned forms; bilinear keeps the strokes' grey levels.
      pixels = (255.0 - scan * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
      digit = Image.fromarray(pixels, "L").resize((side, side), Image.BILINEAR).convert("RGB")
      r, c = divmod(k, cols)
      jx = int(rng.integers(0, cw - side + 1))
      jy = int(rng.integers(0, ch - side + 1))
      img.paste(digit, (c * cw + jx, r * ch + jy))
    return render.to_array(img)

  def _content_key(self, image, prompt, answer, meta):
    return None  # the per-split digit pools already keep the splits apart

  def _think_answer(self, example):
    values, ops = example.meta["digits"], example.meta["ops"]
    steps, result = evaluation_steps(values, ops)
    think = "digits " + ",".join(str(v) for v in values)
    if steps:
      think += "; " + ",".join(steps)
    return think, str(result)
