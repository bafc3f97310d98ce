"""Diagnostics for the claims of SPEC §7: per-task advantage moments, advantage mass, gradient equity.

All functions are pure and jit-able (`num_tasks` / `num_groups` are static). Ids are DENSE
indices 0..K−1 (segment ops with num_segments=K); map arbitrary keys to dense indices first.
This module must not import the trainer, models, rollout or tasks.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp

from g2rpo_jax.losses import safe_div


def _weights(values: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  if mask is None:
    return jnp.ones(values.shape, jnp.float32)
  chex.assert_equal_shape([values, mask])
  return mask.astype(jnp.float32)


def advantage_moments(advantages: jax.Array, task_ids: jax.Array, num_tasks: int,
                      mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """Per-task moments of the advantages (claim 1 of SPEC §7: equal spread across tasks).

  Population (biased, ddof = 0) moments, as scipy.stats.skew / kurtosis with their defaults:
  var = m2, skewness = m3 / m2^1.5, excess kurtosis = m4 / m2² − 3, where m_k are central moments.
  A task with fewer than one entry, or zero variance, gets 0 for the moments it cannot define
  (scipy would give NaN), so metrics stay finite.

  Args:
    advantages: f32[N]. task_ids: i32[N], dense in [0, num_tasks). mask: bool/f32[N] or None.
  Returns:
    dict of f32[num_tasks]: count, mean, var, skewness, excess_kurtosis, max_abs.
  """
  chex.assert_rank([advantages, task_ids], 1)
  chex.assert_equal_shape([advantages, task_ids])
  a = advantages.astype(jnp.float32)
  w = _weights(a, mask)
  seg = lambda v: jax.ops.segment_sum(v, task_ids, num_segments=num_tasks)
  count = seg(w)
  mean = safe_div(seg(w * a), count)
  # Two passes (centre first) so the higher moments do not cancel catastrophically.
  d = a - mean[task_ids]
  m2 = safe_div(seg(w * d ** 2), count)
  m3 = safe_div(seg(w * d ** 3), count)
  m4 = safe_div(seg(w * d ** 4), count)
  # Relative threshold: a pool of equal values has m2 at float noise, not exactly 0.
  spread = m2 > 1e-12 * jnp.maximum(mean ** 2, 1.0)
  skew = jnp.where(spread, safe_div(m3, jnp.where(spread, m2, 1.0) ** 1.5), 0.0)
  kurt = jnp.where(spread, safe_div(m4, jnp.where(spread, m2, 1.0) ** 2) - 3.0, 0.0)
  max_abs = jax.ops.segment_max(jnp.where(w > 0, jnp.abs(a), 0.0), task_ids,
                                num_segments=num_tasks)
  max_abs = jnp.where(count > 0, max_abs, 0.0)
  return dict(count=count, mean=mean, var=m2, skewness=skew, excess_kurtosis=kurt,
              max_abs=max_abs)


def advantage_mass(advantages: jax.Array, task_ids: jax.Array, num_tasks: int,
                   mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """Positive vs negative advantage mass per task (claim 4 of SPEC §7: symmetric updates).

  Returns:
    dict of f32[num_tasks]: pos_mass = Σ_{A>0} A, neg_mass = Σ_{A<0} |A|.
  """
  chex.assert_rank([advantages, task_ids], 1)
  chex.assert_equal_shape([advantages, task_ids])
  a = advantages.astype(jnp.float32)
  w = _weights(a, mask)
  seg = lambda v: jax.ops.segment_sum(v, task_ids, num_segments=num_tasks)
  return dict(pos_mass=seg(w * jnp.maximum(a, 0.0)), neg_mass=seg(w * jnp.maximum(-a, 0.0)))


def group_means(values: jax.Array, group_ids: jax.Array, num_groups: int,
                mask: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Per-group mean of any per-response value (e.g. reward, advantage).

  Args:
    values: f32[N]. group_ids: i32[N], dense in [0, num_groups). mask: bool/f32[N] or None.
  Returns:
    (mean f32[num_groups], count f32[num_groups]); an empty group has mean 0.
  """
  chex.assert_rank([values, group_ids], 1)
  chex.assert_equal_shape([values, group_ids])
  w = _weights(values, mask)
  seg = lambda v: jax.ops.segment_sum(v, group_ids, num_segments=num_groups)
  count = seg(w)
  return safe_div(seg(w * values.astype(jnp.float32)), count), count


def per_task_grad_norms(loss_fn: Callable[[Any, Any, jax.Array], jax.Array], params: Any,
                        batch: Any, task_ids: jax.Array, num_tasks: int,
                        mask: Optional[jax.Array] = None, *, vectorize: bool = False
                        ) -> jax.Array:
  """‖∇_params L_τ‖₂ for every task τ: the paper's "gradient equity" (claim 2 of SPEC §7).

  Contract for `loss_fn(params, batch, weights) -> f32[]`: `weights` is f32[B], one weight per
  example (the leading axis of `task_ids`); the loss must scale each example's contribution by
  its weight, so that weight 0 removes the example exactly. L_τ is loss_fn with weights =
  1[task_ids == τ] · mask. Keep the loss's normaliser independent of the weights (e.g. divide by
  the full batch's token count) if you want L = Σ_τ L_τ, i.e. each norm to be task τ's actual
  share of the training gradient; normalising by the weighted count instead measures each task's
  per-token gradient. A task absent from the batch has weights all 0 and (for a loss of the
  first kind, or one with a safe division) norm 0.

  Args:
    loss_fn: as above; params / batch: any pytrees it accepts.
    task_ids: i32[B], dense in [0, num_tasks). mask: bool/f32[B] or None (all valid).
    vectorize: True computes all K gradients at once with vmap (K× the memory of one gradient);
      False (default) one after another with lax.map.
  Returns:
    f32[num_tasks]: global L2 norm over all leaves of each task's gradient.
  """
  chex.assert_rank(task_ids, 1)
  valid = jnp.ones(task_ids.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  chex.assert_equal_shape([task_ids, valid])
  onehot = (task_ids[None, :] == jnp.arange(num_tasks)[:, None]).astype(jnp.float32) * valid
  grad_fn = jax.grad(loss_fn)

  def norm_for(weights):
    g = grad_fn(params, batch, weights)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                        for x in jax.tree.leaves(g)))

  if vectorize:
    return jax.vmap(norm_for)(onehot)
  return jax.lax.map(norm_for, onehot)
