"""Qwen2.5-VL port vs the PyTorch reference (transformers), on tiny random checkpoints.

The checkpoints are written offline by `qwen25vl_testing.write_tiny_checkpoint` (2 text layers,
a 2-block vision tower with one window-attention and one full-attention block, window = 2×2
merged patches so the test images span several windows). Golden values are the reference's
outputs; tolerances are the issue's (logits within 1e-4 in f32, greedy tokens identical).
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from g2rpo_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
from g2rpo_jax.models import interface
from g2rpo_jax.models import qwen25vl
from g2rpo_jax.models import qwen25vl_testing as qt
from g2rpo_jax.models.qwen25vl_loading import load_qwen25vl
from g2rpo_jax.models.qwen25vl_processing import (Qwen25VLProcessor, chat_text, mrope_positions,
                                                  smart_resize)

MIN_PIXELS, MAX_PIXELS = 28 * 28 * 2, 28 * 28 * 16
TOL = 1e-4


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("qwen25vl_tiny"))
  ref = qt.write_tiny_checkpoint(d, seed=0)
  return d, ref


@pytest.fixture(scope="session")
def sharded_tied_ckpt(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("qwen25vl_tiny_sharded"))
  ref = qt.write_tiny_checkpoint(d, tie=True, max_shard_size="60KB", seed=1)
  return d, ref


@pytest.fixture(scope="session")
def images():
  rng = np.random.default_rng(0)
  # 100x84 -> 112x84: 8x6 patches = 4x3 merge units, windows of 2x2 units hold 16, 8, 16, 8
  # patches, so in window order the third window straddles the 16-patch attention blocks.
  # 60x130 -> 56x140: 4x10 patches, windows of 16, 16, 8 patches.
  return qt.random_image(rng, 100, 84), qt.random_image(rng, 60, 130)


def _processor(d, max_prompt_len=96, max_images=2):
  return Qwen25VLProcessor(os.path.join(d, "tokenizer.json"), max_prompt_len=max_prompt_len,
                           max_images=max_images, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                           window_size=56)


def _device(batch):
  return interface.PromptBatch(tokens=jnp.asarray(batch.tokens), mask=jnp.asarray(batch.mask),
                               vision=jax.tree.map(jnp.asarray, batch.vision))


def _reference_inputs(batch, r, image_id):
  cfg = qwen25vl.Qwen25VLConfig()
  return qt.reference_inputs(batch, r, image_id, cfg.image_mean, cfg.image_std)


def qt_mean():
  return qwen25vl.Qwen25VLConfig().image_mean


def qt_std():
  return qwen25vl.Qwen25VLConfig().image_std


PROMPTS = ["Read the text.", "Describe the image.", "<image> and <image>: how many circles?"]


def _prompt_images(images):
  return [None, images[0], [images[0], images[1]]]


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, params, prompt, response):
  """Logits f32[B, P + T, V] of the full-sequence path (one compile per model/shape)."""
  model = interface.merge_model(graphdef, params)
  return model.logits(model.hidden_states(prompt, response))


def _max_logit_diff(model, ref, batch, image_id):
  graphdef, params = interface.split_model(model)
  ours = np.asarray(_full_logits(graphdef, params, _device(batch),
                                 jnp.zeros((batch.tokens.shape[0], 0), jnp.int32)))
  diffs = []
  for r in range(batch.tokens.shape[0]):
    with torch.no_grad():
      theirs = ref(**_reference_inputs(batch, r, image_id)).logits[0].numpy()
    diffs.append(float(np.abs(ours[r][batch.mask[r]] - theirs).max()))
  return diffs


def test_logits_match_reference_text_one_image_two_images(ckpt, images):
  d, ref = ckpt
  model = load_qwen25vl(d)
  proc = _processor(d)
  batch = proc(PROMPTS, _prompt_images(images))
  # The two-image prompt really holds two different grids (8x4 and 4x10 patches).
  assert batch.vision["patch_valid"][2].sum(-1).tolist() == [48, 40]
  diffs = _max_logit_diff(model, ref, batch, proc.tokenizer.image_id)
  assert max(diffs) < TOL, diffs


def test_sharded_tied_checkpoint_on_a_mesh_matches_reference(sharded_tied_ckpt, images):
  d, ref = sharded_tied_ckpt
  assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) > 1
  # Auto axes, as the trainer's mesh: shardings are propagated by the compiler (explicit axes
  # would need per-op output shardings for the embedding gather).
  mesh = jax.make_mesh((2, 2, 2), sharding_lib.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  model = load_qwen25vl(d, mesh=mesh)
  assert model.lm_head is None
  q_kernel = model.layers[0].attn.q.kernel[...]
  assert q_kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  proc = _processor(d)
  batch = proc(PROMPTS, _prompt_images(images))
  diffs = _max_logit_diff(model, ref, batch, proc.tokenizer.image_id)
  assert max(diffs) < TOL, diffs


def test_greedy_16_tokens_match_reference_generate(ckpt, images):
  """Through the project's rollout engine (jitted prefill + while-loop decode, EOS = <|im_end|>)
  against transformers' generate with the same EOS; rows are compared over all 16 slots (pad
  after EOS on both sides)."""
  from g2rpo_jax import rollout  # pylint: disable=g-import-not-at-top
  d, ref = ckpt
  model = load_qwen25vl(d)
  proc = _processor(d)
  tok = proc.tokenizer
  batch = proc(PROMPTS, _prompt_images(images))
  sampling = rollout.SamplingConfig(max_new_tokens=16, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                    greedy=True)
  graphdef, params = interface.split_model(model)
  out = rollout.generate(graphdef, params, _device(batch), jax.random.key(0), num_samples=1,
                         sampling=sampling)
  ours = np.asarray(out.tokens)
  assert (ours != tok.pad_id).sum(axis=1).min() >= 8  # real generations, not all-EOS rows
  for r in range(len(PROMPTS)):
    inputs = _reference_inputs(batch, r, tok.image_id)
    with torch.no_grad():
      gen = ref.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_id,
                         pad_token_id=tok.pad_id)
    theirs = gen[0, inputs["input_ids"].shape[1]:].numpy()
    theirs = np.pad(theirs, (0, 16 - len(theirs)), constant_values=tok.pad_id)
    np.testing.assert_array_equal(ours[r], theirs, err_msg=f"row {r}")
  # The KV-cache path (left padding, per-row rope deltas) and the full-sequence path give the
  # same log-probs: the trainer's new log-probs equal the rollout's old ones at equal params.
  full = jax.jit(interface.sequence_logprobs, static_argnums=0)(
      graphdef, params, _device(batch), out.tokens, out.mask)
  np.testing.assert_allclose(np.asarray(full), np.asarray(out.logprobs), atol=TOL)


def test_processor_ids_and_pixels_match_reference_processor(ckpt, images):
  d, _ = ckpt
  proc = _processor(d, max_prompt_len=128)
  ref = qt.reference_processor(d, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  cases = [("Describe the image.", [images[0]]), ("Compare <image> with <image> please.",
                                                  [images[0], images[1]]), ("No image here.", [])]
  for text, ims in cases:
    parts, rest = [], text
    if "<image>" not in text:
      parts = [{"type": "image"} for _ in ims] + [{"type": "text", "text": text}]
    else:
      for i, piece in enumerate(text.split("<image>")):
        if piece:
          parts.append({"type": "text", "text": piece})
        if i < len(ims):
          parts.append({"type": "image"})
    messages = [{"role": "user", "content": parts}]
    rendered = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == chat_text(text, len(ims))
    out = ref(text=[rendered], images=ims or None, return_tensors="np")
    ids, patches, grids = proc.encode_one(text, ims)
    assert ids == out["input_ids"][0].tolist(), text
    if ims:
      mean = np.repeat(np.asarray(qt_mean(), np.float32), 2 * 14 * 14)
      std = np.repeat(np.asarray(qt_std(), np.float32), 2 * 14 * 14)
      ours = (np.concatenate(patches).astype(np.float32) / 255.0 - mean) / std
      np.testing.assert_allclose(ours, out["pixel_values"], atol=1e-5)
      assert [[1, *g] for g in grids] == out["image_grid_thw"].tolist()


def test_block_local_attention_equals_dense_segment_attention():
  """Segments that are contiguous runs of <= block positions (any alignment, padding -1 at the
  end): block-local attention over blocks b-1, b, b+1 is exact dense segment attention."""
  rng = np.random.default_rng(0)
  block, n, heads, d = 8, 48, 2, 4
  segs = []
  for _ in range(3):
    sizes, total = [], 0
    while total < 40:
      sizes.append(int(rng.integers(1, block + 1)))
      total += sizes[-1]
    seg = np.repeat(np.arange(len(sizes)), sizes)[:40]
    segs.append(np.concatenate([seg, -np.ones(n - 40, int)]))
  seg = jnp.asarray(np.stack(segs), jnp.int32)
  q, k, v = (jnp.asarray(rng.normal(size=(3, n, heads, d)), jnp.float32) for _ in range(3))
  local = qwen25vl._block_local_attend(q, k, v, seg, block, jnp.float32)
  mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
  dense = qwen25vl._attend(q[:, :, :, None], k, v, mask, jnp.float32)[:, :, :, 0]
  valid = np.asarray(seg >= 0)
  np.testing.assert_allclose(np.asarray(local)[valid], np.asarray(dense)[valid], atol=1e-5)


def test_smart_resize_golden_values():
  # Hand-computed: 100x70 rounds to 112x56 (within bounds); a 1000x1000 image is scaled down to
  # the largest multiple-of-28 square under 28*28*16 px (112x112); 20x20 is scaled up.
  assert smart_resize(100, 70, 28, MIN_PIXELS, MAX_PIXELS) == (112, 56)
  assert smart_resize(1000, 1000, 28, MIN_PIXELS, MAX_PIXELS) == (112, 112)
  assert smart_resize(20, 20, 28, MIN_PIXELS, MAX_PIXELS) == (56, 56)
  with pytest.raises(ValueError, match="aspect ratio"):
    smart_resize(10, 3000)


def test_mrope_positions_golden():
  # text(2) + image 4x6 patches -> 2x3 merged + text(2): image starts at 2, spans h 2..3,
  # w 2..4, then text resumes at 2 + max(2, 3) = 5.
  ids = [7, 7] + [9] * 6 + [7, 7]
  pos, nxt = mrope_positions(ids, 9, [(4, 6)], merge=2)
  np.testing.assert_array_equal(pos[0], [0, 1, 2, 2, 2, 2, 2, 2, 5, 6])
  np.testing.assert_array_equal(pos[1], [0, 1, 2, 2, 2, 3, 3, 3, 5, 6])
  np.testing.assert_array_equal(pos[2], [0, 1, 2, 3, 4, 2, 3, 4, 5, 6])
  assert nxt == 7


def test_processor_errors_name_the_problem(ckpt, images):
  d, _ = ckpt
  proc = _processor(d, max_prompt_len=20, max_images=1)
  with pytest.raises(ValueError, match=r"prompt 0: \d+ tokens .* > max_prompt_len 20"):
    proc(["Describe the image."], [images[0]])
  proc = _processor(d, max_prompt_len=200, max_images=1)
  with pytest.raises(ValueError, match="2 images > max_images 1"):
    proc(["<image><image>"], [[images[0], images[1]]])
  with pytest.raises(ValueError, match="1 '<image>' markers but 2 images"):
    proc.encode_one("<image> x", [images[0], images[1]])


def test_registry_builds_model_and_processor(ckpt, images):
  d, ref = ckpt
  cfg = dict(name="qwen25vl", checkpoint_dir=d, dtype="float32", param_dtype="float32",
             remat=False, max_prompt_len=96, max_images=2, min_pixels=MIN_PIXELS,
             max_pixels=MAX_PIXELS)
  model = interface.build_model(cfg, nnx.Rngs(0))
  proc = interface.build_processor(cfg)
  assert isinstance(model, qwen25vl.Qwen25VL) and isinstance(proc, interface.Processor)
  assert proc.window_units == 2  # from the checkpoint's vision window_size=56
  diffs = _max_logit_diff(model, ref, proc(PROMPTS, _prompt_images(images)), proc.tokenizer.image_id)
  assert max(diffs) < TOL
  with pytest.raises(ValueError, match="checkpoint_dir is empty"):
    interface.build_model(dict(name="qwen25vl"), None)
  with pytest.raises(ValueError, match="unknown ModelConfig key"):
    interface.build_processor(dict(cfg, max_pixel=3))


def test_bf16_params_logprobs_close_to_f32_reference(ckpt, images):
  d, ref = ckpt
  bf16 = load_qwen25vl(d, param_dtype="bfloat16", dtype="bfloat16")
  assert bf16.layers[0].attn.q.kernel[...].dtype == jnp.bfloat16
  assert bf16.vision.patch_embed.kernel[...].dtype == jnp.bfloat16
  proc = _processor(d)
  host = proc(PROMPTS, _prompt_images(images))
  response = np.random.default_rng(2).integers(0, 300, (3, 4)).astype(np.int32)
  graphdef, params = interface.split_model(bf16)
  lp = jax.jit(interface.sequence_logprobs, static_argnums=0)(
      graphdef, params, _device(host), jnp.asarray(response), jnp.ones((3, 4), bool))
  assert lp.dtype == jnp.float32
  # The f32 reference's log-probs of the same responses (teacher forced, unpadded rows).
  for r in range(3):
    inputs = _reference_inputs(host, r, proc.tokenizer.image_id)
    ids = torch.cat([inputs["input_ids"], torch.tensor(response[r:r + 1], dtype=torch.long)], 1)
    inputs = dict(inputs, input_ids=ids)
    if "mm_token_type_ids" in inputs:
      inputs["mm_token_type_ids"] = (ids == proc.tokenizer.image_id).long()
    with torch.no_grad():
      logits = ref(**inputs).logits[0, -5:-1]
    theirs = torch.log_softmax(logits, -1)[torch.arange(4), response[r]].numpy()
    # bf16 keeps ~3 significant digits: log-probs spread over several nats agree to ~0.1 nat.
    np.testing.assert_allclose(np.asarray(lp[r]), theirs, atol=0.5)


def test_remat_gradients_equal_plain_gradients(ckpt, images):
  """remat only changes what the backward pass stores, never the gradient (one image slot, so
  the vision blocks are rematerialised too)."""
  d, _ = ckpt
  batch = _device(_processor(d, max_images=1)(PROMPTS[:2], _prompt_images(images)[:2]))
  response = jnp.asarray(np.random.default_rng(3).integers(0, 300, (2, 3)), jnp.int32)
  grads = []
  for remat in (False, True):
    graphdef, params = interface.split_model(load_qwen25vl(d, remat=remat))
    loss = lambda p, b, r, g=graphdef: interface.sequence_logprobs(
        g, p, b, r, jnp.ones(r.shape, bool)).sum()
    grads.append(jax.jit(jax.grad(loss))(params, batch, response))
  plain, remat = (jax.tree.leaves(g) for g in grads)
  assert float(jnp.abs(grads[0]["vision"]["patch_embed"]["kernel"][...]).max()) > 0
  for a, b in zip(plain, remat):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_check_parity_cli_prints_the_two_result_lines(ckpt, capsys):
  from experiments import check_parity  # pylint: disable=g-import-not-at-top
  d, _ = ckpt
  rc = check_parity.main([f"--hf_dir={d}", "--max_new_tokens=4", "--min_pixels=1568",
                          "--max_pixels=12544"])
  last = capsys.readouterr().out.strip().splitlines()[-2:]
  assert last[0].startswith("max_abs_logit_diff=") and float(last[0].split("=")[1]) < TOL
  assert last[1] == "greedy_match=true"
  assert rc == 0


def test_config_file_loads_validates_and_builds_the_port(ckpt):
  from g2rpo_jax import config_utils, trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  d, _ = ckpt
  c = config_utils.load_config(f"configs/qwen25vl.py:{d},5")
  config_utils.validate(c)
  assert (c.model.checkpoint_dir, c.seed) == (d, 5)
  assert (c.model.param_dtype, c.model.dtype, c.model.remat) == ("bfloat16", "bfloat16", True)
  assert (c.mesh.data, c.mesh.fsdp) == (1, -1)
  # Every model key is a ModelConfig field (a misspelt key would be an error here).
  cfg = qwen25vl._model_config(trainer_lib.model_config(c))
  assert cfg.checkpoint_dir == d and cfg.max_prompt_len == c.model.max_prompt_len


@pytest.mark.slow
def test_rl_step_end_to_end_on_tiny_checkpoint(ckpt, tmp_path):
  """The real training loop on the tiny Qwen2.5-VL: rollout with images -> rewards -> G²RPO
  update -> checkpoint, on a (data=4, fsdp=2) mesh of the 8 fake CPU devices."""
  from g2rpo_jax import config_utils, metrics, trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  d, _ = ckpt
  c = config_utils.load_config(f"configs/qwen25vl.py:{d}")
  config_utils.apply_overrides(c, [
      "model.dtype=float32", "model.param_dtype=float32", "model.remat=False",
      "model.max_prompt_len=160", f"model.min_pixels={56 * 56}", f"model.max_pixels={56 * 56}",
      "tasks.names=('counting',)", "tasks.weights=(1.0,)", "tasks.train_size=8",
      "tasks.eval_size=1", "rollout.group_size=2", "rollout.max_new_tokens=4",
      "batch.prompts_per_step=8", "batch.num_minibatches=1", "filtering.enabled=False",
      "train.num_steps=1", "train.checkpoint_every=1", "train.eval_every=1",
      "train.grad_norm_every=0", "train.progress_bar=False", "train.plots=False",
      "eval.batch_size=8", "mesh.data=4", "mesh.fsdp=2"])
  start = trainer_lib.params_checksum(interface.split_model(load_qwen25vl(d))[1])
  wd = str(tmp_path / "run")
  summary = trainer_lib.train_and_evaluate(c, wd)
  assert summary["status"] == "done" and summary["step"] == 1
  assert os.listdir(os.path.join(wd, "checkpoints")) == ["1"]
  last = metrics.read_jsonl(os.path.join(wd, "metrics.jsonl"))[-1]
  assert np.isfinite(last["loss/total"]) and last["grad_norm"] > 0
  assert last["response_length/counting"] > 0
  assert abs(summary["params_checksum"] - start) > 1e-3  # the update moved the weights
