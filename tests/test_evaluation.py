"""Held-out evaluation (g2rpo_jax/evaluation.py) with scripted policies: scores are the tasks'
own rewards, hosts split the examples and agree after the gather, and a user's held-out JSONL
file (`data.user.eval_paths`) is scored beside the built-in tasks on its own records."""
import numpy as np
import pytest

from g2rpo_jax import config_utils, data_sources, evaluation
from g2rpo_jax import tasks as tasks_lib
from tests.test_data_sources import config, write_jsonl

TASKS = [tasks_lib.get_task("counting"), tasks_lib.get_task("spatial")]


def oracle(examples):
  return [tasks_lib.get_task(e.task).demonstration(e) for e in examples]


def test_an_oracle_scores_one_and_a_constant_answer_scores_its_hit_rate():
  got = evaluation.evaluate(oracle, TASKS, num_examples=10, batch_size=4)
  assert got == {t.name: {"score": 1.0, "format": 1.0, "count": 10,
                          "length": pytest.approx(got[t.name]["length"])} for t in TASKS}
  assert got["counting"]["length"] == pytest.approx(
      np.mean([len(r) for r in oracle([TASKS[0].example("validation", i) for i in range(10)])]))

  said = "<think>x</think><answer>left</answer>"
  const = evaluation.evaluate(lambda exs: [said] * len(exs), TASKS, num_examples=10, batch_size=3)
  # Hand count: the fraction of the 10 held-out spatial examples whose answer is "left".
  want = np.mean([TASKS[1].example("validation", i).answer == "left" for i in range(10)])
  assert const["spatial"]["score"] == pytest.approx(want)
  assert const["counting"]["score"] == 0.0 and const["counting"]["format"] == 1.0
  # A malformed response scores 0 and is not well-formed; a reward that raises counts as 0.
  bad = evaluation.evaluate(lambda exs: ["no tags"] * len(exs), TASKS, num_examples=4)
  assert all(v["score"] == 0.0 and v["format"] == 0.0 for v in bad.values())


def test_hosts_split_the_examples_and_the_gather_recombines_them():
  answers, calls = {}, {}

  def respond_as(p):
    def respond(examples):
      answers.setdefault(p, []).extend((e.task, e.index) for e in examples)
      calls[p] = calls.get(p, 0) + 1
      # Right on even indices only, so the score depends on which examples a host saw.
      return [oracle([e])[0] if e.index % 2 == 0 else "<think>x</think><answer>?</answer>"
              for e in examples]
    return respond

  one = evaluation.evaluate(respond_as("all"), TASKS, num_examples=7, batch_size=4)
  assert one["counting"]["score"] == pytest.approx(4 / 7)  # indices 0, 2, 4, 6 of 0..6
  partial = [evaluation.evaluate(respond_as(p), TASKS, num_examples=7, batch_size=2,
                                 process_index=p, process_count=3,
                                 gather=lambda s: s) for p in range(3)]
  # 14 examples over 3 hosts: 5, 5, 4, in 3 calls of 2 each (a rollout is a collective, so
  # every host calls as often); host 2's last call is a filler whose answer is not scored.
  assert [calls[p] for p in range(3)] == [3, 3, 3]
  assert [len(answers[p]) for p in range(3)] == [5, 5, 5]
  seen = answers[0] + answers[1] + answers[2][:4]
  assert sorted(seen) == sorted(answers["all"])
  # Summing the hosts' per-task sums (what the trainer's all-host gather does) gives the
  # single-host result.
  sums = {t: sum(r[t]["score"] * r[t]["count"] for r in partial) for t in one}
  counts = {t: sum(r[t]["count"] for r in partial) for t in one}
  assert counts == {t: 7 for t in one}
  assert {t: sums[t] / counts[t] for t in one} == pytest.approx(
      {t: one[t]["score"] for t in one})
  with pytest.raises(ValueError, match="split 'train' is not held out"):
    evaluation.evaluate(oracle, TASKS, split="train")


def test_user_eval_file_is_scored_on_its_own_records(tmp_path):
  train = write_jsonl(str(tmp_path / "train"), name="mine.jsonl", n=6)
  held = write_jsonl(str(tmp_path / "held"), name="mine_eval.jsonl", n=3)
  c = config(f"data.user.paths=('{train}',)", f"data.user.eval_paths=('{held}',)")
  config_utils.validate(c)
  comps = data_sources.user_components(c)
  (task,) = data_sources.user_eval_tasks(c, comps)
  assert task.name == "mine" and len(task) == 3 and task.role == comps[0].role
  ex = task.example("validation", 0)
  assert (ex.task, ex.split, ex.meta["line"]) == ("mine", "validation", 1)
  assert ex.meta["file"].endswith("mine_eval.jsonl")
  with pytest.raises(ValueError, match="held-out data"):
    task.example("train", 0)

  # The file's three records: counting "1", a grounding box, regression 2.5 (write_jsonl).
  def respond(examples):
    return ["<think>x</think><answer>1</answer>" if e.task == "mine" else oracle([e])[0]
            for e in examples]

  got = evaluation.evaluate(respond, TASKS + [task], num_examples=5, batch_size=4)
  # Scored on its 3 records only (not 5); "1" is right for the counting record alone.
  assert got["mine"]["count"] == 3 and got["mine"]["score"] == pytest.approx(1 / 3)
  assert got["counting"]["count"] == 5 and got["counting"]["score"] == 1.0

  # No eval file: no eval task; a missing one is a config error naming the key.
  assert data_sources.user_eval_tasks(config(f"data.user.paths=('{train}',)"), comps) == []
  for bad in (f"data.user.eval_paths=('{tmp_path}/nope.jsonl',)",
              f"data.user.eval_paths=('{held}', '{held}')"):
    with pytest.raises(config_utils.ConfigError, match="data.user.eval_paths"):
      config_utils.validate(config(f"data.user.paths=('{train}',)", bad))
  config_utils.validate(config(f"data.user.paths=('{train}',)", "data.user.eval_paths=('',)"))
