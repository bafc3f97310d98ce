"""The visual task suite: six procedural tasks whose verifiable rewards have different shapes.

  name        reward_type  role        what
  grounding   iou          perception  'Box of the red circle?' -> x0,y0,x1,y1
  counting    binary       perception  'How many red shapes?' -> integer
  arithmetic  binary       reasoning   handwritten digits (sklearn load_digits) -> sum / expression
  ocr         ocr          perception  rendered code -> transcription, 1 − CER
  spatial     binary       hybrid      'Where is red vs blue? left/right/above/below'
  chart       relative     hybrid      bar chart -> value of a bar, mean relative accuracy

Roles are for length shaping (SPEC §4): perception answers are read off the image with a
one-phrase think; reasoning writes a step-by-step chain; hybrids name what they read, then answer.
Counting is perception: its think part enumerates the objects, which is perception written out.

Trainer-facing ids: `TASK_IDS` (task name -> dense int, in `TASK_NAMES` order) and `POOL_IDS`
(reward type -> dense int, in `REWARD_TYPES` order; the advantage pool of SPEC §2).

This package's core (tasks, parsing, rewards) must not import jax or the trainer; the data
pipeline (`data`, `loader`, `user_data`) imports TFDS lazily so `import g2rpo_jax.tasks` stays light.
"""
from __future__ import annotations

from typing import Any, Mapping

from g2rpo_jax.tasks.base import Example, ROLES, SPLITS, Task
from g2rpo_jax.tasks.chart import Chart
from g2rpo_jax.tasks.digits import DigitArithmetic
from g2rpo_jax.tasks.parsing import format_reward
from g2rpo_jax.tasks.rewards import POOL_IDS, REWARD_TYPES, accuracy
from g2rpo_jax.tasks.scenes import Counting, Grounding, Spatial
from g2rpo_jax.tasks.text import Ocr

DEFAULT_IMAGE_SIZE = 32

TASKS: dict[str, Task] = {
    t.name: t for t in (Grounding(), Counting(), DigitArithmetic(), Ocr(), Spatial(), Chart())
}
TASK_NAMES = tuple(TASKS)
TASK_IDS = {name: i for i, name in enumerate(TASK_NAMES)}


def get_task(name: str, image_size: int | None = None,
             difficulty: Mapping[str, Any] | None = None) -> Task:
  """The registered task `name`, rendering at `image_size` (default 32) and generating at the
  `difficulty` knobs (the rest at their defaults; see `Task.with_difficulty`)."""
  if name not in TASKS:
    raise KeyError(f"unknown task {name!r}; registered tasks: {list(TASKS)}")
  task = TASKS[name]
  if image_size is not None:
    task = task.with_image_size(image_size)
  return task.with_difficulty(**dict(difficulty or {}))


def reward(response, example: Example) -> float:
  """Accuracy of `response` on any example (built-in or user data), chosen by its reward type."""
  return accuracy(example.reward_type, response, example.answer)


__all__ = [
    "DEFAULT_IMAGE_SIZE", "Example", "POOL_IDS", "REWARD_TYPES", "ROLES", "SPLITS", "TASKS",
    "TASK_IDS", "TASK_NAMES", "Task", "format_reward", "get_task", "reward",
]
