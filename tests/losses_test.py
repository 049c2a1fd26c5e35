"""Tests for perl_jax.losses against hand computations and plain-Python references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import losses


def _sigmoid(z):
  return 1.0 / (1.0 + math.exp(-z))


# ------------------------------------------------------------------ helpers


def test_masked_mean_hand():
  x = jnp.array([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
  m = jnp.array([[1, 1, 0], [1, 0, 0]], bool)
  assert float(losses.masked_mean(x, m)) == pytest.approx(2.0)
  np.testing.assert_allclose(losses.masked_mean(x, m, axis=1), [1.5, 3.0])
  assert float(losses.masked_mean(x, jnp.zeros_like(m))) == 0.0


def test_whiten_zero_mean_unit_var_on_valid():
  x = jnp.array([[1.0, 2.0, 3.0, 50.0], [4.0, 5.0, -7.0, 9.0]])
  m = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)
  w = np.asarray(losses.whiten(x, m))
  valid = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
  expect = (valid - valid.mean()) / valid.std()
  np.testing.assert_allclose(w[np.asarray(m) > 0], expect, rtol=1e-5)
  assert w[0, 3] == 0 and w[1, 2] == 0 and w[1, 3] == 0


# ------------------------------------------------------------------ reward model


def test_bradley_terry_hand():
  rc, rr = [2.0, -1.0, 0.5], [0.0, 1.0, 0.5]
  expect = np.mean([-math.log(_sigmoid(c - r)) for c, r in zip(rc, rr)])
  got = losses.bradley_terry_loss(jnp.array(rc), jnp.array(rr))
  assert float(got) == pytest.approx(expect, rel=1e-6)


def test_bradley_terry_large_margin_finite():
  got = losses.bradley_terry_loss(jnp.array([-200.0, 200.0]), jnp.array([200.0, -200.0]))
  assert float(got) == pytest.approx(200.0, rel=1e-6)


def test_bradley_terry_grad_vs_finite_differences():
  rc = np.array([0.3, -1.2, 2.0, 0.0])
  rr = np.array([0.1, 0.4, -0.5, 0.0])
  f = lambda c, r: float(np.mean(np.logaddexp(0.0, -(c - r))))
  g_c, g_r = jax.grad(losses.bradley_terry_loss, argnums=(0, 1))(
      jnp.array(rc, jnp.float32), jnp.array(rr, jnp.float32))
  h = 1e-5
  for i in range(len(rc)):
    e = np.eye(len(rc))[i] * h
    fd_c = (f(rc + e, rr) - f(rc - e, rr)) / (2 * h)
    fd_r = (f(rc, rr + e) - f(rc, rr - e)) / (2 * h)
    assert float(g_c[i]) == pytest.approx(fd_c, abs=1e-5)
    assert float(g_r[i]) == pytest.approx(fd_r, abs=1e-5)
    assert fd_c == pytest.approx(-fd_r)


def test_bce_vs_naive_formula():
  z, y = [0.5, -2.0, 3.0, 0.0], [1.0, 0.0, 0.0, 1.0]
  expect = np.mean([-(t * math.log(_sigmoid(s)) + (1 - t) * math.log(1 - _sigmoid(s)))
                    for s, t in zip(z, y)])
  got = losses.binary_cross_entropy_loss(jnp.array(z), jnp.array(y))
  assert float(got) == pytest.approx(expect, rel=1e-6)
  got_bool = losses.binary_cross_entropy_loss(jnp.array(z), jnp.array(y) > 0)
  assert float(got_bool) == pytest.approx(expect, rel=1e-6)


def test_bce_pos_weight_vs_naive_formula():
  z, y, w = [0.5, -2.0, 3.0, 0.0], [1.0, 0.0, 0.0, 1.0], 0.25
  expect = np.mean([-(w * t * math.log(_sigmoid(s)) + (1 - t) * math.log(1 - _sigmoid(s)))
                    for s, t in zip(z, y)])
  got = losses.binary_cross_entropy_loss(jnp.array(z), jnp.array(y), w)
  assert float(got) == pytest.approx(expect, rel=1e-6)


def test_bce_large_logits_finite():
  z = jnp.array([1000.0, -1000.0, 1000.0, -1000.0])
  y = jnp.array([1.0, 0.0, 0.0, 1.0])
  got = losses.binary_cross_entropy_loss(z, y)
  assert float(got) == pytest.approx(500.0, rel=1e-6)
  g = jax.grad(losses.binary_cross_entropy_loss)(z, y)
  assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_allclose(g, [0.0, 0.0, 0.25, -0.25], atol=1e-7)


def test_pairwise_accuracy_and_margin():
  rc, rr = jnp.array([1.0, 0.0, 2.0, 3.0]), jnp.array([0.0, 0.0, 3.0, 1.0])
  assert float(losses.pairwise_accuracy(rc, rr)) == pytest.approx(0.5)
  assert float(losses.reward_margin(rc, rr)) == pytest.approx((1 + 0 - 1 + 2) / 4)


# ------------------------------------------------------------------ KL + rewards


def test_kl_estimators_hand():
  logp = jnp.array([[-1.0, -2.0]])
  ref = jnp.array([[-1.5, -1.0]])
  d = [0.5, -1.0]
  np.testing.assert_allclose(losses.kl_divergence_estimate(logp, ref, "k1"), [d], rtol=1e-6)
  np.testing.assert_allclose(
      losses.kl_divergence_estimate(logp, ref, "k2"), [[0.5 * v * v for v in d]], rtol=1e-6)
  k3 = [math.exp(-v) - 1 + v for v in d]
  np.testing.assert_allclose(losses.kl_divergence_estimate(logp, ref, "k3"), [k3], rtol=1e-6)
  assert k3[0] > 0 and k3[1] > 0
  with pytest.raises(ValueError):
    losses.kl_divergence_estimate(logp, ref, "k4")


def test_kl_estimators_unbiased_monte_carlo():
  p, q = np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.5, 0.3])
  true_kl = float(np.sum(p * np.log(p / q)))
  logp, ref = jnp.log(jnp.array(p)), jnp.log(jnp.array(q))
  for kind in ("k1", "k3"):
    expectation = float(jnp.sum(p * losses.kl_divergence_estimate(logp, ref, kind)))
    assert expectation == pytest.approx(true_kl, rel=1e-5), kind


def test_kl_regularized_rewards_right_padding():
  reward = jnp.array([2.0, -1.0, 5.0, 7.0])
  kl = jnp.array([[0.1, 0.2, 0.3, 0.4]] * 4)
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], jnp.float32)
  beta = 0.1
  got = np.asarray(losses.kl_regularized_rewards(reward, kl, mask, beta))
  expect = np.zeros((4, 4))
  for b in range(4):
    valid = [t for t in range(4) if mask[b, t] > 0]
    for t in valid:
      expect[b, t] = -beta * float(kl[b, t])
    if valid:
      expect[b, valid[-1]] += (1 - beta) * float(reward[b])
  np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7)
  assert got[1, 1] == pytest.approx(-0.02 + 0.9 * -1.0)
  assert np.all(got[3] == 0)


def test_kl_regularized_rewards_bool_mask_jit():
  f = jax.jit(losses.kl_regularized_rewards)
  got = f(jnp.array([1.0]), jnp.zeros((1, 3)), jnp.array([[True, True, False]]), 0.0)
  np.testing.assert_allclose(got, [[0.0, 1.0, 0.0]])


# ------------------------------------------------------------------ returns / GAE

RAGGED_MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
                       np.float32)


def _random_bxt(seed, shape=RAGGED_MASK.shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _ref_returns(r, m, gamma):
  out = np.zeros_like(r, dtype=np.float64)
  for b in range(r.shape[0]):
    n = int(m[b].sum())
    for t in range(n):
      out[b, t] = sum(gamma ** (k - t) * r[b, k] for k in range(t, n))
  return out


def _ref_gae(r, v, m, gamma, lam):
  adv = np.zeros_like(r, dtype=np.float64)
  for b in range(r.shape[0]):
    n = int(m[b].sum())
    for t in range(n):
      total = 0.0
      for k in range(t, n):
        v_next = v[b, k + 1] if k + 1 < n else 0.0
        delta = r[b, k] + gamma * v_next - v[b, k]
        total += (gamma * lam) ** (k - t) * delta
      adv[b, t] = total
  return adv, (adv + v) * m


def test_discounted_returns_vs_loop():
  r = _random_bxt(0)
  got = losses.discounted_returns(jnp.array(r), jnp.array(RAGGED_MASK), 0.9)
  np.testing.assert_allclose(got, _ref_returns(r, RAGGED_MASK, 0.9), rtol=1e-5, atol=1e-6)


def test_gae_vs_double_loop_ragged():
  r, v = _random_bxt(1), _random_bxt(2)
  adv, ret = losses.gae_advantages(jnp.array(r), jnp.array(v), jnp.array(RAGGED_MASK), 0.97, 0.8)
  ref_adv, ref_ret = _ref_gae(r, v, RAGGED_MASK, 0.97, 0.8)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(adv)[RAGGED_MASK == 0] == 0)
  assert np.all(np.asarray(ret)[RAGGED_MASK == 0] == 0)


def test_gae_hand_two_steps():
  adv, _ = losses.gae_advantages(jnp.array([[1.0, 2.0, 9.0]]), jnp.array([[0.5, 1.0, 9.0]]),
                                 jnp.array([[1.0, 1.0, 0.0]]), 0.5, 0.5)
  d1 = 2.0 - 1.0
  d0 = 1.0 + 0.5 * 1.0 - 0.5
  np.testing.assert_allclose(adv, [[d0 + 0.25 * d1, d1, 0.0]], rtol=1e-6)


def test_gae_lambda_one_equals_discounted_returns():
  r, v = _random_bxt(3), _random_bxt(4)
  m = jnp.array(RAGGED_MASK)
  adv, ret = losses.gae_advantages(jnp.array(r), jnp.array(v), m, 0.9, 1.0)
  mc = losses.discounted_returns(jnp.array(r), m, 0.9)
  np.testing.assert_allclose((adv + v) * RAGGED_MASK, mc, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, mc, rtol=1e-5, atol=1e-5)


def test_gae_lambda_zero_is_td_error():
  r, v = _random_bxt(5), _random_bxt(6)
  adv, _ = losses.gae_advantages(jnp.array(r), jnp.array(v), jnp.array(RAGGED_MASK), 0.9, 0.0)
  ref_adv, _ = _ref_gae(r, v, RAGGED_MASK, 0.9, 0.0)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ policy / value


def test_reinforce_loss_value_and_grad():
  logp = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -4.0, -9.0]])
  adv = jnp.array([[1.0, -1.0, 2.0], [3.0, 5.0, 5.0]])
  m = jnp.array([[1, 1, 1], [1, 0, 0]], jnp.float32)
  expect = -(1 * -1 + -1 * -2 + 2 * -3 + 3 * -0.5) / 4
  assert float(losses.reinforce_loss(logp, adv, m)) == pytest.approx(expect)
  g_logp, g_adv = jax.grad(losses.reinforce_loss, argnums=(0, 1))(logp, adv, m)
  np.testing.assert_allclose(g_logp, -adv * m / 4)
  np.testing.assert_allclose(g_adv, 0.0)


def test_ppo_equals_reinforce_at_ratio_one():
  logp = jnp.array(_random_bxt(7)) - 2.0
  adv = jnp.array(_random_bxt(8))
  m = jnp.array(RAGGED_MASK)
  loss, met = losses.ppo_clip_loss(logp, logp, adv, m, 0.2)
  assert float(loss) == pytest.approx(-float(losses.masked_mean(adv, m)), rel=1e-6)
  assert float(met["clip_fraction"]) == 0.0
  assert float(met["approx_kl"]) == pytest.approx(0.0, abs=1e-7)
  g_ppo = jax.grad(lambda lp: losses.ppo_clip_loss(lp, logp, adv, m, 0.2)[0])(logp)
  g_rf = jax.grad(losses.reinforce_loss)(logp, adv, m)
  np.testing.assert_allclose(g_ppo, g_rf, rtol=1e-5, atol=1e-7)


def test_ppo_clipping_cases_by_hand():
  eps = 0.2
  ratios = [1.5, 1.5, 0.5, 0.5, 1.1]
  advs = [1.0, -1.0, 1.0, -1.0, 2.0]
  old = jnp.zeros((1, 5))
  logp = jnp.log(jnp.array([ratios]))
  loss, met = losses.ppo_clip_loss(logp, old, jnp.array([advs]), jnp.ones((1, 5)), eps)
  # Per token min(ρA, clip(ρ)A): 1.2, −1.5, 0.5, −0.8, 2.2.
  expect = -(1.2 - 1.5 + 0.5 - 0.8 + 2.2) / 5
  assert float(loss) == pytest.approx(expect, rel=1e-5)
  assert float(met["clip_fraction"]) == pytest.approx(4 / 5)
  k = np.mean([(r - 1) - math.log(r) for r in ratios])
  assert float(met["approx_kl"]) == pytest.approx(k, rel=1e-5)
  g = np.asarray(jax.grad(lambda lp: losses.ppo_clip_loss(lp, old, jnp.array([advs]),
                                                           jnp.ones((1, 5)), eps)[0])(logp))
  np.testing.assert_allclose(g[0, [0, 3]], 0.0, atol=1e-7)
  np.testing.assert_allclose(g[0, [1, 2, 4]], [1.5 * 1 / 5, -0.5 / 5, -1.1 * 2 / 5], rtol=1e-5)


def test_ppo_ignores_padding():
  logp = jnp.array([[0.0, 5.0]])
  loss, met = losses.ppo_clip_loss(logp, jnp.zeros((1, 2)), jnp.array([[1.0, 100.0]]),
                                   jnp.array([[1.0, 0.0]]), 0.2)
  assert float(loss) == pytest.approx(-1.0)
  assert float(met["clip_fraction"]) == 0.0


def test_value_loss_plain_and_clipped_by_hand():
  v = jnp.array([[1.0, 2.0, 3.0, 100.0]])
  ret = jnp.array([[0.0, 2.5, 3.0, 0.0]])
  m = jnp.array([[1.0, 1.0, 1.0, 0.0]])
  assert float(losses.value_loss(v, ret, m)) == pytest.approx(0.5 * (1 + 0.25 + 0) / 3)
  old = jnp.array([[0.5, 1.0, 2.5, 0.0]])
  # Clipped to old ± 0.2: 0.7, 1.2, 2.7 → sq err 0.49, 1.69, 0.09; max with 1, .25, 0.
  got = losses.value_loss(v, ret, m, old_values_BxT=old, clip_eps=0.2)
  assert float(got) == pytest.approx(0.5 * (1 + 1.69 + 0.09) / 3, rel=1e-5)
  with pytest.raises(ValueError):
    losses.value_loss(v, ret, m, clip_eps=0.2)


def test_losses_jit():
  m = jnp.array(RAGGED_MASK)
  r, v = jnp.array(_random_bxt(9)), jnp.array(_random_bxt(10))
  adv, ret = jax.jit(losses.gae_advantages)(r, v, m, 0.99, 0.95)
  eager = losses.gae_advantages(r, v, m, 0.99, 0.95)
  np.testing.assert_allclose(adv, eager[0], rtol=1e-6)
  kl = jax.jit(losses.kl_divergence_estimate, static_argnames="kind")(r, v, kind="k3")
  assert kl.shape == r.shape
