"""The training job on its other data sources and with the KL term (smoke config, 1 device):
TFDS-prepared built-in tasks + a user JSONL component + β > 0 train, and a resumed run repeats
an uninterrupted one exactly (data position and KL reference restored); β = 0 keeps no
reference."""
import dataclasses
import json
import os

import jax
import pytest
import numpy as np

from g2rpo_jax import metrics, trainer as trainer_lib
from g2rpo_jax import tasks as tasks_lib
from tests.test_data_sources import write_jsonl
# The smoke config, one device and the shared persistent compile cache of the trainer tests.
from tests.test_trainer import ONE, smoke


def config(*overrides):
  return smoke("train.num_steps=3", "tasks.eval_size=1", "eval.batch_size=6",
               "train.grad_norm_every=2", "train.plots=False", *overrides)


def _records(wd):
  return {r["step"]: r for r in metrics.read_jsonl(os.path.join(wd, "metrics.jsonl"))}


def _params(wd, step):
  import orbax.checkpoint as ocp
  tree = ocp.StandardCheckpointer().restore(os.path.join(wd, "checkpoints", str(step), "state"))
  return jax.tree.leaves(tree["params"])


def _overrides(tmp_path):
  path = write_jsonl(str(tmp_path / "user"), name="mine.jsonl", n=6)
  held = write_jsonl(str(tmp_path / "user_eval"), name="mine_eval.jsonl", n=3)
  # One mini-batch per step: the step-1 update sees the policy before any change (KL = 0).
  # lr 1e-3 so that 2 updates move the nano policy measurably away from the reference.
  return ["data.source=tfds", f"data.user.paths=('{path}',)", "data.user.weights=(2.0,)",
          f"data.user.eval_paths=('{held}',)",
          "loss.kl_coef=0.1", "batch.num_minibatches=1", "optimizer.lr=1e-3"]


def test_kl_tfds_and_user_data_train_and_resume_exactly(tmp_path):
  overrides = _overrides(tmp_path)
  straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
  s = trainer_lib.train_and_evaluate(config(*overrides), straight, ONE)
  assert s["status"] == "done" and s["step"] == 3
  assert os.listdir(os.path.join(straight, "data", "g2rpo_tasks"))  # prepared in the workdir
  recs = _records(straight)
  # The user file is a task of its own: drawn, scored and reported beside the built-in ones.
  assert any(not np.isnan(recs[k].get("reward/mine", np.nan)) for k in (1, 2, 3))
  assert "entropy/mine" in recs[3] or any("entropy/mine" in recs[k] for k in (1, 2))
  # Its held-out file is scored with the built-in tasks (tasks.eval_size = 1 record each here),
  # before and after RL, and is a row of the summary.
  for name in ("eval_warm_start.json", "eval_final.json"):
    with open(os.path.join(straight, name)) as f:
      scores = json.load(f)
    assert scores["mine"]["count"] == 1 and scores["counting"]["count"] == 1, name
  assert "mine" in s["after_rl"] and "eval/mine" in recs[3]
  # KL to the frozen reference: 0 while the policy is the reference, then positive and growing.
  assert abs(recs[1]["loss/kl"]) < 1e-6 and abs(recs[1]["kl/rollout"]) < 1e-6
  assert recs[2]["kl/rollout"] > 1e-6
  assert recs[3]["loss/kl"] > 1e-6 and recs[3]["kl/rollout"] > recs[2]["kl/rollout"]
  perf = metrics.read_jsonl(os.path.join(straight, "perf.jsonl"))
  assert "time/ref_logprob_s" in perf[-1]

  # 2 steps, then the same workdir on to 3: the resumed step 3 draws the same prompts (TFDS +
  # user data position) and uses the same reference (re-derived from the cached warm start).
  trainer_lib.train_and_evaluate(config(*overrides, "train.num_steps=2"), broken, ONE)
  s2 = trainer_lib.train_and_evaluate(config(*overrides), broken, ONE)
  assert s2["step"] == 3
  got = _records(broken)
  assert sorted(got) == sorted(recs) == [0, 1, 2, 3]
  for step in recs:
    # The 2-step run evaluated at its end (step 2); the uninterrupted one did not.
    want = {k: v for k, v in recs[step].items() if not k.startswith("eval/")}
    have = {k: v for k, v in got[step].items() if not k.startswith("eval/")}
    assert have == want, step
  for a, b in zip(_params(straight, 3), _params(broken, 3)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(_params(straight, 2),
                                                       _params(straight, 3)))


def test_reference_is_a_frozen_copy_and_absent_without_kl(tmp_path):
  # The same shapes and step config as the test above (its compiled programs are reused).
  overrides = _overrides(tmp_path) + ["warm_start.enabled=False"]
  c = config(*overrides)
  tr = trainer_lib.Trainer(c, str(tmp_path / "kl"), ONE)
  params = tr.initial_params()
  before = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))]
  tr.set_reference(params)
  state = tr.init_state(params)
  for step in range(2):
    batch, m, timing = tr.collect(state.params, step, jax.random.key(step))
    assert batch.ref_logprobs is not None and "ref_logprob_s" in timing
    state, _ = tr.train_step_fn(batch)(state, batch)  # donates the state (and the init params)
  # The reference survived the donation and did not move with the policy.
  ref = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tr.ref_params))]
  for a, b in zip(ref, before):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, np.asarray(b)) for a, b in
             zip(before, jax.tree.leaves(jax.device_get(state.params))))
  # β = 0: no reference kept, no reference log-probs, no KL metric.
  c0 = config(*overrides, "loss.kl_coef=0.0")
  tr0 = trainer_lib.Trainer(c0, str(tmp_path / "nokl"), ONE)
  p0 = tr0.initial_params()
  tr0.set_reference(p0)
  assert tr0.ref_params is None
  batch, m, timing = tr0.collect(p0, 0, jax.random.key(0))
  assert batch.ref_logprobs is None and "ref_logprob_s" not in timing
  assert "kl/rollout" not in m


def test_prompts_that_do_not_fit_fail_up_front_naming_file_line_or_example(tmp_path):
  path = write_jsonl(str(tmp_path / "user"), name="mine.jsonl", n=4)
  with open(path, "a") as f:
    f.write(json.dumps({"image": "img0.png", "problem": "Why? " * 20, "answer": "1",
                        "problem_type": "counting"}) + "\n")
  c = config(f"data.user.paths=('{path}',)", "warm_start.enabled=False")
  # Found while the trainer is built, before any step: the file and the 1-based line.
  with pytest.raises(ValueError, match=r"mine.jsonl, line 5, field 'prompt': prompt 0 is \d+ "
                                       r"tokens .* longer than max_prompt_len"):
    trainer_lib.Trainer(c, str(tmp_path / "wd"), ONE)
  # A built-in example that does not fit names its task, split and index, not a batch row.
  tr = trainer_lib.Trainer(config("warm_start.enabled=False"), str(tmp_path / "wd2"), ONE)
  ok = tasks_lib.get_task("counting").example("train", 0)
  long = dataclasses.replace(tasks_lib.get_task("ocr").example("train", 3), prompt="x" * 200)
  with pytest.raises(ValueError, match=r"task 'ocr' \(train example 3\): prompt 0 is"):
    tr.encode_prompts([ok, long])
