"""Task-level shaping of G²RPO: the response-length reward (SPEC §4) and the entropy band (SPEC §5).

Task ids here are DENSE indices 0..num_tasks−1 that index the per-task parameter arrays
(thresholds, weights, entropy bounds); map arbitrary task keys to dense indices before calling.
Everything is a pure, jit-able function of arrays. This module must not import the trainer,
models, rollout or tasks; it uses only `losses` for its reduction types.

Micro-batch accumulation of the entropy term. The band penalty
  L_ent = λ · Σ_τ [max(0, H_τ − H_max,τ) + max(0, H_min,τ − H_τ)],  H_τ = S_τ / N_τ
is a hinge of a per-task MEAN, so unlike the policy loss it is not a sum over tokens and a
micro-batch cannot compute its share of it from its own tokens alone. Two ways are offered:
  * `entropy_band_penalty`: the penalty of the tokens given. Used per micro-batch this is the
    released code's behaviour (each micro-batch sees its own H_τ); it is exact when a mini-batch
    is one micro-batch.
  * exact accumulation: first `entropy_stats` over the whole mini-batch at the current parameters
    (forward only, accumulate the per-task SumCount with `losses.accumulate`), then per
    micro-batch `entropy_band_surrogate(..., stats=...)`. Summed over the micro-batches (a plain
    sum, not sum / count), its value equals the full-batch penalty and its gradient equals the
    full-batch gradient: given the global H_τ, the hinge is locally linear with slope
    s_τ ∈ {−1, 0, +1}, and ∇H_τ = Σ_micro ∇S_τ,micro / N_τ.
"""
from __future__ import annotations

from typing import Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

from g2rpo_jax.losses import SumCount, safe_div

ArrayOrFloat = Union[jax.Array, float]


def _is_concrete(*xs) -> bool:
  """True if no argument is a tracer: its values can then be checked on the host with numpy.

  Checks must use numpy, not jnp: under jit even a concrete (closed-over) array turns into a
  tracer as soon as a jnp op touches it.
  """
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _per_example(param: ArrayOrFloat, task_ids: jax.Array, name: str) -> jax.Array:
  """A scalar broadcasts to every example; an f32[num_tasks] array is indexed by task id."""
  param = jnp.asarray(param, jnp.float32)
  if param.ndim == 0:
    return jnp.broadcast_to(param, task_ids.shape)
  if param.ndim != 1:
    raise ValueError(f"{name} must be a scalar or f32[num_tasks], got shape {param.shape}")
  if _is_concrete(task_ids) and task_ids.size:
    ids = np.asarray(task_ids)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= param.shape[0]:
      raise ValueError(f"task ids must be dense in [0, {param.shape[0]}) to index {name}, "
                       f"got ids in [{lo}, {hi}]")
  return param[task_ids]


# ----------------------------------------------------------------------------------------------
# Length reward and reward composition (SPEC §4).


def check_length_thresholds(l_min, l_low, l_high, l_max) -> None:
  """Raises ValueError unless L_min < L_low ≤ L_high < L_max for every task (host-side check)."""
  arrs = [np.asarray(a, np.float64) for a in (l_min, l_low, l_high, l_max)]
  names = ("l_min", "l_low", "l_high", "l_max")
  shapes = {a.shape for a in arrs}
  if len(shapes) != 1 or arrs[0].ndim != 1:
    raise ValueError(f"length thresholds must all be f32[num_tasks], got shapes "
                     f"{dict(zip(names, (a.shape for a in arrs)))}")
  lo, low, high, hi = arrs
  for cond, what in ((lo < low, "l_min < l_low"), (low <= high, "l_low <= l_high"),
                     (high < hi, "l_high < l_max")):
    bad = np.flatnonzero(~cond)
    if bad.size:
      raise ValueError(f"length thresholds: need {what} for every task; violated for task ids "
                       f"{bad.tolist()} (l_min={lo[bad].tolist()}, l_low={low[bad].tolist()}, "
                       f"l_high={high[bad].tolist()}, l_max={hi[bad].tolist()})")


def length_reward(lengths: jax.Array, task_ids: jax.Array, l_min: ArrayOrFloat,
                  l_low: ArrayOrFloat, l_high: ArrayOrFloat, l_max: ArrayOrFloat) -> jax.Array:
  """Trapezoid reward over response length in tokens (SPEC §4), thresholds per task.

    R = 0                               |y| < L_min or |y| > L_max
        (|y| − L_min) / (L_low − L_min)  L_min ≤ |y| < L_low
        1                               L_low ≤ |y| ≤ L_high
        (L_max − |y|) / (L_max − L_high) L_high < |y| ≤ L_max
  Exact at every threshold: 0 at L_min and L_max, 1 at L_low and L_high.

  Args:
    lengths: i32[N] or f32[N], response lengths in tokens.
    task_ids: i32[N], dense task indices.
    l_min, l_low, l_high, l_max: f32[num_tasks] (or scalars for one window for all tasks), with
      L_min < L_low ≤ L_high < L_max (checked when the values are concrete).
  Returns:
    f32[N] in [0, 1].
  """
  chex.assert_rank([lengths, task_ids], 1)
  chex.assert_equal_shape([lengths, task_ids])
  if _is_concrete(l_min, l_low, l_high, l_max):
    check_length_thresholds(*(np.atleast_1d(a) for a in np.broadcast_arrays(
        *(np.asarray(t, np.float64) for t in (l_min, l_low, l_high, l_max)))))
  x = lengths.astype(jnp.float32)
  lo, low, high, hi = (_per_example(p, task_ids, n) for p, n in
                       ((l_min, "l_min"), (l_low, "l_low"), (l_high, "l_high"), (l_max, "l_max")))
  # Denominators are made safe so that the branch not taken can never produce inf / NaN.
  rise = (x - lo) / jnp.where(low > lo, low - lo, 1.0)
  fall = (hi - x) / jnp.where(hi > high, hi - high, 1.0)
  return jnp.where(x < lo, 0.0,
                   jnp.where(x < low, rise,
                             jnp.where(x <= high, 1.0,
                                       jnp.where(x <= hi, fall, 0.0))))


def compose_reward(accuracy: jax.Array, fmt: jax.Array, task_ids: jax.Array,
                   w_fmt: ArrayOrFloat = 0.1, w_len: ArrayOrFloat = 0.0,
                   length: Optional[jax.Array] = None) -> jax.Array:
  """overall = (1 − w_fmt − w_len)·accuracy + w_fmt·format + w_len·R_len (SPEC §4, §6).

  Args:
    accuracy, fmt: f32[N] in [0, 1].
    task_ids: i32[N], dense task indices (used only when a weight is per task).
    w_fmt, w_len: scalars or f32[num_tasks].
    length: f32[N] length reward (`length_reward`); may be None only if w_len is all zero.
  Returns:
    f32[N].
  """
  chex.assert_rank([accuracy, fmt, task_ids], 1)
  chex.assert_equal_shape([accuracy, fmt, task_ids])
  if _is_concrete(w_fmt, w_len):
    wf_np, wl_np = np.broadcast_arrays(np.asarray(w_fmt, np.float64), np.asarray(w_len, np.float64))
    if np.any((wf_np < 0) | (wl_np < 0) | (wf_np + wl_np > 1)):
      raise ValueError(f"compose_reward: weights need w_fmt, w_len >= 0 and w_fmt + w_len <= 1 "
                       f"for every task, got w_fmt={w_fmt!r}, w_len={w_len!r}")
  if length is None:
    if _is_concrete(w_len) and not np.any(np.asarray(w_len) != 0):
      length = jnp.zeros_like(accuracy)
    else:
      raise ValueError("compose_reward: w_len is non-zero (or traced) but no length reward given")
  wf = _per_example(w_fmt, task_ids, "w_fmt")
  wl = _per_example(w_len, task_ids, "w_len")
  chex.assert_equal_shape([accuracy, length])
  return (1.0 - wf - wl) * accuracy + wf * fmt + wl * length


# ----------------------------------------------------------------------------------------------
# Token entropy estimators (SPEC §5).


def sampled_token_nll(logprobs: jax.Array) -> jax.Array:
  """−log π(sampled token): f32[B, T] -> f32[B, T]; the released code's estimator of entropy."""
  return -logprobs


def full_vocab_entropy(logits: jax.Array) -> jax.Array:
  """Exact entropy of the next-token distribution: f32[B, T, V] -> f32[B, T] (stable in fp32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # p·logp with p = 0 (a −inf logit, e.g. a masked vocabulary entry) must count as 0, not NaN:
  # replace logp BEFORE the product so the gradient is finite too.
  finite_logp = jnp.where(jnp.isfinite(logp), logp, 0.0)
  return -jnp.sum(jnp.exp(logp) * finite_logp, axis=-1)


ENTROPY_ESTIMATORS = ("sampled_nll", "full_vocab")


def token_entropy(estimator: str = "sampled_nll", *, logprobs: Optional[jax.Array] = None,
                  logits: Optional[jax.Array] = None) -> jax.Array:
  """Per-token entropy by name: 'sampled_nll' needs logprobs f32[B, T], 'full_vocab' logits."""
  if estimator == "sampled_nll":
    if logprobs is None:
      raise ValueError("token_entropy('sampled_nll') needs logprobs: f32[B, T]")
    return sampled_token_nll(logprobs)
  if estimator == "full_vocab":
    if logits is None:
      raise ValueError("token_entropy('full_vocab') needs logits: f32[B, T, V]")
    return full_vocab_entropy(logits)
  raise ValueError(f"token_entropy: unknown estimator {estimator!r}; expected one of "
                   f"{ENTROPY_ESTIMATORS}")


# ----------------------------------------------------------------------------------------------
# Entropy band penalty (SPEC §5).


def entropy_stats(entropy: jax.Array, mask: jax.Array, task_ids: jax.Array,
                  num_tasks: int) -> SumCount:
  """Per-task token sums and counts of the entropy: SumCount of f32[num_tasks] each.

  Args:
    entropy: f32[B, T] per-token entropy (`token_entropy`).
    mask: f32/bool[B, T], 1 for response tokens.
    task_ids: i32[B], dense task index of each sequence.
  """
  chex.assert_rank([entropy, mask, task_ids], [2, 2, 1])
  chex.assert_equal_shape([entropy, mask])
  chex.assert_axis_dimension(task_ids, 0, entropy.shape[0])
  m = mask.astype(entropy.dtype)
  seq_sum = jnp.sum(entropy * m, axis=-1)
  seq_count = jnp.sum(m, axis=-1)
  seg = lambda v: jax.ops.segment_sum(v, task_ids, num_segments=num_tasks)
  return SumCount(seg(seq_sum), seg(seq_count))


def _band(h: jax.Array, present: jax.Array, h_min: jax.Array, h_max: jax.Array) -> jax.Array:
  over = jnp.maximum(h - h_max, 0.0)
  under = jnp.maximum(h_min - h, 0.0)
  return jnp.where(present, over + under, 0.0)


def _bounds(h_min, h_max, num_tasks):
  if _is_concrete(h_min, h_max):
    for name, v in (("h_min", h_min), ("h_max", h_max)):
      if np.ndim(v) not in (0, 1) or (np.ndim(v) == 1 and np.shape(v)[0] != num_tasks):
        raise ValueError(f"entropy band: {name} must be a scalar or f32[{num_tasks}], got shape "
                         f"{np.shape(v)}")
    if np.any(np.asarray(h_min) > np.asarray(h_max)):
      raise ValueError(f"entropy band: need h_min <= h_max for every task, got h_min={h_min}, "
                       f"h_max={h_max}")
  h_min = jnp.broadcast_to(jnp.asarray(h_min, jnp.float32), (num_tasks,))
  h_max = jnp.broadcast_to(jnp.asarray(h_max, jnp.float32), (num_tasks,))
  return h_min, h_max


def band_penalty_from_stats(stats: SumCount, h_min: ArrayOrFloat = 0.2,
                            h_max: ArrayOrFloat = 0.6, coef: float = 0.02) -> jax.Array:
  """λ · Σ_τ band(H_τ) from per-task entropy stats (`entropy_stats`, possibly accumulated over
  micro-batches): f32[]. Tasks with no tokens contribute 0."""
  h_min, h_max = _bounds(h_min, h_max, stats.sum.shape[0])
  h = safe_div(stats.sum, stats.count)
  return coef * jnp.sum(_band(h, stats.count > 0, h_min, h_max))


def entropy_band_penalty(entropy: jax.Array, mask: jax.Array, task_ids: jax.Array,
                         num_tasks: int, h_min: ArrayOrFloat = 0.2, h_max: ArrayOrFloat = 0.6,
                         coef: float = 0.02) -> tuple[jax.Array, dict[str, jax.Array]]:
  """λ · Σ_τ [max(0, H_τ − H_max,τ) + max(0, H_min,τ − H_τ)] over the tasks present (SPEC §5).

  H_τ is the mean entropy over task τ's response tokens in this batch, with gradient. A task with
  no response token here contributes exactly 0, with a zero (finite) gradient.

  Args:
    entropy: f32[B, T] per-token entropy (`token_entropy`; differentiable).
    mask: f32/bool[B, T], 1 for response tokens.
    task_ids: i32[B], dense task index of each sequence.
    num_tasks: K, static.
    h_min, h_max: scalars or f32[K]; coef: λ.
  Returns:
    (penalty: f32[], metrics) with metrics entropy_per_task f32[K] (0 for absent tasks),
    tokens_per_task f32[K], penalty_per_task f32[K] (before λ).
  """
  h_min, h_max = _bounds(h_min, h_max, num_tasks)
  stats = entropy_stats(entropy, mask, task_ids, num_tasks)
  h = safe_div(stats.sum, stats.count)
  per_task = _band(h, stats.count > 0, h_min, h_max)
  metrics = dict(entropy_per_task=jax.lax.stop_gradient(h), tokens_per_task=stats.count,
                 penalty_per_task=jax.lax.stop_gradient(per_task))
  return coef * jnp.sum(per_task), metrics


def entropy_band_surrogate(entropy: jax.Array, mask: jax.Array, task_ids: jax.Array,
                           stats: SumCount, h_min: ArrayOrFloat = 0.2,
                           h_max: ArrayOrFloat = 0.6, coef: float = 0.02) -> jax.Array:
  """One micro-batch's share of the full-batch band penalty, exact when summed (module doc).

  Args:
    entropy, mask, task_ids: this micro-batch, as in `entropy_band_penalty`.
    stats: `entropy_stats` accumulated over ALL micro-batches of the mini-batch at the current
      parameters (its values are treated as constants).
    h_min, h_max, coef: as in `entropy_band_penalty`.
  Returns:
    f32[]: summed over the micro-batches, value and gradient equal those of
    `entropy_band_penalty` on the whole mini-batch.
  """
  num_tasks = stats.sum.shape[0]
  h_min, h_max = _bounds(h_min, h_max, num_tasks)
  total_sum = jax.lax.stop_gradient(stats.sum)
  total_count = jax.lax.stop_gradient(stats.count)
  h = safe_div(total_sum, total_count)
  present = total_count > 0
  slope = jnp.where(present, (h > h_max).astype(jnp.float32) - (h < h_min).astype(jnp.float32),
                    0.0)
  mine = entropy_stats(entropy, mask, task_ids, num_tasks)
  share = safe_div(mine.count, total_count)        # this micro-batch's fraction of the tokens
  # λ·s·(S_mb − H·N_mb)/N sums to 0 over micro-batches and carries the exact gradient; the
  # penalty value is spread over micro-batches in proportion to their tokens.
  linear = slope * safe_div(mine.sum - h * mine.count, total_count)
  return coef * jnp.sum(linear + share * _band(h, present, h_min, h_max))
