"""JSONL user data: parsing, rewards by problem type, image resizing, and errors naming file/line/field."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from g2rpo_jax import tasks
from g2rpo_jax.tasks import loader
from g2rpo_jax.tasks.user_data import JsonlDataset, UserDataError


def write_image(path, size=(64, 40), color=(200, 10, 10)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, color).save(path)


def write_jsonl(path, records):
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
  return path


@pytest.fixture
def folder(tmp_path):
  write_image(tmp_path / "imgs" / "a.png")
  write_image(tmp_path / "imgs" / "b.png", size=(100, 50), color=(0, 0, 255))
  return tmp_path


def resp(a):
  return f"<think>t</think><answer>{a}</answer>"


def test_records_and_rewards(folder):
  path = write_jsonl(folder / "data.jsonl", [
      {"image": "imgs/a.png", "problem": "<image>How many cats?", "answer": "3",
       "problem_type": "counting"},
      {"images": ["imgs/b.png"], "question": "Box of the cat?", "solution": "<answer>[10, 5, 60, 25]</answer>",
       "problem_type": "grounding"},
      "",  # blank lines are skipped
      {"image": "imgs/a.png", "prompt": "Read it", "answer": "HELLO", "task": "OCR"},
      {"image": "imgs/a.png", "prompt": "Value?", "answer": 40, "problem_type": "regression"},
      {"image": "imgs/a.png", "prompt": "Which?", "answer": "B", "problem_type": "multiple_choice",
       "role": "reasoning"},
  ])
  ds = JsonlDataset(path, image_size=32)
  assert len(ds) == 5
  assert ds.task_names == ("counting", "grounding", "multiple choice", "ocr", "regression")
  ex = ds[0]
  assert ex.image.shape == (32, 32, 3) and ex.image.dtype == np.uint8
  assert tuple(ex.image[5, 5]) == (200, 10, 10)
  assert ex.prompt == "How many cats?" and ex.reward_type == "binary" and ex.role == "perception"
  assert tasks.reward(resp("3"), ex) == 1.0 and tasks.reward(resp("4"), ex) == 0.0
  box = ds[1]
  # 100x50 image -> 32x32: x scales by 0.32, y by 0.64.
  assert box.answer == pytest.approx([3.2, 3.2, 19.2, 16.0])
  assert box.reward_type == "iou" and tasks.reward(resp("3.2,3.2,19.2,16"), box) == pytest.approx(1.0)
  ocr = ds[2]
  assert ocr.task == "ocr" and tasks.reward(resp("HELLP"), ocr) == pytest.approx(0.8)
  reg = ds[3]
  # |36 - 40| / 40 = 0.1 < tolerances 0.15..0.50: 8 of 10.
  assert reg.reward_type == "relative" and tasks.reward(resp("36"), reg) == pytest.approx(0.8)
  mc = ds[4]
  assert mc.role == "reasoning" and tasks.reward(resp("b"), mc) == 1.0
  assert ds[4].meta == {"file": str(path), "line": 6}


def test_normalised_boxes_scale_to_the_image(folder):
  path = write_jsonl(folder / "d.jsonl", [
      {"image": "imgs/a.png", "prompt": "p", "answer": [0.25, 0.5, 0.75, 1.0], "problem_type": "grounding"}])
  assert JsonlDataset(path, image_size=32)[0].answer == [8.0, 16.0, 24.0, 32.0]


def test_mixes_with_builtin_tasks_in_the_loader(folder):
  path = write_jsonl(folder / "d.jsonl", [
      {"image": "imgs/a.png", "prompt": f"q{i}", "answer": str(i), "problem_type": "numerical"}
      for i in range(5)])
  sources = {"user": JsonlDataset(path), "ocr": [tasks.TASKS["ocr"].example("train", i) for i in range(5)]}
  ld = loader.MixtureLoader(sources, {"user": 1.0, "ocr": 1.0}, batch_size=16, process_index=0,
                            process_count=1)
  assert ld.task_ids["numerical"] == len(tasks.TASK_IDS)
  b = next(ld)
  for k, ex in enumerate(b["examples"]):
    assert b["task_id"][k] == ld.task_ids[ex.task]
    assert b["pool_id"][k] == tasks.POOL_IDS["binary" if ex.task == "numerical" else "ocr"]
  assert {"numerical", "ocr"} == set(b["task"])


BAD = [
    ("{not json", 2, "<record>", "not valid JSON"),
    ("[1, 2]", 2, "<record>", "expected a JSON object"),
    ({"prompt": "p", "answer": "1", "problem_type": "numerical"}, 2, "image", "missing"),
    ({"image": "imgs/nope.png", "prompt": "p", "answer": "1", "problem_type": "numerical"}, 2,
     "image", "does not exist"),
    ({"images": ["imgs/a.png", "imgs/a.png"], "prompt": "p", "answer": "1",
      "problem_type": "numerical"}, 2, "images", "exactly one"),
    ({"image": "imgs/a.png", "answer": "1", "problem_type": "numerical"}, 2, "prompt", "missing"),
    ({"image": "imgs/a.png", "prompt": "<image>", "answer": "1", "problem_type": "numerical"}, 2,
     "prompt", "non-empty"),
    ({"image": "imgs/a.png", "prompt": "p", "problem_type": "numerical"}, 2, "answer", "missing"),
    ({"image": "imgs/a.png", "prompt": "p", "answer": None, "problem_type": "numerical"}, 2,
     "answer", "string or number"),
    ({"image": "imgs/a.png", "prompt": "p", "answer": "1"}, 2, "problem_type", "missing"),
    ({"image": "imgs/a.png", "prompt": "p", "answer": "1", "problem_type": "poetry"}, 2,
     "problem_type", "unknown problem type"),
    ({"image": "imgs/a.png", "prompt": "p", "answer": "1,2,3", "problem_type": "grounding"}, 2,
     "answer", "box"),
    ({"image": "imgs/a.png", "prompt": "p", "answer": "many", "problem_type": "regression"}, 2,
     "answer", "number"),
    ({"image": "imgs/a.png", "prompt": "p", "answer": "1", "problem_type": "math", "role": "x"}, 2,
     "role", "expected one of"),
]


@pytest.mark.parametrize("record,line,field,what", BAD)
def test_bad_line_names_file_line_and_field(folder, record, line, field, what):
  good = {"image": "imgs/a.png", "prompt": "p", "answer": "1", "problem_type": "numerical"}
  path = write_jsonl(folder / "bad.jsonl", [good, record, good])
  with pytest.raises(UserDataError) as err:
    JsonlDataset(path)
  msg = str(err.value)
  assert msg.startswith(f"{path}, line {line}, field '{field}'"), msg
  assert what in msg, msg


def test_line_numbers_count_blank_lines(folder):
  path = folder / "blank.jsonl"
  good = json.dumps({"image": "imgs/a.png", "prompt": "p", "answer": "1", "problem_type": "math"})
  path.write_text(f"{good}\n\n\n{{oops\n")
  with pytest.raises(UserDataError, match=re.escape(f"{path}, line 4, field '<record>'")):
    JsonlDataset(path)


def test_unreadable_image_is_reported_on_access(folder):
  (folder / "imgs" / "broken.png").write_bytes(b"not a png")
  path = write_jsonl(folder / "d.jsonl", [
      {"image": "imgs/a.png", "prompt": "p", "answer": "1", "problem_type": "math"},
      {"image": "imgs/broken.png", "prompt": "p", "answer": "1", "problem_type": "math"}])
  ds = JsonlDataset(path)
  with pytest.raises(UserDataError, match=re.escape(f"{path}, line 2, field 'image': cannot read")):
    ds[1]


def test_empty_file(folder):
  path = folder / "empty.jsonl"
  path.write_text("\n")
  with pytest.raises(UserDataError, match="no records"):
    JsonlDataset(path)
