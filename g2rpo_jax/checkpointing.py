"""Orbax checkpoints of a training run: array state + a JSON record, keep-last-N, auto-resume.

One checkpoint = two items under `<workdir>/checkpoints/<step>/`:
  `state`: the array pytree (params, optimizer state, step, RNG key data, any adaptive state),
           restored with the shardings of an abstract target so a resumed run is laid out
           exactly like a fresh one (any mesh, any number of hosts);
  `meta`:  a JSON dict of host-side state (data iterator position, metric step, counters).
A checkpoint is visible only once orbax has committed it (written to a temporary directory and
renamed), so a run killed mid-save resumes from the previous one.

Must not import the trainer, models or tasks: it stores pytrees and dicts, nothing more.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores `(state pytree, meta dict)` pairs by step under one directory."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, *, force: bool = True) -> bool:
    """Starts saving (async unless disabled); returns whether a save was started."""
    return self._manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(meta)),
        force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores (state, meta, step) at `step` (default: latest) onto `abstract_state`'s layout.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings (e.g. from
    `jax.eval_shape` + the trainer's shardings); the restored arrays take those shardings.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"checkpoint step {step} not in {self.directory}; "
                              f"available: {self.all_steps()}")
    out = self._manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"]), step

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) mirroring a pytree of jax arrays."""
  def one(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(one, tree)


def find_checkpoint_dir(path: str) -> tuple[str, int | None]:
  """Accepts a checkpoints dir, a workdir (with `checkpoints/`) or `.../checkpoints/<step>`.

  Returns (checkpoints directory, step or None for latest).
  """
  path = os.path.abspath(path)
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and os.path.isdir(path):
    return os.path.dirname(path), int(base)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  if os.path.isdir(path):
    return path, None
  raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
