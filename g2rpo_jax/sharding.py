"""Device mesh and sharding rules: logical axis names (on parameters) -> mesh axes.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism whose devices
also split the parameters) and `tensor` (splits heads / MLP / vocab). The batch is split over
(data, fsdp). Parameters carry logical names in their `out_sharding` metadata (set by the
models, see `models/interface.py`); `RULES` map each name to a mesh axis. A dimension whose size
is not divisible by its mesh axis, or whose mesh axis an earlier dimension of the same array
already uses, is replicated instead, so every model shards on every mesh without special cases.

Must not import the models, rollout or trainer (it only reads variable metadata).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or None: replicated). Names not listed are replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("patch", None),
    ("layers", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all hosts).

  One of the sizes may be -1: it takes the devices the others leave. The product must equal
  the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} "
                     f"tensor={tensor}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if n % rest:
      raise ValueError(f"{n} devices cannot be split into data={data} fsdp={fsdp} "
                       f"tensor={tensor}")
    sizes[sizes.index(-1)] = n // rest
  if math.prod(sizes) != n:
    raise ValueError(f"mesh data*fsdp*tensor = {sizes} = {math.prod(sizes)} devices, but there "
                     f"are {n}")
  # jax.make_mesh orders devices for the physical topology (and across hosts). Auto axes: the
  # compiler propagates shardings from the annotated inputs, so model code needs no per-op
  # sharding (Explicit axes would make every gather / einsum state its output sharding).
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def _rule_map(rules) -> dict[str, Any]:
  return dict(rules)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules=RULES) -> P:
  """Logical names of one array -> a PartitionSpec valid for `shape` on `mesh`."""
  if not names:
    return P()
  if len(names) != len(shape):
    raise ValueError(f"sharding names {tuple(names)} do not match the array's rank "
                     f"(shape {tuple(shape)})")
  table = _rule_map(rules)
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape):
    axes = table.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    axes_t = tuple(a for a in axes_t if a not in used and mesh.shape.get(a, 1) > 1)
    size = math.prod(mesh.shape[a] for a in axes_t) if axes_t else 1
    if not axes_t or dim % size:
      out.append(None)
      continue
    used.update(axes_t)
    out.append(axes_t[0] if len(axes_t) == 1 else axes_t)
  return P(*out)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_specs(state, mesh: Mesh, rules=RULES):
  """PartitionSpecs for an nnx State (same tree structure, Variables holding specs)."""
  def one(v):
    names = v.get_metadata().get("out_sharding")
    return v.replace(logical_to_spec(names, v.value.shape, mesh, rules))
  return jax.tree.map(one, state, is_leaf=_is_var)


def state_shardings(state, mesh: Mesh, rules=RULES):
  """NamedShardings for an nnx State (same structure), for jit in/out_shardings."""
  specs = state_specs(state, mesh, rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def shard_state(state, mesh: Mesh, rules=RULES):
  """Place an nnx State (e.g. the params of `split_model`) on `mesh` following the rules."""
  return jax.device_put(state, state_shardings(state, mesh, rules))


def batch_spec(ndim: int) -> P:
  """Split the leading (batch) dim over (data, fsdp); replicate the rest."""
  return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(ndim))


def shard_batch(tree, mesh: Mesh):
  """Place every leaf of `tree` (host or device arrays, leading dim = batch) split over
  (data, fsdp). Multi-host: each host passes its own slice of the global batch."""
  n = mesh.shape["data"] * mesh.shape["fsdp"]

  def one(path, x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    sharding = batch_sharding(mesh, x.ndim)
    if jax.process_count() > 1:
      return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    if x.ndim == 0 or x.shape[0] % n:
      raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} has leading dim "
                       f"{x.shape[:1]}, not divisible by data*fsdp={n}")
    return jax.device_put(x, sharding)

  return jax.tree_util.tree_map_with_path(one, tree)
