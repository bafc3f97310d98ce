"""TFDS datasets of the task suite: built once into a data dir, read back without TensorFlow.

Each task with its image size, difficulty knobs and split sizes is one TFDS builder config of the
`g2rpo_tasks` builder, stored as array_record files and read through `as_data_source` (random
access, no TensorFlow: images are stored as raw uint8 tensors, since TFDS's Image feature needs
TensorFlow to encode PNGs). The config name carries a digest of everything that changes the
content, so a second call with the same settings reuses the files and different settings never
overwrite each other.

  cfg = default_config()                        # ml_collections; edit sizes / weights / knobs
  sources = load_sources(cfg, "train")          # {task: ExampleSource}, builds on first use
  sources["ocr"][3]                             # -> Example

The builder is not registered in TFDS's global registry (its configs are made on the fly), so it
is reached through `load_sources` / `build_task` rather than `tfds.data_source(name)`; both end
in the same `DatasetBuilder.as_data_source`.

Multi-host: content is deterministic, so every host may build into its own local data dir; hosts
sharing one data dir should let one host build first (TFDS writes to a temporary directory and
renames it, but two concurrent builds still do the work twice).

Must not import jax or the trainer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Mapping, Sequence

import ml_collections
import numpy as np

from g2rpo_jax import tasks as tasks_lib
from g2rpo_jax.tasks import base

DATA_DIR_ENV = "G2RPO_DATA_DIR"
_VERSION = "1.0.0"


def default_config() -> ml_collections.ConfigDict:
  """The data section of an experiment config: sizes, mixture weights and knobs per task."""
  cfg = ml_collections.ConfigDict()
  cfg.data_dir = ""  # '' -> $G2RPO_DATA_DIR or ~/.cache/g2rpo_jax/tfds
  cfg.image_size = tasks_lib.DEFAULT_IMAGE_SIZE
  cfg.split_sizes = ml_collections.ConfigDict({"train": 2048, "validation": 128, "test": 128})
  cfg.tasks = ml_collections.ConfigDict()
  for name, task in tasks_lib.TASKS.items():
    cfg.tasks[name] = ml_collections.ConfigDict(
        {"weight": 1.0, "difficulty": ml_collections.ConfigDict(dict(task.default_difficulty))})
  return cfg


def make_config(names=None, weights=None, split_sizes: Mapping[str, int] | None = None,
                data_dir: str = "", image_size: int = tasks_lib.DEFAULT_IMAGE_SIZE,
                difficulty: Mapping[str, Mapping] | None = None) -> ml_collections.ConfigDict:
  """`default_config()` restricted to `names` (in order) with `weights` (same length) etc.

  For trainers whose config lists tasks as parallel tuples (names, weights, sizes).
  """
  cfg = default_config()
  names = list(names) if names is not None else list(tasks_lib.TASKS)
  weights = list(weights) if weights is not None else [1.0] * len(names)
  if len(weights) != len(names):
    raise ValueError(f"{len(names)} task names {names} but {len(weights)} weights {weights}")
  unknown = [n for n in names if n not in tasks_lib.TASKS]
  if unknown:
    raise ValueError(f"unknown task(s) {unknown}; registered tasks: {list(tasks_lib.TASKS)}")
  cfg.tasks = ml_collections.ConfigDict({n: cfg.tasks[n] for n in names})
  for n, w in zip(names, weights):
    cfg.tasks[n].weight = float(w)
  for n, knobs in (difficulty or {}).items():
    if n not in cfg.tasks:
      raise ValueError(f"difficulty given for {n!r}, which is not among the tasks {names}")
    cfg.tasks[n].difficulty.update(dict(knobs))
  if split_sizes is not None:
    cfg.split_sizes = ml_collections.ConfigDict(_check_split_sizes(split_sizes))
  cfg.data_dir, cfg.image_size = data_dir, image_size
  return cfg


def resolve_data_dir(data_dir: str | None = None) -> str:
  return (data_dir or os.environ.get(DATA_DIR_ENV)
          or os.path.join(os.path.expanduser("~"), ".cache", "g2rpo_jax", "tfds"))


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds


def _builder_class():
  """The builder class, defined on first use so importing this module does not import TFDS."""
  if _builder_class.cls is not None:
    return _builder_class.cls
  tfds = _tfds()

  @dataclasses.dataclass(eq=False)
  class TaskDataConfig(tfds.core.BuilderConfig):
    task: str = ""
    image_size: int = tasks_lib.DEFAULT_IMAGE_SIZE
    difficulty_json: str = "{}"
    split_sizes_json: str = "{}"

  class G2rpoTasks(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One task of the g2rpo_jax visual suite at a fixed image size, difficulty and split sizes."""
    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {_VERSION: "Six procedural visual tasks with verifiable rewards."}
    BUILDER_CONFIG_CLASS = TaskDataConfig

    def _info(self):
      s = self.builder_config.image_size
      return tfds.core.DatasetInfo(
          builder=self,
          description="g2rpo_jax visual task suite (procedural; see g2rpo_jax/tasks).",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
              "prompt": tfds.features.Text(),
              "answer": tfds.features.Text(),  # JSON
              "meta": tfds.features.Text(),  # JSON
              "index": np.int64,
          }),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      sizes = json.loads(self.builder_config.split_sizes_json)
      return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split, n):
      cfg = self.builder_config
      task = tasks_lib.get_task(cfg.task, cfg.image_size)
      difficulty = json.loads(cfg.difficulty_json)
      for i in range(n):
        ex = task.example(split, i, **difficulty)
        yield i, {"image": ex.image, "prompt": ex.prompt, "answer": json.dumps(ex.answer),
                  "meta": json.dumps(ex.meta), "index": i}

  TaskDataConfig.__name__ = TaskDataConfig.__qualname__ = "TaskDataConfig"
  _builder_class.cls = (G2rpoTasks, TaskDataConfig)
  return _builder_class.cls


_builder_class.cls = None


def _check_split_sizes(split_sizes: Mapping[str, int]) -> dict[str, int]:
  sizes = dict(split_sizes)
  unknown = sorted(set(sizes) - set(base.SPLITS))
  if unknown:
    raise ValueError(f"split_sizes: unknown split(s) {unknown}; expected keys from {base.SPLITS}")
  for split, n in sizes.items():
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
      raise ValueError(f"split_sizes[{split!r}] must be a non-negative int, got {n!r}")
  return sizes


def make_builder(task: str, data_dir: str | None = None, image_size: int = 32,
                 difficulty: Mapping | None = None, split_sizes: Mapping[str, int] | None = None):
  """The (not yet prepared) TFDS builder for one task at these settings."""
  builder_cls, config_cls = _builder_class()
  knobs = tasks_lib.get_task(task, image_size).difficulty(**dict(difficulty or {}))
  sizes = _check_split_sizes(split_sizes or {"train": 2048, "validation": 128, "test": 128})
  difficulty_json = json.dumps(knobs, sort_keys=True)
  sizes_json = json.dumps(sizes, sort_keys=True)
  digest = hashlib.sha256(f"{difficulty_json}|{sizes_json}".encode()).hexdigest()[:10]
  config = config_cls(name=f"{task}_s{image_size}_{digest}", version=_VERSION, task=task,
                      image_size=image_size, difficulty_json=difficulty_json,
                      split_sizes_json=sizes_json,
                      description=f"{task} at {image_size}px, knobs {difficulty_json}, "
                                  f"sizes {sizes_json}")
  return builder_cls(config=config, data_dir=resolve_data_dir(data_dir), file_format="array_record")


def build_task(task: str, **kwargs):
  """The prepared builder: built into the data dir on first use, reused afterwards."""
  builder = make_builder(task, **kwargs)
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder


class ExampleSource(Sequence):
  """Random access to one task's split as `Example`s (decodes the stored record on access)."""

  def __init__(self, data_source, task: str, split: str, image_size: int, difficulty: Mapping):
    self._source = data_source
    self._task = tasks_lib.get_task(task, image_size)
    self._split = split
    self._difficulty = dict(difficulty)
    self.task_names = (task,)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"{self!r}: index {i} out of range")
    record = self._source[i % n]
    t = self._task
    return base.Example(
        image=np.asarray(record["image"], np.uint8), prompt=_text(record["prompt"]),
        answer=json.loads(_text(record["answer"])), task=t.name, reward_type=t.reward_type,
        role=t.role, difficulty=self._difficulty, split=self._split, index=int(record["index"]),
        meta=json.loads(_text(record["meta"])))

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __repr__(self) -> str:
    return f"ExampleSource({self._task.name!r}, {self._split!r}, n={len(self)})"


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def load_sources(cfg: ml_collections.ConfigDict, split: str,
                 only_weighted: bool = True) -> dict[str, ExampleSource]:
  """{task: ExampleSource} for every task in `cfg.tasks` (with weight > 0 if `only_weighted`)."""
  if split not in base.SPLITS:
    raise ValueError(f"split must be one of {base.SPLITS}, got {split!r}")
  sizes = _check_split_sizes(cfg.split_sizes.to_dict())
  if sizes.get(split, 0) <= 0:
    raise ValueError(f"split_sizes[{split!r}] is {sizes.get(split, 0)}; nothing to load")
  out = {}
  for name in cfg.tasks:
    tcfg = cfg.tasks[name]
    if only_weighted and tcfg.weight <= 0:
      continue
    difficulty = tcfg.difficulty.to_dict()
    builder = build_task(name, data_dir=cfg.data_dir or None, image_size=cfg.image_size,
                         difficulty=difficulty, split_sizes=sizes)
    knobs = tasks_lib.get_task(name, cfg.image_size).difficulty(**difficulty)
    out[name] = ExampleSource(builder.as_data_source(split=split), name, split, cfg.image_size,
                              knobs)
  return out
