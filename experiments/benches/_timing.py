"""Timing helpers shared by the benches: medians of repeats, interleaved pairs, matmul peak."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def block(x):
  return jax.block_until_ready(x)


def time_call(fn: Callable[[], object]) -> float:
  t0 = time.perf_counter()
  block(fn())
  return time.perf_counter() - t0


def median_time(fn: Callable[[], object], repeats: int = 20, warmup: int = 2) -> float:
  for _ in range(warmup):
    block(fn())
  return statistics.median(time_call(fn) for _ in range(repeats))


def interleaved_ratio(fn_a, fn_b, repeats: int = 30, warmup: int = 2) -> tuple[float, float, float]:
  """Median over interleaved (a, b) pairs of time(a)/time(b); also the medians of a and b.

  Interleaving cancels most of the drift a shared machine adds between two separate loops.
  """
  for _ in range(warmup):
    block(fn_a()); block(fn_b())
  ratios, ta, tb = [], [], []
  for _ in range(repeats):
    a = time_call(fn_a)
    b = time_call(fn_b)
    ratios.append(a / b); ta.append(a); tb.append(b)
  return statistics.median(ratios), statistics.median(ta), statistics.median(tb)


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
  """This machine's jitted f32 matmul throughput in GFLOP/s (median of repeats)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  t = median_time(lambda: f(a, b), repeats=repeats)
  return 2 * n**3 / t / 1e9
