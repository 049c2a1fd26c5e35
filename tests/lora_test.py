"""LoRA: zero-init is exact, merge equals the adapter path, gradients match finite differences."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perl_jax import lora, models
from tests.helpers import random_batch, tiny_config


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(0))
  ids, mask = random_batch(0, 2, 8, cfg.vocab_size, left_pad=(0, 3))
  return cfg, params, ids, mask


def _randomize_b(lora_params, seed=1):
  leaves, treedef = jax.tree.flatten(lora_params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_fresh_adapter_gives_base_logits_exactly(setup):
  cfg, params, ids, mask = setup
  lcfg = lora.LoraConfig(rank=4, alpha=8)
  lp = lora.init(jax.random.key(1), params, lcfg)
  base = models.forward(cfg, params, ids, mask).logits
  with_lora = models.forward(cfg, params, ids, mask, adapters=[(lp, lora.scale(lcfg))]).logits
  np.testing.assert_array_equal(np.asarray(base), np.asarray(with_lora))


def test_init_shapes_and_targets(setup):
  cfg, params, _, _ = setup
  lp = lora.init(jax.random.key(1), params, lora.LoraConfig(rank=3))
  assert set(lp["layers"]["attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
  assert lp["layers"]["attn"]["k_proj"]["a"].shape == (2, 64, 3)
  assert lp["layers"]["attn"]["k_proj"]["b"].shape == (2, 3, 32)
  assert not np.any(np.asarray(lp["layers"]["attn"]["q_proj"]["b"]))
  with pytest.raises(ValueError, match="match no parameter"):
    lora.init(jax.random.key(1), params, lora.LoraConfig(targets=(r"nothing",)))
  with pytest.raises(ValueError, match="must select layer kernels"):
    lora.init(jax.random.key(1), params, lora.LoraConfig(targets=(r"embed/embedding",)))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_merged_forward_equals_adapter_forward(family):
  cfg = tiny_config(family)
  params = models.init_params(cfg, jax.random.key(0))
  ids, mask = random_batch(0, 2, 8, cfg.vocab_size, left_pad=(0, 2))
  lcfg = lora.LoraConfig(rank=4, alpha=8, targets=lora.ATTENTION_MLP)
  lp = _randomize_b(lora.init(jax.random.key(1), params, lcfg))
  s = lora.scale(lcfg)
  adapter = models.forward(cfg, params, ids, mask, adapters=[(lp, s)]).logits
  merged = models.forward(cfg, lora.merge(params, lp, s), ids, mask).logits
  np.testing.assert_allclose(np.asarray(adapter), np.asarray(merged), atol=2e-5)
  assert not np.allclose(np.asarray(adapter), np.asarray(models.forward(cfg, params, ids, mask).logits), atol=1e-3)
  restored = lora.unmerge(lora.merge(params, lp, s), lp, s)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), params, restored)


def test_two_adapter_sets_add(setup):
  cfg, params, ids, mask = setup
  lcfg = lora.LoraConfig(rank=2, alpha=4)
  l1 = _randomize_b(lora.init(jax.random.key(1), params, lcfg), 2)
  l2 = _randomize_b(lora.init(jax.random.key(2), params, lcfg), 3)
  s = lora.scale(lcfg)
  both = models.forward(cfg, params, ids, mask, adapters=[(l1, s), (l2, s)]).logits
  merged = models.forward(cfg, lora.merge(lora.merge(params, l1, s), l2, s), ids, mask).logits
  np.testing.assert_allclose(np.asarray(both), np.asarray(merged), atol=2e-5)


def test_gradient_matches_finite_differences(setup):
  cfg, params, ids, mask = setup
  cfg64 = dataclasses.replace(cfg, dtype="float64", attention="einsum")
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    lp = jax.tree.map(lambda x: x.astype(jnp.float64),
                      _randomize_b(lora.init(jax.random.key(1), params, lora.LoraConfig(rank=2))))
    targets = jnp.roll(ids, -1, axis=1)

    def loss(lp):
      logits = models.forward(cfg64, p64, ids, mask, adapters=[(lp, 2.0)]).logits.astype(jnp.float64)
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

    grad = jax.grad(loss)(lp)
    leaves, treedef = jax.tree.flatten(lp)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    direction = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, jnp.float64) for k, x in zip(keys, leaves)])
    eps = 1e-5
    plus = loss(jax.tree.map(lambda x, d: x + eps * d, lp, direction))
    minus = loss(jax.tree.map(lambda x, d: x - eps * d, lp, direction))
    fd = (plus - minus) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    assert abs(float(fd - analytic)) <= 1e-6 * max(1.0, abs(float(analytic))), (fd, analytic)


def test_optimizer_state_holds_only_adapter_sized_arrays(setup):
  cfg, params, ids, mask = setup
  lcfg = lora.LoraConfig(rank=2)
  lp = lora.init(jax.random.key(1), params, lcfg)
  opt = optax.adamw(1e-3)
  state = opt.init(lp)
  base_bytes = min(x.size for x in jax.tree.leaves(params["layers"]["attn"]))
  assert all(x.size < base_bytes for x in jax.tree.leaves(state))

  @jax.jit
  def step(lp, state):
    def loss(lp):
      return jnp.mean(models.forward(cfg, params, ids, mask, adapters=[(lp, lora.scale(lcfg))]).logits ** 2)
    g = jax.grad(loss)(lp)
    updates, state = opt.update(g, state, lp)
    return optax.apply_updates(lp, updates), state

  new_lp, new_state = step(lp, state)
  assert jax.tree.structure(new_lp) == jax.tree.structure(lp)
  assert all(x.size < base_bytes for x in jax.tree.leaves(new_state))
  assert np.any(np.asarray(new_lp["layers"]["attn"]["q_proj"]["b"]))


def test_bf16_base_with_fp32_adapters(setup):
  cfg, params, ids, mask = setup
  cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  lp = lora.init(jax.random.key(1), params, lora.LoraConfig(rank=2))
  g = jax.grad(lambda lp: jnp.mean(models.forward(cfg16, p16, ids, mask, adapters=[(lp, 1.0)]).logits))(lp)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g))
  assert np.all(np.isfinite(np.asarray(g["layers"]["attn"]["q_proj"]["b"])))


def test_trainable_count_matches_closed_form():
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(0))
  for lcfg in [lora.LoraConfig(rank=1), lora.LoraConfig(rank=16, targets=lora.ATTENTION_MLP)]:
    lp = lora.init(jax.random.key(1), params, lcfg)
    # q,o: 64->64; k,v: 64->32; per layer r*(in+out).
    by_hand = 2 * lcfg.rank * ((64 + 64) * 2 + (64 + 32) * 2)
    if lcfg.targets == lora.ATTENTION_MLP:
      by_hand += 2 * lcfg.rank * (64 + 128) * 3
    assert models.count_params(lp) == by_hand == lora.closed_form_count(cfg, lcfg)
  text = lora.summary(params, lp)
  assert text.startswith(f"trainable params: {by_hand:,} || all params: {models.count_params(params) + by_hand:,}")


def _members(params, k=3, rank=2, seed=0):
  """k adapters with random A and B (B nonzero), as K independently trained members would be."""
  cfg = lora.LoraConfig(rank=rank, alpha=4.0)
  keys = jax.random.split(jax.random.key(seed), 2 * k)
  trees = [lora.init(keys[2 * i], params, cfg) for i in range(k)]
  return [jax.tree.map(lambda x, key=keys[2 * i + 1]: x + 0.1 * jax.random.normal(key, x.shape), t)
          for i, t in enumerate(trees)]


def test_average_is_the_exact_mean_of_the_updates_as_one_rank_kr_adapter(setup):
  """The rank-K·r adapter's update equals the dense mean of the members' updates (numpy, ≤ 1e-5); with it the model
  gives the logits of the base with the mean update merged."""
  cfg, params, ids, mask = setup
  trees, scales = _members(params), (2.0, 1.0, 0.5)
  avg = lora.average(trees, scales)
  for path in ("q_proj", "k_proj", "v_proj", "o_proj"):
    a = np.asarray(avg["layers"]["attn"][path]["a"])
    b = np.asarray(avg["layers"]["attn"][path]["b"])
    assert a.shape[-1] == b.shape[-2] == 3 * 2
    dense = np.mean([s * np.einsum("lir,lro->lio", np.asarray(t["layers"]["attn"][path]["a"]),
                                   np.asarray(t["layers"]["attn"][path]["b"])) for t, s in zip(trees, scales)], 0)
    np.testing.assert_allclose(np.einsum("lir,lro->lio", a, b), dense, atol=1e-5)
  merged = params
  for t, s in zip(trees, scales):
    merged = lora.merge(merged, t, s / 3)  # the mean update, merged member by member
  want = models.forward(cfg, merged, ids, mask).logits
  got = models.forward(cfg, params, ids, mask, adapters=[(avg, 1.0)]).logits
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


def test_factor_average_differs_from_the_exact_average_by_the_cross_terms(setup):
  """mean(A)·mean(B) carries the cross terms: its error against the exact mean is measured, and is 0 for equal
  members (then both averages are the member itself)."""
  _, params, _, _ = setup
  trees = _members(params)
  errors = lora.factor_average_error(trees, 2.0)
  assert set(errors) == {f"layers/attn/{p}_proj" for p in "qkvo"} and all(e > 0.1 for e in errors.values())
  same = [trees[0]] * 3
  assert all(e < 1e-6 for e in lora.factor_average_error(same, 2.0).values())
  fa = lora.factor_average(trees)
  a = [np.asarray(t["layers"]["attn"]["q_proj"]["a"]) for t in trees]
  np.testing.assert_allclose(np.asarray(fa["layers"]["attn"]["q_proj"]["a"]), np.mean(a, 0), atol=1e-7)


def test_average_refuses_empty_and_mismatched_members(setup):
  _, params, _, _ = setup
  trees = _members(params, k=2)
  with pytest.raises(ValueError, match="empty list"):
    lora.average([], [])
  other = lora.init(jax.random.key(9), params, lora.LoraConfig(rank=3))
  with pytest.raises(ValueError, match="adapter 1 does not match adapter 0"):
    lora.average([trees[0], other], [1.0, 1.0])
  with pytest.raises(ValueError, match="2 scales for 3 adapters"):
    lora.average(trees + trees[:1], [1.0, 1.0])
