"""Tests for g2rpo_jax.losses: hand-computed values and gradients, clip boundaries, dual clip,
aggregation modes on ragged masks, exact micro-batch accumulation, KL estimators."""
import functools
import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2rpo_jax import losses
from g2rpo_jax.losses import PolicyLossConfig, SumCount


def _one_token(ratio, adv, **cfg):
  """Loss value and d loss / d logprob for one token with the given ratio and advantage."""
  old = jnp.zeros((1, 1), jnp.float32)
  logp = jnp.full((1, 1), math.log(ratio), jnp.float32)
  mask = jnp.ones((1, 1), jnp.float32)
  config = PolicyLossConfig(**cfg)

  def f(lp):
    loss, _ = losses.policy_loss(lp, old, jnp.array([adv], jnp.float32), mask, config=config)
    return losses.finish(loss)

  value, grad = jax.value_and_grad(f)(logp)
  return float(value), float(grad[0, 0])


class PolicyLossTokenTest(parameterized.TestCase):
  # (ratio, advantage, expected loss, expected d loss / d logprob) with ε_low = 0.2,
  # ε_high = 0.3, c = 3. Unclipped tokens: loss = −A·r, gradient −A·r (d r / d logp = r).
  @parameterized.named_parameters(
      ("pos_inside", 1.1, 1.0, -1.1, -1.1),
      ("pos_just_below_high", 1.299, 1.0, -1.299, -1.299),
      ("pos_just_above_high", 1.301, 1.0, -1.3, 0.0),
      ("pos_far_above_high", 2.0, 2.0, -2.6, 0.0),
      ("pos_below_low_not_clipped", 0.5, 1.0, -0.5, -0.5),   # pessimistic max keeps −A·r
      ("neg_just_above_low", 0.801, -1.0, 0.801, 0.801),
      ("neg_just_below_low", 0.799, -1.0, 0.8, 0.0),
      ("neg_above_high_not_clipped", 2.0, -1.0, 2.0, 2.0),
      ("neg_just_below_dual", 2.999, -1.0, 2.999, 2.999),
      ("neg_just_above_dual", 3.001, -1.0, 3.0, 0.0),
      ("neg_dual_scaled_adv", 5.0, -0.5, 1.5, 0.0),
      ("zero_adv", 1.7, 0.0, 0.0, 0.0),
  )
  def test_value_and_grad(self, ratio, adv, want_loss, want_grad):
    value, grad = _one_token(ratio, adv)
    np.testing.assert_allclose(value, want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)

  def test_dual_clip_off(self):
    value, grad = _one_token(5.0, -0.5, dual_clip_c=None)
    np.testing.assert_allclose([value, grad], [2.5, 2.5], rtol=1e-5)

  def test_custom_eps(self):
    # ε_low = ε_high = 0.1: r = 1.2 with A > 0 is clipped at 1.1.
    value, grad = _one_token(1.2, 1.0, eps_low=0.1, eps_high=0.1)
    np.testing.assert_allclose([value, grad], [-1.1, 0.0], rtol=1e-5, atol=1e-7)

  def test_log_ratio_clamp(self):
    # log r = 30 is clamped to 5: ratio e^5, finite, and no gradient through the clamp.
    old = jnp.zeros((1, 1))
    mask = jnp.ones((1, 1))
    cfg = PolicyLossConfig(log_ratio_clamp=5.0, dual_clip_c=None)
    f = lambda lp: losses.policy_loss(lp, old, jnp.array([-1.0]), mask, config=cfg)[0].sum
    value, grad = jax.value_and_grad(f)(jnp.full((1, 1), 30.0))
    np.testing.assert_allclose(float(value), math.exp(5.0), rtol=1e-5)
    self.assertEqual(float(grad[0, 0]), 0.0)

  def test_old_logprobs_get_no_gradient(self):
    logp = jnp.full((1, 1), 0.1)
    mask = jnp.ones((1, 1))
    f = lambda old: losses.policy_loss(logp, old, jnp.array([1.0]), mask)[0].sum
    self.assertEqual(float(jax.grad(f)(jnp.zeros((1, 1)))[0, 0]), 0.0)


class PolicyLossBatchTest(chex.TestCase):

  def _batch(self):
    # Two sequences, T = 3; the second has one padding token (with an extreme ratio that must
    # not show anywhere). Ratios and advantages chosen so each token lands in its own regime.
    ratios = np.array([[1.1, 1.5, 0.5], [0.7, 4.0, 9.0]])
    logp = jnp.asarray(np.log(ratios), jnp.float32)
    old = jnp.zeros_like(logp)
    adv = jnp.array([1.0, -2.0])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]], jnp.float32)
    return logp, old, adv, mask

  @chex.all_variants(with_pmap=True)
  def test_values_and_metrics(self):
    logp, old, adv, mask = self._batch()
    fn = self.variant(lambda *a: losses.finish(losses.policy_loss(*a)))
    loss, m = fn(logp, old, adv, mask)
    # Per token: seq 0 (A = 1): −1.1, −1.3 (clip high), −0.5; seq 1 (A = −2): 2·0.8 (clip low),
    # 2·3 (dual). Token mean over 5 tokens.
    want = (-1.1 - 1.3 - 0.5 + 1.6 + 6.0) / 5
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["pg_loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["clip_frac_high"], 1 / 5, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac_low"], 1 / 5, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac_dual"], 1 / 5, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_mean"], (1.1 + 1.5 + 0.5 + 0.7 + 4.0) / 5, rtol=1e-5)
    np.testing.assert_allclose(m["ratio_min"], 0.5, rtol=1e-5)
    np.testing.assert_allclose(m["ratio_max"], 4.0, rtol=1e-5)   # the padded 9.0 is ignored
    k3 = [r - 1 - math.log(r) for r in (1.1, 1.5, 0.5, 0.7, 4.0)]
    np.testing.assert_allclose(m["approx_kl"], sum(k3) / 5, rtol=1e-5)
    self.assertNotIn("kl", m)

  def test_gradient_by_hand(self):
    logp, old, adv, mask = self._batch()
    g = jax.grad(lambda lp: losses.finish(losses.policy_loss(lp, old, adv, mask)[0]))(logp)
    # Only unclipped tokens carry gradient −A·r / N_tokens.
    want = np.array([[-1.1, 0.0, -0.5], [0.0, 0.0, 0.0]]) / 5
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)

  def test_per_token_advantages(self):
    logp, old, _, mask = self._batch()
    adv_bt = jnp.array([[1.0, 0.0, -1.0], [2.0, 0.0, 5.0]])
    loss, _ = losses.policy_loss(logp, old, adv_bt, mask)
    # tokens: −1.1, 0, −1·max(0.5, 0.8) → +0.8; −2·0.7 = −1.4, 0 (padding ignored)
    np.testing.assert_allclose(losses.finish(loss), (-1.1 + 0.8 - 1.4) / 5, rtol=1e-5)

  def test_bad_advantage_shape(self):
    logp, old, _, mask = self._batch()
    with pytest.raises(ValueError, match="advantages"):
      losses.policy_loss(logp, old, jnp.zeros((2, 2)), mask)

  def test_no_retrace(self):
    logp, old, adv, mask = self._batch()
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(lp, o, a, m):
      return losses.finish(losses.policy_loss(lp, o, a, m))

    f(logp, old, adv, mask)
    f(logp + 0.1, old - 0.2, -adv, mask[:, ::-1])   # new values, same shapes: no retrace


class AggregationTest(parameterized.TestCase):
  V = np.array([[1., 2., 3., 4.], [10., 20., 30., 40.], [5., 5., 5., 5.]], np.float32)
  M = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)   # ragged + empty row

  @parameterized.named_parameters(
      ("token_mean", "token_mean", None, 16.0, 4.0),
      ("seq_mean_token_mean", "seq_mean_token_mean", None, 12.0, 2.0),  # seq means 2 and 10
      ("sum_norm_T", "seq_mean_token_sum_norm", None, 4.0, 2.0),        # (6 + 10) / 4
      ("sum_norm_8", "seq_mean_token_sum_norm", 8.0, 2.0, 2.0),         # (6 + 10) / 8
  )
  def test_hand_values(self, mode, norm_len, want_sum, want_count):
    sc = losses.aggregate(jnp.asarray(self.V), jnp.asarray(self.M), mode, norm_len)
    np.testing.assert_allclose([sc.sum, sc.count], [want_sum, want_count], rtol=1e-6)

  def test_bool_mask(self):
    sc = losses.aggregate(jnp.asarray(self.V), jnp.asarray(self.M).astype(bool), "token_mean")
    np.testing.assert_allclose([sc.sum, sc.count], [16.0, 4.0])

  def test_unknown_mode(self):
    with pytest.raises(ValueError, match="unknown mode 'seq_sum'"):
      losses.aggregate(jnp.asarray(self.V), jnp.asarray(self.M), "seq_sum")

  def test_empty_finishes_to_zero(self):
    sc = losses.aggregate(jnp.asarray(self.V), jnp.zeros_like(jnp.asarray(self.M)), "token_mean")
    self.assertEqual(float(losses.finish(sc)), 0.0)


def _random_batch(seed, b=6, t=7):
  rng = np.random.default_rng(seed)
  old = rng.normal(-1.5, 0.5, (b, t)).astype(np.float32)
  logp = (old + rng.normal(0, 0.4, (b, t))).astype(np.float32)   # ratios across all regimes
  ref = (old + rng.normal(0, 0.3, (b, t))).astype(np.float32)
  adv = rng.normal(0, 1.5, (b,)).astype(np.float32)
  lengths = np.array([7, 1, 4, 0, 6, 3])[:b]                      # ragged, one empty row
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
  return tuple(map(jnp.asarray, (logp, old, adv, mask, ref)))


class AccumulationTest(parameterized.TestCase):

  @parameterized.product(aggregation=losses.AGGREGATIONS, kl_coef=[0.0, 0.1])
  def test_two_microbatches_equal_full_batch(self, aggregation, kl_coef):
    logp, old, adv, mask, ref = _random_batch(0)
    cfg = PolicyLossConfig(aggregation=aggregation, kl_coef=kl_coef, norm_len=10.0)

    def summed(lp, o, a, m, r):
      loss, metrics = losses.policy_loss(lp, o, a, m, r, config=cfg)
      return loss.sum, (loss, metrics)

    # jit: one compile per shape is much cheaper than eager op-by-op dispatch here.
    grad_fn = jax.jit(jax.grad(summed, has_aux=True))
    g_full, (loss_full, m_full) = grad_fn(logp, old, adv, mask, ref)
    # Unequal split (2 + 4 rows) so an average of micro-batch means would be wrong.
    parts = [slice(0, 2), slice(2, 6)]
    grads, acc = [], None
    for sl in parts:
      g, aux = grad_fn(logp[sl], old[sl], adv[sl], mask[sl], ref[sl])
      grads.append(g)
      acc = aux if acc is None else losses.accumulate(acc, aux)
    loss_acc, m_acc = acc
    np.testing.assert_allclose(losses.finish(loss_acc), losses.finish(loss_full), rtol=1e-5)
    np.testing.assert_allclose(loss_acc.count, loss_full.count)
    # Gradient of the finished loss = Σ micro-batch gradients of sums / Σ counts.
    g_acc = jnp.concatenate(grads) / loss_acc.count
    np.testing.assert_allclose(g_acc, g_full / loss_full.count, rtol=1e-5, atol=1e-7)
    for k in m_full:
      np.testing.assert_allclose(losses.finish(m_acc[k]), losses.finish(m_full[k]), rtol=1e-5,
                                 err_msg=k)

  def test_microbatch_mean_of_means_differs(self):
    # Guard that the split above is informative: averaging per-micro-batch means is not exact.
    logp, old, adv, mask, _ = _random_batch(0)
    mean = jax.jit(lambda *a: losses.finish(losses.policy_loss(*a)[0]))
    full = mean(logp, old, adv, mask)
    means = [mean(logp[s], old[s], adv[s], mask[s]) for s in (slice(0, 2), slice(2, 6))]
    self.assertGreater(abs(float(np.mean(means)) - float(full)), 1e-3)

  def test_accumulate_type_mismatch(self):
    with pytest.raises(TypeError, match="SumCount"):
      losses.accumulate({"a": SumCount(1.0, 1.0)}, {"a": losses.Min(1.0)})


class KLTest(parameterized.TestCase):
  # log π = log 0.5, log π_ref = log 0.25: d = log π_ref − log π = −log 2.
  @parameterized.named_parameters(
      ("k1", "k1", math.log(2)),
      ("k2", "k2", 0.5 * math.log(2) ** 2),
      ("k3", "k3", 0.5 + math.log(2) - 1),
  )
  def test_hand_values(self, est, want):
    lp = jnp.full((1, 1), math.log(0.5))
    ref = jnp.full((1, 1), math.log(0.25))
    np.testing.assert_allclose(losses.kl_penalty(lp, ref, est), [[want]], rtol=1e-5)

  # With d = log π_ref − log π (dd/dlog π = −1): k1' = 1, k2' = −d = log 2, k3' = 1 − e^d = 0.5.
  @parameterized.named_parameters(("k1", "k1", 1.0), ("k2", "k2", math.log(2)),
                                  ("k3", "k3", 0.5))
  def test_gradients(self, est, want):
    lp = jnp.full((1, 1), math.log(0.5))
    ref = jnp.full((1, 1), math.log(0.25))
    g = jax.grad(lambda x: losses.kl_penalty(x, ref, est).sum())(lp)
    np.testing.assert_allclose(g, [[want]], rtol=1e-5)

  def test_in_policy_loss(self):
    lp = jnp.full((1, 2), math.log(0.5))
    ref = jnp.full((1, 2), math.log(0.25))
    mask = jnp.array([[1.0, 0.0]])
    cfg = PolicyLossConfig(kl_coef=0.1, kl_estimator="k3")
    # A = 0 leaves only β·k3.
    loss, m = losses.policy_loss(lp, lp, jnp.zeros((1,)), mask, ref, config=cfg)
    np.testing.assert_allclose(losses.finish(loss), 0.1 * (math.log(2) - 0.5), rtol=1e-5)
    np.testing.assert_allclose(losses.finish(m["kl"]), math.log(2) - 0.5, rtol=1e-5)

  def test_kl_needs_reference(self):
    x = jnp.zeros((1, 1))
    with pytest.raises(ValueError, match="ref_logprobs"):
      losses.policy_loss(x, x, jnp.zeros((1,)), x + 1, config=PolicyLossConfig(kl_coef=0.1))

  def test_reference_ignored_when_beta_zero(self):
    logp, old, adv, mask, ref = _random_batch(1)
    a = losses.policy_loss(logp, old, adv, mask)[0]
    b = losses.policy_loss(logp, old, adv, mask, ref)[0]
    np.testing.assert_allclose(b.sum, a.sum, rtol=1e-6)

  def test_unknown_estimator(self):
    with pytest.raises(ValueError, match="k4"):
      losses.kl_penalty(jnp.zeros((1, 1)), jnp.zeros((1, 1)), "k4")


class ConfigTest(parameterized.TestCase):

  def test_defaults_are_released_code(self):
    c = PolicyLossConfig()
    self.assertEqual((c.eps_low, c.eps_high, c.dual_clip_c, c.aggregation, c.kl_coef),
                     (0.2, 0.3, 3.0, "token_mean", 0.0))

  @parameterized.named_parameters(
      ("eps_low", dict(eps_low=1.0), "eps_low"),
      ("dual", dict(dual_clip_c=1.0), "dual_clip_c"),
      ("agg", dict(aggregation="mean"), "aggregation"),
      ("kl_est", dict(kl_estimator="k5"), "kl_estimator"),
      ("beta", dict(kl_coef=-1.0), "kl_coef"),
  )
  def test_invalid(self, kwargs, what):
    with pytest.raises(ValueError, match=what):
      PolicyLossConfig(**kwargs)

  def test_from_mapping_rejects_unknown_keys(self):
    self.assertEqual(PolicyLossConfig.from_mapping({"eps_high": 0.28}).eps_high, 0.28)
    with pytest.raises(KeyError, match="clip_ratio"):
      PolicyLossConfig.from_mapping({"clip_ratio": 0.2})


class ShardedTest(parameterized.TestCase):

  @parameterized.parameters(*losses.AGGREGATIONS)
  def test_row_sharded_batch_matches_single_device(self, aggregation):
    # The trainer shards rows over a data axis; the reductions must not depend on it.
    devices = np.array(jax.devices()[:8])
    if devices.size < 8:
      self.skipTest("needs the 8 fake CPU devices of tests/conftest.py")
    mesh = jax.sharding.Mesh(devices, ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    logp, old, adv, mask, ref = _random_batch(2, b=6)
    # Pad to 8 rows (2 empty ones) so every device holds one row.
    pad = lambda x: jnp.concatenate([x, jnp.zeros((2,) + x.shape[1:], x.dtype)])
    args = tuple(map(pad, (logp, old, adv, mask, ref)))
    cfg = PolicyLossConfig(aggregation=aggregation, kl_coef=0.05)
    f = lambda lp, o, a, m, r: jax.value_and_grad(
        lambda lp: losses.finish(losses.policy_loss(lp, o, a, m, r, config=cfg)[0]))(lp)
    v1, g1 = jax.jit(f)(*args)
    v8, g8 = jax.jit(f)(*(jax.device_put(x, rows) for x in args))
    self.assertEqual(len(g8.sharding.device_set), 8)
    np.testing.assert_allclose(v8, v1, rtol=1e-6)
    np.testing.assert_allclose(g8, g1, rtol=1e-6, atol=1e-9)
    # Padding rows change nothing.
    v0, _ = jax.jit(f)(logp, old, adv, mask, ref)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
