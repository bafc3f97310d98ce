"""The task interface: `Example`, the `Task` base class, deterministic seeding and split assignment.

A task is a procedural generator plus a verifiable reward plus a demonstration:

  example(split, index, **difficulty) -> Example     deterministic in (task, split, index, knobs)
  reward(response, example) -> float in [0, 1]       accuracy from the <answer> part; never raises
  format_reward(response) -> float                   1 iff <think>…</think><answer>…</answer>
  demonstration(example) -> str                      a correct, well-formed response

Splits are disjoint by construction: every generated example has a content key (by default its
image bytes and prompt; a task may use something narrower, e.g. the OCR word), and the key's hash
decides which split the content belongs to. A generator draws candidates from a seed stream for
(task, split, index) until one lands in the requested split, so an example's content can never
appear in two splits. Tasks whose generator already draws from disjoint pools per split (the
handwritten digits) opt out of the rejection step.

Must not import jax, TFDS or the trainer: examples are generated on host, also inside TFDS builds.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from typing import Any, Mapping

import numpy as np

from g2rpo_jax.tasks import parsing, rewards

SPLITS = ("train", "validation", "test")
ROLES = ("perception", "reasoning", "hybrid")

# Content hash buckets per split: 80% / 10% / 10% of all possible content.
_NUM_BUCKETS = 20
_SPLIT_BUCKETS = {"train": range(0, 16), "validation": range(16, 18), "test": range(18, 20)}
_MAX_ATTEMPTS = 1000


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
  """One prompt with its image and ground truth.

  image: uint8[S, S, 3]; prompt and answer are printable ASCII; `answer` is JSON-able (int, float,
  str or list of 4 numbers for a box); `meta` holds JSON-able facts the demonstration is written
  from (e.g. the digits shown), never needed for the reward.
  """
  image: np.ndarray
  prompt: str
  answer: Any
  task: str
  reward_type: str
  role: str
  difficulty: Mapping[str, Any]
  split: str
  index: int
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def seed_for(*parts) -> int:
  """A 63-bit seed from a hash of `parts` (stable across machines and Python runs, unlike hash())."""
  digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
  return int.from_bytes(digest[:8], "little") >> 1


def split_of(content_key: bytes) -> str:
  """The split that owns a piece of content, from a hash of its key."""
  bucket = int.from_bytes(hashlib.sha256(content_key).digest()[:4], "little") % _NUM_BUCKETS
  return next(s for s, r in _SPLIT_BUCKETS.items() if bucket in r)


class Task:
  """Base class: subclasses set the class attributes and implement `_generate` and `_think_answer`."""

  name: str = ""
  reward_type: str = ""
  role: str = ""
  default_difficulty: Mapping[str, Any] = {}

  def __init__(self, image_size: int = 32):
    if not isinstance(image_size, int) or image_size < 16:
      raise ValueError(f"task {self.name!r}: image_size must be an int >= 16, got {image_size!r}")
    self.image_size = image_size

  def __repr__(self) -> str:
    changed = {k: v for k, v in self.default_difficulty.items()
               if type(self).default_difficulty.get(k) != v}
    knobs = f", difficulty={changed}" if changed else ""
    return f"{type(self).__name__}(name={self.name!r}, image_size={self.image_size}{knobs})"

  def with_image_size(self, image_size: int) -> "Task":
    if image_size == self.image_size:
      return self
    task = type(self)(image_size)
    task.default_difficulty = self.default_difficulty
    return task

  def with_difficulty(self, **knobs) -> "Task":
    """This task with `knobs` as its defaults: `example(split, i)` without knobs generates at
    them (the examples of `example(split, i, **knobs)`). Unknown knobs and out-of-range values
    raise ValueError naming them; no knobs (or the defaults) give this same task."""
    d = self.difficulty(**knobs)
    if d == dict(self.default_difficulty):
      return self
    task = copy.copy(self)
    task.default_difficulty = d
    return task

  # --- generation --------------------------------------------------------------------------------

  def difficulty(self, **overrides) -> dict:
    """The default knobs updated by `overrides`; an unknown knob is an error naming the valid ones."""
    unknown = sorted(set(overrides) - set(self.default_difficulty))
    if unknown:
      raise ValueError(f"task {self.name!r}: unknown difficulty knob(s) {unknown}; valid knobs: "
                       f"{sorted(self.default_difficulty)}")
    d = {**self.default_difficulty, **overrides}
    self._check_difficulty(d)
    return d

  def example(self, split: str, index: int, **difficulty) -> Example:
    if split not in SPLITS:
      raise ValueError(f"task {self.name!r}: split must be one of {SPLITS}, got {split!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
      raise ValueError(f"task {self.name!r}: index must be a non-negative int, got {index!r}")
    index = int(index)
    d = self.difficulty(**difficulty)
    knobs = json.dumps(d, sort_keys=True)
    for attempt in range(_MAX_ATTEMPTS):
      rng = np.random.default_rng(seed_for(self.name, split, index, knobs, attempt))
      image, prompt, answer, meta = self._generate(rng, split, d)
      key = self._content_key(image, prompt, answer, meta)
      if key is None or split_of(key) == split:
        return Example(image=image, prompt=prompt, answer=answer, task=self.name,
                       reward_type=self.reward_type, role=self.role, difficulty=d, split=split,
                       index=index, meta=meta)
    raise RuntimeError(f"task {self.name!r}: no {split!r} content in {_MAX_ATTEMPTS} draws with "
                       f"difficulty {d}; the knobs leave too few distinct examples")

  def _check_difficulty(self, d: dict) -> None:
    """Raises ValueError naming a knob whose value is out of range."""

  def _generate(self, rng: np.random.Generator, split: str, d: dict):
    """Returns (image uint8[S,S,3], prompt, answer, meta)."""
    raise NotImplementedError

  def _content_key(self, image, prompt, answer, meta) -> bytes | None:
    """What must not be shared between splits; None if `_generate` already keeps splits apart."""
    del answer, meta
    return image.tobytes() + prompt.encode()

  # --- rewards -----------------------------------------------------------------------------------

  def reward(self, response, example: Example) -> float:
    """Accuracy in [0, 1] of `response` on `example` (from its <answer> part); never raises."""
    return rewards.accuracy(self.reward_type, response, example.answer)

  @staticmethod
  def format_reward(response) -> float:
    return parsing.format_reward(response)

  def demonstration(self, example: Example) -> str:
    think, answer = self._think_answer(example)
    return parsing.format_demonstration(think, answer)

  def _think_answer(self, example: Example) -> tuple[str, str]:
    raise NotImplementedError


def check_int_knob(task: str, d: dict, knob: str, lo: int, hi: int) -> None:
  v = d[knob]
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
    raise ValueError(f"task {task!r}: difficulty knob {knob!r} must be an int in [{lo}, {hi}], "
                     f"got {v!r}")
