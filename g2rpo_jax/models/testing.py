"""Test helpers: models with host-side (numpy) random parameters, so no init program compiles.

`nnx` initialisation runs one XLA program per distinct parameter shape (threefry + the
initializer), which costs seconds each on a small CPU; tests that only need *some* well-scaled
random model build the abstract model with `nnx.eval_shape` (tracing only) and fill it from
numpy. The values differ from `build_model`'s initialisation; the structure, dtypes and sharding
metadata are the same. For tests and benches only; must not be imported by library code.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2rpo_jax.models import interface


def _std(v: nnx.Variable) -> float:
  shape = v.value.shape
  names = v.get_metadata().get("out_sharding") or (None,) * len(shape)
  if names[0] == "vocab":      # embedding rows of norm ~1
    return 1.0 / math.sqrt(shape[-1])
  if names[-1] == "embed" and len(shape) > 2:   # [heads, head_dim, embed] output projections
    return 1.0 / math.sqrt(math.prod(shape[:-1]))
  return 1.0 / math.sqrt(shape[0])


def host_init(config, seed: int = 0):
  """(graphdef, params) of the model `config.name` with numpy-drawn parameters: 1-D params
  (norm scales) are 1, others normal with std 1/sqrt(fan_in)."""
  abstract = nnx.eval_shape(lambda: interface.build_model(config, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(v):
    shape, dtype = v.value.shape, v.value.dtype
    if len(shape) == 1:
      x = np.ones(shape, np.float32)
    else:
      x = rng.normal(0.0, _std(v), shape).astype(np.float32)
    return v.replace(jnp.asarray(x, dtype))

  params = jax.tree.map(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, params


def host_init_model(config, seed: int = 0):
  return nnx.merge(*host_init(config, seed))
