"""One full RL step of the default job (`configs/mix.py`), stage by stage, and the update's MFU.

Fields: `rollout_s` (one sampling round: prefill + decode of prompts × G), `logprob_s` (one
teacher-forced log-prob pass over the rollout batch: what recomputing old or reference log-probs
costs), `update_s` (the jitted `train_step`: all mini-batch forward + backward + AdamW steps),
`step_s` (a whole `collect` + update, host work included).

MFU: `model_gflop` is the update's model FLOPs by the standard definition
(`metrics.tiny_vlm_train_flops`: 6 per weight per token for the decoder's matmuls, 12·L·H·D·T
per token for attention scores and values over the full T², the output head over the response
positions, the vision tower over every row's image patches), summed over the mini-batches;
`gflop_6nt` is the older 6 · (non-vision params) · rows · (prompt + response) count. A jitted
2048² f32 matmul is probed right before every timed update (the machine is shared and its load
drifts within a run): `update_mfu_vs_matmul` is the median over updates of
model FLOP/s / that update's probe, `update_mfu_6nt` the same with the 6·N·T count,
`matmul_gflops` the median probe and `matmul_gflops_spread` = max / min probe. Medians of
`--repeats` (default 3).
"""
from __future__ import annotations

import statistics
import tempfile
import time

NAME = "train_step"
HELP = "stage times of one RL step of configs/mix.py and the update's MFU vs matmul"


def run(args):
  import jax
  from experiments.benches import _timing
  from experiments.benches.rl_step import MatmulProbe
  from g2rpo_jax import config_utils, metrics, trainer as trainer_lib
  from g2rpo_jax.models import interface as model_api

  repeats = args.repeats or 3
  config = config_utils.load_config("mix")
  with tempfile.TemporaryDirectory() as wd:
    tr = trainer_lib.Trainer(config, wd)
    state = tr.init_state(tr._init_params)
    key = jax.random.key(0)

    def collect():
      return tr.collect(state.params, 0, key)

    batch, _, _ = collect()  # compiles rollout + advantages
    per_round = []
    for _ in range(repeats):
      _, m, t = collect()
      per_round.append(t["rollout_s"] / m["sampling_rounds"])
    rollout_s = statistics.median(per_round)

    logprob = jax.jit(lambda p, b: model_api.sequence_logprobs(
        tr.graphdef, p, b.prompt, b.tokens, b.mask, temperature=config.rollout.temperature))
    logprob_s = _timing.median_time(lambda: logprob(state.params, batch), repeats=repeats,
                                    warmup=1)

    probe = MatmulProbe()
    rows = batch.tokens.shape[0]
    resp = batch.tokens.shape[1]
    seq = resp + batch.prompt.tokens.shape[1]
    flops = metrics.tiny_vlm_train_flops(
        trainer_lib.model_config(config), rows=rows, seq=seq, logit_positions=rows * resp,
        images=rows)
    flops_6nt = metrics.transformer_train_flops(tr.num_matmul_params, rows * seq)

    step = tr.train_step_fn(batch)
    state, _ = step(state, batch)  # compile
    jax.block_until_ready(state)
    update_times, probes = [], []
    for _ in range(repeats):
      probes.append(probe())
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready((state, m))
      update_times.append(time.perf_counter() - t0)
    update_s = statistics.median(update_times)
    paired = lambda f: statistics.median(
        f / t / (g * 1e9) for t, g in zip(update_times, probes))

    t0 = time.perf_counter()
    b2, _, _ = tr.collect(state.params, 1, key)
    state, m = step(state, b2)
    jax.block_until_ready(state)
    step_s = time.perf_counter() - t0

    yield {
        "model": f"{config.model.name}/{config.model.size}",
        "params": tr.num_params,
        "rows": rows,
        "seq": seq,
        "rollout_s": rollout_s,
        "logprob_s": logprob_s,
        "update_s": update_s,
        "step_s": step_s,
        "matmul_gflops": statistics.median(probes),
        "matmul_gflops_spread": max(probes) / min(probes),
        "model_gflop": flops["total"] / 1e9,
        "attention_gflop": flops["attention"] / 1e9,
        "vision_gflop": flops["vision"] / 1e9,
        "cross_gflop": flops["cross"] / 1e9,
        "gflop_6nt": flops_6nt / 1e9,
        "update_gflops": flops["total"] / update_s / 1e9,
        "update_mfu_vs_matmul": paired(flops["total"]),
        "update_mfu_6nt": paired(flops_6nt),
    }
