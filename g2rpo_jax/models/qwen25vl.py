"""Qwen2.5-VL in flax.nnx: vision tower, multimodal-rotary text decoder, KV-cache decoding.

The architecture follows the Qwen2.5-VL report and the Hugging Face checkpoints' layout, so a
checkpoint loads tensor by tensor (`qwen25vl_loading.py`) and matches the PyTorch reference
logit for logit (`tests/test_qwen25vl.py`):

  vision tower   14-px patches × temporal patch 2 (a linear map of the flattened
                 `C·T·p·p` pixels: the reference's stride = kernel Conv3d), RMSNorm blocks with
                 window attention (windows of `window_size` px) except the full-attention layers
                 in `fullatt_block_indexes`, 2-D (h, w) rotary embeddings, and the 2×2 patch
                 merger (RMSNorm → MLP with exact GELU) into the text width.
  text decoder   Qwen2 blocks: grouped-query attention with q/k/v biases, M-RoPE (three position
                 streams t/h/w, frequency bands split by `mrope_section`), RMSNorm, SiLU-gated
                 MLP, tied or separate lm_head.

Batching without data-dependent shapes. The reference packs the patches of all images into one
sequence and attends block-diagonally with `cu_seqlens`, after permuting patches into window
order. Here each prompt row has M image slots of N patches each (`pixels: u8[B, M, N, K]`,
zero-padded, `patch_valid: bool[B, M, N]`), the tower runs on the B·M slots as a batch, and the
processor stores each image's patches already in the reference's window order (whole 2×2 merge
units move, so the merger is unaffected). Window layers then attend block-locally (blocks of one
window's capacity; a window, being a contiguous run no longer than a block, touches at most two
neighbouring blocks), full-attention layers attend densely within the image; both mask by
segment ids. The result is the reference's up to float summation order (measured ~1e-5 on
logits of scale ~5 in f32). Image features reach the prompt by a gather:
`embed_index: i32[B, P]` points each `<|image_pad|>` token at one row of its row's merged
features `[M·N/4, D]` (−1 for text). The three M-RoPE position streams of the prompt
(`positions: i32[B, 3, P]`) are computed on the host by the processor
(`qwen25vl_processing.py`); `next_position: i32[B]` is the first position after the prompt (the
reference's rope delta + prompt length), which response tokens and the decode path continue
from, equal on all three streams. All vision leaves have leading dim B (`VISION_KEYS`), so
`repeat_rows` / batch sharding treat them like the tokens.

Text attention is dense, causal and masked ([P+T, P+T]); the KV cache is `interface.KVCache`. Layers are a Python list (unrolled under jit), each optionally
under `nnx.remat`.

Must not import torch, transformers, the trainer or the tasks; file I/O lives in the loader.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2rpo_jax.models.interface import KVCache, PolicyModel, PromptBatch, register_model

Array = jax.Array

# A large finite negative instead of -inf: a query whose keys are all masked (a padding row)
# then gets a uniform, finite softmax instead of NaNs that could leak into gradients.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_VISION_NORM_EPS = 1e-6  # fixed in the reference vision tower, not a config field

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  out_hidden_size: int = 3584
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  rope_theta: float = 10000.0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_layers: int = 28
  num_heads: int = 28
  num_kv_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  """Architecture (from a checkpoint's config.json) plus how to run it (dtypes, remat)."""
  name: str = "qwen25vl"
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  tie_word_embeddings: bool = False
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  eos_token_ids: tuple[int, ...] = (151645, 151643)
  pad_token_id: int = 151643
  param_dtype: str = "float32"
  dtype: str = "float32"   # activation / matmul dtype; norms, softmax and rotary run in f32
  remat: bool = False      # rematerialise each decoder layer / vision block in the backward pass
  # Pixel normalisation (preprocessor_config.json); applied on device to the uint8 patches.
  image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
  image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

  def __post_init__(self):
    t, v = self.text, self.vision
    if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads:
      raise ValueError(f"text: hidden_size {t.hidden_size} / num_heads {t.num_heads} / "
                       f"num_kv_heads {t.num_kv_heads} must divide evenly")
    if len(t.mrope_section) != 3 or sum(t.mrope_section) != t.head_dim // 2:
      raise ValueError(f"text: mrope_section {t.mrope_section} must be 3 numbers summing to "
                       f"head_dim/2 = {t.head_dim // 2}")
    if v.hidden_size % v.num_heads or v.head_dim % 4:
      raise ValueError(f"vision: hidden_size {v.hidden_size} / num_heads {v.num_heads} must give "
                       f"a head_dim divisible by 4 (2-D rotary), got {v.head_dim}")
    unit = v.spatial_merge_size * v.patch_size
    if v.window_size % unit:
      raise ValueError(f"vision: window_size {v.window_size} must be a multiple of "
                       f"spatial_merge_size·patch_size = {unit}")
    bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
    if bad:
      raise ValueError(f"vision: fullatt_block_indexes {bad} outside [0, depth={v.depth})")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {sorted(DTYPES)}")

  @property
  def vocab_size(self) -> int:
    return self.text.vocab_size

  @property
  def jnp_dtype(self):
    return DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def merge_unit(self) -> int:
    return self.vision.spatial_merge_size**2


# Fields of config.json this port reads, knows to be irrelevant, or refuses.
_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "initializer_range", "use_cache", "attention_dropout", "max_position_embeddings",
    "bos_token_id", "output_attentions", "output_hidden_states", "return_dict", "_name_or_path",
    "max_window_layers", "sliding_window", "layer_types", "tokens_per_second", "hidden_act",
    "rope_scaling", "rope_parameters", "rope_theta", "use_sliding_window", "vision_config",
    "text_config", "eos_token_id", "pad_token_id", "tie_word_embeddings", "vocab_size",
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "image_token_id", "video_token_id",
    "vision_start_token_id", "vision_end_token_id", "vision_token_id", "is_encoder_decoder",
    "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "tf_legacy_loss",
    "use_bfloat16", "torchscript", "pruned_heads", "add_cross_attention", "tie_encoder_decoder",
    "finetuning_task", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "cross_attention_hidden_size", "is_decoder", "depth", "num_heads",
    "out_hidden_size", "in_channels", "in_chans", "patch_size", "temporal_patch_size",
    "spatial_merge_size", "spatial_patch_size", "window_size", "fullatt_block_indexes",
    "embed_dim", "num_key_value_groups", "head_dim",
}


def _rope(section: Mapping[str, Any], where: str) -> tuple[float | None, tuple[int, ...] | None]:
  """Reads (theta, mrope_section) from `rope_parameters` / legacy `rope_scaling` + `rope_theta`."""
  params = dict(section.get("rope_parameters") or {})
  legacy = section.get("rope_scaling") or {}
  params.update({k: v for k, v in legacy.items() if k not in params})
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ("default", "mrope", "axial"):
    raise ValueError(f"config.json {where}: rope type {kind!r} is not supported "
                     "(only the default M-RoPE / axial vision rotary)")
  for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
    if key in params:
      raise ValueError(f"config.json {where}: rope scaling field {key!r} is not supported")
  theta = params.get("rope_theta", section.get("rope_theta"))
  mrope = params.get("mrope_section")
  return theta, (tuple(int(x) for x in mrope) if mrope is not None else None)


def config_from_hf(hf: Mapping[str, Any], **overrides) -> Qwen25VLConfig:
  """Qwen25VLConfig from a parsed config.json (hub flat layout or transformers-5 nested layout).

  Raises ValueError naming the field for anything this port does not implement (another
  model_type, an activation other than SiLU, sliding-window attention, rope scaling).
  `overrides` set run fields: param_dtype, dtype, remat.
  """
  model_type = hf.get("model_type")
  if model_type != "qwen2_5_vl":
    raise ValueError(f"config.json model_type={model_type!r}; this port reads 'qwen2_5_vl'")
  text = dict(hf)
  text.update(hf.get("text_config") or {})
  vis = dict(hf.get("vision_config") or {})
  for where, sec in (("text", text), ("vision_config", vis)):
    act = sec.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"config.json {where}.hidden_act={act!r}; only 'silu' is implemented")
  if text.get("use_sliding_window"):
    raise ValueError("config.json use_sliding_window=true is not supported (Qwen2.5-VL ships "
                     "with it off)")
  unknown = sorted(k for k in hf if k not in _IGNORED_KEYS and not k.startswith("_"))
  if unknown:
    raise ValueError(f"config.json has fields this port does not know: {unknown}")
  theta, mrope = _rope(text, "text")
  if mrope is None:
    raise ValueError("config.json: no mrope_section in rope_parameters / rope_scaling")
  vtheta, _ = _rope(vis, "vision_config")
  n_heads = int(text["num_attention_heads"])
  t = TextConfig(
      vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
      intermediate_size=int(text["intermediate_size"]), num_layers=int(text["num_hidden_layers"]),
      num_heads=n_heads, num_kv_heads=int(text.get("num_key_value_heads") or n_heads),
      rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
      rope_theta=float(theta if theta is not None else 1000000.0), mrope_section=mrope)
  if "head_dim" in text and int(text["head_dim"]) != t.head_dim:
    raise ValueError(f"config.json head_dim={text['head_dim']} != hidden_size/num_heads "
                     f"= {t.head_dim}; a decoupled head_dim is not supported")
  patch = vis.get("patch_size", 14)
  temporal = vis.get("temporal_patch_size", 2)
  if isinstance(patch, (list, tuple)) or isinstance(temporal, (list, tuple)):
    raise ValueError(f"config.json vision_config: non-square patch_size={patch!r} / "
                     f"temporal_patch_size={temporal!r} is not supported")
  v = VisionConfig(
      depth=int(vis.get("depth", 32)), hidden_size=int(vis.get("hidden_size", 1280)),
      intermediate_size=int(vis.get("intermediate_size", 3420)),
      num_heads=int(vis.get("num_heads", 16)),
      out_hidden_size=int(vis.get("out_hidden_size", t.hidden_size)),
      in_channels=int(vis.get("in_channels", vis.get("in_chans", 3))), patch_size=int(patch),
      temporal_patch_size=int(temporal), spatial_merge_size=int(vis.get("spatial_merge_size", 2)),
      window_size=int(vis.get("window_size", 112)),
      fullatt_block_indexes=tuple(int(i) for i in vis.get("fullatt_block_indexes", (7, 15, 23, 31))),
      rope_theta=float(vtheta if vtheta is not None else 10000.0))
  if v.out_hidden_size != t.hidden_size:
    raise ValueError(f"config.json vision_config.out_hidden_size={v.out_hidden_size} != text "
                     f"hidden_size={t.hidden_size}")
  eos = text.get("eos_token_id", 151645)
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
  pad = text.get("pad_token_id")
  tie = bool(hf.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
  return Qwen25VLConfig(
      text=t, vision=v, tie_word_embeddings=tie,
      image_token_id=int(hf.get("image_token_id", 151655)),
      video_token_id=int(hf.get("video_token_id", 151656)),
      vision_start_token_id=int(hf.get("vision_start_token_id", 151652)),
      vision_end_token_id=int(hf.get("vision_end_token_id", 151653)),
      eos_token_ids=eos, pad_token_id=int(pad if pad is not None else eos[-1]), **overrides)


# ----------------------------------------------------------------------------- layers


def _param(rngs: nnx.Rngs, shape, names, dtype, scale: float | None = None, value=None) -> nnx.Param:
  """A parameter with logical axis names; `value` (ones/zeros) or a normal(0, scale) draw."""
  if value is not None:
    x = jnp.full(shape, value, dtype)
  else:
    x = (scale if scale is not None else 0.02) * jax.random.normal(rngs.params(), shape, jnp.float32)
    x = x.astype(dtype)
  # Logical names only: the mesh is applied by the loader / trainer through the sharding rules.
  return nnx.Param(x, out_sharding=tuple(names), eager_sharding=False)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel: [in, out] (the transpose of the checkpoint's weight)."""

  def __init__(self, d_in, d_out, names, *, bias, rngs, param_dtype, dtype):
    self.kernel = _param(rngs, (d_in, d_out), names, param_dtype, scale=d_in**-0.5)
    self.bias = _param(rngs, (d_out,), names[1:], param_dtype, value=0.0) if bias else None
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """weight · x / rms(x), computed in f32 and cast back before the weight (as the reference)."""

  def __init__(self, dim, eps, *, rngs, param_dtype, name="norm"):
    self.scale = _param(rngs, (dim,), (name,), param_dtype, value=1.0)
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class GatedMLP(nnx.Module):
  def __init__(self, d, d_ff, *, bias, rngs, param_dtype, dtype, axes=("embed", "mlp")):
    kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype, bias=bias)
    self.gate = Linear(d, d_ff, axes, **kw)
    self.up = Linear(d, d_ff, axes, **kw)
    self.down = Linear(d_ff, d, axes[::-1], **kw)

  def __call__(self, x: Array) -> Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def rotate_half(x: Array) -> Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
  """x: [..., S, H, d]; cos/sin: [..., S, d] (broadcast over heads); computed in f32."""
  x32 = x.astype(jnp.float32)
  out = x32 * cos[..., None, :] + rotate_half(x32) * sin[..., None, :]
  return out.astype(x.dtype)


def mrope_cos_sin(positions: Array, head_dim: int, theta: float,
                  section: tuple[int, int, int]) -> tuple[Array, Array]:
  """M-RoPE tables. positions: i32[3, B, T] (t, h, w streams) -> cos, sin: f32[B, T, head_dim].

  Frequency j of the half-dimension uses stream k for j in the k-th block of `section`
  (e.g. 16/24/24 of 64), then the half is repeated, as in Qwen2-VL.
  """
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  stream = np.repeat(np.arange(3), section)  # [head_dim/2], which stream feeds each frequency
  # Select the stream per frequency before multiplying: pos[stream[j]] * inv_freq[j].
  pos = jnp.take(positions.astype(jnp.float32), jnp.asarray(stream), axis=0)  # [hd/2, B, T]
  freqs = jnp.moveaxis(pos, 0, -1) * jnp.asarray(inv_freq)                   # [B, T, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def _attend(q: Array, k: Array, v: Array, mask: Array, dtype) -> Array:
  """Grouped-query attention. q: [B, T, K, G, d]; k, v: [B, S, K, d]; mask: bool[B, T, S]."""
  scale = q.shape[-1] ** -0.5
  s = jnp.einsum("btkgd,bskd->bkgts", q.astype(dtype), k.astype(dtype),
                 preferred_element_type=jnp.float32) * scale
  s = jnp.where(mask[:, None, None], s, _MASK_VALUE)
  p = jax.nn.softmax(s, axis=-1).astype(dtype)
  return jnp.einsum("bkgts,bskd->btkgd", p, v.astype(dtype))


# ----------------------------------------------------------------------------- vision tower


class VisionBlock(nnx.Module):

  def __init__(self, cfg: Qwen25VLConfig, rngs: nnx.Rngs):
    v, pd, dt = cfg.vision, cfg.jnp_param_dtype, cfg.jnp_dtype
    self.norm1 = RMSNorm(v.hidden_size, _VISION_NORM_EPS, rngs=rngs, param_dtype=pd, name="embed")
    self.norm2 = RMSNorm(v.hidden_size, _VISION_NORM_EPS, rngs=rngs, param_dtype=pd, name="embed")
    self.qkv = Linear(v.hidden_size, 3 * v.hidden_size, ("embed", "heads"), bias=True,
                      rngs=rngs, param_dtype=pd, dtype=dt)
    self.proj = Linear(v.hidden_size, v.hidden_size, ("heads", "embed"), bias=True,
                       rngs=rngs, param_dtype=pd, dtype=dt)
    self.mlp = GatedMLP(v.hidden_size, v.intermediate_size, bias=True, rngs=rngs, param_dtype=pd,
                        dtype=dt, axes=("embed", "mlp"))
    self.num_heads = v.num_heads
    self.dtype = dt

  def __call__(self, x: Array, cos: Array, sin: Array, seg: Array,
               block: int | None = None) -> Array:
    """x: [I, P, Dv]; cos/sin: f32[I, P, hd]; seg: i32[I, P] attention segment (-1: padding).

    block: attend block-locally (see `_block_local_attend`); None: dense masked attention.
    """
    n_img, n_patch, dim = x.shape
    h = self.norm1(x)
    qkv = self.qkv(h).reshape(n_img, n_patch, 3, self.num_heads, dim // self.num_heads)
    q, k, val = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if block is None:
      mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
      out = _attend(q[:, :, :, None], k, val, mask, self.dtype)  # each head its own kv group
    else:
      out = _block_local_attend(q, k, val, seg, block, self.dtype)
    x = x + self.proj(out.reshape(n_img, n_patch, dim))
    return x + self.mlp(self.norm2(x))


def _block_local_attend(q: Array, k: Array, v: Array, seg: Array, block: int, dtype) -> Array:
  """Attention within segments that are contiguous runs of at most `block` positions.

  q, k, v: [I, N, H, d]; seg: i32[I, N] (-1: padding); N a multiple of `block`. Such a run
  touches at most two consecutive blocks, so queries of block b only need keys of blocks
  b-1, b, b+1: cost 3·block·N instead of N² (the vision tower's windows, stored contiguously by
  the processor, hold at most (window_size / patch_size)² patches).
  """
  n_img, n, heads, d = q.shape
  nb = n // block
  blocks = lambda a: a.reshape(n_img, nb, block, *a.shape[2:])
  pad = lambda a, value: jnp.pad(a, [(0, 0), (1, 1)] + [(0, 0)] * (a.ndim - 2),
                                 constant_values=value)
  near = lambda a: jnp.concatenate([a[:, :-2], a[:, 1:-1], a[:, 2:]], axis=2)  # [I, nb, 3B, ..]
  kb, vb = near(pad(blocks(k), 0)), near(pad(blocks(v), 0))
  qseg, kseg = blocks(seg), near(pad(blocks(seg), -1))
  mask = (qseg[..., :, None] == kseg[..., None, :]) & (kseg[..., None, :] >= 0)
  s = jnp.einsum("ibshd,ibthd->ibhst", blocks(q).astype(dtype), kb.astype(dtype),
                 preferred_element_type=jnp.float32) * d**-0.5
  s = jnp.where(mask[:, :, None], s, _MASK_VALUE)
  p = jax.nn.softmax(s, axis=-1).astype(dtype)
  out = jnp.einsum("ibhst,ibthd->ibshd", p, vb.astype(dtype))
  return out.reshape(n_img, n, heads, d)


class VisionTower(nnx.Module):
  """pixels u8[I, P, C·T·p·p] (+ per-patch metadata) -> merged features [I, P/4, D]."""

  def __init__(self, cfg: Qwen25VLConfig, rngs: nnx.Rngs):
    v, pd, dt = cfg.vision, cfg.jnp_param_dtype, cfg.jnp_dtype
    self.patch_embed = Linear(v.patch_dim, v.hidden_size, ("patch", "embed"), bias=False,
                              rngs=rngs, param_dtype=pd, dtype=dt)
    self.blocks = nnx.List([VisionBlock(cfg, rngs) for _ in range(v.depth)])
    unit = cfg.merge_unit * v.hidden_size
    self.merger_norm = RMSNorm(v.hidden_size, _VISION_NORM_EPS, rngs=rngs, param_dtype=pd, name="embed")
    self.merger_fc1 = Linear(unit, unit, (None, "mlp"), bias=True, rngs=rngs,
                             param_dtype=pd, dtype=dt)
    self.merger_fc2 = Linear(unit, cfg.text.hidden_size, ("mlp", "embed"), bias=True,
                             rngs=rngs, param_dtype=pd, dtype=dt)
    self.full_attention = tuple(i in v.fullatt_block_indexes for i in range(v.depth))
    self.theta = v.rope_theta
    self.head_dim = v.head_dim
    self.merge_unit = cfg.merge_unit
    self.remat = cfg.remat
    self.temporal_patch, self.patch_size = v.temporal_patch_size, v.patch_size
    self.window_patches = (v.window_size // v.patch_size)**2  # patches of one full window
    self.image_mean, self.image_std = tuple(cfg.image_mean), tuple(cfg.image_std)

  def rotary(self, patch_pos: Array) -> tuple[Array, Array]:
    """patch_pos: i32[I, P, 2] (row, col in patches) -> cos, sin: f32[I, P, head_dim]."""
    quarter = self.head_dim // 2
    inv_freq = 1.0 / (self.theta ** (np.arange(0, quarter, 2, dtype=np.float32) / quarter))
    freqs = patch_pos.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [I, P, 2, hd/4]
    half = freqs.reshape(*freqs.shape[:-2], -1)  # (h freqs, w freqs)
    emb = jnp.concatenate([half, half], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)

  def __call__(self, pixels: Array, patch_pos: Array, patch_valid: Array,
               window_id: Array) -> Array:
    """pixels: u8[I, P, K] raw RGB; patch_pos: i32[I, P, 2]; patch_valid: bool[I, P];
    window_id: i32[I, P] (window of each patch within its image) -> f32[I, P/4, D]."""
    per_value = self.temporal_patch * self.patch_size**2  # channel-major (C, T, p, p) layout
    mean = jnp.asarray(np.repeat(np.asarray(self.image_mean, np.float32), per_value))
    std = jnp.asarray(np.repeat(np.asarray(self.image_std, np.float32), per_value))
    x = self.patch_embed((pixels.astype(jnp.float32) / 255.0 - mean) / std)
    cos, sin = self.rotary(patch_pos)
    full_seg = jnp.where(patch_valid, 0, -1).astype(jnp.int32)
    win_seg = jnp.where(patch_valid, window_id, -1).astype(jnp.int32)

    # Window layers attend block-locally: the processor stores each image's patches in window
    # order (every window a contiguous run of <= window_patches). With a patch capacity that is
    # not a multiple of the window (not the processor's layout), dense masked attention.
    local = self.window_patches if x.shape[1] % self.window_patches == 0 else None

    def run_full(block, x):
      return block(x, cos, sin, full_seg, None)

    def run_window(block, x):
      return block(x, cos, sin, win_seg, local)

    if self.remat:
      run_full, run_window = nnx.remat(run_full), nnx.remat(run_window)
    for block, full in zip(self.blocks, self.full_attention):
      x = (run_full if full else run_window)(block, x)
    n_img, n_patch, dim = x.shape
    h = self.merger_norm(x).reshape(n_img, n_patch // self.merge_unit, self.merge_unit * dim)
    h = jax.nn.gelu(self.merger_fc1(h), approximate=False)
    return self.merger_fc2(h)


# ----------------------------------------------------------------------------- text decoder


class Attention(nnx.Module):

  def __init__(self, cfg: Qwen25VLConfig, rngs: nnx.Rngs):
    t, pd, dt = cfg.text, cfg.jnp_param_dtype, cfg.jnp_dtype
    hd = t.head_dim
    kw = dict(rngs=rngs, param_dtype=pd, dtype=dt)
    self.q = Linear(t.hidden_size, t.num_heads * hd, ("embed", "heads"), bias=True, **kw)
    self.k = Linear(t.hidden_size, t.num_kv_heads * hd, ("embed", "kv_heads"), bias=True, **kw)
    self.v = Linear(t.hidden_size, t.num_kv_heads * hd, ("embed", "kv_heads"), bias=True, **kw)
    self.o = Linear(t.num_heads * hd, t.hidden_size, ("heads", "embed"), bias=False, **kw)
    self.num_heads, self.num_kv_heads, self.head_dim = t.num_heads, t.num_kv_heads, hd
    self.dtype = dt

  def qkv(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array, Array]:
    b, s, _ = x.shape
    q = self.q(x).reshape(b, s, self.num_heads, self.head_dim)
    k = self.k(x).reshape(b, s, self.num_kv_heads, self.head_dim)
    v = self.v(x).reshape(b, s, self.num_kv_heads, self.head_dim)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

  def out(self, q: Array, k: Array, v: Array, mask: Array) -> Array:
    b, t = q.shape[:2]
    g = self.num_heads // self.num_kv_heads
    o = _attend(q.reshape(b, t, self.num_kv_heads, g, self.head_dim), k, v, mask, self.dtype)
    return self.o(o.reshape(b, t, self.num_heads * self.head_dim))


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: Qwen25VLConfig, rngs: nnx.Rngs):
    t, pd, dt = cfg.text, cfg.jnp_param_dtype, cfg.jnp_dtype
    self.input_norm = RMSNorm(t.hidden_size, t.rms_norm_eps, rngs=rngs, param_dtype=pd, name="embed")
    self.attn = Attention(cfg, rngs)
    self.post_attn_norm = RMSNorm(t.hidden_size, t.rms_norm_eps, rngs=rngs, param_dtype=pd, name="embed")
    self.mlp = GatedMLP(t.hidden_size, t.intermediate_size, bias=False, rngs=rngs, param_dtype=pd,
                        dtype=dt)

  def __call__(self, x, cos, sin, mask, cache_kv=None, write_at=None):
    """One block. With `cache_kv=(k, v)` ([B, S, K, d]) the new keys/values are written at
    `write_at` and attention runs over the cache; returns (x, (k, v)) either way."""
    q, k, v = self.attn.qkv(self.input_norm(x), cos, sin)
    if cache_kv is not None:
      ck, cv = cache_kv
      k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), write_at, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), write_at, axis=1)
    x = x + self.attn.out(q, k, v, mask)
    x = x + self.mlp(self.post_attn_norm(x))
    return x, (k, v)


# The `vision` pytree of a Qwen2.5-VL PromptBatch (built by `qwen25vl_processing`); every leaf
# has leading dim B, so rows can be repeated / sharded like the tokens. M image slots per row,
# N patches per slot (zero padded), K = C·T·p·p pixels per patch, P prompt length.
VISION_KEYS = {
    "pixels": "u8[B, M, N, K]  raw RGB patches (normalised on device), each image's patches in "
              "window order (qwen25vl_processing.window_order; N a multiple of the window "
              "capacity), which the block-local window attention relies on",
    "patch_pos": "i32[B, M, N, 2]  (row, col) of each patch in its image's patch grid",
    "patch_valid": "bool[B, M, N]  False on padding patches / empty slots",
    "window_id": "i32[B, M, N]  window-attention segment of each patch within its image",
    "embed_index": "i32[B, P]  row of the row's merged features [M·N/4] per image token, -1 else",
    "positions": "i32[B, 3, P]  M-RoPE (t, h, w) positions of the prompt tokens",
    "next_position": "i32[B]  first position after the prompt (decode continues from it)",
}


class Qwen25VL(PolicyModel):
  """Qwen2.5-VL behind `interface.PolicyModel` (full-sequence path + KV-cache path)."""

  def __init__(self, cfg: Qwen25VLConfig, rngs: nnx.Rngs):
    t, pd = cfg.text, cfg.jnp_param_dtype
    self.config = cfg
    self.embed = _param(rngs, (t.vocab_size, t.hidden_size), ("vocab", "embed"), pd, scale=1.0)
    self.vision = VisionTower(cfg, rngs)
    self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(t.num_layers)])
    self.final_norm = RMSNorm(t.hidden_size, t.rms_norm_eps, rngs=rngs, param_dtype=pd, name="embed")
    self.lm_head = None if cfg.tie_word_embeddings else _param(
        rngs, (t.hidden_size, t.vocab_size), ("embed", "vocab"), pd, scale=t.hidden_size**-0.5)

  # -- pieces

  def embed_prompt(self, prompt: PromptBatch) -> Array:
    """Token embeddings f32[B, P, D] with each image-pad token replaced by its vision feature."""
    dt = self.config.jnp_dtype
    x = jnp.take(self.embed[...], prompt.tokens, axis=0).astype(dt)
    vis = prompt.vision
    b, m, n, k = vis["pixels"].shape
    if m == 0 or n == 0:  # a text-only batch: no vision tower in the graph at all
      return x
    feats = self.vision(vis["pixels"].reshape(b * m, n, k), vis["patch_pos"].reshape(b * m, n, 2),
                        vis["patch_valid"].reshape(b * m, n), vis["window_id"].reshape(b * m, n))
    feats = feats.reshape(b, m * feats.shape[1], feats.shape[-1]).astype(dt)
    idx = vis["embed_index"]
    picked = jnp.take_along_axis(feats, jnp.maximum(idx, 0)[..., None], axis=1)
    return jnp.where((idx >= 0)[..., None], picked, x)

  def _embed_tokens(self, tokens: Array) -> Array:
    return jnp.take(self.embed[...], tokens, axis=0).astype(self.config.jnp_dtype)

  def logits(self, hidden: Array) -> Array:
    """The output head: [..., D] (already final-normed) -> f32[..., V]."""
    w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    return jnp.dot(hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)

  def _rope(self, positions: Array) -> tuple[Array, Array]:
    t = self.config.text
    return mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_section)

  # -- full-sequence path

  def hidden_states(self, prompt: PromptBatch, response_tokens: Array) -> Array:
    """prompt (left-padded, P tokens) + response_tokens i32[B, T] -> f32[B, P + T, D], final-normed.

    Response token j sits at M-RoPE position next_position + j on all three streams.
    """
    b, p = prompt.tokens.shape
    n_resp = response_tokens.shape[1]
    x = jnp.concatenate([self.embed_prompt(prompt), self._embed_tokens(response_tokens)], axis=1)
    resp_pos = prompt.vision["next_position"][:, None] + jnp.arange(n_resp, dtype=jnp.int32)
    positions = jnp.concatenate(
        [jnp.moveaxis(prompt.vision["positions"], 1, 0),
         jnp.broadcast_to(resp_pos[None], (3, b, n_resp))], axis=-1)
    cos, sin = self._rope(positions)
    key_ok = jnp.concatenate([prompt.mask.astype(bool), jnp.ones((b, n_resp), bool)], axis=1)
    mask = jnp.tril(jnp.ones((p + n_resp, p + n_resp), bool))[None] & key_ok[:, None, :]

    def run_layer(layer, x):
      return layer(x, cos, sin, mask)[0]

    if self.config.remat:
      run_layer = nnx.remat(run_layer)
    for layer in self.layers:
      x = run_layer(layer, x)
    return self.final_norm(x)

  # -- KV-cache path

  def _step(self, x: Array, positions: Array, cache: KVCache, new_valid: Array):
    """Runs x: [B, n, D] at positions i32[3, B, n] into slots [index, index + n) of the cache.
    Returns the last position's logits f32[B, V] and the cache with index advanced by n."""
    n = x.shape[1]
    index = cache.index[0]  # rows decode in lock-step
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, new_valid, index, axis=1)
    slots = jnp.arange(valid.shape[1])
    causal = slots[None, :] <= (index + jnp.arange(n))[:, None]      # [n, S]
    mask = causal[None] & valid[:, None, :]                          # [B, n, S]
    cos, sin = self._rope(positions)
    ks, vs = [], []
    for layer, ck, cv in zip(self.layers, cache.k, cache.v):
      x, (k, v) = layer(x, cos, sin, mask, (ck, cv), index)
      ks.append(k)
      vs.append(v)
    logits = self.logits(self.final_norm(x[:, -1]))
    return logits, cache.replace(k=tuple(ks), v=tuple(vs), valid=valid, index=cache.index + n)

  def init_cache(self, batch: int, cache_size: int) -> KVCache:
    t = self.config.text
    shape = (batch, cache_size, t.num_kv_heads, t.head_dim)
    dt = self.config.jnp_dtype
    zeros = tuple(jnp.zeros(shape, dt) for _ in range(t.num_layers))
    return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dt) for _ in range(t.num_layers)),
                   valid=jnp.zeros((batch, cache_size), bool),
                   next_pos=jnp.zeros((batch,), jnp.int32), index=jnp.zeros((batch,), jnp.int32))

  def prefill(self, prompt: PromptBatch, cache_size: int) -> tuple[Array, KVCache]:
    b, p = prompt.tokens.shape
    if cache_size < p:
      raise ValueError(f"cache_size {cache_size} < prompt length {p}")
    cache = self.init_cache(b, cache_size)
    positions = jnp.moveaxis(prompt.vision["positions"], 1, 0)
    logits, cache = self._step(self.embed_prompt(prompt), positions, cache,
                               prompt.mask.astype(bool))
    return logits, cache.replace(next_pos=prompt.vision["next_position"].astype(jnp.int32))

  def decode(self, tokens: Array, cache: KVCache) -> tuple[Array, KVCache]:
    b = tokens.shape[0]
    x = self._embed_tokens(tokens[:, None])
    positions = jnp.broadcast_to(cache.next_pos[None, :, None], (3, b, 1))
    logits, cache = self._step(x, positions, cache, jnp.ones((b, 1), bool))
    return logits, cache.replace(next_pos=cache.next_pos + 1)


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """What an experiment config says about a Qwen2.5-VL policy (`config.model` with name
  'qwen25vl'). The architecture comes from `checkpoint_dir`/config.json, never from here."""
  name: str = "qwen25vl"
  checkpoint_dir: str = ""
  load_weights: bool = True      # False: random init of the checkpoint's architecture
  dtype: str = "bfloat16"
  param_dtype: str = "bfloat16"
  remat: bool = True
  # processor
  max_prompt_len: int = 1024
  max_images: int = 1
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 256
  system_prompt: str | None = "You are a helpful assistant."


def _model_config(config) -> ModelConfig:
  from g2rpo_jax.models.interface import config_from_mapping  # pylint: disable=g-import-not-at-top
  cfg = config_from_mapping(ModelConfig, config)
  if not cfg.checkpoint_dir:
    raise ValueError("model.checkpoint_dir is empty: a Qwen2.5-VL policy needs a Hugging Face "
                     "checkpoint directory (config.json, safetensors, tokenizer.json)")
  return cfg


def build_model(config, rngs: nnx.Rngs, mesh=None) -> Qwen25VL:
  """The policy of `config.checkpoint_dir`: loaded weights (sharded over `mesh` if given), or a
  random init of that architecture when `load_weights` is False."""
  from g2rpo_jax.models import hf_loading, qwen25vl_loading  # pylint: disable=g-import-not-at-top
  cfg = _model_config(config)
  run = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat)
  if cfg.load_weights:
    return qwen25vl_loading.load_qwen25vl(cfg.checkpoint_dir, mesh=mesh, **run)
  arch = config_from_hf(hf_loading.read_json(cfg.checkpoint_dir, "config.json"), **run)
  return Qwen25VL(arch, rngs)


def build_processor(config):
  """The processor of `config.checkpoint_dir` (tokenizer.json + the vision config's geometry)."""
  import os  # pylint: disable=g-import-not-at-top
  from g2rpo_jax.models import hf_loading, qwen25vl_processing  # pylint: disable=g-import-not-at-top
  cfg = _model_config(config)
  arch = config_from_hf(hf_loading.read_json(cfg.checkpoint_dir, "config.json"))
  tok = os.path.join(cfg.checkpoint_dir, "tokenizer.json")
  if not os.path.isfile(tok):
    raise hf_loading.CheckpointError(f"checkpoint {cfg.checkpoint_dir!r}: missing file "
                                     "'tokenizer.json'")
  v = arch.vision
  return qwen25vl_processing.Qwen25VLProcessor(
      tok, max_prompt_len=cfg.max_prompt_len, max_images=cfg.max_images,
      min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, system_prompt=cfg.system_prompt,
      patch_size=v.patch_size, merge_size=v.spatial_merge_size,
      temporal_patch_size=v.temporal_patch_size, window_size=v.window_size)


register_model("qwen25vl", build_model=build_model, build_processor=build_processor)
