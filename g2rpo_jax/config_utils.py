"""Config loading, command-line overrides and validation for experiment configs.

An experiment is one `configs/<name>.py` file with `get_config(arg=None) -> ConfigDict`. Every
knob is overridable as `--config.a.b=value`; a key that does not exist is an error naming the
valid keys at that level (ml_collections' own flag parser only says `AttributeError: 'y'`).
`validate(config)` checks the values the trainer relies on, so a bad run fails before it compiles.

Must not import jax, the models, the tasks or the trainer: this runs before JAX initialises
(multi-host start-up) and inside argument parsing.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
from typing import Any, Callable, Iterable, Sequence

import ml_collections
from absl import app

ConfigDict = ml_collections.ConfigDict

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(ValueError):
  """A config key or value is wrong; the message names it and what was expected."""


def load_config(spec: str) -> ConfigDict:
  """Loads `path/to/config.py[:arg]` (or a bare name like `smoke[:arg]` from `configs/`)."""
  path, _, arg = spec.partition(":")
  if not path.endswith(".py"):
    path = os.path.join(_CONFIG_DIR, path + ".py")
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist (from --config={spec!r})")
  name = "_g2rpo_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config(arg=None)")
  return module.get_config(arg or None) if arg else module.get_config()


def _valid_keys(node: ConfigDict) -> str:
  return ", ".join(sorted(node.keys()))


def resolve(config: ConfigDict, dotted: str) -> tuple[ConfigDict, str]:
  """Returns (parent node, leaf name) of `a.b.c`; raises ConfigError naming the valid keys."""
  parts = dotted.split(".")
  node = config
  for i, part in enumerate(parts):
    if not isinstance(node, (ConfigDict, ml_collections.FrozenConfigDict)):
      where = ".".join(parts[:i])
      raise ConfigError(f"config key {dotted!r}: {where!r} is a value, not a section")
    if part not in node:
      where = ".".join(parts[:i]) or "<top level>"
      raise ConfigError(
          f"unknown config key {dotted!r}: no {part!r} at {where}; valid keys there: "
          f"{_valid_keys(node)}")
    if i < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def parse_value(text: str, current: Any, key: str) -> Any:
  """Parses `text` into the type of the existing value `current` (bool/int/float/str/tuple)."""
  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"config key {key!r}: expected a bool (True/False), got {text!r}")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f"config key {key!r}: expected an int, got {text!r}") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"config key {key!r}: expected a float, got {text!r}") from None
  if isinstance(current, str) or current is None:
    return text
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = tuple(v.strip() for v in text.strip("()[]").split(",") if v.strip())
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return tuple(value)
  if isinstance(current, ConfigDict):
    raise ConfigError(f"config key {key!r} is a section (keys: {_valid_keys(current)}), "
                      "set one of its keys instead")
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ConfigDict, overrides: Iterable[str]) -> ConfigDict:
  """Applies `["a.b=value", ...]` in place (and returns config); unknown keys raise ConfigError."""
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r}: expected key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if key.startswith("config."):
      key = key[len("config."):]
    parent, leaf = resolve(config, key)
    value = parse_value(text, parent[leaf], key)
    with config.unlocked() if hasattr(config, "unlocked") else _null():
      parent[leaf] = value
  return config


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def check_override_flags(argv: Sequence[str], flag: str = "config") -> None:
  """Checks every `--config.a.b=...` in argv names an existing key, before absl parses them.

  ml_collections' config_flags applies the same overrides later; this only makes the error
  readable (the level's valid keys) instead of a bare AttributeError.
  """
  spec = None
  keys = []
  for i, a in enumerate(argv):
    if a.startswith(f"--{flag}="):
      spec = a.split("=", 1)[1]
    elif a == f"--{flag}" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif a.startswith(f"--{flag}."):
      keys.append(a[len(f"--{flag}."):].split("=", 1)[0])
  if spec is None or not keys:
    return
  config = load_config(spec)
  for key in keys:
    resolve(config, key)


def run_app(main: Callable[[Sequence[str]], int]) -> None:
  """Runs an absl `main` after checking its `--config.*` overrides (exit 2 on a bad key)."""
  try:
    check_override_flags(sys.argv[1:])
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(main)


# ------------------------------------------------------------------------------------------
# Validation.

# Copies of the library's name lists (this module must not import jax); a test keeps them equal.
_ESTIMATORS = ("g2rpo", "grpo", "dr_grpo", "rloo", "none")
_MODES = ("group", "task", "group_then_task")
_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
_KL = ("k1", "k2", "k3")
_SOURCES = ("generate", "tfds")  # data_sources.SOURCES
_REWARD_TYPES = ("binary", "iou", "ocr", "relative")  # tasks.REWARD_TYPES
_ROLES = ("perception", "reasoning", "hybrid")  # tasks.ROLES


def user_task_name(path: str) -> str:
  """Default task name of a user JSONL file: its stem, lower case, other characters as '_'."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_") or "user"


def user_task_names(config: ConfigDict) -> tuple[str, ...]:
  """Task names of the user JSONL components (`config.data.user`)."""
  u = config.data.user
  return tuple(u.names) or tuple(user_task_name(p) for p in u.paths)


def task_names(config: ConfigDict) -> tuple[str, ...]:
  """Every task the trainer tracks: the built-in `tasks.names`, then the user components."""
  return tuple(config.tasks.names) + user_task_names(config)


def task_difficulty(config: ConfigDict, task: str) -> dict:
  """The difficulty knobs `tasks.difficulty.<task>` gives a built-in task ({}: its defaults)."""
  d = config.tasks.get("difficulty")
  return d[task].to_dict() if d is not None and task in d else {}


def entropy_bounds(config: ConfigDict, task: str) -> tuple:
  """(H_min, H_max) of a task: its `shaping.entropy.bounds` entry, else `default_bounds`."""
  e = config.shaping.entropy
  return tuple(e.bounds[task]) if task in e.bounds else tuple(e.default_bounds)


def length_window(config: ConfigDict, task: str, role: str) -> tuple:
  """(L_min, L_low, L_high, L_max) of a task: its `shaping.length.thresholds` entry, else the
  window of its role in `role_thresholds` (user data)."""
  s = config.shaping.length
  return tuple(s.thresholds[task]) if task in s.thresholds else tuple(s.role_thresholds[role])


def _expect(cond: bool, key: str, what: str, value: Any) -> None:
  if not cond:
    raise ConfigError(f"config.{key} = {value!r}: expected {what}")


def validate(config: ConfigDict) -> ConfigDict:
  """Checks the values the trainer relies on; returns config unchanged or raises ConfigError."""
  c = config
  _expect(c.advantage.name in _ESTIMATORS, "advantage.name", f"one of {_ESTIMATORS}",
          c.advantage.name)
  _expect(c.advantage.mode in _MODES, "advantage.mode", f"one of {_MODES}", c.advantage.mode)
  _expect(c.advantage.std in ("unbiased", "biased"), "advantage.std", "'unbiased' or 'biased'",
          c.advantage.std)
  _expect(c.loss.aggregation in _AGGREGATIONS, "loss.aggregation", f"one of {_AGGREGATIONS}",
          c.loss.aggregation)
  _expect(c.loss.kl_estimator in _KL, "loss.kl_estimator", f"one of {_KL}", c.loss.kl_estimator)
  _expect(c.loss.eps_low >= 0 and c.loss.eps_high >= 0, "loss.eps_low/eps_high",
          "non-negative clip ranges", (c.loss.eps_low, c.loss.eps_high))
  _expect(c.loss.dual_clip > 1.0, "loss.dual_clip", "a value > 1 (SPEC §3: c = 3)",
          c.loss.dual_clip)
  _expect(c.loss.kl_coef >= 0, "loss.kl_coef", "β >= 0", c.loss.kl_coef)
  _expect(c.rollout.group_size >= 2, "rollout.group_size", "at least 2 responses per prompt",
          c.rollout.group_size)
  _expect(c.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", ">= 1",
          c.rollout.max_new_tokens)
  _expect(c.batch.prompts_per_step >= 1, "batch.prompts_per_step", ">= 1",
          c.batch.prompts_per_step)
  _expect(c.batch.num_minibatches >= 1 and c.batch.prompts_per_step % c.batch.num_minibatches
          == 0, "batch.num_minibatches", f"a divisor of batch.prompts_per_step "
          f"({c.batch.prompts_per_step})", c.batch.num_minibatches)
  _expect(c.batch.minibatch_split in ("rows", "groups"), "batch.minibatch_split",
          "'rows' or 'groups'", c.batch.minibatch_split)
  mb_rows = c.batch.prompts_per_step * c.rollout.group_size // max(c.batch.num_minibatches, 1)
  _expect(c.batch.num_microbatches >= 1 and mb_rows % c.batch.num_microbatches == 0,
          "batch.num_microbatches", f"a divisor of the mini-batch's {mb_rows} rows "
          f"(prompts_per_step × group_size / num_minibatches)", c.batch.num_microbatches)
  f = c.filtering
  _expect(0.0 <= f.low < f.high <= 1.0, "filtering.low/high", "0 <= low < high <= 1",
          (f.low, f.high))
  _expect(f.max_rounds >= 0, "filtering.max_rounds", ">= 0", f.max_rounds)
  tasks = tuple(c.tasks.names)
  _expect(len(tasks) >= 1, "tasks.names", "at least one task", tasks)
  _expect(len(set(tasks)) == len(tasks), "tasks.names", "no duplicates", tasks)
  _expect(len(c.tasks.weights) == len(tasks), "tasks.weights",
          f"one weight per task ({len(tasks)})", tuple(c.tasks.weights))
  user = _validate_user_data(c)
  _expect(all(w >= 0 for w in c.tasks.weights) and sum(c.tasks.weights) + sum(user) > 0,
          "tasks.weights", "non-negative weights with a positive sum (with data.user.weights)",
          tuple(c.tasks.weights))
  # User data has no demonstrations (data_sources.py): the warm start needs a built-in task.
  _expect(not (c.warm_start.enabled and not c.init_checkpoint and sum(c.tasks.weights) <= 0),
          "tasks.weights", "a built-in task with weight > 0 when the warm start runs (user JSONL "
          "data is RL-only); or set warm_start.enabled=False or init_checkpoint",
          tuple(c.tasks.weights))
  for stage in ("warm_start", "vision_pretrain"):
    st = c[stage]
    _expect(st.steps >= 0, f"{stage}.steps", ">= 0", st.steps)
    _expect(st.batch_size >= 1, f"{stage}.batch_size", ">= 1", st.batch_size)
    _expect(st.lr > 0, f"{stage}.lr", "> 0", st.lr)
  s = c.shaping
  _expect(0 <= s.format_weight and 0 <= s.length.weight and
          s.format_weight + (s.length.weight if s.length.enabled else 0.0) < 1.0,
          "shaping.format_weight/length.weight", "w_fmt + w_len < 1 (SPEC §4)",
          (s.format_weight, s.length.weight))
  _expect(s.entropy.lam >= 0, "shaping.entropy.lam", "λ >= 0", s.entropy.lam)
  _expect(s.entropy.estimator in ("sampled_nll", "full_vocab"), "shaping.entropy.estimator",
          "'sampled_nll' or 'full_vocab'", s.entropy.estimator)
  d = tuple(s.entropy.default_bounds)
  _expect(len(d) == 2 and 0 <= d[0] <= d[1], "shaping.entropy.default_bounds",
          "(H_min, H_max) with 0 <= H_min <= H_max", d)
  for role in _ROLES:
    th = _per_task(s.length.role_thresholds, role, "shaping.length.role_thresholds")
    _expect(len(th) == 4 and th[0] < th[1] <= th[2] < th[3],
            f"shaping.length.role_thresholds.{role}", "(L_min, L_low, L_high, L_max) with "
            "L_min < L_low <= L_high < L_max (SPEC §4)", th)
  for name in tasks:
    lo_hi = _per_task(s.entropy.bounds, name, "shaping.entropy.bounds")
    _expect(len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1], f"shaping.entropy.bounds.{name}",
            "(H_min, H_max) with 0 <= H_min <= H_max", lo_hi)
    th = _per_task(s.length.thresholds, name, "shaping.length.thresholds")
    _expect(len(th) == 4 and th[0] < th[1] <= th[2] < th[3],
            f"shaping.length.thresholds.{name}", "(L_min, L_low, L_high, L_max) with "
            "L_min < L_low <= L_high < L_max (SPEC §4)", th)
  m = c.mesh
  for ax in ("data", "fsdp", "tensor"):
    _expect(m[ax] == -1 or m[ax] >= 1, f"mesh.{ax}", "-1 (all remaining devices) or >= 1", m[ax])
  _expect([m.data, m.fsdp, m.tensor].count(-1) <= 1, "mesh", "at most one axis set to -1",
          (m.data, m.fsdp, m.tensor))
  t = c.train
  for key in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite"):
    _expect(t[key] >= 0 if key == "num_steps" else t[key] >= 1, f"train.{key}",
            ">= 1" if key != "num_steps" else ">= 0", t[key])
  _expect(c.optimizer.lr > 0, "optimizer.lr", "> 0", c.optimizer.lr)
  return config


def _validate_user_data(c: ConfigDict) -> tuple[float, ...]:
  """Checks `data.source` and `data.user`; returns the user components' weights."""
  _expect(c.data.source in _SOURCES, "data.source", f"one of {_SOURCES}", c.data.source)
  u = c.data.user
  paths = tuple(u.paths)
  for key in ("names", "weights", "reward_types", "roles", "eval_paths"):
    v = tuple(u[key])
    _expect(not v or len(v) == len(paths), f"data.user.{key}",
            f"() or one entry per data.user.paths ({len(paths)})", v)
  for p in paths:
    _expect(isinstance(p, str) and os.path.isfile(p), "data.user.paths",
            "paths of existing JSONL files", p)
  for p in u.eval_paths:
    _expect(isinstance(p, str) and (not p or os.path.isfile(p)), "data.user.eval_paths",
            "paths of existing JSONL files, or '' for a component without held-out data", p)
  weights = tuple(u.weights) or (1.0,) * len(paths)
  _expect(all(isinstance(w, (int, float)) and w >= 0 for w in weights), "data.user.weights",
          "non-negative numbers", weights)
  for r in u.reward_types:
    _expect(r in _REWARD_TYPES + ("",), "data.user.reward_types",
            f"entries from {_REWARD_TYPES} or '' (each record's problem type)", tuple(u.reward_types))
  for r in u.roles:
    _expect(r in _ROLES + ("",), "data.user.roles",
            f"entries from {_ROLES} or '' (from the problem type)", tuple(u.roles))
  names = user_task_names(c)
  _expect(len(set(names)) == len(names), "data.user.names",
          "distinct task names (the default is each file's stem; set data.user.names)", names)
  clash = sorted(set(names) & set(c.tasks.names))
  _expect(not clash, "data.user.names", f"names other than the built-in tasks.names {clash}",
          names)
  return tuple(float(w) for w in weights)


def _per_task(section: ConfigDict, task: str, where: str) -> tuple:
  if task not in section:
    raise ConfigError(f"config.{where} has no entry for task {task!r}; entries: "
                      f"{_valid_keys(section)}")
  return tuple(section[task])
