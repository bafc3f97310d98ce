"""Loading a Hugging Face Qwen2.5-VL checkpoint directory into the nnx port.

  model = load_qwen25vl("/path/to/Qwen2.5-VL-3B-Instruct", param_dtype="bfloat16")

reads config.json (unsupported fields are errors, see `qwen25vl.config_from_hf`), builds the
model abstractly (`nnx.eval_shape`: no random init, no memory), then fills every parameter from
the safetensors tensor by tensor (`hf_loading`): a missing tensor, a tensor of the wrong shape
or a checkpoint tensor this port has no place for is an error naming it. With `sharding_for`
(parameter path -> jax Sharding, e.g. from the logical-axis rules) each device receives only its
slice. Both checkpoint naming schemes are accepted: the hub's (`model.layers.*`, `visual.*`) and
transformers 5's (`model.language_model.layers.*`, `model.visual.*`).

Must not import torch or transformers.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
from flax import nnx

from g2rpo_jax.models import hf_loading
from g2rpo_jax.models.qwen25vl import Qwen25VL, Qwen25VLConfig, config_from_hf

_T = lambda a: a.T                       # torch Linear weight [out, in] -> kernel [in, out]
_SAME = lambda a: a
_PATCH = lambda a: a.reshape(a.shape[0], -1).T   # Conv3d [D, C, T, p, p] -> kernel [C·T·p·p, D]


def _text(suffix: str) -> list[str]:
  return [f"model.language_model.{suffix}", f"model.{suffix}"]


def _vision(suffix: str) -> list[str]:
  return [f"model.visual.{suffix}", f"visual.{suffix}"]


def _linear(names: Callable[[str], list[str]], prefix: str, leaf: str):
  if leaf == "kernel":
    return names(f"{prefix}.weight"), _T
  return names(f"{prefix}.bias"), _SAME


_TEXT_LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                 "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                 "down": "mlp.down_proj"}
_VISION_LINEARS = {"qkv": "attn.qkv", "proj": "attn.proj", "gate": "mlp.gate_proj",
                   "up": "mlp.up_proj", "down": "mlp.down_proj"}


def checkpoint_names(path: tuple) -> tuple[list[str], Callable]:
  """Candidate checkpoint names and the layout transform of one parameter path of `Qwen25VL`."""
  p = tuple(str(x) for x in path)
  if p == ("embed",):
    return _text("embed_tokens.weight"), _SAME
  if p == ("lm_head",):
    return ["lm_head.weight"], _T
  if p == ("final_norm", "scale"):
    return _text("norm.weight"), _SAME
  if p[0] == "layers":
    i, rest = p[1], p[2:]
    if rest == ("input_norm", "scale"):
      return _text(f"layers.{i}.input_layernorm.weight"), _SAME
    if rest == ("post_attn_norm", "scale"):
      return _text(f"layers.{i}.post_attention_layernorm.weight"), _SAME
    if rest[0] in ("attn", "mlp") and rest[1] in _TEXT_LINEARS:
      return _linear(_text, f"layers.{i}.{_TEXT_LINEARS[rest[1]]}", rest[2])
  if p[0] == "vision":
    rest = p[1:]
    if rest == ("patch_embed", "kernel"):
      return _vision("patch_embed.proj.weight"), _PATCH
    if rest == ("merger_norm", "scale"):
      return _vision("merger.ln_q.weight"), _SAME
    if rest[0] in ("merger_fc1", "merger_fc2"):
      return _linear(_vision, f"merger.mlp.{0 if rest[0] == 'merger_fc1' else 2}", rest[1])
    if rest[0] == "blocks":
      i, leaf = rest[1], rest[2:]
      if leaf[0] in ("norm1", "norm2"):
        return _vision(f"blocks.{i}.{leaf[0]}.weight"), _SAME
      key = leaf[1] if leaf[0] == "mlp" else leaf[0]
      if key in _VISION_LINEARS:
        return _linear(_vision, f"blocks.{i}.{_VISION_LINEARS[key]}", leaf[-1])
  raise KeyError(f"no checkpoint name known for parameter {'/'.join(p)}")


def abstract_model(config: Qwen25VLConfig) -> Qwen25VL:
  """The model with ShapeDtypeStruct parameters (nothing allocated)."""
  return nnx.eval_shape(lambda: Qwen25VL(config, nnx.Rngs(0)))


def load_qwen25vl(checkpoint_dir: str, *, mesh=None,
                  sharding_for: Callable[[tuple, Any], Any] | None = None,
                  **overrides) -> Qwen25VL:
  """The model of a HF checkpoint dir with its weights. overrides: param_dtype, dtype, remat.

  mesh: place every parameter by its logical axes with `g2rpo_jax.sharding`'s rules. Or
  sharding_for(path, variable) -> Sharding | None (path: tuple of keys; variable: the abstract
  nnx Variable, whose `out_sharding` metadata holds the logical axes).
  """
  if mesh is not None and sharding_for is None:
    from g2rpo_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top

    def sharding_for(path, var):
      spec = sharding_lib.logical_to_spec(var.get_metadata().get("out_sharding"), var.shape, mesh)
      return jax.sharding.NamedSharding(mesh, spec)

  config = config_from_hf(hf_loading.read_json(checkpoint_dir, "config.json"), **overrides)
  preproc = os.path.join(checkpoint_dir, "preprocessor_config.json")
  if os.path.isfile(preproc):
    pp = hf_loading.read_json(checkpoint_dir, "preprocessor_config.json")
    if "image_mean" in pp or "image_std" in pp:
      config = dataclasses.replace(config,
                                   image_mean=tuple(pp.get("image_mean", config.image_mean)),
                                   image_std=tuple(pp.get("image_std", config.image_std)))
  ckpt = hf_loading.SafetensorsCheckpoint(checkpoint_dir)
  model = abstract_model(config)
  graphdef, state = nnx.split(model)
  flat = list(nnx.to_flat_state(state))
  targets, variables, used = {}, {}, set()
  for path, var in flat:
    names, transform = checkpoint_names(path)
    targets[path] = (names, transform, var.shape, var.dtype)
    variables[path] = var
    used.update(names)
  if config.tie_word_embeddings:
    used.add("lm_head.weight")  # tied checkpoints may still store the (identical) head
  unexpected = sorted(k for k in ckpt.keys() if k not in used)
  if unexpected:
    raise hf_loading.CheckpointError(
        f"checkpoint {checkpoint_dir!r} has tensors this port does not use (another "
        f"architecture or an unsupported feature?): {unexpected[:8]}"
        + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
  sharding = (lambda path: sharding_for(path, variables[path])) if sharding_for else None
  values = hf_loading.load_tensors(ckpt, targets, sharding)
  for path, var in flat:
    var.set_value(values[path])
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
