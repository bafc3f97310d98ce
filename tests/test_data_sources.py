"""Prompt streams of the trainer (g2rpo_jax/data_sources.py): TFDS-prepared built-in tasks,
generated ones, user JSONL components; exact resume, per-host shards, RL-only user data."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from g2rpo_jax import config_utils, data_sources
from g2rpo_jax import tasks as tasks_lib
from g2rpo_jax.tasks import user_data

TWO = ("counting", "ocr")


def write_jsonl(directory, name="my_data.jsonl", n=6):
  """n records cycling through counting / grounding / regression problems, with PNG images."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  records = []
  for i in range(n):
    img = f"img{i}.png"
    Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8)).save(
        os.path.join(directory, img))
    kind = i % 3
    if kind == 0:
      records.append({"image": img, "problem": "<image>How many dots?", "answer": str(i + 1),
                      "problem_type": "counting"})
    elif kind == 1:
      records.append({"image": img, "question": "Box of the dot?", "answer": [0, 0, 20, 10],
                      "problem_type": "grounding"})
    else:
      records.append({"image": img, "prompt": "Value?", "solution": "<answer>2.5</answer>",
                      "problem_type": "regression"})
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(r) for r in records) + "\n")
  return path


def config(*overrides, tasks=TWO):
  c = config_utils.load_config("smoke")
  config_utils.apply_overrides(c, [f"tasks.names={tasks!r}",
                                   f"tasks.weights={tuple(1.0 for _ in tasks)!r}",
                                   "tasks.train_size=16", *overrides])
  return c


def _key(ex):
  return (ex.task, ex.index, ex.prompt, json.dumps(ex.answer), ex.image.tobytes())


def test_tfds_stream_prepares_into_the_workdir_and_reads_the_generated_examples(tmp_path):
  c = config("data.source=tfds")
  config_utils.validate(c)
  stream = data_sources.rl_stream(c, str(tmp_path), 4, process_index=0, process_count=1)
  assert os.path.isdir(tmp_path / "data")  # tasks.data_dir "" -> <workdir>/data
  drawn = [ex for _ in range(6) for ex in stream.next(4)]
  assert {ex.task for ex in drawn} == set(TWO)
  for ex in drawn:
    # What TFDS stored at index i is what the task generates for ("train", i).
    want = tasks_lib.get_task(ex.task).example("train", ex.index)
    assert _key(ex) == _key(want)
  # Each prepared source holds exactly the train examples 0..train_size-1 of its task (TFDS
  # shuffles the records on write, so the mixture reads them in another, still seeded, order).
  for name, src in data_sources._builtin_sources(c, str(tmp_path), TWO).items():
    assert sorted(ex.index for ex in src) == list(range(16)), name
    gen = data_sources.GeneratedSource(tasks_lib.TASKS[name], "train", 16)
    assert sorted(_key(e) for e in src) == sorted(_key(e) for e in gen), name
  # An explicit data dir is used instead.
  c2 = config("data.source=tfds", f"tasks.data_dir={tmp_path / 'elsewhere'}")
  data_sources.prepare(c2, str(tmp_path / "wd2"))
  assert os.listdir(tmp_path / "elsewhere") and not os.path.exists(tmp_path / "wd2" / "data")


def test_generate_without_user_data_is_the_unchanged_prompt_sampler(tmp_path):
  c = config()
  stream = data_sources.rl_stream(c, str(tmp_path), 4, process_index=0, process_count=1)
  assert isinstance(stream, data_sources.PromptSampler)
  assert not os.path.exists(tmp_path / "data")
  # The draws of the sampler the trainer always used: (seed, process, position) -> task, index.
  ref = data_sources.PromptSampler([tasks_lib.TASKS[n] for n in TWO], [1.0, 1.0], c.seed,
                                   16, process_index=0)
  assert [_key(e) for e in stream.next(4)] == [_key(e) for e in ref.next(4)]


@pytest.mark.parametrize("source", ["generate", "tfds"])
def test_difficulty_knobs_reach_every_stream_and_bad_ones_name_the_key(tmp_path, source):
  c = config(f"data.source={source}", "tasks.difficulty.ocr.length=6",
             "tasks.difficulty.counting.max_count=8")
  config_utils.validate(c)
  for stream in (data_sources.rl_stream(c, str(tmp_path), 4, process_index=0, process_count=1),
                 data_sources.warm_start_stream(c, str(tmp_path), 4, process_index=0,
                                                process_count=1)):
    drawn = [ex for _ in range(4) for ex in stream.next(4)]
    assert {ex.task for ex in drawn} == set(TWO)
    for ex in drawn:
      want = tasks_lib.get_task(ex.task).example(
          "train", ex.index, **{"ocr": {"length": 6}, "counting": {"max_count": 8}}[ex.task])
      assert _key(ex) == _key(want)
      if ex.task == "ocr":
        assert len(ex.answer) == 6
  c.tasks.difficulty.ocr.length = 12
  with pytest.raises(config_utils.ConfigError, match=r"config.tasks.difficulty.ocr = .*'length' "
                     r"must be an int in \[2, 8\], got 12"):
    data_sources.rl_stream(c, str(tmp_path / "bad"), 4, process_index=0, process_count=1)


@pytest.mark.parametrize("source", ["tfds", "generate"])
def test_loader_stream_resumes_exactly_and_hosts_read_their_own_shard(tmp_path, source):
  path = write_jsonl(str(tmp_path / "user"))
  c = config(f"data.source={source}", f"data.user.paths=('{path}',)", "data.user.weights=(2.0,)")
  config_utils.validate(c)
  comps = data_sources.user_components(c)

  def make(pi=0, pc=1):
    return data_sources.rl_stream(c, str(tmp_path), 4, process_index=pi, process_count=pc,
                                  components=comps)
  s = make()
  assert isinstance(s, data_sources.LoaderStream)
  s.next(4)
  state = json.loads(json.dumps(s.get_state()))  # as the checkpoint's JSON item stores it
  rest = [[_key(e) for e in s.next(4)] for _ in range(5)]
  s2 = make()
  s2.set_state(state)
  assert [[_key(e) for e in s2.next(4)] for _ in range(5)] == rest
  assert "my_data" in {k[0] for batch in rest for k in batch}  # the user component is drawn
  with pytest.raises(ValueError, match="batches of 4 per host"):
    s2.next(3)
  # Two hosts: each keeps its own slots of the same global batch; together they make the
  # global batch, and neither equals the other.
  h0, h1 = make(0, 2), make(1, 2)
  b0, b1 = [_key(e) for e in h0.next(4)], [_key(e) for e in h1.next(4)]
  glob = data_sources.rl_stream(c, str(tmp_path), 8, process_index=0, process_count=1,
                                components=comps)
  assert b0 + b1 == [_key(e) for e in glob.next(8)]
  assert b0 != b1


def test_user_component_relabels_examples_and_scores_by_reward_type(tmp_path):
  path = write_jsonl(str(tmp_path / "user"), name="My Set-1.jsonl")
  c = config(f"data.user.paths=('{path}',)")
  assert config_utils.task_names(c) == TWO + ("my_set_1",)
  (comp,) = data_sources.user_components(c)
  assert len(comp) == 6 and comp.task_names == ("my_set_1",)
  assert comp.role == "perception"  # the first record is counting
  exs = [comp[i] for i in range(3)]
  assert [e.task for e in exs] == ["my_set_1"] * 3
  assert [e.reward_type for e in exs] == ["binary", "iou", "relative"]
  assert exs[0].image.shape == (32, 32, 3)
  task = comp.task
  good = "<think>dots</think><answer>1</answer>"
  assert task.reward(good, exs[0]) == 1.0 and task.format_reward(good) == 1.0
  assert task.reward("<think>x</think><answer>2</answer>", exs[0]) == 0.0
  # The grounding box was given in the 40×20 image's pixels: rescaled to the 32×32 frame.
  assert task.reward("<think>x</think><answer>0,0,16,16</answer>", exs[1]) == pytest.approx(1.0)
  assert task.reward("<think>x</think><answer>2.5</answer>", exs[2]) == 1.0
  with pytest.raises(ValueError, match="RL-only"):
    task.demonstration(exs[0])
  # A component-level reward type overrides the records' problem types.
  c2 = config(f"data.user.paths=('{path}',)", "data.user.reward_types=('ocr',)",
              "data.user.roles=('reasoning',)", "data.user.names=('mine',)")
  (comp2,) = data_sources.user_components(c2)
  ex = comp2[0]
  assert (ex.task, ex.reward_type, ex.role) == ("mine", "ocr", "reasoning")
  assert comp2.task.reward("<think>x</think><answer>12</answer>", ex) == pytest.approx(0.0)
  assert comp2.task.reward("<think>x</think><answer>1</answer>", ex) == 1.0


def test_bad_user_file_errors_name_file_line_and_field(tmp_path):
  path = write_jsonl(str(tmp_path / "user"))
  with open(path, "a") as f:
    f.write(json.dumps({"image": "img0.png", "problem": "q?", "problem_type": "counting"}) + "\n")
  c = config(f"data.user.paths=('{path}',)")
  with pytest.raises(user_data.UserDataError, match=r"my_data.jsonl, line 7, field 'answer'"):
    data_sources.user_components(c)


def test_warm_start_reads_only_built_in_tasks(tmp_path):
  path = write_jsonl(str(tmp_path / "user"))
  c = config("data.source=tfds", f"data.user.paths=('{path}',)")
  ws = data_sources.warm_start_stream(c, str(tmp_path), 8, process_index=0, process_count=1)
  drawn = [e for _ in range(4) for e in ws.next(8)]
  assert {e.task for e in drawn} == set(TWO)
  assert all(tasks_lib.TASKS[e.task].demonstration(e) for e in drawn)
  # Only user data with a warm start: refused up front, naming the way out.
  c0 = config(f"data.user.paths=('{path}',)", "tasks.weights=(0.0, 0.0)")
  with pytest.raises(config_utils.ConfigError, match="RL-only.*warm_start.enabled=False"):
    config_utils.validate(c0)
  with pytest.raises(ValueError, match="user JSONL data has no demonstrations"):
    data_sources.warm_start_stream(c0, str(tmp_path), 8, process_index=0, process_count=1)
  config_utils.apply_overrides(c0, ["warm_start.enabled=False"])
  config_utils.validate(c0)
  rl = data_sources.rl_stream(c0, str(tmp_path), 4, process_index=0, process_count=1,
                              components=data_sources.user_components(c0))
  assert {e.task for e in rl.next(4)} == {"my_data"}
