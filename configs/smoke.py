"""A seconds-long run of the whole job on tiny sizes; the trainer tests use it.

  python -m experiments.train --config=configs/smoke.py --workdir=/tmp/smoke
"""
from configs import common


def get_config(arg=None):
  c = common.base_config(common.ALL_TASKS)
  if arg:
    c.seed = int(arg)
  c.model.size = "nano"
  c.model.patch_size = 8  # nano's 16-px images: 4 image tokens
  c.tasks.train_size = 64
  c.tasks.eval_size = 4
  c.rollout.group_size = 4
  c.rollout.max_new_tokens = 16
  c.batch.prompts_per_step = 4
  c.batch.num_minibatches = 2
  c.filtering.max_rounds = 1
  # After 4 warm-start steps the nano model's accuracy is 0 everywhere, so filtering would drop
  # every group and the update would only see padding; unfiltered, the format and length terms
  # still give groups reward spread and the update real work.
  c.filtering.enabled = False
  c.warm_start.steps = 4
  c.warm_start.batch_size = 8
  c.train.num_steps = 4
  c.train.eval_every = 4
  c.train.checkpoint_every = 2
  c.train.grad_norm_every = 2
  c.train.progress_bar = False
  c.eval.batch_size = 24
  return c
