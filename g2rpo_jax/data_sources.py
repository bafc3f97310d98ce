"""Where the trainer's prompts come from (`config.data`): generated tasks, TFDS, user JSONL files.

The trainer asks a prompt stream for `next(n) -> list[Example]` and checkpoints its
`get_state()` (plain JSON) so a resumed run reads exactly the prompts an uninterrupted one would.

  config.data.source = "generate"  built-in tasks generated on the fly by `PromptSampler`
                                   (the default; its draws are what every earlier run used)
  config.data.source = "tfds"      built-in tasks read from the TFDS array_record datasets of
                                   `tasks/data.py`, prepared on first use into
                                   `config.tasks.data_dir` (default `<workdir>/data`), mixed by
                                   `tasks/loader.MixtureLoader`
  config.data.user.paths = (...)   user JSONL files (`tasks/user_data.JsonlDataset`), each one
                                   more mixture component with its own weight, task name, reward
                                   type and role; they go through `MixtureLoader` whichever
                                   `source` is chosen (with "generate", the built-in tasks are then
                                   `GeneratedSource`s: the same examples TFDS stores, which
                                   TFDS keeps in a shuffled order, so the draws differ).

Every record of one user file becomes an example of that file's task (`UserTask`): per-task
metrics, length-shaping window and entropy band are per file; the reward comes from the file's
reward type (or, when none is given, each record's problem type). User data is RL-only: a JSONL
record has an answer but no demonstration, so the supervised warm start uses the built-in tasks
only (`config_utils.validate` requires a built-in task with positive weight when the warm start
runs). A held-out file per component (`config.data.user.eval_paths`) is scored by evaluation
beside the built-in tasks (`UserEvalTask`).

Per-host sharding: `MixtureLoader` draws the global batch and host p keeps its slots;
`PromptSampler` draws an independent stream per process.

Must not import jax or the trainer (process index and count are passed in).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from g2rpo_jax import config_utils
from g2rpo_jax import tasks as tasks_lib
from g2rpo_jax.tasks import parsing

SOURCES = ("generate", "tfds")


class PromptSampler:
  """Deterministic, checkpointable draws of (task, train index) from the weighted task mixture.

  The n-th draw of process p depends only on (seed, p, n), so `get_state()` is the draw count
  and a restored sampler continues exactly. Each process draws its own disjoint stream (its
  data shard). Examples are generated on demand by the task (and cached).
  """

  def __init__(self, tasks: Sequence, weights: Sequence[float], seed: int, train_size: int,
               split: str = "train", process_index: int = 0, stream: str = "rl"):
    self.tasks = list(tasks)
    w = np.asarray(weights, np.float64)
    self.probs = w / w.sum()
    self.seed = seed
    self.train_size = int(train_size)
    self.split = split
    self.process_index = process_index
    self.stream = stream
    self.position = 0
    self._cache: dict = {}

  def get_state(self) -> dict:
    return {"position": int(self.position)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if "position" not in state:
      raise ValueError(f"prompt sampler state {dict(state)!r} has no 'position': it was saved by "
                       "a different data source (config.data.source changed?)")
    self.position = int(state["position"])

  def _draw(self, n: int):
    rng = np.random.default_rng([self.seed, self.process_index, n, len(self.stream), 7])
    t = int(rng.choice(len(self.tasks), p=self.probs))
    return t, int(rng.integers(self.train_size))

  def example(self, t: int, index: int):
    key = (t, index)
    if key not in self._cache:
      if len(self._cache) > 4096:
        self._cache.clear()
      self._cache[key] = self.tasks[t].example(self.split, index)
    return self._cache[key]

  def next(self, n: int) -> list:
    out = []
    for _ in range(n):
      t, index = self._draw(self.position)
      self.position += 1
      out.append(self.example(t, index))
    return out


class GeneratedSource(Sequence):
  """A built-in task's split as a random-access sequence, generated on access.

  Example i is `task.example(split, i)`: the record the TFDS builder stores at index i.
  """

  def __init__(self, task, split: str, size: int):
    self._task, self._split, self._size = task, split, int(size)
    self.task_names = (task.name,)

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, i):
    if not 0 <= i < self._size:
      raise IndexError(f"{self!r}: index {i} out of range")
    return self._task.example(self._split, int(i))

  def __repr__(self) -> str:
    return f"GeneratedSource({self._task.name!r}, {self._split!r}, n={self._size})"


# ------------------------------------------------------------------------------------------
# User JSONL components.

@dataclasses.dataclass(frozen=True)
class UserSpec:
  """One user JSONL file as a mixture component (from `config.data.user`)."""
  name: str
  path: str
  weight: float
  reward_type: str = ""  # "" = each record's problem type decides
  role: str = ""  # "" = the first record's role (from its problem type)


def user_specs(config) -> list[UserSpec]:
  """`config.data.user` (parallel tuples; `config_utils.validate` checked them) -> specs."""
  u = config.data.user
  paths = tuple(u.paths)
  names = config_utils.user_task_names(config)
  weights = tuple(u.weights) or (1.0,) * len(paths)
  rtypes = tuple(u.reward_types) or ("",) * len(paths)
  roles = tuple(u.roles) or ("",) * len(paths)
  return [UserSpec(n, p, float(w), r, ro)
          for n, p, w, r, ro in zip(names, paths, weights, rtypes, roles)]


class UserTask:
  """The task of one user file: reward by reward type, format reward, no demonstration."""

  def __init__(self, name: str, role: str, reward_type: str = ""):
    self.name, self.role, self.reward_type = name, role, reward_type

  def __repr__(self) -> str:
    return f"UserTask({self.name!r}, role={self.role!r}, reward_type={self.reward_type!r})"

  def reward(self, response, example) -> float:
    return tasks_lib.reward(response, example)

  @staticmethod
  def format_reward(response) -> float:
    return parsing.format_reward(response)

  def demonstration(self, example) -> str:
    raise ValueError(f"user task {self.name!r} (JSONL data) has no demonstrations: user data is "
                     "RL-only, the warm start uses the built-in tasks")


class UserComponent(Sequence):
  """A `JsonlDataset` whose examples are relabelled as the component's task (and reward type)."""

  def __init__(self, spec: UserSpec, image_size: int = tasks_lib.DEFAULT_IMAGE_SIZE):
    from g2rpo_jax.tasks import user_data  # pylint: disable=import-outside-toplevel
    self.spec = spec
    self.dataset = user_data.JsonlDataset(spec.path, image_size=image_size, split="train")
    first = self.dataset._records[0]  # pylint: disable=protected-access
    self.role = spec.role or first["role"]
    self.task = UserTask(spec.name, self.role, spec.reward_type)
    self.task_names = (spec.name,)

  def __len__(self) -> int:
    return len(self.dataset)

  def __getitem__(self, i):
    ex = self.dataset[i]
    return dataclasses.replace(ex, task=self.spec.name, role=self.role,
                               reward_type=self.spec.reward_type or ex.reward_type)


class UserEvalTask(UserTask):
  """The held-out file of one user component (`data.user.eval_paths`), as evaluation sees a task:
  `UserTask`'s rewards plus `example(split, i)` and `len` (the records to score at most).

  Every record of the file is held out, so the 'validation' and 'test' splits both read it (the
  user decides what the file holds); examples are relabelled like the component's training ones.
  """

  def __init__(self, spec: UserSpec, eval_path: str, role: str,
               image_size: int = tasks_lib.DEFAULT_IMAGE_SIZE):
    from g2rpo_jax.tasks import user_data  # pylint: disable=import-outside-toplevel
    super().__init__(spec.name, role, spec.reward_type)
    self.dataset = user_data.JsonlDataset(eval_path, image_size=image_size, split="validation")

  def __repr__(self) -> str:
    return f"UserEvalTask({self.name!r}, {self.dataset.path!r})"

  def __len__(self) -> int:
    return len(self.dataset)

  def example(self, split: str, index: int):
    if split == "train":
      raise ValueError(f"user task {self.name!r}: its eval file {self.dataset.path!r} is held-out "
                       "data; ask for split 'validation' or 'test'")
    ex = self.dataset[index]
    return dataclasses.replace(ex, task=self.name, role=self.role, split=split,
                               reward_type=self.reward_type or ex.reward_type)


def user_eval_tasks(config, components: Sequence[UserComponent]) -> list[UserEvalTask]:
  """Evaluation tasks of the user components that name a held-out file in
  `data.user.eval_paths` (parallel to `paths`; '' = that component is not evaluated)."""
  eval_paths = tuple(config.data.user.eval_paths) or ("",) * len(components)
  return [UserEvalTask(comp.spec, path, comp.role)
          for comp, path in zip(components, eval_paths) if path]


def check_user_prompts(datasets: Sequence, encode: Callable[[list, list], Any],
                       chunk: int = 256) -> None:
  """Encodes every record's prompt of the user files up front (with a blank image of the size
  the dataset resizes to), so a prompt the policy's processor refuses (longer than
  `model.max_prompt_len`, ...) fails before training, naming its file and line.

  datasets: `tasks/user_data.JsonlDataset`s; encode: the processor, (prompts, images) -> batch.
  """
  from g2rpo_jax.tasks import user_data  # pylint: disable=import-outside-toplevel
  for ds in datasets:
    blank = np.zeros((ds.image_size, ds.image_size, 3), np.uint8)
    records = ds.prompts()
    for start in range(0, len(records), chunk):
      part = records[start:start + chunk]
      try:
        encode([text for _, text in part], [blank] * len(part))
      except ValueError:
        for lineno, text in part:
          try:
            encode([text], [blank])
          except ValueError as e:
            raise user_data.UserDataError(f"{ds.path}, line {lineno}, field 'prompt': "
                                          f"{e}") from None
        raise


# ------------------------------------------------------------------------------------------
# Streams.

class LoaderStream:
  """`MixtureLoader` behind the sampler interface (`next(n)`, `get_state`, `set_state`)."""

  def __init__(self, loader):
    self.loader = loader

  def next(self, n: int) -> list:
    if n != self.loader.batch_size:
      raise ValueError(f"this prompt stream yields batches of {self.loader.batch_size} per host, "
                       f"asked for {n}")
    return next(self.loader)["examples"]

  def get_state(self) -> dict:
    return self.loader.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.loader.set_state(state)


def builtin_task(config, name: str):
  """The built-in task `name` generating at its `config.tasks.difficulty` knobs."""
  knobs = config_utils.task_difficulty(config, name)
  try:
    return tasks_lib.get_task(name, difficulty=knobs)
  except ValueError as e:
    raise config_utils.ConfigError(f"config.tasks.difficulty.{name} = {knobs!r}: {e}") from None


def data_dir(config, workdir: str) -> str:
  """Where the TFDS datasets are prepared: `config.tasks.data_dir` or `<workdir>/data`."""
  return config.tasks.data_dir or os.path.join(os.path.abspath(workdir), "data")


def _builtin_sources(config, workdir: str, names: Sequence[str]) -> dict[str, Sequence]:
  if not names:
    return {}
  size = int(config.tasks.train_size)
  if config.data.source == "generate":
    return {n: GeneratedSource(builtin_task(config, n), "train", size) for n in names}
  from g2rpo_jax.tasks import data  # pylint: disable=import-outside-toplevel
  cfg = data.make_config(names=list(names), weights=[1.0] * len(names),
                         split_sizes={"train": size}, data_dir=data_dir(config, workdir),
                         difficulty={n: builtin_task(config, n).default_difficulty
                                     for n in names})
  return data.load_sources(cfg, "train")


def prepare(config, workdir: str) -> None:
  """Builds the TFDS datasets the config reads (no-op for generated tasks)."""
  if config.data.source == "tfds":
    names = [n for n, w in zip(config.tasks.names, config.tasks.weights) if w > 0]
    _builtin_sources(config, workdir, names)


def uses_loader(config) -> bool:
  """True when prompts come from `MixtureLoader` (TFDS or user data), not `PromptSampler`."""
  return config.data.source == "tfds" or bool(tuple(config.data.user.paths))


def user_components(config) -> list[UserComponent]:
  return [UserComponent(s) for s in user_specs(config)]


def _mixture_stream(config, workdir: str, batch_size: int, seed: int, *, process_index: int,
                    process_count: int, components: Sequence[UserComponent] = ()):
  """The built-in tasks with weight > 0 (generated or TFDS) plus the user components with
  weight > 0, mixed by `MixtureLoader`."""
  from g2rpo_jax.tasks import loader  # pylint: disable=import-outside-toplevel
  weights = dict(zip(config.tasks.names, (float(w) for w in config.tasks.weights)))
  sources = _builtin_sources(config, workdir, [n for n, w in weights.items() if w > 0])
  mix_weights = {n: weights[n] for n in sources}
  for comp in components:
    if comp.spec.weight > 0:
      sources[comp.spec.name] = comp
      mix_weights[comp.spec.name] = comp.spec.weight
  return LoaderStream(loader.MixtureLoader(sources, mix_weights, batch_size, seed,
                                           process_index=process_index,
                                           process_count=process_count))


def _generated_stream(config, seed: int, process_index: int, stream: str) -> PromptSampler:
  return PromptSampler([builtin_task(config, n) for n in config.tasks.names],
                       [float(w) for w in config.tasks.weights], seed, config.tasks.train_size,
                       process_index=process_index, stream=stream)


def rl_stream(config, workdir: str, batch_size: int, *, process_index: int, process_count: int,
              components: Sequence[UserComponent] = ()):
  """The RL prompt stream: `batch_size` prompts per host per `next`."""
  if not uses_loader(config):
    return _generated_stream(config, config.seed, process_index, "rl")
  return _mixture_stream(config, workdir, batch_size, config.seed, process_index=process_index,
                         process_count=process_count, components=components)


# Seed offsets of the streams that read demonstrations: each stage sees its own examples.
_DEMO_STREAMS = {"warm_start": 1, "vision_pretrain": 2}


def warm_start_stream(config, workdir: str, batch_size: int, *, process_index: int,
                      process_count: int, stage: str = "warm_start"):
  """Prompts for a stage that learns from demonstrations: built-in tasks only (they have them).

  `stage` is "warm_start" (the supervised warm start) or "vision_pretrain" (the vision tower's
  pretraining, `vision_pretraining.py`); each draws its own examples from the same mixture.
  """
  if stage not in _DEMO_STREAMS:
    raise ValueError(f"stage must be one of {sorted(_DEMO_STREAMS)}, got {stage!r}")
  weights = tuple(float(w) for w in config.tasks.weights)
  if sum(weights) <= 0:
    raise ValueError(f"the {stage.replace('_', ' ')} needs a built-in task with weight > 0 "
                     f"(config.tasks.weights = {weights}): user JSONL data has no "
                     f"demonstrations; set {stage}.enabled=False or init_checkpoint")
  seed = config.seed + _DEMO_STREAMS[stage]
  if config.data.source == "generate":
    return _generated_stream(config, seed, process_index, stage)
  return _mixture_stream(config, workdir, batch_size, seed,
                         process_index=process_index, process_count=process_count)
