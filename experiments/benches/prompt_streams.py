"""Bench: the trainer's prompt streams (g2rpo_jax/data_sources.py), TFDS vs generated.

On the default mix's tasks and weights, one RL prompt batch (`batch.prompts_per_step` prompts)
from each stream the trainer can use:
  generate   `PromptSampler` (config.data.source = "generate", the default), which caches the
             examples it made (a real run revisits train indices), so a cold and a warm figure;
  tfds       `MixtureLoader` over the prepared array_record files (data.source = "tfds");
and the one-off cost of preparing the TFDS files. Time per batch is a median over batches
interleaved between the streams (drift on a shared machine hits both alike); the figure to quote
is `tfds_over_generate_cold` (< 1: reading is cheaper than generating).
"""
from __future__ import annotations

import statistics
import tempfile
import time

from configs import mix
from g2rpo_jax import config_utils, data_sources

NAME = "prompt_streams"
HELP = "one RL prompt batch from TFDS vs generated on the fly; TFDS preparation time"

_TRAIN_SIZE = 256  # examples per task prepared (the mix uses 2048: ~8x the preparation time)


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def run(args):
  repeats = args.repeats or 30
  with tempfile.TemporaryDirectory() as tmp:
    c = mix.get_config()
    config_utils.apply_overrides(c, [f"tasks.train_size={_TRAIN_SIZE}", "data.source=tfds"])
    b = c.batch.prompts_per_step
    t_prep = _timed(lambda: data_sources.prepare(c, tmp))
    yield {"what": "prepare_tfds", "examples": _TRAIN_SIZE * len(c.tasks.names),
           "seconds": t_prep}
    tfds = data_sources.rl_stream(c, tmp, b, process_index=0, process_count=1)
    config_utils.apply_overrides(c, ["data.source=generate"])
    gen = data_sources.rl_stream(c, tmp, b, process_index=0, process_count=1)
    tfds.next(b)  # open the files
    t_tfds, t_gen = [], []
    for _ in range(repeats):
      t_tfds.append(_timed(lambda: tfds.next(b)))
      t_gen.append(_timed(lambda: gen.next(b)))
    # Warm: the sampler's cache holds what it drew; replay the same positions.
    gen.set_state({"position": 0})
    t_warm = [_timed(lambda: gen.next(b)) for _ in range(repeats)]
    tf, gc, gw = (statistics.median(t) for t in (t_tfds, t_gen, t_warm))
    yield {"what": "batch", "prompts": b, "tfds_ms": tf * 1e3, "generate_cold_ms": gc * 1e3,
           "generate_cached_ms": gw * 1e3, "tfds_over_generate_cold": tf / gc,
           "tfds_prompts_per_s": b / tf, "generate_cold_prompts_per_s": b / gc}
