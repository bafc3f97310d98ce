"""Orbax checkpoints: round trip of arrays + JSON, keep-last-N, layouts, path resolution."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from g2rpo_jax import checkpointing


def _state(scale):
  params = {"w": jnp.full((4, 3), scale, jnp.float32), "b": jnp.arange(3.0) * scale}
  return {"params": params, "opt": optax.adam(1e-3).init(params), "step": jnp.int32(scale),
          "rng": jax.random.key_data(jax.random.key(int(scale)))}


def test_round_trip_keep_last_and_meta(tmp_path):
  ck = checkpointing.Checkpointer(str(tmp_path / "ck"), keep=2)
  for s in (1, 2, 3):
    ck.save(s, _state(float(s)), {"sampler": {"position": 10 * s}, "failures": {"ocr": s}})
  ck.wait()
  assert ck.all_steps() == [2, 3]
  template = checkpointing.abstract_like(_state(0.0))
  state, meta, step = ck.restore(template)
  assert step == 3 and meta == {"sampler": {"position": 30}, "failures": {"ocr": 3}}
  np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 3.0))
  np.testing.assert_array_equal(state["rng"], jax.random.key_data(jax.random.key(3)))
  # The optimizer state comes back with its own structure (namedtuples), not bare dicts.
  assert jax.tree.structure(state["opt"]) == jax.tree.structure(template["opt"])
  state2, _, step2 = ck.restore(template, step=2)
  assert step2 == 2 and float(state2["step"]) == 2
  with pytest.raises(FileNotFoundError, match="step 1 not in"):
    ck.restore(template, step=1)
  ck.close()
  # A new manager on the same directory resumes from the latest.
  assert checkpointing.Checkpointer(str(tmp_path / "ck")).latest_step() == 3


def test_restore_onto_a_sharded_layout(tmp_path):
  mesh = jax.make_mesh((len(jax.devices()),), ("d",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  ck = checkpointing.Checkpointer(str(tmp_path / "ck"), async_save=False)
  x = jnp.arange(16.0)
  ck.save(1, {"x": x}, {})
  out, _, _ = ck.restore({"x": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=sh)})
  assert out["x"].sharding == sh
  np.testing.assert_array_equal(out["x"], x)


def test_empty_directory_has_nothing_to_restore(tmp_path):
  ck = checkpointing.Checkpointer(str(tmp_path / "empty"))
  assert ck.latest_step() is None
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    ck.restore({"x": jax.ShapeDtypeStruct((1,), jnp.float32)})


def test_find_checkpoint_dir(tmp_path):
  (tmp_path / "run" / "checkpoints" / "7").mkdir(parents=True)
  assert checkpointing.find_checkpoint_dir(str(tmp_path / "run")) == (
      str(tmp_path / "run" / "checkpoints"), None)
  assert checkpointing.find_checkpoint_dir(str(tmp_path / "run" / "checkpoints" / "7")) == (
      str(tmp_path / "run" / "checkpoints"), 7)
  with pytest.raises(FileNotFoundError):
    checkpointing.find_checkpoint_dir(str(tmp_path / "missing"))
