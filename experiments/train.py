"""The main job: `python -m experiments.train --config=configs/mix.py [--workdir=DIR]`.

Warm start -> G²RPO RL on the task mix -> held-out evaluation -> summary table and plots, with
checkpoints and auto-resume in the workdir (see g2rpo_jax/trainer.py). Every config key is an
override: `--config.advantage.name=grpo --config.shaping.entropy.enabled=False`. Multi-host:
pass `--multihost` (or set JAX_COORDINATOR_ADDRESS etc.) to call `jax.distributed.initialize()`.
"""
from __future__ import annotations

import os

from absl import flags, logging
from ml_collections import config_flags

from g2rpo_jax import config_utils

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mix.py", "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "", "Run directory (default workdirs/<config name>).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's id (multi-host).")


def default_workdir(config_spec: str) -> str:
  name = os.path.splitext(os.path.basename(config_spec.split(":")[0]))[0]
  return os.path.join("workdirs", name)


def main(argv):
  del argv
  import jax  # after flag parsing: XLA_FLAGS / JAX_PLATFORMS from the environment apply
  if _MULTIHOST.value or _COORDINATOR.value:
    kwargs = {}
    if _COORDINATOR.value:
      kwargs = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                    process_id=_PROCESS_ID.value)
    jax.distributed.initialize(**kwargs)
  from g2rpo_jax import trainer
  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
  logging.info("process %d/%d, %d devices, workdir %s", jax.process_index(), jax.process_count(),
               jax.device_count(), workdir)
  summary = trainer.train_and_evaluate(config, workdir)
  logging.info("finished: %s at step %d", summary["status"], summary["step"])
  print(f"process {jax.process_index()}: {summary['status']} at step {summary['step']}, "
        f"params checksum {summary['params_checksum']!r}", flush=True)
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  config_utils.run_app(main)
