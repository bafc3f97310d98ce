"""Vision-tower pretraining: teach a from-scratch image encoder to see before the warm start.

A tower trained from scratch only through the decoder learns slowly to read: its gradient first
has to pass through cross-attention that does not yet know where to look. This stage gives the
tower a direct signal. From the tower's mean-pooled patch features a linear head predicts, for
every vocabulary entry, whether the task's demonstration for that image contains the token
(a multi-label "bag of tokens", one sigmoid cross-entropy per entry). The demonstration names
what the image shows (the digits, the code's characters, the count, the colours and shapes), so
no task-specific head or label is needed, and any task with demonstrations takes part.

The head is thrown away afterwards; only the tower's parameters (`params["vision"]`) change.
The trainer runs this before the warm start when `config.vision_pretrain.enabled`
(`Trainer.pretrain_vision`).

Pure functions of arrays; the model enters through its graphdef and `image_features`.
"""
from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from g2rpo_jax.models import interface as model_api

Array = jax.Array


def token_bag(token_ids: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray:
  """f32[B, V]: 1 where row b's token list contains vocabulary entry v, else 0."""
  bag = np.zeros((len(token_ids), vocab_size), np.float32)
  for row, ids in enumerate(token_ids):
    ids = np.asarray(list(ids), np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
      raise ValueError(f"token_bag: row {row} has token ids outside [0, {vocab_size}): "
                       f"{ids[(ids < 0) | (ids >= vocab_size)].tolist()}")
    bag[row, ids] = 1.0
  return bag


def init_head(key: Array, width: int, vocab_size: int) -> dict:
  """The linear bag head: {"w": f32[E, V], "b": f32[V]} (fan-in scaled, zero bias)."""
  w = jax.random.normal(key, (width, vocab_size), jnp.float32) / np.sqrt(width)
  return {"w": w, "b": jnp.zeros((vocab_size,), jnp.float32)}


def bag_logits(vision_params, head: dict, pixels: Array, *, graphdef, params) -> Array:
  """f32[B, V]: the head on the mean-pooled image features of `pixels: u8[B, H, W, 3]`.

  `params` are the full model's parameters; `vision_params` replaces their "vision" subtree
  (so gradients can be taken with respect to the tower alone).
  """
  model = model_api.merge_model(graphdef, dict(params, vision=vision_params))
  feats = model.image_features(pixels)                      # [B, N, E]
  pooled = jnp.mean(feats.astype(jnp.float32), axis=1)      # [B, E]
  return pooled @ head["w"] + head["b"]


def bag_loss(trainable: dict, pixels: Array, targets: Array, *, graphdef, params) -> Array:
  """Sum over the vocabulary of sigmoid cross-entropies, mean over images."""
  chex.assert_rank(targets, 2)
  logits = bag_logits(trainable["vision"], trainable["head"], pixels, graphdef=graphdef,
                      params=params)
  chex.assert_equal_shape([logits, targets])
  return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1))


def pretrain_step(trainable: dict, opt_state, pixels: Array, targets: Array, *, params, graphdef,
                  tx) -> tuple[dict, object, Array]:
  """One optimizer step on `bag_loss` of {"vision": tower params, "head": head params}."""
  loss, grads = jax.value_and_grad(bag_loss)(trainable, pixels, targets, graphdef=graphdef,
                                             params=params)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, loss


def bag_f1(logits: Array, targets: Array) -> Array:
  """Micro-averaged F1 of the thresholded (logit > 0) bag against `targets` (a held-out check).

  Vocabulary entries present in every row (the format tags every demonstration has) are left
  out: predicting them is trivial and would lift the score of a tower that sees nothing.
  """
  chex.assert_equal_shape([logits, targets])
  keep = jnp.any(targets < 0.5, axis=0, keepdims=True).astype(jnp.float32)
  pred = (logits > 0).astype(jnp.float32) * keep
  tp = jnp.sum(pred * targets)
  return 2 * tp / jnp.maximum(jnp.sum(pred) + jnp.sum(targets * keep), 1.0)
