"""Reward model: the head reads the last real token under any padding; losses match hand computation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perl_jax import heads, lora, losses, models, optimizer, reward, trained, trainer
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def rm():
  cfg = tiny_config()
  base = models.init_params(cfg, jax.random.key(0))
  rcfg = trained.RewardConfig(mode="lora", loss="bt", lora_cfg=lora.LoraConfig(rank=2))
  tr = trained.init_reward(jax.random.key(1), rcfg, cfg, base)
  tr["lora"] = jax.tree.map(lambda x: x + 0.05, tr["lora"])
  return cfg, base, rcfg, tr


def _pad(seqs, length, side):
  ids = np.zeros((len(seqs), length), np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
    ids[i, sl], mask[i, sl] = s, 1
  return jnp.asarray(ids), jnp.asarray(mask)


def test_last_token_index():
  mask = jnp.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(np.asarray(losses.last_token_index(mask)), [1, 3, 3])


def test_scores_read_last_real_token_under_left_and_right_padding(rm):
  cfg, base, rcfg, tr = rm
  seqs = [[5, 9, 17, 3], [7, 8], [11, 12, 13, 14, 15, 16]]
  expected = []
  for s in seqs:
    ids = jnp.asarray([s], jnp.int32)
    hidden = models.forward(cfg, base, ids, adapters=[(tr["lora"], lora.scale(rcfg.lora_cfg))]).hidden
    expected.append(float(hidden[0, -1] @ tr["head"]["kernel"][:, 0] + tr["head"]["bias"][0]))
  for side in ("left", "right"):
    ids, mask = _pad(seqs, 8, side)
    got = trained.scores(cfg, rcfg, tr, base, ids, mask)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, err_msg=side)


def test_bradley_terry_and_bce_losses_by_hand(rm):
  cfg, base, rcfg, tr = rm
  ids_c, mask_c = _pad([[5, 9, 17], [7, 8, 30]], 5, "right")
  ids_r, mask_r = _pad([[5, 9, 40, 41], [7, 8]], 5, "right")
  batch = {"input_ids": jnp.stack([ids_c, ids_r], 1), "attention_mask": jnp.stack([mask_c, mask_r], 1)}
  r_c = np.asarray(trained.scores(cfg, rcfg, tr, base, ids_c, mask_c))
  r_r = np.asarray(trained.scores(cfg, rcfg, tr, base, ids_r, mask_r))
  loss, m = reward.loss_fn(cfg, rcfg, tr, base, batch)
  by_hand = np.mean([np.log(1 + np.exp(-(c - r))) for c, r in zip(r_c, r_r)])
  np.testing.assert_allclose(float(loss), by_hand, rtol=1e-5)
  np.testing.assert_allclose(float(m["accuracy"]), np.mean(r_c > r_r))

  bce = trained.RewardConfig(mode="lora", loss="bce", lora_cfg=rcfg.lora_cfg)
  label = jnp.array([1.0, 0.0])
  loss, _ = reward.loss_fn(cfg, bce, tr, base, {"input_ids": ids_c, "attention_mask": mask_c, "label": label})
  p = 1 / (1 + np.exp(-r_c))
  np.testing.assert_allclose(float(loss), -np.mean([np.log(p[0]), np.log(1 - p[1])]), rtol=1e-5)


def test_lora_step_changes_only_adapters_and_head_full_step_changes_backbone(rm):
  cfg, base, rcfg, tr = rm
  ids, mask = _pad([[5, 9, 17], [7, 8, 30], [3, 4], [9, 9, 9, 9]], 6, "right")
  batch = {"input_ids": ids.reshape(2, 2, 6), "attention_mask": mask.reshape(2, 2, 6)}
  opt = optimizer.make_optimizer(optimizer.make_schedule(1e-2, 10, 1))
  for mode in ("lora", "full"):
    r = trained.RewardConfig(mode=mode, loss="bt", lora_cfg=rcfg.lora_cfg)
    trainable = trained.init_reward(jax.random.key(1), r, cfg, base)
    state = trainer.new_state(trainable, opt, jnp.zeros(2, jnp.uint32))
    step_base = base if mode == "lora" else {}
    new, metrics = jax.jit(lambda s, b, x: trainer.train_step(functools.partial(reward.loss_fn, cfg, r), opt, s, b, x))(state, step_base, batch)
    assert int(new["step"]) == 1 and np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), trainable, new["trainable"])
    if mode == "lora":
      assert set(new["trainable"]) == {"lora", "head"}
      lora_moved = moved["lora"]["layers"]["attn"]["q_proj"]
      assert lora_moved["b"] and not lora_moved["a"]  # B = 0 at init, so A has no gradient on step 1.
      assert moved["head"]["kernel"] and not moved["head"]["bias"]  # Bradley-Terry is shift-invariant.
    else:
      assert moved["backbone"]["layers"]["mlp"]["up_proj"]["kernel"]


def test_balanced_pos_weight_equalises_class_totals():
  label = np.array([1, 1, 1, 0, 1, 0, 1, 1], np.float32)  # 6 positive, 2 negative
  w = reward.balanced_pos_weight(label)
  assert w == pytest.approx(2 / 6)
  assert w * np.sum(label) == pytest.approx(np.sum(1 - label))
  with pytest.raises(models.ConfigError, match="balance_classes"):
    reward.balanced_pos_weight(np.ones(4))


def test_head_lr_mult_scales_only_the_head_update():
  """Adam normalises the gradient, so the same gradient on "head" and "lora" gives updates in the ratio of
  their learning rates: head_lr_mult, and 1 when it is off."""
  import ml_collections
  params = {"head": {"kernel": jnp.ones((3,))}, "lora": {"a": jnp.ones((3,))}}
  grads = {"head": {"kernel": jnp.array([0.1, -0.2, 0.3])}, "lora": {"a": jnp.array([0.1, -0.2, 0.3])}}
  for mult in (1.0, 4.0):
    cfg = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=1, weight_decay=0.0, clip_norm=10.0,
                                         head_lr_mult=mult))
    _, tx = optimizer.make(cfg, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["head"]["kernel"], mult * updates["lora"]["a"], rtol=1e-6)
    assert float(jnp.abs(updates["lora"]["a"]).max()) == pytest.approx(1e-2, rel=1e-3)


def test_probe_features_rows_match_the_rm_heads_own_reading(rm):
  """scripts/probe_features.py: its last-token feature of each row (computed longest-first in 64-token buckets)
  is the hidden state the RM head reads for that row, and the response mean averages only response tokens."""
  from perl_jax.analysis import feature_probe as probe
  cfg, base, _, _ = rm
  rng = np.random.default_rng(0)
  lengths = [5, 70, 12, 90, 33]
  ids = np.zeros((5, 96), np.int32)
  mask, resp = np.zeros_like(ids), np.zeros_like(ids)
  for i, n in enumerate(lengths):
    ids[i, :n], mask[i, :n], resp[i, n // 2:n] = rng.integers(3, cfg.vocab_size, n), 1, 1
  feats = probe.features(cfg, base, {"input_ids": ids, "attention_mask": mask, "response_mask": resp}, batch_size=2)
  head = heads.init_head(jax.random.key(3), cfg.hidden_size)
  hidden = np.asarray(models.forward(cfg, base, jnp.asarray(ids), jnp.asarray(mask), return_logits=False).hidden)
  np.testing.assert_allclose(heads.head_apply(head, jnp.asarray(feats[:, 0])),
                             heads.head_scores(head, jnp.asarray(hidden), jnp.asarray(mask)), atol=1e-4)
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(feats[i, 1], hidden[i, n // 2:n].mean(0), atol=1e-4)


@pytest.mark.parametrize("loss", ["bt", "bce"])
def test_microbatched_rm_step_equals_the_whole_batch(rm, loss):
  """num_microbatches = 2 (gradient accumulated over halves) gives the whole batch's update: both losses are means
  over rows (BCE's pos_weight inside the mean), so equal microbatches weigh equally."""
  cfg, base, rcfg, tr = rm
  seqs = [[5, 9, 17], [7, 8, 30], [3, 4], [9, 9, 9, 9], [11, 2, 6], [4, 4], [8, 1, 2, 3], [6, 5]]
  ids, mask = _pad(seqs, 6, "left")
  r = trained.RewardConfig(mode="lora", loss=loss, lora_cfg=rcfg.lora_cfg, pos_weight=3.0)
  if loss == "bt":
    batch = {"input_ids": ids.reshape(4, 2, 6), "attention_mask": mask.reshape(4, 2, 6)}
  else:
    batch = {"input_ids": ids, "attention_mask": mask, "label": jnp.array([1, 0, 0, 1, 0, 0, 0, 1])}
  opt = optax.sgd(1.0)  # The update is the gradient itself (Adam's first step would hide it behind g / |g|).
  state = trainer.new_state(tr, opt, jnp.zeros(2, jnp.uint32))
  out = {m: jax.jit(lambda s, x, m=m: trainer.train_step(functools.partial(reward.loss_fn, cfg, r), opt, s, base, x,
                                                         num_microbatches=m))(state, batch) for m in (1, 2)}
  np.testing.assert_allclose(float(out[2][1]["loss"]), float(out[1][1]["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(out[2][1]["grad_norm"]), float(out[1][1]["grad_norm"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out[2][0]["trainable"]), jax.tree.leaves(out[1][0]["trainable"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)  # float32 summation order
