"""Bench: cost of each advantage estimator next to one `jnp.sort` of the same rewards.

A rollout batch of N responses in groups of 8 over 6 tasks (ids arbitrary ints), rewards with
ties (binary, coarse and continuous tasks). Each estimator is jitted and timed against
`jnp.sort(rewards)` as interleaved pairs; `over_sort` is the median of the per-pair ratios.
The issue's target: g2rpo group_then_task at N = 65,536 costs at most 2x one sort.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benches import _timing
from g2rpo_jax import advantages

NAME = "advantages"
HELP = "each advantage estimator (jitted) vs jnp.sort of the same rewards, N = 4,096 and 65,536"

GROUP_SIZE = 8
NUM_TASKS = 6
SIZES = (4096, 65536)
SWEEP_SIZES = (1024, 4096, 16384, 65536, 262144)


def make_batch(n: int, seed: int = 0):
  """rewards f32[n], group_ids i32[n], task_ids i32[n] laid out as [n // 8, 8] groups."""
  rng = np.random.default_rng(seed)
  num_groups = n // GROUP_SIZE
  group_task = rng.integers(0, NUM_TASKS, num_groups)
  task_names = np.array([3, 17, -5, 1000, 42, 7])  # arbitrary, unsorted ids
  group_names = rng.permutation(num_groups) * 7919 - 1_000_000
  kind = np.repeat(group_task, GROUP_SIZE)
  u = rng.random(n)
  rewards = np.where(kind < 3, (u < 0.4).astype(np.float64),            # binary
                     np.where(kind == 3, np.round(u * 4) / 4,           # coarse (5 levels)
                              np.round(u, 3)))                          # continuous, some ties
  return (jnp.asarray(rewards, jnp.float32),
          jnp.asarray(np.repeat(group_names, GROUP_SIZE), jnp.int32),
          jnp.asarray(task_names[kind], jnp.int32))


def cases():
  """(estimator name, mode, layout, options) for every timed row."""
  out = []
  for mode in advantages.MODES:
    out.append(("g2rpo", mode, "ragged", dict(mode=mode)))
    if mode != "task":
      out.append(("g2rpo", mode, "rows", dict(mode=mode, group_size=GROUP_SIZE)))
  for name in ("grpo", "dr_grpo", "rloo", "none"):
    out.append((name, "", "ragged", {}))
    out.append((name, "", "rows", dict(group_size=GROUP_SIZE)))
  return out


def run(args):
  repeats = args.repeats or 30
  sizes = SWEEP_SIZES if args.sweep else SIZES
  sort_fn = jax.jit(jnp.sort)
  for n in sizes:
    rewards, group_ids, task_ids = make_batch(n)
    mask = jnp.ones((n,), bool)
    for name, mode, layout, options in cases():
      fn = jax.jit(advantages.get_estimator(name, **options))
      call = functools.partial(fn, rewards, group_ids, task_ids, mask)
      ratio, t_fn, t_sort = _timing.interleaved_ratio(
          call, lambda: sort_fn(rewards), repeats=repeats)
      yield {"n": n, "estimator": name, "mode": mode, "layout": layout,
             "median_s": t_fn, "sort_s": t_sort, "over_sort": ratio}
