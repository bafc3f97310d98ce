"""Tests for g2rpo_jax.advantages: golden values from SPEC §2, hand-computed baselines, properties.

Expected values come from the SPEC, from hand arithmetic, or from an independent float64
reference written here with the standard library's NormalDist (no code from the module).
"""
from __future__ import annotations

import functools
from statistics import NormalDist
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import Mesh, PartitionSpec as P

from g2rpo_jax import advantages as adv

_PHI_INV = NormalDist().inv_cdf

GOLDEN_GROUP_OF_5 = [  # SPEC §2, paper Fig. 2, two decimals.
    ([0, 0, 0, 0, 1], [-0.32, -0.32, -0.32, -0.32, 1.28]),
    ([0, 0, 1, 1, 1], [-0.90, -0.90, 0.60, 0.60, 0.60]),
    ([0.1, 0.1, 0.1, 0.2, 1.0], [-0.60, -0.60, -0.60, 0.52, 1.28]),
    ([0.81, 0.81, 0.82, 0.82, 0.83], [-0.90, -0.90, 0.26, 0.26, 1.28]),
]
SKEWED_GROUP = [0.1] * 6 + [0.2, 1.0]  # SPEC §2: G²RPO vs GRPO on one lucky response.


# ----------------------------------------------------------------------------- reference


def ref_pool(values, tol: float = 0.0) -> np.ndarray:
  """Float64 Gaussian map of one pool, written from SPEC §2 with explicit loops."""
  values = np.asarray(values, np.float64)
  n = len(values)
  out = np.zeros(n)
  if n <= 1:
    return out
  order = sorted(range(n), key=lambda i: values[i])
  blocks, current = [], [order[0]]
  for prev, i in zip(order[:-1], order[1:]):
    tied = (values[i] - values[prev] <= tol) if tol > 0 else (values[i] == values[prev])
    if tied:
      current.append(i)
    else:
      blocks.append(current)
      current = [i]
  blocks.append(current)
  rank = 0
  for block in blocks:
    qs = [_PHI_INV((rank + k + 0.5) / n) for k in range(len(block))]
    for i in block:
      out[i] = sum(qs) / len(qs)
    rank += len(block)
  return out


def ref_g2rpo(rewards, group_ids, task_ids, mask, mode: str) -> np.ndarray:
  """Per-pool loops over the valid responses: groups, tasks, or groups then tasks."""
  rewards, group_ids, task_ids, mask = map(np.asarray, (rewards, group_ids, task_ids, mask))
  out = np.zeros(len(rewards))

  def by_pool(values, ids, tol):
    res = np.zeros(len(values))
    for pool in set(ids[mask].tolist()):
      members = np.flatnonzero(mask & (ids == pool))
      res[members] = ref_pool(values[members], tol)
    return res

  if mode == "group":
    out = by_pool(rewards, group_ids, 0.0)
  elif mode == "task":
    out = by_pool(rewards, task_ids, 0.0)
  else:
    out = by_pool(by_pool(rewards, group_ids, 0.0), task_ids, 1e-6)
  return np.where(mask, out, 0.0)


def random_batch(seed: int, n: int = 96, contiguous_rows: int | None = None):
  """A ragged batch with ties, arbitrary ids (negative and huge) and some masked entries."""
  rng = np.random.default_rng(seed)
  if contiguous_rows:
    sizes = [contiguous_rows] * (n // contiguous_rows)
  else:
    sizes = []
    while sum(sizes) < n:
      sizes.append(int(rng.integers(1, 11)))
    sizes[-1] -= sum(sizes) - n
  group_names = rng.choice(np.arange(-2**31, 2**31 - 1, 7919, dtype=np.int64), len(sizes),
                           replace=False).astype(np.int32)
  task_names = np.array([2**31 - 1, -7, 0, 12345], np.int32)
  group_ids = np.repeat(group_names, sizes)
  task_ids = np.repeat(rng.choice(task_names, len(sizes)), sizes)
  levels = rng.choice([2, 3, 5, 1000], len(sizes))  # binary, coarse, continuous-ish groups
  rewards = np.concatenate([rng.integers(0, lv, s) / (lv - 1) for lv, s in zip(levels, sizes)])
  mask = rng.random(n) > 0.15
  if not contiguous_rows:
    perm = rng.permutation(n)
    rewards, group_ids, task_ids, mask = rewards[perm], group_ids[perm], task_ids[perm], mask[perm]
  return (jnp.asarray(rewards, jnp.float32), jnp.asarray(group_ids, jnp.int32),
          jnp.asarray(task_ids, jnp.int32), jnp.asarray(mask))


N = 96  # every batch below is padded to this size so each (mode, layout) compiles once
G = 8


def pad(rewards, group_ids=None, task_ids=None, mask=None):
  """Pads a small case to f32/i32/bool[N] with masked rows of G (their own ids, in no pool)."""
  r = np.asarray(rewards, np.float32)
  k = len(r)
  g = np.zeros(k, np.int32) if group_ids is None else np.asarray(group_ids, np.int32)
  t = g if task_ids is None else np.asarray(task_ids, np.int32)
  m = np.ones(k, bool) if mask is None else np.asarray(mask, bool)
  extra = N - k
  pad_ids = (2**30 + np.arange(extra) // G).astype(np.int32)
  return (jnp.asarray(np.concatenate([r, np.zeros(extra, np.float32)])),
          jnp.asarray(np.concatenate([g, pad_ids])),
          jnp.asarray(np.concatenate([t, pad_ids])),
          jnp.asarray(np.concatenate([m, np.zeros(extra, bool)])))


# Every test calls through these jitted functions, mostly at shape [N], so the whole file
# compiles each (estimator, options) once.
_jit_g2rpo = jax.jit(adv.g2rpo, static_argnames=("mode", "group_size"))


def jit_estimator(name: str, **options):
  options = {k: v for k, v in options.items() if v is not None}  # one cache entry per config
  return _jit_estimator(name, **options)


@functools.lru_cache(maxsize=None)
def _jit_estimator(name: str, **options):
  return jax.jit(adv.get_estimator(name, **options))


# ----------------------------------------------------------------------------- golden values


def golden_batch():
  """The four SPEC §2 vectors as four groups of 5, each also a task of its own: i32/f32[20]."""
  r = jnp.asarray(np.concatenate([v for v, _ in GOLDEN_GROUP_OF_5]), jnp.float32)
  g = jnp.repeat(jnp.asarray([-9, 40, 2**31 - 1, 5], jnp.int32), 5)
  t = jnp.repeat(jnp.asarray([3, -1, 77, 0], jnp.int32), 5)
  return r, g, t, np.concatenate([e for _, e in GOLDEN_GROUP_OF_5])


class GoldenTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(mode=adv.MODES, rows=(False, True))
  def test_paper_figure_2(self, mode, rows):
    # Each group is also a whole task, so all three modes must give the SPEC's map.
    r, g, t, expected = golden_batch()
    fn = functools.partial(adv.g2rpo, mode=mode, group_size=5 if rows else None)
    got = self.variant(fn)(r, g, t)
    np.testing.assert_allclose(np.round(np.asarray(got), 2), expected, atol=1e-9)

  @chex.variants(with_pmap=True)
  @parameterized.parameters(None, 5)
  def test_paper_figure_2_under_pmap(self, group_size):
    r, g, t, expected = golden_batch()
    got = self.variant(functools.partial(adv.g2rpo, group_size=group_size))(r, g, t)
    np.testing.assert_allclose(np.round(np.asarray(got), 2), expected, atol=1e-9)

  def test_tie_free_variance_and_max_match_closed_form(self):
    sizes = (5, 8, 64)
    spec_variance = (0.767, 0.851, 0.980)
    rng = np.random.default_rng(0)
    r = np.concatenate([rng.permutation(n) * 0.37 - 3.0 for n in sizes])
    got = np.asarray(_jit_g2rpo(*pad(r, np.repeat([-12, 0, 99], sizes)), mode="group"))
    pools = np.split(got[:77], np.cumsum(sizes)[:-1])
    for n, spec, pool in zip(sizes, spec_variance, pools):
      closed_form = np.mean([_PHI_INV((i - 0.5) / n) ** 2 for i in range(1, n + 1)])
      self.assertAlmostEqual(closed_form, spec, places=3)
      np.testing.assert_allclose(np.mean(pool), 0.0, atol=1e-6)
      np.testing.assert_allclose(np.mean(pool ** 2), closed_form, rtol=1e-5)
      np.testing.assert_allclose(pool.max(), _PHI_INV(1 - 0.5 / n), rtol=1e-6)
    self.assertAlmostEqual(float(pools[1].max()), 1.534, places=3)  # SPEC: N = 8

  @parameterized.parameters(None, G)
  def test_skewed_group_g2rpo(self, group_size):
    got = np.asarray(_jit_g2rpo(*pad(SKEWED_GROUP), mode="group", group_size=group_size))[:8]
    np.testing.assert_allclose(got, [-0.404] * 6 + [0.887, 1.534], atol=1e-3)
    # The tie block of six gets the mean of its quantiles, not the quantile of its mean rank.
    self.assertAlmostEqual(got[0], np.mean([_PHI_INV((k + 0.5) / 8) for k in range(6)]), places=5)

  @parameterized.parameters(None, G)
  def test_skewed_group_baselines_by_hand(self, group_size):
    batch = pad(SKEWED_GROUP)
    call = lambda name, **kw: np.asarray(jit_estimator(name, group_size=group_size, **kw)(*batch))
    # mean 0.225; deviations -0.125 (x6), -0.025, 0.775; sum of squares 0.695.
    dev = np.array([-0.125] * 6 + [-0.025, 0.775])
    std_unbiased, std_biased = np.sqrt(0.695 / 7), np.sqrt(0.695 / 8)
    got = call("grpo")[:8]
    np.testing.assert_allclose(got, [-0.397] * 6 + [-0.079, 2.46], atol=1e-3)  # SPEC §2
    np.testing.assert_allclose(got, dev / (std_unbiased + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(call("grpo", std="biased", eps=0.1)[:8], dev / (std_biased + 0.1),
                               rtol=1e-5)
    np.testing.assert_allclose(call("dr_grpo")[:8], dev, atol=1e-6)
    # RLOO: 1.0 - mean(0.1 x6, 0.2) = 1.0 - 0.8 / 7; 0.1 - (0.5 + 0.2 + 1.0) / 7; ...
    expected_rloo = [0.1 - 1.7 / 7] * 6 + [0.2 - 1.6 / 7, 1.0 - 0.8 / 7]
    np.testing.assert_allclose(call("rloo")[:8], expected_rloo, rtol=1e-5)
    np.testing.assert_allclose(call("none")[:8], SKEWED_GROUP, rtol=1e-7)
    for name in ("grpo", "dr_grpo", "rloo", "none"):  # padding is masked: exactly 0
      np.testing.assert_array_equal(call(name)[8:], 0.0)


class EdgeCaseTest(chex.TestCase):

  @parameterized.product(mode=adv.MODES, rows=(False, True))
  def test_singletons_all_equal_and_masked_pools_are_zero(self, mode, rows):
    # Rows of 8: an all-equal group, a group with one valid member, a fully masked group.
    r = np.concatenate([np.full(8, 0.7), np.arange(8.0), np.arange(8.0) + 5])
    g = np.repeat([10, -3, 99], 8)
    t = np.repeat([1, 2, 3], 8)
    mask = np.concatenate([np.ones(8), np.eye(8)[3], np.zeros(8)])
    got = np.asarray(_jit_g2rpo(*pad(r, g, t, mask), mode=mode, group_size=G if rows else None))
    np.testing.assert_array_equal(got, np.zeros(N))

  @chex.variants(with_jit=True, without_jit=True)
  def test_baselines_on_groups_of_one_and_masked(self):
    r = jnp.asarray([3.0, 1.0, 2.0, 4.0, 9.0], jnp.float32)
    g = jnp.asarray([7, 5, 5, 5, 5], jnp.int32)
    mask = jnp.asarray([1, 1, 1, 0, 1], bool)  # group 5 has valid rewards 1, 2, 9 (mean 4)
    for name, expected in [
        ("grpo", [0.0, -3 / np.sqrt(19), -2 / np.sqrt(19), 0.0, 5 / np.sqrt(19)]),  # var 38/2
        ("dr_grpo", [0.0, -3.0, -2.0, 0.0, 5.0]),
        ("rloo", [0.0, 1 - 5.5, 2 - 5.0, 0.0, 9 - 1.5]),
        ("none", [3.0, 1.0, 2.0, 0.0, 9.0]),
    ]:
      fn = self.variant(adv.get_estimator(name))
      np.testing.assert_allclose(fn(r, g, g, mask), expected, rtol=1e-5, atol=1e-6, err_msg=name)

  @parameterized.parameters(None, G)
  def test_negative_zero_and_nan(self, group_size):
    # -0.0 ties with 0.0; a NaN reward gets NaN (second group), never a silent number.
    r = [-0.0, 0.0, 1.0, 0.5, 0.0, 0.0, 3.0, 2.0] + [0.0, np.nan, 1.0, 0.5] * 2
    g = np.repeat([1, 2], 8)
    got = np.asarray(_jit_g2rpo(*pad(r, g), mode="group", group_size=group_size))
    np.testing.assert_allclose(got[:8], ref_pool([0, 0, 1, 0.5, 0, 0, 3, 2]), atol=1e-6)
    self.assertTrue(np.isnan(got[9]))

  def test_empty_batch(self):
    empty_f, empty_i = jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.int32)
    for name in adv.ESTIMATORS:
      self.assertEqual(adv.get_estimator(name)(empty_f, empty_i, empty_i, None).shape, (0,))

  def test_large_pool_tie_means_are_accurate(self):
    # 20,000 binary rewards in one task: each tie block is a mean of ~10^4 quantiles.
    rng = np.random.default_rng(0)
    n = 20_000
    r = jnp.asarray(rng.random(n) < 0.3, jnp.float32)
    ids = jnp.zeros((n,), jnp.int32)
    got = np.asarray(_jit_g2rpo(r, ids, ids, mode="task"))
    k = int((np.asarray(r) == 0).sum())
    q = np.array([_PHI_INV((i + 0.5) / n) for i in range(n)])
    np.testing.assert_allclose(got[np.asarray(r) == 0], q[:k].mean(), atol=2e-6)
    np.testing.assert_allclose(got[np.asarray(r) == 1], q[k:].mean(), atol=2e-6)


# ----------------------------------------------------------------------------- properties


class PropertyTest(chex.TestCase):

  @parameterized.product(mode=adv.MODES, seed=tuple(range(6)))
  def test_matches_per_pool_reference_loop(self, mode, seed):
    r, g, t, m = random_batch(seed)
    got = _jit_g2rpo(r, g, t, m, mode=mode)
    np.testing.assert_allclose(got, ref_g2rpo(r, g, t, m, mode), atol=2e-5)

  @parameterized.product(mode=adv.MODES, seed=tuple(range(4)))
  def test_rows_layout_agrees_with_ragged_and_reference(self, mode, seed):
    r, g, t, m = random_batch(100 + seed, contiguous_rows=G)
    rows = _jit_g2rpo(r, g, t, m, mode=mode, group_size=8)
    np.testing.assert_allclose(rows, _jit_g2rpo(r, g, t, m, mode=mode), atol=2e-6)
    np.testing.assert_allclose(rows, ref_g2rpo(r, g, t, m, mode), atol=2e-5)

  @parameterized.parameters(3, 16)
  def test_rows_layout_other_group_sizes(self, group_size):
    r, g, t, m = random_batch(170 + group_size, contiguous_rows=group_size)
    rows = _jit_g2rpo(r, g, t, m, mode="group_then_task", group_size=group_size)
    np.testing.assert_allclose(rows, ref_g2rpo(r, g, t, m, "group_then_task"), atol=2e-5)

  @parameterized.parameters("group_then_task", "task")
  def test_rows_layout_with_tasks_varying_inside_a_group(self, mode):
    # Unusual (a prompt has one task) but allowed: the rows path must not assume it.
    r, g, t, m = random_batch(150, contiguous_rows=G)
    t = jnp.asarray(np.random.default_rng(0).permutation(np.asarray(t)))
    rows = _jit_g2rpo(r, g, t, m, mode=mode, group_size=G)
    np.testing.assert_allclose(rows, ref_g2rpo(r, g, t, m, mode), atol=2e-5)

  def test_rows_layout_fallbacks_agree_with_reference(self):
    # Past the int32 packed-key bound (forced low here) the rows path sorts on two keys.
    r, g, t, m = random_batch(160, contiguous_rows=G)
    with mock.patch.object(adv, "_MAX_PACKED_KEY", 10):
      fn = jax.jit(functools.partial(adv.g2rpo, mode="group_then_task", group_size=G))
      np.testing.assert_allclose(fn(r, g, t, m), ref_g2rpo(r, g, t, m, "group_then_task"),
                                 atol=2e-5)
    # Groups larger than the table bound (here one group of 96) take the general path.
    g = jnp.full((N,), 5, jnp.int32)
    for mode in ("group", "group_then_task"):
      np.testing.assert_allclose(_jit_g2rpo(r, g, t, m, mode=mode, group_size=N),
                                 ref_g2rpo(r, g, t, m, mode), atol=2e-5)

  @parameterized.product(mode=adv.MODES, seed=tuple(range(3)))
  def test_invariant_to_strictly_increasing_transforms(self, mode, seed):
    rng = np.random.default_rng(seed)
    r, g, t, m = random_batch(200 + seed)
    # Map each distinct reward through a random increasing table: preserves every exact tie
    # and creates none (a float formula like x**3 could merge close values).
    levels, inverse = np.unique(np.asarray(r), return_inverse=True)
    new_levels = np.sort(rng.choice(np.arange(-10**6, 10**6), len(levels), replace=False)) * 1e-3
    r2 = jnp.asarray(new_levels[inverse], jnp.float32)
    assert len(np.unique(np.asarray(r2))) == len(levels)
    np.testing.assert_allclose(_jit_g2rpo(r2, g, t, m, mode=mode),
                               _jit_g2rpo(r, g, t, m, mode=mode), atol=1e-6)
    np.testing.assert_allclose(_jit_g2rpo(jnp.exp(3.0 * r), g, t, m, mode=mode),
                               _jit_g2rpo(r, g, t, m, mode=mode), atol=1e-6)

  @parameterized.product(mode=adv.MODES, seed=tuple(range(3)))
  def test_permutation_equivariance(self, mode, seed):
    r, g, t, m = random_batch(300 + seed)
    perm = np.random.default_rng(seed).permutation(r.shape[0])
    got = _jit_g2rpo(r[perm], g[perm], t[perm], m[perm], mode=mode)
    np.testing.assert_allclose(got, np.asarray(_jit_g2rpo(r, g, t, m, mode=mode))[perm], atol=1e-6)

  @parameterized.product(mode=adv.MODES, rows=(False, True))
  def test_rows_permutation_equivariance(self, mode, rows):
    # With group_size, permuting whole rows and members within rows is the allowed reordering.
    r, g, t, m = random_batch(7, contiguous_rows=G)
    rng = np.random.default_rng(1)
    perm = (rng.permutation(12)[:, None] * 8 + np.stack([rng.permutation(8) for _ in range(12)]))
    perm = perm.reshape(-1)
    gs = 8 if rows else None
    got = _jit_g2rpo(r[perm], g[perm], t[perm], m[perm], mode=mode, group_size=gs)
    want = np.asarray(_jit_g2rpo(r, g, t, m, mode=mode, group_size=gs))[perm]
    np.testing.assert_allclose(got, want, atol=1e-6)

  @parameterized.product(mode=adv.MODES, rows=(False, True))
  def test_masked_entries_do_not_change_others(self, mode, rows):
    r, g, t, m = random_batch(11, contiguous_rows=G)
    gs = 8 if rows else None
    base = np.asarray(_jit_g2rpo(r, g, t, m, mode=mode, group_size=gs))
    noise = jnp.asarray(np.random.default_rng(5).normal(size=96) * 50, jnp.float32)
    r2 = jnp.where(m, r, noise)
    t2 = jnp.where(m, t, 424242)  # a masked response in a task of its own changes nothing
    got = np.asarray(_jit_g2rpo(r2, g, t2, m, mode=mode, group_size=gs))
    np.testing.assert_array_equal(got[~np.asarray(m)], 0.0)
    np.testing.assert_allclose(got, base, atol=1e-6)
    # Masked entries are in no pool: the reference simply leaves them out.
    np.testing.assert_allclose(base, ref_g2rpo(r, g, t, m, mode), atol=2e-5)

  @parameterized.product(mode=adv.MODES, seed=tuple(range(2)))
  def test_relabelled_ids_give_same_result(self, mode, seed):
    r, g, t, m = random_batch(400 + seed)
    rng = np.random.default_rng(seed)

    def relabel(ids):
      names = np.unique(np.asarray(ids))
      new = rng.choice(np.arange(-2**31, 2**31 - 1, 104729, dtype=np.int64), len(names),
                       replace=False).astype(np.int32)
      return jnp.asarray(new[np.searchsorted(names, np.asarray(ids))])

    np.testing.assert_allclose(_jit_g2rpo(r, relabel(g), relabel(t), m, mode=mode),
                               _jit_g2rpo(r, g, t, m, mode=mode), atol=1e-6)

  @parameterized.product(mode=adv.MODES, rows=(False, True))
  def test_outlier_times_100_changes_nothing(self, mode, rows):
    r, g, t, _ = random_batch(21, contiguous_rows=G)
    m = jnp.ones((96,), bool)
    r = r + jnp.asarray(np.arange(96) * 1e-3, jnp.float32)  # tie-free, so the max is unique
    i = int(jnp.argmax(r))
    r_out = r.at[i].multiply(100.0)
    gs = 8 if rows else None
    base = _jit_g2rpo(r, g, t, m, mode=mode, group_size=gs)
    np.testing.assert_array_equal(_jit_g2rpo(r_out, g, t, m, mode=mode, group_size=gs), base)
    # The property is specific to the rank map: GRPO moves the outlier's group-mates.
    grpo = jit_estimator("grpo")
    changed = np.asarray(grpo(r_out, g, t, m) != grpo(r, g, t, m))
    self.assertGreater(changed.sum(), 1)


class SecondStageTiesTest(chex.TestCase):

  @parameterized.parameters(None, G)
  def test_same_rank_pattern_in_different_groups_is_one_tie_block(self, group_size):
    # Same rank pattern, different rewards; the middle block of four straddles the median
    # (exactly 0) like the all-equal group. Stage 2 must see exactly three distinct values.
    pattern = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    r = np.concatenate([pattern, 10 + 7 * pattern, np.full(8, 5.0)])
    g = np.repeat([4, 8, 15], 8)
    t = np.zeros(24)
    got = np.asarray(_jit_g2rpo(*pad(r, g, t), mode="group_then_task", group_size=group_size))
    # Stage 2 pool of 24: four bottoms (ranks 1-4), one zero block of sixteen (8 middles +
    # 8 all-equal; ranks 5-20), four tops (ranks 21-24).
    q = [_PHI_INV((k + 0.5) / 24) for k in range(24)]
    low, high = np.mean(q[:4]), np.mean(q[20:])
    expected = np.array([low] * 2 + [0] * 4 + [high] * 2)
    np.testing.assert_allclose(got[:24], np.concatenate([expected, expected, np.zeros(8)]),
                               atol=1e-6)
    # In the first stage the straddling block is exactly 0, not 0 plus rounding noise.
    stage1 = np.asarray(_jit_g2rpo(*pad(r, g, t), mode="group", group_size=group_size))
    np.testing.assert_array_equal(stage1[2:6], 0.0)
    np.testing.assert_array_equal(stage1[10:14], 0.0)

  def test_tolerance_merges_chained_neighbours_only_in_stage_two(self):
    # Values 3e-7 apart chain into one block at tol 1e-6; exact ties split them.
    stage = jax.jit(adv._gauss_stage_sorted, static_argnums=3)
    v = jnp.asarray([0.5, 0.5 + 3e-7, 0.5 + 6e-7, 0.5 + 9e-7, 2.0, -1.0], jnp.float32)
    ids = jnp.zeros((6,), jnp.int32)
    valid = jnp.ones((6,), bool)
    merged = np.asarray(stage(v, ids, valid, adv.STAGE2_TIE_TOL))
    np.testing.assert_allclose(merged, ref_pool([0.5] * 4 + [2.0, -1.0]), atol=1e-6)
    exact = np.asarray(stage(v, ids, valid, 0.0))
    np.testing.assert_allclose(exact, ref_pool([1.0, 2.0, 3.0, 4.0, 5.0, 0.0]), atol=1e-6)
    # Neighbours 2e-6 apart stay separate at tol 1e-6.
    far = jnp.asarray([0.5, 0.5 + 2e-6, 1.0, 0.5 + 4e-6, 3.0, 4.0], jnp.float32)
    got = np.asarray(stage(far, ids, valid, adv.STAGE2_TIE_TOL))
    np.testing.assert_allclose(got, ref_pool([0.0, 1.0, 3.0, 2.0, 4.0, 5.0]), atol=1e-6)

  def test_raw_rewards_tie_only_by_exact_equality(self):
    # In the first stage (and task mode) rewards 1e-7 apart are different rewards.
    r = [0.5, np.nextafter(np.float32(0.5), np.float32(1)), 0.9]
    got = np.asarray(_jit_g2rpo(*pad(r), mode="task"))
    np.testing.assert_allclose(got[:3], ref_pool([0.0, 1.0, 2.0]), atol=1e-6)


# ----------------------------------------------------------------------------- transforms


class TransformTest(chex.TestCase):

  @parameterized.product(mode=("task", "group_then_task"), rows=(False, True))
  def test_no_retrace_for_new_values(self, mode, rows):
    gs = 8 if rows else None
    chex.clear_trace_counter()  # the counter is keyed by the function's code, shared by cases

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fn(r, g, t, m):
      return adv.g2rpo(r, g, t, m, mode=mode, group_size=gs)

    for seed in range(3):
      r, g, t, m = random_batch(500 + seed, contiguous_rows=G)
      np.testing.assert_allclose(fn(r, g, t, m), ref_g2rpo(r, g, t, m, mode), atol=2e-5)

  @parameterized.parameters(("group", True), ("group_then_task", True), ("group_then_task", False))
  def test_vmap_over_batches(self, mode, rows):
    batches = [random_batch(600 + s, contiguous_rows=G) for s in range(3)]
    stacked = [jnp.stack(x) for x in zip(*batches)]
    fn = functools.partial(adv.g2rpo, mode=mode, group_size=8 if rows else None)
    got = jax.jit(jax.vmap(fn))(*stacked)
    for b, batch in enumerate(batches):
      np.testing.assert_allclose(got[b], ref_g2rpo(*batch, mode), atol=2e-5)

  def test_shard_map_over_rollout_batches(self):
    # Data parallel: each of 8 devices maps its own rollout batch (pools never cross devices).
    devices = np.array(jax.devices()[:8])
    mesh = Mesh(devices, ("data",))
    batches = [random_batch(700 + s, n=32, contiguous_rows=8) for s in range(8)]
    stacked = [jnp.stack(x) for x in zip(*batches)]
    est = adv.get_estimator("g2rpo")

    def per_device(r, g, t, m):
      return jax.vmap(est)(r, g, t, m)

    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"),) * 4,
                               out_specs=P("data")))
    got = fn(*stacked)
    for b, batch in enumerate(batches):
      np.testing.assert_allclose(got[b], ref_g2rpo(*batch, "group_then_task"), atol=2e-5)


# ----------------------------------------------------------------------------- API


class RegistryTest(chex.TestCase):

  def test_every_estimator_has_the_uniform_signature(self):
    r, g, t, m = random_batch(3)
    self.assertEqual(set(adv.ESTIMATORS), {"g2rpo", "grpo", "dr_grpo", "rloo", "none"})
    # task_ids reach g2rpo and options are bound (the default mode would differ here).
    np.testing.assert_allclose(jit_estimator("g2rpo", mode="task")(r, g, t, m),
                               ref_g2rpo(r, g, t, m, "task"), atol=2e-5)
    # The baselines ignore task_ids: moving every response to one task changes nothing.
    one_task = jnp.zeros_like(t)
    for name in ("grpo", "dr_grpo", "rloo", "none"):
      np.testing.assert_array_equal(jit_estimator(name)(r, g, t, m),
                                    jit_estimator(name)(r, g, one_task, m))

  @parameterized.parameters("g2rpo", "grpo", "dr_grpo", "rloo", "none")
  def test_group_size_option_agrees_with_ragged(self, name):
    r, g, t, m = random_batch(9, contiguous_rows=G)
    fast = jit_estimator(name, group_size=8)(r, g, t, m)
    np.testing.assert_allclose(fast, jit_estimator(name)(r, g, t, m), atol=2e-6)

  def test_unknown_name_lists_valid_names(self):
    with pytest.raises(ValueError, match=r"'ppo'.*dr_grpo.*g2rpo.*grpo.*none.*rloo"):
      adv.get_estimator("ppo")

  def test_unknown_option_is_named(self):
    with pytest.raises(ValueError, match=r"unknown option.*'temperature'.*valid options"):
      adv.get_estimator("g2rpo", temperature=1.0)
    with pytest.raises(ValueError, match=r"'mode'"):
      adv.get_estimator("grpo", mode="group")

  def test_bad_option_values(self):
    with pytest.raises(ValueError, match=r"mode.*'groups'"):
      adv.get_estimator("g2rpo", mode="groups")
    with pytest.raises(ValueError, match=r"std.*'sample'"):
      adv.get_estimator("grpo", std="sample")
    with pytest.raises(ValueError, match=r"group_size"):
      adv.get_estimator("rloo", group_size=0)


def one_group(values):
  r = jnp.asarray(values, jnp.float32)
  return r, jnp.zeros(r.shape, jnp.int32)


class InputCheckTest(chex.TestCase):

  def test_bad_mode(self):
    r, ids = one_group([0.0, 1.0])
    with pytest.raises(ValueError, match=r"mode must be one of .*'pool'"):
      adv.g2rpo(r, ids, ids, mode="pool")

  def test_shapes_and_dtypes(self):
    r, ids = one_group([0.0, 1.0, 2.0, 3.0])
    with pytest.raises(AssertionError, match="rewards"):
      adv.g2rpo(r.reshape(2, 2), ids, ids)
    with pytest.raises(AssertionError, match="task_ids"):
      adv.g2rpo(r, ids, ids[:3])
    with pytest.raises(AssertionError, match="mask"):
      adv.grpo(r, ids, jnp.ones((5,), bool))
    with pytest.raises(TypeError, match=r"rewards must be a float array.*int32"):
      adv.g2rpo(jnp.arange(4), ids, ids)
    with pytest.raises(TypeError, match=r"group_ids must be an int array.*float32"):
      adv.rloo(r, r)

  def test_group_size_layout_is_checked_eagerly(self):
    r = jnp.arange(8, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"divisible"):
      adv.g2rpo(r, jnp.zeros(8, jnp.int32), jnp.zeros(8, jnp.int32), group_size=3)
    scattered = jnp.asarray([1, 1, 2, 2, 1, 1, 2, 2], jnp.int32)
    with pytest.raises(ValueError, match=r"rows \[0, 1\]"):
      adv.g2rpo(r, scattered, scattered, group_size=4)
    with pytest.raises(ValueError, match=r"several rows"):
      adv.grpo(r, jnp.asarray([1, 1, 2, 2, 1, 1, 3, 3], jnp.int32), group_size=2)

  def test_float_mask_is_accepted(self):
    r, g, t, m = random_batch(13)
    got = _jit_g2rpo(r, g, t, m.astype(jnp.float32))
    np.testing.assert_allclose(got, ref_g2rpo(r, g, t, m, "group_then_task"), atol=2e-5)
