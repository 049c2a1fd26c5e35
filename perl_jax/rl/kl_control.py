"""The KL coefficient β between rollouts: fixed, or Ziegler et al. (2019)'s adaptive proportional controller."""
import jax.numpy as jnp


def adaptive_kl_coef(kl_coef, kl, target: float, n_steps, horizon: int):
  """β ← β·(1 + clip(KL/KL_target − 1, −0.2, 0.2)·n/horizon), KL the mean per-sequence KL of the batch."""
  error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
  return kl_coef * (1.0 + error * n_steps / horizon)


def next_kl_coef(rlcfg, kl_coef, kl, n_steps):
  """β for the next rollout: unchanged when rlcfg.kl_target is None, else the adaptive update."""
  if rlcfg.kl_target is None:
    return kl_coef
  return adaptive_kl_coef(kl_coef, kl, rlcfg.kl_target, n_steps, rlcfg.kl_horizon)
