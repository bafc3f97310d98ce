"""The training job end to end on the smoke config (in-process, 8 fake CPU devices):
train a few steps, resume, evaluate; the sharded update equals the 1-device update; the NaN
guard; reward functions that fail."""
import json
import math
import os
import tempfile

import jax
import numpy as np
import pytest

from g2rpo_jax import config_utils, metrics, trainer as trainer_lib

# The same persistent compilation cache as the subprocess tests (test_train_resume,
# test_distributed): programs compiled here are loaded there instead of compiled again.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "g2rpo_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# The end-to-end runs use one device (compiles faster, and the programs are shared with the
# 1-device side of the sharded test); the 8-device mesh is exercised by that test.
ONE = jax.devices()[:1]


def smoke(*overrides):
  c = config_utils.load_config("smoke")
  config_utils.apply_overrides(c, ["warm_start.steps=2", "train.num_steps=2",
                                   "train.checkpoint_every=1", "tasks.eval_size=2",
                                   "eval.batch_size=12", *overrides])
  return c


def _steps(workdir, name="metrics.jsonl"):
  return [r["step"] for r in metrics.read_jsonl(os.path.join(workdir, name))]


def test_smoke_train_resume_eval(tmp_path):
  wd = str(tmp_path / "run")
  summary = trainer_lib.train_and_evaluate(smoke(), wd, ONE)
  assert summary["status"] == "done" and summary["step"] == 2
  names = set(smoke().tasks.names)
  assert set(summary["warm_start"]) == names and set(summary["after_rl"]) == names
  assert _steps(wd) == [0, 1, 2]
  recs = metrics.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  last = recs[-1]
  # The headline metrics of the issue are all logged, per task and global.
  for key in ("loss/total", "loss/pg_loss", "loss/clip_frac_low", "loss/clip_frac_high",
              "loss/clip_frac_dual", "loss/approx_kl", "grad_norm", "lr", "skipped_updates",
              "reward/all", "sampling_rounds", "eval/mean"):
    assert key in last, key
  for prefix in ("reward", "accuracy", "format", "response_length", "clipped_frac",
                 "zero_var_frac", "filtered_groups", "reward_failures"):
    assert any(k.startswith(prefix + "/") for k in last), prefix
  assert any(k.startswith("grad_norm/") for k in recs[1])  # grad_norm_every = 2: step 0
  assert any(k.startswith("adv_var/") for k in last) and any(k.startswith("entropy/")
                                                              for k in last)
  assert math.isclose(last["lr"], smoke().optimizer.lr, rel_tol=1e-6)
  # β = 0 (the default): no reference model, so no KL metrics and no reference log-prob stage.
  assert not any("kl" in k and k != "loss/approx_kl" for k in last)
  perf = metrics.read_jsonl(os.path.join(wd, "perf.jsonl"))
  assert {"time/rollout_s", "time/update_s", "time/step_s", "time/update_mfu_vs_matmul",
          "time/sampled_tokens_per_s"} <= set(perf[-1])
  assert "time/eval_s" in perf[-1] and "time/warm_start_s" in perf[0]
  assert "time/ref_logprob_s" not in perf[-1]
  for f in ("summary.txt", "summary.json", "eval_final.json", "eval_warm_start.json",
            "config.json"):
    assert os.path.exists(os.path.join(wd, f)), f
  with open(os.path.join(wd, "summary.txt")) as f:
    table = f.read()
  assert "warm start" in table and "after RL" in table and "MEAN" in table
  assert sorted(os.listdir(os.path.join(wd, "plots"))) == sorted(f"{n}.png" for n in names)
  assert os.listdir(os.path.join(wd, "tb"))
  ws_dir = os.path.join(wd, "warm_start")
  ws_mtime = os.path.getmtime(ws_dir)

  # Resume: the same workdir with more steps continues at step 2, rewrites nothing before it.
  summary = trainer_lib.train_and_evaluate(smoke("train.num_steps=3"), wd, ONE)
  assert summary["status"] == "done" and summary["step"] == 3
  assert _steps(wd) == [0, 1, 2, 3]
  assert os.path.getmtime(ws_dir) == ws_mtime
  ckpts = sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit())
  assert ckpts == [1, 2, 3]

  # Evaluation of a chosen checkpoint: table + JSON.
  from experiments import eval as eval_main
  label, result = eval_main.evaluate_checkpoint(smoke(), wd, "2", devices=ONE)
  assert label == "2" and set(result) == names
  with open(os.path.join(wd, "eval_validation_2.json")) as f:
    payload = json.load(f)
  assert payload["checkpoint"] == "2" and set(payload["tasks"]) == names
  assert all(0.0 <= v["score"] <= 1.0 and v["count"] == 2 for v in result.values())

  # A config naming an initial checkpoint skips the warm start and starts from its params:
  # its "warm start" evaluation equals the evaluation of checkpoint 2 above.
  wd2 = str(tmp_path / "from_init")
  summary = trainer_lib.train_and_evaluate(
      smoke("train.num_steps=1", "train.eval_every=1",
            f"init_checkpoint={os.path.join(wd, 'checkpoints', '2')}"), wd2, ONE)
  assert summary["status"] == "done"
  assert not os.path.exists(os.path.join(wd2, "warm_start"))
  assert {k: v["score"] for k, v in summary["warm_start"].items()} == \
      {k: v["score"] for k, v in result.items()}


def test_sharded_update_matches_single_device(tmp_path):
  assert jax.device_count() == 8
  cfg8 = smoke("mesh.data=2", "mesh.fsdp=4", "train.grad_norm_every=0")
  cfg1 = smoke("train.grad_norm_every=0")
  one = trainer_lib.Trainer(cfg1, str(tmp_path / "one"), devices=jax.devices()[:1])
  eight = trainer_lib.Trainer(cfg8, str(tmp_path / "eight"))
  assert dict(eight.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  s1 = one.init_state(one._init_params)
  s8 = eight.init_state(eight._init_params)
  np.testing.assert_array_equal(jax.device_get(s1.params["embed"]),
                                jax.device_get(s8.params["embed"]))
  for step in range(2):
    key = jax.random.key(step)
    batch1, m1, _ = one.collect(s1.params, step, key)
    host = jax.device_get(batch1)
    batch8 = trainer_lib.to_global(eight.mesh, host)
    assert batch8.tokens.sharding.spec[0] == ("data", "fsdp")
    s1, d1 = one.train_step_fn(batch1)(s1, batch1)
    s8, d8 = eight.train_step_fn(batch8)(s8, batch8)
    d1, d8 = jax.device_get(d1), jax.device_get(d8)
    assert float(d1["grad_norm"]) > 0  # the update did real work
    for k in ("loss/total", "loss/pg_loss", "grad_norm"):
      np.testing.assert_allclose(d8[k], d1[k], rtol=1e-4, atol=1e-6, err_msg=k)
  flat1 = jax.tree.leaves(jax.device_get(s1.params))
  flat8 = jax.tree.leaves(jax.device_get(s8.params))
  for a, b in zip(flat1, flat8):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
  # Some parameter is actually split over the fsdp axis.
  specs = [s.spec for s in jax.tree.leaves(eight.param_sharding)]
  assert any("fsdp" in tuple(sp) for sp in specs)


def test_nan_guard_skips_updates_then_stops_naming_the_step(tmp_path, monkeypatch):
  wd = str(tmp_path / "nan")
  cfg = smoke("warm_start.enabled=False", "train.num_steps=4", "train.max_nonfinite=3",
              "train.grad_norm_every=0")
  collect = trainer_lib.Trainer.collect

  def poisoned(self, params, step, key):
    # A NaN reward leaking into the advantages of steps 2 and 3 (1-based metric steps).
    batch, m, timing = collect(self, params, step, key)
    if step + 1 in (2, 3):
      batch = batch.replace(advantages=batch.advantages * np.nan)
    return batch, m, timing

  monkeypatch.setattr(trainer_lib.Trainer, "collect", poisoned)
  # 2 mini-batches per step: steps 2 and 3 skip 4 updates in a row > max_nonfinite = 3.
  with pytest.raises(trainer_lib.NonFiniteError) as e:
    trainer_lib.train_and_evaluate(cfg, wd, ONE)
  msg = str(e.value)
  assert msg.startswith("step 3: 4 non-finite updates in a row (train.max_nonfinite = 3)")
  assert "tasks in the batch: ['" in msg and "last finite metrics" in msg
  assert "last finite metrics (step 1)" in msg and '"loss/total"' in msg
  by_step = {r["step"]: r for r in metrics.read_jsonl(os.path.join(wd, "metrics.jsonl"))}
  assert by_step[1]["skipped_updates"] == 0 and by_step[2]["skipped_updates"] == 2
  assert by_step[3]["nonfinite_updates_total"] == 4
  # Skipped means skipped: the params after step 2 equal those after step 1.
  import orbax.checkpoint as ocp
  ck = os.path.join(wd, "checkpoints")
  p1 = ocp.StandardCheckpointer().restore(os.path.join(ck, "1", "state"))["params"]
  p2 = ocp.StandardCheckpointer().restore(os.path.join(ck, "2", "state"))["params"]
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(a, b)
  assert "3" not in os.listdir(ck)  # the run stopped before saving the failed step


class _Task:
  def __init__(self, name, fn):
    self.name, self._fn = name, fn

  def reward(self, text, ex):
    return self._fn(text)

  @staticmethod
  def format_reward(text):
    return 1.0


class _Ex:
  def __init__(self, task):
    self.task = task


def test_tasks_generate_at_the_configured_difficulty_in_every_split():
  c = config_utils.load_config("smoke")
  config_utils.apply_overrides(c, ["tasks.difficulty.arithmetic.n_digits=1",
                                   "tasks.difficulty.arithmetic.ops=+-"])
  by_name = {t.name: t for t in trainer_lib.get_tasks(c)}
  assert list(by_name) == list(c.tasks.names)
  for split in ("train", "validation"):  # RL / warm start and the held-out evaluation
    ex = by_name["arithmetic"].example(split, 0)
    assert len(ex.meta["digits"]) == 1 and ex.difficulty == {"n_digits": 1, "ops": "+-"}
    assert by_name["ocr"].example(split, 0).difficulty == {"length": 3, "clutter": 0}
  c.tasks.difficulty["ocrr"] = {"length": 4}
  with pytest.raises(config_utils.ConfigError, match=r"knobs given for unknown task\(s\) "
                     r"\['ocrr'\]; built-in tasks: \['arithmetic'"):
    trainer_lib.get_tasks(c)


def test_failing_or_nan_rewards_score_zero_and_are_counted():
  def boom(text):
    raise ValueError("parser exploded")
  tasks = {"ok": _Task("ok", lambda t: 0.5), "bad": _Task("bad", boom),
           "nan": _Task("nan", lambda t: float("nan"))}
  failures = {}
  exs = [_Ex("ok"), _Ex("bad"), _Ex("nan"), _Ex("bad")]
  acc, fmt = trainer_lib.score_responses(["a", "b", "c", "d"], exs, tasks, failures)
  np.testing.assert_array_equal(acc, [0.5, 0.0, 0.0, 0.0])
  np.testing.assert_array_equal(fmt, [1.0, 0.0, 0.0, 0.0])
  assert failures == {"bad": 2, "nan": 1}


def test_prompt_sampler_resumes_exactly():
  class T:
    def __init__(self, name):
      self.name = name

    def example(self, split, index):
      return (self.name, split, index)
  tasks = [T("a"), T("b"), T("c")]
  s = trainer_lib.PromptSampler(tasks, [1.0, 0.0, 3.0], seed=0, train_size=100)
  first = s.next(5)
  state = s.get_state()
  rest = s.next(20)
  s2 = trainer_lib.PromptSampler(tasks, [1.0, 0.0, 3.0], seed=0, train_size=100)
  s2.set_state(state)
  assert s2.next(20) == rest
  drawn = first + rest
  assert all(n != "b" for n, _, _ in drawn)  # weight 0 is never drawn
  assert {n for n, _, _ in drawn} == {"a", "c"}
  other = trainer_lib.PromptSampler(tasks, [1.0, 0.0, 3.0], seed=0, train_size=100,
                                    process_index=1)
  assert other.next(25) != drawn  # each host draws its own shard


def _micro_setup(aggregation):
  """A synthetic mini-batch setup on a nano text decoder: 16 rows of uneven lengths (one empty),
  two tasks whose entropies sit above / below their bands, ratios around 1 (some clipped)."""
  import jax.numpy as jnp
  from g2rpo_jax import losses
  from g2rpo_jax.models import interface as model_api
  from g2rpo_jax.models import testing, tiny_vlm
  mcfg = tiny_vlm.tiny_vlm_config("nano", vision=False)
  graphdef, params = testing.host_init(mcfg, seed=0)
  params = params.to_pure_dict()
  rng = np.random.default_rng(0)
  n, p, t = 16, 6, 8
  prompt = model_api.PromptBatch(
      tokens=jnp.asarray(rng.integers(4, mcfg.vocab_size, (n, p)), jnp.int32),
      mask=jnp.ones((n, p), bool))
  tokens = jnp.asarray(rng.integers(4, mcfg.vocab_size, (n, t)), jnp.int32)
  lengths = rng.integers(1, t + 1, n)
  lengths[5] = 0  # a padding row: counts in no aggregation mode
  mask = jnp.asarray(np.arange(t)[None] < lengths[:, None])
  logp = model_api.sequence_logprobs(graphdef, params, prompt, tokens, mask)
  old = logp + jnp.asarray(rng.normal(0, 0.2, (n, t)), jnp.float32)
  batch = trainer_lib.RLBatch(
      prompt=prompt, tokens=tokens, mask=mask, old_logprobs=old,
      advantages=jnp.asarray(rng.normal(size=n), jnp.float32),
      task_ids=jnp.asarray(np.arange(n) % 3 % 2, jnp.int32))
  # Random-init NLL is ~log(vocab) ≫ 1: task 0 is above its band, task 1 below its band.
  cfg = trainer_lib.StepConfig(
      num_tasks=2, num_minibatches=2, temperature=1.0,
      loss=losses.PolicyLossConfig(aggregation=aggregation, norm_len=float(t)),
      entropy_enabled=True, entropy_estimator="sampled_nll", entropy_lam=0.5,
      h_min=(0.2, 50.0), h_max=(0.6, 60.0))
  return graphdef, params, batch, cfg


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_microbatched_update_equals_unsplit(aggregation):
  import dataclasses
  import functools
  import jax.numpy as jnp
  import optax
  graphdef, params, batch, cfg = _micro_setup(aggregation)
  # Plain SGD: the parameter change is the (summed) gradient itself, so a wrong accumulation
  # shows up in the params (AdamW's first step is ~lr·sign(g) and would hide a scale error).
  tx = optax.sgd(1.0)
  state = trainer_lib.TrainState(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                                 rng=jnp.zeros((2,), jnp.uint32),
                                 nonfinite_streak=jnp.int32(0), nonfinite_total=jnp.int32(0))
  results = {}
  for k in (1, 4):
    step = jax.jit(functools.partial(trainer_lib.train_step, graphdef=graphdef, tx=tx,
                                     cfg=dataclasses.replace(cfg, num_microbatches=k),
                                     schedule=optax.constant_schedule(1.0)))
    new, m = jax.device_get(step(state, batch))
    delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new.params, params)
    results[k] = (delta, m)
  ref_delta, ref = results[1]
  assert ref["loss/entropy_penalty"] > 0.1  # the band is active for both tasks
  assert ref["grad_norm"] > 0 and ref["skipped_updates"] == 0
  for k in (4,):
    delta, m = results[k]
    assert set(m) == set(ref)
    for key in ref:
      np.testing.assert_allclose(m[key], ref[key], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{key}, {k} micro-batches")
    for a, b in zip(jax.tree.leaves(delta), jax.tree.leaves(ref_delta)):
      # atol: a few float32 ulps of the O(1) params the deltas were taken from.
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6,
                                 err_msg=f"params, {k} micro-batches")


def test_num_microbatches_must_divide_minibatch_rows():
  # smoke: 4 prompts × 4 samples / 2 mini-batches = 8 rows per update.
  config_utils.validate(smoke("batch.num_microbatches=4"))
  with pytest.raises(config_utils.ConfigError, match="batch.num_microbatches"):
    config_utils.validate(smoke("batch.num_microbatches=3"))


@pytest.mark.parametrize("num_minibatches", [2, 4])
def test_minibatch_split_groups_keeps_each_group_whole(num_minibatches):
  import jax.numpy as jnp
  g, prompts = 4, 8
  group_of_row = jnp.repeat(jnp.arange(prompts), g)  # rows are laid out group by group
  whole = np.asarray(trainer_lib._split_minibatches(group_of_row, num_minibatches, unit=g))
  spread = np.asarray(trainer_lib._split_minibatches(group_of_row, num_minibatches, unit=1))
  for split in (whole, spread):
    assert split.shape == (num_minibatches, prompts * g // num_minibatches)
    assert sorted(split.ravel().tolist()) == sorted(np.asarray(group_of_row).tolist())
  for mb in whole:  # every group present in a mini-batch is there with all its g rows
    assert all(np.sum(mb == k) == g for k in np.unique(mb))
  assert len({frozenset(np.unique(mb).tolist()) for mb in whole}) == num_minibatches
  for mb in spread:  # rows: every mini-batch holds an equal share of every group
    assert sorted(np.unique(mb).tolist()) == list(range(prompts))
    assert all(np.sum(mb == k) == g // num_minibatches for k in range(prompts))


def test_minibatch_split_config():
  cfg = smoke("batch.minibatch_split=groups")
  config_utils.validate(cfg)
  assert trainer_lib.step_config(cfg).minibatch_unit == cfg.rollout.group_size
  assert trainer_lib.step_config(smoke("batch.minibatch_split=rows")).minibatch_unit == 1
  with pytest.raises(config_utils.ConfigError, match="batch.minibatch_split"):
    config_utils.validate(smoke("batch.minibatch_split=prompts"))
