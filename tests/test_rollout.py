"""Tests for g2rpo_jax/rollout.py: sampling, EOS handling, log-prob agreement, sharing, mesh.

Two policies: a bigram model (logits = table[previous token]) whose distributions are set by
hand, for the sampler's statistics and EOS bookkeeping; and the nano tiny_vlm for agreement with
the trainer's `sequence_logprobs`, padding / neighbour invariance and the mesh.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from g2rpo_jax import models as M
from g2rpo_jax import rollout as R
from g2rpo_jax import sharding
from g2rpo_jax.models import interface
from g2rpo_jax.models import testing

# -- a hand-set bigram policy ----------------------------------------------------------------

V, EOS, PAD = 8, 2, 7


class Bigram(interface.PolicyModel):
  """logits(next | prev) = table[prev]; no attention, so the 'cache' holds bookkeeping only."""

  def __init__(self, table):
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))

  def hidden_states(self, prompt, response_tokens):
    return jax.nn.one_hot(jnp.concatenate([prompt.tokens, response_tokens], 1), V)

  def logits(self, hidden):
    return hidden @ self.table.value

  def prefill(self, prompt, cache_size):
    b, p = prompt.tokens.shape
    cache = interface.KVCache(
        k=(), v=(), valid=jnp.pad(prompt.mask, ((0, 0), (0, cache_size - p))),
        next_pos=jnp.sum(prompt.mask, 1, dtype=jnp.int32), index=jnp.full((b,), p, jnp.int32))
    return self.table.value[prompt.tokens[:, -1]], cache

  def decode(self, tokens, cache):
    return self.table.value[tokens], cache.replace(index=cache.index + 1,
                                                   next_pos=cache.next_pos + 1)


def _bigram(probs_from_prompt, probs_after):
  """Token 6 ends every prompt; its row is `probs_from_prompt`; every other row `probs_after`."""
  table = np.tile(np.log(np.asarray(probs_after, np.float64) + 1e-30), (V, 1))
  table[6] = np.log(np.asarray(probs_from_prompt, np.float64) + 1e-30)
  return table, M.split_model(Bigram(table))


def _prompts(b, p=4):
  tokens = np.full((b, p), PAD, np.int32)
  tokens[:, -2:] = [5, 6]
  mask = tokens != PAD
  return M.PromptBatch(tokens=jnp.asarray(tokens), mask=jnp.asarray(mask), vision=None)


FIRST = np.array([0.4, 0.3, 0.0, 0.2, 0.1, 0.0, 0.0, 0.0])  # no EOS, no pad as first token


@pytest.mark.parametrize("kw,expected", [
    (dict(), FIRST),
    (dict(temperature=0.5), FIRST**2 / (FIRST**2).sum()),
    (dict(top_k=2), np.array([4, 3, 0, 0, 0, 0, 0, 0]) / 7),
    # top_p 0.65: masses before tokens are 0, .4, .7 -> keeps two; 0.75 keeps three.
    (dict(top_p=0.65), np.array([4, 3, 0, 0, 0, 0, 0, 0]) / 7),
    (dict(top_p=0.75), np.array([4, 3, 0, 2, 0, 0, 0, 0]) / 9),
    (dict(greedy=True), np.eye(V)[0]),
])
def test_first_token_distribution_and_untruncated_logprobs(kw, expected):
  table, (graphdef, params) = _bigram(FIRST, np.full(V, 1 / V))
  s = R.SamplingConfig(max_new_tokens=1, eos_id=EOS, pad_id=PAD, **kw)
  n = 4000
  r = R.generate(graphdef, params, _prompts(1), jax.random.key(0), num_samples=n, sampling=s)
  freq = np.bincount(np.asarray(r.tokens[:, 0]), minlength=V) / n
  np.testing.assert_allclose(freq, expected, atol=0.03)  # ~4 sigma at n = 4000
  # Log-probs are of softmax(logits / T) over the full vocabulary, whatever the filter.
  ref = _log_softmax(table[6] / s.temperature)
  np.testing.assert_allclose(r.logprobs[:, 0], ref[np.asarray(r.tokens[:, 0])], atol=1e-5)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_eos_stops_rows_and_masks_the_rest():
  after = np.array([0.25, 0.25, 0.25, 0.25, 0, 0, 0, 0])  # EOS (2) with probability 1/4
  table, (graphdef, params) = _bigram(FIRST, after)
  t = 8
  s = R.SamplingConfig(max_new_tokens=t, eos_id=EOS, pad_id=PAD)
  r = R.generate(graphdef, params, _prompts(2), jax.random.key(3), num_samples=8, sampling=s)
  tokens, mask, lp = map(np.asarray, (r.tokens, r.mask, r.logprobs))
  kinds = set()
  for n in range(16):
    eos = np.nonzero(tokens[n] == EOS)[0]
    if len(eos):
      e = eos[0]
      kinds.add("stopped")
      assert mask[n].tolist() == [True] * (e + 1) + [False] * (t - e - 1)
      assert (tokens[n, e + 1:] == PAD).all() and (lp[n, e + 1:] == 0).all()
      assert r.lengths[n] == e + 1 and not r.truncated[n]
    else:
      kinds.add("truncated")
      assert mask[n].all() and r.lengths[n] == t and r.truncated[n]
    # Each real token's log-prob is the bigram's, given the previous token.
    prev = np.concatenate([[6], tokens[n, :-1]])
    ref = _log_softmax(table)[prev, tokens[n]]
    np.testing.assert_allclose(lp[n][mask[n]], ref[mask[n]], atol=1e-5)
  assert kinds == {"stopped", "truncated"}, "the key must give both kinds of rows"
  assert r.prompt_index.tolist() == [0] * 8 + [1] * 8
  # Running all T steps instead of leaving the loop early changes nothing.
  s_full = dataclasses.replace(s, stop_early=False)
  r2 = R.generate(graphdef, params, _prompts(2), jax.random.key(3), num_samples=8,
                  sampling=s_full)
  for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(r2)):
    np.testing.assert_array_equal(a, b)


def test_all_rows_stopping_at_once_leaves_padding():
  always_eos = np.eye(V)[EOS]
  _, (graphdef, params) = _bigram(always_eos, always_eos)
  s = R.SamplingConfig(max_new_tokens=5, eos_id=EOS, pad_id=PAD)
  r = R.generate(graphdef, params, _prompts(1), jax.random.key(0), num_samples=2, sampling=s)
  assert r.tokens.tolist() == [[EOS, PAD, PAD, PAD, PAD]] * 2
  assert r.lengths.tolist() == [1, 1] and not r.truncated.any()


def test_sampling_config_validation():
  with pytest.raises(ValueError, match="temperature must be > 0"):
    R.SamplingConfig(max_new_tokens=4, eos_id=2, temperature=0.0)
  with pytest.raises(ValueError, match="top_p must be in"):
    R.SamplingConfig(max_new_tokens=4, eos_id=2, top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    R.SamplingConfig(max_new_tokens=0, eos_id=2)


# -- the tiny VLM ----------------------------------------------------------------------------

NANO = M.tiny_vlm_config("nano")
PROMPTS = ["What is <image> here?", "count 3", "x", "<image> how many?", "abc", "hello there",
           "one more", "z<image>"]


@pytest.fixture(scope="module")
def vlm():
  return testing.host_init(NANO, seed=1)


def _images(n, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(n)]


def _vlm_batch(prompts, cfg=NANO, seed=0):
  imgs = _images(len(prompts), seed)
  imgs = [im if "<image>" in p else None for p, im in zip(prompts, imgs)]
  return jax.tree.map(jnp.asarray, M.build_processor(cfg)(prompts, imgs))


S07 = R.SamplingConfig(max_new_tokens=6, eos_id=2, temperature=0.7, top_k=20, top_p=0.9)
# Temperature traced: one compile per shape serves every temperature.
_seq_lp = jax.jit(M.sequence_logprobs)


def test_rollout_logprobs_equal_trainer_logprobs_at_temperature_07(vlm):
  graphdef, params = vlm
  pb = _vlm_batch(PROMPTS[:2])
  r = R.generate(graphdef, params, pb, jax.random.key(0), num_samples=3, sampling=S07)
  assert r.tokens.shape == (6, 6) and r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
  lp = _seq_lp(graphdef, params, M.repeat_rows(pb, 3), r.tokens, r.mask,
               temperature=jnp.float32(0.7))
  np.testing.assert_allclose(lp, r.logprobs, atol=1e-5)
  # At another temperature the same tokens have different log-probs: the check can fail.
  lp1 = _seq_lp(graphdef, params, M.repeat_rows(pb, 3), r.tokens, r.mask,
                temperature=jnp.float32(1.0))
  assert float(jnp.abs(lp1 - r.logprobs).max()) > 1e-2
  # The G samples of a prompt are distinct draws, not copies.
  assert len({tuple(x) for x in np.asarray(r.tokens[:3])}) > 1


def test_seed_determinism_and_no_retrace(vlm):
  graphdef, params = vlm
  pb = _vlm_batch(PROMPTS[:2])
  r1 = R.generate(graphdef, params, pb, jax.random.key(5), num_samples=3, sampling=S07)
  n_compiled = R.generate._cache_size()
  pb2 = _vlm_batch(PROMPTS[2:4])  # other prompts, same shapes
  R.generate(graphdef, params, pb2, jax.random.key(6), num_samples=3, sampling=S07)
  r2 = R.generate(graphdef, params, pb, jax.random.key(5), num_samples=3, sampling=S07)
  assert R.generate._cache_size() == n_compiled
  np.testing.assert_array_equal(r1.tokens, r2.tokens)
  np.testing.assert_array_equal(r1.logprobs, r2.logprobs)
  r3 = R.generate(graphdef, params, pb, jax.random.key(7), num_samples=3, sampling=S07)
  assert (np.asarray(r3.tokens) != np.asarray(r1.tokens)).any()


def test_result_independent_of_neighbours_and_padding(vlm):
  graphdef, params = vlm
  key = jax.random.key(11)
  a = PROMPTS[0]
  outs = [R.generate(graphdef, params, _vlm_batch([a, other]), key, num_samples=3,
                     sampling=S07) for other in ("count 3", "a much longer neighbour <image>")]
  wide = dataclasses.replace(NANO, max_prompt_len=48)
  outs.append(R.generate(graphdef, params, _vlm_batch([a, "q"], wide), key, num_samples=3,
                         sampling=S07))
  for o in outs[1:]:
    np.testing.assert_array_equal(o.tokens[:3], outs[0].tokens[:3])
    np.testing.assert_allclose(o.logprobs[:3], outs[0].logprobs[:3], atol=1e-5)


def test_prefill_runs_once_per_prompt_not_per_sample(vlm, monkeypatch):
  graphdef, params = vlm
  seen = {"prefill": [], "decode": []}
  orig_prefill, orig_decode = M.TinyVLM.prefill, M.TinyVLM.decode

  def prefill(self, prompt, cache_size):
    seen["prefill"].append(prompt.tokens.shape)
    return orig_prefill(self, prompt, cache_size)

  def decode(self, tokens, cache):
    seen["decode"].append(tokens.shape)
    return orig_decode(self, tokens, cache)

  monkeypatch.setattr(M.TinyVLM, "prefill", prefill)
  monkeypatch.setattr(M.TinyVLM, "decode", decode)
  pb = _vlm_batch(PROMPTS[:2])
  s = dataclasses.replace(S07, max_new_tokens=5)  # a new static arg: forces a fresh trace
  R.generate.trace(graphdef, params, pb, jax.random.key(0), num_samples=4, sampling=s)
  # One prefill over the B=2 prompts (not B*G=8 rows); the decode step is traced once (inside
  # the loop) and runs on all B*G rows.
  assert seen == {"prefill": [(2, 32)], "decode": [(8,)]}


def test_mesh_rollout_equals_single_device(vlm):
  graphdef, params = vlm
  assert len(jax.devices()) == 8, "tests/conftest.py should give 8 fake CPU devices"
  s = R.SamplingConfig(max_new_tokens=6, eos_id=2, temperature=1.0)
  pb = _vlm_batch(PROMPTS)
  key = jax.random.key(2)
  single = R.generate(graphdef, params, pb, key, num_samples=2, sampling=s)
  mesh = sharding.make_mesh(data=2, fsdp=4)
  params_sh = sharding.shard_state(params, mesh)
  pb_sh = sharding.shard_batch(pb, mesh)
  multi = R.generate(graphdef, params_sh, pb_sh, key, num_samples=2, sampling=s)
  assert len(multi.tokens.sharding.device_set) == 8
  np.testing.assert_array_equal(multi.tokens, single.tokens)
  np.testing.assert_array_equal(multi.mask, single.mask)
  np.testing.assert_allclose(multi.logprobs, single.logprobs, atol=1e-5)
  # At temperature 1 too, the sampler's log-probs are the trainer's.
  lp = _seq_lp(graphdef, params, M.repeat_rows(pb, 2), single.tokens, single.mask,
               temperature=jnp.float32(1.0))
  np.testing.assert_allclose(lp, single.logprobs, atol=1e-5)


def test_bf16_model_rollout_types():
  cfg = dataclasses.replace(NANO, dtype="bfloat16", param_dtype="bfloat16")
  graphdef, params = testing.host_init(cfg)
  s = R.SamplingConfig(max_new_tokens=4, eos_id=2)
  out = jax.eval_shape(lambda p, pb, k: R.generate(graphdef, p, pb, k, num_samples=2, sampling=s),
                       params, _vlm_batch(PROMPTS[:2], cfg), jax.random.key(0))
  assert out.tokens.shape == (4, 4) and out.tokens.dtype == jnp.int32
  assert out.logprobs.dtype == jnp.float32 and out.mask.dtype == jnp.bool_
  assert out.truncated.shape == (4,) and out.prompt_index.dtype == jnp.int32


# Chi-square critical values at p = 0.001 by degrees of freedom (standard tables).
_CHI2_CRIT_999 = {2: 13.82, 5: 20.52}


@pytest.mark.parametrize("kw,expected", [
    (dict(), np.array([0.5, 0.2, 0.0, 0.15, 0.1, 0.04, 0.01, 0.0])),
    # top_k=3 keeps 0.5, 0.2, 0.15, renormalised.
    (dict(top_k=3), np.array([0.5, 0.2, 0.0, 0.15, 0.0, 0.0, 0.0, 0.0]) / 0.85),
])
def test_sampled_frequencies_pass_a_chi_square_test(kw, expected):
  """Many independent rows from one fixed distribution: the inverse-CDF sampler's frequencies
  fit it (chi-square over the tokens of non-zero probability), and zero-probability tokens never
  appear. An off-by-one in the CDF search shifts whole masses between neighbours and fails."""
  table, (graphdef, params) = _bigram(expected, np.full(V, 1 / V))
  s = R.SamplingConfig(max_new_tokens=1, eos_id=EOS, pad_id=PAD, **kw)
  n = 20000
  r = R.generate(graphdef, params, _prompts(1), jax.random.key(7), num_samples=n, sampling=s)
  counts = np.bincount(np.asarray(r.tokens[:, 0]), minlength=V)
  live = expected > 0
  assert counts[~live].sum() == 0, counts
  want = n * expected[live]
  chi2 = float(((counts[live] - want) ** 2 / want).sum())
  assert chi2 < _CHI2_CRIT_999[int(live.sum()) - 1], (chi2, counts, want)


@pytest.mark.parametrize("v", [1, 8, 37, 2048])
def test_blocked_cumsum_equals_numpy_cumsum(v):
  x = np.random.default_rng(v).random((3, v)).astype(np.float32)
  got = np.asarray(R._cumsum(jnp.asarray(x)))
  assert got.shape == (3, v)
  np.testing.assert_allclose(got, np.cumsum(x.astype(np.float64), axis=-1), rtol=1e-5)
