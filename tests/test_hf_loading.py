"""Hugging Face checkpoint reading: safetensors parsing, and the errors a user sees for a broken
checkpoint directory (missing file / tensor, wrong shape, unsupported config)."""
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from g2rpo_jax.models import hf_loading
from g2rpo_jax.models.qwen25vl import config_from_hf
from g2rpo_jax.models.qwen25vl_loading import load_qwen25vl

pytest.importorskip("transformers")
from g2rpo_jax.models import qwen25vl_testing as qt  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("hf_tiny"))
  qt.write_tiny_checkpoint(d, seed=3)
  return d


def _copy(src, tmp_path):
  dst = str(tmp_path / "ckpt")
  shutil.copytree(src, dst)
  return dst


def test_reads_tensors_like_the_safetensors_library(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32),
             "b": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
             "c": np.arange(6, dtype=np.int64).reshape(2, 3)}
  save_file(tensors, str(tmp_path / "model.safetensors"))
  ckpt = hf_loading.SafetensorsCheckpoint(str(tmp_path))
  assert ckpt.keys() == ["a", "b", "c"]
  for k, v in load_file(str(tmp_path / "model.safetensors")).items():
    got = ckpt.get(k)
    assert got.dtype == v.dtype and got.shape == v.shape
    np.testing.assert_array_equal(got.astype(np.float64), v.astype(np.float64))


def test_sharded_index_is_followed(tmp_path):
  save_file({"x": np.ones((2,), np.float32)}, str(tmp_path / "part-1.safetensors"))
  save_file({"y": np.zeros((3,), np.float32)}, str(tmp_path / "part-2.safetensors"))
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    json.dump({"weight_map": {"x": "part-1.safetensors", "y": "part-2.safetensors"}}, f)
  ckpt = hf_loading.SafetensorsCheckpoint(str(tmp_path))
  np.testing.assert_array_equal(ckpt.get("y"), np.zeros(3))
  os.remove(tmp_path / "part-2.safetensors")
  with pytest.raises(hf_loading.CheckpointError, match="missing weights file 'part-2.safetensors'"):
    hf_loading.SafetensorsCheckpoint(str(tmp_path))


def test_missing_files_are_named(tiny_dir, tmp_path):
  with pytest.raises(hf_loading.CheckpointError, match="does not exist"):
    load_qwen25vl(str(tmp_path / "nope"))
  d = _copy(tiny_dir, tmp_path)
  os.remove(os.path.join(d, "model.safetensors"))
  with pytest.raises(hf_loading.CheckpointError, match="missing file 'model.safetensors'"):
    load_qwen25vl(d)
  os.remove(os.path.join(d, "config.json"))
  with pytest.raises(hf_loading.CheckpointError, match="missing file 'config.json'"):
    load_qwen25vl(d)


def _rewrite(d, edit):
  path = os.path.join(d, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)


def test_missing_tensor_is_named(tiny_dir, tmp_path):
  d = _copy(tiny_dir, tmp_path)
  _rewrite(d, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
  with pytest.raises(hf_loading.CheckpointError,
                     match=r"missing tensor .*'model.layers.1.self_attn.k_proj.bias'"):
    load_qwen25vl(d)


def test_misshaped_tensor_is_named(tiny_dir, tmp_path):
  d = _copy(tiny_dir, tmp_path)
  _rewrite(d, lambda t: t.update({"visual.blocks.0.attn.qkv.weight": np.zeros((96, 31), np.float32)}))
  with pytest.raises(hf_loading.CheckpointError,
                     match=r"'visual.blocks.0.attn.qkv.weight' has shape \[96, 31\].*expected \[32, 96\]"):
    load_qwen25vl(d)


def test_unexpected_tensor_is_an_error(tiny_dir, tmp_path):
  d = _copy(tiny_dir, tmp_path)
  _rewrite(d, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones((16,), np.float32)}))
  with pytest.raises(hf_loading.CheckpointError, match="does not use.*q_norm"):
    load_qwen25vl(d)


def test_loaded_weights_are_the_checkpoint_tensors(tiny_dir):
  model = load_qwen25vl(tiny_dir)
  ckpt = hf_loading.SafetensorsCheckpoint(tiny_dir)
  np.testing.assert_array_equal(np.asarray(model.layers[1].attn.k.kernel[...]),
                                ckpt.get("model.layers.1.self_attn.k_proj.weight").T)
  np.testing.assert_array_equal(np.asarray(model.vision.merger_fc2.bias[...]),
                                ckpt.get("visual.merger.mlp.2.bias"))
  conv = ckpt.get("visual.patch_embed.proj.weight")  # [D, C, T, p, p]
  np.testing.assert_array_equal(np.asarray(model.vision.patch_embed.kernel[...])[:, 5],
                                conv[5].reshape(-1))


def _config(tiny_dir):
  with open(os.path.join(tiny_dir, "config.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="qwen3_vl"), "model_type='qwen3_vl'"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), "hidden_act='gelu'"),
    (lambda c: c["vision_config"].update(hidden_act="quick_gelu"), "vision_config.hidden_act"),
    (lambda c: c["text_config"].update(use_sliding_window=True), "use_sliding_window"),
    (lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn"), "rope type 'yarn'"),
    (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[2, 2, 2]),
     r"mrope_section \(2, 2, 2\) must be 3 numbers summing to head_dim/2 = 8"),
    (lambda c: c.update(some_new_feature=True), r"fields this port does not know: \['some_new_feature'\]"),
])
def test_unsupported_config_is_named(tiny_dir, edit, message):
  cfg = _config(tiny_dir)
  edit(cfg)
  with pytest.raises(ValueError, match=message):
    config_from_hf(cfg)


def test_hub_flat_config_layout_is_read(tiny_dir):
  # The hub's Qwen2.5-VL config.json keeps the text fields at the top level with a legacy
  # rope_scaling {"type": "mrope", ...} and rope_theta.
  nested = _config(tiny_dir)
  flat = {k: v for k, v in nested.items() if k != "text_config"}
  text = dict(nested["text_config"])
  rope = text.pop("rope_parameters")
  flat.update({k: v for k, v in text.items() if k != "model_type"})
  flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
  flat["rope_theta"] = rope["rope_theta"]
  assert config_from_hf(flat) == config_from_hf(nested)


def test_tensors_are_views_of_the_file_and_sharded_placement_cuts_slices(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  w = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
  save_file({"w": w}, str(tmp_path / "model.safetensors"))
  view = hf_loading.SafetensorsCheckpoint(str(tmp_path)).get("w")
  assert not view.flags.owndata and not view.flags.writeable  # a window on the memory map
  mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
  placed = hf_loading.place(view, np.float32, sharding)
  assert placed.sharding == sharding
  for shard in placed.addressable_shards:
    assert shard.data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(shard.data), w[shard.index])
