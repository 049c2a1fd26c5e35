"""Reward-model and RL losses for PERL (Sidahmed et al. 2024, arXiv 2403.10704).

Device-side functions are pure jnp and jit-able; masks are 0/1 float or bool
arrays and every mean is over valid tokens/examples. `binary_metrics` and
`pairwise_metrics` at the bottom are host-side numpy for gathered eval arrays.
"""
import jax
import jax.numpy as jnp
import numpy as np


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


def last_valid_onehot(mask_BxT):
  """One-hot of each row's last valid position (all-zero rows stay zero)."""
  valid_BxT = mask_BxT.astype(bool)
  T = valid_BxT.shape[-1]
  last_B = T - 1 - jnp.argmax(valid_BxT[:, ::-1], axis=-1)
  return jax.nn.one_hot(last_B, T) * valid_BxT.any(-1, keepdims=True)


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


# ---------------------------------------------------------------- host metrics


def _average_ranks(x_N):
  """1-based ranks of `x_N`, tied values sharing their average rank."""
  order_N = np.argsort(x_N, kind="mergesort")
  sorted_N = x_N[order_N]
  starts = np.flatnonzero(np.r_[True, sorted_N[1:] != sorted_N[:-1]])
  ends = np.r_[starts[1:], len(x_N)]
  ranks_N = np.empty(len(x_N), np.float64)
  ranks_N[order_N] = np.repeat((starts + ends + 1) / 2, ends - starts)
  return ranks_N


def roc_auc(score_N, label_N):
  """ROC-AUC via Mann–Whitney U with average ranks for ties; nan if a class is absent."""
  score_N = np.asarray(score_N, np.float64).reshape(-1)
  pos_N = np.asarray(label_N).reshape(-1).astype(bool)
  n_pos, n_neg = int(pos_N.sum()), int((~pos_N).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  rank_sum = _average_ranks(score_N)[pos_N].sum()
  return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(score_N, label_N, threshold=0.0):
  """Accuracy, balanced accuracy (½(TPR+TNR)), ROC-AUC and positive rate of score > threshold, and the BCE
  loss of the scores as logits."""
  score_N = np.asarray(score_N, np.float64).reshape(-1)
  pos_N = np.asarray(label_N).reshape(-1).astype(bool)
  pred_N = score_N > threshold
  rates = [np.mean(pred_N[pos_N]) if pos_N.any() else np.nan,
           np.mean(~pred_N[~pos_N]) if (~pos_N).any() else np.nan]
  balanced = np.nan if np.isnan(rates).all() else np.nanmean(rates)
  return dict(
      accuracy=float(np.mean(pred_N == pos_N)) if len(pos_N) else float("nan"),
      balanced_accuracy=float(balanced),
      roc_auc=roc_auc(score_N, pos_N),
      positive_rate=float(np.mean(pred_N)) if len(pred_N) else float("nan"),
      loss=float(np.mean(np.logaddexp(0.0, score_N) - pos_N * score_N)) if len(pos_N) else float("nan"),
  )


def pairwise_metrics(r_chosen_N, r_rejected_N):
  """Preference accuracy (strict r_c > r_r), mean margin and Bradley–Terry loss."""
  margin_N = (np.asarray(r_chosen_N, np.float64).reshape(-1)
              - np.asarray(r_rejected_N, np.float64).reshape(-1))
  return dict(
      accuracy=float(np.mean(margin_N > 0)),
      mean_margin=float(np.mean(margin_N)),
      loss=float(np.mean(np.logaddexp(0.0, -margin_N))),
  )
