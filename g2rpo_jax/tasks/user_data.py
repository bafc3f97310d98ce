"""User data: a JSONL file of {image, prompt, answer, problem_type} records as `Example`s.

The record shape follows the open multimodal RL datasets (EasyR1-style): one JSON object a line,

  {"image": "imgs/0001.png", "problem": "<image>How many cats?", "answer": "3",
   "problem_type": "counting"}

Accepted field names (first one present wins):
  image:   "image" (a path) or "images" (a list of paths; exactly one is supported)
  prompt:  "prompt", "problem", "question"   (a leading/trailing "<image>" placeholder is dropped)
  answer:  "answer", "solution", "ground_truth"   ("<answer>…</answer>" around it is unwrapped)
  type:    "problem_type", "task", "reward_type"
  role:    "role" (optional; otherwise from the problem type)
Image paths are relative to the JSONL file's directory (absolute paths are used as they are).
Images are read lazily, converted to RGB and resized to `image_size`×`image_size` (bilinear);
grounding boxes, given in the original image's pixels (or normalised to [0, 1] if every coordinate
is at most 1), are rescaled to the resized image, the frame the policy answers in.

The problem type picks the reward (`PROBLEM_TYPES`): a built-in task name, a reward type name, or
one of the usual dataset labels ('multiple choice', 'numerical', 'ocr', 'regression', …). Every
problem with a problem type becomes a task of that (normalised) name, so the trainer's per-task
statistics and task ids separate them.

Any bad line raises `UserDataError` naming the file, the 1-based line number and the field.

Must not import jax or the trainer.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from g2rpo_jax import tasks as tasks_lib
from g2rpo_jax.tasks import base, parsing

# problem type (normalised: lower case, '_' and '-' as spaces) -> (reward type, role)
PROBLEM_TYPES: dict[str, tuple[str, str]] = {
    "multiple choice": ("binary", "hybrid"),
    "yes/no": ("binary", "hybrid"),
    "numerical": ("binary", "reasoning"),
    "math": ("binary", "reasoning"),
    "counting": ("binary", "perception"),
    "free form": ("binary", "reasoning"),
    "spatial": ("binary", "hybrid"),
    "ocr": ("ocr", "perception"),
    "grounding": ("iou", "perception"),
    "detection": ("iou", "perception"),
    "regression": ("relative", "hybrid"),
    "chart": ("relative", "hybrid"),
}
for _name, _task in tasks_lib.TASKS.items():
  PROBLEM_TYPES.setdefault(_name, (_task.reward_type, _task.role))
for _rt, _role in (("binary", "reasoning"), ("iou", "perception"), ("ocr", "perception"),
                   ("relative", "hybrid")):
  PROBLEM_TYPES.setdefault(_rt, (_rt, _role))

_FIELDS = {
    "image": ("image", "images"),
    "prompt": ("prompt", "problem", "question"),
    "answer": ("answer", "solution", "ground_truth"),
    "type": ("problem_type", "task", "reward_type"),
}


class UserDataError(ValueError):
  """A bad JSONL record; the message names the file, the line and the field."""


def normalize_problem_type(text: str) -> str:
  return " ".join(text.replace("_", " ").replace("-", " ").lower().split()).replace(
      "yes / no", "yes/no")


def _first(record: dict, keys) -> tuple[str | None, Any]:
  for k in keys:
    if k in record:
      return k, record[k]
  return None, None


class JsonlDataset(Sequence):
  """Random access to the records of a JSONL file as `Example`s (split 'user', index = line − 1
  among the non-blank lines). `task_names` lists the problem types present."""

  def __init__(self, path: str, image_size: int = tasks_lib.DEFAULT_IMAGE_SIZE,
               split: str = "train"):
    if split not in base.SPLITS:
      raise ValueError(f"split must be one of {base.SPLITS}, got {split!r}")
    self.path, self.image_size, self.split = os.fspath(path), image_size, split
    self._root = os.path.dirname(os.path.abspath(self.path))
    self._records: list[dict] = []
    try:
      with open(self.path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
          if line.strip():
            self._records.append(self._parse(line, lineno))
    except UnicodeDecodeError as e:
      raise UserDataError(f"{self.path}: not UTF-8 text ({e})") from None
    if not self._records:
      raise UserDataError(f"{self.path}: no records (the file is empty)")
    self.task_names = tuple(sorted({r["task"] for r in self._records}))

  def _error(self, lineno: int, field: str, what: str) -> UserDataError:
    return UserDataError(f"{self.path}, line {lineno}, field {field!r}: {what}")

  def _parse(self, line: str, lineno: int) -> dict:
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise self._error(lineno, "<record>", f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
      raise self._error(lineno, "<record>", f"expected a JSON object, got {type(record).__name__}")
    out = {"lineno": lineno}
    for field, keys in _FIELDS.items():
      key, value = _first(record, keys)
      if key is None:
        raise self._error(lineno, keys[0], f"missing (expected one of {list(keys)})")
      out[field] = (key, value)

    key, image = out.pop("image")
    if key == "images":
      if not isinstance(image, list) or len(image) != 1:
        raise self._error(lineno, key, f"expected a list of exactly one path, got {image!r:.80}")
      image = image[0]
    if not isinstance(image, str) or not image:
      raise self._error(lineno, key, f"expected an image path string, got {image!r:.80}")
    image_path = image if os.path.isabs(image) else os.path.join(self._root, image)
    if not os.path.isfile(image_path):
      raise self._error(lineno, key, f"image file {image_path!r} does not exist")

    key, prompt = out.pop("prompt")
    if not isinstance(prompt, str) or not prompt.replace("<image>", "").strip():
      raise self._error(lineno, key, f"expected a non-empty string, got {prompt!r:.80}")
    prompt = prompt.replace("<image>", "").strip()

    key, ptype = out.pop("type")
    if not isinstance(ptype, str) or normalize_problem_type(ptype) not in PROBLEM_TYPES:
      raise self._error(lineno, key, f"unknown problem type {ptype!r:.80}; expected one of "
                                     f"{sorted(PROBLEM_TYPES)}")
    task = normalize_problem_type(ptype)
    reward_type, role = PROBLEM_TYPES[task]
    if "role" in record:
      role = record["role"]
      if role not in base.ROLES:
        raise self._error(lineno, "role", f"expected one of {base.ROLES}, got {role!r:.80}")

    key, answer = out.pop("answer")
    answer = self._check_answer(answer, reward_type, lineno, key)
    return {"image_path": image_path, "prompt": prompt, "answer": answer, "task": task,
            "reward_type": reward_type, "role": role, "lineno": lineno}

  def _check_answer(self, answer, reward_type: str, lineno: int, key: str):
    if isinstance(answer, str):
      inner = parsing.extract_answer(answer)
      answer = (inner if inner is not None else answer).strip()
      if not answer:
        raise self._error(lineno, key, "empty answer")
    if reward_type == "iou":
      box = parsing.parse_box(answer) if isinstance(answer, str) else (
          answer if isinstance(answer, list) and len(answer) == 4 else None)
      if box is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                and math.isfinite(v) for v in box):
        raise self._error(lineno, key, f"a grounding answer must be a box [x0, y0, x1, y1], "
                                       f"got {answer!r:.80}")
      return [float(v) for v in box]
    if reward_type == "relative":
      value = parsing.parse_number(answer) if isinstance(answer, str) else answer
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise self._error(lineno, key, f"a regression answer must be a number, got {answer!r:.80}")
      return value
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
      raise self._error(lineno, key, f"expected a string or number, got {answer!r:.80}")
    return answer

  def _scale_box(self, box, width: int, height: int) -> list[float]:
    """A box in the original image's pixels (or normalised to [0, 1]) -> pixels of the resized image."""
    s = self.image_size
    if all(0.0 <= v <= 1.0 for v in box):
      sx = sy = float(s)
    else:
      sx, sy = s / width, s / height
    x0, y0, x1, y1 = box
    return [x0 * sx, y0 * sy, x1 * sx, y1 * sy]

  def __len__(self) -> int:
    return len(self._records)

  def prompts(self) -> list[tuple[int, str]]:
    """(line number, prompt text) of every record, without reading the images."""
    return [(r["lineno"], r["prompt"]) for r in self._records]

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    r = self._records[i]
    try:
      with Image.open(r["image_path"]) as im:
        width, height = im.size
        im = im.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
        image = np.asarray(im, np.uint8).copy()
    except Exception as e:  # pylint: disable=broad-except
      field = "image"
      raise self._error(r["lineno"], field, f"cannot read {r['image_path']!r}: {e}") from None
    answer = r["answer"]
    if r["reward_type"] == "iou":
      answer = self._scale_box(answer, width, height)
    return base.Example(image=image, prompt=r["prompt"], answer=answer, task=r["task"],
                        reward_type=r["reward_type"], role=r["role"], difficulty={},
                        split=self.split, index=i if i >= 0 else len(self) + i,
                        meta={"file": self.path, "line": r["lineno"]})
