"""Reward-model and RL losses for PERL (Sidahmed et al. 2024, arXiv 2403.10704).

Pure jnp and jit-able; masks are 0/1 float or bool arrays and every mean is over
valid tokens/examples. Host-side eval metrics live in `perl_jax.evaluation`.
"""
import jax
import jax.numpy as jnp


def masked_mean(x, mask, axis=None):
  """Mean of `x` over entries where `mask` is set; 0 where nothing is valid."""
  mask = mask.astype(x.dtype)
  return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1)


def whiten(x, mask, shift_mean=True, eps=1e-8):
  """Normalise `x` to zero mean, unit variance over valid entries (advantage norm)."""
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask.astype(x.dtype)


# ---------------------------------------------------------------- reward model


def bradley_terry_loss(r_chosen_B, r_rejected_B):
  """Pairwise RM loss: mean −log σ(r_c − r_r) (Bradley–Terry likelihood)."""
  return -jnp.mean(jax.nn.log_sigmoid(r_chosen_B - r_rejected_B))


def binary_cross_entropy_loss(logit_B, label_B):
  """Pointwise RM loss: mean −[y log σ(z) + (1−y) log σ(−z)], stable for large |z|."""
  label_B = label_B.astype(logit_B.dtype)
  return -jnp.mean(label_B * jax.nn.log_sigmoid(logit_B)
                   + (1 - label_B) * jax.nn.log_sigmoid(-logit_B))


def pairwise_accuracy(r_chosen_B, r_rejected_B):
  """Fraction of pairs where the chosen reward is strictly higher (ties count 0)."""
  return jnp.mean((r_chosen_B > r_rejected_B).astype(jnp.float32))


def reward_margin(r_chosen_B, r_rejected_B):
  """Mean reward margin r_c − r_r."""
  return jnp.mean(r_chosen_B - r_rejected_B)


# ---------------------------------------------------------------- KL + rewards


def kl_divergence_estimate(logp_BxT, ref_logp_BxT, kind="k1"):
  """Per-token estimate of KL(π‖π_ref) from samples y ~ π (Schulman's k1/k2/k3).

  With r = log π_ref − log π: k1 = −r, k2 = ½r², k3 = eʳ − 1 − r (unbiased, ≥ 0).
  """
  log_ratio = ref_logp_BxT - logp_BxT
  if kind == "k1":
    return -log_ratio
  if kind == "k2":
    return 0.5 * jnp.square(log_ratio)
  if kind == "k3":
    return jnp.expm1(log_ratio) - log_ratio
  raise ValueError(f"Unknown KL estimator kind {kind!r}; expected k1, k2 or k3.")


def last_token_index(mask_BxT):
  """Index of each row's last valid (non-pad) position, right or left padding alike; −1 for an empty row."""
  t_T = jnp.arange(mask_BxT.shape[-1])
  return jnp.max(jnp.where(mask_BxT.astype(bool), t_T, -1), axis=-1)


def last_valid_onehot(mask_BxT):
  """One-hot of each row's last valid position (all-zero rows stay zero)."""
  return jax.nn.one_hot(last_token_index(mask_BxT), mask_BxT.shape[-1])


def kl_regularized_rewards(reward_B, kl_BxT, mask_BxT, kl_coef):
  """Per-token rewards for the PERL objective (1−β)·r(x,y) − β·KL(π‖π_SFT).

  Each valid token gets −β·kl_t; (1−β)·r is added at the row's last valid token.
  """
  mask_BxT = mask_BxT.astype(kl_BxT.dtype)
  terminal_BxT = last_valid_onehot(mask_BxT).astype(kl_BxT.dtype)
  return (-kl_coef * kl_BxT * mask_BxT
          + (1 - kl_coef) * reward_B[:, None] * terminal_BxT)


# ---------------------------------------------------------------- returns / GAE


def _reverse_scan_BxT(step_fn, init_B, *xs_BxT):
  """Run `step_fn` from t=T−1 down to 0 over [B,T] inputs; returns [B,T] outputs."""
  xs_TxB = tuple(x.T for x in xs_BxT)
  _, ys_TxB = jax.lax.scan(step_fn, init_B, xs_TxB, reverse=True)
  return jax.tree_util.tree_map(lambda y: y.T, ys_TxB)


def discounted_returns(rewards_BxT, mask_BxT, gamma):
  """G_t = m_t·(r_t + γ·G_{t+1}), G_T = 0; padded positions give 0."""
  mask_BxT = mask_BxT.astype(rewards_BxT.dtype)

  def step(next_return_B, x):
    r_B, m_B = x
    ret_B = m_B * (r_B + gamma * next_return_B)
    return ret_B, ret_B

  init_B = jnp.zeros(rewards_BxT.shape[:1], rewards_BxT.dtype)
  return _reverse_scan_BxT(step, init_B, rewards_BxT, mask_BxT)


def gae_advantages(rewards_BxT, values_BxT, mask_BxT, gamma, lam):
  """GAE (Schulman et al. 2016): δ_t = r_t + γV_{t+1} − V_t, A_t = δ_t + γλA_{t+1}.

  V and A after the last valid token are 0; returns R_t = A_t + V_t; pads give 0.
  """
  mask_BxT = mask_BxT.astype(rewards_BxT.dtype)
  values_BxT = values_BxT.astype(rewards_BxT.dtype)

  def step(carry, x):
    next_adv_B, next_value_B = carry
    r_B, v_B, m_B = x
    delta_B = r_B + gamma * next_value_B - v_B
    adv_B = m_B * (delta_B + gamma * lam * next_adv_B)
    return (adv_B, m_B * v_B), adv_B

  zeros_B = jnp.zeros(rewards_BxT.shape[:1], rewards_BxT.dtype)
  adv_BxT = _reverse_scan_BxT(step, (zeros_B, zeros_B),
                              rewards_BxT, values_BxT, mask_BxT)
  return adv_BxT, (adv_BxT + values_BxT) * mask_BxT


# ---------------------------------------------------------------- policy / value


def reinforce_loss(logp_BxT, advantages_BxT, mask_BxT):
  """REINFORCE with baseline: −mean_t sg(A_t)·log π(y_t|·) over valid tokens."""
  adv_BxT = jax.lax.stop_gradient(advantages_BxT)
  return -masked_mean(adv_BxT * logp_BxT, mask_BxT)


def ppo_clip_loss(logp_BxT, old_logp_BxT, advantages_BxT, mask_BxT, clip_eps):
  """PPO clipped surrogate: −mean min(ρA, clip(ρ, 1−ε, 1+ε)A), ρ = π/π_old.

  Also returns clip_fraction and approx_kl = mean[(ρ−1) − log ρ] ≈ KL(π_old‖π).
  """
  adv_BxT = jax.lax.stop_gradient(advantages_BxT)
  log_ratio_BxT = logp_BxT - jax.lax.stop_gradient(old_logp_BxT)
  ratio_BxT = jnp.exp(log_ratio_BxT)
  clipped_BxT = jnp.clip(ratio_BxT, 1 - clip_eps, 1 + clip_eps)
  surrogate_BxT = jnp.minimum(ratio_BxT * adv_BxT, clipped_BxT * adv_BxT)
  loss = -masked_mean(surrogate_BxT, mask_BxT)
  metrics = dict(
      clip_fraction=masked_mean(
          (jnp.abs(ratio_BxT - 1) > clip_eps).astype(logp_BxT.dtype), mask_BxT),
      approx_kl=masked_mean(
          jax.lax.stop_gradient(jnp.expm1(log_ratio_BxT) - log_ratio_BxT),
          mask_BxT),
  )
  return loss, metrics


def value_loss(values_BxT, returns_BxT, mask_BxT, old_values_BxT=None,
               clip_eps=None):
  """½·mean (V − R)² over valid tokens; with `clip_eps`, PPO's pessimistic clipped form.

  Clipped: ½·mean max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²).
  """
  returns_BxT = jax.lax.stop_gradient(returns_BxT)
  err_BxT = jnp.square(values_BxT - returns_BxT)
  if clip_eps is not None:
    if old_values_BxT is None:
      raise ValueError("Value clipping needs old_values_BxT.")
    old_BxT = jax.lax.stop_gradient(old_values_BxT)
    clipped_BxT = old_BxT + jnp.clip(values_BxT - old_BxT, -clip_eps, clip_eps)
    err_BxT = jnp.maximum(err_BxT, jnp.square(clipped_BxT - returns_BxT))
  return 0.5 * masked_mean(err_BxT, mask_BxT)
