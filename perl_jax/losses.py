"""Reward-model and RL losses for PERL (Sidahmed et al. 2024, arXiv 2403.10704).

Pure jnp and jit-able; masks are 0/1 float or bool arrays and every mean is over
valid tokens/examples. Host-side eval metrics live in `perl_jax.stats`.
"""
import jax
import jax.numpy as jnp


def masked_mean(x, mask, axis=None):
  """Masked mean Σ m·x / max(Σ m, 1) over `axis` (all axes if None): the mean over valid entries, 0 if none."""
  mask = mask.astype(x.dtype)
  return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1)


def whiten(x, mask, shift_mean=True, eps=1e-8):
  """Advantage whitening: x̂ = m·(x − μ)/√(σ² + ε), with μ and σ² the masked mean and variance of x.

  `shift_mean=False` adds μ back, m·((x − μ)/√(σ² + ε) + μ), keeping the mean (TRL's convention for
  rewards); padded entries (m = 0) give 0.
  """
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask.astype(x.dtype)


# ---------------------------------------------------------------- reward model


def bradley_terry_loss(r_chosen_B, r_rejected_B):
  """Bradley–Terry pairwise RM loss: L = −(1/B) Σ_b log σ(r_c,b − r_r,b).

  r_c, r_r: rewards of the chosen and rejected response of pair b; σ the logistic sigmoid, so
  σ(r_c − r_r) = P(chosen ≻ rejected) under the Bradley–Terry model.
  """
  return -jnp.mean(jax.nn.log_sigmoid(r_chosen_B - r_rejected_B))


def binary_cross_entropy_loss(logit_B, label_B, pos_weight=1.0):
  """Binary cross-entropy RM loss: L = −(1/B) Σ_b [w₊ y_b log σ(z_b) + (1 − y_b) log σ(−z_b)].

  z: reward logit, y ∈ {0, 1} (thumbs up/down) or a soft label in [0, 1]; log σ keeps it stable for large |z|.
  w₊ (pos_weight, PyTorch's BCEWithLogits convention) weighs the positive term: n_neg / n_pos balances classes.
  """
  label_B = label_B.astype(logit_B.dtype)
  return -jnp.mean(pos_weight * label_B * jax.nn.log_sigmoid(logit_B)
                   + (1 - label_B) * jax.nn.log_sigmoid(-logit_B))


def pairwise_accuracy(r_chosen_B, r_rejected_B):
  """Fraction of pairs where the chosen reward is strictly higher (ties count 0)."""
  return jnp.mean((r_chosen_B > r_rejected_B).astype(jnp.float32))


def reward_margin(r_chosen_B, r_rejected_B):
  """Mean reward margin (1/B) Σ_b (r_c,b − r_r,b)."""
  return jnp.mean(r_chosen_B - r_rejected_B)


# ---------------------------------------------------------------- KL + rewards


def kl_divergence_estimate(logp_BxT, ref_logp_BxT, kind="k1"):
  """Per-token estimate of KL(π‖π_ref) from tokens y_t ~ π (Schulman's k1/k2/k3).

  With log-ratio r_t = log π_ref(y_t|·) − log π(y_t|·):
    k1 = −r_t                   unbiased, can be negative;
    k2 = ½·r_t²                 biased, low variance, ≥ 0;
    k3 = (e^{r_t} − 1) − r_t    unbiased, low variance, ≥ 0.
  """
  log_ratio = ref_logp_BxT - logp_BxT
  if kind == "k1":
    return -log_ratio
  if kind == "k2":
    return 0.5 * jnp.square(log_ratio)
  if kind == "k3":
    return jnp.expm1(log_ratio) - log_ratio
  raise ValueError(f"Unknown KL estimator kind {kind!r}; expected k1, k2 or k3.")


def token_logprobs(logits_BxTxV, ids_BxT, temperature: float = 1.0):
  """logp_Bx(T-1)[b, t] = log_softmax(logits[b, t] / temperature)[ids[b, t+1]], in float32: the log-probability
  of each next token. The one definition SFT and the RL learner (at the sampling temperature) share."""
  z_BxTxV = logits_BxTxV[:, :-1].astype(jnp.float32) / temperature
  picked_BxT = jnp.take_along_axis(z_BxTxV, ids_BxT[:, 1:, None], axis=-1)[..., 0]
  return picked_BxT - jax.nn.logsumexp(z_BxTxV, axis=-1)


def last_token_index(mask_BxT):
  """Index of each row's last valid (non-pad) position, right or left padding alike; −1 for an empty row."""
  t_T = jnp.arange(mask_BxT.shape[-1])
  return jnp.max(jnp.where(mask_BxT.astype(bool), t_T, -1), axis=-1)


def last_valid_onehot(mask_BxT):
  """One-hot of each row's last valid position (all-zero rows stay zero)."""
  return jax.nn.one_hot(last_token_index(mask_BxT), mask_BxT.shape[-1])


def kl_regularized_rewards(reward_B, kl_BxT, mask_BxT, kl_coef):
  """Per-token rewards of the PERL objective (1 − β)·r(x, y) − β·KL(π‖π_anchor), π_anchor the SFT policy.

  r̃_t = −β·k_t·m_t + (1 − β)·r(x, y)·1[t = t_last], with k_t a per-token KL estimate
  (`kl_divergence_estimate`), β = `kl_coef`, m_t the response mask and t_last the row's last valid token;
  summed over t this is (1 − β)·r − β·Σ_t k_t.
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
  """Discounted returns G_t = m_t·(r_t + γ·G_{t+1}), G_T = 0.

  Where valid tokens are contiguous, G_t = Σ_{k≥t} γ^{k−t}·r_k over them. r_t: per-token reward, m_t: valid-token
  mask, γ = `gamma`; padded positions give 0.
  """
  mask_BxT = mask_BxT.astype(rewards_BxT.dtype)

  def step(next_return_B, x):
    r_B, m_B = x
    ret_B = m_B * (r_B + gamma * next_return_B)
    return ret_B, ret_B

  init_B = jnp.zeros(rewards_BxT.shape[:1], rewards_BxT.dtype)
  return _reverse_scan_BxT(step, init_B, rewards_BxT, mask_BxT)


def gae_advantages(rewards_BxT, values_BxT, mask_BxT, gamma, lam):
  """Generalized advantage estimation (Schulman et al. 2016), computed backwards from t = T − 1:

    δ_t = r_t + γ·V_{t+1} − V_t,   A_t = m_t·(δ_t + γ·λ·A_{t+1}),   R_t = A_t + V_t,

  i.e. A_t = Σ_{k≥t} (γλ)^{k−t}·δ_k. r_t: per-token reward, V_t: value estimate, m_t: valid-token mask,
  γ = `gamma`, λ = `lam`. V and A after the last valid token are 0. Returns (A, R) [B,T]; pads give 0.
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


def rloo_advantages(returns_G, k: int):
  """REINFORCE leave-one-out (Ahmadian et al. 2024): A_i = R_i − (1/(k−1))·Σ_{j≠i} R_j = k/(k−1)·(R_i − R̄).

  R: per-sample returns [B·k], each prompt's k samples contiguous (rows b·k … b·k+k−1); R̄ the prompt's mean.
  The baseline of sample i never sees R_i, so the gradient estimate stays unbiased. Returns [B·k].
  """
  r_BxK = returns_G.reshape(-1, k)
  baseline_BxK = (jnp.sum(r_BxK, axis=1, keepdims=True) - r_BxK) / (k - 1)
  return (r_BxK - baseline_BxK).reshape(-1)


def grpo_advantages(returns_G, k: int, eps: float = 1e-6):
  """GRPO's group-normalised advantage (Shao et al. 2024): A_i = (R_i − mean_g R) / (std_g R + ε).

  R: per-sample returns [B·k], each prompt's k samples contiguous; mean and (population) std over the
  prompt's k samples, ε = `eps`. A group whose samples tie gets 0. Returns [B·k].
  """
  r_BxK = returns_G.reshape(-1, k)
  mean_Bx1 = jnp.mean(r_BxK, axis=1, keepdims=True)
  std_Bx1 = jnp.std(r_BxK, axis=1, keepdims=True)
  return ((r_BxK - mean_Bx1) / (std_Bx1 + eps)).reshape(-1)


# ---------------------------------------------------------------- policy / value


def reinforce_loss(logp_BxT, advantages_BxT, mask_BxT):
  """REINFORCE with baseline: L = −Σ_t m_t·sg(A_t)·log π(y_t | x, y_<t) / Σ_t m_t.

  A_t = G_t − b_t: return minus a baseline (e.g. a value estimate, or GAE advantages); sg = stop-gradient,
  m_t the valid-token mask. −∇L is the policy-gradient estimate mean_t A_t·∇ log π(y_t|·).
  """
  adv_BxT = jax.lax.stop_gradient(advantages_BxT)
  return -masked_mean(adv_BxT * logp_BxT, mask_BxT)


def ppo_clip_loss(logp_BxT, old_logp_BxT, advantages_BxT, mask_BxT, clip_eps):
  """PPO clipped surrogate: L = −mean_t min(ρ_t·A_t, clip(ρ_t, 1 − ε, 1 + ε)·A_t) over valid tokens.

  ρ_t = π(y_t|·)/π_old(y_t|·) = exp(log π − log π_old), A_t: advantages (stop-gradient), ε = `clip_eps`.
  Also returns metrics clip_fraction = mean 1[|ρ_t − 1| > ε] and approx_kl = mean[(ρ_t − 1) − log ρ_t]
  ≈ KL(π_old‖π) (the k3 estimator).
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
  """Value loss L = ½·mean_t (V_t − R_t)² over valid tokens; with `clip_eps`, PPO's pessimistic clipped form

    L = ½·mean_t max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, −ε, ε) − R_t)²).

  V: predicted values, R: return targets (stop-gradient), V_old: values at rollout time, ε = `clip_eps`.
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
