"""The vision tower's pretraining: token bags, the bag objective learning what images show, and
the trainer's stage (only the tower changes; cached in the workdir; skipped when the warm start
is cached; a clear error for a model without a trainable tower; the stages' progress bars)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from g2rpo_jax import config_utils, metrics as metrics_lib, trainer as trainer_lib
from g2rpo_jax import vision_pretraining as vp
from g2rpo_jax.models import interface, testing as model_testing, tiny_vlm

ONE = jax.devices()[:1]


def test_token_bag_marks_each_row_s_tokens_once():
  bag = vp.token_bag([[3, 1, 3], [], [0, 4]], vocab_size=5)
  np.testing.assert_array_equal(bag, [[0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 1]])
  with pytest.raises(ValueError, match=r"row 1 has token ids outside \[0, 5\): \[7\]"):
    vp.token_bag([[1], [2, 7]], vocab_size=5)


def test_bag_f1_counts_true_positives_over_both_sides_without_the_shared_tokens():
  # Column 2 is in every row: left out, whatever is predicted for it.
  targets = jnp.asarray([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
  logits = jnp.asarray([[2.0, -1.0, -5.0, 3.0], [-1.0, 0.5, 5.0, -2.0]])
  # Columns 0, 1, 3: true positives 2, predicted 3, true 3.
  assert float(vp.bag_f1(logits, targets)) == pytest.approx(2 * 2 / 6)
  assert float(vp.bag_f1(10 * (2 * targets - 1), targets)) == 1.0
  # A bag that predicts only the shared column scores 0, not the F1 of the shared tokens.
  only_shared = jnp.where(jnp.arange(4) == 2, 5.0, -5.0) * jnp.ones_like(targets)
  assert float(vp.bag_f1(only_shared, targets)) == 0.0


def _colour_images(rng, n, size):
  """Half the images mostly red (bag {0, 2}), half mostly blue (bag {1, 2}), with noise."""
  red = rng.integers(0, 2, n).astype(bool)
  base = np.where(red[:, None, None, None], [200, 30, 30], [30, 30, 200])
  pixels = np.clip(base + rng.integers(-40, 41, (n, size, size, 3)), 0, 255).astype(np.uint8)
  targets = vp.token_bag([[0, 2] if r else [1, 2] for r in red], vocab_size=4)
  return pixels, targets


def test_the_bag_objective_teaches_the_tower_what_the_images_show():
  cfg = tiny_vlm.tiny_vlm_config("nano", patch_size=8, pixel_norm="fixed")
  graphdef, params = model_testing.host_init(cfg, seed=0)
  params = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
  size = cfg.image_size
  trainable = {"vision": params["vision"],
               "head": vp.init_head(jax.random.key(0), cfg.width, 4)}
  tx = optax.adam(3e-3)
  step = jax.jit(lambda t, o, x, y: vp.pretrain_step(t, o, x, y, params=params,
                                                     graphdef=graphdef, tx=tx))
  rng = np.random.default_rng(0)
  test_x, test_y = _colour_images(rng, 64, size)
  logits = jax.jit(lambda t, x: vp.bag_logits(t["vision"], t["head"], x, graphdef=graphdef,
                                              params=params))
  opt_state = tx.init(trainable)
  before = float(vp.bag_f1(logits(trainable, test_x), test_y))
  for _ in range(60):
    trainable, opt_state, loss = step(trainable, opt_state, *_colour_images(rng, 32, size))
  after = float(vp.bag_f1(logits(trainable, test_x), test_y))
  assert after == 1.0 and before < 0.9, (before, after)
  assert np.isfinite(float(loss))
  # The tower itself is trained: the loss's gradient reaches every tower parameter, and the
  # logits follow the tower passed in, not the one inside `params` (the trainer passes the
  # pre-stage params throughout).
  grads = jax.grad(vp.bag_loss)(trainable, test_x, test_y, graphdef=graphdef, params=params)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["vision"]))
  with_new = dict(params, vision=trainable["vision"])
  np.testing.assert_allclose(
      logits(trainable, test_x),
      vp.bag_logits(trainable["vision"], trainable["head"], test_x, graphdef=graphdef,
                    params=with_new), rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits(trainable, test_x), vp.bag_logits(
      params["vision"], trainable["head"], test_x, graphdef=graphdef, params=with_new))


def _smoke(*overrides):
  c = config_utils.load_config("smoke")
  config_utils.apply_overrides(c, ["vision_pretrain.enabled=True", "vision_pretrain.steps=3",
                                   "vision_pretrain.batch_size=6", "warm_start.steps=2",
                                   *overrides])
  return c


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_the_stage_changes_only_the_tower_and_is_cached(tmp_path, monkeypatch):
  wd = str(tmp_path / "run")
  tr = trainer_lib.Trainer(_smoke("warm_start.enabled=False"), wd, ONE)
  init = jax.device_get(tr._init_params)
  params = jax.device_get(tr.initial_params())
  assert not _leaves_equal(params["vision"], init["vision"])
  assert all(_leaves_equal(params[k], init[k]) for k in init if k != "vision")
  assert os.listdir(os.path.join(wd, "vision_pretrain"))

  # A second run in the same workdir reuses the cached tower: no pretraining batch is built.
  def no_batches(*a, **k):
    raise AssertionError("the cached vision pretraining ran again")
  monkeypatch.setattr(trainer_lib.Trainer, "_bag_batch", no_batches)
  tr2 = trainer_lib.Trainer(_smoke("warm_start.enabled=False"), wd, ONE)
  assert _leaves_equal(jax.device_get(tr2.initial_params()), params)


def test_a_cached_warm_start_skips_the_pretraining(tmp_path, monkeypatch):
  wd = str(tmp_path / "run")
  params = jax.device_get(trainer_lib.Trainer(_smoke(), wd, ONE).initial_params())
  assert os.listdir(os.path.join(wd, "vision_pretrain")) and os.listdir(
      os.path.join(wd, "warm_start"))
  calls = []
  monkeypatch.setattr(trainer_lib.Trainer, "pretrain_vision",
                      lambda self, p: calls.append(1) or p)
  again = jax.device_get(trainer_lib.Trainer(_smoke(), wd, ONE).initial_params())
  assert calls == [] and _leaves_equal(again, params)


def test_a_model_without_a_trainable_tower_is_a_config_error(tmp_path, monkeypatch):
  monkeypatch.setattr(tiny_vlm.TinyVLM, "image_features", interface.PolicyModel.image_features)
  tr = trainer_lib.Trainer(_smoke(), str(tmp_path / "run"), ONE)
  with pytest.raises(config_utils.ConfigError,
                     match=r"vision_pretrain.enabled = True: expected a model whose vision "
                           r"tower trains from scratch.*set vision_pretrain.enabled=False"):
    tr.initial_params()
  assert not os.path.exists(os.path.join(tr.workdir, "warm_start"))


def test_the_stage_progress_bars_show_each_loss_from_its_first_read_never_a_placeholder(
    tmp_path, monkeypatch):
  shown = []
  monkeypatch.setattr(metrics_lib.Progress, "update",
                      lambda self, n=1, **headline: shown.append(headline))
  cfg = _smoke("vision_pretrain.steps=20", "warm_start.steps=20")
  trainer_lib.Trainer(cfg, str(tmp_path / "run"), ONE).initial_params()
  # Each stage reads its loss from the device every tenth of its steps (here every 2nd): the bar
  # has no number before the first read and a finite one on every step after it.
  assert len(shown) == 40
  assert shown[0] == {} and shown[20] == {}
  assert all(list(h) == ["loss"] and np.isfinite(h["loss"]) for h in shown[1:20]), shown[:20]
  assert all(list(h) == ["nll"] and np.isfinite(h["nll"]) for h in shown[21:]), shown[20:]
