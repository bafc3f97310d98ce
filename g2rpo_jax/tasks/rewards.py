"""Verifiable accuracy rewards, one per reward type (= advantage pool, SPEC §2 and §6).

  binary    exact match: numbers equal after rounding, other text equal after normalisation
            (counting, digit arithmetic, multiple choice / spatial relation);
  iou       intersection over union of the answered box `x0,y0,x1,y1` with the true box
            (grounding; dense continuous);
  ocr       character-level similarity clip(1 − CER, 0, 1), CER = Levenshtein distance /
            length of the truth (sparse continuous). For the suite's single-word targets WER is
            all-or-nothing, which would make OCR a second binary pool; CER keeps partial credit.
  relative  mean relative accuracy over thresholds t = 0.50, 0.55, …, 0.95: the fraction of t
            with |pred − truth| / |truth| < 1 − t (numeric regression, charts; SPEC §6).

Each `*_accuracy(answer_text, truth)` scores an already extracted answer; `accuracy(reward_type,
response, truth)` extracts it from a full response and never raises. The registry is what the
trainer indexes: `REWARD_TYPES` in pool-id order and `POOL_IDS` (name → dense int).

Must not import jax, TFDS or the trainer.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from g2rpo_jax.tasks import parsing

REWARD_TYPES = ("binary", "iou", "ocr", "relative")
POOL_IDS = {name: i for i, name in enumerate(REWARD_TYPES)}

# Tolerances 1 − t for t = 0.50:0.05:0.95, as exact hundredths so that threshold edges do not
# depend on float rounding of 1 − 0.95.
_RELATIVE_TOLERANCES_PCT = tuple(range(50, 0, -5))


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def binary_accuracy(answer: str, truth) -> float:
  """1.0 if the answer equals the truth (numerically if the truth is a number), else 0.0."""
  truth_value = truth if _is_number(truth) else parsing.parse_number(str(truth))
  if truth_value is not None:
    value = parsing.parse_number(answer)
    return float(value is not None and round(value, 6) == round(float(truth_value), 6))
  return float(parsing.normalize_text(answer) == parsing.normalize_text(str(truth)))


def box_iou(a, b) -> float:
  """IoU of two boxes (x0, y0, x1, y1) with x1 > x0, y1 > y0; 0 for degenerate boxes."""
  ax0, ay0, ax1, ay1 = a
  bx0, by0, bx1, by1 = b
  if ax1 <= ax0 or ay1 <= ay0 or bx1 <= bx0 or by1 <= by0:
    return 0.0
  iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
  ih = max(0.0, min(ay1, by1) - max(ay0, by0))
  inter = iw * ih
  union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
  return inter / union if union > 0 else 0.0


def iou_accuracy(answer: str, truth) -> float:
  box = parsing.parse_box(answer)
  return 0.0 if box is None else box_iou(box, tuple(float(v) for v in truth))


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
  if len(a) < len(b):
    a, b = b, a
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def ocr_accuracy(answer: str, truth) -> float:
  """clip(1 − edit_distance / len(truth), 0, 1) on case-folded, whitespace-collapsed text."""
  pred, gold = " ".join(answer.split()).casefold(), " ".join(str(truth).split()).casefold()
  if not gold:
    return float(not pred)
  return max(0.0, 1.0 - edit_distance(pred, gold) / len(gold))


def relative_accuracy(answer: str, truth) -> float:
  """Mean over t in 0.50:0.05:0.95 of 1[|pred − truth| / |truth| < 1 − t]; exact match if truth is 0."""
  value = parsing.parse_number(answer)
  if value is None:
    return 0.0
  truth = float(truth)
  if truth == 0.0:
    return float(value == 0.0)
  # |pred − truth| · 100 < tol_pct · |truth|  ⇔  relative error < tol_pct / 100, without dividing.
  err = abs(value - truth) * 100.0
  return sum(err < tol * abs(truth) for tol in _RELATIVE_TOLERANCES_PCT) / len(_RELATIVE_TOLERANCES_PCT)


ACCURACY_FNS: dict[str, Callable[[str, Any], float]] = {
    "binary": binary_accuracy,
    "iou": iou_accuracy,
    "ocr": ocr_accuracy,
    "relative": relative_accuracy,
}


def accuracy(reward_type: str, response, truth) -> float:
  """Accuracy in [0, 1] of a full response against `truth` under `reward_type`; never raises.

  Only an unknown `reward_type` is an error (a configuration bug, not a bad response).
  """
  if reward_type not in ACCURACY_FNS:
    raise KeyError(f"unknown reward type {reward_type!r}; expected one of {REWARD_TYPES}")
  answer = parsing.extract_answer(response)
  if answer is None:
    return 0.0
  try:
    value = float(ACCURACY_FNS[reward_type](answer, truth))
  except Exception:  # pylint: disable=broad-except
    # A malformed answer must cost the policy reward, never crash the training loop.
    return 0.0
  return min(1.0, max(0.0, value)) if math.isfinite(value) else 0.0
