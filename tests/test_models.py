"""Tests for g2rpo_jax/models/: the interface helpers, the tiny_vlm model and its processor."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from g2rpo_jax import models as M
from g2rpo_jax.models import interface
from g2rpo_jax.models import testing
from g2rpo_jax.models.tiny_vlm import TinyVLMConfig

NANO = M.tiny_vlm_config("nano")  # image 16x16, patch 8 -> 4 image tokens, P = 32
# The options the default job uses: cross-attention fusion, a token conv, per-image pixel norm
# and the text-width patch position embedding.
CROSS = dataclasses.replace(NANO, fusion="cross", token_conv=4, pixel_norm="per_image",
                            image_pos_std=1.0)
_MODELS = {}


def _model(cfg=NANO, seed=0):
  # Host-initialised (no init compiles) and cached: tests only read the model.
  if (cfg, seed) not in _MODELS:
    _MODELS[cfg, seed] = testing.host_init_model(cfg, seed)
  return _MODELS[cfg, seed]


# One response shape everywhere, so the jitted helpers compile once per prompt length.
RESP = jnp.array([[40, 41, 42, 2, 50, 51], [60, 9, 61, 62, 63, 64]], jnp.int32)


@jax.jit
def _full_logits(model, pb, resp):
  return model.logits(model.hidden_states(pb, resp))


def _images(n, seed=0, size=16):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _batch(cfg=NANO, prompts=("What is <image> here?", "count 3"), images="default"):
  proc = M.build_processor(cfg)
  if isinstance(images, str):
    images = [*_images(1), None]
  return jax.tree.map(jnp.asarray, proc(list(prompts), images))


# -- processor -------------------------------------------------------------------------------


def test_processor_left_pads_and_places_image_tokens_at_marker():
  proc = M.build_processor(NANO)
  tok = proc.tokenizer
  pb = proc(["ab<image>c", "xy"], [*_images(1), None])
  expect0 = [tok.bos_id, *tok.encode("ab"), *[tok.image_id] * 4, *tok.encode("c")]
  expect1 = [tok.bos_id, *tok.encode("xy")]
  assert pb.tokens.shape == (2, 32) and pb.tokens.dtype == np.int32
  assert pb.tokens[0, -len(expect0):].tolist() == expect0
  assert pb.tokens[1, -len(expect1):].tolist() == expect1
  assert (pb.tokens[0, :-len(expect0)] == tok.pad_id).all()
  assert pb.mask.sum(1).tolist() == [len(expect0), len(expect1)]
  assert pb.mask[0, -len(expect0):].all() and not pb.mask[0, :-len(expect0)].any()
  assert pb.vision["pixels"].shape == (2, 16, 16, 3)
  assert (pb.vision["pixels"][1] == 0).all()


def test_processor_without_marker_puts_image_after_bos():
  proc = M.build_processor(NANO)
  tok = proc.tokenizer
  pb = proc(["hi"], _images(1))
  assert pb.tokens[0, -7:].tolist() == [tok.bos_id, *[tok.image_id] * 4, *tok.encode("hi")]


def test_processor_resizes_other_image_sizes():
  proc = M.build_processor(NANO)
  pb = proc(["x"], [np.full((40, 24, 3), 200, np.uint8)])
  assert pb.vision["pixels"].shape == (1, 16, 16, 3)
  assert (pb.vision["pixels"] == 200).all()


def test_processor_errors():
  proc = M.build_processor(NANO)
  with pytest.raises(ValueError, match=r"prompt 1 is 41 tokens .* max_prompt_len=32"):
    proc(["ok", "y" * 40], None)
  with pytest.raises(ValueError, match="prompt 0 has an '<image>' marker but no image"):
    proc(["see <image>"], [None])
  with pytest.raises(ValueError, match=r"image 0: expected uint8\[H, W, 3\]"):
    proc(["x"], [np.zeros((16, 16, 3), np.float32)])
  with pytest.raises(ValueError, match="2 prompts but 1 images"):
    proc(["a", "b"], [None])
  text_only = M.build_processor(dataclasses.replace(NANO, vision=False))
  with pytest.raises(ValueError, match="vision=False but images were given"):
    text_only(["a"], _images(1))


# -- registry and config ---------------------------------------------------------------------


def test_build_from_dict_and_configdict():
  d = dataclasses.asdict(NANO)
  # eval_shape runs the real builder and initialisers abstractly (no XLA compiles).
  m1 = nnx.eval_shape(lambda: M.build_model(d, nnx.Rngs(0)))
  m2 = nnx.eval_shape(lambda: M.build_model(ml_collections.ConfigDict(d), nnx.Rngs(0)))
  assert isinstance(m1, M.TinyVLM) and m1.config == NANO == m2.config
  assert m1.embed.value.shape == (NANO.vocab_size, NANO.width)


def test_unknown_config_key_and_unknown_name_are_errors():
  with pytest.raises(ValueError, match=r"unknown TinyVLMConfig key\(s\) \['widht'\]"):
    M.build_model({**dataclasses.asdict(NANO), "widht": 3}, nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown model 'no_such_model'"):
    M.build_model({"name": "no_such_model"}, nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown tiny_vlm size 'huge'"):
    M.tiny_vlm_config("huge")
  with pytest.raises(ValueError, match="num_heads 4 must be a multiple of num_kv_heads 3"):
    M.tiny_vlm_config("nano", num_kv_heads=3)


def test_register_model_from_another_module():
  calls = []

  def build(config, rngs):
    calls.append(config["name"])
    return M.TinyVLM(NANO, rngs=rngs)

  M.register_model("test_only_model", build_model=build, build_processor=lambda c: "proc")
  assert "test_only_model" in M.registered_models()
  built = nnx.eval_shape(lambda: M.build_model({"name": "test_only_model"}, nnx.Rngs(0)))
  assert isinstance(built, M.TinyVLM)
  assert M.build_processor({"name": "test_only_model"}) == "proc"
  assert calls == ["test_only_model"]
  with pytest.raises(ValueError, match="already registered"):
    M.register_model("test_only_model", build_model=print, build_processor=print)


def _n_params(cfg):
  shapes = nnx.eval_shape(lambda: M.build_model(cfg, nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(shapes)))


def test_default_size_is_low_millions_and_peer_size_matches_the_workload():
  assert 1e6 <= _n_params(M.tiny_vlm_config()) <= 1e7
  # Issue 7's workload: vocab 2048, width 256, MLP 1024, 4 layers, 4 heads, untied: about 5.2M.
  # Hand count: 2*2048*256 + 4*(4*256*256 + 3*256*1024 + 2*256) + 256 = 5,245,184.
  assert _n_params(M.tiny_vlm_config("peer")) == 5_245_184


def test_params_carry_logical_sharding_names():
  _, state = M.split_model(_model())
  for path, v in jax.tree_util.tree_leaves_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = v.get_metadata().get("out_sharding")
    assert names is not None and len(names) == v.value.ndim, jax.tree_util.keystr(path)
    assert set(names) <= set(interface.LOGICAL_AXES) | {None}, names


def test_dtypes_come_from_the_config():
  cfg = dataclasses.replace(NANO, dtype="bfloat16", param_dtype="bfloat16")
  abstract = nnx.eval_shape(lambda: M.build_model(cfg, nnx.Rngs(0)))
  assert {x.dtype for x in jax.tree.leaves(nnx.state(abstract))} == {jnp.dtype(jnp.bfloat16)}
  m = _model(cfg)
  pb = _batch(cfg)
  h, logits = jax.eval_shape(
      lambda m: (lambda h: (h, m.logits(h)))(m.hidden_states(pb, jnp.ones((2, 3), jnp.int32))), m)
  assert h.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  logits, cache = jax.eval_shape(lambda m: m.prefill(pb, 40), m)
  assert cache.k[0].dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  # f32 compute over bf16-stored params: activations and cache stay f32.
  mixed = dataclasses.replace(NANO, param_dtype="bfloat16")
  _, cache = jax.eval_shape(lambda m: m.prefill(pb, 40), _model(mixed))
  assert cache.k[0].dtype == jnp.float32
  with pytest.raises(ValueError, match="unknown dtype 'f32'"):
    TinyVLMConfig(dtype="f32")


# -- numerics --------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    {}, {"tie_embeddings": True, "num_kv_heads": 1, "vision": False},
    dataclasses.asdict(CROSS), {"vision": False, "token_conv": 3}])
def test_cached_decode_matches_full_sequence(overrides):
  cfg = dataclasses.replace(NANO, **overrides)
  m = _model(cfg)
  images = [*_images(1), None] if cfg.vision else None
  prompts = ("What is <image> here?", "count 3") if cfg.vision else ("abc", "count 3")
  pb = _batch(cfg, prompts, images)
  resp = RESP
  full = _full_logits(m, pb, resp)                                 # [B, P + T, V]
  p = pb.tokens.shape[1]
  logits, cache = jax.jit(lambda pb: m.prefill(pb, p + 8))(pb)
  np.testing.assert_allclose(logits, full[:, p - 1], atol=1e-5, rtol=0)
  step = jax.jit(m.decode)
  for t in range(resp.shape[1]):
    logits, cache = step(resp[:, t], cache)
    np.testing.assert_allclose(logits, full[:, p + t], atol=1e-5, rtol=0)
  assert cache.index.tolist() == [p + 6] * 2


@pytest.mark.parametrize("cfg", [NANO, CROSS], ids=["tokens", "cross"])
def test_left_padding_does_not_change_a_prompts_logits(cfg):
  m = _model(cfg)
  outs = []
  for p in (32, 48):
    pb = _batch(dataclasses.replace(cfg, max_prompt_len=p))
    outs.append(_full_logits(m, pb, RESP))
  # Every real position: the prompt's tokens (with image placeholders for "tokens") + RESP.
  n_real = np.asarray(pb.mask).sum(1) + RESP.shape[1]
  assert n_real[0] > n_real[1] > RESP.shape[1]
  for r in range(2):
    np.testing.assert_allclose(outs[0][r, -n_real[r]:], outs[1][r, -n_real[r]:], atol=1e-5,
                               rtol=0)


def test_image_embeddings_replace_placeholders_in_order():
  m = _model()
  pb = _batch()
  emb = jax.jit(lambda m, pb: m._embed_prompt(pb))(m, pb)
  img = jax.jit(lambda m, px: m.vision(px, jnp.float32))(m, pb.vision["pixels"])  # [B, 4, E]
  pos = np.nonzero(np.asarray(pb.tokens[0]) == NANO.image_token_id)[0]
  assert len(pos) == 4
  np.testing.assert_allclose(emb[0, pos], img[0], atol=1e-6)
  # Text positions keep their token embeddings; the image-less row has no replaced slot.
  np.testing.assert_allclose(emb[1], jax.jit(lambda m, t: m._embed_tokens(t))(m, pb.tokens[1]),
                             atol=1e-6)


@pytest.mark.parametrize("cfg", [NANO, CROSS], ids=["tokens", "cross"])
def test_image_changes_only_its_own_row(cfg):
  # Row 1 has no image: its (zero) pixels are replaced by noise too, and must not reach its
  # logits (no placeholders with "tokens"; has_image=False gates the cross-attention with
  # "cross"). Noise, not a constant: per-image normalisation maps every constant image to 0.
  m = _model(cfg)
  a = _batch(cfg)
  b = a.replace(vision={**a.vision, "pixels": jnp.asarray(np.stack(_images(2, seed=1)))})
  la, lb = _full_logits(m, a, RESP), _full_logits(m, b, RESP)
  assert float(jnp.abs(la[0, -1] - lb[0, -1]).max()) > 1e-3
  np.testing.assert_allclose(la[1], lb[1], atol=1e-6)


def test_cross_fusion_processor_drops_placeholders_and_flags_images():
  proc = M.build_processor(CROSS)
  tok = proc.tokenizer
  pb = proc(["ab<image>c", "xy"], [*_images(1), None])
  assert pb.tokens[0, -4:].tolist() == [tok.bos_id, *tok.encode("abc")]
  assert not (pb.tokens == tok.image_id).any()
  assert pb.vision["has_image"].tolist() == [True, False]
  assert M.build_processor(NANO)(["a<image>"], _images(1)).vision["has_image"].tolist() == [True]


def test_token_conv_equals_its_definition():
  m = _model(CROSS)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, CROSS.width)).astype(np.float32)
  valid = np.ones((2, 7), bool)
  valid[1, :3] = False                                           # left padding
  got = jax.jit(lambda m, x, v: m._token_conv(x, v))(m, x, valid)
  w = np.asarray(m.token_conv.value)                             # [K-1, E]
  xm = x * valid[..., None]
  want = x.copy()
  for t in range(7):
    for j in range(1, CROSS.token_conv):
      if t - j >= 0:
        want[:, t] += w[j - 1] * xm[:, t - j]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_per_image_pixel_norm_ignores_brightness_and_contrast():
  m = _model(CROSS)
  img = _images(1)[0].astype(np.float32)
  # Halved contrast and shifted per channel, still inside [0, 255].
  other = img * 0.5 + np.array([10.0, 60.0, 100.0], np.float32)
  px = jnp.asarray(np.stack([img, other]).round().astype(np.uint8))
  feats = jax.jit(lambda m, px: m.vision(px, jnp.float32))(m, px)
  # Rounding to uint8 leaves ~1/255 noise; a fixed [-1, 1] map moves the features far more.
  np.testing.assert_allclose(feats[0], feats[1], atol=0.15)
  fixed = jax.jit(lambda m, px: m.vision(px, jnp.float32))(_model(NANO), px)
  assert float(jnp.abs(fixed[0] - fixed[1]).max()) > 0.5


@pytest.mark.parametrize("field,value,match", [
    ("fusion", "concat", "fusion must be"), ("pixel_norm", "batch", "pixel_norm must be"),
    ("token_conv", -1, "token_conv must be"), ("image_pos_std", -0.1, "image_pos_std")])
def test_fusion_options_are_validated(field, value, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(NANO, **{field: value})


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_sequence_logprobs_matches_a_direct_log_softmax():
  m = _model()
  graphdef, params = M.split_model(m)
  pb = _batch()
  mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  p = pb.tokens.shape[1]
  full = np.asarray(_full_logits(m, pb, RESP), np.float64)[:, p - 1:p + 5]
  # The temperature is traced here, so each variant compiles once for both temperatures.
  seq_lp = jax.jit(M.sequence_logprobs, static_argnames=("return_entropy", "chunk_size"))
  for temp in (1.0, 0.7):
    logp_all = _np_log_softmax(full / temp)
    ref = np.take_along_axis(logp_all, np.asarray(RESP)[..., None], -1)[..., 0]
    ref_ent = -(np.exp(logp_all) * logp_all).sum(-1)
    for chunk in (None, 3):
      lp, ent = seq_lp(graphdef, params, pb, RESP, mask, temperature=jnp.float32(temp),
                       return_entropy=True, chunk_size=chunk)
      np.testing.assert_allclose(lp, np.where(mask, ref, 0), atol=1e-5)
      np.testing.assert_allclose(ent, np.where(mask, ref_ent, 0), atol=1e-5)
  with pytest.raises(ValueError, match="chunk_size 4 must divide the response length 6"):
    M.sequence_logprobs(graphdef, params, pb, RESP, mask, chunk_size=4)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    M.sequence_logprobs(graphdef, params, pb, RESP, mask, temperature=0.0)


def test_pure_functions_of_graphdef_and_params_under_jit_and_grad():
  graphdef, params = M.split_model(_model())
  pb = _batch()
  mask = jnp.ones(RESP.shape, bool)

  def loss(params):
    return -M.sequence_logprobs(graphdef, params, pb, RESP, mask).sum()

  val, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(val) and val > 0
  gnorm = sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads))
  assert gnorm > 0
  # The vision tower gets gradient through the scattered image embeddings.
  assert float(jnp.abs(grads["vision"]["patch_embed"].value).max()) > 0


# -- compute layout (2-D matmuls) ------------------------------------------------------------


def test_dense_and_attention_projections_equal_their_einsum_definitions():
  from g2rpo_jax.models import tiny_vlm
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(3, 5, 6)), jnp.float32)
  # Value and both gradients of the flattened matmul equal those of the [B, T, K] contraction.
  ref = lambda x, w: jnp.sum(jnp.einsum("btk,kn->btn", x, w) * g)
  got = lambda x, w: jnp.sum(tiny_vlm.dense(x, w) * g)
  np.testing.assert_allclose(got(x, w), ref(x, w), rtol=1e-5)
  for a, b in zip(jax.grad(got, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  attn = _model().layers[0].attn
  xe = jnp.asarray(rng.normal(size=(2, 4, NANO.width)), jnp.float32)
  q, k, v = attn.qkv(xe)
  for got_, wname in ((q, "wq"), (k, "wk"), (v, "wv")):
    want = jnp.einsum("bte,ehd->bthd", xe, getattr(attn, wname).value)
    np.testing.assert_allclose(got_, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(attn.out(q), jnp.einsum("bthd,hde->bte", q, attn.wo.value),
                             rtol=1e-5, atol=1e-5)


# The definitions the compute layouts must equal: grouped-query attention as one einsum over
# [B, T, Hkv, G, D] x [B, S, Hkv, D] (query head h -> KV head h // G), and half-split RoPE.
def _attend_definition(q, k, v, mask):
  b, t, h, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, h // hkv, d)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k) / np.sqrt(d)
  s = jnp.where(mask[:, None, None], s, -1e30)
  o = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, axis=-1), v)
  return o.reshape(b, t, h, d)


def _rope_definition(x, pos, theta):
  d = x.shape[-1]
  freqs = theta ** (-np.arange(0, d // 2) * 2.0 / d)
  ang = np.asarray(pos, np.float64)[..., None] * freqs
  cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


@jax.jit
def _attend_both_ways(q, k, v, mask, cot):
  """(layout, definition) pairs: outputs, gradients w.r.t. q/k/v, mask=None, one decode query."""
  from g2rpo_jax.models import tiny_vlm
  to_cache = lambda x: jnp.swapaxes(x, 1, 2)  # attend takes K/V as [B, Hkv, S, D]
  got = lambda q, k, v: jnp.sum(tiny_vlm.attend(q, to_cache(k), to_cache(v), mask) * cot)
  want = lambda q, k, v: jnp.sum(_attend_definition(q, k, v, mask) * cot)
  full = jnp.ones(mask.shape, bool)
  return dict(
      out=(tiny_vlm.attend(q, to_cache(k), to_cache(v), mask), _attend_definition(q, k, v, mask)),
      grads=(jax.grad(got, (0, 1, 2))(q, k, v), jax.grad(want, (0, 1, 2))(q, k, v)),
      # mask=None is full attention (the ViT).
      no_mask=(tiny_vlm.attend(q, to_cache(k), to_cache(v), None),
               _attend_definition(q, k, v, full)),
      # Decode: one query against the whole cache is the last row of the full pass.
      decode=(tiny_vlm.attend(q[:, -1:], to_cache(k), to_cache(v), mask[:, -1:]),
              _attend_definition(q, k, v, mask)[:, -1:]))


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 2), (4, 1), (2, 2)])
def test_attend_values_and_gradients_equal_the_grouped_einsum(heads, kv_heads):
  rng = np.random.default_rng(heads * 10 + kv_heads)
  b, t, d = 3, 7, 8
  q = jnp.asarray(rng.normal(size=(b, t, heads, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, t, kv_heads, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, kv_heads, d)), jnp.float32)
  # Causal, left padding of 0 / 2 / 5 positions: padded queries see no key at all.
  valid = np.arange(t)[None] >= np.array([0, 2, 5])[:, None]
  mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None] & valid[:, None, :])
  cot = jnp.asarray(rng.normal(size=(b, t, heads, d)), jnp.float32)
  res = _attend_both_ways(q, k, v, mask, cot)
  for name in ("out", "no_mask", "decode"):
    np.testing.assert_allclose(*res[name], rtol=1e-5, atol=1e-5, err_msg=name)
  for g, w, name in zip(*res["grads"], "qkv"):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"d/d{name}")


def test_rope_equals_the_half_split_definition_with_its_gradient():
  from g2rpo_jax.models import tiny_vlm
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, 3, 8)), jnp.float32)
  pos = jnp.asarray([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]], jnp.int32)  # second row left-padded
  cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  @jax.jit
  def both(x):
    tables = tiny_vlm.rope_tables(pos, 8, 100.0)
    got = lambda x: jnp.sum(tiny_vlm.rope(x, tables) * cot)
    want = lambda x: jnp.sum(_rope_definition(x, pos, 100.0) * cot)
    return (tiny_vlm.rope(x, tables), _rope_definition(x, pos, 100.0),
            jax.grad(got)(x), jax.grad(want)(x))

  y, y_def, g, g_def = both(x)
  np.testing.assert_allclose(y, y_def, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g, g_def, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)  # position 0 is the identity
