"""The default job: warm start, then G²RPO RL on the six-task mix, held-out eval, summary.

  python -m experiments.train --config=configs/mix.py --workdir=workdirs/mix

Sized for a 2-core CPU (the README gives the measured wall time and memory); `arg` may be a seed.
"""
from configs import common


def get_config(arg=None):
  c = common.base_config(common.ALL_TASKS)
  if arg:
    c.seed = int(arg)
  return c
