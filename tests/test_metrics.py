"""Metric writers (JSONL resume semantics), per-task reductions, tables and plots."""
import json
import os

import numpy as np
import pytest

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


# A tiny_vlm small enough to count by hand: E=4, F=6, L=1, H=2, Hkv=1, D=2, V=5; vision tower
# Wv=2, Fv=3, Lv=1 on 4x4 images in 2x2 patches (n = 4 patches of 3·2·2 = 12 values).
_TINY = dict(width=4, mlp_dim=6, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=2,
             vocab_size=5, vision=True, image_size=4, patch_size=2, vit_width=2, vit_mlp_dim=3,
             vit_layers=1, vit_heads=1, max_prompt_len=8)


def test_tiny_vlm_train_flops_by_hand():
  out = metrics.tiny_vlm_train_flops(_TINY, rows=2, seq=3, logit_positions=2, images=2)
  # decoder: weights per layer q 4·2·2=16, k 4·1·2=8, v 8, o 16, MLP 3·4·6=72 -> 120;
  #          6 · 120 · (2 rows · 3 positions) = 4320
  assert out["decoder"] == 4320
  # attention: 12 · L=1 · H·D=4 · seq=3 = 144 per token, · 6 tokens = 864
  assert out["attention"] == 864
  # head: 6 · E·V=20 · 2 logit positions = 240
  assert out["head"] == 240
  # vision, per patch: patch embedding 4 · 12·2 = 96; block 6 · (4·2·2 + 3·2·3 = 34) = 204;
  #   its attention 12 · Wv=2 · n=4 = 96; projections 6 · (2·4 + 4·4 = 24) = 144 -> 540;
  #   · 4 patches · 2 images = 4320
  assert out["vision"] == 4320
  assert out["total"] == 4320 + 864 + 240 + 4320
  # Attention grows with seq², the rest linearly; no vision tower, no vision term.
  longer = metrics.tiny_vlm_train_flops(_TINY, rows=2, seq=6, logit_positions=2, images=2)
  assert longer["attention"] == 4 * 864 and longer["decoder"] == 2 * 4320
  text_only = metrics.tiny_vlm_train_flops({**_TINY, "vision": False}, rows=2, seq=3,
                                           logit_positions=2, images=2)
  assert text_only["vision"] == 0 and text_only["total"] == 4320 + 864 + 240


def test_tiny_vlm_train_flops_cross_fusion_and_token_conv_by_hand():
  out = metrics.tiny_vlm_train_flops({**_TINY, "fusion": "cross", "token_conv": 3}, rows=2,
                                     seq=3, logit_positions=2, images=2)
  # cross, per layer: q and o 2·E·H·D = 32 weights on the 6 text tokens, k and v 32 weights on
  #   the 8 patch features (2 images · 4): 6 · 32 · 14 = 2688; scores and values 12 · H·D=4 ·
  #   n=4 = 192 per text token, · 6 = 1152 -> 3840
  assert out["cross"] == 3840
  # token_conv K=3: 2 taps of E=4 weights, 6 · 8 · 6 tokens = 288 on top of the 4320
  assert out["decoder"] == 4320 + 288
  assert out["total"] == 4608 + 864 + 3840 + 240 + 4320
  assert metrics.tiny_vlm_train_flops(_TINY, rows=2, seq=3, logit_positions=2,
                                      images=2)["cross"] == 0


def test_tiny_vlm_train_flops_reads_the_model_config_and_names_missing_fields():
  import dataclasses
  from g2rpo_jax.models import tiny_vlm
  cfg = tiny_vlm.tiny_vlm_config("nano")
  from_dataclass = metrics.tiny_vlm_train_flops(cfg, rows=3, seq=40, logit_positions=24,
                                                images=3)
  assert from_dataclass == metrics.tiny_vlm_train_flops(dataclasses.asdict(cfg), rows=3, seq=40,
                                                        logit_positions=24, images=3)
  # nano: E=64, F=128, L=2, H=4, Hkv=2, D=16: q 4096 + k 2048 + v 2048 + o 4096 + MLP 24576
  # = 36864 weights per layer, 73728 in all
  assert from_dataclass["decoder"] == 6 * 73728 * 3 * 40
  with pytest.raises(ValueError, match=r"lacks \['mlp_dim'\]"):
    metrics.tiny_vlm_train_flops({k: v for k, v in _TINY.items() if k != "mlp_dim"}, rows=1,
                                 seq=1, logit_positions=1, images=1)


def test_plots_one_png_per_task(tmp_path):
  recs = [{"step": s, "reward/a": 0.1 * s, "entropy/a": 1.0, "response_length/b": 3.0}
          for s in range(1, 5)]
  paths = metrics.plot_per_task(recs, ["a", "b"], str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["a.png", "b.png"]
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
