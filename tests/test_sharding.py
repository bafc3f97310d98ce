"""Tests for g2rpo_jax/sharding.py: mesh construction and logical-name rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from g2rpo_jax import models as M
from g2rpo_jax import sharding
from g2rpo_jax.models import testing


def test_make_mesh_sizes():
  assert len(jax.devices()) == 8
  assert dict(sharding.make_mesh(data=2, fsdp=4).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert dict(sharding.make_mesh(fsdp=2, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh(data=1, fsdp=-1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match=r"mesh data\*fsdp\*tensor = \[2, 2, 1\] = 4 devices, but "
                                       r"there are 8"):
    sharding.make_mesh(data=2, fsdp=2)
  with pytest.raises(ValueError, match="8 devices cannot be split into data=-1 fsdp=3"):
    sharding.make_mesh(fsdp=3)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sharding.make_mesh(data=-1, fsdp=-1)


def test_logical_to_spec_rules_divisibility_and_reuse():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  assert sharding.logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh) == P(
      "fsdp", "tensor", None)
  # kv_heads = 1 is not divisible by tensor = 2: replicated, not an error.
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh) == P(
      "fsdp", None, None)
  # The same mesh axis cannot split two dims of one array: the second is replicated.
  assert sharding.logical_to_spec(("embed", "embed"), (64, 64), mesh) == P("fsdp", None)
  # Unknown names and None are replicated; no names means fully replicated.
  assert sharding.logical_to_spec(("nope", None), (4, 4), mesh) == P(None, None)
  assert sharding.logical_to_spec(None, (4,), mesh) == P()
  # Batch goes over both data axes.
  assert sharding.logical_to_spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
  with pytest.raises(ValueError, match="do not match the array's rank"):
    sharding.logical_to_spec(("embed",), (4, 4), mesh)
  # Size-1 mesh axes are dropped: nothing to split.
  mesh_1 = sharding.make_mesh(data=8)
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh_1) == P(None, None)


def test_shard_state_places_model_params_by_their_names():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  _, params = testing.host_init(M.tiny_vlm_config("nano"))
  placed = sharding.shard_state(params, mesh)
  wq = placed["layers"][0]["attn"]["wq"].value
  assert wq.sharding.spec == P("fsdp", "tensor", None)
  assert placed["embed"].value.sharding.spec == P("tensor", "fsdp")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(placed)):
    np.testing.assert_array_equal(a, b)


def test_shard_batch():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  batch = {"tokens": np.arange(16 * 3).reshape(16, 3), "mask": np.ones(16, bool)}
  placed = sharding.shard_batch(batch, mesh)
  assert placed["tokens"].sharding.spec == P(("data", "fsdp"), None)
  assert len(placed["tokens"].sharding.device_set) == 8
  np.testing.assert_array_equal(placed["tokens"], batch["tokens"])
  with pytest.raises(ValueError, match=r"batch leaf \['x'\] has leading dim \(6,\), not divisible "
                                       r"by data\*fsdp=8"):
    sharding.shard_batch({"x": jnp.zeros((6, 2))}, mesh)
