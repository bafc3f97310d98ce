"""RL on the single task 'ocr' (same recipe as configs/mix.py, one task only)."""
from configs import common


def get_config(arg=None):
  c = common.base_config(("ocr",))
  if arg:
    c.seed = int(arg)
  return c
