"""The six tasks: registry, determinism, split disjointness, demonstrations, knobs, rewards."""
import hashlib
import json
import string

import numpy as np
import pytest

from g2rpo_jax import tasks
from g2rpo_jax.tasks import base, digits, scenes

NAMES = list(tasks.TASKS)
PRINTABLE = set(string.printable) - set("\t\n\r\x0b\x0c")


def test_registry_shape():
  assert NAMES == ["grounding", "counting", "arithmetic", "ocr", "spatial", "chart"]
  assert {n: t.reward_type for n, t in tasks.TASKS.items()} == {
      "grounding": "iou", "counting": "binary", "arithmetic": "binary", "ocr": "ocr",
      "spatial": "binary", "chart": "relative"}
  assert {n: t.role for n, t in tasks.TASKS.items()} == {
      "grounding": "perception", "counting": "perception", "arithmetic": "reasoning",
      "ocr": "perception", "spatial": "hybrid", "chart": "hybrid"}
  assert sorted(tasks.TASK_IDS.values()) == list(range(6))
  assert tasks.TASK_IDS["grounding"] == 0 and tasks.TASK_IDS["chart"] == 5
  assert tasks.POOL_IDS == {"binary": 0, "iou": 1, "ocr": 2, "relative": 3}


def test_get_task():
  assert tasks.get_task("ocr") is tasks.TASKS["ocr"]
  assert tasks.get_task("ocr", 48).image_size == 48
  with pytest.raises(KeyError, match="unknown task 'ocrr'"):
    tasks.get_task("ocrr")


@pytest.mark.parametrize("name", NAMES)
def test_example_contract(name):
  task = tasks.TASKS[name]
  for split in tasks.SPLITS:
    for i in range(10):
      ex = task.example(split, i)
      assert ex.image.shape == (32, 32, 3) and ex.image.dtype == np.uint8
      assert ex.task == name and ex.reward_type == task.reward_type and ex.role == task.role
      assert ex.split == split and ex.index == i
      assert set(ex.prompt) <= PRINTABLE and 0 < len(ex.prompt) <= 50, ex.prompt
      json.dumps(ex.answer)
      json.dumps(ex.meta)
      json.dumps(ex.difficulty)
      assert ex.image.std() > 0  # something is drawn


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
  task = tasks.TASKS[name]
  a, b = task.example("validation", 7), task.example("validation", 7)
  assert np.array_equal(a.image, b.image) and a.prompt == b.prompt and a.answer == b.answer
  c = task.example("validation", 8)
  assert not np.array_equal(a.image, c.image)


def _content(ex):
  if ex.task == "ocr":
    return ex.answer  # the OCR split key is the word itself
  return hashlib.sha256(ex.image.tobytes() + ex.prompt.encode()).hexdigest()


@pytest.mark.parametrize("name", NAMES)
def test_splits_disjoint(name):
  task = tasks.TASKS[name]
  seen = {s: {_content(task.example(s, i)) for i in range(60)} for s in tasks.SPLITS}
  assert not seen["train"] & seen["validation"]
  assert not seen["train"] & seen["test"]
  assert not seen["validation"] & seen["test"]
  assert len(seen["train"]) > 30  # not a handful of repeats


def test_digit_pools_disjoint_and_complete():
  pools = digits.digit_pools()
  keys = {s: {im.tobytes() for im in pools[s][0]} for s in tasks.SPLITS}
  assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
  assert not keys["validation"] & keys["test"]
  assert sum(len(pools[s][1]) for s in tasks.SPLITS) == 1797
  assert len(pools["train"][1]) > 1200 and len(pools["test"][1]) > 100


@pytest.mark.parametrize("name", NAMES)
def test_demonstrations_score_one(name):
  task = tasks.TASKS[name]
  for split in tasks.SPLITS:
    for i in range(40):
      ex = task.example(split, i)
      demo = task.demonstration(ex)
      assert task.reward(demo, ex) == 1.0, (split, i, demo, ex.answer)
      assert task.format_reward(demo) == 1.0, demo
      assert tasks.reward(demo, ex) == 1.0
      assert set(demo) <= PRINTABLE


HARD = {
    "grounding": {"n_objects": 6, "size_contrast": True},
    "counting": {"max_count": 8, "distractors": 4},
    "arithmetic": {"n_digits": 4, "ops": "+-*"},
    "ocr": {"length": 6, "clutter": 4},
    "spatial": {"distractors": 3},
    "chart": {"n_bars": 6, "max_value": 20},
}


@pytest.mark.parametrize("name", NAMES)
def test_hard_knobs_still_valid(name):
  task = tasks.TASKS[name]
  for i in range(15):
    ex = task.example("train", i, **HARD[name])
    assert ex.difficulty == {**task.default_difficulty, **HARD[name]}
    demo = task.demonstration(ex)
    assert task.reward(demo, ex) == 1.0 and task.format_reward(demo) == 1.0, demo


@pytest.mark.parametrize("name", NAMES)
def test_other_image_size(name):
  task = tasks.get_task(name, 48)
  ex = task.example("train", 3)
  assert ex.image.shape == (48, 48, 3)
  assert task.reward(task.demonstration(ex), ex) == 1.0


def test_demonstration_lengths_fit_a_char_level_policy():
  # Perception ~40 chars (the four tags alone are 32), hybrids mid, reasoning <= 90.
  limits = {"perception": 60, "hybrid": 70, "reasoning": 90}
  for name, task in tasks.TASKS.items():
    longest = max(len(task.demonstration(task.example("train", i))) for i in range(100))
    assert longest <= limits[task.role], (name, longest)
  arith = tasks.TASKS["arithmetic"]
  assert max(len(arith.demonstration(arith.example("train", i, n_digits=4)))
             for i in range(50)) <= 90


def test_with_difficulty_generates_at_the_knobs_for_every_split():
  arith = tasks.TASKS["arithmetic"]
  one = tasks.get_task("arithmetic", difficulty={"n_digits": 1})
  assert one is not arith and arith.default_difficulty == {"n_digits": 2, "ops": "+"}
  for split in tasks.SPLITS:
    for i in range(4):
      ex = one.example(split, i)
      assert len(ex.meta["digits"]) == 1 and ex.difficulty == {"n_digits": 1, "ops": "+"}
      want = arith.example(split, i, n_digits=1)
      assert (ex.prompt, ex.answer, ex.image.tobytes()) == (want.prompt, want.answer,
                                                            want.image.tobytes())
  # Knobs passed to `example` still win; the image size keeps the knobs and vice versa.
  assert len(one.example("train", 0, n_digits=3).meta["digits"]) == 3
  big = tasks.get_task("arithmetic", 48, difficulty={"n_digits": 1})
  assert big.image_size == 48 and big.with_image_size(32).default_difficulty["n_digits"] == 1
  assert "difficulty={'n_digits': 1}" in repr(one) and "difficulty" not in repr(arith)
  # The defaults (or none) are the registered task itself: the same examples as before.
  assert tasks.get_task("ocr", difficulty={"length": 3}) is tasks.TASKS["ocr"]
  with pytest.raises(ValueError, match=r"unknown difficulty knob\(s\) \['lenght'\]"):
    tasks.get_task("ocr", difficulty={"lenght": 4})
  with pytest.raises(ValueError, match="'length' must be an int in"):
    tasks.TASKS["ocr"].with_difficulty(length=12)


def test_unknown_knob_and_bad_values():
  with pytest.raises(ValueError, match=r"task 'ocr': unknown difficulty knob\(s\) \['size'\]"):
    tasks.TASKS["ocr"].example("train", 0, size=3)
  with pytest.raises(ValueError, match="'max_count' must be an int in"):
    tasks.TASKS["counting"].example("train", 0, max_count=0)
  with pytest.raises(ValueError, match="'ops' must be a non-empty subset"):
    tasks.TASKS["arithmetic"].example("train", 0, ops="/")
  with pytest.raises(ValueError, match="split must be one of"):
    tasks.TASKS["chart"].example("dev", 0)
  with pytest.raises(ValueError, match="index must be a non-negative int"):
    tasks.TASKS["chart"].example("train", -1)


# --- task-specific facts checked against the image --------------------------------------------------

def test_grounding_box_is_the_tight_box_of_an_object_of_the_named_colour():
  from g2rpo_jax.tasks import render
  task = tasks.TASKS["grounding"]
  for i in range(20):
    ex = task.example("train", i)
    color = next(c for c in scenes._BASIC_COLORS if f" {c} " in ex.prompt)
    x0, y0, x1, y1 = ex.answer
    mask = np.all(ex.image == np.array(render.COLORS[color]), axis=-1)
    ys, xs = np.nonzero(mask[y0:y1, x0:x1])
    # The shape touches all four sides of its box ...
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x1 - x0, y1 - y0)
    # ... and the one-pixel ring around the box is empty (objects are placed with a gap).
    ring = mask[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1].sum() - mask[y0:y1, x0:x1].sum()
    assert ring == 0


def test_counting_answer_matches_pixels_for_colour_questions():
  from g2rpo_jax.tasks import render
  task = tasks.TASKS["counting"]
  checked = 0
  for i in range(40):
    ex = task.example("train", i)
    words = ex.prompt.split()
    if words[2] not in render.COLORS:
      continue
    mask = np.all(ex.image == np.array(render.COLORS[words[2]]), axis=-1)
    # Count connected blobs by a flood fill on the (gap-separated) objects.
    seen = np.zeros_like(mask)
    blobs = 0
    for y, x in zip(*np.nonzero(mask)):
      if seen[y, x]:
        continue
      blobs += 1
      stack = [(y, x)]
      while stack:
        cy, cx = stack.pop()
        if 0 <= cy < 32 and 0 <= cx < 32 and mask[cy, cx] and not seen[cy, cx]:
          seen[cy, cx] = True
          stack += [(cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)]
    assert blobs == ex.answer, (i, ex.prompt)
    checked += 1
  assert checked >= 10


def test_arithmetic_evaluation_steps():
  assert digits.evaluation_steps([3, 5, 2], ["*", "-"]) == (["3*5=15", "15-2=13"], 13)
  assert digits.evaluation_steps([3, 5, 2], ["+", "*"]) == (["5*2=10", "3+10=13"], 13)
  assert digits.evaluation_steps([4, 9], ["-"]) == (["4-9=-5"], -5)
  assert digits.evaluation_steps([7], []) == ([], 7)


def test_arithmetic_answer_is_the_sum_of_true_labels():
  task = tasks.TASKS["arithmetic"]
  for i in range(20):
    ex = task.example("test", i, n_digits=3)
    assert ex.answer == sum(ex.meta["digits"])
    assert ex.prompt == "Sum of the digits?"


def test_spatial_relation_matches_centres():
  task = tasks.TASKS["spatial"]
  answers = set()
  for i in range(40):
    ex = task.example("train", i)
    (ax, ay), (bx, by) = ex.meta["centers"]
    expect = {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}
    assert expect[ex.answer]
    answers.add(ex.answer)
  assert answers == {"left", "right", "above", "below"}


def test_chart_bar_height_is_value_times_unit():
  from g2rpo_jax.tasks import render
  task = tasks.TASKS["chart"]
  for i in range(20):
    ex = task.example("train", i)
    mask = np.all(ex.image == np.array(render.COLORS[ex.meta["color"]]), axis=-1)
    rows = np.nonzero(mask.any(axis=1))[0]
    assert len(rows) == ex.answer * ((32 - 6) // 8)


def test_answer_distributions_are_not_degenerate():
  # A warm-started policy must not be able to score by always giving one answer.
  for name, task in tasks.TASKS.items():
    answers = [json.dumps(task.example("train", i).answer) for i in range(80)]
    top = max(answers.count(a) for a in set(answers))
    assert top / len(answers) < 0.5, (name, top)


@pytest.mark.parametrize("name", NAMES)
def test_task_reward_on_garbage(name):
  task = tasks.TASKS[name]
  ex = task.example("train", 0)
  demo = task.demonstration(ex)
  for g in [None, "", demo[:-1], demo.replace("<answer>", "<answr>"), demo * 3000, "\u00e9" * 50,
            demo.replace("</answer>", ""), 12, b"x"]:
    assert task.reward(g, ex) == 0.0, str(g)[:50]
  assert task.format_reward(demo[:-3]) == 0.0


def test_partial_credit_shapes():
  ocr = tasks.TASKS["ocr"]
  ex = ocr.example("train", 0)
  wrong_one = ("A" if ex.answer[0] != "A" else "C") + ex.answer[1:]
  assert ocr.reward(f"<answer>{wrong_one}</answer>", ex) == pytest.approx(1 - 1 / len(ex.answer))
  chart = tasks.TASKS["chart"]
  ex = next(e for e in (chart.example("train", i) for i in range(50)) if e.answer == 5)
  # |4 - 5| / 5 = 0.2 < tolerances 0.25..0.50: 6 of 10.
  assert chart.reward("<answer>4</answer>", ex) == pytest.approx(0.6)
  g = tasks.TASKS["grounding"]
  ex = g.example("train", 0)
  x0, y0, x1, y1 = ex.answer
  w = x1 - x0
  # Box shifted right by half its width: IoU = (w/2 · h) / (1.5 · w · h) = 1/3.
  assert g.reward(f"<answer>{x0 + w / 2},{y0},{x1 + w / 2},{y1}</answer>", ex) == pytest.approx(1 / 3)


def test_core_imports_stay_light():
  # Rewards run inside host loops and TFDS builds: the task core must not pull in jax or TFDS.
  import pathlib
  import subprocess
  import sys
  code = ("import sys, g2rpo_jax.tasks, g2rpo_jax.tasks.user_data; "
          "bad = [m for m in ('jax', 'tensorflow_datasets', 'tensorflow', 'sklearn') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])
