"""Token-level clipped policy loss, KL-to-reference estimators and exact-accumulation reductions.

This is SPEC §3: the PPO-style surrogate that G²RPO optimises, with the released code's choices as
defaults (clip-higher ε_low = 0.2 / ε_high = 0.3, dual clip c = 3 for negative advantages, global
token mean, no KL). Everything here is a pure function of arrays; the trainer decides what the
arrays are. This module must not import the trainer, models, rollout or tasks (data flows one way:
trainer -> losses).

Reductions are returned as `SumCount(sum, count)` pairs instead of means. A mini-batch split into
micro-batches then accumulates exactly for every aggregation mode: add the pairs (`accumulate`),
divide once at the end (`finish`). For gradients, differentiate `loss.sum` of each micro-batch,
add the gradients, and divide by the total count; the count never depends on the parameters.

  aggregation               per micro-batch sum                        count
  token_mean                Σ_{b,t} m·ℓ                                Σ_{b,t} m          (tokens)
  seq_mean_token_mean       Σ_b [Σ_t m·ℓ / Σ_t m]                      #sequences with a token
  seq_mean_token_sum_norm   Σ_b [Σ_t m·ℓ / L]  (L constant, Dr.GRPO)   #sequences with a token

Extremes (ratio min / max) are not means; they come as `Min` / `Max` and accumulate with
min / max.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp


# ----------------------------------------------------------------------------------------------
# Reductions that accumulate exactly over micro-batches.


class SumCount(NamedTuple):
  """A mean kept as numerator and denominator: `finish` gives sum / count (0 when count is 0)."""
  sum: jax.Array
  count: jax.Array


class Min(NamedTuple):
  """A minimum; accumulates with `jnp.minimum` (+inf when nothing was seen)."""
  value: jax.Array


class Max(NamedTuple):
  """A maximum; accumulates with `jnp.maximum` (-inf when nothing was seen)."""
  value: jax.Array


_REDUCTIONS = (SumCount, Min, Max)


def _is_reduction(x) -> bool:
  return isinstance(x, _REDUCTIONS)


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den where den > 0, else 0; the double `where` keeps gradients finite at den == 0."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0.0)


def accumulate(a, b):
  """Combines two pytrees of reductions (same structure) from two micro-batches."""
  def combine(x, y):
    if type(x) is not type(y):
      raise TypeError(f"accumulate: cannot combine a {type(x).__name__} with a {type(y).__name__}")
    if isinstance(x, SumCount):
      return SumCount(x.sum + y.sum, x.count + y.count)
    if isinstance(x, Min):
      return Min(jnp.minimum(x.value, y.value))
    return Max(jnp.maximum(x.value, y.value))
  return jax.tree.map(combine, a, b, is_leaf=_is_reduction)


def finish(tree):
  """Turns every reduction in a pytree into its value: SumCount -> sum / count, Min / Max -> value."""
  def done(x):
    if isinstance(x, SumCount):
      return safe_div(x.sum, x.count)
    if isinstance(x, (Min, Max)):
      return x.value
    return x
  return jax.tree.map(done, tree, is_leaf=_is_reduction)


# ----------------------------------------------------------------------------------------------
# Aggregation modes.

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregate(values: jax.Array, mask: jax.Array, mode: str = "token_mean",
              norm_len: Optional[float] = None) -> SumCount:
  """Reduces per-token values to an exactly accumulable (sum, count) pair.

  Args:
    values: f32[B, T] per-token values (a loss, a KL, an indicator).
    mask: f32[B, T] or bool[B, T]; 1 for response tokens. Non-binary values act as weights.
    mode: one of AGGREGATIONS (see the module docstring for the formulas).
    norm_len: the constant L of `seq_mean_token_sum_norm`; None means T (the padded length),
      which is constant only if every micro-batch is padded to the same T: pass the configured
      maximum response length to be safe.

  Returns:
    SumCount with scalar sum and count. Sequences without any response token are not counted in
    the sequence modes (they are padding rows).
  """
  chex.assert_rank([values, mask], 2)
  chex.assert_equal_shape([values, mask])
  mask = mask.astype(values.dtype)
  masked = values * mask
  if mode == "token_mean":
    return SumCount(jnp.sum(masked), jnp.sum(mask))
  tokens_per_seq = jnp.sum(mask, axis=-1)
  num_seqs = jnp.sum((tokens_per_seq > 0).astype(values.dtype))
  if mode == "seq_mean_token_mean":
    return SumCount(jnp.sum(safe_div(jnp.sum(masked, axis=-1), tokens_per_seq)), num_seqs)
  if mode == "seq_mean_token_sum_norm":
    length = values.shape[-1] if norm_len is None else norm_len
    if not isinstance(length, (int, float)) or length <= 0:
      raise ValueError(f"aggregate: norm_len must be a positive number, got {norm_len!r}")
    return SumCount(jnp.sum(masked) / length, num_seqs)
  raise ValueError(f"aggregate: unknown mode {mode!r}; expected one of {AGGREGATIONS}")


# ----------------------------------------------------------------------------------------------
# KL estimators.


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k3",
               log_ratio_clamp: float = 20.0) -> jax.Array:
  """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ (Schulman's k1 / k2 / k3).

  With d = log π_ref − log π_θ (clamped to ±log_ratio_clamp so exp cannot overflow):
    k1 = −d             (unbiased, can be negative)
    k2 = d² / 2         (biased, low variance)
    k3 = exp(d) − d − 1 (unbiased, ≥ 0; verl's "low_var_kl")

  Args:
    logprobs, ref_logprobs: f32[B, T] log-probabilities of the sampled tokens.
  Returns:
    f32[B, T].
  """
  chex.assert_equal_shape([logprobs, ref_logprobs])
  d = jnp.clip(ref_logprobs - logprobs, -log_ratio_clamp, log_ratio_clamp)
  if estimator == "k1":
    return -d
  if estimator == "k2":
    return 0.5 * jnp.square(d)
  if estimator == "k3":
    return jnp.expm1(d) - d
  raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


KL_ESTIMATORS = ("k1", "k2", "k3")


# ----------------------------------------------------------------------------------------------
# The policy loss.


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """Every knob of `policy_loss`; defaults are the released code's (SPEC §3).

  eps_low, eps_high: clip-higher range [1 − eps_low, 1 + eps_high] for the ratio.
  dual_clip_c: for A < 0 the per-token loss is capped at −A·c (c > 1); None disables it.
  log_ratio_clamp: |log π_θ − log π_old| is clamped to this before exp (overflow safety).
  aggregation: one of AGGREGATIONS; norm_len: the constant L of seq_mean_token_sum_norm.
  kl_coef: β; 0 means no KL term and no reference log-probs needed.
  kl_estimator: 'k1', 'k2' or 'k3'.
  """
  eps_low: float = 0.2
  eps_high: float = 0.3
  dual_clip_c: Optional[float] = 3.0
  log_ratio_clamp: float = 20.0
  aggregation: str = "token_mean"
  norm_len: Optional[float] = None
  kl_coef: float = 0.0
  kl_estimator: str = "k3"

  def __post_init__(self):
    if not 0 <= self.eps_low < 1:
      raise ValueError(f"PolicyLossConfig: eps_low must be in [0, 1), got {self.eps_low}")
    if self.eps_high < 0:
      raise ValueError(f"PolicyLossConfig: eps_high must be >= 0, got {self.eps_high}")
    if self.dual_clip_c is not None and self.dual_clip_c <= 1:
      raise ValueError(f"PolicyLossConfig: dual_clip_c must be > 1 (or None), got {self.dual_clip_c}")
    if self.log_ratio_clamp <= 0:
      raise ValueError(f"PolicyLossConfig: log_ratio_clamp must be > 0, got {self.log_ratio_clamp}")
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"PolicyLossConfig: aggregation {self.aggregation!r} is not one of {AGGREGATIONS}")
    if self.norm_len is not None and self.norm_len <= 0:
      raise ValueError(f"PolicyLossConfig: norm_len must be > 0 (or None), got {self.norm_len}")
    if self.kl_coef < 0:
      raise ValueError(f"PolicyLossConfig: kl_coef must be >= 0, got {self.kl_coef}")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f"PolicyLossConfig: kl_estimator {self.kl_estimator!r} is not one of {KL_ESTIMATORS}")

  @classmethod
  def from_mapping(cls, d: Mapping[str, Any]) -> "PolicyLossConfig":
    """Builds from a dict / ConfigDict; an unknown key is an error, never silently ignored."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise KeyError(f"PolicyLossConfig: unknown keys {unknown}; expected a subset of {sorted(known)}")
    return cls(**dict(d))


def policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                mask: jax.Array, ref_logprobs: Optional[jax.Array] = None,
                config: Optional[PolicyLossConfig] = None
                ) -> tuple[SumCount, dict[str, Any]]:
  """Clipped token-level policy loss of SPEC §3 (+ β·KL), as exactly accumulable reductions.

  Per token, with log-ratio δ = clamp(log π_θ − log π_old, ±log_ratio_clamp), r = exp(δ):
    ℓ_clip = max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high))
    ℓ      = min(ℓ_clip, −A·c)  if A < 0 (dual clip)  else ℓ_clip
  The loss is aggregate(ℓ + β·KL) in the configured mode; KL uses `kl_penalty`.

  Args:
    logprobs: f32[B, T] log π_θ of the sampled tokens (differentiated).
    old_logprobs: f32[B, T] log π_old from the rollout (treated as constants).
    advantages: f32[B] (one per sequence, broadcast over tokens) or f32[B, T].
    mask: f32[B, T] or bool[B, T], 1 for response tokens.
    ref_logprobs: f32[B, T] log π_ref; needed only when config.kl_coef > 0 (if given with β = 0
      the KL is still reported as a metric).
    config: PolicyLossConfig; None means the defaults.

  Returns:
    (loss, metrics). loss: SumCount whose `sum` is what to differentiate. metrics (no gradient):
    pg_loss, the clipped surrogate without the KL term, in the loss's aggregation mode; and, as
    global token means whatever the loss's mode (so they compare across modes): clip_frac_low
    (A < 0 and r < 1 − ε_low), clip_frac_high (A > 0 and r > 1 + ε_high), clip_frac_dual (A < 0
    and the −A·c cap binds), approx_kl (k3 estimate of KL(π_old ‖ π_θ)), ratio_mean, kl (the
    KL to the reference, when ref_logprobs is given); Min / Max for ratio_min / ratio_max.
  """
  cfg = PolicyLossConfig() if config is None else config
  chex.assert_rank([logprobs, old_logprobs, mask], 2)
  chex.assert_equal_shape([logprobs, old_logprobs, mask])
  if advantages.ndim == 1:
    chex.assert_axis_dimension(advantages, 0, logprobs.shape[0])
    advantages = advantages[:, None]
  elif advantages.shape != logprobs.shape:
    raise ValueError(f"policy_loss: advantages must be f32[B] or f32[B, T] with B, T = "
                     f"{logprobs.shape}, got shape {advantages.shape}")
  if cfg.kl_coef > 0 and ref_logprobs is None:
    raise ValueError(f"policy_loss: kl_coef = {cfg.kl_coef} > 0 needs ref_logprobs, got None")

  dtype = logprobs.dtype
  mask = mask.astype(dtype)
  adv = jax.lax.stop_gradient(advantages.astype(dtype))
  old = jax.lax.stop_gradient(old_logprobs)
  log_ratio = jnp.clip(logprobs - old, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
  ratio = jnp.exp(log_ratio)

  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
  per_token = jnp.maximum(unclipped, clipped)
  negative = adv < 0
  if cfg.dual_clip_c is not None:
    cap = -adv * cfg.dual_clip_c
    dual_binds = negative & (per_token > cap)
    per_token = jnp.where(negative, jnp.minimum(per_token, cap), per_token)
  else:
    dual_binds = jnp.zeros_like(negative)

  total = per_token
  metrics: dict[str, Any] = {}
  if ref_logprobs is not None:
    kl = kl_penalty(logprobs, jax.lax.stop_gradient(ref_logprobs), cfg.kl_estimator,
                    cfg.log_ratio_clamp)
    metrics["kl"] = aggregate(kl, mask, "token_mean")
    if cfg.kl_coef > 0:
      total = total + cfg.kl_coef * kl
  loss = aggregate(total, mask, cfg.aggregation, cfg.norm_len)

  # Diagnostics only: no gradient flows through them.
  ratio_sg = jax.lax.stop_gradient(ratio)
  log_ratio_sg = jax.lax.stop_gradient(log_ratio)
  as_f = lambda b: b.astype(dtype)
  token_mean = lambda v: aggregate(v, mask, "token_mean")
  valid = mask > 0
  metrics.update(
      pg_loss=aggregate(jax.lax.stop_gradient(per_token), mask, cfg.aggregation, cfg.norm_len),
      clip_frac_low=token_mean(as_f(negative & (ratio_sg < 1.0 - cfg.eps_low))),
      clip_frac_high=token_mean(as_f((adv > 0) & (ratio_sg > 1.0 + cfg.eps_high))),
      clip_frac_dual=token_mean(as_f(dual_binds)),
      # k3 estimate of KL(π_old ‖ π_θ) from samples of π_old: r − 1 − log r.
      approx_kl=token_mean(jnp.expm1(log_ratio_sg) - log_ratio_sg),
      ratio_mean=token_mean(ratio_sg),
      ratio_min=Min(jnp.min(jnp.where(valid, ratio_sg, jnp.inf))),
      ratio_max=Max(jnp.max(jnp.where(valid, ratio_sg, -jnp.inf))),
  )
  return loss, metrics
