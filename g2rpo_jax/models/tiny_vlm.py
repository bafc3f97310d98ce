"""The built-in policy `tiny_vlm`: a small vision-language model in flax.nnx, plus its processor.

Architecture: a ViT-style encoder (square images cut into patches, learned position embeddings,
pre-norm bidirectional blocks) whose patch embeddings are projected into the text width, and a
decoder-only transformer (RoPE, RMSNorm, gated-SiLU MLP, optional grouped KV heads, tied or
untied output). The image reaches the decoder by one of two fusions (`fusion`):

  "tokens": the patch embeddings are scattered, in order, onto the prompt's image placeholder
            tokens (one per patch), as in LLaVA-style models.
  "cross":  the prompt holds no placeholders; every decoder block has a cross-attention
            sublayer from the text to the (normed) patch embeddings, computed once per prompt
            and kept in the KV cache for decoding.

On the built-in tasks the small model with "tokens" fusion locates the objects a question names
but keeps confusing which one the question means ("the red one" vs "the blue one"); with
"cross" fusion plus `token_conv` (each token's input mixed with its predecessors', so the colour
word and its noun meet before attention) and per-image pixel normalisation, spatial-only
supervised training goes from a ~50% plateau to 96% in 300 steps. configs/common.py uses these.
Sizes are presets (`SIZES`, `tiny_vlm_config(size, **overrides)`); `vision=False` gives the
text-only decoder of the same family.

Positions: a left-padded row's first real token has position 0 (cumsum of the mask), so a
prompt's result does not depend on how much padding it got.

Implements `interface.PolicyModel` / `interface.Processor`; registered as "tiny_vlm".
Must not import the trainer, rollout or tasks.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2rpo_jax.models import interface
from g2rpo_jax.models.interface import KVCache, PromptBatch
from g2rpo_jax.models.tokenizer import CharTokenizer

Array = jax.Array
_NEG = -1e30  # additive mask value; finite so a fully masked (padding) query row stays NaN-free


@dataclasses.dataclass(frozen=True)
class TinyVLMConfig:
  """Everything that defines a tiny_vlm (dtypes as strings so the config stays serialisable)."""
  name: str = "tiny_vlm"
  vocab_size: int = 106          # CharTokenizer's; may be larger (extra rows are never produced)
  width: int = 256
  mlp_dim: int = 768
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 64
  rope_theta: float = 10_000.0
  tie_embeddings: bool = False  # untied: a random init then gives O(1) logits, high entropy
  norm_eps: float = 1e-6
  # Vision tower; vision=False drops it (text-only prompts).
  vision: bool = True
  image_size: int = 32
  patch_size: int = 8
  vit_width: int = 128
  vit_layers: int = 2
  vit_heads: int = 4
  vit_mlp_dim: int = 512
  # "fixed": pixels mapped to [-1, 1]. "per_image": each image standardised by its own
  # per-channel mean and overall std, so a task's random background colour and contrast do not
  # shift every patch feature.
  pixel_norm: str = "fixed"
  # How the image reaches the decoder (see the module docstring): "tokens" (patch features in
  # place of the prompt's image placeholders) or "cross" (a cross-attention sublayer per block).
  fusion: str = "tokens"
  # > 0: a learned per-patch embedding of this init std added to the projected patch features
  # (in the text width), so "where" is readable straight from the features the decoder sees.
  image_pos_std: float = 0.0
  # K > 1: a causal depthwise convolution over the decoder's input embeddings, x_t + sum_{j<K}
  # w_j * x_{t-j} (padding contributes zeros), before the first block. 0 = none.
  token_conv: int = 0
  # Token ids the model must know (those of CharTokenizer by default).
  image_token_id: int = 3
  # The processor's fixed prompt length P (left-padded).
  max_prompt_len: int = 64
  dtype: str = "float32"         # compute
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.vision:
      if self.image_size % self.patch_size:
        raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size "
                         f"{self.patch_size}")
      if self.vit_width % self.vit_heads:
        raise ValueError(f"vit_width {self.vit_width} must be a multiple of vit_heads "
                         f"{self.vit_heads}")
    if self.pixel_norm not in ("fixed", "per_image"):
      raise ValueError(f"pixel_norm must be 'fixed' or 'per_image', got {self.pixel_norm!r}")
    if self.fusion not in ("tokens", "cross"):
      raise ValueError(f"fusion must be 'tokens' or 'cross', got {self.fusion!r}")
    if self.image_pos_std < 0:
      raise ValueError(f"image_pos_std must be >= 0, got {self.image_pos_std}")
    if self.token_conv < 0 or self.token_conv > self.max_prompt_len + 1:
      raise ValueError(f"token_conv must be in [0, max_prompt_len + 1 = "
                       f"{self.max_prompt_len + 1}], got {self.token_conv}")
    interface.to_dtype(self.dtype)
    interface.to_dtype(self.param_dtype)

  @property
  def num_image_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2 if self.vision else 0

  @property
  def prompt_image_tokens(self) -> int:
    """Image placeholder tokens the processor puts in a prompt with an image."""
    return self.num_image_tokens if self.fusion == "tokens" else 0

  @property
  def cross_fusion(self) -> bool:
    return self.vision and self.fusion == "cross"


SIZES = {
    # For tests: tens of thousands of parameters.
    "nano": dict(width=64, mlp_dim=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 vit_width=32, vit_layers=1, vit_heads=2, vit_mlp_dim=64, image_size=16,
                 patch_size=8, max_prompt_len=32),
    "small": dict(width=128, mlp_dim=384, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=32, vit_width=64, vit_layers=2, vit_heads=2, vit_mlp_dim=256),
    # The default job's: `small`'s depth and vision tower at twice the decoder width (3.4M
    # parameters with the job's options). On a 2-core CPU its update runs at ~0.6 of the
    # machine's big-matmul throughput, `small`'s at ~0.38 (its width-128 matmuls run at ~0.6).
    "medium": dict(width=256, mlp_dim=768, num_layers=3, num_heads=4, num_kv_heads=2,
                   head_dim=64, vit_width=64, vit_layers=2, vit_heads=2, vit_mlp_dim=256),
    "default": {},  # ~3.85M parameters
    "base": dict(width=384, mlp_dim=1152, num_layers=6, num_heads=6, num_kv_heads=2,
                 head_dim=64, vit_width=192, vit_layers=3, vit_heads=4, vit_mlp_dim=768),
    # The text-only decoder of the performance issue's standard workload (~5.2M parameters).
    "peer": dict(vision=False, vocab_size=2048, width=256, mlp_dim=1024, num_layers=4,
                 num_heads=4, num_kv_heads=4, head_dim=64, tie_embeddings=False),
}


def tiny_vlm_config(size: str = "default", **overrides) -> TinyVLMConfig:
  if size not in SIZES:
    raise ValueError(f"unknown tiny_vlm size {size!r}; expected one of {sorted(SIZES)}")
  return TinyVLMConfig(**{**SIZES[size], **overrides})


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


def _param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), eager_sharding=False, out_sharding=names)


def _fan_in(in_axis, out_axis):
  return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                           in_axis=in_axis, out_axis=out_axis)


def dense(x: Array, w: Array, preferred_element_type=None) -> Array:
  """x: [..., K] @ w: [K, N] -> [..., N] as ONE 2-D matmul over the flattened leading dims.

  Why not `x @ w` on [B, T, K]: its gradient w.r.t. w contracts two dims (B and T), and XLA:CPU
  lowers that by materialising the output gradient transposed to [N, B*T], fused with the
  elementwise backward before it (measured: those transposes were a third of the update step).
  Flattened, the weight gradient is a plain [K, B*T] x [B*T, N] dot with no transpose.
  """
  lead = x.shape[:-1]
  y = jnp.matmul(x.reshape(-1, x.shape[-1]), w, preferred_element_type=preferred_element_type)
  return y.reshape(lead + (w.shape[-1],))


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, param_dtype, *, rngs: nnx.Rngs):
    self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    # Statistics in f32 whatever the compute dtype: bf16 mean-of-squares loses too much.
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale.value.astype(jnp.float32)).astype(x.dtype)


class GatedMLP(nnx.Module):

  def __init__(self, width: int, hidden: int, param_dtype, *, rngs: nnx.Rngs):
    init = _fan_in(0, 1)
    self.gate = _param(rngs, init, (width, hidden), ("embed", "mlp"), param_dtype)
    self.up = _param(rngs, init, (width, hidden), ("embed", "mlp"), param_dtype)
    self.down = _param(rngs, init, (hidden, width), ("mlp", "embed"), param_dtype)

  def __call__(self, x: Array) -> Array:
    dt = x.dtype
    h = jax.nn.silu(dense(x, self.gate.value.astype(dt))) * dense(x, self.up.value.astype(dt))
    return dense(h, self.down.value.astype(dt))


def rope_tables(pos: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """RoPE factors for `rope`, computed once per forward pass and shared by every layer.

  pos: i32[B, T] -> (c, s), each f32[B, T, 2, D/2]: c = [cos, cos], s = [-sin, sin] of
  pos · theta^(-2i/D). Materialised behind an optimization barrier on purpose: otherwise XLA:CPU
  fuses cos/sin into each consumer and recomputes them per element of q, k and their gradients
  (measured on the default job's update step: 6% of it, 14% with `attend`'s layout, whose q/k
  transposes the recomputation then joined).
  """
  d = head_dim
  freqs = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  ang = pos.astype(jnp.float32)[..., None] * freqs            # [B, T, D/2]
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  return jax.lax.optimization_barrier((jnp.stack([cos, cos], axis=-2),
                                       jnp.stack([-sin, sin], axis=-2)))


def rope(x: Array, tables: tuple[Array, Array]) -> Array:
  """Rotary embedding, half-split convention: with x = [x1, x2] (halves of D),
  rope(x) = [x1·cos − x2·sin, x1·sin + x2·cos]. x: [B, T, H, D]; tables from `rope_tables`.

  Written on x viewed as [B, T, H, 2, D/2] as x·c + flip(x)·s (flip swaps the halves), so
  neither direction slices, concatenates or pads: the backward is the same two products.
  """
  c, s = tables
  b, t, h, d = x.shape
  xf = x.astype(jnp.float32).reshape(b, t, h, 2, d // 2)
  y = xf * c[:, :, None] + xf[..., ::-1, :] * s[:, :, None]
  return y.reshape(x.shape).astype(x.dtype)


def attend(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
  """Grouped-query attention. q: [B, T, H, D]; k, v: [B, Hkv, S, D] (the KV-cache layout);
  mask: bool[B, T, S] or None (attend everywhere). Returns [B, T, H, D]. Scores and softmax
  in f32.

  Query head h uses KV head h // (H / Hkv). The G = H / Hkv query heads that share a KV head
  are folded into the query dim, so both contractions are plain batched matmuls over (B, Hkv):
  [G·T, D] x [D, S] and [G·T, S] x [S, D], with K and V neither broadcast nor transposed. In
  the [B, T, Hkv, G, D] x [B, S, Hkv, D] einsum layout XLA:CPU copied the f32[B, Hkv, G, T, S]
  scores and their gradients to transposed layouts (measured: the largest non-matmul cost of
  the update). Decode is the T = 1 case against the cache, which is kept in this layout because
  in [B, S, Hkv, D] XLA:CPU transposed the whole cache every step. The 1/sqrt(D) scale goes on
  q, the smaller operand.
  """
  b, t, h, d = q.shape
  hkv, s_len = k.shape[1], k.shape[2]
  g = h // hkv
  q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
  qg = q.reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)
  s = jnp.einsum("bkqd,bksd->bkqs", qg, k, preferred_element_type=jnp.float32)
  if mask is not None:
    s = jnp.where(mask[:, None, None], s.reshape(b, hkv, g, t, s_len), _NEG)
    s = s.reshape(b, hkv, g * t, s_len)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  o = jnp.einsum("bkqs,bksd->bkqd", p, v)                       # [B, Hkv, G·T, D]
  return o.reshape(b, hkv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


class Attention(nnx.Module):

  def __init__(self, width, num_heads, num_kv_heads, head_dim, param_dtype, *, rngs):
    self.wq = _param(rngs, _fan_in(0, (1, 2)), (width, num_heads, head_dim),
                     ("embed", "heads", "head_dim"), param_dtype)
    self.wk = _param(rngs, _fan_in(0, (1, 2)), (width, num_kv_heads, head_dim),
                     ("embed", "kv_heads", "head_dim"), param_dtype)
    self.wv = _param(rngs, _fan_in(0, (1, 2)), (width, num_kv_heads, head_dim),
                     ("embed", "kv_heads", "head_dim"), param_dtype)
    self.wo = _param(rngs, _fan_in((0, 1), 2), (num_heads, head_dim, width),
                     ("heads", "head_dim", "embed"), param_dtype)

  @staticmethod
  def project(x: Array, w: Array) -> Array:
    """x: [B, T, E] times a [E, H, D] projection -> [B, T, H, D] (one 2-D matmul, see `dense`)."""
    e, h, d = w.shape
    return dense(x, w.astype(x.dtype).reshape(e, h * d)).reshape(x.shape[:-1] + (h, d))

  def qkv(self, x: Array):
    """x: [B, T, E] -> q [B, T, H, D], k, v [B, T, Hkv, D]."""
    return (self.project(x, self.wq.value), self.project(x, self.wk.value),
            self.project(x, self.wv.value))

  def out(self, o: Array) -> Array:
    """o: [B, T, H, D] -> [B, T, E]."""
    h, d, e = self.wo.value.shape
    w = self.wo.value.astype(o.dtype).reshape(h * d, e)
    return dense(o.reshape(o.shape[:-2] + (h * d,)), w)


class CrossAttention(nnx.Module):
  """The "cross" fusion sublayer: text queries attend to the image's patch features.

  No positions on either side (the patch features carry their own, from the vision tower's
  position embedding). The image side is projected once per prompt (`kv`) and kept in the KV
  cache for decoding. Rows without an image get zero from the sublayer (`has_image`).
  """

  def __init__(self, width, num_heads, head_dim, eps, param_dtype, *, rngs):
    self.norm = RMSNorm(width, eps, param_dtype, rngs=rngs)
    self.attn = Attention(width, num_heads, num_heads, head_dim, param_dtype, rngs=rngs)

  def kv(self, image: Array) -> tuple[Array, Array]:
    """image: [B, N, E] (normed patch features) -> k, v [B, H, N, D] (the `attend` layout)."""
    return tuple(jnp.swapaxes(self.attn.project(image, w.value), 1, 2)
                 for w in (self.attn.wk, self.attn.wv))

  def __call__(self, x: Array, k: Array, v: Array, has_image: Array) -> Array:
    """x: [B, T, E]; k, v from `kv`; has_image: bool[B] -> the sublayer output [B, T, E]."""
    o = attend(self.attn.project(self.norm(x), self.attn.wq.value), k, v, None)
    return self.attn.out(o) * has_image[:, None, None].astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm transformer block. `rot` is `rope_tables(...)` or None (no rotary positions: the
  ViT). With `cross=True` (the "cross" fusion) a cross-attention sublayer sits between the
  self-attention and the MLP; `image` is then its (k, v, has_image) or None (no image batch)."""

  def __init__(self, width, mlp_dim, num_heads, num_kv_heads, head_dim, eps, param_dtype,
               *, rngs, cross: bool = False):
    self.attn_norm = RMSNorm(width, eps, param_dtype, rngs=rngs)
    self.attn = Attention(width, num_heads, num_kv_heads, head_dim, param_dtype, rngs=rngs)
    self.cross = (CrossAttention(width, num_heads, head_dim, eps, param_dtype, rngs=rngs)
                  if cross else None)
    self.mlp_norm = RMSNorm(width, eps, param_dtype, rngs=rngs)
    self.mlp = GatedMLP(width, mlp_dim, param_dtype, rngs=rngs)

  def _qkv(self, x, rot):
    """-> q [B, T, H, D] and k, v in the cache layout [B, Hkv, T, D]."""
    q, k, v = self.attn.qkv(self.attn_norm(x))
    if rot is not None:
      q, k = rope(q, rot), rope(k, rot)
    return q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

  def _finish(self, x, o, image):
    x = x + self.attn.out(o)
    if self.cross is not None and image is not None:
      x = x + self.cross(x, *image)
    return x + self.mlp(self.mlp_norm(x))

  def __call__(self, x: Array, rot, mask: Array | None, image=None):
    """Whole-sequence pass. x: [B, T, E]; mask: bool[B, T, T] or None (full attention).
    Returns (x, k, v) with k, v: [B, Hkv, T, D]."""
    q, k, v = self._qkv(x, rot)
    return self._finish(x, attend(q, k, v, mask), image), k, v

  def decode(self, x: Array, rot, mask: Array, k_cache: Array, v_cache: Array, idx, image=None):
    """One token per row. x: [B, 1, E]; mask: bool[B, 1, S]; caches [B, Hkv, S, D] get the new
    key/value at slot `idx` (a scalar) before attending."""
    q, k, v = self._qkv(x, rot)                                     # k, v: [B, Hkv, 1, D]
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, idx, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, idx, 0))
    return self._finish(x, attend(q, k_cache, v_cache, mask), image), k_cache, v_cache


class VisionEncoder(nnx.Module):
  """Square image -> one embedding per patch, projected to the text width: [B, N, E]."""

  def __init__(self, c: TinyVLMConfig, *, rngs: nnx.Rngs):
    pdt = interface.to_dtype(c.param_dtype)
    n = c.num_image_tokens
    patch_dim = c.patch_size * c.patch_size * 3
    self.patch_size = c.patch_size
    self.pixel_norm = c.pixel_norm
    self.patch_embed = _param(rngs, _fan_in(0, 1), (patch_dim, c.vit_width), ("patch", "embed"),
                              pdt)
    self.pos_embed = _param(rngs, nnx.initializers.normal(0.02), (n, c.vit_width),
                            (None, "embed"), pdt)
    self.blocks = nnx.List([
        Block(c.vit_width, c.vit_mlp_dim, c.vit_heads, c.vit_heads, c.vit_width // c.vit_heads,
              c.norm_eps, pdt, rngs=rngs) for _ in range(c.vit_layers)])
    self.norm = RMSNorm(c.vit_width, c.norm_eps, pdt, rngs=rngs)
    self.proj1 = _param(rngs, _fan_in(0, 1), (c.vit_width, c.width), (None, "embed"), pdt)
    self.proj2 = _param(rngs, _fan_in(0, 1), (c.width, c.width), ("embed", "mlp"), pdt)
    self.out_pos_embed = (
        _param(rngs, nnx.initializers.normal(c.image_pos_std), (n, c.width), (None, "embed"),
               pdt) if c.image_pos_std > 0 else None)

  def __call__(self, pixels: Array, dtype) -> Array:
    b, hgt, wid, ch = pixels.shape
    p = self.patch_size
    x = pixels.astype(jnp.float32) * (2.0 / 255.0) - 1.0
    if self.pixel_norm == "per_image":
      mean = jnp.mean(x, axis=(1, 2), keepdims=True)
      std = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=(1, 2, 3), keepdims=True))
      x = (x - mean) / (std + 1e-3)                  # a blank image stays 0, not 0/0
    x = x.reshape(b, hgt // p, p, wid // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (hgt // p) * (wid // p), p * p * ch).astype(dtype)
    x = dense(x, self.patch_embed.value.astype(dtype)) + self.pos_embed.value.astype(dtype)
    for blk in self.blocks:
      x, _, _ = blk(x, None, None)
    x = self.norm(x)
    x = jax.nn.gelu(dense(x, self.proj1.value.astype(dtype)))
    x = dense(x, self.proj2.value.astype(dtype))
    if self.out_pos_embed is not None:
      x = x + self.out_pos_embed.value.astype(dtype)
    return x


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class TinyVLM(interface.PolicyModel):
  """See the module docstring. All shapes as in `interface.PolicyModel`."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    c = interface.config_from_mapping(TinyVLMConfig, config)
    self.config = c
    pdt = interface.to_dtype(c.param_dtype)
    self.dtype = interface.to_dtype(c.dtype)
    # Embedding rows have norm ~1 so that a tied head gives O(1) logits; inputs are scaled up by
    # sqrt(width) to unit RMS per coordinate.
    self.embed = _param(rngs, nnx.initializers.normal(1.0 / math.sqrt(c.width)),
                        (c.vocab_size, c.width), ("vocab", "embed"), pdt)
    # token_conv taps w_1..w_{K-1}; small at init so the block input starts near the embedding.
    self.token_conv = (
        _param(rngs, nnx.initializers.normal(0.5 / math.sqrt(c.token_conv)),
               (c.token_conv - 1, c.width), (None, "embed"), pdt) if c.token_conv > 1 else None)
    self.vision = VisionEncoder(c, rngs=rngs) if c.vision else None
    self.image_norm = RMSNorm(c.width, c.norm_eps, pdt, rngs=rngs) if c.cross_fusion else None
    self.layers = nnx.List([
        Block(c.width, c.mlp_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.norm_eps, pdt,
              rngs=rngs, cross=c.cross_fusion) for _ in range(c.num_layers)])
    self.final_norm = RMSNorm(c.width, c.norm_eps, pdt, rngs=rngs)
    self.head = None if c.tie_embeddings else _param(
        rngs, _fan_in(0, 1), (c.width, c.vocab_size), ("embed", "vocab"), pdt)

  # -- embeddings ----------------------------------------------------------------------------

  def _embed_tokens(self, tokens: Array) -> Array:
    e = jnp.take(self.embed.value, tokens, axis=0).astype(self.dtype)
    return e * jnp.asarray(math.sqrt(self.config.width), self.dtype)

  def _embed_prompt(self, prompt: PromptBatch) -> Array:
    x = self._embed_tokens(prompt.tokens)
    if self.vision is None or prompt.vision is None or self.config.cross_fusion:
      return x
    img = self.vision(prompt.vision["pixels"], self.dtype)           # [B, N, E]
    is_img = (prompt.tokens == self.config.image_token_id) & prompt.mask
    # The k-th placeholder of a row takes the k-th patch embedding (a scatter in order, done as
    # a gather so it stays one fused op).
    k = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, img.shape[1] - 1)
    picked = jnp.take_along_axis(img, k[..., None], axis=1)
    return jnp.where(is_img[..., None], picked, x)

  def _image_kv(self, prompt: PromptBatch):
    """"cross" fusion: per layer (k, v, has_image) of the prompt's image; else None."""
    if not self.config.cross_fusion or prompt.vision is None:
      return None
    img = self.image_norm(self.vision(prompt.vision["pixels"], self.dtype))
    has = prompt.vision.get("has_image")
    if has is None:  # a hand-built batch without the flag: every row has its image
      has = jnp.ones(prompt.tokens.shape[:1], bool)
    return tuple(blk.cross.kv(img) + (has,) for blk in self.layers)

  def image_features(self, pixels: Array) -> Array:
    """The tower's patch embeddings in the text width, [B, N, E] (before `image_norm`)."""
    if self.vision is None:
      raise NotImplementedError("this TinyVLM has no vision tower (config.vision = False)")
    return self.vision(pixels, self.dtype)

  def _token_conv(self, x: Array, valid: Array) -> Array:
    """x_t + sum_{j=1}^{K-1} w_j * x_{t-j} over [B, T, E], invalid (padding) inputs as zeros."""
    if self.token_conv is None:
      return x
    w = self.token_conv.value.astype(x.dtype)
    xm = x * valid[..., None].astype(x.dtype)
    t = x.shape[1]
    out = x
    for j in range(1, w.shape[0] + 1):
      out = out + w[j - 1] * jnp.pad(xm, ((0, 0), (j, 0), (0, 0)))[:, :t]
    return out

  @staticmethod
  def _prompt_positions(mask: Array) -> Array:
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)

  # -- interface -----------------------------------------------------------------------------

  def logits(self, hidden: Array) -> Array:
    dt = hidden.dtype
    w = self.embed.value.T if self.head is None else self.head.value
    return dense(hidden, w.astype(dt), preferred_element_type=jnp.float32)

  def _rope(self, pos: Array):
    return rope_tables(pos, self.config.head_dim, self.config.rope_theta)

  def _run(self, x, pos, mask, image_kv):
    ks, vs = [], []
    rot = self._rope(pos)
    for i, blk in enumerate(self.layers):
      x, k, v = blk(x, rot, mask, None if image_kv is None else image_kv[i])
      ks.append(k)
      vs.append(v)
    return self.final_norm(x), ks, vs

  def hidden_states(self, prompt: PromptBatch, response_tokens: Array) -> Array:
    t = response_tokens.shape[1]
    x = jnp.concatenate([self._embed_prompt(prompt), self._embed_tokens(response_tokens)], 1)
    n_valid = jnp.sum(prompt.mask.astype(jnp.int32), axis=1)
    pos = jnp.concatenate([self._prompt_positions(prompt.mask),
                           n_valid[:, None] + jnp.arange(t, dtype=jnp.int32)[None]], axis=1)
    valid = jnp.concatenate([prompt.mask.astype(bool), jnp.ones(response_tokens.shape, bool)], 1)
    n = x.shape[1]
    causal = jnp.tril(jnp.ones((n, n), bool))
    h, _, _ = self._run(self._token_conv(x, valid), pos, causal[None] & valid[:, None, :],
                        self._image_kv(prompt))
    return h

  def prefill(self, prompt: PromptBatch, cache_size: int) -> tuple[Array, KVCache]:
    b, p = prompt.tokens.shape
    if cache_size < p:
      raise ValueError(f"cache_size {cache_size} is smaller than the prompt length {p}")
    valid = prompt.mask.astype(bool)
    causal = jnp.tril(jnp.ones((p, p), bool))
    x = self._embed_prompt(prompt)
    image_kv = self._image_kv(prompt)
    h, ks, vs = self._run(self._token_conv(x, valid), self._prompt_positions(prompt.mask),
                          causal[None] & valid[:, None, :], image_kv)
    # Cache layout [B, Hkv, S, D] (see `attend`), as the blocks return k and v.
    pad = ((0, 0), (0, 0), (0, cache_size - p), (0, 0))
    lay = lambda x: jnp.pad(x, pad)
    # token_conv state: the last K-1 (masked) input embeddings, oldest first.
    conv = (None if self.token_conv is None else
            (x * valid[..., None].astype(x.dtype))[:, p - self.token_conv.value.shape[0]:])
    cache = KVCache(
        k=tuple(lay(k) for k in ks), v=tuple(lay(v) for v in vs),
        valid=jnp.pad(valid, ((0, 0), (0, cache_size - p))),
        next_pos=jnp.sum(valid, axis=1, dtype=jnp.int32),
        index=jnp.full((b,), p, jnp.int32), image=image_kv, conv=conv)
    return self.logits(h[:, -1]), cache

  def decode(self, tokens: Array, cache: KVCache) -> tuple[Array, KVCache]:
    b = tokens.shape[0]
    idx = cache.index[0]  # rows decode in lock-step (see KVCache)
    x = self._embed_tokens(tokens[:, None])
    conv = cache.conv
    if self.token_conv is not None:
      w = self.token_conv.value.astype(x.dtype)                  # [K-1, E]; w[j-1] taps x_{t-j}
      new = x
      x = x + jnp.einsum("je,bje->be", w, conv[:, ::-1])[:, None]
      conv = jnp.concatenate([conv[:, 1:], new], axis=1)
    rot = self._rope(cache.next_pos[:, None])
    valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones((b, 1), bool), (0, idx))
    mask = valid[:, None, :]
    ks, vs = [], []
    for i, (blk, kc, vc) in enumerate(zip(self.layers, cache.k, cache.v)):
      x, kc, vc = blk.decode(x, rot, mask, kc, vc, idx,
                             None if cache.image is None else cache.image[i])
      ks.append(kc)
      vs.append(vc)
    logits = self.logits(self.final_norm(x)[:, 0])
    return logits, KVCache(k=tuple(ks), v=tuple(vs), valid=valid, next_pos=cache.next_pos + 1,
                           index=cache.index + 1, image=cache.image, conv=conv)


# ------------------------------------------------------------------------------------------------
# Processor
# ------------------------------------------------------------------------------------------------


class TinyVLMProcessor:
  """prompts + images -> PromptBatch for tiny_vlm (see `interface.Processor`).

  Row layout: PAD.. BOS text-before-marker IMAGE*N text-after-marker, left-padded to
  `max_prompt_len`; N = `config.prompt_image_tokens` (the patch count with "tokens" fusion, 0
  with "cross": the marker is then just dropped). Images must be uint8[H, W, 3]; other sizes
  than `image_size` are resized (bilinear) so tasks can render at any resolution.
  vision = {"pixels": u8[B, image_size, image_size, 3] (zeros for rows without an image),
            "has_image": bool[B]}.
  """

  def __init__(self, config, tokenizer=None):
    self.config = c = interface.config_from_mapping(TinyVLMConfig, config)
    self.tokenizer = tokenizer if tokenizer is not None else CharTokenizer()
    self.max_prompt_len = c.max_prompt_len
    if self.tokenizer.vocab_size > c.vocab_size:
      raise ValueError(f"tokenizer vocab_size {self.tokenizer.vocab_size} exceeds the model's "
                       f"vocab_size {c.vocab_size}")
    if c.vision and self.tokenizer.image_id != c.image_token_id:
      raise ValueError(f"tokenizer image_id {self.tokenizer.image_id} != config.image_token_id "
                       f"{c.image_token_id}")

  def _image(self, i: int, img) -> np.ndarray:
    c = self.config
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
      raise ValueError(f"image {i}: expected uint8[H, W, 3], got {img.dtype}{list(img.shape)}")
    if img.shape[:2] != (c.image_size, c.image_size):
      from PIL import Image  # pylint: disable=g-import-not-at-top
      img = np.asarray(Image.fromarray(img).resize((c.image_size, c.image_size),
                                                   Image.BILINEAR))
    return img

  def _ids(self, i: int, text: str, has_image: bool) -> list[int]:
    tok = self.tokenizer
    parts = text.split(interface.IMAGE_MARKER)
    if len(parts) > 2:
      raise ValueError(f"prompt {i}: at most one {interface.IMAGE_MARKER!r} marker per prompt, "
                       f"found {len(parts) - 1}")
    if not has_image:
      if len(parts) == 2:
        raise ValueError(f"prompt {i} has an {interface.IMAGE_MARKER!r} marker but no image")
      return [tok.bos_id] + tok.encode(text)
    before, after = parts if len(parts) == 2 else ("", parts[0])
    img = [tok.image_id] * self.config.prompt_image_tokens
    return [tok.bos_id] + tok.encode(before) + img + tok.encode(after)

  def __call__(self, prompts: Sequence[str], images=None) -> PromptBatch:
    c = self.config
    b = len(prompts)
    if images is None:
      images = [None] * b
    if len(images) != b:
      raise ValueError(f"got {b} prompts but {len(images)} images (one per prompt, or None)")
    if not c.vision and any(im is not None for im in images):
      raise ValueError("this tiny_vlm config has vision=False but images were given")
    p = self.max_prompt_len
    tokens = np.full((b, p), self.tokenizer.pad_id, np.int32)
    mask = np.zeros((b, p), bool)
    pixels = np.zeros((b, c.image_size, c.image_size, 3), np.uint8) if c.vision else None
    has_image = np.zeros((b,), bool)
    for i, (text, img) in enumerate(zip(prompts, images)):
      ids = self._ids(i, text, img is not None)
      if len(ids) > p:
        raise ValueError(f"prompt {i} is {len(ids)} tokens (with BOS and image tokens), longer "
                         f"than max_prompt_len={p}")
      tokens[i, p - len(ids):] = ids
      mask[i, p - len(ids):] = True
      if img is not None:
        pixels[i] = self._image(i, img)
        has_image[i] = True
    return PromptBatch(tokens=tokens, mask=mask,
                       vision={"pixels": pixels, "has_image": has_image} if c.vision else None)


interface.register_model(
    "tiny_vlm",
    build_model=lambda config, rngs: TinyVLM(config, rngs=rngs),
    build_processor=lambda config: TinyVLMProcessor(config))
