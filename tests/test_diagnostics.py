"""Tests for g2rpo_jax.diagnostics: moments vs scipy.stats, advantage mass and group means by hand,
per-task gradient norms vs gradients written out by hand."""
import functools

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from g2rpo_jax import diagnostics


class MomentsTest(chex.TestCase):

  @chex.all_variants(with_pmap=False)
  def test_vs_scipy(self):
    rng = np.random.default_rng(0)
    n, k = 300, 4
    tasks = rng.integers(0, 3, n)            # task 3 is absent
    # Different shapes per task so the moments differ: normal, skewed, heavy-tailed.
    a = np.where(tasks == 0, rng.normal(0.5, 2.0, n),
                 np.where(tasks == 1, rng.exponential(1.0, n), rng.standard_t(4, n)))
    mask = rng.random(n) > 0.2
    fn = self.variant(functools.partial(diagnostics.advantage_moments, num_tasks=k))
    got = fn(jnp.asarray(a, jnp.float32), jnp.asarray(tasks), mask=jnp.asarray(mask))
    for t in range(3):
      x = a[(tasks == t) & mask]
      np.testing.assert_allclose(got["count"][t], x.size)
      np.testing.assert_allclose(got["mean"][t], x.mean(), rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(got["var"][t], x.var(), rtol=1e-4)
      np.testing.assert_allclose(got["skewness"][t], stats.skew(x), rtol=1e-3, atol=1e-4)
      np.testing.assert_allclose(got["excess_kurtosis"][t], stats.kurtosis(x), rtol=1e-3,
                                 atol=1e-4)
      np.testing.assert_allclose(got["max_abs"][t], np.abs(x).max(), rtol=1e-6)
    for key in got:
      self.assertEqual(float(got[key][3]), 0.0, msg=key)

  def test_constant_pool_is_finite(self):
    got = diagnostics.advantage_moments(jnp.zeros(5), jnp.zeros(5, jnp.int32), 1)
    for key in ("var", "skewness", "excess_kurtosis"):
      self.assertEqual(float(got[key][0]), 0.0, msg=key)

  def test_no_mask_large_offset(self):
    # Centering first: a large mean must not swamp the variance.
    x = np.array([1000.0, 1001.0, 1002.0, 1004.0])
    got = diagnostics.advantage_moments(jnp.asarray(x, jnp.float32), jnp.zeros(4, jnp.int32), 1)
    np.testing.assert_allclose(got["var"][0], x.var(), rtol=1e-4)
    np.testing.assert_allclose(got["skewness"][0], stats.skew(x), rtol=1e-3)


class MassAndGroupsTest(parameterized.TestCase):

  def test_advantage_mass(self):
    a = jnp.array([1.5, -0.5, -1.0, 2.0, -3.0, 0.0, 9.0])
    tasks = jnp.array([0, 0, 0, 1, 1, 1, 1])
    mask = jnp.array([1, 1, 1, 1, 1, 1, 0])   # the 9.0 is padding
    got = diagnostics.advantage_mass(a, tasks, 3, mask)
    np.testing.assert_allclose(got["pos_mass"], [1.5, 2.0, 0.0])
    np.testing.assert_allclose(got["neg_mass"], [1.5, 3.0, 0.0])

  def test_group_means(self):
    v = jnp.array([1.0, 3.0, 10.0, 5.0, 7.0])
    groups = jnp.array([0, 0, 2, 2, 2])
    mask = jnp.array([True, True, False, True, True])
    means, counts = jax.jit(diagnostics.group_means, static_argnums=2)(v, groups, 4, mask)
    np.testing.assert_allclose(means, [2.0, 0.0, 6.0, 0.0])
    np.testing.assert_allclose(counts, [2, 0, 2, 0])


def _linear_problem(seed=0, b=10, d=3):
  rng = np.random.default_rng(seed)
  x = rng.normal(0, 1, (b, d))
  y = rng.normal(0, 1, (b,))
  w = rng.normal(0, 1, (d,))
  bias = 0.3
  return x, y, w, bias


def _loss(params, batch, weights):
  """Weighted squared error, normalised by the full batch size (independent of the weights)."""
  x, y = batch
  r = x @ params["w"] + params["b"] - y
  return jnp.sum(weights * r ** 2) / x.shape[0]


class GradNormTest(chex.TestCase):

  def _hand_norms(self, x, y, w, bias, tasks, num_tasks, mask):
    # d/dw Σ_i c_i r_i² / B = Σ_i 2 c_i r_i x_i / B, d/db = Σ_i 2 c_i r_i / B, numpy float64.
    r = x @ w + bias - y
    out = []
    for t in range(num_tasks):
      c = ((tasks == t) & mask).astype(np.float64)
      gw = (2 * c * r) @ x / x.shape[0]
      gb = np.sum(2 * c * r) / x.shape[0]
      out.append(np.sqrt(np.sum(gw ** 2) + gb ** 2))
    return np.array(out)

  @chex.all_variants(with_pmap=False)
  def test_vs_hand(self):
    x, y, w, bias = _linear_problem()
    tasks = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 2])
    mask = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 0], bool)
    params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.float32(bias)}
    batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    fn = self.variant(functools.partial(diagnostics.per_task_grad_norms, _loss, num_tasks=4))
    got = fn(params, batch, jnp.asarray(tasks), mask=jnp.asarray(mask))
    want = self._hand_norms(x, y, w, bias, tasks, 4, mask)
    self.assertEqual(want[3], 0.0)           # task 3 absent
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)

  def test_vectorized_matches_and_unmasked(self):
    x, y, w, bias = _linear_problem(seed=1)
    tasks = np.array([1, 1, 0, 0, 1, 0, 1, 1, 0, 1])
    params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.float32(bias)}
    batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    got = diagnostics.per_task_grad_norms(_loss, params, batch, jnp.asarray(tasks), 2,
                                          vectorize=True)
    want = self._hand_norms(x, y, w, bias, tasks, 2, np.ones(10, bool))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The task gradients of a loss linear in the weights add up to the full gradient; with two
    # tasks the full norm is bounded by their sum (and differs from each one alone).
    full = jax.grad(_loss)(params, batch, jnp.ones(10))
    full_norm = float(jnp.sqrt(jnp.sum(full["w"] ** 2) + full["b"] ** 2))
    self.assertLessEqual(full_norm, float(got.sum()) + 1e-6)
