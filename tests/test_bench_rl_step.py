"""Smoke test of the RL-step bench: its code path on a tiny workload, its fields and floors.

No timing assertions: the floors are checked against hand-computed parameter counts and the
issue's formula, the slope helper against exact power laws.
"""
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.benches import rl_step
from g2rpo_jax.models import interface
from g2rpo_jax.models import tiny_vlm

# nano, text-only: vocab 106, width 64, MLP 128, 2 layers, 4 heads x 16, 2 KV heads, untied.
#   embed 106*64 = 6784; per layer wq 4096 + wk 2048 + wv 2048 + wo 4096 + MLP 3*64*128 = 24576
#   + 2 norms 128 = 36992, x2 = 73984; final norm 64; head 64*106 = 6784.
NANO_TEXT_PARAMS = 6784 + 73984 + 64 + 6784
# peer: embed 2048*256 = 524288; per layer attention 4*256*256 = 262144 + MLP 3*256*1024 =
#   786432 + norms 512 = 1049088, x4 = 4196352; final norm 256; head 256*2048 = 524288.
PEER_PARAMS = 524288 + 4196352 + 256 + 524288

TINY = rl_step.Workload(model="nano", prompts=2, prompt_len=8, group=4, new_tokens=4,
                        model_overrides=(("vision", False),))


def test_standard_workload_is_the_issue_one():
  w = rl_step.STANDARD
  assert (w.prompts, w.prompt_len, w.group, w.new_tokens, w.rows) == (16, 32, 8, 64, 128)
  c = w.model_config()
  assert (c.vision, c.vocab_size, c.width, c.mlp_dim, c.num_layers, c.num_heads,
          c.num_kv_heads, c.head_dim, c.tie_embeddings, c.dtype) == (
              False, 2048, 256, 1024, 4, 4, 4, 64, False, "float32")
  abstract = nnx.eval_shape(lambda: interface.build_model(c, nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
  assert n == PEER_PARAMS


def test_floors_follow_the_issue_formula():
  f = rl_step.flop_floors(PEER_PARAMS, rl_step.STANDARD, 50e9)
  assert f["flop_floor_s"] == pytest.approx(8 * PEER_PARAMS * 128 * 96 / 50e9)
  assert f["update_floor_s"] == pytest.approx(6 * PEER_PARAMS * 128 * 96 / 50e9)
  # Prefill once per prompt (16 x 32) + 63 fed-back tokens per row.
  assert f["rollout_floor_s"] == pytest.approx(2 * PEER_PARAMS * (16 * 32 + 128 * 63) / 50e9)


def test_loglog_slope():
  xs = [4, 8, 16]
  assert rl_step.loglog_slope(xs, [3.0 * x for x in xs]) == pytest.approx(1.0)
  assert rl_step.loglog_slope(xs, [0.5 * x * x for x in xs]) == pytest.approx(2.0)
  assert rl_step.loglog_slope(xs, [7.0, 7.0, 7.0]) == pytest.approx(0.0)
  with pytest.raises(ValueError, match="two distinct"):
    rl_step.loglog_slope([8, 8], [1.0, 2.0])


def test_vision_tower_is_refused():
  w = rl_step.Workload(model="nano", prompts=1, prompt_len=8, group=2, new_tokens=2)
  with pytest.raises(ValueError, match="vision tower"):
    rl_step.RLStep(w)


def test_measure_runs_the_step_and_reports_every_field():
  gflops = 10.0
  probes = []
  # The probe stands in for the per-step matmul measurement: the floors must use its value.
  row = rl_step.measure(TINY, repeats=1, probe=lambda: probes.append(1) or gflops)
  assert len(probes) == 1
  assert row["matmul_gflops"] == gflops and row["matmul_gflops_spread"] == 1.0
  json.dumps(row)  # the harness prints rows as JSON
  for k in ("step_s", "rollout_s", "update_s", "completion_tokens_per_s", "matmul_gflops",
            "flop_floor_s", "step_over_flop_floor", "peak_rss_gb", "rollout_floor_s",
            "update_floor_s", "rollout_over_floor", "update_over_floor"):
    assert math.isfinite(row[k]) and row[k] > 0, (k, row[k])
  assert row["n_params"] == NANO_TEXT_PARAMS
  assert row["flop_floor_s"] == pytest.approx(8 * NANO_TEXT_PARAMS * 8 * 12 / (gflops * 1e9))
  assert row["step_over_flop_floor"] == pytest.approx(row["step_s"] / row["flop_floor_s"])
  assert row["completion_tokens_per_s"] == pytest.approx(8 * 4 / row["step_s"])
  assert row["step_s"] >= row["rollout_s"] + row["update_s"]
  assert math.isfinite(row["loss"])


def test_update_changes_params_and_all_rows_run_full_length():
  rl = rl_step.RLStep(TINY)
  before = jax.tree.map(np.array, rl.state.params)  # copies: the update donates
  t = rl.step(0)
  assert t["response_tokens"] == TINY.rows * TINY.new_tokens
  after = jax.tree.map(np.asarray, rl.state.params)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after))
  assert any(changed)
  assert int(rl.state.step) == 1
  # Steady state: a second step (new key, new params) compiles nothing new.
  from g2rpo_jax import rollout
  sizes = (rollout.generate._cache_size(), rl.step_fn._cache_size())
  rl.step(1)
  assert (rollout.generate._cache_size(), rl.step_fn._cache_size()) == sizes
  assert int(rl.state.step) == 2
