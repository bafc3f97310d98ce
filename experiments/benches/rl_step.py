"""RL-step bench: one full G²RPO step on the standard peer workload, against its FLOP floor.

The standard workload (issue 7; keep it fixed so figures stay comparable with TRL / tunix runs
on this machine): tiny_vlm size "peer", the text-only decoder of the family (no vision tower:
vocab 2048, width 256, MLP 1024, 4 layers, 4 heads, 4 KV heads, head dim 64, untied head, f32,
random host init, 5,245,184 params); 16 prompts of exactly 32 tokens × G = 8 = 128 completions
of exactly 64 new tokens (EOS id = vocab size, which sampling can never produce, and
`stop_early=False`); temperature 1; β = 0; one AdamW step per rollout batch; a trivial reward.

One RL step, every stage the library's own jitted code, blocked on between stages:
  rollout     `rollout.generate` (shared prefill per prompt, KV-cache decode under while_loop)
  reward      a trivial on-device reward (fraction of even token ids) of the sampled tokens
  advantages  `advantages.get_estimator("g2rpo", mode="group_then_task")`, pool = one task
  update      `trainer.train_step` (the trainer's own pure update) built as
              `Trainer.train_step_fn` builds it: `make_optimizer` (clip 1.0 + AdamW),
              `step_config` of `configs/mix.py` with `num_minibatches = 1` and the entropy band
              on (sampled-token NLL estimator, the default), params donated. The old log-probs
              are the rollout's (one optimizer step per rollout: they equal the current ones),
              so there is no separate old-log-prob pass.

FLOP floors (matmul FLOPs only; attention scores, softmax, norms, sampling and the optimizer's
elementwise work are ignored; N = all decoder params incl. the embedding table):
  flop_floor_s      = 8 · N · rows · (P + T) / matmul_flops     (the issue's definition: 2N per
                      token for the rollout's forwards + 6N per token for the update's fwd + bwd)
  rollout_floor_s   = 2 · N · (B·P + rows·(T − 1)) / matmul_flops   the tokens the rollout really
                      runs: each prompt once (prefill is shared by the group) and T − 1 decode
                      steps per row (the last sampled token is never fed back)
  update_floor_s    = 6 · N · rows · (P + T) / matmul_flops
`matmul_gflops` is a jitted 2048² f32 matmul probed right before every timed step (the median
of the probes is reported, `matmul_gflops_spread` = max / min probe); on this shared machine the
load drifts within a run, so each `*_over_*floor` ratio is the median over steps of (stage time
/ floor at that step's own probe). `step_s`, `rollout_s`, ... are medians over `--repeats`
(default 5) steady-state steps after one compile step (`first_step_s`).

After the standard row come the same workload with `batch.num_microbatches` = 4 and 16 (the
update accumulates its gradient over micro-batches with `lax.scan`; the optimizer step is the
same); each row carries `num_microbatches`, compare their `update_over_floor`.

`--sweep` times G ∈ {4, 8, 16} (T = 64) and T ∈ {32, 64, 128} (G = 8) and reports the log-log
slope of the median step time against each (least squares on log-medians).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import resource
import statistics
import time

NAME = "rl_step"
HELP = ("one G²RPO step (rollout + reward + advantages + trainer.train_step update) on the "
        "standard peer workload (tiny_vlm 'peer' text decoder, 5.2M params, 16 prompts x 32 "
        "tokens x G=8, 64 new tokens, T=1, beta=0, one AdamW step); flop_floor_s = 8 * n_params "
        "* 128 * 96 / matmul_flops (2N/token rollout forwards + 6N/token update fwd+bwd; "
        "attention and non-matmul work ignored); also rollout_floor_s = 2N*(16*32 + 128*63) / "
        "matmul_flops (shared prefill + decode steps actually run) and update_floor_s = "
        "6N*128*96 / matmul_flops, with each stage's time over its floor; --sweep: G in "
        "{4,8,16} and new tokens in {32,64,128}, log-log slopes of step time; extra rows: the "
        "update with batch.num_microbatches = 4 and 16 (gradient accumulation)")


@dataclasses.dataclass(frozen=True)
class Workload:
  """Sizes of one RL step. model: tiny_vlm size name; overrides: extra TinyVLMConfig fields."""
  model: str = "peer"
  prompts: int = 16
  prompt_len: int = 32
  group: int = 8
  new_tokens: int = 64
  model_overrides: tuple = ()
  # batch.num_microbatches of the update (gradient accumulation; the same optimizer step).
  num_microbatches: int = 1

  @property
  def rows(self) -> int:
    return self.prompts * self.group

  def model_config(self):
    from g2rpo_jax.models import tiny_vlm
    return tiny_vlm.tiny_vlm_config(self.model, max_prompt_len=self.prompt_len,
                                    **dict(self.model_overrides))


STANDARD = Workload()
MICROBATCH_ROWS = (4, 16)


def flop_floors(n_params: int, w: Workload, matmul_flops: float) -> dict:
  """The FLOP floors in seconds (see the module docstring) for `matmul_flops` FLOP/s."""
  seq = w.prompt_len + w.new_tokens
  rollout_tokens = w.prompts * w.prompt_len + w.rows * (w.new_tokens - 1)
  return {
      "flop_floor_s": 8.0 * n_params * w.rows * seq / matmul_flops,
      "rollout_floor_s": 2.0 * n_params * rollout_tokens / matmul_flops,
      "update_floor_s": 6.0 * n_params * w.rows * seq / matmul_flops,
  }


def loglog_slope(xs, ys) -> float:
  """Least-squares slope of log(ys) against log(xs)."""
  lx = [math.log(x) for x in xs]
  ly = [math.log(y) for y in ys]
  mx, my = statistics.fmean(lx), statistics.fmean(ly)
  den = sum((a - mx) ** 2 for a in lx)
  if den == 0:
    raise ValueError(f"loglog_slope needs at least two distinct x values, got {list(xs)}")
  return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den


def peak_rss_gb() -> float:
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_gflops(repeats: int = 10) -> float:
  """Best of a square 2048² matmul and a batched one (the batched form gives XLA:CPU more
  independent work per call), f32, jitted; GFLOP/s."""
  import jax
  import jax.numpy as jnp
  from experiments.benches import _timing
  square = _timing.matmul_gflops(n=2048, repeats=repeats)
  a = jax.random.normal(jax.random.key(0), (8, 1024, 1024), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (8, 1024, 1024), jnp.float32)
  f = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y))
  t = _timing.median_time(lambda: f(a, b), repeats=repeats)
  return max(square, 2 * 8 * 1024**3 / t / 1e9)


class RLStep:
  """The four stages of one RL step of workload `w`, built from the library's public pieces."""

  def __init__(self, w: Workload, seed: int = 0):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from g2rpo_jax import advantages as adv_lib
    from g2rpo_jax import config_utils
    from g2rpo_jax import rollout as rollout_lib
    from g2rpo_jax import trainer as trainer_lib
    from g2rpo_jax.models import interface as model_api
    from g2rpo_jax.models import testing

    self.w = w
    mcfg = w.model_config()
    self.graphdef, params = testing.host_init(mcfg, seed=seed)
    params = params.to_pure_dict()  # the trainer's state holds a pure dict
    self.n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    if "vision" in params and params["vision"] is not None:
      raise ValueError(f"workload model {w.model!r} has a vision tower; the RL-step bench wants "
                       "the text-only decoder (vision=False)")

    config = config_utils.load_config("mix")
    config.batch.num_minibatches = 1          # one optimizer step per rollout batch
    config.batch.num_microbatches = w.num_microbatches
    config.loss.kl_coef = 0.0                 # β = 0: no reference model
    config.rollout.temperature = 1.0
    config.rollout.max_new_tokens = w.new_tokens
    tx, schedule = trainer_lib.make_optimizer(config)
    cfg = trainer_lib.step_config(config)
    self.cfg = cfg
    self.step_fn = jax.jit(functools.partial(trainer_lib.train_step, graphdef=self.graphdef,
                                             tx=tx, cfg=cfg, schedule=schedule),
                           donate_argnums=0)
    self.state = jax.jit(lambda p: trainer_lib.TrainState(
        params=p, opt_state=tx.init(p), step=jnp.int32(0),
        rng=jax.random.key_data(jax.random.key(seed)), nonfinite_streak=jnp.int32(0),
        nonfinite_total=jnp.int32(0)))(params)

    # Prompts of exactly P real tokens (no padding), ids clear of the specials 0..3.
    rng = np.random.default_rng(seed)
    toks = rng.integers(4, mcfg.vocab_size, (w.prompts, w.prompt_len), dtype=np.int32)
    self.prompt = model_api.PromptBatch(tokens=jnp.asarray(toks),
                                        mask=jnp.ones(toks.shape, bool))
    self.prompt_rows = model_api.repeat_rows(self.prompt, w.group)
    # EOS = vocab size: an id the model has no logit for, so no row ever stops early.
    self.sampling = rollout_lib.SamplingConfig(
        max_new_tokens=w.new_tokens, eos_id=mcfg.vocab_size, pad_id=0, temperature=1.0,
        stop_early=False)
    self._generate = functools.partial(rollout_lib.generate, self.graphdef,
                                       num_samples=w.group, sampling=self.sampling)
    self._reward = jax.jit(lambda tokens, mask: jnp.sum((tokens % 2 == 0) & mask, axis=1)
                           / jnp.maximum(jnp.sum(mask, axis=1), 1))
    self._advantages = jax.jit(adv_lib.get_estimator("g2rpo", group_size=w.group,
                                                     mode="group_then_task"))
    self.group_ids = jnp.arange(w.rows, dtype=jnp.int32) // w.group
    self.task_ids = jnp.zeros((w.rows,), jnp.int32)
    self.valid = jnp.ones((w.rows,), bool)
    self.key = jax.random.key(seed + 1)
    self._trainer = trainer_lib

  def step(self, i: int) -> dict:
    """One RL step; returns the wall time of each stage (each blocked on before the next)."""
    import jax
    t = {}
    t0 = time.perf_counter()
    out = self._generate(self.state.params, self.prompt, jax.random.fold_in(self.key, i))
    jax.block_until_ready(out)
    t1 = time.perf_counter()
    reward = jax.block_until_ready(self._reward(out.tokens, out.mask))
    t2 = time.perf_counter()
    adv = jax.block_until_ready(self._advantages(reward, self.group_ids, self.task_ids,
                                                 self.valid))
    t3 = time.perf_counter()
    batch = self._trainer.RLBatch(prompt=self.prompt_rows, tokens=out.tokens, mask=out.mask,
                                  old_logprobs=out.logprobs, advantages=adv,
                                  task_ids=self.task_ids)
    self.state, metrics = self.step_fn(self.state, batch)
    jax.block_until_ready((self.state, metrics))
    t4 = time.perf_counter()
    t.update(rollout_s=t1 - t0, reward_s=t2 - t1, advantage_s=t3 - t2, update_s=t4 - t3,
             step_s=t4 - t0, response_tokens=int(out.mask.sum()),
             loss=float(metrics["loss/total"]))
    return t


class MatmulProbe:
  """A quick matmul-throughput probe (one jitted 2048² f32 matmul, median of 2 after a warm-up)
  taken right before each timed step: on a shared machine the load drifts within a run, so each
  step is compared with the throughput of its own moment."""

  def __init__(self, n: int = 2048):
    import jax
    import jax.numpy as jnp
    self.n = n
    self.a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    self.b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    self.f = jax.jit(lambda x, y: x @ y)

  def __call__(self) -> float:
    from experiments.benches import _timing
    t = _timing.median_time(lambda: self.f(self.a, self.b), repeats=2, warmup=1)
    return 2 * self.n**3 / t / 1e9


def measure(w: Workload, repeats: int, gflops: float | None = None, probe=None,
            seed: int = 0) -> dict:
  """Compile step + `repeats` timed steps of workload `w`; one result row (medians).

  gflops: the matmul throughput the floors use (measured here when None and no probe).
  probe: () -> GFLOP/s, called right before every timed step; then the `*_over_*floor` ratios
  are medians over steps of (stage time / floor at that step's probe), and `matmul_gflops` is
  the median probe.
  """
  t0 = time.perf_counter()
  rl = RLStep(w, seed=seed)
  first = rl.step(0)  # compiles every stage
  compile_s = time.perf_counter() - t0
  expected_tokens = w.rows * w.new_tokens
  if first["response_tokens"] != expected_tokens:
    raise RuntimeError(f"rollout produced {first['response_tokens']} response tokens, expected "
                       f"{expected_tokens} (every row must run all {w.new_tokens} steps)")
  steps, probes = [], []
  for i in range(repeats):
    if probe is not None:
      probes.append(probe())
    steps.append(rl.step(i + 1))
  if probes:
    gflops = statistics.median(probes)
  elif gflops is None:
    gflops = matmul_gflops()
  med = {k: statistics.median(s[k] for s in steps)
         for k in ("step_s", "rollout_s", "reward_s", "advantage_s", "update_s")}
  floors = flop_floors(rl.n_params, w, gflops * 1e9)
  per_step = [flop_floors(rl.n_params, w, g * 1e9) for g in probes] or [floors] * len(steps)

  def ratio(stage, floor):
    return statistics.median(s[stage] / f[floor] for s, f in zip(steps, per_step))

  return {
      "model": w.model, "n_params": rl.n_params, "prompts": w.prompts,
      "prompt_len": w.prompt_len, "group": w.group, "new_tokens": w.new_tokens,
      "num_microbatches": w.num_microbatches,
      "repeats": repeats, **med,
      "completion_tokens_per_s": expected_tokens / med["step_s"],
      "matmul_gflops": gflops, **floors,
      "step_over_flop_floor": ratio("step_s", "flop_floor_s"),
      "rollout_over_floor": ratio("rollout_s", "rollout_floor_s"),
      "update_over_floor": ratio("update_s", "update_floor_s"),
      "matmul_gflops_spread": (max(probes) / min(probes)) if probes else 1.0,
      "first_step_s": compile_s, "loss": steps[-1]["loss"],
      "peak_rss_gb": peak_rss_gb(),
  }


def run(args):
  repeats = args.repeats or 5
  probe = MatmulProbe()
  std = measure(STANDARD, repeats, probe=probe)
  yield std
  # The same workload with the update's gradient accumulated over 4 and 16 micro-batches (the
  # update is the same; compare `update_over_floor` with the row above).
  for k in MICROBATCH_ROWS:
    yield measure(dataclasses.replace(STANDARD, num_microbatches=k), repeats, probe=probe)
  if not getattr(args, "sweep", False):
    return
  # The standard row above is the (G = 8, T = 64) point of both sweeps.
  by_g, by_t = {8: std}, {64: std}
  for g in (4, 16):
    by_g[g] = measure(dataclasses.replace(STANDARD, group=g), repeats, probe=probe)
    yield by_g[g]
  for tt in (32, 128):
    by_t[tt] = measure(dataclasses.replace(STANDARD, new_tokens=tt), repeats, probe=probe)
    yield by_t[tt]
  gs = sorted(by_g)
  ts = sorted(by_t)
  yield {
      "sweep": "slopes",
      "slope_step_vs_group": loglog_slope(gs, [by_g[g]["step_s"] for g in gs]),
      "slope_step_vs_new_tokens": loglog_slope(ts, [by_t[t]["step_s"] for t in ts]),
      "slope_rollout_vs_group": loglog_slope(gs, [by_g[g]["rollout_s"] for g in gs]),
      "slope_rollout_vs_new_tokens": loglog_slope(ts, [by_t[t]["rollout_s"] for t in ts]),
      "slope_update_vs_group": loglog_slope(gs, [by_g[g]["update_s"] for g in gs]),
      "slope_update_vs_new_tokens": loglog_slope(ts, [by_t[t]["update_s"] for t in ts]),
      "peak_rss_gb": peak_rss_gb(),
  }
