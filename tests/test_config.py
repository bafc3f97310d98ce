"""Experiment configs: every file loads and validates; overrides apply with the right types;
unknown keys and bad values fail naming the key and what was expected."""
import glob
import os
import subprocess
import sys

import pytest

from g2rpo_jax import config_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if os.path.basename(p) not in ("__init__.py", "common.py", "qwen25vl.py"))


def test_there_is_a_config_per_single_task_plus_mix_and_smoke():
  names = {os.path.splitext(os.path.basename(p))[0] for p in CONFIG_FILES}
  assert {"mix", "smoke", "grounding", "counting", "arithmetic", "ocr", "spatial",
          "chart"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_loads_and_validates(path):
  c = config_utils.load_config(path)
  config_utils.validate(c)
  # A single-task config trains exactly that task.
  name = os.path.splitext(os.path.basename(path))[0]
  if name not in ("mix", "smoke"):
    assert tuple(c.tasks.names) == (name,)


def test_defaults_follow_the_spec():
  c = config_utils.load_config("mix")
  assert (c.advantage.name, c.advantage.mode) == ("g2rpo", "group_then_task")
  assert (c.loss.eps_low, c.loss.eps_high, c.loss.dual_clip) == (0.2, 0.3, 3.0)
  assert c.loss.aggregation == "token_mean" and c.loss.kl_coef == 0.0
  assert c.shaping.entropy.lam == 0.02 and c.shaping.format_weight == 0.1
  assert tuple(c.shaping.entropy.bounds.ocr) == (0.2, 0.6)
  assert (c.filtering.low, c.filtering.high) == (0.01, 0.99)
  assert c.rollout.group_size == 8 and c.optimizer.grad_clip == 1.0


def test_arg_sets_the_seed():
  assert config_utils.load_config("mix:3").seed == 3


def test_overrides_apply_with_the_existing_types():
  c = config_utils.load_config("smoke")
  config_utils.apply_overrides(c, [
      "advantage.name=grpo", "advantage.mode=task", "shaping.entropy.enabled=False",
      "shaping.length.enabled=false", "rollout.group_size=6", "loss.eps_high=0.25",
      "shaping.entropy.bounds.ocr=(0.1, 0.9)", "config.loss.eps_low=0.15",
      "shaping.length.thresholds.chart=(2,4,8,16)"])
  assert c.advantage.name == "grpo" and c.advantage.mode == "task"
  assert c.shaping.entropy.enabled is False and c.shaping.length.enabled is False
  assert c.rollout.group_size == 6 and isinstance(c.rollout.group_size, int)
  assert c.loss.eps_high == 0.25 and c.loss.eps_low == 0.15
  assert tuple(c.shaping.entropy.bounds.ocr) == (0.1, 0.9)
  assert tuple(c.shaping.length.thresholds.chart) == (2, 4, 8, 16)
  config_utils.validate(c)


@pytest.mark.parametrize("key, where, valid", [
    ("advantage.nmae=grpo", "advantage", "eps, mode, name, std"),
    ("shaping.entropy.lamda=0.1", "shaping.entropy", "bounds, enabled, estimator, lam"),
    ("nope=1", "<top level>", "advantage, batch"),
    ("tasks.difficulty.ocr.lenght=5", "tasks.difficulty.ocr", "clutter, length"),
])
def test_unknown_key_names_the_valid_keys_at_that_level(key, where, valid):
  c = config_utils.load_config("smoke")
  with pytest.raises(config_utils.ConfigError) as e:
    config_utils.apply_overrides(c, [key])
  msg = str(e.value)
  assert key.split("=")[0] in msg and f"at {where}" in msg and valid in msg


def test_bad_value_types_are_errors():
  c = config_utils.load_config("smoke")
  with pytest.raises(config_utils.ConfigError, match="rollout.group_size.*int"):
    config_utils.apply_overrides(c, ["rollout.group_size=many"])
  with pytest.raises(config_utils.ConfigError, match="bool"):
    config_utils.apply_overrides(c, ["shaping.entropy.enabled=maybe"])


@pytest.mark.parametrize("override, match", [
    ("advantage.name=ppo", "advantage.name.*one of"),
    ("advantage.mode=pool", "advantage.mode"),
    ("loss.aggregation=mean", "loss.aggregation"),
    ("batch.num_minibatches=3", "divisor of batch.prompts_per_step"),
    ("shaping.length.thresholds.ocr=(4,3,8,16)", "L_min < L_low"),
    ("shaping.entropy.bounds.ocr=(0.7,0.6)", "H_min <= H_max"),
    ("filtering.low=0.99", "low < high"),
    ("rollout.group_size=1", "at least 2"),
    ("tasks.weights=(1.0,)", "one weight per task"),
    ("loss.kl_coef=-0.01", "β >= 0"),
    ("data.source=parquet", "data.source.*one of"),
    ("data.user.paths=('/nonexistent/x.jsonl',)", "existing JSONL files"),
    ("shaping.entropy.default_bounds=(0.7,0.6)", "H_min <= H_max"),
    ("shaping.length.role_thresholds.hybrid=(4,3,8,16)", "L_min < L_low"),
    ("vision_pretrain.batch_size=0", r"vision_pretrain.batch_size = 0: expected >= 1"),
    ("vision_pretrain.lr=0.0", r"vision_pretrain.lr = 0.0: expected > 0"),
    ("warm_start.steps=-1", r"warm_start.steps = -1: expected >= 0"),
])
def test_validate_names_the_bad_value(override, match):
  c = config_utils.load_config("smoke")
  config_utils.apply_overrides(c, [override])
  with pytest.raises(config_utils.ConfigError, match=match):
    config_utils.validate(c)


def test_kl_coef_above_zero_is_accepted():
  # The trainer keeps a frozen reference model when β > 0 (tests/test_trainer_data.py).
  c = config_utils.load_config("smoke")
  config_utils.apply_overrides(c, ["loss.kl_coef=0.05", "loss.kl_estimator=k2"])
  config_utils.validate(c)


@pytest.mark.parametrize("overrides, match", [
    (["data.user.weights=(1.0, 2.0)"], r"data.user.weights.*one entry per data.user.paths \(1\)"),
    (["data.user.reward_types=('dense',)"], "data.user.reward_types.*binary"),
    (["data.user.roles=('vision',)"], "data.user.roles.*perception"),
    (["data.user.weights=(-1.0,)"], "data.user.weights.*non-negative"),
    (["data.user.names=('ocr',)"], r"names other than the built-in tasks.names \['ocr'\]"),
    (["data.user.paths=('{path}', '{path}')"], "distinct task names"),
])
def test_user_data_config_errors_name_the_key(tmp_path, overrides, match):
  path = tmp_path / "d.jsonl"
  path.write_text("{}\n")  # only its existence is checked here
  c = config_utils.load_config("smoke")
  config_utils.apply_overrides(c, [f"data.user.paths=('{path}',)"] +
                               [o.format(path=path) for o in overrides])
  with pytest.raises(config_utils.ConfigError, match=match):
    config_utils.validate(c)


def test_user_task_names_default_to_file_stems():
  c = config_utils.load_config("smoke")
  with c.unlocked():
    c.data.user.paths = ("/a/My Data-2.jsonl", "/b/other.jsonl")
  assert config_utils.user_task_names(c) == ("my_data_2", "other")
  assert config_utils.task_names(c) == tuple(c.tasks.names) + ("my_data_2", "other")
  assert config_utils.entropy_bounds(c, "other") == tuple(c.shaping.entropy.default_bounds)
  assert config_utils.entropy_bounds(c, "ocr") == tuple(c.shaping.entropy.bounds.ocr)


def test_command_line_unknown_key_fails_with_valid_keys():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=configs/smoke.py",
       "--workdir=/nonexistent/never_created", "--config.advantage.nmae=grpo"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "unknown config key 'advantage.nmae'" in out.stderr
  assert "valid keys there: eps, mode, name, std" in out.stderr
  assert not os.path.exists("/nonexistent/never_created")


def test_validation_name_lists_match_the_library():
  # config_utils keeps its own copies (it must not import jax); they must not drift.
  from g2rpo_jax import advantages, losses
  assert set(config_utils._ESTIMATORS) == set(advantages.ESTIMATORS)
  assert tuple(config_utils._MODES) == tuple(advantages.MODES)
  assert tuple(config_utils._AGGREGATIONS) == tuple(losses.AGGREGATIONS)
  assert tuple(config_utils._KL) == tuple(losses.KL_ESTIMATORS)
  from g2rpo_jax import data_sources, tasks
  assert tuple(config_utils._SOURCES) == tuple(data_sources.SOURCES)
  assert tuple(config_utils._REWARD_TYPES) == tuple(tasks.REWARD_TYPES)
  assert tuple(config_utils._ROLES) == tuple(tasks.ROLES)


def test_user_tasks_fall_back_to_their_role_window_and_the_default_bounds():
  c = config_utils.load_config("mix")
  config_utils.apply_overrides(c, ["shaping.length.role_thresholds.reasoning=(2,5,9,13)",
                                   "shaping.entropy.default_bounds=(0.1,0.9)",
                                   "shaping.length.thresholds.counting=(1,2,3,4)",
                                   "shaping.entropy.bounds.counting=(0.3,0.4)"])
  # A task without its own entry (a user JSONL component) gets its role's window.
  assert config_utils.length_window(c, "my_math", "reasoning") == (2, 5, 9, 13)
  assert config_utils.entropy_bounds(c, "my_math") == (0.1, 0.9)
  # A task with an entry keeps it, whatever role is passed.
  assert config_utils.length_window(c, "counting", "reasoning") == (1, 2, 3, 4)
  assert config_utils.entropy_bounds(c, "counting") == (0.3, 0.4)
