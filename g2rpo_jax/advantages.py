"""Reward -> advantage maps for one rollout batch: G²RPO (SPEC §2), GRPO, Dr.GRPO, RLOO, raw.

Every estimator is a pure function over flat arrays:
  rewards:   f32[N]   one scalar reward per response;
  group_ids: i32[N]   responses to the same prompt share an id;
  task_ids:  i32[N]   the advantage pool of SPEC §2 (reward type);
  mask:      bool[N]  False = padding / filtered out: advantage 0 and member of no pool.
Ids are arbitrary int32 (not contiguous, sorted or small; may be negative) and groups may be
ragged. Everything is jit-able with static shapes, vmap-able, and free of Python loops over
groups or tasks: pools are found with sorts and segment sums over the sorted order.

Two layouts are supported:
  * the general one (any ids, ragged groups): one lexicographic sort per stage;
  * `group_size=G`: rows are laid out as [N // G, G], row m is one group (the trainer's
    natural layout). The group stage then ranks by a G x G comparison (no sort), and the
    group stage's output can only take a few hundred distinct values (for G = 8), so the
    task stage is one single-key int32 sort. Both layouts give the same advantages (tested).
    On this project's 2-core CPU, group_then_task at N = 65,536 costs about 0.65-0.85x one
    `jnp.sort` of the rewards this way, about 3.4x in the general layout
    (`python -m experiments.bench --only=advantages`).

`get_estimator(name, **options)` returns any estimator with the uniform signature
`fn(rewards, group_ids, task_ids, mask) -> f32[N]` so a config can name it.

This module is math only: it must not import the trainer, models, rollout, tasks, or anything
that does I/O.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import scipy.special

MODES = ("group", "task", "group_then_task")
STD_CONVENTIONS = ("unbiased", "biased")
# Second stage of group_then_task: first-stage values closer than this (sorted neighbours,
# chained) are one tie block, so float noise cannot split values equal in exact arithmetic.
STAGE2_TIE_TOL = 1e-6
_INT32_MAX = np.iinfo(np.int32).max
# The rows layout packs (task label, value class) into one int32 sort key below this bound
# and ranks groups through a table of O(G^3) entries up to this group size; beyond either
# it takes the general sort path (same result, slower).
_MAX_PACKED_KEY = _INT32_MAX - 1
_MAX_TABLE_GROUP_SIZE = 64

Estimator = Callable[..., jax.Array]


# ----------------------------------------------------------------------------- input checks


def _is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _check_mode(mode) -> None:
  if mode not in MODES:
    raise ValueError(f"g2rpo: mode must be one of {MODES}, got {mode!r}")


def _check_std(std) -> None:
  if std not in STD_CONVENTIONS:
    raise ValueError(f"grpo: std must be one of {STD_CONVENTIONS}, got {std!r}")


def _check_group_size(fn_name: str, group_size, n: int | None = None) -> None:
  if group_size is None:
    return
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
    raise ValueError(f"{fn_name}: group_size must be a positive int or None, got {group_size!r}")
  if n is not None and n % group_size:
    raise ValueError(f"{fn_name}: group_size={group_size} needs N divisible by it "
                     f"(rows laid out as [N // group_size, group_size]), got N={n}")


def _prepare(fn_name: str, rewards, ids: dict, mask):
  """Checks shapes/dtypes at the API boundary; returns (rewards f32[N], valid bool[N])."""
  rewards = jnp.asarray(rewards)
  chex.assert_rank(rewards, 1, custom_message=f"{fn_name}: rewards must be f32[N]")
  if not jnp.issubdtype(rewards.dtype, jnp.floating):
    raise TypeError(f"{fn_name}: rewards must be a float array f32[N], got dtype {rewards.dtype}")
  for name, a in ids.items():
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.integer):
      raise TypeError(f"{fn_name}: {name} must be an int array i32[N], got dtype {a.dtype}")
    chex.assert_equal_shape([rewards, a], custom_message=f"{fn_name}: {name} vs rewards")
  if mask is None:
    valid = jnp.ones(rewards.shape, bool)
  else:
    mask = jnp.asarray(mask)
    chex.assert_equal_shape([rewards, mask], custom_message=f"{fn_name}: mask vs rewards")
    valid = mask if mask.dtype == jnp.bool_ else mask != 0
  return rewards.astype(jnp.float32), valid


def _check_rows_are_groups(fn_name: str, group_ids, group_size: int) -> None:
  """With group_size=G, eagerly (concrete ids only) checks each row of G is one distinct group."""
  if _is_tracer(group_ids):
    return  # under jit/vmap the layout is the caller's contract (see the docstrings)
  g = np.asarray(group_ids).reshape(-1, group_size)
  bad = np.flatnonzero((g != g[:, :1]).any(axis=1))
  if bad.size:
    raise ValueError(f"{fn_name}: group_size={group_size} expects each row of {group_size} "
                     f"consecutive responses to share one group id; rows {bad[:5].tolist()} do not")
  row_ids = g[:, 0]
  if np.unique(row_ids).size != row_ids.size:
    raise ValueError(f"{fn_name}: group_size={group_size} expects one row per group, but a group "
                     f"id appears on several rows")


# ----------------------------------------------------------------------------- sort machinery


def _order_key(x: jax.Array) -> jax.Array:
  """i32[N] with the same order (and equalities) as the finite floats x: f32[N]."""
  x = jnp.where(x == 0, jnp.float32(0), x)  # -0.0 and 0.0 are one value (one tie block)
  bits = lax.bitcast_convert_type(x, jnp.int32)
  # Negative floats order backwards as sign-magnitude ints; flipping the magnitude bits fixes it.
  return jnp.where(bits < 0, bits ^ jnp.int32(_INT32_MAX), bits)


def _run_start(sorted_keys: jax.Array, keys: jax.Array) -> jax.Array:
  """i32[N]: index of the first element equal to each key in sorted_keys (binary search)."""
  return jnp.searchsorted(sorted_keys, keys, side="left").astype(jnp.int32)


def _first_occurrence(ids: jax.Array) -> jax.Array:
  """Dense-enough relabelling of arbitrary int ids: i32[N] in [0, N), equal iff the ids are equal.

  The label is the position of the id's first occurrence in sorted order (a single-key sort,
  which XLA does much faster than a sort carrying a payload, plus a binary search).
  """
  s = jnp.sort(ids)
  return _run_start(s, ids)


def _sorted_gauss(new_pool: jax.Array, vals: jax.Array, valid: jax.Array, tol: float) -> jax.Array:
  """The Gaussian map over pools laid out contiguously, values ascending within each pool.

  Args:
    new_pool: bool[N], True where a pool starts (index 0 is always a start).
    vals: f32[N], ascending within each pool.
    valid: bool[N], constant within a pool; invalid pools get 0.
    tol: neighbours with vals[i] - vals[i-1] <= tol are tied (chained); 0 means exact equality.
  Returns:
    f32[N] in the same (sorted) order: mean over the tie block of Φ⁻¹((rank - 0.5) / n).
  """
  n_total = vals.shape[0]
  idx = jnp.arange(n_total, dtype=jnp.int32)
  new_pool = new_pool.at[0].set(True)
  if tol > 0:
    split = vals[1:] - vals[:-1] > tol
  else:
    split = vals[1:] != vals[:-1]
  new_tie = new_pool | jnp.concatenate([jnp.ones((1,), bool), split])
  # Segment ops over sorted ids beat cumulative max/min scans on CPU, at run and compile time.
  tie_id = jnp.cumsum(new_tie.astype(jnp.int32)) - 1
  pool_id = jnp.cumsum(new_pool.astype(jnp.int32)) - 1
  seg_sum = functools.partial(jax.ops.segment_sum, num_segments=n_total, indices_are_sorted=True)
  seg_min = functools.partial(jax.ops.segment_min, num_segments=n_total, indices_are_sorted=True)
  ones = jnp.ones((n_total,), jnp.int32)
  count = seg_sum(ones, tie_id)[tie_id]
  tie_start = seg_min(idx, tie_id)[tie_id]
  n = seg_sum(ones, pool_id)[pool_id]
  pool_start = seg_min(idx, pool_id)[pool_id]
  q = jax.scipy.special.ndtri((idx - pool_start + 0.5).astype(jnp.float32) / n)
  # Summing each tie block on its own keeps the error relative to the block, not to the pool
  # (a prefix sum over a pool of 10^4 quantiles would lose ~1e-3 in float32).
  mean = seg_sum(q, tie_id)[tie_id] / count
  # Blocks symmetric about the pool's middle (pools of one, all-equal pools, a tie straddling
  # the median) are exactly 0 in exact arithmetic; make them exactly 0 here too.
  symmetric = 2 * (tie_start - pool_start) + count == n
  return jnp.where(symmetric | ~valid, 0.0, mean)


def _gauss_stage_sorted(values: jax.Array, ids: jax.Array, valid: jax.Array, tol: float) -> jax.Array:
  """One pooled Gaussian map (general layout): pools = valid entries sharing an id."""
  vkey = jnp.where(valid, _order_key(values), jnp.int32(_INT32_MAX))  # invalid last in the run
  idx = jnp.arange(values.shape[0], dtype=jnp.int32)
  s_ids, s_vkey, perm = lax.sort((ids, vkey, idx), num_keys=2)
  s_vals, s_valid = values[perm], valid[perm]
  new_pool = jnp.concatenate([
      jnp.ones((1,), bool), (s_ids[1:] != s_ids[:-1]) | (s_valid[1:] != s_valid[:-1])])
  adv = _sorted_gauss(new_pool, s_vals, s_valid, tol)
  return jnp.zeros_like(values).at[perm].set(adv, unique_indices=True)


# ----------------------------------------------------------------------------- G x G fast path


@functools.lru_cache(maxsize=None)
def _code_table(group_size: int):
  """First-stage values for every (n, less, eq) a group of at most G responses can produce.

  A response whose group has n valid members, `less` of them strictly below it and `eq` equal
  to it (itself included) gets mean_{k=less}^{less+eq-1} Φ⁻¹((k + 0.5) / n). The code is
  (n * G + less) * (G + 1) + eq. Returns (values f32[C], class i32[C], distinct f32[U]) where
  class is the rank of the value among the U distinct float32 values (the task-stage sort key).
  """
  g = group_size
  table = np.zeros((g + 1, g, g + 1), np.float64)
  for n in range(1, g + 1):
    q = scipy.special.ndtri((np.arange(n) + 0.5) / n)
    prefix = np.concatenate([[0.0], np.cumsum(q)])
    less, eq = np.meshgrid(np.arange(n), np.arange(1, n + 1), indexing="ij")
    ok = less + eq <= n
    less, eq = less[ok], eq[ok]
    vals = (prefix[less + eq] - prefix[less]) / eq
    table[n, less, eq] = np.where(2 * less + eq == n, 0.0, vals)
  values = table.reshape(-1).astype(np.float32)
  distinct = np.unique(values)
  classes = np.searchsorted(distinct, values).astype(np.int32)
  return values, classes, distinct


def _group_codes(rewards: jax.Array, valid: jax.Array, group_size: int) -> jax.Array:
  """i32[N] code (see _code_table) of each response, rows of `group_size` being groups."""
  g = group_size
  r = rewards.reshape(-1, g)
  v = valid.reshape(-1, g)
  # [M, i, j]: is member j valid and below / equal to member i.
  less = ((r[:, None, :] < r[:, :, None]) & v[:, None, :]).sum(-1, dtype=jnp.int32)
  eq = ((r[:, None, :] == r[:, :, None]) & v[:, None, :]).sum(-1, dtype=jnp.int32)
  n = v.sum(-1, keepdims=True, dtype=jnp.int32)
  # An invalid or NaN entry may produce eq = 0 or other nonsense: clip into the table; the
  # caller masks invalid entries and marks NaN ones.
  less = jnp.clip(less, 0, g - 1)
  return ((n * g + less) * (g + 1) + eq).reshape(-1)


def _task_labels_rows(task_ids: jax.Array, group_size: int) -> jax.Array:
  """_first_occurrence(task_ids), N // G times cheaper when every row has one task id.

  A group is the responses to one prompt, so its task id is normally constant: then relabel
  one id per row. Otherwise (allowed, just unusual) relabel every response.
  """
  rows = task_ids.reshape(-1, group_size)

  def per_row(ids):
    return jnp.repeat(_first_occurrence(ids.reshape(-1, group_size)[:, 0]), group_size)

  return lax.cond(jnp.all(rows == rows[:, :1]), per_row, _first_occurrence, task_ids)


def _g2rpo_rows(rewards, task_ids, valid, mode: str, group_size: int) -> jax.Array:
  values, classes, distinct = _code_table(group_size)
  code = _group_codes(rewards, valid, group_size)
  stage1 = jnp.asarray(values)[code]
  if mode == "group":
    return jnp.where(valid, stage1, 0.0)
  n_total = rewards.shape[0]
  n_classes = distinct.shape[0]
  if n_total * n_classes > _MAX_PACKED_KEY:
    # The packed (task, class) key would overflow int32: fall back to the two-key sort.
    return _gauss_stage_sorted(stage1, task_ids, valid, STAGE2_TIE_TOL)
  # One int32 key per response: (task label, class of its first-stage value); equal keys are
  # equal values in the same pool, so a single-key sort (no payload) orders every pool.
  key = _task_labels_rows(task_ids, group_size) * n_classes + jnp.asarray(classes)[code]
  key = jnp.where(valid, key, jnp.int32(_INT32_MAX))
  s_key = jnp.sort(key)
  s_valid = s_key != _INT32_MAX
  s_task = s_key // n_classes
  s_vals = jnp.asarray(distinct)[jnp.where(s_valid, s_key % n_classes, 0)]
  new_pool = jnp.concatenate([
      jnp.ones((1,), bool), (s_task[1:] != s_task[:-1]) | (s_valid[1:] != s_valid[:-1])])
  adv_sorted = _sorted_gauss(new_pool, s_vals, s_valid, STAGE2_TIE_TOL)
  # Every member of a run of equal keys has the same advantage: read it at the run's start.
  adv = adv_sorted[_run_start(s_key, key)]
  return jnp.where(valid, adv, 0.0)


# ----------------------------------------------------------------------------- G²RPO


def g2rpo(rewards: jax.Array, group_ids: jax.Array, task_ids: jax.Array,
          mask: jax.Array | None = None, *, mode: str = "group_then_task",
          group_size: int | None = None) -> jax.Array:
  """Gaussian advantages (SPEC §2): each pool's rewards sent onto N(0, 1) by rank.

  Within one pool of n valid rewards: rank ascending, p = (rank - 0.5) / n, q = Φ⁻¹(p); members
  of a tie block get the mean of the block's q (exact equality for raw rewards); n <= 1 and
  all-equal pools give 0. Pools by `mode`:
    "group":           one pool per group id;
    "task":            one pool per task id;
    "group_then_task": map each group, then map all first-stage values of a task again as one
                       pool, where sorted neighbours within 1e-6 are ties (chained), so float
                       noise cannot split values that are equal in exact arithmetic.
  The map only depends on the order of the rewards (any strictly increasing transform of the
  rewards leaves it unchanged). Rewards must be finite; a NaN reward gets a NaN advantage.

  Args:
    rewards: f32[N]. group_ids, task_ids: i32[N], arbitrary ints. mask: bool[N] or None.
    mode: one of MODES (static).
    group_size: None for the general layout, or a static G when responses are laid out as
      [N // G, G] with row m = one group (then group_ids only serve an eager layout check and
      the group stage needs no sort; O(N·G) work, meant for G up to a few dozen).
  Returns:
    f32[N] advantages; 0 where mask is False.
  """
  _check_mode(mode)
  _check_group_size("g2rpo", group_size, jnp.shape(rewards)[0] if jnp.ndim(rewards) else None)
  rewards_f32, valid = _prepare("g2rpo", rewards, {"group_ids": group_ids, "task_ids": task_ids}, mask)
  group_ids = jnp.asarray(group_ids)
  task_ids = jnp.asarray(task_ids)
  if rewards_f32.shape[0] == 0:
    return rewards_f32  # an empty batch (every prompt filtered out) has no pools
  if group_size is not None and mode != "task":
    _check_rows_are_groups("g2rpo", group_ids, group_size)
    if group_size > _MAX_TABLE_GROUP_SIZE:
      group_ids = jnp.arange(rewards_f32.shape[0], dtype=jnp.int32) // group_size
      group_size = None  # the general path below, with rows as groups
  if group_size is not None and mode != "task":
    adv = _g2rpo_rows(rewards_f32, task_ids, valid, mode, group_size)
  elif mode == "group":
    adv = _gauss_stage_sorted(rewards_f32, group_ids, valid, 0.0)
  elif mode == "task":
    adv = _gauss_stage_sorted(rewards_f32, task_ids, valid, 0.0)
  else:
    stage1 = _gauss_stage_sorted(rewards_f32, group_ids, valid, 0.0)
    adv = _gauss_stage_sorted(stage1, task_ids, valid, STAGE2_TIE_TOL)
  return jnp.where(jnp.isnan(rewards_f32) & valid, jnp.nan, adv)


# ----------------------------------------------------------------------------- baselines


def _group_moments(rewards, group_ids, valid, group_size):
  """Per-response (n, mean, sum of squared deviations) of its group's valid rewards."""
  r = jnp.where(valid, rewards, 0.0)
  w = valid.astype(jnp.float32)
  if group_size is not None:
    rr, ww = r.reshape(-1, group_size), w.reshape(-1, group_size)
    n = ww.sum(-1, keepdims=True)
    mean = rr.sum(-1, keepdims=True) / jnp.maximum(n, 1.0)
    ss = (ww * (rr - mean) ** 2).sum(-1, keepdims=True)
    shape = rr.shape
    return tuple(jnp.broadcast_to(x, shape).reshape(-1) for x in (n, mean, ss))
  n_total = rewards.shape[0]
  # Invalid responses get segment n_total, which segment_sum drops.
  seg = jnp.where(valid, _first_occurrence(group_ids), n_total)
  n = jax.ops.segment_sum(w, seg, num_segments=n_total)
  mean = jax.ops.segment_sum(r, seg, num_segments=n_total) / jnp.maximum(n, 1.0)
  seg_c = jnp.minimum(seg, n_total - 1)
  dev = jnp.where(valid, rewards - mean[seg_c], 0.0)
  ss = jax.ops.segment_sum(dev * dev, seg, num_segments=n_total)
  return n[seg_c], mean[seg_c], ss[seg_c]


def _baseline_prepare(fn_name, rewards, group_ids, mask, group_size):
  _check_group_size(fn_name, group_size, jnp.shape(rewards)[0] if jnp.ndim(rewards) else None)
  rewards_f32, valid = _prepare(fn_name, rewards, {"group_ids": group_ids}, mask)
  group_ids = jnp.asarray(group_ids)
  if group_size is not None:
    _check_rows_are_groups(fn_name, group_ids, group_size)
  return rewards_f32, group_ids, valid


def grpo(rewards: jax.Array, group_ids: jax.Array, mask: jax.Array | None = None, *,
         std: str = "unbiased", eps: float = 1e-6, group_size: int | None = None) -> jax.Array:
  """GRPO's group z-score: (r - mean_g) / (std_g + eps); groups of one give 0.

  Args:
    rewards: f32[N]. group_ids: i32[N]. mask: bool[N] or None (masked: 0, not in any group).
    std: "unbiased" (divide by n - 1, the default) or "biased" (divide by n).
    eps: added to the std.
    group_size: see `g2rpo` (rows of G are groups).
  Returns:
    f32[N].
  """
  _check_std(std)
  r, g, valid = _baseline_prepare("grpo", rewards, group_ids, mask, group_size)
  n, mean, ss = _group_moments(r, g, valid, group_size)
  denom = jnp.maximum(n - 1.0, 1.0) if std == "unbiased" else jnp.maximum(n, 1.0)
  adv = (r - mean) / (jnp.sqrt(ss / denom) + eps)
  return jnp.where(valid & (n > 1), adv, 0.0)


def dr_grpo(rewards: jax.Array, group_ids: jax.Array, mask: jax.Array | None = None, *,
            group_size: int | None = None) -> jax.Array:
  """Dr.GRPO: r - mean_g (no std scaling). f32[N]; masked entries 0 and in no group."""
  r, g, valid = _baseline_prepare("dr_grpo", rewards, group_ids, mask, group_size)
  _, mean, _ = _group_moments(r, g, valid, group_size)
  return jnp.where(valid, r - mean, 0.0)


def rloo(rewards: jax.Array, group_ids: jax.Array, mask: jax.Array | None = None, *,
         group_size: int | None = None) -> jax.Array:
  """RLOO: r_i - mean of the other members of its group = n / (n - 1) · (r_i - mean_g).

  A group of one has no baseline and gets 0. f32[N]; masked entries 0 and in no group.
  """
  r, g, valid = _baseline_prepare("rloo", rewards, group_ids, mask, group_size)
  n, mean, _ = _group_moments(r, g, valid, group_size)
  adv = n / jnp.maximum(n - 1.0, 1.0) * (r - mean)
  return jnp.where(valid & (n > 1), adv, 0.0)


def none(rewards: jax.Array, group_ids: jax.Array, mask: jax.Array | None = None, *,
         group_size: int | None = None) -> jax.Array:
  """No baseline: the raw reward (masked entries 0). group_size is accepted for uniformity."""
  r, _, valid = _baseline_prepare("none", rewards, group_ids, mask, group_size)
  return jnp.where(valid, r, 0.0)


# ----------------------------------------------------------------------------- registry

ESTIMATORS: dict[str, Estimator] = {
    "g2rpo": g2rpo,
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "none": none,
}

_OPTION_CHECKS = {"mode": _check_mode, "std": _check_std}


def get_estimator(name: str, **options) -> Callable[..., jax.Array]:
  """The estimator `name` with its keyword options bound, as fn(rewards, group_ids, task_ids, mask).

  Every estimator gets the same call so the trainer needs no special cases; estimators that do
  not pool by task ignore task_ids. Options are the estimator's keyword-only arguments (e.g.
  g2rpo: mode, group_size; grpo: std, eps, group_size) and are checked here, not at first call.
  """
  if name not in ESTIMATORS:
    raise ValueError(f"unknown advantage estimator {name!r}; valid names: {sorted(ESTIMATORS)}")
  fn = ESTIMATORS[name]
  params = inspect.signature(fn).parameters
  allowed = sorted(k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"advantage estimator {name!r}: unknown option(s) {unknown}; "
                     f"valid options: {allowed}")
  for key, value in options.items():
    if key in _OPTION_CHECKS:
      _OPTION_CHECKS[key](value)
  if "group_size" in options:
    _check_group_size(name, options["group_size"])
  takes_tasks = "task_ids" in params

  def estimator(rewards, group_ids, task_ids, mask=None):
    if takes_tasks:
      return fn(rewards, group_ids, task_ids, mask, **options)
    return fn(rewards, group_ids, mask, **options)

  opts = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
  estimator.__name__ = f"{name}({opts})"
  estimator.__qualname__ = estimator.__name__
  estimator.__doc__ = fn.__doc__
  return estimator
