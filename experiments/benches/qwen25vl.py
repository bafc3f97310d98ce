"""Qwen2.5-VL port: what a decode step costs against the prefill, and the vision tower's share.

A random-init small Qwen2.5-VL (no checkpoint needed): 4 text layers of width 256 and a 4-block
vision tower (2 window + 2 full attention). Rows (all ratios measured in the same run):
  decode_vs_prefill    time(one KV-cache decode step) / time(prefill of the P-token prompt);
                       well below 1 means decoding does not recompute the prefix.
  vision_share         1 - time(prefill, text only) / time(prefill with one image per row).
  step_vs_matmul       time(decode step) / time(a 2048² f32 matmul), a machine-independent scale.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benches import _timing
from g2rpo_jax.models import interface
from g2rpo_jax.models import qwen25vl as q
from g2rpo_jax.models import qwen25vl_processing as qp

NAME = "qwen25vl"
HELP = "Qwen2.5-VL port: decode step vs prefill, vision tower share (random init, small size)"

IMAGE_ID = 7


def _config() -> q.Qwen25VLConfig:
  return q.Qwen25VLConfig(
      text=q.TextConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=4,
                        num_heads=4, num_kv_heads=2, mrope_section=(8, 12, 12)),
      vision=q.VisionConfig(depth=4, hidden_size=128, intermediate_size=256, num_heads=4,
                            out_hidden_size=256, window_size=56, fullatt_block_indexes=(1, 3)))


def _prompt(batch: int, length: int, grid: tuple[int, int] | None) -> interface.PromptBatch:
  """A PromptBatch of `batch` identical rows: text, then (optionally) one image of `grid`
  patches, then text; built with the processor's own helpers."""
  n_img = grid[0] * grid[1] // 4 if grid else 0
  ids = [11] * 8 + [IMAGE_ID] * n_img + [12] * (length - 8 - n_img)
  pos, nxt = qp.mrope_positions(ids, IMAGE_ID, [grid] if grid else [], merge=2)
  n = grid[0] * grid[1] if grid else 0
  rng = np.random.default_rng(0)
  if grid:  # the processor's layout: patches in window order (window = 2x2 merge units)
    units = qp.window_order(*grid, 2, 2)
    order = (units[:, None] * 4 + np.arange(4)).ravel()
    pos_ids, win_ids = qp.patch_grid_positions(*grid)[order], qp.window_ids(*grid, 2, 2)[order]
    feat = np.argsort(units)
  else:
    pos_ids, win_ids, feat = np.zeros((0, 2), np.int32), np.zeros((0,), np.int32), None
  is_img = np.asarray(ids) == IMAGE_ID
  index = np.full((length,), -1, np.int32)
  if grid:
    index[is_img] = feat
  vision = dict(
      pixels=rng.integers(0, 255, (batch, 1, n, 1176), dtype=np.uint8),
      patch_pos=np.broadcast_to(pos_ids, (batch, 1, n, 2)),
      patch_valid=np.ones((batch, 1, n), bool),
      window_id=np.broadcast_to(win_ids, (batch, 1, n)),
      embed_index=np.broadcast_to(index, (batch, length)),
      positions=np.broadcast_to(pos, (batch, 3, length)),
      next_position=np.full((batch,), nxt, np.int32))
  vision = jax.tree.map(lambda x: jnp.asarray(np.ascontiguousarray(x)), vision)
  return interface.PromptBatch(tokens=jnp.asarray(np.broadcast_to(ids, (batch, length)), jnp.int32),
                               mask=jnp.ones((batch, length), bool), vision=vision)


def run(args):
  repeats = args.repeats or 10
  model = q.Qwen25VL(_config(), nnx.Rngs(0))
  graphdef, params = interface.split_model(model)
  batch, length, steps = 8, 256, 64

  @jax.jit
  def prefill(params, prompt):
    return interface.merge_model(graphdef, params).prefill(prompt, length + steps)

  @jax.jit
  def decode(params, tok, cache):
    return interface.merge_model(graphdef, params).decode(tok, cache)

  with_image = _prompt(batch, length, (16, 16))   # 64 image tokens, 256 patches per image
  text_only = _prompt(batch, length, None)
  _, cache = prefill(params, with_image)
  tok = jnp.zeros((batch,), jnp.int32)
  ratio, t_step, t_prefill = _timing.interleaved_ratio(
      lambda: decode(params, tok, cache), lambda: prefill(params, with_image), repeats=repeats)
  text_ratio, _, _ = _timing.interleaved_ratio(
      lambda: prefill(params, text_only), lambda: prefill(params, with_image), repeats=repeats)
  a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  step_vs_mm, _, _ = _timing.interleaved_ratio(lambda: decode(params, tok, cache),
                                               lambda: mm(a), repeats=repeats)
  yield {"batch": batch, "prompt_len": length, "image_patches": 256,
         "decode_vs_prefill": ratio, "vision_share": 1.0 - text_ratio,
         "step_vs_matmul": step_vs_mm}
