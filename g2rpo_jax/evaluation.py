"""Held-out evaluation: per-task scores of a policy on the tasks' validation (or test) split.

A policy is given as `respond(examples) -> list[str]` (the trainer wraps its greedy rollout),
so this module knows nothing about models or devices. The score of a task is its mean accuracy
(the task's own verifiable reward, SPEC §6) over the first `num_examples` examples of the split;
format and response length are reported beside it.

Multi-host: process p scores examples p, p + P, p + 2P, ... and every process runs the same
number of `respond` calls (a rollout is a collective); the per-task sums are combined by the
caller-supplied `gather` (the trainer's all-host concatenation).

Must not import jax, the trainer or the models.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Sequence

import numpy as np


def evaluate(respond: Callable[[list], list[str]], tasks: Sequence, *, split: str = "validation",
             num_examples: int = 64, batch_size: int = 64, process_index: int = 0,
             process_count: int = 1,
             gather: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, dict]:
  """Scores every task; returns {task: {"score", "format", "length", "count"}} (score in [0, 1]).

  Args:
    respond: examples -> responses (same order and length).
    tasks: Task objects (`example`, `reward`, `format_reward`, `name`).
    split: which held-out split; num_examples: first indices 0..num_examples-1 per task (or
      the task's `len`, if it has one and it is smaller).
    batch_size: examples per `respond` call on this process.
    gather: combines per-process f64[K, 4] statistics (sum over processes); None on one host.
  """
  if split == "train":
    raise ValueError("evaluate: split 'train' is not held out; use 'validation' or 'test'")
  # A task with a length (a user's held-out file) is scored on at most that many examples.
  sizes = [min(num_examples, len(task)) if hasattr(task, "__len__") else num_examples
           for task in tasks]
  all_items = [(t, i) for t in range(len(tasks)) for i in range(sizes[t])]
  mine = all_items[process_index::process_count]
  # Every process makes the same number of respond() calls.
  per_proc = math.ceil(len(all_items) / process_count)
  num_batches = math.ceil(per_proc / batch_size) if per_proc else 0
  stats = np.zeros((len(tasks), 4), np.float64)  # score, format, length (chars), count
  filler = tasks[0].example(split, 0)
  for b in range(num_batches):
    items = mine[b * batch_size:(b + 1) * batch_size]
    examples = [tasks[t].example(split, i) for t, i in items]
    responses = respond(examples if examples else [filler])[:len(examples)]
    for (t, _), ex, text in zip(items, examples, responses):
      stats[t] += (_safe(tasks[t].reward, text, ex), _safe_fmt(tasks[t], text), len(text), 1)
  if gather is not None:
    stats = np.asarray(gather(stats[None])).sum(0)
  out = {}
  for t, task in enumerate(tasks):
    n = max(stats[t, 3], 1)
    out[task.name] = {"score": float(stats[t, 0] / n), "format": float(stats[t, 1] / n),
                      "length": float(stats[t, 2] / n), "count": int(stats[t, 3])}
  return out


def _safe(fn, text, example) -> float:
  try:
    v = float(fn(text, example))
  except Exception:  # pylint: disable=broad-except
    return 0.0
  return v if math.isfinite(v) else 0.0


def _safe_fmt(task, text) -> float:
  try:
    v = float(task.format_reward(text))
  except Exception:  # pylint: disable=broad-except
    return 0.0
  return v if math.isfinite(v) else 0.0


def scores(result: dict[str, dict]) -> dict[str, float]:
  """{task: score} from `evaluate`'s result."""
  return {k: float(v["score"]) for k, v in result.items()}


def mean_score(result: dict[str, dict]) -> float:
  return float(np.mean([v["score"] for v in result.values()]))


def write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True,
              default=lambda v: v.item() if hasattr(v, "item") else str(v))
  os.replace(tmp, path)
