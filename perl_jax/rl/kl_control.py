"""The KL coefficient β between rollouts: fixed, or Ziegler et al. (2019)'s adaptive proportional controller."""
import jax.numpy as jnp


def adaptive_kl_coef(kl_coef, kl, target: float, horizon: int):
  """β ← β·(1 + clip(KL/KL_target − 1, −0.2, 0.2)/H), KL the mean per-sequence KL of the batch, H = horizon in
  RL steps. Ziegler et al. write n/H with n samples per step and H = 10,000 samples; at their 512 samples a step
  that is ≤ 1% a step, which H = 20 RL steps keeps at any batch size (the sample count left β fixed at B = 8)."""
  error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
  return kl_coef * (1.0 + error / horizon)


def next_kl_coef(rlcfg, kl_coef, kl):
  """β for the next rollout: unchanged when rlcfg.kl_target is None, else the adaptive update."""
  if rlcfg.kl_target is None:
    return kl_coef
  return adaptive_kl_coef(kl_coef, kl, rlcfg.kl_target, rlcfg.kl_horizon)
