"""Held-out per-task scores of a trained policy, as a table and JSON.

  python -m experiments.eval --config=configs/mix.py --workdir=workdirs/mix [--checkpoint=STEP]

Loads the RL checkpoint STEP (default: the latest) from `<workdir>/checkpoints` (or the cached
warm start with `--checkpoint=warm_start`), scores `config.tasks.eval_size` examples per task of
`--split`, prints the table and writes `<workdir>/eval_<split>_<step>.json`.
"""
from __future__ import annotations

import json
import os

from absl import flags, logging
from ml_collections import config_flags

from g2rpo_jax import config_utils

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mix.py", "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Step to load (default latest), or "
                                  "'warm_start'.")
_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "test"], "Held-out split.")


def evaluate_checkpoint(config, workdir: str, checkpoint: str = "", split: str = "validation",
                        devices=None):
  """Returns (step label, evaluate() result) and writes the JSON next to the run."""
  from g2rpo_jax import checkpointing, evaluation, metrics, trainer as trainer_lib
  tr = trainer_lib.Trainer(config, workdir, devices)
  if checkpoint == "warm_start":
    path, label = os.path.join(tr.workdir, "warm_start"), "warm_start"
    ckpt = checkpointing.Checkpointer(path, async_save=False)
    restored, _, _ = ckpt.restore({"params": checkpointing.abstract_like(tr._init_params)})
    params = restored["params"]
  else:
    ckpt = checkpointing.Checkpointer(os.path.join(tr.workdir, "checkpoints"), async_save=False)
    step = int(checkpoint) if checkpoint else None
    tr.init_state(tr._init_params)
    state, _, step = ckpt.restore(tr.abstract_state(), step)
    params, label = state.params, str(step)
  ckpt.close()
  result = tr.evaluate(params, split=split)
  if tr.is_lead:
    rows = [[k, 100 * v["score"], 100 * v["format"], v["length"], v["count"]]
            for k, v in result.items()]
    rows.append(["MEAN", 100 * evaluation.mean_score(result), float("nan"), float("nan"), ""])
    print(f"\nHeld-out ({split}) scores at checkpoint {label}:")
    print(metrics.format_table(rows, ["task", "score", "format %", "length (chars)", "n"]))
    path = os.path.join(tr.workdir, f"eval_{split}_{label}.json")
    evaluation.write_json(path, {"checkpoint": label, "split": split, "tasks": result,
                                 "mean": evaluation.mean_score(result)})
    print(f"written: {path}")
  return label, result


def main(argv):
  del argv
  evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value, _SPLIT.value)
  return 0


if __name__ == "__main__":
  config_utils.run_app(main)
