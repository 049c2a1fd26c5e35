"""The learner: REINFORCE / RLOO / GRPO or PPO losses over a rollout batch, and the jitted update
(epochs × minibatches, each accumulating rl.num_microbatches).

loss_fn(trainable, frozen, batch, rng) -> (loss, metrics) follows the project's convention (bind model_cfg
and rlcfg with functools.partial); only trainable = {policy[, value]} is differentiated. Log-probs and values
are recomputed here at the sampling temperature; the rollout's old_logp / old_values are constants. During the
first rl.value_warmup_steps RL steps the policy loss is off (policy_on_B = 0), so only the value role learns.
"""
import functools

import jax
import jax.numpy as jnp

from perl_jax import losses, sharding, trainer
from perl_jax.rl import kl_control, roles, rollout


def explained_variance(values_BxN, returns_BxN, mask_BxN):
  """1 − Var[R − V] / Var[R] over valid tokens (1: perfect value function, 0: no better than a constant)."""
  var = lambda x: losses.masked_mean(jnp.square(x - losses.masked_mean(x, mask_BxN)), mask_BxN)
  return 1.0 - var(returns_BxN - values_BxN) / jnp.maximum(var(returns_BxN), 1e-8)


def loss_fn(model_cfg, rlcfg, trainable, frozen, batch, rng=None):
  """REINFORCE / RLOO / GRPO: −mean sg(A)·log π (+ c_v·½(V − G)² with a value role); PPO: clipped surrogate +
  c_v·(optionally clipped) value loss. The policy term is multiplied by batch["policy_on_B"] (0 in warm-up)."""
  del rng
  prompt_len = batch["prompt_BxP"].shape[1]
  ids, mask = roles.sequence(batch["prompt_BxP"], batch["prompt_mask_BxP"], batch["tokens_BxN"], batch["mask_BxN"])
  m_BxN = batch["mask_BxN"].astype(jnp.float32)
  logp_BxN, entropy_BxN = roles.policy_logprobs(model_cfg, rlcfg, trainable, frozen, ids, mask, prompt_len)
  adv_BxN = batch["advantages_BxN"]
  surrogate, ratio_metrics = losses.ppo_clip_loss(logp_BxN, batch["old_logp_BxN"], adv_BxN, m_BxN, rlcfg.clip_eps)
  policy_loss = surrogate if rlcfg.algorithm == "ppo" else losses.reinforce_loss(logp_BxN, adv_BxN, m_BxN)
  metrics = {}
  if rlcfg.uses_value:
    values_BxN = roles.values(model_cfg, rlcfg, trainable, frozen, ids, mask, prompt_len)
    clip = rlcfg.value_clip_eps if rlcfg.algorithm == "ppo" else None
    value_loss = losses.value_loss(values_BxN, batch["returns_BxN"], m_BxN, batch["old_values_BxN"], clip)
    metrics.update(explained_variance=explained_variance(values_BxN, batch["returns_BxN"], m_BxN),
                   value_mean=losses.masked_mean(values_BxN, m_BxN))
  else:
    value_loss = jnp.zeros((), jnp.float32)
  policy_on = jnp.max(batch["policy_on_B"]) if "policy_on_B" in batch else 1.0
  loss = policy_on * policy_loss + rlcfg.vf_coef * value_loss
  log_ratio_BxN = jax.lax.stop_gradient(logp_BxN - batch["old_logp_BxN"])
  metrics.update({"loss": loss, "policy_loss": policy_loss, "value_loss": value_loss,
                  "entropy": losses.masked_mean(entropy_BxN, m_BxN),
                  "max_abs_log_ratio": jnp.max(jnp.abs(log_ratio_BxN) * m_BxN), **ratio_metrics})
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def minibatch_indices(rng, batch_size: int, epochs: int, num_minibatches: int):
  """[epochs·M, B/M] row indices: each epoch a fresh permutation of the batch cut into M minibatches."""
  if batch_size % num_minibatches:
    raise ValueError(f"rollout batch {batch_size} is not divisible into {num_minibatches} minibatches")
  perms = [jax.random.permutation(jax.random.fold_in(rng, e), batch_size) for e in range(epochs)]
  return jnp.stack(perms).reshape(epochs * num_minibatches, batch_size // num_minibatches)


def _valid_tokens(batch):
  return jnp.sum(batch["mask_BxN"].astype(jnp.float32))


def update(loss_fn_, optimizer, rlcfg, state, frozen, batch):
  """One RL step's learning: epochs × minibatches of trainer.train_step over the rollout batch (a scan; each
  update accumulates rl.num_microbatches, weighted by valid tokens, so it equals one big batch), then β for the
  next rollout. state["step"] advances by one per rollout; metrics are stacked [epochs·M]."""
  rng = jax.random.fold_in(trainer.step_rng(state), 1)
  b = batch["tokens_BxN"].shape[0]
  policy_on = (state["step"] >= rlcfg.value_warmup_steps).astype(jnp.float32)
  batch = {**batch, "policy_on_B": jnp.full((b,), policy_on)}
  if rlcfg.num_updates == 1:
    idx_UxM = jnp.arange(b)[None]
  else:
    idx_UxM = minibatch_indices(rng, b, rlcfg.ppo_epochs, rlcfg.num_minibatches)

  def body(st, idx_M):
    minibatch = jax.tree.map(lambda x: jnp.take(x, idx_M, axis=0), batch)
    return trainer.train_step(loss_fn_, optimizer, st, frozen, minibatch, rlcfg.num_microbatches, _valid_tokens)

  inner, metrics = jax.lax.scan(body, state, idx_UxM)
  kl_seq = jnp.mean(jnp.sum(batch["kl_BxN"], axis=1))
  kl_coef = kl_control.next_kl_coef(rlcfg, state["kl_coef"], kl_seq)
  return {**inner, "step": state["step"] + 1, "kl_coef": kl_coef}, metrics


def jit_update(model_cfg, rlcfg, optimizer, state_sh=None, frozen_sh=None, mesh=None):
  """`update` jitted with explicit in/out shardings (batch over data × fsdp, metrics replicated) when a mesh
  is given; the old state's buffers are donated."""
  fn = functools.partial(update, functools.partial(loss_fn, model_cfg, rlcfg), optimizer, rlcfg)
  if mesh is None:
    return jax.jit(fn, donate_argnums=(0,))
  return jax.jit(fn, in_shardings=(state_sh, frozen_sh, rollout.batch_shardings(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))


def new_state(trainable, optimizer, rng, rlcfg) -> dict:
  """trainer.new_state plus the current KL coefficient β (checkpointed with the rest)."""
  return {**trainer.new_state(trainable, optimizer, rng), "kl_coef": jnp.asarray(rlcfg.kl_coef, jnp.float32)}
