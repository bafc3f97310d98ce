"""Metric writers (JSONL resume semantics), per-task reductions, tables and plots."""
import json
import os

import numpy as np

from g2rpo_jax import metrics


def test_per_task_mean_by_hand():
  values = np.array([1.0, 3.0, 10.0, 5.0, 7.0])
  tasks = np.array([0, 0, 2, 2, 2])
  valid = np.array([True, True, False, True, True])
  out = metrics.per_task_mean(values, tasks, valid, 3)
  assert out[0] == 2.0 and out[2] == 6.0 and np.isnan(out[1])


def test_task_dict_drops_absent_tasks():
  assert metrics.task_dict("r", ["a", "b", "c"], [0.5, np.nan, 1]) == {"r/a": 0.5, "r/c": 1.0}


def test_writer_jsonl_and_resume_truncation(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  for s in (1, 2, 3):
    w.write(s, {"loss": 0.5 * s, "bad": float("nan")})
    w.write_perf(s, {"time/step_s": 1.0})
  w.close()
  recs = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in recs] == [1, 2, 3]
  assert recs[1]["loss"] == 1.0 and recs[0]["bad"] == "nan"
  # A run resumed from step 2 drops the lines it will write again...
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "loss": 1')  # ... including a line cut by SIGKILL mid-write.
  w = metrics.MetricWriter(str(tmp_path), resume_step=2, tensorboard=False)
  w.write(3, {"loss": 9.0})
  recs = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r["loss"]) for r in recs] == [(1, 0.5), (2, 1.0), (3, 9.0)]
  assert [r["step"] for r in metrics.read_jsonl(str(tmp_path / "perf.jsonl"))] == [1, 2]
  # A fresh run (no resume) starts the files over.
  metrics.MetricWriter(str(tmp_path), tensorboard=False)
  assert metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) == []


def test_tensorboard_events_are_written(tmp_path):
  w = metrics.MetricWriter(str(tmp_path))
  w.write(1, {"loss": 1.0})
  w.close()
  files = os.listdir(tmp_path / "tb")
  assert any(f.startswith("events.out.tfevents") for f in files)


def test_summary_table_points_and_mean():
  table = metrics.summary_table({"a": 0.25, "b": 0.5}, {"a": 0.5, "b": 0.75})
  lines = table.splitlines()
  assert lines[0].split() == ["task", "warm", "start", "after", "RL", "delta"]
  assert lines[2].split() == ["a", "25.0", "50.0", "25.0"]
  assert lines[-1].split() == ["MEAN", "37.5", "62.5", "25.0"]


def test_mfu_and_flops():
  assert metrics.transformer_train_flops(10, 3) == 180.0
  assert metrics.mfu(100.0, 2.0, 100.0) == 0.5


def test_plots_one_png_per_task(tmp_path):
  recs = [{"step": s, "reward/a": 0.1 * s, "entropy/a": 1.0, "response_length/b": 3.0}
          for s in range(1, 5)]
  paths = metrics.plot_per_task(recs, ["a", "b"], str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["a.png", "b.png"]
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
