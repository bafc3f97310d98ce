"""Two processes joined by `jax.distributed` on localhost run smoke RL steps and agree on the
params (each process checks its own replica; the mesh's data axis spans both processes), on
generated prompts and on TFDS + a user JSONL file with its held-out file (each host reads its
own slots of the mixture)."""
import json
import os
import re
import socket
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _user_data(tmp_path):
  from tests.test_data_sources import write_jsonl  # pylint: disable=import-outside-toplevel
  train = write_jsonl(str(tmp_path / "user"), name="mine.jsonl", n=6)
  held = write_jsonl(str(tmp_path / "user_eval"), name="mine_eval.jsonl", n=3)
  return ["--config.data.source=tfds", f"--config.data.user.paths=('{train}',)",
          "--config.data.user.weights=(2.0,)", f"--config.data.user.eval_paths=('{held}',)"]


@pytest.mark.parametrize("data", ["generate", "tfds+user"])
def test_two_processes_agree_on_params(tmp_path, data):
  extra = _user_data(tmp_path) if data == "tfds+user" else []
  port = _free_port()
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(),
                                                  "g2rpo_jax_test_xla_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  wd = tmp_path / "run"
  procs = []
  for i in range(2):
    cmd = [sys.executable, "-m", "experiments.train", "--config=configs/smoke.py",
           f"--workdir={wd}", f"--coordinator=localhost:{port}", "--num_processes=2",
           f"--process_id={i}", "--config.warm_start.enabled=False",
           "--config.train.num_steps=2", "--config.tasks.eval_size=1",
           "--config.eval.batch_size=6", "--config.train.eval_every=2",
           "--config.train.grad_norm_every=0", *extra]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
    outs.append(out)
  sums = []
  for i, out in enumerate(outs):
    m = re.search(rf"process {i}: done at step 2, params checksum ([0-9.e+-]+)", out)
    assert m, out[-2000:]
    sums.append(float(m.group(1)))
  assert sums[0] == sums[1] and sums[0] > 0
  # Only process 0 writes the metric stream; both took part in every step.
  with open(wd / "metrics.jsonl") as f:
    steps = [int(re.search(r'"step": (\d+)', l).group(1)) for l in f]
  assert steps == [0, 1, 2]
  if extra:
    # Process 0 prepared the TFDS datasets once for both; the user file was drawn and its
    # held-out file scored (each host scores its share; the gather combines them).
    assert os.listdir(wd / "data" / "g2rpo_tasks")
    with open(wd / "metrics.jsonl") as f:
      records = [json.loads(l) for l in f]
    assert any("reward/mine" in r for r in records)
    assert "eval/mine" in records[-1]
  steps = sorted(d for d in os.listdir(wd / "checkpoints") if d.isdigit())
  assert steps == ["2"]  # checkpoint_every = 2 in smoke
