"""Metric writing for training runs: JSONL + TensorBoard, a progress bar, plots, summary tables.

Two JSONL streams in the workdir:
  `metrics.jsonl`: one line per logged step with everything that is a function of (config, seed,
                   step): losses, rewards, per-task statistics. A run resumed from a checkpoint
                   writes exactly the same lines as an uninterrupted run (lines past the restored
                   step are dropped on resume), which the kill-and-resume test checks.
  `perf.jsonl`:    wall-clock figures (timing per stage, tokens/s, MFU), which never repeat.
Both also go to TensorBoard event files (`<workdir>/tb`) when tensorboardX is available.

Must not import jax-heavy modules, the models or the tasks: it handles host-side numbers only.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Iterable, Mapping, Sequence

import numpy as np


def _to_float(v):
  if isinstance(v, (bool, np.bool_)):
    return float(v)
  if isinstance(v, (int, np.integer)):
    return int(v)
  v = float(np.asarray(v))
  return v


def _clean(metrics: Mapping) -> dict:
  """Host floats, with non-finite values kept JSON-safe as strings ("nan", "inf")."""
  out = {}
  for k, v in metrics.items():
    v = _to_float(v)
    if isinstance(v, float) and not math.isfinite(v):
      v = str(v)
    out[k] = v
  return out


def truncate_jsonl(path: str, max_step: int) -> int:
  """Drops lines with `step > max_step` (a resumed run rewrites them); returns lines kept."""
  if not os.path.exists(path):
    return 0
  kept = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        # A line cut by SIGKILL mid-write: everything after it is unreliable too.
        break
      if rec.get("step", -1) <= max_step:
        kept.append(line)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for line in kept:
      f.write(line + "\n")
  os.replace(tmp, path)
  return len(kept)


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


class MetricWriter:
  """Writes metric dicts by step to JSONL (+ TensorBoard). Only process 0 should write."""

  def __init__(self, workdir: str, *, resume_step: int | None = None, enabled: bool = True,
               tensorboard: bool = True):
    self.enabled = enabled
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.perf_path = os.path.join(workdir, "perf.jsonl")
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    for path in (self.metrics_path, self.perf_path):
      if resume_step is None:
        if os.path.exists(path):
          os.remove(path)
      else:
        truncate_jsonl(path, resume_step)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:  # optional: JSONL is the record
        self._tb = None

  def _write(self, path: str, step: int, metrics: Mapping) -> dict:
    rec = {"step": int(step), **_clean(metrics)}
    if not self.enabled:
      return rec
    with open(path, "a") as f:
      f.write(json.dumps(rec, sort_keys=True) + "\n")
      f.flush()
    if self._tb is not None:
      for k, v in rec.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))
    return rec

  def write(self, step: int, metrics: Mapping) -> dict:
    """Deterministic metrics (identical across kill-and-resume)."""
    return self._write(self.metrics_path, step, metrics)

  def write_perf(self, step: int, metrics: Mapping) -> dict:
    """Wall-clock metrics (timing, throughput, MFU)."""
    return self._write(self.perf_path, step, metrics)

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class Progress:
  """A tqdm bar with step, ETA and headline numbers; silent when disabled or not process 0."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "rl"):
    self._bar = None
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                       file=sys.stderr)

  def update(self, n: int = 1, **headline):
    if self._bar is None:
      return
    if headline:
      self._bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v)
                             for k, v in headline.items()}, refresh=False)
    self._bar.update(n)

  def close(self):
    if self._bar is not None:
      self._bar.close()


# ------------------------------------------------------------------------------------------
# Per-task reductions on host arrays.

def per_task_mean(values: np.ndarray, task_ids: np.ndarray, valid: np.ndarray,
                  num_tasks: int) -> np.ndarray:
  """Mean of `values: f[N]` per task over `valid: bool[N]`; NaN for a task with no entries."""
  values = np.asarray(values, np.float64)
  valid = np.asarray(valid, bool)
  sums = np.bincount(task_ids[valid], weights=values[valid], minlength=num_tasks)
  counts = np.bincount(task_ids[valid], minlength=num_tasks)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def task_dict(prefix: str, task_names: Sequence[str], values: Iterable) -> dict:
  """{f"{prefix}/{task}": value} skipping NaN entries (a task absent from this batch)."""
  out = {}
  for name, v in zip(task_names, values):
    v = float(v)
    if math.isfinite(v):
      out[f"{prefix}/{name}"] = v
  return out


# ------------------------------------------------------------------------------------------
# Throughput.

def transformer_train_flops(num_params: int, num_tokens: int) -> float:
  """≈ 6·P·T: forward (2PT) + backward (4PT) matmul FLOPs of a dense decoder (attention excluded)."""
  return 6.0 * num_params * num_tokens


_TINY_VLM_KEYS = ("width", "mlp_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "vocab_size", "vision", "image_size", "patch_size", "vit_width", "vit_mlp_dim",
                  "vit_layers")


def tiny_vlm_train_flops(config, *, rows: int, seq: int, logit_positions: int,
                         images: int) -> dict[str, float]:
  """Model FLOPs of one forward + backward pass of tiny_vlm (the standard MFU numerator).

  The MFU definition of PaLM (Chowdhery et al. 2022, appendix B): every weight matmul costs
  6 FLOPs per weight per token (2 forward, 4 backward: input and weight gradients), and
  attention adds 12·L·H·D·T per token (scores and values, forward + backward, over the FULL
  T×T square: causal masking is not halved). For tiny_vlm, with E = width, F = mlp_dim,
  L layers, H / Hkv query / KV heads of size D, vocabulary V:

    decoder  = 6 · L·(E·H·D + 2·E·Hkv·D + H·D·E + 3·E·F) · rows·seq   (q, k, v, o; gated MLP)
    attention = 12 · L·H·D · seq · rows·seq
    head     = 6 · E·V · logit_positions     (the trainer's logits cover the response only)
    vision   = images · n · [4·3p²·Wv + Lv·(6·(4·Wv² + 3·Wv·Fv) + 12·Wv·n) + 6·(Wv·E + E·E)]

  With `fusion="cross"` each decoder layer adds a cross-attention sublayer (H heads of size D
  over the n patch features): q and o projections per text token, k and v per patch, scores
  and values over n per text token:

    cross    = 6 · L·2·E·H·D · (rows·seq + images·n) + 12 · L·H·D · n · rows·seq

  and `token_conv` = K adds 6·(K−1)·E per token (its depthwise weights) to the decoder term.

  where the vision tower sees n = (image_size / p)² patches of p = patch_size pixels with width
  Wv = vit_width, Lv = vit_layers blocks of MLP size Fv = vit_mlp_dim (full attention over the
  n patches), then projects to E through two matmuls. The patch embedding costs 4 per weight,
  not 6: pixels need no gradient. Not counted (as in the definition): embedding lookups, norms,
  RoPE, softmax, activations, the loss and the optimizer.

  Args:
    config: a tiny_vlm config: `TinyVLMConfig` or a mapping with its fields (the trainer's
      `model_config(config)`).
    rows: sequences in the pass; seq: positions per sequence (prompt + response, padding
      included: the model computes them); logit_positions: positions that go through the output
      head (rows × response length in the trainer's log-prob pass); images: images the vision
      tower encodes (one per row in the trainer: rows of a group each encode their copy).

  Returns:
    {"decoder", "attention", "cross", "head", "vision", "total"} in FLOPs.
  """
  get = (config.get if isinstance(config, Mapping) else
         lambda k, default=None: getattr(config, k, default))
  missing = [k for k in _TINY_VLM_KEYS if get(k) is None]
  if missing:
    raise ValueError(f"tiny_vlm_train_flops: config lacks {missing}; expected a tiny_vlm config "
                     f"with fields {list(_TINY_VLM_KEYS)}")
  e, f, l = get("width"), get("mlp_dim"), get("num_layers")
  h, hkv, d = get("num_heads"), get("num_kv_heads"), get("head_dim")
  tokens = rows * seq
  out = {
      "decoder": 6.0 * l * (e * h * d + 2 * e * hkv * d + h * d * e + 3 * e * f) * tokens,
      "attention": 12.0 * l * h * d * seq * tokens,
      "cross": 0.0,
      "head": 6.0 * e * get("vocab_size") * logit_positions,
      "vision": 0.0,
  }
  k_conv = get("token_conv", 0) or 0
  if k_conv > 1:
    out["decoder"] += 6.0 * (k_conv - 1) * e * tokens
  if get("vision"):
    p, wv, fv = get("patch_size"), get("vit_width"), get("vit_mlp_dim")
    n = (get("image_size") // p) ** 2
    if get("fusion", "tokens") == "cross":
      out["cross"] = (6.0 * l * 2 * e * h * d * (tokens + images * n)
                      + 12.0 * l * h * d * n * tokens)
    per_patch = (4 * 3 * p * p * wv
                 + get("vit_layers") * (6 * (4 * wv * wv + 3 * wv * fv) + 12 * wv * n)
                 + 6 * (wv * e + e * e))
    out["vision"] = float(images * n * per_patch)
  out["total"] = sum(out.values())
  return out


def mfu(flops: float, seconds: float, peak_flops_per_s: float) -> float:
  if seconds <= 0 or peak_flops_per_s <= 0:
    return float("nan")
  return flops / seconds / peak_flops_per_s


# ------------------------------------------------------------------------------------------
# Reports.

def format_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
  cells = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
  widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
            for i, h in enumerate(header)]
  lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in
                     enumerate(zip(header, widths)))]
  lines.append("  ".join("-" * w for w in widths))
  for c in cells:
    lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in
                           enumerate(zip(c, widths))))
  return "\n".join(lines)


def summary_table(before: Mapping[str, float] | None, after: Mapping[str, float]) -> str:
  """Per-task held-out scores in points (0-100): warm start vs after RL, and the mean."""
  tasks = list(after)
  rows = []
  for t in tasks:
    b = before.get(t, float("nan")) if before else float("nan")
    rows.append([t, 100 * b, 100 * after[t], 100 * (after[t] - b)])
  mb = float(np.mean([before[t] for t in tasks])) if before else float("nan")
  ma = float(np.mean([after[t] for t in tasks]))
  rows.append(["MEAN", 100 * mb, 100 * ma, 100 * (ma - mb)])
  return format_table(rows, ["task", "warm start", "after RL", "delta"])


def plot_per_task(records: Sequence[Mapping], task_names: Sequence[str], out_dir: str,
                  keys: Sequence[str] = ("reward", "entropy", "response_length")) -> list[str]:
  """One PNG per task: each of `keys` (logged as f"{key}/{task}") against the step."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for task in task_names:
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, keys):
      name = f"{key}/{task}"
      pts = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
      ax.set_title(name)
      ax.set_xlabel("step")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{task}.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    paths.append(path)
  return paths
