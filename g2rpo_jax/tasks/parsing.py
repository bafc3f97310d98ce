"""Parsing of policy responses: the `<think>…</think><answer>…</answer>` shape and answer values.

Every task reward reads its accuracy from the answer part through this module, so "what counts
as well formed" is decided in one place. Nothing here raises on any input: a value that cannot be
parsed comes back as None and the caller scores it 0.

All scans are linear (`str.find`, anchored regexes on capped strings), so an enormous or
adversarial response costs O(length) and is rejected by the length caps below.

Must not import jax, TFDS or anything from the trainer: it runs on host inside reward loops.
"""
from __future__ import annotations

import math
import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Responses longer than this are not parsed at all (the policy's max response is far shorter; a
# longer string is garbage or an attack on the reward loop).
MAX_RESPONSE_CHARS = 65536
# Answers longer than this score 0: no ground truth in the suite is anywhere near it, and it
# bounds the quadratic edit distance in the OCR reward.
MAX_ANSWER_CHARS = 256

_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_NUMBER_RE = re.compile(rf"\s*({_NUMBER})\s*\.?\s*")
_BOX_BODY = rf"\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*"
# Brackets, if any, must match: '[1,2,3,4' is a truncated answer, not a box.
_BOX_RES = tuple(re.compile(rf"\s*{o}{_BOX_BODY}{c}\s*") for o, c in (("", ""), (r"\[", r"\]"),
                                                                      (r"\(", r"\)")))


def format_demonstration(think: str, answer: str) -> str:
  """The canonical well-formed response; the inverse of `split_response`."""
  return f"{THINK_OPEN}{think}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def split_response(response) -> tuple[str, str] | None:
  """(think, answer) if `response` is exactly `<think>T</think><answer>A</answer>`, else None.

  Whitespace is allowed around the whole response and between the two blocks. T and A must not
  contain any of the four tags (a nested or repeated tag is a mangled response).
  """
  if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
    return None
  s = response.strip()
  if not s.startswith(THINK_OPEN) or not s.endswith(ANSWER_CLOSE):
    return None
  close = s.find(THINK_CLOSE)
  if close < 0:
    return None
  think = s[len(THINK_OPEN):close]
  rest = s[close + len(THINK_CLOSE):].lstrip()
  if not rest.startswith(ANSWER_OPEN):
    return None
  if len(rest) < len(ANSWER_OPEN) + len(ANSWER_CLOSE):
    return None
  answer = rest[len(ANSWER_OPEN):len(rest) - len(ANSWER_CLOSE)]
  if any(t in think or t in answer for t in _TAGS):
    return None
  return think, answer


def format_reward(response) -> float:
  """1.0 iff the response has the `<think>…</think><answer>…</answer>` shape (SPEC §6), else 0.0."""
  return 1.0 if split_response(response) is not None else 0.0


def extract_answer(response) -> str | None:
  """The text between the first `<answer>` and the next `</answer>`, or None.

  Accuracy does not require the think block (the format reward scores that); it does require an
  intact answer pair, no nested `<answer>`, and at most MAX_ANSWER_CHARS characters inside.
  """
  if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
    return None
  start = response.find(ANSWER_OPEN)
  if start < 0:
    return None
  start += len(ANSWER_OPEN)
  end = response.find(ANSWER_CLOSE, start)
  if end < 0:
    return None
  answer = response[start:end]
  if len(answer) > MAX_ANSWER_CHARS or ANSWER_OPEN in answer:
    return None
  return answer


def parse_number(text) -> float | None:
  """A single finite decimal number (e.g. '7', '-3', '2.50', '4.'), else None."""
  if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
    return None
  m = _NUMBER_RE.fullmatch(text)
  if m is None:
    return None
  value = float(m.group(1))
  return value if math.isfinite(value) else None


def parse_box(text) -> tuple[float, float, float, float] | None:
  """Four comma-separated numbers `x0,y0,x1,y1`, optionally in [] or (), else None."""
  if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
    return None
  m = next((m for m in (r.fullmatch(text) for r in _BOX_RES) if m is not None), None)
  if m is None:
    return None
  box = tuple(float(g) for g in m.groups())
  return box if all(math.isfinite(v) for v in box) else None


def normalize_text(text: str) -> str:
  """Case-folded, whitespace-collapsed, without a trailing full stop: how free-text answers match."""
  return " ".join(text.split()).casefold().rstrip(".").strip()
