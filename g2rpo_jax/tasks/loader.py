"""Prompt batches for the trainer: a weighted mixture over task sources, sharded per host.

Every batch is a pure function of (seed, step, cursors):
  * the task of each slot of the GLOBAL batch (batch_size × process_count slots) is drawn from
    the mixture weights with a generator seeded by (seed, step);
  * each source is read in epochs, each epoch a permutation seeded by (seed, source, epoch); the
    cursor of a source counts the items taken from it so far;
  * host p keeps slots [p·batch_size, (p+1)·batch_size) of the global batch.
All hosts therefore advance the same cursors, and `get_state()` — {step, cursors, …}, plain JSON —
restores the position exactly: a resumed loader yields the same batches as an uninterrupted one.

A source is any random-access sequence of `Example`s (`data.ExampleSource` over TFDS, a list, a
`user_data.JsonlDataset`). It may declare `task_names` (the example tasks it contains) so task ids
are known up front; built-in tasks keep their `TASK_IDS`, other names get ids after them in sorted
order.

Imports jax only to read the default process index / count.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np

from g2rpo_jax import tasks as tasks_lib
from g2rpo_jax.tasks import base

_STATE_VERSION = 1
_SOURCE_SALT = "source"


def _default_process() -> tuple[int, int]:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index(), jax.process_count()


def _stable_id(name: str) -> int:
  return base.seed_for(_SOURCE_SALT, name) & 0x7FFFFFFF


class MixtureLoader:
  """Iterator of prompt batches from a weighted mixture of sources.

  Each batch is a dict with
    image: uint8[B, S, S, 3]; prompt, answer, task, role, reward_type, source: lists of length B;
    task_id, pool_id: int32[B] (TASK_IDS / POOL_IDS); index: int64[B] (index in its split);
    examples: list[Example] (for computing rewards on host).
  """

  def __init__(self, sources: Mapping[str, Sequence], weights: Mapping[str, float],
               batch_size: int, seed: int = 0, *, process_index: int | None = None,
               process_count: int | None = None):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive int (per host), got {batch_size!r}")
    missing = sorted(set(sources) - set(weights))
    extra = sorted(set(weights) - set(sources))
    if missing or extra:
      raise ValueError(f"mixture weights must name exactly the sources {sorted(sources)}; "
                       f"missing {missing}, unknown {extra}")
    for name, w in weights.items():
      if not np.isfinite(w) or w < 0:
        raise ValueError(f"mixture weight of {name!r} must be finite and >= 0, got {w!r}")
    self._names = sorted(n for n in sources if weights[n] > 0)
    if not self._names:
      raise ValueError(f"all mixture weights are 0: {dict(weights)}")
    for n in self._names:
      if len(sources[n]) == 0:
        raise ValueError(f"source {n!r} has weight {weights[n]} but no examples")
    if process_index is None or process_count is None:
      pi, pc = _default_process()
      process_index = pi if process_index is None else process_index
      process_count = pc if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    self._sources = {n: sources[n] for n in self._names}
    w = np.array([weights[n] for n in self._names], np.float64)
    self._probs = w / w.sum()
    self.batch_size, self.seed = batch_size, int(seed)
    self.process_index, self.process_count = process_index, process_count
    self._step = 0
    self._cursors = {n: 0 for n in self._names}
    self._perms: dict[tuple[str, int], np.ndarray] = {}
    self.task_ids = self._task_ids()

  def _task_ids(self) -> dict[str, int]:
    ids = dict(tasks_lib.TASK_IDS)
    names = set()
    for n, src in self._sources.items():
      names.update(getattr(src, "task_names", (n,)))
    for extra in sorted(names - set(ids)):
      ids[extra] = len(ids)
    return ids

  @property
  def weights(self) -> dict[str, float]:
    """The normalised mixture weights of the sources in use."""
    return dict(zip(self._names, self._probs.tolist()))

  # --- state -------------------------------------------------------------------------------------

  def get_state(self) -> dict[str, Any]:
    """Plain JSON-able position; `set_state` on a loader built the same way resumes exactly."""
    return {"version": _STATE_VERSION, "seed": self.seed, "step": self._step,
            "cursors": dict(self._cursors), "batch_size": self.batch_size,
            "process_count": self.process_count}

  def set_state(self, state: Mapping[str, Any]) -> None:
    state = json.loads(json.dumps(state))  # accept any JSON round-trip of get_state()
    expect = {"version": _STATE_VERSION, "seed": self.seed, "batch_size": self.batch_size,
              "process_count": self.process_count}
    for key, value in expect.items():
      if state.get(key) != value:
        raise ValueError(f"loader state has {key}={state.get(key)!r} but this loader has "
                         f"{key}={value!r}; the position would not mean the same batches")
    if sorted(state.get("cursors", {})) != self._names:
      raise ValueError(f"loader state has sources {sorted(state.get('cursors', {}))}, this loader "
                       f"has {self._names}")
    self._step = int(state["step"])
    self._cursors = {n: int(state["cursors"][n]) for n in self._names}

  # --- iteration ---------------------------------------------------------------------------------

  def __iter__(self):
    return self

  def _perm(self, name: str, epoch: int) -> np.ndarray:
    key = (name, epoch)
    if key not in self._perms:
      if len(self._perms) > 4 * len(self._names):
        self._perms.clear()
      rng = np.random.default_rng([self.seed, _stable_id(name), epoch])
      self._perms[key] = rng.permutation(len(self._sources[name]))
    return self._perms[key]

  def _item(self, name: str, position: int) -> int:
    n = len(self._sources[name])
    return int(self._perm(name, position // n)[position % n])

  def __next__(self) -> dict[str, Any]:
    global_b = self.batch_size * self.process_count
    rng = np.random.default_rng([self.seed, self._step])
    choice = rng.choice(len(self._names), size=global_b, p=self._probs)
    # Position of each slot within its source: cursor + rank among earlier slots of that source.
    positions = np.empty(global_b, np.int64)
    for k, name in enumerate(self._names):
      slots = np.flatnonzero(choice == k)
      positions[slots] = self._cursors[name] + np.arange(len(slots))
    lo = self.process_index * self.batch_size
    examples, sources = [], []
    for slot in range(lo, lo + self.batch_size):
      name = self._names[choice[slot]]
      examples.append(self._sources[name][self._item(name, int(positions[slot]))])
      sources.append(name)
    for k, name in enumerate(self._names):
      self._cursors[name] += int(np.sum(choice == k))
    self._step += 1
    return self._collate(examples, sources)

  def _collate(self, examples, sources) -> dict[str, Any]:
    shapes = {e.image.shape for e in examples}
    if len(shapes) != 1:
      raise ValueError(f"examples in one batch have different image shapes {sorted(shapes)} "
                       f"(sources {sorted(set(sources))}); use one image_size for all sources")
    unknown = sorted({e.task for e in examples} - set(self.task_ids))
    if unknown:
      raise ValueError(f"examples with task(s) {unknown} not declared by their source's "
                       "`task_names`; cannot give them a task id")
    return {
        "image": np.stack([e.image for e in examples]).astype(np.uint8),
        "prompt": [e.prompt for e in examples],
        "answer": [e.answer for e in examples],
        "task": [e.task for e in examples],
        "role": [e.role for e in examples],
        "reward_type": [e.reward_type for e in examples],
        "source": sources,
        "task_id": np.array([self.task_ids[e.task] for e in examples], np.int32),
        "pool_id": np.array([tasks_lib.POOL_IDS[e.reward_type] for e in examples], np.int32),
        "index": np.array([e.index for e in examples], np.int64),
        "examples": examples,
    }


def from_config(cfg, split: str, batch_size: int, seed: int = 0, **process) -> MixtureLoader:
  """A MixtureLoader over the TFDS sources of `cfg` (see `data.default_config`)."""
  from g2rpo_jax.tasks import data  # pylint: disable=import-outside-toplevel
  sources = data.load_sources(cfg, split)
  weights = {n: float(cfg.tasks[n].weight) for n in sources}
  return MixtureLoader(sources, weights, batch_size, seed, **process)
