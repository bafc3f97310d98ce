"""Bench: host-side cost of the task suite: generate vs read back from TFDS vs score a response.

Per task: the median time to generate one example (`task.example`), to read one back from the
array_record files (`ExampleSource[i]`, built into a temporary data dir first), and to score one
response (`task.reward` on the demonstration, the trainer's per-response host work). Rows quote
`gen_over_read` and `reward_over_read` (ratios in the same run) beside the bare microseconds, which
drift on a shared machine. A last row times one 256-prompt batch of the mixture loader over the
TFDS sources against 256 single reads.
"""
from __future__ import annotations

import statistics
import tempfile
import time

from g2rpo_jax import tasks
from g2rpo_jax.tasks import data, loader

NAME = "task_data"
HELP = "per task: generate one example vs read it from TFDS vs score one response; loader batch"

_N = 64


def _median_us(fn, repeats: int) -> float:
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    fn(r)
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e6


def run(args):
  repeats = args.repeats or 200
  with tempfile.TemporaryDirectory() as tmp:
    cfg = data.default_config()
    cfg.data_dir = tmp
    cfg.split_sizes.train, cfg.split_sizes.validation, cfg.split_sizes.test = _N, 0, 0
    t0 = time.perf_counter()
    sources = data.load_sources(cfg, "train")
    build_s = time.perf_counter() - t0
    yield {"task": "all", "what": "build", "examples": _N * len(sources), "seconds": build_s}
    read_all = []
    for name, task in tasks.TASKS.items():
      src = sources[name]
      demos = [(task.demonstration(src[i]), src[i]) for i in range(_N)]
      gen = _median_us(lambda r: task.example("train", 10_000 + r), repeats)
      read = _median_us(lambda r: src[r % _N], repeats)
      score = _median_us(lambda r: task.reward(*demos[r % _N]), repeats)
      read_all.append(read)
      yield {"task": name, "gen_us": gen, "read_us": read, "reward_us": score,
             "gen_over_read": gen / read, "reward_over_read": score / read}
    ld = loader.MixtureLoader(sources, {n: 1.0 for n in sources}, batch_size=256,
                              process_index=0, process_count=1)
    batch_us = _median_us(lambda r: next(ld), max(5, repeats // 20))
    yield {"task": "mixture", "what": "batch of 256", "batch_us": batch_us,
           "batch_over_256_reads": batch_us / (256 * statistics.median(read_all))}
