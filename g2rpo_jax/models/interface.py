"""The policy interface every model implements: tokenizer, processor, model, KV cache, registry.

Three parties meet here: a model port (the built-in `tiny_vlm`, Qwen2.5-VL, ...), the rollout
engine (`g2rpo_jax/rollout.py`) and the trainer. The contract, in data-flow order:

  Processor(prompts: list[str], images: list[uint8[H, W, 3] | None]) -> PromptBatch
      Tokenises, inserts the model's image placeholder tokens where the image goes, LEFT-pads to
      a fixed configured length P (so jitted code never retraces on prompt length) and prepares
      the model-specific vision inputs. A prompt longer than P is an error, never a truncation.

  PolicyModel (an `nnx.Module`)
      hidden_states(prompt, response_tokens) -> [B, P + T, E]      full-sequence path
      logits(hidden: [..., E]) -> f32[..., V]                      the output head alone
      prefill(prompt, cache_size) -> (f32[B, V], KVCache)          logits after the prompt
      decode(tokens: i32[B], cache) -> (f32[B, V], KVCache)        one new token per row

  Pure functions of (graphdef, params) for jit / grad: `split_model`, `merge_model`,
  `sequence_logprobs` (the ONE place where the log-probs of a response are computed; the rollout
  engine returns log-probs of the same distribution, see `sequence_logprobs`).

  Tests and benches that need *a* random model without init compiles: `models/testing.py`.

  Registry: `register_model(name, build_model=..., build_processor=...)`, then
  `build_model(config, rngs)` / `build_processor(config)` look `config.name` up. A name that is
  not registered yet is imported from `g2rpo_jax.models.<name>` (so a port registers itself at
  import time in its own module), then looked up again.

Positions are model-internal: the model derives position ids from `PromptBatch.mask` (and, for
M-RoPE models, from the vision inputs) in `prefill`/`hidden_states`, and keeps the next position
of every row in `KVCache.next_pos`. Callers never pass positions.

Sharding: parameters carry logical axis names in their `out_sharding` metadata (see
`LOGICAL_AXES`); `g2rpo_jax/sharding.py` maps them to mesh axes. Models create parameters with
`eager_sharding=False` so a model can be built with or without a mesh in context.

This module must not import the trainer, rollout, tasks or any concrete model.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct

Array = jax.Array

# The logical axis names parameters may carry (metadata key `out_sharding`). A model may use
# others; `sharding.py` replicates any name its rules do not mention.
LOGICAL_AXES = (
    "vocab",      # vocabulary rows of embeddings / output head
    "embed",      # the residual stream width (also the ViT width)
    "mlp",        # MLP hidden width
    "heads",      # query heads
    "kv_heads",   # key / value heads (GQA)
    "head_dim",   # per-head width
    "patch",      # flattened patch pixels (patch * patch * channels)
    "layers",     # a stacked-layers axis, for models that scan over layers
)


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


@runtime_checkable
class Tokenizer(Protocol):
  """Text <-> token ids. Implemented by `CharTokenizer` and by `HFTokenizer` (tokenizer.json).

  Specials: `bos_id`, `eos_id`, `pad_id`, `image_id` (the image placeholder the processor
  repeats once per image token) are always present. The reasoning / answer tags
  `<think>`, `</think>`, `<answer>`, `</answer>` are single tokens when the tokenizer has them
  (their ids in `think_id`, ... ; None when a tag is several ordinary tokens).

  encode(text) -> list[int]: no BOS/EOS added (the processor adds what its model needs); the
      literal strings of special tokens in `text` (e.g. "<think>") become their single ids.
  decode(ids, stop_at_eos=True) -> str: stops at the first EOS when `stop_at_eos` (EOS and
      everything after it are dropped), skips PAD, BOS and image placeholders, and renders the
      tag tokens as their text, because the reward parser reads them.
  """

  @property
  def vocab_size(self) -> int: ...
  @property
  def bos_id(self) -> int: ...
  @property
  def eos_id(self) -> int: ...
  @property
  def pad_id(self) -> int: ...
  @property
  def image_id(self) -> int: ...
  @property
  def think_id(self) -> int | None: ...
  @property
  def think_end_id(self) -> int | None: ...
  @property
  def answer_id(self) -> int | None: ...
  @property
  def answer_end_id(self) -> int | None: ...

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int], stop_at_eos: bool = True) -> str: ...


# ------------------------------------------------------------------------------------------------
# Data passed between processor, rollout and trainer
# ------------------------------------------------------------------------------------------------


@struct.dataclass
class PromptBatch:
  """A batch of B prompts, left-padded to a fixed length P.

  tokens: i32[B, P]  token ids; PAD on the left; for models that put the image in the sequence,
      the image placeholder id repeated once per image token where each image goes.
  mask:   bool[B, P] True on real tokens (a suffix of every row: padding is on the left).
  vision: model-specific pytree of arrays with leading dim B (tiny_vlm:
      `{"pixels": u8[B,H,W,3], "has_image": bool[B]}`;
      a real VLM: padded patches, grid sizes, ...). Every leaf has leading dimension B so the
      batch can be sharded and indexed row-wise.
  """
  tokens: Array
  mask: Array
  vision: Any = None

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]

  @property
  def length(self) -> int:
    return self.tokens.shape[1]


@struct.dataclass
class KVCache:
  """A fixed-size key/value cache, one entry per layer; a pytree (all leaves have leading dim B).

  k, v:     tuple over layers of per-layer key / value arrays (compute dtype), each
            [B, S, H_kv, D] or [B, H_kv, S, D] (the model's choice; nothing outside the model
            reads them, only row-wise ops on the leading B). S = cache_size, fixed for the whole
            generation; slot i holds the i-th token of the (left-padded) sequence. tiny_vlm uses
            [B, H_kv, S, D]: decode attention is then a plain batched matmul, with no per-step
            transpose of the cache on XLA:CPU.
  valid:    bool[B, S]  which slots hold a real key (False for left padding and unwritten slots).
  next_pos: i32[B]      the position id the next token of each row gets (model-defined: text
            positions for tiny_vlm, the M-RoPE text position incl. the per-request offset for
            Qwen2.5-VL).
  index:    i32[B]      the slot the next token is written to. All rows decode in lock-step, so
            it is the same for every row; it is stored per row so the cache can be copied /
            sharded / indexed row-wise like every other leaf.
  image:    optional model-defined per-prompt state derived from the image that decoding reads
            (tiny_vlm's "cross" fusion: per layer, the image's cross-attention k, v and a
            bool[B] has-image flag), or None.
  conv:     optional model-defined recurrent state (tiny_vlm's token_conv: the last K-1 input
            embeddings, [B, K-1, E]), or None.
  """
  k: tuple
  v: tuple
  valid: Array
  next_pos: Array
  index: Array
  image: Any = None
  conv: Any = None

  @property
  def size(self) -> int:
    return self.valid.shape[1]


def repeat_rows(tree, n: int):
  """Repeat every leaf's rows n times in place: rows (a, b) -> (a, a, .., b, b, ..); [B,...] ->
  [B*n, ...]. Used to share one prefill across the G samples of a prompt."""
  return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)


# ------------------------------------------------------------------------------------------------
# Processor and model
# ------------------------------------------------------------------------------------------------


IMAGE_MARKER = "<image>"


@runtime_checkable
class Processor(Protocol):
  """Turns raw prompts (+ one optional image per prompt) into a `PromptBatch`.

  __call__(prompts: Sequence[str], images: Sequence[uint8[H, W, 3] | None] | None) -> PromptBatch
      `images[i]` belongs to `prompts[i]`. The image's placeholder tokens go where the prompt
      contains the literal `IMAGE_MARKER` ("<image>"), or at the start if it has none. A prompt
      whose tokens (incl. BOS and image tokens) exceed `max_prompt_len` raises ValueError naming
      the prompt index and both lengths. Arrays are numpy (host); the caller places them.
  """
  tokenizer: Tokenizer
  max_prompt_len: int

  def __call__(self, prompts: Sequence[str],
               images: Sequence[np.ndarray | None] | None = None) -> PromptBatch: ...


class PolicyModel(nnx.Module):
  """Base class of every policy. Subclasses implement the four methods below.

  Shapes: B batch rows, P prompt length, T response length, S cache size, E hidden width,
  V vocabulary (model rows; may exceed the tokenizer's vocab_size).

  A subclass sets `self.config` (its config dataclass, with `.name`, `.vocab_size`, `.dtype`,
  `.param_dtype`).
  """

  config: Any

  def hidden_states(self, prompt: PromptBatch, response_tokens: Array) -> Array:
    """Full-sequence path. response_tokens: i32[B, T] (every response token is treated as a real
    token: causality means tokens after a row's EOS cannot change earlier positions).
    Returns [B, P + T, E] hidden states (compute dtype) AFTER the final norm, so `logits(h)`
    is only the head. Position t's hidden state predicts token t + 1."""
    raise NotImplementedError

  def logits(self, hidden: Array) -> Array:
    """The output head: [..., E] -> f32[..., V]."""
    raise NotImplementedError

  def prefill(self, prompt: PromptBatch, cache_size: int) -> tuple[Array, KVCache]:
    """Run the prompt; return the logits f32[B, V] that predict the first new token, and a cache
    of `cache_size` (>= P) slots holding the prompt's keys/values in slots [0, P)."""
    raise NotImplementedError

  def decode(self, tokens: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """Feed one token per row (i32[B]); return logits f32[B, V] for the next token and the
    updated cache (written at `cache.index`, which then advances by one). Must not recompute
    the prefix: the cost of a step is independent of how many tokens came before."""
    raise NotImplementedError

  def image_features(self, pixels: Array) -> Array:
    """Optional: the vision tower's output for `pixels: u8[B, H, W, 3]`, [B, N, E] (one row per
    image token). Used by `vision_pretraining` to train a from-scratch tower on its own; models
    that do not offer it cannot run that stage."""
    raise NotImplementedError(f"{type(self).__name__} does not expose its vision tower "
                              "(image_features)")


# ------------------------------------------------------------------------------------------------
# Pure-function pattern: (graphdef, params) in, arrays out
# ------------------------------------------------------------------------------------------------


def split_model(model: nnx.Module):
  """model -> (graphdef, params). `params` is an `nnx.State` (a pytree of arrays) holding every
  variable of the model; pass both to jitted pure functions and `merge_model` inside."""
  return nnx.split(model)


def merge_model(graphdef, params) -> PolicyModel:
  return nnx.merge(graphdef, params)


def _token_logprobs(logits: Array, tokens: Array, temperature: float, with_entropy: bool):
  """log softmax(logits / temperature)[tokens] (and the entropy of that distribution) without
  keeping a full-vocab log-softmax around: only logsumexp and one gathered logit are kept."""
  z = logits.astype(jnp.float32) / temperature
  lse = jax.nn.logsumexp(z, axis=-1)
  picked = jnp.take_along_axis(z, tokens[..., None], axis=-1)[..., 0]
  logp = picked - lse
  if not with_entropy:
    return logp, None
  p = jnp.exp(z - lse[..., None])
  ent = lse - jnp.sum(p * z, axis=-1)
  return logp, ent


def sequence_logprobs(graphdef, params, prompt: PromptBatch, response_tokens: Array,
                      response_mask: Array, *, temperature: float = 1.0,
                      return_entropy: bool = False, chunk_size: int | None = None):
  """Log-probs of the response tokens under the policy, teacher-forced in one forward pass.

  The distribution is softmax(logits / temperature) over the WHOLE vocabulary, i.e. before any
  top-k / top-p truncation. `rollout.generate` returns log-probs of exactly this distribution
  (with the same temperature), so old log-probs from the rollout and new ones from the trainer
  agree to float precision when the params are equal.

  Args:
    prompt: the PromptBatch the responses were generated from (B rows; repeat its rows G times
      with `repeat_rows` for B*G responses).
    response_tokens: i32[B, T]; response_mask: bool[B, T] (True on real tokens, EOS included).
    temperature: the sampling temperature (> 0); a Python float or a traced f32 scalar.
    return_entropy: also return the per-token entropy f32[B, T] of that distribution.
    chunk_size: if set (must divide T), the head + softmax run over T in chunks of this many
      positions under `lax.map`, so only f32[B, chunk, V] logits exist at a time.

  Returns:
    logp f32[B, T] (0 where the mask is False), or (logp, entropy) if return_entropy.
  """
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  model = merge_model(graphdef, params)
  b, t = response_tokens.shape
  p = prompt.tokens.shape[1]
  hidden = model.hidden_states(prompt, response_tokens)
  # Hidden state at position i predicts token i + 1: the response's predictors start at P - 1.
  h = jax.lax.dynamic_slice_in_dim(hidden, p - 1, t, axis=1)
  if chunk_size is None or chunk_size >= t:
    logp, ent = _token_logprobs(model.logits(h), response_tokens, temperature, return_entropy)
  else:
    if t % chunk_size:
      raise ValueError(f"chunk_size {chunk_size} must divide the response length {t}")
    n = t // chunk_size
    hc = jnp.moveaxis(h.reshape(b, n, chunk_size, -1), 1, 0)
    tc = jnp.moveaxis(response_tokens.reshape(b, n, chunk_size), 1, 0)

    def one(args):
      hh, tt = args
      lp, en = _token_logprobs(model.logits(hh), tt, temperature, return_entropy)
      return lp, (en if return_entropy else jnp.zeros_like(lp))

    lp, en = jax.lax.map(one, (hc, tc))
    logp = jnp.moveaxis(lp, 0, 1).reshape(b, t)
    ent = jnp.moveaxis(en, 0, 1).reshape(b, t) if return_entropy else None
  mask = response_mask.astype(bool)
  logp = jnp.where(mask, logp, 0.0)
  if return_entropy:
    return logp, jnp.where(mask, ent, 0.0)
  return logp


# ------------------------------------------------------------------------------------------------
# Config helpers and registry
# ------------------------------------------------------------------------------------------------


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name) -> Any:
  """'float32' | 'bfloat16' | 'float16' (or a dtype) -> jnp dtype; anything else is an error."""
  if not isinstance(name, str):
    return jnp.dtype(name)
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def config_from_mapping(cls, config):
  """Build the dataclass `cls` from a dataclass instance, a dict or an ml_collections ConfigDict.

  A key `cls` does not define is an error (never silently ignored)."""
  if isinstance(config, cls):
    return config
  if dataclasses.is_dataclass(config):
    config = dataclasses.asdict(config)
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise TypeError(f"model config must be a {cls.__name__}, dict or ConfigDict, "
                    f"got {type(config)}")
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(config) - fields)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(fields)}")
  return cls(**config)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  build_model: Callable[[Any, nnx.Rngs], PolicyModel]
  build_processor: Callable[[Any], Processor]


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, build_model: Callable, build_processor: Callable) -> None:
  """Register a model family. build_model(config, rngs) -> PolicyModel; build_processor(config)
  -> Processor. Both receive the config as given (dataclass, dict or ConfigDict)."""
  old = _REGISTRY.get(name)
  if old is not None and _origin(old.build_model) != _origin(build_model):
    raise ValueError(f"model {name!r} is already registered by {_origin(old.build_model)}")
  _REGISTRY[name] = ModelEntry(build_model, build_processor)


def _origin(fn) -> str:
  # Re-importing a module re-registers new function objects of the same origin: allowed.
  return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def registered_models() -> list[str]:
  return sorted(_REGISTRY)


def _config_name(config) -> str:
  name = config.get("name") if isinstance(config, Mapping) else getattr(config, "name", None)
  if not name:
    raise ValueError(f"model config has no 'name' (expected one of {registered_models()})")
  return name


def _lookup(config) -> ModelEntry:
  name = _config_name(config)
  if name not in _REGISTRY:
    try:
      importlib.import_module(f"g2rpo_jax.models.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"g2rpo_jax.models.{name}":
        raise
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; registered: {registered_models()}")
  return _REGISTRY[name]


def build_model(config, rngs: nnx.Rngs) -> PolicyModel:
  """The model named by `config.name`, initialised from `rngs`."""
  return _lookup(config).build_model(config, rngs)


def build_processor(config) -> Processor:
  """The processor (tokenizer + image preprocessing) of the model named by `config.name`."""
  return _lookup(config).build_processor(config)
