"""Qwen2.5-VL prompt processing in numpy/PIL: chat template, image placeholders, patches, M-RoPE.

`Qwen25VLProcessor(prompts, images) -> PromptBatch` (the `interface.Processor` contract):

  1. chat template: each prompt becomes one user turn of Qwen's ChatML
       <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n
       <|im_start|>assistant\n
     with every image as <|vision_start|><|image_pad|><|vision_end|> where the prompt has
     `<image>` (or before the text when it has none);
  2. images: smart resize (both sides multiples of patch·merge = 28, area within
     [min_pixels, max_pixels], aspect kept), PIL bicubic on uint8, then patchify into the
     flattened layout of the reference: patches grouped by 2×2 merge unit, each patch
     channel-major (C, T=2, 14, 14) with the still image repeated over T. Pixels stay uint8 here;
     the model normalises them with the mean/std on device (4× less host→device traffic);
  3. each <|image_pad|> is expanded to one token per merged patch (grid_h·grid_w / 4);
  4. tokens are LEFT-padded to `max_prompt_len` and the per-row vision inputs (patches padded
     to `max_patches` per image slot, `max_images` slots per row, windows, gather indices and the
     three M-RoPE position streams) are built; see `qwen25vl.VISION_KEYS` for the layout. Each
     image's patches are stored in window order (the reference permutes them the same way
     inside its vision tower), so window attention can work on contiguous blocks.

Must not import jax, torch or transformers (host-side work; the parity tests bring transformers).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from g2rpo_jax.models.interface import IMAGE_MARKER, PromptBatch
from g2rpo_jax.models.tokenizer import HFTokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
PAD_TOKEN = "<|endoftext|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2-VL's (= CLIP's) pixel statistics
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
  """Target (h, w): multiples of `factor`, area in [min_pixels, max_pixels], aspect kept.

  Round each side to the nearest multiple; if the area is too large scale both sides down by
  sqrt(area / max) and floor, if too small scale up by sqrt(min / area) and ceil.
  """
  if min(height, width) <= 0:
    raise ValueError(f"image size {height}x{width} must be positive")
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"image {height}x{width}: aspect ratio above 200 is not supported")
  h = max(factor, round(height / factor) * factor)
  w = max(factor, round(width / factor) * factor)
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / beta / factor) * factor)
    w = max(factor, math.floor(width / beta / factor) * factor)
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h = math.ceil(height * beta / factor) * factor
    w = math.ceil(width * beta / factor) * factor
  return h, w


def patchify(image: np.ndarray, patch: int = 14, merge: int = 2, temporal: int = 2) -> np.ndarray:
  """image: [H, W, C] (H, W multiples of patch·merge) -> [gh·gw, C·temporal·patch²], rows in
  merge-unit-major order (units row-major, then the merge×merge patches of a unit row-major)."""
  h, w, c = image.shape
  gh, gw = h // patch, w // patch
  x = image.reshape(gh // merge, merge, patch, gw // merge, merge, patch, c)
  x = x.transpose(0, 3, 1, 4, 6, 2, 5)        # (units_h, units_w, mh, mw, C, ph, pw)
  x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (temporal,) + x.shape[5:])
  return x.reshape(gh * gw, c * temporal * patch * patch)


def patch_grid_positions(gh: int, gw: int, merge: int = 2) -> np.ndarray:
  """(row, col) of each patch in `patchify` order: i32[gh·gw, 2]."""
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  order = lambda a: a.reshape(gh // merge, merge, gw // merge, merge).transpose(0, 2, 1, 3).ravel()
  return np.stack([order(rows), order(cols)], axis=-1).astype(np.int32)


def window_ids(gh: int, gw: int, merge: int, window_units: int) -> np.ndarray:
  """Window of each patch (`patchify` order): windows tile the grid of merge units in
  `window_units`×`window_units` blocks (the last row/column of windows may be partial)."""
  pos = patch_grid_positions(gh, gw, merge) // (merge * window_units)
  per_row = -(-(gw // merge) // window_units)
  return (pos[:, 0] * per_row + pos[:, 1]).astype(np.int32)


def window_order(gh: int, gw: int, merge: int, window_units: int) -> np.ndarray:
  """Permutation of the merge units (row-major) into window order: windows row-major, the units
  of a window row-major (the reference's `window_index`). i64[gh·gw / merge²]."""
  uh, uw = np.meshgrid(np.arange(gh // merge), np.arange(gw // merge), indexing="ij")
  per_row = -(-(gw // merge) // window_units)
  win = (uh // window_units) * per_row + uw // window_units
  return np.argsort(win.ravel(), kind="stable")


def preprocess_image(image: np.ndarray, *, min_pixels: int, max_pixels: int, patch: int = 14,
                     merge: int = 2, temporal: int = 2) -> tuple[np.ndarray, tuple[int, int]]:
  """uint8 [H, W, 3] -> (uint8 patches [gh·gw, 3·T·p²], (gh, gw)). PIL bicubic resize."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
  h, w = smart_resize(image.shape[0], image.shape[1], patch * merge, min_pixels, max_pixels)
  if (h, w) != image.shape[:2]:
    image = np.asarray(Image.fromarray(image).resize((w, h), resample=Image.BICUBIC))
  return patchify(image, patch, merge, temporal), (h // patch, w // patch)


def chat_text(prompt: str, num_images: int, system: str | None = DEFAULT_SYSTEM) -> str:
  """The ChatML text of one user turn + the assistant generation prompt (one <|image_pad|> per
  image; the processor expands it). Images go at the `<image>` markers or before the text."""
  block = VISION_START + IMAGE_PAD + VISION_END
  n_markers = prompt.count(IMAGE_MARKER)
  if n_markers == 0:
    content = block * num_images + prompt
  elif n_markers == num_images:
    content = prompt.replace(IMAGE_MARKER, block)
  else:
    raise ValueError(f"prompt has {n_markers} {IMAGE_MARKER!r} markers but {num_images} images")
  head = f"{IM_START}system\n{system}{IM_END}\n" if system is not None else ""
  return f"{head}{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n"


def mrope_positions(tokens: Sequence[int], image_id: int, grids: Sequence[tuple[int, int]],
                    merge: int = 2) -> tuple[np.ndarray, int]:
  """M-RoPE positions i32[3, n] of one unpadded prompt, and the next free position.

  Text tokens advance all three streams together. The k-th run of image tokens (a
  gh/merge × gw/merge grid of merged patches, row-major) starts at the current position c:
  t = c, h = c + row, w = c + col; afterwards c += max(grid rows, grid cols).
  """
  tokens = np.asarray(tokens)
  n = len(tokens)
  pos = np.zeros((3, n), np.int64)
  is_img = tokens == image_id
  cur, i, k = 0, 0, 0
  while i < n:
    if not is_img[i]:
      j = i
      while j < n and not is_img[j]:
        j += 1
      pos[:, i:j] = cur + np.arange(j - i)
      cur += j - i
    else:
      if k >= len(grids):
        raise ValueError(f"prompt has more image-token runs than images ({len(grids)})")
      gh, gw = grids[k][0] // merge, grids[k][1] // merge
      j = i + gh * gw
      if j > n or not is_img[i:j].all() or (j < n and is_img[j]):
        raise ValueError(f"image {k}: expected a run of {gh * gw} image tokens at {i}")
      rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
      pos[0, i:j] = cur
      pos[1, i:j] = cur + rows.ravel()
      pos[2, i:j] = cur + cols.ravel()
      cur += max(gh, gw)
      k += 1
    i = j
  return pos.astype(np.int32), cur


class Qwen25VLProcessor:
  """`interface.Processor` for Qwen2.5-VL. `images[i]` is None, one uint8[H, W, 3] or a list of
  them (at most `max_images`) for prompt i."""

  def __init__(self, tokenizer_path: str, *, max_prompt_len: int, max_images: int = 1,
               min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 256,
               max_patches: int | None = None, system_prompt: str | None = DEFAULT_SYSTEM,
               patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2,
               window_size: int = 112):
    self.tokenizer = HFTokenizer(tokenizer_path, pad=PAD_TOKEN, eos=IM_END, image=IMAGE_PAD)
    self.max_prompt_len = int(max_prompt_len)
    self.max_images = int(max_images)
    self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
    self.patch, self.merge, self.temporal = patch_size, merge_size, temporal_patch_size
    unit = patch_size * merge_size
    if window_size % unit:
      raise ValueError(f"window_size {window_size} must be a multiple of {unit}")
    self.window_units = window_size // unit
    # Fixed capacity so jitted code never retraces: smart_resize keeps h·w <= max_pixels. A
    # multiple of the window capacity, as the model's block-local window attention needs.
    window_patches = (self.window_units * merge_size)**2
    n = int(max_patches or (max_pixels // (unit * unit)) * merge_size**2)
    self.max_patches = -(-n // window_patches) * window_patches
    self.system_prompt = system_prompt

  @property
  def patch_dim(self) -> int:
    return 3 * self.temporal * self.patch**2

  def encode_one(self, prompt: str, images) -> tuple[list[int], list[np.ndarray], list[tuple]]:
    """Unpadded token ids, the images' patches and their (gh, gw) patch grids."""
    images = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
    patches, grids = [], []
    for im in images:
      p, g = preprocess_image(im, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                              patch=self.patch, merge=self.merge, temporal=self.temporal)
      patches.append(p)
      grids.append(g)
    text = chat_text(prompt, len(images), self.system_prompt)
    pieces = text.split(IMAGE_PAD)
    expanded = pieces[0]
    for g, piece in zip(grids, pieces[1:]):
      expanded += IMAGE_PAD * (g[0] * g[1] // self.merge**2) + piece
    return self.tokenizer.encode(expanded), patches, grids

  def __call__(self, prompts: Sequence[str], images=None) -> PromptBatch:
    if images is None:
      images = [None] * len(prompts)
    if len(images) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries")
    b, p, m, n = len(prompts), self.max_prompt_len, self.max_images, self.max_patches
    tokens = np.full((b, p), self.tokenizer.pad_id, np.int32)
    mask = np.zeros((b, p), bool)
    pixels = np.zeros((b, m, n, self.patch_dim), np.uint8)
    patch_pos = np.zeros((b, m, n, 2), np.int32)
    patch_valid = np.zeros((b, m, n), bool)
    win = np.zeros((b, m, n), np.int32)
    embed_index = np.full((b, p), -1, np.int32)
    positions = np.zeros((b, 3, p), np.int32)
    next_position = np.zeros((b,), np.int32)
    image_id = self.tokenizer.image_id
    for r, (prompt, ims) in enumerate(zip(prompts, images)):
      ids, patches, grids = self.encode_one(prompt, ims)
      if len(ids) > p:
        raise ValueError(f"prompt {r}: {len(ids)} tokens (with image tokens) > max_prompt_len {p}")
      if len(patches) > m:
        raise ValueError(f"prompt {r}: {len(patches)} images > max_images {m}")
      start = p - len(ids)
      tokens[r, start:] = ids
      mask[r, start:] = True
      pos, nxt = mrope_positions(ids, image_id, grids, self.merge)
      positions[r, :, start:] = pos
      next_position[r] = nxt
      feat_rows = []
      for k, (pt, (gh, gw)) in enumerate(zip(patches, grids)):
        if len(pt) > n:
          raise ValueError(f"prompt {r} image {k}: {len(pt)} patches > max_patches {n}")
        # Patches go in window order (whole merge units, so the merger is unaffected): every
        # window is then a contiguous run of at most one block of the model's block-local
        # window attention.
        units = window_order(gh, gw, self.merge, self.window_units)
        order = (units[:, None] * self.merge**2 + np.arange(self.merge**2)).ravel()
        pixels[r, k, :len(pt)] = pt[order]
        patch_pos[r, k, :len(pt)] = patch_grid_positions(gh, gw, self.merge)[order]
        patch_valid[r, k, :len(pt)] = True
        win[r, k, :len(pt)] = window_ids(gh, gw, self.merge, self.window_units)[order]
        # The image's u-th token (units row-major) reads merged feature inverse(units)[u] of
        # slot k, at row k·(n/4) + that of the row's feature matrix.
        feat_rows.append(k * (n // self.merge**2) + np.argsort(units))
      if feat_rows:
        embed_index[r, start:][np.asarray(ids) == image_id] = np.concatenate(feat_rows)
    vision = dict(pixels=pixels, patch_pos=patch_pos, patch_valid=patch_valid, window_id=win,
                  embed_index=embed_index, positions=positions, next_position=next_position)
    return PromptBatch(tokens=tokens, mask=mask, vision=vision)
