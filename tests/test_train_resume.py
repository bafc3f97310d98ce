"""Fault tolerance of `python -m experiments.train`, as real subprocesses on the smoke config:
  * 4 steps in one go == 3 steps, SIGKILL, resume to 4 (identical params and metric lines);
  * SIGTERM finishes the step, saves a checkpoint and exits 0.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# No warm start (the in-process tests cover it); unfiltered smoke groups still train.
COMMON = ["--config=configs/smoke.py", "--config.warm_start.enabled=False",
          "--config.tasks.eval_size=1", "--config.eval.batch_size=6",
          "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
          "--config.train.grad_norm_every=0"]
# Shared by every run of these tests (and across test sessions): compiled programs are keyed by
# their HLO, so a later run loads what an earlier one compiled instead of compiling again.
XLA_CACHE = os.path.join(tempfile.gettempdir(), "g2rpo_jax_test_xla_cache")


def _env(cache_dir):
  env = dict(os.environ)
  # One CPU device per process (the parent test process has 8 fake ones) and a shared
  # compilation cache so the three runs compile each program once.
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def _train(workdir, cache_dir, *extra, wait=True):
  cmd = [sys.executable, "-m", "experiments.train", *COMMON, f"--workdir={workdir}", *extra]
  p = subprocess.Popen(cmd, cwd=ROOT, env=_env(cache_dir), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  if not wait:
    return p
  out, err = p.communicate(timeout=600)
  return p.returncode, out, err


def _final_params(workdir):
  import orbax.checkpoint as ocp
  ckdir = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
  tree = ocp.StandardCheckpointer().restore(os.path.join(ckdir, str(step), "state"))
  return step, tree["params"]


def _leaves(tree, prefix=""):
  if isinstance(tree, dict):
    for k in sorted(tree, key=str):
      yield from _leaves(tree[k], f"{prefix}/{k}")
  else:
    yield prefix, np.asarray(tree)


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
  cache = XLA_CACHE
  straight, broken = tmp_path / "straight", tmp_path / "broken"
  rc, _, err = _train(straight, cache, "--config.train.num_steps=4")
  assert rc == 0, err[-3000:]
  rc, out, err = _train(broken, cache, "--config.train.num_steps=4",
                        "--config.debug.sigkill_after_step=3")
  assert rc == -signal.SIGKILL, err[-3000:]
  # Killed after step 3's metrics were written but before its checkpoint (every 2 steps).
  with open(broken / "metrics.jsonl") as f:
    assert '"step": 3' in f.read()
  rc, out, err = _train(broken, cache, "--config.train.num_steps=4")
  assert rc == 0, err[-3000:]
  assert "resumed from" in err and "at step 2" in err
  with open(straight / "metrics.jsonl") as f:
    lines_a = f.read().splitlines()
  with open(broken / "metrics.jsonl") as f:
    lines_b = f.read().splitlines()
  assert len(lines_a) == 5  # step 0 (warm-start eval) + 4 steps
  assert lines_b == lines_a
  step_a, params_a = _final_params(straight)
  step_b, params_b = _final_params(broken)
  assert step_a == step_b == 4
  la, lb = list(_leaves(params_a)), list(_leaves(params_b))
  assert [k for k, _ in la] == [k for k, _ in lb] and la
  for (k, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(x, y, err_msg=k)
  # Steps 3-4 did change the params (a resume bug cannot hide behind a no-op update).
  import orbax.checkpoint as ocp
  at2 = ocp.StandardCheckpointer().restore(str(straight / "checkpoints" / "2" / "state"))
  assert any(not np.array_equal(x, y) for (_, x), (_, y) in
             zip(_leaves(at2["params"]), la))


def test_sigterm_saves_and_exits_zero(tmp_path):
  wd = tmp_path / "term"
  p = _train(wd, XLA_CACHE, "--config.train.num_steps=200",
             "--config.train.checkpoint_every=100", wait=False)
  metrics_file = wd / "metrics.jsonl"
  deadline = time.time() + 400
  while time.time() < deadline:
    if metrics_file.exists() and '"step": 1' in metrics_file.read_text():
      break
    if p.poll() is not None:
      break
    time.sleep(0.2)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-3000:]
  assert "SIGTERM received" in err and "preempted" in out
  steps = sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit())
  reached = max(int(l.split('"step": ')[1].split(",")[0].rstrip("}"))
                for l in metrics_file.read_text().splitlines())
  assert steps == [reached] and 1 <= reached < 100  # saved where it stopped, not at 100
