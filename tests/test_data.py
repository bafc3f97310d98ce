"""TFDS round trip (array_record, no TensorFlow) and the mixture loader: weights, sharding, resume."""
import json
import os
import sys

import numpy as np
import pytest

from g2rpo_jax import tasks
from g2rpo_jax.tasks import data, loader


def small_config(tmp_path, **sizes):
  cfg = data.default_config()
  cfg.data_dir = str(tmp_path)
  cfg.split_sizes.train = sizes.get("train", 12)
  cfg.split_sizes.validation = sizes.get("validation", 4)
  cfg.split_sizes.test = sizes.get("test", 0)
  return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("tfds")
  cfg = small_config(tmp)
  return cfg, data.load_sources(cfg, "train")


def test_no_tensorflow_needed(built):
  del built
  assert "tensorflow" not in sys.modules


def test_round_trip_equals_the_generator(built):
  cfg, sources = built
  assert sorted(sources) == sorted(tasks.TASKS)
  for name, src in sources.items():
    assert len(src) == 12
    seen = set()
    for ex in src:
      ref = tasks.TASKS[name].example("train", ex.index)
      assert np.array_equal(ex.image, ref.image), name
      assert ex.prompt == ref.prompt and ex.answer == ref.answer and ex.meta == ref.meta
      assert ex.task == name and ex.reward_type == ref.reward_type and ex.split == "train"
      assert tasks.TASKS[name].reward(tasks.TASKS[name].demonstration(ex), ex) == 1.0
      seen.add(ex.index)
    assert seen == set(range(12))


def test_second_call_reuses_the_files(built):
  cfg, _ = built
  root = os.path.join(cfg.data_dir, "g2rpo_tasks")
  before = {p: os.stat(os.path.join(dp, p)).st_mtime_ns
            for dp, _, fs in os.walk(root) for p in fs}
  again = data.load_sources(cfg, "validation")
  after = {p: os.stat(os.path.join(dp, p)).st_mtime_ns
           for dp, _, fs in os.walk(root) for p in fs}
  assert before == after and len(before) > 0
  assert len(again["ocr"]) == 4 and again["ocr"][0].split == "validation"


def test_second_call_does_not_generate(built, monkeypatch):
  cfg, _ = built
  def boom(*a, **k):
    raise AssertionError("the generator ran again")
  for t in tasks.TASKS.values():
    monkeypatch.setattr(type(t), "_generate", boom)
  sources = data.load_sources(cfg, "train")
  assert sources["chart"][0].prompt.startswith("Value of the")


def test_different_settings_do_not_collide(tmp_path):
  a = data.make_builder("ocr", data_dir=str(tmp_path), difficulty={"length": 3},
                        split_sizes={"train": 2})
  b = data.make_builder("ocr", data_dir=str(tmp_path), difficulty={"length": 5},
                        split_sizes={"train": 2})
  assert a.builder_config.name != b.builder_config.name


def test_bad_split_sizes(tmp_path):
  with pytest.raises(ValueError, match=r"unknown split\(s\) \['dev'\]"):
    data.make_builder("ocr", data_dir=str(tmp_path), split_sizes={"dev": 3})
  with pytest.raises(ValueError, match="unknown difficulty knob"):
    data.make_builder("ocr", data_dir=str(tmp_path), difficulty={"words": 3})


def test_only_weighted_tasks_are_built(tmp_path):
  cfg = small_config(tmp_path, train=3)
  for name in cfg.tasks:
    cfg.tasks[name].weight = 0.0
  cfg.tasks.chart.weight = 1.0
  assert list(data.load_sources(cfg, "train")) == ["chart"]


def test_make_config(tmp_path):
  cfg = data.make_config(["ocr", "chart"], [2.0, 1.0], {"train": 3, "validation": 2},
                         data_dir=str(tmp_path), difficulty={"ocr": {"length": 4}})
  assert list(cfg.tasks) == ["chart", "ocr"] and cfg.tasks.ocr.weight == 2.0
  assert cfg.tasks.ocr.difficulty.length == 4 and cfg.tasks.ocr.difficulty.clutter == 0
  sources = data.load_sources(cfg, "validation")
  assert len(sources["ocr"]) == 2 and len(sources["ocr"][0].answer) == 4
  with pytest.raises(ValueError, match="2 task names .* but 1 weights"):
    data.make_config(["ocr", "chart"], [1.0])
  with pytest.raises(ValueError, match=r"unknown task\(s\) \['ocrr'\]"):
    data.make_config(["ocrr"])


# --- loader ---------------------------------------------------------------------------------------

def list_sources(n=30, names=("counting", "chart", "ocr")):
  return {name: [tasks.TASKS[name].example("train", i) for i in range(n)] for name in names}


def make_loader(sources, **kw):
  args = dict(weights={n: 1.0 for n in sources}, batch_size=4, seed=0, process_index=0,
              process_count=1)
  args.update(kw)
  return loader.MixtureLoader(sources, **args)


def signature(batch):
  return [(t, int(i)) for t, i in zip(batch["task"], batch["index"])]


def test_batch_layout():
  sources = list_sources(10)
  b = next(make_loader(sources, batch_size=5))
  assert b["image"].shape == (5, 32, 32, 3) and b["image"].dtype == np.uint8
  assert b["task_id"].dtype == np.int32 and b["pool_id"].dtype == np.int32
  for k in range(5):
    ex = b["examples"][k]
    assert b["task_id"][k] == tasks.TASK_IDS[ex.task]
    assert b["pool_id"][k] == tasks.POOL_IDS[tasks.TASKS[ex.task].reward_type]
    assert b["prompt"][k] == ex.prompt and b["answer"][k] == ex.answer
    assert np.array_equal(b["image"][k], ex.image)


def test_mixture_frequencies_follow_weights():
  sources = list_sources(20)
  weights = {"counting": 6.0, "chart": 3.0, "ocr": 1.0}
  ld = make_loader(sources, weights=weights, batch_size=50)
  counts = {n: 0 for n in weights}
  for _ in range(40):
    for t in next(ld)["task"]:
      counts[t] += 1
  total = sum(counts.values())
  # 2000 draws: binomial std of a frequency <= 0.011; 4 std margin.
  for n, w in weights.items():
    assert abs(counts[n] / total - w / 10) < 0.045, counts


def test_zero_weight_source_never_appears():
  sources = list_sources(5)
  ld = make_loader(sources, weights={"counting": 1.0, "chart": 0.0, "ocr": 1.0}, batch_size=20)
  assert all("chart" not in next(ld)["task"] for _ in range(5))


def test_each_epoch_visits_every_example_once():
  sources = list_sources(7, names=("counting",))
  ld = make_loader(sources, batch_size=7)
  first, second = sorted(next(ld)["index"].tolist()), sorted(next(ld)["index"].tolist())
  assert first == second == list(range(7))


def test_seed_changes_order():
  sources = list_sources(30)
  a = signature(next(make_loader(sources, seed=0, batch_size=8)))
  b = signature(next(make_loader(sources, seed=1, batch_size=8)))
  assert a != b


def test_resume_is_exact():
  sources = list_sources(9)
  full = make_loader(sources, batch_size=5)
  expected = [signature(next(full)) for _ in range(12)]
  part = make_loader(sources, batch_size=5)
  for _ in range(5):
    next(part)
  state = json.loads(json.dumps(part.get_state()))  # must survive a JSON checkpoint
  resumed = make_loader(sources, batch_size=5)
  resumed.set_state(state)
  assert [signature(next(resumed)) for _ in range(7)] == expected[5:]


def test_set_state_rejects_a_different_loader():
  sources = list_sources(5)
  state = make_loader(sources, seed=0).get_state()
  with pytest.raises(ValueError, match="seed=0 but this loader has seed=3"):
    make_loader(sources, seed=3).set_state(state)
  with pytest.raises(ValueError, match="sources"):
    make_loader(list_sources(5, names=("ocr",))).set_state(state)


def test_hosts_get_disjoint_slices_of_one_global_batch():
  sources = list_sources(40)
  single = make_loader(sources, batch_size=12, process_count=1)
  hosts = [make_loader(sources, batch_size=4, process_index=p, process_count=3) for p in range(3)]
  # The 3 hosts' batches together are a global batch of 12 drawn the same way as one host's 12.
  for _ in range(4):
    parts = [signature(next(h)) for h in hosts]
    whole = signature(next(single))
    assert parts[0] + parts[1] + parts[2] == whole
    assert all(h.get_state()["cursors"] == hosts[0].get_state()["cursors"] for h in hosts)


def test_loader_argument_errors():
  sources = list_sources(3)
  with pytest.raises(ValueError, match="missing \\['ocr'\\]"):
    make_loader(sources, weights={"counting": 1.0, "chart": 1.0})
  with pytest.raises(ValueError, match="all mixture weights are 0"):
    make_loader(sources, weights={n: 0.0 for n in sources})
  with pytest.raises(ValueError, match="must be finite and >= 0"):
    make_loader(sources, weights={"counting": -1.0, "chart": 1.0, "ocr": 1.0})
  with pytest.raises(ValueError, match="process_index must be in"):
    make_loader(sources, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="batch_size"):
    make_loader(sources, batch_size=0)


def test_mixed_image_sizes_are_an_error():
  sources = {"a": [tasks.get_task("ocr", 32).example("train", 0)],
             "b": [tasks.get_task("ocr", 48).example("train", 0)]}
  ld = make_loader(sources, batch_size=16)
  with pytest.raises(ValueError, match="different image shapes"):
    next(ld)


def test_default_process_comes_from_jax(monkeypatch):
  monkeypatch.setattr(loader, "_default_process", lambda: (1, 2))
  ld = loader.MixtureLoader(list_sources(3), {n: 1.0 for n in ("counting", "chart", "ocr")}, 2)
  assert (ld.process_index, ld.process_count) == (1, 2)


def test_from_config_over_tfds(built):
  cfg, _ = built
  ld = loader.from_config(cfg, "train", batch_size=6, seed=2, process_index=0, process_count=1)
  b = next(ld)
  assert b["image"].shape == (6, 32, 32, 3)
  for ex in b["examples"]:
    task = tasks.TASKS[ex.task]
    assert task.reward(task.demonstration(ex), ex) == 1.0
