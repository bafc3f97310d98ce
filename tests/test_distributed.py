"""Two processes joined by `jax.distributed` on localhost run smoke RL steps and agree on the
params (each process checks its own replica; the mesh's data axis spans both processes)."""
import os
import re
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_agree_on_params(tmp_path):
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
           "--config.train.grad_norm_every=0"]
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
  steps = sorted(d for d in os.listdir(wd / "checkpoints") if d.isdigit())
  assert steps == ["2"]  # checkpoint_every = 2 in smoke
