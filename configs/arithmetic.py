"""RL on the single task 'arithmetic' (same recipe as configs/mix.py, one task only)."""
from configs import common


def get_config(arg=None):
  c = common.base_config(("arithmetic",))
  if arg:
    c.seed = int(arg)
  return c
