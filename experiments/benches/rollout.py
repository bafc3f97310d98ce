"""Rollout bench: decode speed, flat per-step cost, KV-cache speed-up, prefill shared by the group.

Workload: the default tiny_vlm (host-initialised random parameters), 16 prompts (one image each,
16 image tokens + text, left-padded to P = 64) x G = 8 samples, 64 new tokens, temperature 1,
every row runs all 64 steps (no early EOS).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benches import _timing
from g2rpo_jax import models as M
from g2rpo_jax import rollout as R
from g2rpo_jax.models import testing

NAME = "rollout"
HELP = ("default tiny_vlm, 16 prompts x 8 samples x 64 new tokens: decode_tokens_per_s; "
        "late_over_early_step_cost (16 decode steps at the end of the cache over 16 at the start; "
        "<= 1.5); cache_speedup_64 (64 new tokens without a cache, i.e. recomputing the whole "
        "fixed-length sequence each step, over with the cache; measured on 1 prompt x 8 samples "
        "to keep the no-cache run short; >= 5); prefill_saved_frac (1 - prefill of 16 prompts / "
        "prefill of 128 rows) and prefill_saved_of_rollout (the saved time over the rollout time)")

B, G, T = 16, 8, 64


def _batch(cfg, b, seed=0):
  rng = np.random.default_rng(seed)
  proc = M.build_processor(cfg)
  prompts = [f"Q{i}: how many shapes in <image>? Answer." for i in range(b)]
  imgs = [rng.integers(0, 256, (cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
          for _ in range(b)]
  return jax.tree.map(jnp.asarray, proc(prompts, imgs))


@functools.partial(jax.jit, static_argnames=("num_samples", "t"))
def _generate_no_cache(graphdef, params, prompt, key, *, num_samples, t):
  """The same sampling without a KV cache: every step re-runs the whole fixed-length
  prompt + response buffer (fixed shapes, so it compiles once) and reads one position."""
  model = M.merge_model(graphdef, params)
  prompt = M.repeat_rows(prompt, num_samples)
  n, p = prompt.tokens.shape

  def step(i, toks):
    h = model.hidden_states(prompt, toks)
    logits = model.logits(jax.lax.dynamic_index_in_dim(h, p - 1 + i, axis=1, keepdims=False))
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(key, i), jnp.arange(n))
    tok = jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
    return jax.lax.dynamic_update_slice(toks, tok[:, None], (0, i))

  return jax.lax.fori_loop(0, t, step, jnp.zeros((n, t), jnp.int32))


@functools.partial(jax.jit, static_argnames=("steps",))
def _decode_steps(graphdef, params, cache, tok, *, steps):
  model = M.merge_model(graphdef, params)

  def body(_, carry):
    tok, cache = carry
    logits, cache = model.decode(tok, cache)
    return jnp.argmax(logits, -1).astype(jnp.int32), cache

  return jax.lax.fori_loop(0, steps, body, (tok, cache))


def run(args):
  repeats = args.repeats or 5
  cfg = M.tiny_vlm_config()
  graphdef, params = testing.host_init(cfg)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  pb = _batch(cfg, B)
  p = pb.tokens.shape[1]
  sampling = R.SamplingConfig(max_new_tokens=T, eos_id=-1, temperature=1.0, stop_early=False)
  key = jax.random.key(0)

  gen = lambda: R.generate(graphdef, params, pb, key, num_samples=G, sampling=sampling)
  t_gen = _timing.median_time(gen, repeats=repeats, warmup=1)

  # Per-step cost early vs late in the cache: 16 steps starting at slot P vs at slot P + T - 16.
  prefill = jax.jit(lambda pr, pb: M.merge_model(graphdef, pr).prefill(pb, p + T - 1))
  _, cache = prefill(params, pb)
  cache = M.repeat_rows(cache, G)
  tok = jnp.zeros((B * G,), jnp.int32)
  late = cache.replace(
      index=cache.index + (T - 16), next_pos=cache.next_pos + (T - 16),
      valid=cache.valid.at[:, p:p + T - 16].set(True))
  late_over_early, t_late, t_early = _timing.interleaved_ratio(
      lambda: _decode_steps(graphdef, params, late, tok, steps=16),
      lambda: _decode_steps(graphdef, params, cache, tok, steps=16), repeats=repeats * 2)

  # Prefill once per prompt (what generate does) vs once per sample.
  pb_rep = M.repeat_rows(pb, G)
  t_pre_shared = _timing.median_time(lambda: prefill(params, pb), repeats=repeats)
  t_pre_rep = _timing.median_time(lambda: prefill(params, pb_rep), repeats=repeats)

  # KV cache vs no cache, 64 new tokens, 1 prompt x 8 samples.
  pb1 = jax.tree.map(lambda x: x[:1], pb)
  t_cache1 = _timing.median_time(
      lambda: R.generate(graphdef, params, pb1, key, num_samples=G, sampling=sampling),
      repeats=repeats, warmup=1)
  t_nocache1 = _timing.median_time(
      lambda: _generate_no_cache(graphdef, params, pb1, key, num_samples=G, t=T),
      repeats=max(1, repeats // 3), warmup=1)

  yield {
      "params_m": round(n_params / 1e6, 3), "batch": B, "group": G, "prompt_len": p,
      "new_tokens": T,
      "rollout_s": t_gen,
      "decode_tokens_per_s": B * G * T / t_gen,
      "late_over_early_step_cost": late_over_early,
      "step_ms_early": 1e3 * t_early / 16, "step_ms_late": 1e3 * t_late / 16,
      "cache_speedup_64": t_nocache1 / t_cache1,
      "prefill_shared_s": t_pre_shared, "prefill_per_sample_s": t_pre_rep,
      "prefill_saved_frac": 1.0 - t_pre_shared / t_pre_rep,
      "prefill_saved_of_rollout": (t_pre_rep - t_pre_shared) / t_gen,
  }
