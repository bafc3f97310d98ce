"""Tests for g2rpo_jax.shaping: length trapezoid at and between thresholds, reward composition,
entropy estimators, the entropy band penalty and its exact micro-batch surrogate."""
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2rpo_jax import losses, shaping

# Task 0: a long window 10 < 20 ≤ 30 < 40; task 1: a degenerate plateau 5 < 8 = 8 < 12.
L_MIN, L_LOW, L_HIGH, L_MAX = (jnp.array(v, jnp.float32) for v in
                               ([10, 5], [20, 8], [30, 8], [40, 12]))


class LengthRewardTest(chex.TestCase):

  @chex.all_variants(with_pmap=False)
  def test_at_and_between_thresholds(self):
    cases = [  # (length, task, reward) worked out from SPEC §4
        (0, 0, 0.0), (9, 0, 0.0), (10, 0, 0.0), (12, 0, 0.2), (15, 0, 0.5), (19, 0, 0.9),
        (20, 0, 1.0), (25, 0, 1.0), (30, 0, 1.0), (31, 0, 0.9), (35, 0, 0.5), (39, 0, 0.1),
        (40, 0, 0.0), (41, 0, 0.0), (1000, 0, 0.0),
        (4, 1, 0.0), (5, 1, 0.0), (6, 1, 1 / 3), (7, 1, 2 / 3), (8, 1, 1.0), (9, 1, 0.75),
        (10, 1, 0.5), (11, 1, 0.25), (12, 1, 0.0), (13, 1, 0.0),
    ]
    lengths = jnp.array([c[0] for c in cases], jnp.int32)
    tasks = jnp.array([c[1] for c in cases], jnp.int32)
    got = self.variant(shaping.length_reward)(lengths, tasks, L_MIN, L_LOW, L_HIGH, L_MAX)
    np.testing.assert_allclose(got, [c[2] for c in cases], rtol=1e-6, atol=0)

  def test_exact_at_thresholds(self):
    # Exactly 0 / 1 at the four thresholds (no rounding), also with non-integer thresholds.
    lmin, llow, lhigh, lmax = (jnp.array([v]) for v in (3.3, 7.1, 9.7, 13.9))
    x = jnp.array([3.3, 7.1, 9.7, 13.9])
    got = shaping.length_reward(x, jnp.zeros(4, jnp.int32), lmin, llow, lhigh, lmax)
    np.testing.assert_array_equal(got, [0.0, 1.0, 1.0, 0.0])

  def test_scalar_thresholds(self):
    got = shaping.length_reward(jnp.array([15, 35]), jnp.array([0, 3]), 10.0, 20.0, 30.0, 40.0)
    np.testing.assert_allclose(got, [0.5, 0.5])

  @parameterized.parameters(
      ([10, 5], [10, 8], [30, 8], [40, 12], "l_min < l_low"),
      ([10, 5], [20, 9], [30, 8], [40, 12], "l_low <= l_high"),
      ([10, 5], [20, 8], [30, 8], [30, 12], "l_high < l_max"),
  )
  def test_invalid_thresholds(self, a, b, c, d, what):
    with pytest.raises(ValueError, match=what):
      shaping.length_reward(jnp.array([1]), jnp.array([0]), *(jnp.array(v) for v in (a, b, c, d)))

  def test_jit_with_closed_over_thresholds(self):
    # Concrete parameters closed over by a jitted caller (the trainer's pattern) must not trip
    # the host-side checks.
    f = jax.jit(lambda x, t: shaping.length_reward(x, t, L_MIN, L_LOW, L_HIGH, L_MAX))
    np.testing.assert_allclose(f(jnp.array([15, 10]), jnp.array([0, 1])), [0.5, 0.5])
    g = jax.jit(lambda a, fm, t, ln: shaping.compose_reward(a, fm, t, jnp.array([0.1, 0.2]),
                                                             jnp.array([0.2, 0.0]), ln))
    np.testing.assert_allclose(g(jnp.ones(2), jnp.ones(2), jnp.array([0, 1]), jnp.zeros(2)),
                               [0.8, 1.0], rtol=1e-6)

  def test_task_id_out_of_range(self):
    with pytest.raises(ValueError, match="dense"):
      shaping.length_reward(jnp.array([1]), jnp.array([2]), L_MIN, L_LOW, L_HIGH, L_MAX)


class ComposeRewardTest(parameterized.TestCase):

  def test_per_task_weights(self):
    got = shaping.compose_reward(
        accuracy=jnp.array([1.0, 0.5]), fmt=jnp.array([1.0, 0.0]), task_ids=jnp.array([0, 1]),
        w_fmt=jnp.array([0.1, 0.2]), w_len=jnp.array([0.2, 0.0]), length=jnp.array([0.5, 1.0]))
    # 0.7·1 + 0.1·1 + 0.2·0.5 = 0.9 ; 0.8·0.5 + 0.2·0 + 0·1 = 0.4
    np.testing.assert_allclose(got, [0.9, 0.4], rtol=1e-6)

  def test_released_code_default(self):
    got = shaping.compose_reward(jnp.array([1.0, 0.0, 1.0]), jnp.array([1.0, 1.0, 0.0]),
                                 jnp.zeros(3, jnp.int32))
    np.testing.assert_allclose(got, [1.0, 0.1, 0.9], rtol=1e-6)

  def test_weights_must_leave_room_for_accuracy(self):
    with pytest.raises(ValueError, match="w_fmt \\+ w_len <= 1"):
      shaping.compose_reward(jnp.ones(1), jnp.ones(1), jnp.zeros(1, jnp.int32), 0.6, 0.6,
                             jnp.ones(1))

  def test_length_needed_when_weighted(self):
    with pytest.raises(ValueError, match="no length reward"):
      shaping.compose_reward(jnp.ones(1), jnp.ones(1), jnp.zeros(1, jnp.int32), 0.1, 0.1)


class EntropyEstimatorTest(parameterized.TestCase):

  def test_full_vocab_vs_numpy(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 3, 11))
    logits[0, 0, :5] = -1e4     # underflowing probabilities must count as 0
    logits[1, 2, 3:6] = -np.inf  # masked vocabulary entries too, with finite gradients
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
      want = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)
    got = shaping.token_entropy("full_vocab", logits=jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda x: shaping.full_vocab_entropy(x).sum())(jnp.asarray(logits, jnp.float32))
    self.assertTrue(bool(jnp.all(jnp.isfinite(g))))

  def test_uniform_is_log_v(self):
    np.testing.assert_allclose(shaping.full_vocab_entropy(jnp.zeros((1, 1, 7))), [[np.log(7)]],
                               rtol=1e-6)

  def test_sampled_nll(self):
    np.testing.assert_allclose(shaping.token_entropy("sampled_nll", logprobs=jnp.array([[-0.3]])),
                               [[0.3]])

  def test_unknown_or_missing(self):
    with pytest.raises(ValueError, match="unknown estimator 'renyi'"):
      shaping.token_entropy("renyi", logprobs=jnp.zeros((1, 1)))
    with pytest.raises(ValueError, match="needs logits"):
      shaping.token_entropy("full_vocab", logprobs=jnp.zeros((1, 1)))


def _task_batch(h_values, tokens, task_ids, t=4):
  """Per-token entropy f32[B, T] with sequence b holding `tokens[b]` tokens of value h_values[b]."""
  h = jnp.asarray(np.repeat(np.asarray(h_values, np.float32)[:, None], t, axis=1))
  mask = jnp.asarray((np.arange(t)[None, :] < np.asarray(tokens)[:, None]).astype(np.float32))
  return h, mask, jnp.asarray(task_ids, jnp.int32)


class EntropyBandTest(chex.TestCase):

  @chex.all_variants(with_pmap=False)
  def test_inside_band_is_zero(self):
    h, mask, tasks = _task_batch([0.3, 0.5, 0.21, 0.59], [4, 2, 3, 1], [0, 0, 1, 1])
    fn = self.variant(lambda h: shaping.entropy_band_penalty(h, mask, tasks, 2)[0])
    self.assertEqual(float(fn(h)), 0.0)
    np.testing.assert_array_equal(jax.grad(fn)(h), 0.0)

  def test_penalty_from_accumulated_stats_matches_direct_penalty(self):
    # Task 0 above its band (H = 0.9), task 1 below (H = 0.1), task 2 absent; stats added up
    # over two halves of the batch give the whole batch's penalty: λ(0.3 + 0.1) = 0.008.
    h, mask, tasks = _task_batch([0.9, 0.9, 0.1, 0.1], [4, 2, 3, 1], [0, 0, 1, 1])
    halves = [shaping.entropy_stats(h[i::2], mask[i::2], tasks[i::2], 3) for i in (0, 1)]
    stats = losses.accumulate(*halves)
    got = shaping.band_penalty_from_stats(stats, 0.2, 0.6, coef=0.02)
    want = shaping.entropy_band_penalty(h, mask, tasks, 3, 0.2, 0.6, coef=0.02)[0]
    np.testing.assert_allclose(got, 0.008, rtol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-6)

  def test_linear_outside_with_slope_lambda(self):
    # One task, 3 tokens of entropy H; above H_max = 0.6 the penalty is λ(H − 0.6), below H_min
    # = 0.2 it is λ(0.2 − H).
    mask = jnp.ones((1, 3))
    tasks = jnp.zeros((1,), jnp.int32)
    pen = lambda hv: float(shaping.entropy_band_penalty(jnp.full((1, 3), hv), mask, tasks, 1,
                                                         coef=0.02)[0])
    for hv, want in ((0.8, 0.004), (1.1, 0.01), (0.1, 0.002), (0.0, 0.004)):
      np.testing.assert_allclose(pen(hv), want, rtol=1e-5, err_msg=str(hv))
    np.testing.assert_allclose((pen(1.0) - pen(0.9)) / 0.1, 0.02, rtol=1e-4)
    np.testing.assert_allclose((pen(0.15) - pen(0.05)) / 0.1, -0.02, rtol=1e-4)

  def test_gradient_sign_through_logprobs(self):
    # sampled-NLL estimator: too high entropy → gradient pushes log-probs up (descent direction
    # −grad > 0), too low → down. Each token's gradient is ∓λ / N_τ.
    logp = jnp.array([[-1.0, -1.0, -1.0, -1.0], [-0.05, -0.05, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], jnp.float32)
    tasks = jnp.array([0, 1])
    f = lambda lp: shaping.entropy_band_penalty(shaping.token_entropy("sampled_nll", logprobs=lp),
                                                mask, tasks, 2, coef=0.02)[0]
    g = jax.grad(f)(logp)
    np.testing.assert_allclose(g, [[-0.005] * 4, [0.01, 0.01, 0.0, 0.0]], rtol=1e-5)

  def test_per_task_bounds_and_metrics(self):
    h, mask, tasks = _task_batch([0.5, 0.7, 0.1], [2, 2, 4], [0, 0, 2])
    # task 0: H = 0.6 (mean of 0.5 and 0.7 with equal tokens), bounds [0.1, 0.4] → 0.2 over;
    # task 1: absent (bounds that would bite on H = 0: [0.5, 0.9]) → 0;
    # task 2: H = 0.1, bounds [0.3, 0.5] → 0.2 under.
    pen, m = shaping.entropy_band_penalty(h, mask, tasks, 3, h_min=jnp.array([0.1, 0.5, 0.3]),
                                          h_max=jnp.array([0.4, 0.9, 0.5]), coef=0.5)
    np.testing.assert_allclose(pen, 0.5 * (0.2 + 0.2), rtol=1e-5)
    np.testing.assert_allclose(m["entropy_per_task"], [0.6, 0.0, 0.1], rtol=1e-6)
    np.testing.assert_allclose(m["tokens_per_task"], [4, 0, 4])
    np.testing.assert_allclose(m["penalty_per_task"], [0.2, 0.0, 0.2], rtol=1e-5)

  def test_token_weighted_mean(self):
    # H_τ is a mean over tokens, not over sequences: (3·1.0 + 1·0.0) / 4 = 0.75.
    h, mask, tasks = _task_batch([1.0, 0.0], [3, 1], [0, 0])
    pen, m = shaping.entropy_band_penalty(h, mask, tasks, 1, coef=1.0)
    np.testing.assert_allclose(m["entropy_per_task"], [0.75], rtol=1e-6)
    np.testing.assert_allclose(pen, 0.15, rtol=1e-5)

  def test_absent_task_exactly_zero_finite_gradient(self):
    logp = jnp.full((2, 3), -2.0)
    mask = jnp.array([[1, 1, 1], [0, 0, 0]], jnp.float32)   # task 1's only row is padding
    tasks = jnp.array([0, 1])
    f = lambda lp: shaping.entropy_band_penalty(-lp, mask, tasks, 3, h_min=0.2, h_max=0.6)
    (pen, m), g = jax.value_and_grad(f, has_aux=True)(logp)
    np.testing.assert_array_equal(m["penalty_per_task"][1:], 0.0)
    np.testing.assert_allclose(pen, 0.02 * 1.4, rtol=1e-5)
    self.assertTrue(bool(jnp.all(jnp.isfinite(g))))
    np.testing.assert_array_equal(g[1], 0.0)
    # No task present at all: exactly 0 and a zero gradient.
    none = lambda lp: shaping.entropy_band_penalty(-lp, jnp.zeros_like(mask), tasks, 3)[0]
    pen0, g0 = jax.value_and_grad(none)(logp)
    self.assertEqual(float(pen0), 0.0)
    np.testing.assert_array_equal(g0, 0.0)

  def test_no_retrace(self):
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(h, m, t):
      return shaping.entropy_band_penalty(h, m, t, 3)[0]

    h, mask, tasks = _task_batch([0.5, 0.7, 0.1], [2, 2, 4], [0, 0, 2])
    f(h, mask, tasks)
    f(h * 2, mask[::-1], tasks[::-1])

  def test_bad_bounds(self):
    h, mask, tasks = _task_batch([0.5], [2], [0])
    with pytest.raises(ValueError, match="h_min <= h_max"):
      shaping.entropy_band_penalty(h, mask, tasks, 1, h_min=0.7, h_max=0.6)
    with pytest.raises(ValueError, match="h_max must be a scalar or f32\\[1\\]"):
      shaping.entropy_band_penalty(h, mask, tasks, 1, h_max=jnp.array([0.6, 0.7]))

  def test_jit_with_closed_over_bounds(self):
    h, mask, tasks = _task_batch([0.9, 0.1], [2, 2], [0, 1])
    h_min, h_max = jnp.array([0.2, 0.3]), jnp.array([0.6, 0.6])
    f = jax.jit(lambda h: shaping.entropy_band_penalty(h, mask, tasks, 2, h_min, h_max, 1.0)[0])
    np.testing.assert_allclose(f(h), 0.3 + 0.2, rtol=1e-5)


class EntropySurrogateTest(parameterized.TestCase):

  def test_microbatch_sum_equals_full_batch(self):
    # A tiny "model": per-token log-probs = x·w, so the entropy depends on parameters w.
    rng = np.random.default_rng(0)
    b, t, k = 8, 5, 4
    x = jnp.asarray(rng.normal(0, 1, (b, t, 3)), jnp.float32)
    w = jnp.array([0.3, -0.2, 0.1])
    lengths = np.array([5, 2, 4, 0, 3, 5, 1, 4])
    mask = jnp.asarray((np.arange(t)[None] < lengths[:, None]).astype(np.float32))
    # Task 3 appears only in the second micro-batch; tasks differ in where they sit vs the band.
    tasks = jnp.array([0, 1, 2, 0, 1, 2, 3, 0])
    offset = jnp.array([1.0, 0.05, 0.4, 0.9])[tasks][:, None]   # above / below / inside / above
    ent = lambda w, x, off: jnp.abs(x @ w) * 0.1 + off
    h_min, h_max, coef = jnp.array([0.2, 0.2, 0.2, 0.3]), jnp.array([0.6, 0.6, 0.9, 0.6]), 0.02
    # jit (one compile per shape) is much cheaper than eager op-by-op dispatch here.
    penalty = jax.jit(jax.value_and_grad(
        lambda w, x, off, m, t: shaping.entropy_band_penalty(ent(w, x, off), m, t, k, h_min,
                                                             h_max, coef)[0]))
    stats_fn = jax.jit(lambda w, x, off, m, t: shaping.entropy_stats(ent(w, x, off), m, t, k))
    surrogate = jax.jit(jax.value_and_grad(
        lambda w, x, off, m, t, st: shaping.entropy_band_surrogate(ent(w, x, off), m, t, st,
                                                                   h_min, h_max, coef)))

    v_full, g_full = penalty(w, x, offset, mask, tasks)
    self.assertGreater(float(v_full), 0.0)

    parts = [slice(0, 3), slice(3, 8)]
    stats = None
    for sl in parts:
      s = stats_fn(w, x[sl], offset[sl], mask[sl], tasks[sl])
      stats = s if stats is None else losses.accumulate(stats, s)
    v_acc, g_acc = 0.0, 0.0
    for sl in parts:
      v, g = surrogate(w, x[sl], offset[sl], mask[sl], tasks[sl], stats)
      v_acc, g_acc = v_acc + v, g_acc + g
    np.testing.assert_allclose(v_acc, v_full, rtol=1e-5)
    np.testing.assert_allclose(g_acc, g_full, rtol=1e-4, atol=1e-8)
    # ... whereas summing the per-micro-batch penalties is not the full-batch penalty here.
    naive = sum(penalty(w, x[sl], offset[sl], mask[sl], tasks[sl])[0] for sl in parts)
    self.assertGreater(abs(float(naive) - float(v_full)), 1e-4)
