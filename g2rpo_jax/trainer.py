"""The G²RPO training job: warm start, RL on a task mixture, evaluation, checkpoints, metrics.

`train_and_evaluate(config, workdir)` is the whole job (big_vision style). Its device work is a
few pure jitted functions of (state, arrays); the Python loop only orchestrates:

  initial    `initial_params`: init_checkpoint, or the seeded init, then (each when enabled and
             cached in the workdir) the vision tower's pretraining (`vision_pretraining.py`)
             and the supervised warm start on the tasks' demonstrations
  prompts    a prompt stream of `data_sources.py` (config.data: generated built-in tasks, TFDS,
             user JSONL components), checkpointable and sharded per host
  rollout    `rollout.generate` (jitted, KV cache) on a prompt batch -> tokens, old log-probs
  rewards    on host: accuracy + format from the task, length reward per task (shaping.py);
             a reward function that raises or returns NaN gives 0 and is counted per task
  filtering  groups whose mean accuracy is <= low or >= high are dropped and the batch refilled
             by further sampling rounds (SPEC §3); still-missing groups are masked padding
  advantages `advantages.get_estimator(name)` over the batch, pool = reward type (SPEC §2)
  reference  only when loss.kl_coef > 0: log π_ref of the sampled tokens (jitted, sharded like
             the params) from a frozen copy of the params RL started from (warm start /
             init_checkpoint); not checkpointed, re-derived on resume (`initial_params`)
  update     `train_step(state, batch) -> (state, metrics)`: several optimizer steps on
             mini-batches (lax.scan) against the rollout's old log-probs, with the per-task
             entropy band (SPEC §5); a non-finite loss or gradient skips that update and counts
             it in the state, so the host can stop after K in a row.

State layout (one pytree, sharded by the mesh, donated to `train_step`): params (pure dict of the
model's variables), optimizer state, step, RNG key data, non-finite counters. Host-side state
(data stream position, per-task reward-failure counters, warm-start scores) travels in the
checkpoint's JSON item.

Determinism: everything random derives from (config.seed, step), and the prompt stream's
position is checkpointed, so a resumed run repeats an uninterrupted one exactly on CPU.

This module is the top of the library's data flow: it imports the math modules, models, rollout
and tasks; none of them may import it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from flax import struct

from g2rpo_jax import checkpointing
from g2rpo_jax import config_utils
from g2rpo_jax import data_sources
from g2rpo_jax import diagnostics
from g2rpo_jax import losses
from g2rpo_jax import metrics as metrics_lib
from g2rpo_jax import shaping
from g2rpo_jax import sharding as sharding_lib
from g2rpo_jax import vision_pretraining
from g2rpo_jax.models import interface as model_api

Array = jax.Array
ROW_AXES = ("data", "fsdp")  # batch rows are split over both data-parallel axes


# Jitted functions shared by every Trainer of this process, keyed by everything they close over
# (graphdef, static step config, optimizer hyperparameters, mesh, shardings). A second Trainer
# with the same model and config (a resumed run, an eval, a test) reuses the compiled programs.
_JIT_CACHE: dict = {}


def _hashable(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return (treedef, tuple(leaves))


def cached_jit(key: tuple, make_fn: Callable, **jit_kwargs):
  """jax.jit(make_fn(), **jit_kwargs), built once per key in this process."""
  if key not in _JIT_CACHE:
    _JIT_CACHE[key] = jax.jit(make_fn(), **jit_kwargs)
  return _JIT_CACHE[key]


class NonFiniteError(RuntimeError):
  """Raised after `train.max_nonfinite` non-finite updates in a row."""


# ------------------------------------------------------------------------------------------
# State and batch.

@struct.dataclass
class TrainState:
  """Everything the jitted update reads and writes; a pytree, checkpointed whole.

  params: the model's variables as a pure nested dict (`nnx.State.to_pure_dict()`).
  opt_state: optax state of `make_optimizer`.
  step: i32[] RL steps done. rng: u32[2] key data (raw, so it checkpoints as a plain array).
  nonfinite_streak: i32[] consecutive skipped updates; nonfinite_total: i32[] all skipped.
  """
  params: Any
  opt_state: Any
  step: Array
  rng: Array
  nonfinite_streak: Array
  nonfinite_total: Array


@struct.dataclass
class RLBatch:
  """One rollout batch ready for the update; N = prompts × group size rows, T response tokens.

  prompt: PromptBatch with N rows (each prompt repeated G times).
  tokens: i32[N, T] response tokens; mask: bool[N, T] real response tokens (False for masked
    rows, i.e. filtered-out padding groups).
  old_logprobs: f32[N, T] log π_old of the sampled tokens (from the rollout).
  advantages: f32[N]; task_ids: i32[N] dense index into config.tasks.names (entropy band).
  ref_logprobs: f32[N, T] log π_ref, only when the KL term is on (else None).
  """
  prompt: Any
  tokens: Array
  mask: Array
  old_logprobs: Array
  advantages: Array
  task_ids: Array
  ref_logprobs: Any = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static (hashable) part of the update: everything `train_step` needs besides arrays."""
  num_tasks: int
  num_minibatches: int
  temperature: float
  loss: losses.PolicyLossConfig
  entropy_enabled: bool
  entropy_estimator: str
  entropy_lam: float
  h_min: tuple
  h_max: tuple
  # Micro-batches per optimizer update (gradient accumulation; 1 = one backward pass per update).
  num_microbatches: int = 1
  # Consecutive rows that stay together when the batch is dealt into mini-batches: the group
  # size (whole prompt groups per mini-batch) or 1 (each group's rows spread over all of them).
  minibatch_unit: int = 1


def step_config(config: ml_collections.ConfigDict) -> StepConfig:
  names = config_utils.task_names(config)
  bounds = [config_utils.entropy_bounds(config, t) for t in names]
  ent = config.shaping.entropy
  loss_cfg = losses.PolicyLossConfig(
      eps_low=config.loss.eps_low, eps_high=config.loss.eps_high,
      dual_clip_c=config.loss.dual_clip, log_ratio_clamp=config.loss.log_ratio_clamp,
      aggregation=config.loss.aggregation, norm_len=float(config.rollout.max_new_tokens),
      kl_coef=config.loss.kl_coef, kl_estimator=config.loss.kl_estimator)
  return StepConfig(
      num_tasks=len(names), num_minibatches=config.batch.num_minibatches,
      temperature=float(config.rollout.temperature), loss=loss_cfg,
      entropy_enabled=bool(ent.enabled), entropy_estimator=ent.estimator,
      entropy_lam=float(ent.lam),
      h_min=tuple(float(lo) for lo, _ in bounds), h_max=tuple(float(hi) for _, hi in bounds),
      num_microbatches=int(config.batch.num_microbatches),
      minibatch_unit=(int(config.rollout.group_size) if config.batch.minibatch_split == "groups"
                      else 1))


def make_optimizer(config: ml_collections.ConfigDict, lr: float | None = None):
  """Grad-norm clip + AdamW with a constant (optionally warmed-up) schedule (SPEC §3)."""
  o = config.optimizer
  peak = o.lr if lr is None else lr
  schedule = (optax.linear_schedule(0.0, peak, o.warmup_steps) if o.warmup_steps > 0
              else optax.constant_schedule(peak))
  tx = optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
  return tx, schedule


# ------------------------------------------------------------------------------------------
# Pure device functions.

def _response_logprobs(graphdef, params, batch: RLBatch, temperature: float, full_entropy: bool):
  out = model_api.sequence_logprobs(graphdef, params, batch.prompt, batch.tokens, batch.mask,
                                    temperature=temperature, return_entropy=full_entropy)
  return out if full_entropy else (out, None)


def rl_loss(params, graphdef, batch: RLBatch, cfg: StepConfig, weights: Array | None = None):
  """Total loss of one mini-batch: clipped policy loss (+β·KL) + entropy band (SPEC §3, §5).

  `weights: f32[N]` (optional) scales each row's share, for per-task gradient norms; the
  normaliser stays the full mini-batch's so the task losses add up to the loss.
  Returns (loss f32[], aux dict).
  """
  mask = batch.mask.astype(jnp.float32)
  logp, full_ent = _response_logprobs(graphdef, params, batch, cfg.temperature,
                                      cfg.entropy_enabled and cfg.entropy_estimator == "full_vocab")
  pg_mask = mask if weights is None else mask * weights[:, None]
  pg, pg_metrics = losses.policy_loss(logp, batch.old_logprobs, batch.advantages, pg_mask,
                                      ref_logprobs=batch.ref_logprobs, config=cfg.loss)
  if weights is not None:
    full, _ = losses.policy_loss(logp, batch.old_logprobs, batch.advantages, mask,
                                 ref_logprobs=batch.ref_logprobs, config=cfg.loss)
    pg = losses.SumCount(pg.sum, jax.lax.stop_gradient(full.count))
  loss = losses.safe_div(pg.sum, pg.count)
  ent_tok = full_ent if full_ent is not None else shaping.sampled_token_nll(logp)
  ent_mask = pg_mask
  penalty, ent_metrics = shaping.entropy_band_penalty(
      ent_tok, ent_mask, batch.task_ids, cfg.num_tasks, jnp.asarray(cfg.h_min),
      jnp.asarray(cfg.h_max), coef=cfg.entropy_lam)
  if cfg.entropy_enabled:
    loss = loss + penalty
  aux = dict(pg=pg_metrics, entropy_penalty=penalty, entropy_per_task=ent_metrics[
      "entropy_per_task"], tokens_per_task=ent_metrics["tokens_per_task"])
  return loss, aux


def _split_minibatches(batch: RLBatch, m: int, unit: int = 1) -> RLBatch:
  """[N, ...] -> [M, N/M, ...] dealing blocks of `unit` consecutive rows round-robin: block
  b goes to mini-batch b mod M.

  unit = 1 takes rows m, m+M, m+2M, ... (each mini-batch keeps an equal share of every device's
  rows, so no resharding under a row-sharded mesh). unit = G (the group size; rows are laid out
  group by group) keeps each prompt group whole in one mini-batch, so within every optimizer
  update a group's advantages sum to ~0 and what its responses share (the prompt, the format)
  gets no net push from that group; split over mini-batches, each update sees an unbalanced
  part of every group.
  """
  def split(x):
    if x is None:
      return None
    n = x.shape[0]
    if n % (m * unit):
      raise ValueError(f"batch of {n} rows does not split into {m} mini-batches of whole "
                       f"{unit}-row blocks")
    blocks = x.reshape((n // (m * unit), m, unit) + x.shape[1:])
    return jnp.swapaxes(blocks, 0, 1).reshape((m, n // m) + x.shape[1:])
  return jax.tree.map(split, batch)


def _accumulated_grad(params, graphdef, mb: RLBatch, cfg: StepConfig):
  """Loss, aux and gradient of `rl_loss` on one mini-batch, accumulated over micro-batches.

  Equal to `value_and_grad(rl_loss)` up to float rounding for every aggregation mode: each
  micro-batch differentiates its policy-loss `sum` divided by the mini-batch's count (counted
  from the masks up front; it does not depend on the parameters), and the entropy band, a hinge
  of per-task means, enters through `shaping.entropy_band_surrogate` given whole-mini-batch stats.
  Returns ((loss f32[], aux as in `rl_loss` with `pg` left as reductions), grads like params).
  """
  k = cfg.num_microbatches
  micro = _split_minibatches(mb, k)
  full_ent = cfg.entropy_enabled and cfg.entropy_estimator == "full_vocab"
  mask = mb.mask.astype(jnp.float32)
  pg_count = losses.aggregate(jnp.zeros_like(mask), mask, cfg.loss.aggregation,
                              cfg.loss.norm_len).count

  def entropy_of(params, ub):
    logp, ent = _response_logprobs(graphdef, params, ub, cfg.temperature, full_ent)
    return logp, (ent if ent is not None else shaping.sampled_token_nll(logp))

  if cfg.entropy_enabled:
    # The band needs each task's mean entropy over the WHOLE mini-batch before any micro-batch's
    # gradient: one extra forward pass over the mini-batch (no backward, ~1/3 of the update's
    # FLOPs, activations freed per micro-batch) that the unsplit update does not pay.
    def stats_of(acc, ub):
      _, ent = entropy_of(params, ub)
      s = shaping.entropy_stats(ent, ub.mask, ub.task_ids, cfg.num_tasks)
      return losses.accumulate(acc, s), None
    zeros = jnp.zeros((cfg.num_tasks,), jnp.float32)
    stats, _ = jax.lax.scan(stats_of, losses.SumCount(zeros, zeros), micro)
    stats = jax.lax.stop_gradient(stats)

  def micro_loss(p, ub):
    logp, ent = entropy_of(p, ub)
    pg, pg_metrics = losses.policy_loss(logp, ub.old_logprobs, ub.advantages, ub.mask,
                                        ref_logprobs=ub.ref_logprobs, config=cfg.loss)
    loss = losses.safe_div(pg.sum, pg_count)
    if cfg.entropy_enabled:
      loss = loss + shaping.entropy_band_surrogate(
          ent, ub.mask, ub.task_ids, stats, jnp.asarray(cfg.h_min), jnp.asarray(cfg.h_max),
          coef=cfg.entropy_lam)
    mine = shaping.entropy_stats(jax.lax.stop_gradient(ent), ub.mask, ub.task_ids, cfg.num_tasks)
    return loss, (pg_metrics, mine)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def one_micro(carry, ub):
    loss_acc, grad_acc = carry
    (loss, (pg_metrics, mine)), grads = grad_fn(params, ub)
    return (loss_acc + loss, jax.tree.map(jnp.add, grad_acc, grads)), (pg_metrics, mine)

  init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), (pg_stacked, mine_stacked) = jax.lax.scan(one_micro, init, micro)
  seen = _reduce_stacked(mine_stacked)   # equals `stats` when the band is on
  aux = dict(pg=_reduce_stacked(pg_stacked), entropy_penalty=shaping.band_penalty_from_stats(
                 seen, jnp.asarray(cfg.h_min), jnp.asarray(cfg.h_max), coef=cfg.entropy_lam),
             entropy_per_task=losses.safe_div(seen.sum, seen.count), tokens_per_task=seen.count)
  return (loss, aux), grads


def train_step(state: TrainState, batch: RLBatch, *, graphdef, tx, cfg: StepConfig,
               schedule: Callable) -> tuple[TrainState, dict]:
  """Several optimizer updates on the mini-batches of one rollout batch (pure; jit it).

  Each update whose loss or gradient norm is not finite is skipped (params and optimizer state
  unchanged) and counted; `nonfinite_streak` counts consecutive skips across steps.
  Returns the new state and metrics (means over the mini-batches; per-task arrays f32[K]).
  With `cfg.num_microbatches` > 1 each update's gradient is accumulated over strided
  micro-batches (`_accumulated_grad`): the same update and metrics, less activation memory.
  """
  minibatches = _split_minibatches(batch, cfg.num_minibatches, cfg.minibatch_unit)
  if cfg.num_microbatches == 1:
    grad_fn = lambda p, mb: jax.value_and_grad(rl_loss, has_aux=True)(p, graphdef, mb, cfg)
  else:
    grad_fn = lambda p, mb: _accumulated_grad(p, graphdef, mb, cfg)

  def one_update(carry, mb):
    params, opt_state, streak, total = carry
    (loss, aux), grads = grad_fn(params, mb)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    params = keep(new_params, params)
    opt_state = keep(new_opt, opt_state)
    streak = jnp.where(finite, 0, streak + 1)
    total = total + (~finite).astype(jnp.int32)
    out = dict(loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32),
               entropy_penalty=aux["entropy_penalty"], pg=aux["pg"],
               entropy_sum=aux["entropy_per_task"] * aux["tokens_per_task"],
               entropy_count=aux["tokens_per_task"])
    return (params, opt_state, streak, total), out

  carry = (state.params, state.opt_state, state.nonfinite_streak, state.nonfinite_total)
  (params, opt_state, streak, total), outs = jax.lax.scan(one_update, carry, minibatches)
  metrics = {f"loss/{k}": v for k, v in losses.finish(_reduce_stacked(outs["pg"])).items()}
  metrics.update({
      "loss/total": jnp.mean(outs["loss"]),
      "loss/entropy_penalty": jnp.mean(outs["entropy_penalty"]),
      "grad_norm": jnp.mean(outs["grad_norm"]),
      "skipped_updates": jnp.sum(outs["skipped"]),
      "lr": schedule(state.step * cfg.num_minibatches),
      # NaN for a task without response tokens in this batch (dropped from the metric line).
      "entropy_per_task": jnp.where(outs["entropy_count"].sum(0) > 0, losses.safe_div(
          outs["entropy_sum"].sum(0), outs["entropy_count"].sum(0)), jnp.nan),
  })
  new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                            nonfinite_streak=streak, nonfinite_total=total)
  return new_state, metrics


def _reduce_stacked(tree):
  """Reductions stacked over mini-batches (leading axis M) -> one reduction each (exact)."""
  def red(x):
    if isinstance(x, losses.SumCount):
      return losses.SumCount(jnp.sum(x.sum, 0), jnp.sum(x.count, 0))
    if isinstance(x, losses.Min):
      return losses.Min(jnp.min(x.value, 0))
    if isinstance(x, losses.Max):
      return losses.Max(jnp.max(x.value, 0))
    return jnp.mean(x, 0)
  return jax.tree.map(red, tree, is_leaf=lambda x: isinstance(
      x, (losses.SumCount, losses.Min, losses.Max)))


def task_grad_norms(params, batch: RLBatch, *, graphdef, cfg: StepConfig) -> Array:
  """‖∇L_τ‖ per task on the whole rollout batch (gradient equity, SPEC §7.2): f32[K]."""
  def loss_fn(p, b, weights):
    return rl_loss(p, graphdef, b, cfg, weights=weights)[0]
  return diagnostics.per_task_grad_norms(loss_fn, params, batch, batch.task_ids, cfg.num_tasks,
                                         mask=batch.mask.any(axis=-1))


def reference_logprobs(ref_params, prompt, tokens: Array, mask: Array, old_logprobs: Array, *,
                       graphdef, temperature: float, estimator: str,
                       log_ratio_clamp: float) -> tuple[Array, Array]:
  """log π_ref of the sampled tokens, f32[N, T], and the rollout policy's KL to π_ref, f32[].

  The KL is `estimator` (k1/k2/k3) between the rollout log-probs `old_logprobs: f32[N, T]` and
  π_ref, token-mean over `mask: bool[N, T]`: 0 before the first update, since π_old = π_ref.
  π_ref is taken at the loss's temperature so that the loss's KL is 0 at the same point.
  """
  ref = model_api.sequence_logprobs(graphdef, ref_params, prompt, tokens, mask,
                                    temperature=temperature)
  ref = jnp.where(mask, ref, 0.0)
  kl = losses.kl_penalty(old_logprobs, ref, estimator, log_ratio_clamp)
  return ref, losses.finish(losses.aggregate(kl, mask.astype(jnp.float32), "token_mean"))


def sft_loss(params, graphdef, prompt, tokens, mask):
  """Mean negative log-likelihood of demonstration tokens (the warm start's objective)."""
  logp = model_api.sequence_logprobs(graphdef, params, prompt, tokens, mask)
  m = mask.astype(jnp.float32)
  return -jnp.sum(logp * m) / jnp.maximum(jnp.sum(m), 1.0)


def sft_step(params, opt_state, prompt, tokens, mask, *, graphdef, tx):
  loss, grads = jax.value_and_grad(sft_loss)(params, graphdef, prompt, tokens, mask)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


# ------------------------------------------------------------------------------------------
# Mesh and shardings.

def make_mesh(mesh_cfg, devices: Sequence | None = None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh of `config.mesh` (one axis may be -1: the rest).

  Axes are `Auto` (sharding propagated by the compiler from the inputs' and params'
  shardings): the models index embeddings with row-sharded token ids, which explicit-axis
  meshes (`jax.make_mesh`'s default) reject without per-op output shardings.
  """
  mesh = sharding_lib.make_mesh(int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor),
                                devices=devices)
  auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def param_shardings(model_state, mesh):
  """NamedShardings (pure dict) for the model's variables from their logical axis metadata."""
  return sharding_lib.state_shardings(model_state, mesh).to_pure_dict()


def row_sharding(mesh, ndim: int) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(ROW_AXES, *([None] * (ndim - 1))))


def replicated(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def to_global(mesh, tree):
  """Host (process-local) numpy rows -> global arrays sharded by rows over (data, fsdp).

  Each process passes its own rows; the global batch is their concatenation in process order.
  Leaves whose row count does not split over the row axes are replicated instead (small
  prompt batches on many devices).
  """
  n_rows = mesh.shape["data"] * mesh.shape["fsdp"]
  def put(x):
    if x is None:
      return None
    x = np.asarray(x)
    if x.ndim >= 1 and (x.shape[0] * jax.process_count()) % n_rows == 0:
      return jax.make_array_from_process_local_data(row_sharding(mesh, x.ndim), x)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      x = multihost_utils.process_allgather(x, tiled=True)
    return jax.device_put(x, replicated(mesh))
  return jax.tree.map(put, tree)


def to_local(x) -> np.ndarray:
  """The rows of a global row-sharded array that belong to this process (all rows if 1 host)."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(x)
  shards = {}
  for s in x.addressable_shards:
    start = s.index[0].start or 0
    shards.setdefault(start, np.asarray(s.data))
  return np.concatenate([shards[k] for k in sorted(shards)], axis=0)


def all_hosts(x: np.ndarray) -> np.ndarray:
  """Concatenation over processes of a host array (identity on one host)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


# ------------------------------------------------------------------------------------------
# Prompts.

# The generated-task sampler lives with the other prompt streams; kept here under its old name.
PromptSampler = data_sources.PromptSampler


def _task_registry():
  from g2rpo_jax import tasks as tasks_lib
  return tasks_lib.TASKS


def get_tasks(config) -> list:
  registry = _task_registry()
  missing = [n for n in config.tasks.names if n not in registry]
  if missing:
    raise config_utils.ConfigError(
        f"config.tasks.names: unknown task(s) {missing}; available: {sorted(registry)}")
  unknown = sorted(set(config.tasks.get("difficulty", {})) - set(registry))
  if unknown:
    raise config_utils.ConfigError(
        f"config.tasks.difficulty: knobs given for unknown task(s) {unknown}; built-in tasks: "
        f"{sorted(registry)}")
  return [data_sources.builtin_task(config, n) for n in config.tasks.names]


# ------------------------------------------------------------------------------------------
# Rewards on host.

def score_responses(texts: Sequence[str], examples: Sequence, tasks_by_name: dict,
                    failures: dict) -> tuple[np.ndarray, np.ndarray]:
  """(accuracy f32[N], format f32[N]); a reward that raises or is not finite gives 0 and is
  counted in `failures[task]`."""
  acc = np.zeros(len(texts), np.float32)
  fmt = np.zeros(len(texts), np.float32)
  for i, (text, ex) in enumerate(zip(texts, examples)):
    task = tasks_by_name[ex.task]
    try:
      a = float(task.reward(text, ex))
      f = float(task.format_reward(text))
      if not (math.isfinite(a) and math.isfinite(f)):
        raise FloatingPointError(f"non-finite reward ({a}, {f})")
    except Exception as e:  # pylint: disable=broad-except
      failures[ex.task] = failures.get(ex.task, 0) + 1
      if failures[ex.task] <= 3:
        logging.warning("task %r: reward failed on a response (%s); scored 0", ex.task, e)
      a, f = 0.0, 0.0
    acc[i], fmt[i] = min(max(a, 0.0), 1.0), min(max(f, 0.0), 1.0)
  return acc, fmt


# ------------------------------------------------------------------------------------------
# Model construction.

def model_config(config) -> dict:
  """`config.model` as the model's own config mapping; `size` expands a tiny_vlm preset."""
  d = config.model.to_dict()
  size = d.pop("size", None)
  if size is not None and d.get("name") == "tiny_vlm":
    from g2rpo_jax.models import tiny_vlm
    base = dataclasses.asdict(tiny_vlm.tiny_vlm_config(size))
    base.update(d)
    return base
  return d


def _rollout_module():
  from g2rpo_jax import rollout
  return rollout


class _Signals:
  """SIGTERM / SIGINT set a flag; the loop finishes the step, saves and returns (exit 0)."""

  def __init__(self):
    self.received = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. inside a notebook worker)
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.received = signal.Signals(signum).name
    logging.warning("%s received: finishing this step, saving a checkpoint, exiting",
                    self.received)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    return False


# ------------------------------------------------------------------------------------------
# The job.


class _StageProgress:
  """A supervised stage's progress (the warm start, the vision pretraining): its bar, and its
  loss read from the device every tenth of the stage (a read syncs the host with the device),
  logged then and shown on the bar from the first read on."""

  def __init__(self, desc: str, steps: int, loss_label: str, headline_key: str, enabled: bool):
    self.desc, self.steps = desc, steps
    self.loss_label, self.headline_key = loss_label, headline_key
    self.loss = float("nan")
    self._done = 0
    self._headline = {}  # nothing until the first read, rather than a placeholder nan
    self._read_every = max(1, steps // 10)
    self._t0 = time.perf_counter()
    self._bar = metrics_lib.Progress(steps, enabled=enabled, desc=desc)

  def step(self, loss_arr) -> None:
    self._done += 1
    if self._done % self._read_every == 0 or self._done == self.steps:
      self.loss = float(loss_arr)
      self._headline = {self.headline_key: self.loss}
      logging.info("%s %d/%d: %s %.4f", self.desc, self._done, self.steps, self.loss_label,
                   self.loss)
    self._bar.update(1, **self._headline)

  def close(self) -> tuple[float, float]:
    """(seconds since the stage began, the last loss read)."""
    self._bar.close()
    return time.perf_counter() - self._t0, self.loss


class Trainer:
  """Holds the built pieces of one run (mesh, model, processor, jitted functions, sampler)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               devices: Sequence | None = None):
    config_utils.validate(config)
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.is_lead = jax.process_index() == 0
    self.num_processes = jax.process_count()
    os.makedirs(self.workdir, exist_ok=True)
    self.mesh = make_mesh(config.mesh, devices)
    # Built-in tasks (evaluated, warm-started) then user JSONL components (RL; evaluated on
    # their held-out files when `data.user.eval_paths` names them).
    self.tasks = get_tasks(config)
    self.user_components = data_sources.user_components(config)
    self.user_eval_tasks = data_sources.user_eval_tasks(config, self.user_components)
    self.eval_tasks = self.tasks + self.user_eval_tasks
    user_tasks = [comp.task for comp in self.user_components]
    self.task_names = config_utils.task_names(config)
    self.tasks_by_name = dict(zip(self.task_names, self.tasks + user_tasks))
    self.task_index = {n: i for i, n in enumerate(self.task_names)}
    from g2rpo_jax.tasks import rewards as rewards_lib
    self.pool_ids = rewards_lib.POOL_IDS

    g = config.rollout.group_size
    p = config.batch.prompts_per_step
    if p % self.num_processes:
      raise config_utils.ConfigError(
          f"config.batch.prompts_per_step = {p} must be a multiple of the {self.num_processes} "
          "processes (each host rolls out its own share of the prompts)")
    self.local_prompts = p // self.num_processes
    self.group_size = g

    mcfg = model_config(config)
    self.processor = model_api.build_processor(mcfg)
    self.tokenizer = self.processor.tokenizer
    data_sources.check_user_prompts(
        [comp.dataset for comp in self.user_components]
        + [t.dataset for t in self.user_eval_tasks], self.processor)
    # Initialise inside one jitted program, directly in the sharded layout: eager nnx init
    # dispatches (and compiles) every initializer op separately, which costs minutes on a
    # loaded CPU, and a large model would not fit unsharded on one device.
    abstract = nnx.eval_shape(lambda: model_api.build_model(mcfg, nnx.Rngs(config.seed)))
    self.graphdef, abstract_state = model_api.split_model(abstract)
    self.param_sharding = param_shardings(abstract_state, self.mesh)

    def init_params():
      model = model_api.build_model(mcfg, nnx.Rngs(config.seed))
      return model_api.split_model(model)[1].to_pure_dict()

    params = cached_jit(("init_params", self.graphdef, config.seed, self.mesh),
                        lambda: init_params, out_shardings=self.param_sharding)()
    self.num_params = int(sum(x.size for x in jax.tree.leaves(params)))
    # Non-vision parameters: the N of the older 6·N·T update FLOP count (`update_mfu_6nt`). The
    # MFU counts model FLOPs with `metrics.tiny_vlm_train_flops` (attention and vision included).
    self.num_matmul_params = int(sum(x.size for k, v in params.items() if k != "vision"
                                     for x in jax.tree.leaves(v)))
    self.tx, self.schedule = make_optimizer(config)
    self.cfg = step_config(config)
    self._init_params = params

    # Length-shaping thresholds per dense task id (SPEC §4).
    th = np.asarray([config_utils.length_window(config, t, self.tasks_by_name[t].role)
                     for t in self.task_names], np.float32)
    self.length_thresholds = th.T  # [4, K]

    estimator_opts = {}
    if config.advantage.name == "g2rpo":
      estimator_opts["mode"] = config.advantage.mode
    if config.advantage.name == "grpo":
      estimator_opts.update(std=config.advantage.std, eps=config.advantage.eps)
    from g2rpo_jax import advantages as adv_lib
    estimator = adv_lib.get_estimator(config.advantage.name, group_size=g, **estimator_opts)
    self._advantages = cached_jit(
        ("advantages", config.advantage.name, tuple(sorted(estimator_opts.items())), g),
        lambda: estimator)
    self._moments = cached_jit(("moments", len(self.task_names)), lambda: functools.partial(
        diagnostics.advantage_moments, num_tasks=len(self.task_names)))
    self._length_reward = cached_jit(("length_reward",), lambda: shaping.length_reward)
    # Everything the optimizer and schedule are built from (part of the compiled update).
    self.opt_key = (tuple(sorted(config.optimizer.to_dict().items())),)

    self.state_sharding = None  # set by init_state
    if config.data.source == "tfds":
      # One host prepares the datasets first; the others then find them (a shared data dir) or
      # build their own identical copy (a host-local one).
      if self.is_lead:
        data_sources.prepare(config, self.workdir)
      if self.num_processes > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("g2rpo_jax tfds datasets prepared")
    self.sampler = data_sources.rl_stream(
        config, self.workdir, self.local_prompts, process_index=jax.process_index(),
        process_count=self.num_processes, components=self.user_components)
    # The KL reference (frozen initial params), only when β > 0: see `set_reference`.
    self.ref_params = None
    self.failures: dict[str, int] = {}
    self._jit_cache: dict = {}

  # -- state -----------------------------------------------------------------------------

  def init_state(self, params) -> TrainState:
    key = jax.random.key_data(jax.random.fold_in(jax.random.key(self.config.seed), 1))
    rep = replicated(self.mesh)

    def make(params):
      return TrainState(params=params, opt_state=self.tx.init(params), step=jnp.int32(0),
                        rng=key, nonfinite_streak=jnp.int32(0), nonfinite_total=jnp.int32(0))

    abstract = jax.eval_shape(make, params)
    # Optimizer moments mirror the params' layout; scalars (counts, step, rng) are replicated.
    param_struct = jax.tree.structure(params)

    def shard_like(tree):
      if jax.tree.structure(tree) == param_struct:
        return self.param_sharding
      return jax.tree.map(lambda _: rep, tree)

    opt_shard = jax.tree.map(shard_like, abstract.opt_state,
                             is_leaf=lambda x: jax.tree.structure(x) == param_struct)
    self.state_sharding = TrainState(params=self.param_sharding, opt_state=opt_shard, step=rep,
                                     rng=rep, nonfinite_streak=rep, nonfinite_total=rep)
    key = ("init_state", self.graphdef, self.opt_key, self.config.seed,
           _hashable(self.state_sharding))
    return cached_jit(key, lambda: make, out_shardings=self.state_sharding)(params)

  def abstract_state(self) -> TrainState:
    abstract = jax.eval_shape(lambda p: self.init_state_shape(p), self._init_params)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, self.state_sharding)

  def init_state_shape(self, params) -> TrainState:
    return TrainState(params=params, opt_state=self.tx.init(params), step=jnp.int32(0),
                      rng=jnp.zeros((2,), jnp.uint32), nonfinite_streak=jnp.int32(0),
                      nonfinite_total=jnp.int32(0))

  # -- jitted functions (built once per shape) ---------------------------------------------

  def _jit(self, name, make_fn, *key, **kw):
    full_key = (name, self.graphdef, self.cfg, self.opt_key, self.mesh, *key)
    return cached_jit(full_key, make_fn, **kw)

  def _batch_shardings(self, batch):
    return jax.tree.map(lambda x: x.sharding, batch)

  def train_step_fn(self, batch):
    in_shardings = (self.state_sharding, self._batch_shardings(batch))
    return self._jit(
        "train_step",
        lambda: functools.partial(train_step, graphdef=self.graphdef, tx=self.tx, cfg=self.cfg,
                                  schedule=self.schedule),
        _hashable(in_shardings),
        in_shardings=in_shardings,
        out_shardings=(self.state_sharding, replicated(self.mesh)),
        donate_argnums=0)

  def ref_logprobs_fn(self, batch: RLBatch):
    rows = batch.old_logprobs.sharding
    in_shardings = (self.param_sharding, *self._batch_shardings(
        (batch.prompt, batch.tokens, batch.mask, batch.old_logprobs)))
    return self._jit("ref_logprobs", lambda: functools.partial(
        reference_logprobs, graphdef=self.graphdef, temperature=self.cfg.temperature,
        estimator=self.cfg.loss.kl_estimator, log_ratio_clamp=self.cfg.loss.log_ratio_clamp),
                     _hashable(in_shardings), in_shardings=in_shardings,
                     out_shardings=(rows, replicated(self.mesh)))

  def grad_norms_fn(self):
    return self._jit("grad_norms", lambda: functools.partial(
        task_grad_norms, graphdef=self.graphdef, cfg=self.cfg),
                     out_shardings=replicated(self.mesh))

  def generate(self, params, prompt, key, *, num_samples, temperature):
    """Rollout of `num_samples` responses per prompt -> host arrays of this process's rows."""
    r = self.config.rollout
    rollout = _rollout_module()
    greedy = temperature <= 0
    sampling = rollout.SamplingConfig(
        max_new_tokens=r.max_new_tokens, eos_id=self.tokenizer.eos_id,
        pad_id=self.tokenizer.pad_id, temperature=1.0 if greedy else float(temperature),
        top_k=0 if greedy else r.top_k, top_p=1.0 if greedy else r.top_p, greedy=greedy)
    out = rollout.generate(self.graphdef, params, prompt, key, num_samples=num_samples,
                           sampling=sampling)
    return {k: to_local(getattr(out, k)) for k in
            ("tokens", "logprobs", "mask", "lengths", "truncated")}

  def decode(self, tokens: np.ndarray) -> list[str]:
    return [self.tokenizer.decode(row.tolist()) for row in tokens]

  def encode_prompts(self, examples) -> Any:
    try:
      return self.processor([e.prompt for e in examples], [e.image for e in examples])
    except ValueError:
      # The processor names a batch row; find the example and say which it is (for user data,
      # the file and line), so the bad record can be fixed and the run resumed.
      for ex in examples:
        try:
          self.processor([ex.prompt], [ex.image])
        except ValueError as e:
          meta = ex.meta or {}
          where = (f"{meta['file']}, line {meta['line']}" if "file" in meta
                   else f"{ex.split} example {ex.index}")
          raise ValueError(f"task {ex.task!r} ({where}): {e}") from None
      raise

  # -- initial params and the KL reference ---------------------------------------------------

  def initial_params(self):
    """The params RL starts from: `init_checkpoint`, else the init after the vision tower's
    pretraining and the warm start (each when enabled).

    Deterministic and cached (each stage's params are saved in <workdir>/vision_pretrain and
    <workdir>/warm_start), so a resumed run re-derives the same params: that is how it restores
    the KL reference. A cached warm start is reused without pretraining the tower again.
    """
    c = self.config
    if c.init_checkpoint:
      return self.load_init_checkpoint(c.init_checkpoint)
    params = self._init_params
    if c.warm_start.enabled:
      cached = self._restore_stage("warm_start", {"params": params})
      if cached is not None:
        logging.info("warm start: reusing the cached params in %s/warm_start", self.workdir)
        return cached["params"]
    if c.vision_pretrain.enabled:
      params = self.pretrain_vision(params)
    if c.warm_start.enabled:
      params = self.warm_start(params)
    return params

  def _stage_checkpointer(self, stage: str) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(os.path.join(self.workdir, stage), keep=1,
                                      async_save=False)

  def _stage_optimizer(self, lr: float):
    """Grad-norm clip + AdamW at a constant `lr`: the optimizer of the stages before RL (the
    jitted steps' cache key already holds `config.optimizer`)."""
    o = self.config.optimizer
    return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                       optax.adamw(lr, weight_decay=o.weight_decay))

  def _restore_stage(self, stage: str, like):
    """The cached output of a stage (`like`'s structure) from <workdir>/<stage>, or None."""
    if not os.path.isdir(os.path.join(self.workdir, stage)):
      return None
    ckpt = self._stage_checkpointer(stage)
    try:
      if ckpt.latest_step() is None:
        return None
      restored, _, _ = ckpt.restore(checkpointing.abstract_like(like))
      return restored
    finally:
      ckpt.close()

  def set_reference(self, params) -> None:
    """Keeps a frozen copy of `params` (sharded like them) as π_ref iff loss.kl_coef > 0.

    A copy, not the same buffers: the train state, which starts from these params, is donated
    to every update. With β = 0 nothing is kept and no reference log-probs are computed.
    """
    if self.config.loss.kl_coef <= 0:
      self.ref_params = None
      return
    copy = self._jit("copy_params", lambda: lambda p: jax.tree.map(jnp.copy, p),
                     out_shardings=self.param_sharding)
    self.ref_params = copy(params)

  # -- warm start ----------------------------------------------------------------------------

  def _stage_progress(self, desc: str, steps: int, loss_label: str,
                      headline_key: str) -> "_StageProgress":
    return _StageProgress(desc, steps, loss_label, headline_key,
                          enabled=self.is_lead and self.config.train.progress_bar)

  def pretrain_vision(self, params):
    """The vision tower's pretraining (`vision_pretraining.py`), cached in
    <workdir>/vision_pretrain; returns `params` with a new "vision" subtree."""
    vp = self.config.vision_pretrain
    cached = self._restore_stage("vision_pretrain", {"vision": params["vision"]})
    if cached is not None:
      logging.info("vision pretraining: reusing the cached tower in %s/vision_pretrain",
                   self.workdir)
      return dict(params, vision=cached["vision"])
    width = self._check_image_features(params)
    vocab = self.tokenizer.vocab_size
    key = jax.random.fold_in(jax.random.key(self.config.seed), 3)
    head = self._jit("bag_head_init", lambda: functools.partial(
        vision_pretraining.init_head, width=width, vocab_size=vocab), width, vocab,
                     out_shardings=replicated(self.mesh))(key)
    trainable = {"vision": params["vision"], "head": head}
    tx = self._stage_optimizer(vp.lr)
    vp_key = (tuple(sorted(vp.to_dict().items())),)
    opt_state = self._jit("bag_init", lambda: tx.init, vp_key)(trainable)
    step = self._jit("bag_step", lambda: functools.partial(
        vision_pretraining.pretrain_step, graphdef=self.graphdef, tx=tx), vp_key,
                     donate_argnums=(0, 1))
    per_host = max(1, vp.batch_size // self.num_processes)
    sampler = data_sources.warm_start_stream(
        self.config, self.workdir, per_host, process_index=jax.process_index(),
        process_count=self.num_processes, stage="vision_pretrain")
    progress = self._stage_progress("vision pretraining", vp.steps, "bag loss", "loss")
    for _ in range(vp.steps):
      batch = to_global(self.mesh, self._bag_batch(sampler.next(per_host)))
      trainable, opt_state, loss_arr = step(trainable, opt_state, *batch, params=params)
      progress.step(loss_arr)
    seconds, loss = progress.close()
    f1 = self._heldout_bag_f1(trainable, params)
    logging.info("vision pretraining: %d steps in %.1fs, final bag loss %.4f, held-out bag F1 "
                 "%.3f", vp.steps, seconds, loss, f1)
    ckpt = self._stage_checkpointer("vision_pretrain")
    ckpt.save(0, {"vision": trainable["vision"]},
              {"steps": vp.steps, "final_loss": loss, "heldout_bag_f1": f1})
    ckpt.close()
    return dict(params, vision=trainable["vision"])

  def _check_image_features(self, params) -> int:
    """The width of the model's image features; a ConfigError when it has no tower to train."""
    model = model_api.merge_model(self.graphdef, params)
    try:
      shape = jax.eval_shape(model.image_features,
                             jax.ShapeDtypeStruct((1, *self._image_shape()), jnp.uint8))
    except NotImplementedError as e:
      raise config_utils.ConfigError(
          f"config.vision_pretrain.enabled = True: expected a model whose vision tower trains "
          f"from scratch (tiny_vlm), but {e}; set vision_pretrain.enabled=False") from None
    return int(shape.shape[-1])

  def _image_shape(self) -> tuple:
    example = self.tasks[0].example("train", 0)
    return tuple(self.encode_prompts([example]).vision["pixels"].shape[1:])

  def _bag_batch(self, examples) -> tuple[np.ndarray, np.ndarray]:
    """(pixels u8[B, H, W, 3] as the processor prepares them, token bags f32[B, V])."""
    pixels = np.asarray(self.encode_prompts(examples).vision["pixels"])
    return pixels, vision_pretraining.token_bag(self._demonstration_ids(examples),
                                                self.tokenizer.vocab_size)

  def _demonstration_ids(self, examples) -> list[list[int]]:
    """Each example's demonstration as token ids (no EOS): what the pre-RL stages learn from."""
    return [self.tokenizer.encode(self.tasks_by_name[e.task].demonstration(e)) for e in examples]

  def _heldout_bag_f1(self, trainable, params, per_task: int = 16) -> float:
    """Micro F1 of the bag head on the first `per_task` validation examples of each task."""
    examples = [t.example("validation", i) for t in self.tasks for i in range(per_task)]
    logits = self._jit("bag_logits", lambda: functools.partial(
        vision_pretraining.bag_logits, graphdef=self.graphdef))
    # Every host scores the same examples: the global batch repeats them, the F1 is the same.
    pixels, targets = to_global(self.mesh, self._bag_batch(examples))
    out = logits(trainable["vision"], trainable["head"], pixels, params=params)
    return float(vision_pretraining.bag_f1(out, targets))

  def warm_start(self, params):
    """Supervised steps on demonstrations (cached in <workdir>/warm_start); returns params."""
    ws = self.config.warm_start
    ckpt = self._stage_checkpointer("warm_start")
    tx = self._stage_optimizer(ws.lr)
    ws_key = (tuple(sorted(ws.to_dict().items())),)
    opt_state = self._jit("sft_init", lambda: tx.init, ws_key)(params)
    step = self._jit("sft_step", lambda: functools.partial(sft_step, graphdef=self.graphdef,
                                                           tx=tx), ws_key,
                     donate_argnums=(0, 1))
    per_host = max(1, ws.batch_size // self.num_processes)
    sampler = data_sources.warm_start_stream(
        self.config, self.workdir, per_host, process_index=jax.process_index(),
        process_count=self.num_processes)
    t_max = self.config.rollout.max_new_tokens
    progress = self._stage_progress("warm start", ws.steps, "nll", "nll")
    for _ in range(ws.steps):
      examples = sampler.next(per_host)
      pb = self.encode_prompts(examples)
      tokens = np.full((per_host, t_max), self.tokenizer.pad_id, np.int32)
      mask = np.zeros((per_host, t_max), bool)
      for j, ids in enumerate(self._demonstration_ids(examples)):
        ids = (ids + [self.tokenizer.eos_id])[:t_max]
        tokens[j, :len(ids)] = ids
        mask[j, :len(ids)] = True
      batch = to_global(self.mesh, (pb, tokens, mask))
      params, opt_state, loss_arr = step(params, opt_state, *batch)
      progress.step(loss_arr)
    seconds, loss = progress.close()
    logging.info("warm start: %d steps in %.1fs, final nll %.4f", ws.steps, seconds, loss)
    ckpt.save(0, {"params": params}, {"steps": ws.steps, "final_nll": loss})
    ckpt.close()
    return params

  def load_init_checkpoint(self, path: str):
    directory, step = checkpointing.find_checkpoint_dir(path)
    ckpt = checkpointing.Checkpointer(directory, async_save=False)
    abstract = checkpointing.abstract_like(self._init_params)
    try:
      restored, _, step = ckpt.restore({"params": abstract}, step)
    except Exception:  # a full training checkpoint: take its params
      restored, _, step = ckpt.restore(self.abstract_state_for_restore(), step)
      restored = {"params": restored.params}
    ckpt.close()
    logging.info("initial params from %s (step %s)", directory, step)
    return restored["params"]

  def abstract_state_for_restore(self):
    if self.state_sharding is None:
      self.init_state(self._init_params)
    return self.abstract_state()

  # -- evaluation ----------------------------------------------------------------------------

  def evaluate(self, params, split: str = "validation") -> dict[str, float]:
    from g2rpo_jax import evaluation
    c = self.config
    bs = c.eval.batch_size
    bs = max(bs // self.num_processes, 1)

    def respond(examples):
      n = len(examples)
      padded = list(examples) + [examples[-1]] * (bs - n)  # a fixed shape: one compile
      pb = to_global(self.mesh, self.encode_prompts(padded))
      key = jax.random.key(c.seed + 12345)
      out = self.generate(params, pb, key, num_samples=1, temperature=c.eval.temperature)
      return self.decode(out["tokens"][:n])

    return evaluation.evaluate(respond, self.eval_tasks, split=split,
                               num_examples=c.tasks.eval_size,
                               batch_size=bs, process_index=jax.process_index(),
                               process_count=self.num_processes,
                               gather=all_hosts if self.num_processes > 1 else None)

  # -- one RL step -------------------------------------------------------------------------

  def collect(self, params, step: int, key) -> tuple[RLBatch, dict, dict]:
    """Rollouts, rewards, dynamic filtering with refill rounds, advantages -> (batch, metrics).

    Returns the update batch (global arrays), deterministic metrics and timing.
    """
    c = self.config
    g, p = self.group_size, self.local_prompts
    k_tasks = len(self.task_names)
    timing = {"rollout_s": 0.0, "reward_s": 0.0}
    kept: list[dict] = []
    last_round = None
    seen = {n: [] for n in ("task", "acc", "fmt", "reward", "length", "truncated", "len_r")}
    group_stats = {"task": [], "zero_var": [], "filtered": []}
    rounds = 0
    for r in range(1 + c.filtering.max_rounds):
      rounds = r + 1
      examples = self.sampler.next(p)
      pb_local = self.encode_prompts(examples)
      pb = to_global(self.mesh, pb_local)
      t0 = time.perf_counter()
      out = self.generate(params, pb, jax.random.fold_in(key, r), num_samples=g,
                          temperature=c.rollout.temperature)
      timing["rollout_s"] += time.perf_counter() - t0
      t0 = time.perf_counter()
      rows = [ex for ex in examples for _ in range(g)]
      texts = self.decode(out["tokens"])
      acc, fmt = score_responses(texts, rows, self.tasks_by_name, self.failures)
      task = np.asarray([self.task_index[e.task] for e in rows], np.int32)
      lengths = out["lengths"].astype(np.float32)
      sh = c.shaping
      if sh.length.enabled:
        len_r = np.asarray(self._length_reward(lengths, task, *self.length_thresholds))
        w_len = sh.length.weight
      else:
        len_r, w_len = np.zeros_like(acc), 0.0
      reward = (1.0 - sh.format_weight - w_len) * acc + sh.format_weight * fmt + w_len * len_r
      acc_g = acc.reshape(p, g)
      mean_acc = acc_g.mean(1)
      if c.filtering.enabled:
        keep = (mean_acc > c.filtering.low) & (mean_acc < c.filtering.high)
      else:
        keep = np.ones(p, bool)
      rg = reward.reshape(p, g)
      group_stats["task"].append(task.reshape(p, g)[:, 0])
      group_stats["zero_var"].append(np.all(rg == rg[:, :1], axis=1))
      group_stats["filtered"].append(~keep)
      for name, v in (("task", task), ("acc", acc), ("fmt", fmt), ("reward", reward),
                      ("length", lengths), ("truncated", out["truncated"]), ("len_r", len_r)):
        seen[name].append(np.asarray(v))
      pool = np.asarray([self.pool_ids[e.reward_type] for e in rows], np.int32)
      round_data = dict(
          prompt_tokens=np.repeat(pb_local.tokens, g, 0), prompt_mask=np.repeat(pb_local.mask, g, 0),
          vision=jax.tree.map(lambda x: np.repeat(x, g, 0), pb_local.vision),
          tokens=out["tokens"], logprobs=out["logprobs"], mask=out["mask"], reward=reward,
          task=task, pool=pool)
      for i in np.flatnonzero(keep):
        kept.append(_rows(round_data, slice(i * g, (i + 1) * g)))
      last_round = (round_data, np.flatnonzero(~keep))
      timing["reward_s"] += time.perf_counter() - t0
      # Every host must run the same number of rounds (a rollout is a collective).
      if int(all_hosts(np.asarray([len(kept) >= p])).min()) == 1:
        break
    kept = kept[:p]
    num_real = len(kept)
    valid = np.zeros(p * g, bool)
    valid[:num_real * g] = True
    if num_real < p:  # pad with dropped groups of the last round, masked out of the update
      round_data, dropped = last_round
      filler = list(dropped) + list(range(p))
      for i in filler[:p - num_real]:
        kept.append(_rows(round_data, slice(i * g, (i + 1) * g)))
    data = {k: (jax.tree.map(lambda *xs: np.concatenate(xs, 0), *[d[k] for d in kept])
                if k == "vision" else np.concatenate([d[k] for d in kept], 0))
            for k in kept[0]}
    group_ids = (np.arange(p * g) // g + jax.process_index() * p).astype(np.int32)
    resp_mask = data["mask"] & valid[:, None]

    t0 = time.perf_counter()
    glob = to_global(self.mesh, dict(reward=data["reward"].astype(np.float32),
                                     group=group_ids, pool=data["pool"], valid=valid,
                                     task=data["task"]))
    adv = self._advantages(glob["reward"], glob["group"], glob["pool"], glob["valid"])
    moments = self._moments(adv, glob["task"], mask=glob["valid"])
    prompt = model_api.PromptBatch(tokens=data["prompt_tokens"], mask=data["prompt_mask"],
                                   vision=data["vision"])
    batch = RLBatch(prompt=to_global(self.mesh, prompt),
                    tokens=to_global(self.mesh, data["tokens"]),
                    mask=to_global(self.mesh, resp_mask),
                    old_logprobs=to_global(self.mesh, data["logprobs"].astype(np.float32)),
                    advantages=adv, task_ids=glob["task"])
    timing["advantage_s"] = time.perf_counter() - t0
    rollout_kl = None
    if self.ref_params is not None:
      t0 = time.perf_counter()
      ref, rollout_kl = self.ref_logprobs_fn(batch)(
          self.ref_params, batch.prompt, batch.tokens, batch.mask, batch.old_logprobs)
      batch = batch.replace(ref_logprobs=ref)
      rollout_kl = float(rollout_kl)
      timing["ref_logprob_s"] = time.perf_counter() - t0

    # Per-task statistics over every response sampled this step (all rounds, all hosts).
    cat = {k: all_hosts(np.concatenate(v)) for k, v in seen.items()}
    gs = {k: all_hosts(np.concatenate(v)) for k, v in group_stats.items()}
    t_ids = cat["task"]
    ones = np.ones_like(t_ids, bool)
    m = {}
    for name, key_ in (("reward", "reward"), ("accuracy", "acc"), ("format", "fmt"),
                       ("response_length", "length"), ("clipped_frac", "truncated"),
                       ("length_reward", "len_r")):
      m.update(metrics_lib.task_dict(name, self.task_names, metrics_lib.per_task_mean(
          cat[key_], t_ids, ones, k_tasks)))
    m.update(metrics_lib.task_dict("zero_var_frac", self.task_names, metrics_lib.per_task_mean(
        gs["zero_var"], gs["task"], np.ones_like(gs["task"], bool), k_tasks)))
    filtered = np.bincount(gs["task"][gs["filtered"]], minlength=k_tasks)
    for name, v in zip(self.task_names, filtered):
      m[f"filtered_groups/{name}"] = int(v)
    mom = jax.device_get(moments)
    present = mom["count"] > 0
    for stat in ("mean", "var", "skewness", "excess_kurtosis", "max_abs"):
      m.update(metrics_lib.task_dict(f"adv_{stat}", self.task_names,
                                     np.where(present, mom[stat], np.nan)))
    m["reward/all"] = float(np.mean(cat["reward"]))
    m["accuracy/all"] = float(np.mean(cat["acc"]))
    m["sampling_rounds"] = rounds
    if rollout_kl is not None:
      m["kl/rollout"] = rollout_kl
    m["valid_groups_frac"] = float(all_hosts(np.asarray([num_real])).sum() / (p * self.num_processes))
    m["response_tokens"] = int(all_hosts(resp_mask.sum(keepdims=True)).sum())
    m["sampled_tokens"] = int(np.sum(cat["length"]))
    fails = all_hosts(np.asarray([[self.failures.get(n, 0) for n in self.task_names]])).sum(0)
    for name, v in zip(self.task_names, fails):
      m[f"reward_failures/{name}"] = int(v)
    return batch, m, timing


def _rows(tree: dict, sl: slice) -> dict:
  return {k: (jax.tree.map(lambda x: x[sl], v) if k == "vision" else v[sl])
          for k, v in tree.items()}


# ------------------------------------------------------------------------------------------
# The loop.

# What a non-finite stop quotes from the last finite step.
_HEADLINE = ("loss", "grad_norm", "lr", "reward", "accuracy", "entropy", "response_length")


def _finite_floats(d: dict) -> dict:
  return {k: v for k, v in d.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _host_metrics(device_metrics: dict, task_names: Sequence[str]) -> dict:
  """Device metrics -> flat {name: float}; per-task arrays become name/task entries."""
  host = jax.device_get(device_metrics)
  out = {}
  for k, v in host.items():
    v = np.asarray(v)
    if k == "entropy_per_task":
      out.update(metrics_lib.task_dict("entropy", task_names, v))
    elif v.ndim == 0:
      out[k] = float(v)
  return out


def params_checksum(params) -> float:
  """Sum of |x| over this process's own copy of every parameter (replicas must agree)."""
  total = 0.0
  for x in jax.tree.leaves(params):
    seen = set()
    for shard in x.addressable_shards:
      key = str(shard.index)
      if key not in seen:
        seen.add(key)
        total += float(np.abs(np.asarray(shard.data, np.float64)).sum())
  return total


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: Sequence | None = None) -> dict:
  """The whole job. Returns a summary dict (also written to <workdir>/summary.json).

  Resumes from the latest checkpoint in `<workdir>/checkpoints` when there is one; a SIGTERM /
  SIGINT finishes the current step, saves and returns with summary["status"] == "preempted".
  `devices` (default: all) are the devices the mesh is built from.
  """
  trainer = Trainer(config, workdir, devices)
  c = config
  lead = trainer.is_lead
  if lead:
    with open(os.path.join(trainer.workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  ckpt = checkpointing.Checkpointer(os.path.join(trainer.workdir, "checkpoints"),
                                    keep=c.train.keep_checkpoints)
  latest = ckpt.latest_step()
  warm_scores = None
  if latest is not None:
    trainer.init_state(trainer._init_params)
    state, meta, latest = ckpt.restore(trainer.abstract_state())
    # The KL reference is not checkpointed: it is re-derived (init checkpoint / cached warm
    # start / seeded init), exactly the params this run started RL from.
    if c.loss.kl_coef > 0:
      trainer.set_reference(trainer.initial_params())
    trainer.sampler.set_state(meta["sampler"])
    trainer.failures = dict(meta.get("failures", {}))
    warm_scores = meta.get("warm_start_scores")
    logging.info("resumed from %s at step %d", ckpt.directory, latest)
  else:
    t0 = time.perf_counter()
    params = trainer.initial_params()
    trainer.set_reference(params)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm_scores = trainer.evaluate(params)
    eval_s = time.perf_counter() - t0
    if lead:
      from g2rpo_jax import evaluation
      evaluation.write_json(os.path.join(trainer.workdir, "eval_warm_start.json"), warm_scores)
      logging.info("warm-start held-out scores: %s", json.dumps(evaluation.scores(warm_scores)))
    state = trainer.init_state(params)
    del params
  start = int(jax.device_get(state.step))
  writer = metrics_lib.MetricWriter(trainer.workdir, resume_step=latest, enabled=lead)
  if latest is None and lead:
    writer.write_perf(0, {"time/warm_start_s": warm_s, "time/eval_s": eval_s})
    writer.write(0, {f"eval/{k}": v["score"] for k, v in warm_scores.items()})

  peak = None
  status = "done"
  total = c.train.num_steps
  bar = metrics_lib.Progress(total, initial=start, enabled=lead and c.train.progress_bar)
  last_finite: dict = {}
  after_scores = None

  def save(step_done):
    meta = {"sampler": trainer.sampler.get_state(), "failures": trainer.failures,
            "warm_start_scores": warm_scores, "metric_step": step_done}
    ckpt.save(step_done, state, meta)

  with _Signals() as signals:
    for step in range(start, total):
      t_step = time.perf_counter()
      key = jax.random.fold_in(jax.random.wrap_key_data(jax.device_get(state.rng)), step)
      batch, m, timing = trainer.collect(state.params, step, key)
      grad_norms = None
      if c.train.grad_norm_every and step % c.train.grad_norm_every == 0:
        grad_norms = jax.block_until_ready(trainer.grad_norms_fn()(state.params, batch))
      t0 = time.perf_counter()
      state, dm = trainer.train_step_fn(batch)(state, batch)
      dm = _host_metrics(dm, trainer.task_names)
      timing["update_s"] = time.perf_counter() - t0
      m.update(dm)
      if grad_norms is not None:
        m.update(metrics_lib.task_dict("grad_norm", trainer.task_names,
                                       np.asarray(jax.device_get(grad_norms))))
      streak = int(jax.device_get(state.nonfinite_streak))
      m["nonfinite_updates_total"] = int(jax.device_get(state.nonfinite_total))
      done = step + 1
      if c.train.eval_every and (done % c.train.eval_every == 0 or done == total):
        t0 = time.perf_counter()
        result = trainer.evaluate(state.params)
        timing["eval_s"] = time.perf_counter() - t0
        m.update({f"eval/{k}": v["score"] for k, v in result.items()})
        m["eval/mean"] = float(np.mean([v["score"] for v in result.values()]))
        if done == total:
          after_scores = result
      if done % c.train.log_every == 0 or done == total:
        writer.write(done, m)
      timing["step_s"] = time.perf_counter() - t_step
      if peak is None:
        peak = _matmul_peak()
      # The update runs forward + backward over every row's full (prompt + response) sequence,
      # the output head over the response positions, the vision tower over each row's image.
      n_rows, resp = batch.tokens.shape
      seq = resp + batch.prompt.tokens.shape[1]
      flops_6nt = metrics_lib.transformer_train_flops(trainer.num_matmul_params, n_rows * seq)
      flops = flops_6nt  # models without a FLOP formula in metrics (qwen25vl): the 6·N·T count
      if c.model.name == "tiny_vlm":
        flops = metrics_lib.tiny_vlm_train_flops(
            model_config(c), rows=n_rows, seq=seq, logit_positions=n_rows * resp,
            images=n_rows)["total"]
      timing["sampled_tokens_per_s"] = m["sampled_tokens"] / max(timing["step_s"], 1e-9)
      timing["update_mfu_vs_matmul"] = metrics_lib.mfu(flops, timing["update_s"], peak)
      timing["update_mfu_6nt"] = metrics_lib.mfu(flops_6nt, timing["update_s"], peak)
      writer.write_perf(done, {f"time/{k}": v for k, v in timing.items()})
      bar.update(1, reward=m.get("reward/all", float("nan")), acc=m.get("accuracy/all"),
                 loss=m.get("loss/total", float("nan")))
      if streak == 0:
        last_finite = {"step": done, **_finite_floats(m)}
      elif streak >= c.train.max_nonfinite:
        tasks_in = sorted({trainer.task_names[i] for i in np.asarray(
            all_hosts(np.asarray(jax.device_get(batch.task_ids))))})
        ckpt.wait()
        writer.close()
        headline = {k: v for k, v in sorted(last_finite.items())
                    if k.split("/")[0] in _HEADLINE or k in _HEADLINE}
        raise NonFiniteError(
            f"step {done}: {streak} non-finite updates in a row (train.max_nonfinite = "
            f"{c.train.max_nonfinite}); tasks in the batch: {tasks_in}; last finite metrics "
            f"(step {last_finite.get('step', 'none')}): {json.dumps(headline)}")
      if done % c.train.checkpoint_every == 0 or done == total or signals.received:
        save(done)
      if c.debug.sigkill_after_step == done:
        ckpt.wait()
        writer.flush()
        os.kill(os.getpid(), signal.SIGKILL)
      if signals.received:
        status = "preempted"
        break
  bar.close()
  ckpt.close()
  writer.close()
  summary = {"status": status, "step": int(jax.device_get(state.step)),
             "warm_start": warm_scores, "after_rl": after_scores,
             "params_checksum": params_checksum(state.params)}
  if status == "done":
    if after_scores is None:
      after_scores = trainer.evaluate(state.params)
      summary["after_rl"] = after_scores
    if lead:
      _final_report(trainer, warm_scores, after_scores, summary)
  if trainer.num_processes > 1:
    # Hosts leave together: the lead's report (plots, JSON) must not race the others' exit
    # and the coordination service's shutdown barrier.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("g2rpo_jax train_and_evaluate done")
  trainer.final_state = state
  return summary


_PEAK: list = []


def _matmul_peak() -> float:
  """This machine's jitted f32 matmul FLOP/s (the MFU denominator), measured once."""
  if _PEAK:
    return _PEAK[0]
  _PEAK.append(_measure_matmul())
  return _PEAK[0]


def _measure_matmul() -> float:
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / float(np.median(times))


def _final_report(trainer: Trainer, warm: dict | None, after: dict, summary: dict) -> None:
  from g2rpo_jax import evaluation
  before = evaluation.scores(warm) if warm else None
  table = metrics_lib.summary_table(before, evaluation.scores(after))
  print("\nHeld-out per-task score (points, 0-100):\n" + table, flush=True)
  with open(os.path.join(trainer.workdir, "summary.txt"), "w") as f:
    f.write(table + "\n")
  evaluation.write_json(os.path.join(trainer.workdir, "eval_final.json"), after)
  evaluation.write_json(os.path.join(trainer.workdir, "summary.json"), summary)
  if trainer.config.train.plots:
    records = metrics_lib.read_jsonl(os.path.join(trainer.workdir, "metrics.jsonl"))
    metrics_lib.plot_per_task(records, trainer.task_names,
                              os.path.join(trainer.workdir, "plots"))
