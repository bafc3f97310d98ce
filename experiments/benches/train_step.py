"""One full RL step of the default job (`configs/mix.py`), stage by stage, and the update's MFU.

Fields: `rollout_s` (one sampling round: prefill + decode of prompts × G), `logprob_s` (one
teacher-forced log-prob pass over the rollout batch: what recomputing old or reference log-probs
costs), `update_s` (the jitted `train_step`: all mini-batch forward + backward + AdamW steps),
`step_s` (a whole `collect` + update, host work included), and `update_mfu_vs_matmul`: the
update's model FLOPs (6 · matmul params · rows · (prompt + response) positions) per second over
the jitted f32 matmul throughput measured in the same run. Medians of `--repeats` (default 3).
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

    step = tr.train_step_fn(batch)
    state, _ = step(state, batch)  # compile
    jax.block_until_ready(state)
    update_times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready((state, m))
      update_times.append(time.perf_counter() - t0)
    update_s = statistics.median(update_times)

    t0 = time.perf_counter()
    b2, _, _ = tr.collect(state.params, 1, key)
    state, m = step(state, b2)
    jax.block_until_ready(state)
    step_s = time.perf_counter() - t0

    gflops = _timing.matmul_gflops(repeats=repeats * 3)
    rows = batch.tokens.shape[0]
    seq = batch.tokens.shape[1] + batch.prompt.tokens.shape[1]
    flops = metrics.transformer_train_flops(tr.num_matmul_params, rows * seq)
    yield {
        "model": f"{config.model.name}/{config.model.size}",
        "params": tr.num_params,
        "rows": rows,
        "seq": seq,
        "rollout_s": rollout_s,
        "logprob_s": logprob_s,
        "update_s": update_s,
        "step_s": step_s,
        "matmul_gflops": gflops,
        "update_gflops": flops / update_s / 1e9,
        "update_mfu_vs_matmul": flops / update_s / (gflops * 1e9),
    }
