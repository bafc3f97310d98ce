"""Reading Hugging Face checkpoint directories: config.json, safetensors (single or sharded).

`SafetensorsCheckpoint(dir)` indexes `model.safetensors` or the files listed in
`model.safetensors.index.json` by parsing each file's header, and `get(name)` returns one tensor
as a read-only numpy view of a memory map (bf16 via ml_dtypes): nothing is read until a tensor
is asked for, and reading it costs only the pages touched. `place(array, dtype, sharding)` puts
one tensor on the devices; with a sharding, each device's slice is cut from the memory map
(`jax.make_array_from_callback`), so a full host copy of a sharded tensor never exists and a
model loads tensor by tensor without two full copies in host memory.

The safetensors format (a little-endian u64 header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the raw data) is read here directly.

Must not import torch, transformers or any model (the model-specific name mapping lives with
each port, e.g. `qwen25vl_loading.py`).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
  """A checkpoint file or tensor is missing or wrong; the message names it."""


def read_json(directory: str, name: str) -> dict:
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint {directory!r}: missing file {name!r}")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"checkpoint file {path!r} is not valid JSON: {e}") from e


def read_header(path: str) -> tuple[dict, int]:
  """(tensor entries, byte offset of the data section) of one .safetensors file."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise CheckpointError(f"{path!r} is too short to be a safetensors file")
    (n,) = struct.unpack("<Q", raw)
    header = f.read(n)
  if len(header) != n:
    raise CheckpointError(f"{path!r}: truncated safetensors header")
  entries = json.loads(header)
  entries.pop("__metadata__", None)
  return entries, 8 + n


class SafetensorsCheckpoint:
  """Lazy access to the tensors of a HF checkpoint directory (one or several safetensors files)."""

  def __init__(self, directory: str):
    if not os.path.isdir(directory):
      raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
    self.directory = directory
    if os.path.isfile(os.path.join(directory, INDEX_FILE)):
      weight_map = read_json(directory, INDEX_FILE).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{INDEX_FILE} in {directory!r} has no 'weight_map'")
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
      weight_map, files = None, [SINGLE_FILE]
    else:
      raise CheckpointError(f"checkpoint {directory!r}: missing file {SINGLE_FILE!r} "
                            f"(or {INDEX_FILE!r} for a sharded checkpoint)")
    self._entries: dict[str, tuple[str, dict, int]] = {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {directory!r}: missing weights file {name!r} "
                              f"(listed in {INDEX_FILE})")
      entries, data_start = read_header(path)
      for key, entry in entries.items():
        self._entries[key] = (path, entry, data_start)
    if weight_map is not None:
      missing = sorted(k for k in weight_map if k not in self._entries)
      if missing:
        raise CheckpointError(f"{INDEX_FILE} lists tensors not found in their files: {missing[:5]}")
    self._maps: dict[str, np.memmap] = {}

  def keys(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entry(name)[1]["shape"])

  def _entry(self, name: str):
    if name not in self._entries:
      raise CheckpointError(f"checkpoint {self.directory!r}: missing tensor {name!r}")
    return self._entries[name]

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only numpy view into the file (no copy)."""
    path, entry, data_start = self._entry(name)
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
      raise CheckpointError(f"tensor {name!r}: unsupported safetensors dtype {entry['dtype']!r}")
    if path not in self._maps:
      self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
    begin, end = entry["data_offsets"]
    raw = self._maps[path][data_start + begin:data_start + end]
    return raw.view(dtype).reshape(entry["shape"])


def place(array: np.ndarray, dtype, sharding: jax.sharding.Sharding | None = None) -> jax.Array:
  """One host tensor -> a device array of `dtype`, sharded if `sharding` is given (each device
  converts and receives only its own slice)."""
  dtype = jnp.dtype(dtype)
  if sharding is None:
    return jnp.asarray(np.asarray(array).astype(dtype))
  return jax.make_array_from_callback(
      array.shape, sharding, lambda idx: np.ascontiguousarray(array[idx]).astype(dtype))


def load_tensors(ckpt: SafetensorsCheckpoint, targets: dict[Any, tuple[list[str], Callable, tuple, Any]],
                 sharding_for: Callable[[Any], jax.sharding.Sharding | None] | None = None) -> dict:
  """Loads every target tensor one at a time.

  targets: key -> (candidate checkpoint names, transform(np array) -> np array, expected shape,
  dtype). The first candidate present in the checkpoint is used; its transformed shape must be
  the expected one. Returns key -> device array.
  """
  out = {}
  for key, (names, transform, shape, dtype) in targets.items():
    name = next((n for n in names if n in ckpt), None)
    if name is None:
      raise CheckpointError(f"checkpoint {ckpt.directory!r}: missing tensor "
                            f"{' or '.join(repr(n) for n in names)}")
    value = transform(ckpt.get(name))
    if tuple(value.shape) != tuple(shape):
      raise CheckpointError(f"tensor {name!r} has shape {list(ckpt.shape(name))} "
                            f"(-> {list(value.shape)} after layout change); expected "
                            f"{list(shape)} for this config")
    out[key] = place(value, dtype, sharding_for(key) if sharding_for else None)
  return out
