"""Rollout: prompts -> policy samples (k per prompt) -> one scoring pass -> per-token KL, rewards, advantages.

A rollout batch is a flat dict of [B,...] arrays, B = prompts × samples_per_prompt rows (prompt b's k samples
are rows b·k … b·k+k−1; host-friendly, `to_host` pulls it to numpy):
  prompt_BxP, prompt_mask_BxP, tokens_BxN, mask_BxN          what was sampled (mask ends at EOS / stop string)
  sampler_logp_BxN, finished_B                               the sampler's log-probs; 1 where the response ended
  old_logp_BxN, ref_logp_BxN, old_values_BxN, score_B        policy / reference / value / RM score at rollout
  reward_B, kl_BxN, rewards_BxN, advantages_BxN, returns_BxN the reward used, KL, shaped rewards, learner targets
old_logp is the sampler's own log-prob (same T, no top-k/top-p: RLConfig refuses them) except under PPO, whose
ratio must be exactly 1 on the first minibatch, so the learner's forward recomputes it; the value pass runs only
when the algorithm has a value role (REINFORCE, PPO).
"""
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from perl_jax import losses, sampling, sharding
from perl_jax.rl import roles


def standard_rewards(reward_B, kl_BxN, mask_BxN, kl_coef):
  """Per-token rewards for the standard objective r(x,y) − β·KL: −β·kl_t per valid token, r at the last one."""
  mask_BxN = mask_BxN.astype(kl_BxN.dtype)
  terminal_BxN = losses.last_valid_onehot(mask_BxN).astype(kl_BxN.dtype)
  return -kl_coef * kl_BxN * mask_BxN + reward_B[:, None] * terminal_BxN


def token_rewards(rlcfg, reward_B, kl_BxN, mask_BxN, kl_coef):
  """Shaped per-token rewards: PERL's (1−β)·r − β·KL (objective "perl") or r − β·KL ("standard")."""
  if rlcfg.objective == "perl":
    return losses.kl_regularized_rewards(reward_B, kl_BxN, mask_BxN, kl_coef)
  return standard_rewards(reward_B, kl_BxN, mask_BxN, kl_coef)


def reinforce_advantages(rewards_BxN, values_BxN, mask_BxN, gamma: float):
  """REINFORCE with a learned baseline: G_t = Σ_k γ^(k−t) r_k (Monte Carlo), A_t = G_t − V_t; returns (A, G)."""
  returns_BxN = losses.discounted_returns(rewards_BxN, mask_BxN, gamma)
  return (returns_BxN - values_BxN) * mask_BxN.astype(returns_BxN.dtype), returns_BxN


def group_advantages(rlcfg, rewards_BxN, mask_BxN):
  """(advantages, returns) of RLOO / GRPO: the sequence return R = G_0 (the shaped return from the first token)
  against the other samples of its prompt (`losses.rloo_advantages` / `grpo_advantages`), broadcast over the
  response's valid tokens; returns are the per-token discounted returns (logged, no value role learns them)."""
  returns_BxN = losses.discounted_returns(rewards_BxN, mask_BxN, rlcfg.gamma)
  fn = losses.rloo_advantages if rlcfg.algorithm == "rloo" else losses.grpo_advantages
  adv_B = fn(returns_BxN[:, 0], rlcfg.samples_per_prompt)
  return adv_B[:, None] * mask_BxN.astype(returns_BxN.dtype), returns_BxN


def advantages(rlcfg, rewards_BxN, values_BxN, mask_BxN):
  """(advantages, returns): Monte-Carlo minus baseline (REINFORCE), GAE(γ, λ) (PPO) or the group baseline
  (RLOO / GRPO), optionally whitened over the batch's valid tokens; returns (the value targets) are never whitened."""
  if rlcfg.algorithm == "reinforce":
    adv_BxN, ret_BxN = reinforce_advantages(rewards_BxN, values_BxN, mask_BxN, rlcfg.gamma)
  elif rlcfg.algorithm == "ppo":
    adv_BxN, ret_BxN = losses.gae_advantages(rewards_BxN, values_BxN, mask_BxN, rlcfg.gamma, rlcfg.lam)
  else:
    adv_BxN, ret_BxN = group_advantages(rlcfg, rewards_BxN, mask_BxN)
  if rlcfg.whiten_advantages:
    adv_BxN = losses.whiten(adv_BxN, mask_BxN)
  return adv_BxN, ret_BxN


def used_reward(rlcfg, score_B, finished_B):
  """The reward RL optimises: the RM's score, or rl.unfinished_reward for a response that hit max_new_tokens
  (the RM only saw finished responses) when that is set."""
  if rlcfg.unfinished_reward is None:
    return score_B
  return jnp.where(finished_B.astype(bool), score_B, jnp.asarray(rlcfg.unfinished_reward, score_B.dtype))


def score(model_cfg, rlcfg, trainable, frozen, kl_coef, samples: dict, reward_fn: Callable | None = None) -> dict:
  """The scoring pass over prompt + response: reference log-probs, the reward, values and (PPO only) the
  learner's old log-probs, then KL, shaped rewards, advantages and returns.
  reward_fn(frozen, ids_BxS, mask_BxS, prompt_len) -> r_B replaces the RM role."""
  prompt_len = samples["prompt_BxP"].shape[1]
  mask_BxN = samples["mask_BxN"]
  ids, mask = roles.sequence(samples["prompt_BxP"], samples["prompt_mask_BxP"], samples["tokens_BxN"], mask_BxN)
  m_BxN = mask_BxN.astype(jnp.float32)
  if rlcfg.algorithm == "ppo":
    old_logp_BxN = roles.policy_logprobs(model_cfg, rlcfg, trainable, frozen, ids, mask, prompt_len)[0] * m_BxN
  else:
    old_logp_BxN = samples["sampler_logp_BxN"] * m_BxN
  ref_logp_BxN = roles.reference_logprobs(model_cfg, rlcfg, frozen, ids, mask, prompt_len) * m_BxN
  if rlcfg.uses_value:
    values_BxN = roles.values(model_cfg, rlcfg, trainable, frozen, ids, mask, prompt_len) * m_BxN
  else:
    values_BxN = jnp.zeros_like(m_BxN)
  if reward_fn is None:
    score_B = roles.rewards(model_cfg, rlcfg, frozen, ids, mask)
  else:
    score_B = reward_fn(frozen, ids, mask, prompt_len).astype(jnp.float32)
  reward_B = used_reward(rlcfg, score_B, samples["finished_B"])
  kl_BxN = losses.kl_divergence_estimate(old_logp_BxN, ref_logp_BxN, rlcfg.kl_estimator) * m_BxN
  rewards_BxN = token_rewards(rlcfg, reward_B, kl_BxN, m_BxN, kl_coef)
  adv_BxN, ret_BxN = advantages(rlcfg, rewards_BxN, values_BxN, m_BxN)
  return {**samples, "old_logp_BxN": old_logp_BxN, "ref_logp_BxN": ref_logp_BxN, "old_values_BxN": values_BxN,
          "score_B": score_B, "reward_B": reward_B, "kl_BxN": kl_BxN, "rewards_BxN": rewards_BxN,
          "advantages_BxN": adv_BxN, "returns_BxN": ret_BxN}


def gather_once(mesh) -> Callable | None:
  """With an fsdp axis: a sharding constraint that gathers the sampler's weights whole over fsdp once, before the
  prefill, so the decode loop does not all-gather them again at every token (sharding.gathered_shardings)."""
  if mesh is None or mesh.shape["fsdp"] == 1:
    return None
  return lambda tree: jax.lax.with_sharding_constraint(tree, sharding.gathered_shardings(tree, mesh))


def sample_with(model_cfg, rlcfg, params, adapters, prompt_BxP, prompt_mask_BxP, rng, mesh=None) -> dict:
  """k = samples_per_prompt samples of each left-padded prompt from `params` + `adapters` [(tree, scale)], rows
  b·k … b·k+k−1, with the prompts repeated to match: the rollout's first half, as a dict. On a `mesh` with an
  fsdp axis the weights are gathered once per call (gather_once)."""
  k = rlcfg.samples_per_prompt
  out = sampling.generate_fn(
      model_cfg, params, [t for t, _ in adapters], prompt_BxP, prompt_mask_BxP, rng,
      scales=tuple(float(s) for _, s in adapters), max_new_tokens=rlcfg.max_new_tokens,
      temperature=rlcfg.temperature, top_k=rlcfg.top_k, top_p=rlcfg.top_p, eos_id=rlcfg.eos_id,
      pad_id=rlcfg.pad_id, cache_dtype=rlcfg.cache_dtype, num_samples=k, stop_sequences=rlcfg.stop_ids,
      gather=gather_once(mesh))
  finished_B = out.done_B  # Ended at EOS or at a stop sequence (not cut at max_new_tokens).
  return {"prompt_BxP": jnp.repeat(prompt_BxP, k, axis=0), "prompt_mask_BxP": jnp.repeat(prompt_mask_BxP, k, axis=0),
          "tokens_BxN": out.tokens_BxN, "mask_BxN": out.mask_BxN, "sampler_logp_BxN": out.logp_BxN,
          "finished_B": finished_B.astype(jnp.int32)}


def sample(model_cfg, rlcfg, trainable, frozen, prompt_BxP, prompt_mask_BxP, rng, mesh=None) -> dict:
  """The policy's samples (adapters unmerged, so the policy LoRA's gradient step is the only change per step)."""
  params, adapters = roles.policy_model(rlcfg, trainable, frozen)
  return sample_with(model_cfg, rlcfg, params, adapters, prompt_BxP, prompt_mask_BxP, rng, mesh)


SAMPLE_KEYS = ("prompt_BxP", "prompt_mask_BxP", "tokens_BxN", "mask_BxN", "sampler_logp_BxN", "finished_B")
SCORE_KEYS = ("old_logp_BxN", "ref_logp_BxN", "old_values_BxN", "score_B", "reward_B", "kl_BxN", "rewards_BxN",
              "advantages_BxN", "returns_BxN")


def batch_struct(batch: int, prompt_len: int, new_tokens: int) -> dict:
  """ShapeDtypeStructs of a rollout batch of `batch` rows (what the update step reads), for compiling it from
  shapes alone."""
  b, p, n = batch, prompt_len, new_tokens
  shapes = {"prompt_BxP": ((b, p), jnp.int32), "prompt_mask_BxP": ((b, p), jnp.int32),
            "tokens_BxN": ((b, n), jnp.int32), "mask_BxN": ((b, n), jnp.int32), "finished_B": ((b,), jnp.int32),
            "score_B": ((b,), jnp.float32), "reward_B": ((b,), jnp.float32)}
  shapes.update({k: ((b, n), jnp.float32) for k in SAMPLE_KEYS + SCORE_KEYS if k not in shapes})
  return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}


def batch_shardings(mesh, keys=SAMPLE_KEYS + SCORE_KEYS) -> dict:
  """Every rollout field sharded over its batch axis (data × fsdp)."""
  return {k: sharding.batch_sharding(mesh, 1 if k.endswith("_B") else 2) for k in keys}


def apply_stop_strings(rlcfg, samples, decode, stop_strings, put):
  """Host side: responses end at their first stop string; a cut response counts as finished."""
  toks, mask, stopped_B = sampling.cut_at_stop_strings(samples["tokens_BxN"], samples["mask_BxN"], decode,
                                                       stop_strings, rlcfg.pad_id, return_stopped=True)
  finished = (np.asarray(samples["finished_B"]) > 0) | stopped_B
  return {**samples, "tokens_BxN": put(toks, "tokens_BxN"), "mask_BxN": put(mask, "mask_BxN"),
          "sampler_logp_BxN": samples["sampler_logp_BxN"] * put(mask, "mask_BxN"),
          "finished_B": put(finished.astype(np.int32), "finished_B")}


def make_rollout(model_cfg, rlcfg, *, mesh=None, trainable_sh=None, frozen_sh=None, reward_fn=None,
                 decode: Callable | None = None, stop_strings=()) -> Callable:
  """rollout(trainable, frozen, kl_coef, prompt_BxP, prompt_mask_BxP, rng, timings=None) -> batch (on device).

  Two jitted programs (explicit shardings when `mesh` is given): sampling, then the scoring pass; between
  them, when `stop_strings` are given, the host cuts responses at the first stop string (needs `decode`).
  A `timings` dict gets sample_s and score_s (each waits for its program)."""
  sample_fn = functools.partial(sample, model_cfg, rlcfg, mesh=mesh)
  score_fn = functools.partial(score, model_cfg, rlcfg, reward_fn=reward_fn)
  if mesh is None:
    sample_jit, score_jit = jax.jit(sample_fn), jax.jit(score_fn)
    put = lambda x, k: jnp.asarray(x)
  else:
    b_sh, repl = batch_shardings(mesh), sharding.replicated(mesh)
    s_sh = {k: b_sh[k] for k in SAMPLE_KEYS}
    sample_jit = jax.jit(sample_fn, in_shardings=(trainable_sh, frozen_sh, b_sh["prompt_BxP"], b_sh["prompt_BxP"],
                                                  repl), out_shardings=s_sh)
    score_jit = jax.jit(score_fn, in_shardings=(trainable_sh, frozen_sh, repl, s_sh), out_shardings=b_sh)
    put = lambda x, k: jax.device_put(x, s_sh[k])

  def rollout(trainable, frozen, kl_coef, prompt_BxP, prompt_mask_BxP, rng, timings=None):
    t0 = time.perf_counter()
    samples = sample_jit(trainable, frozen, prompt_BxP, prompt_mask_BxP, rng)
    if stop_strings:
      samples = apply_stop_strings(rlcfg, samples, decode, stop_strings, put)
    if timings is not None:
      jax.block_until_ready(samples)
      t1 = time.perf_counter()
    batch = score_jit(trainable, frozen, jnp.asarray(kl_coef, jnp.float32), samples)
    if timings is not None:
      jax.block_until_ready(batch)
      timings.update(sample_s=t1 - t0, score_s=time.perf_counter() - t1)
    return batch

  return rollout


def rollout_metrics(batch: dict) -> dict:
  """Per-rollout statistics (device scalars): RM score mean/std, the reward used, KL to the reference per
  sequence (sum over tokens) and per token, response length, finished fraction, shaped return."""
  m_BxN = batch["mask_BxN"].astype(jnp.float32)
  kl_seq_B = jnp.sum(batch["kl_BxN"] * m_BxN, axis=1)
  return {"reward_mean": jnp.mean(batch["score_B"]), "reward_std": jnp.std(batch["score_B"]),
          "reward_used_mean": jnp.mean(batch["reward_B"]),
          "kl_ref": jnp.mean(kl_seq_B), "kl_ref_per_token": losses.masked_mean(batch["kl_BxN"], m_BxN),
          "response_length": jnp.mean(jnp.sum(m_BxN, axis=1)),
          "finished_fraction": jnp.mean(batch["finished_B"].astype(jnp.float32)),
          "shaped_return": jnp.mean(jnp.sum(batch["rewards_BxN"] * m_BxN, axis=1))}


def to_host(batch: dict) -> dict:
  """The rollout batch as numpy, whole on every process (with several processes, a collective: all must call)."""
  if jax.process_count() > 1:
    return {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in batch.items()}
  return {k: np.asarray(v) for k, v in batch.items()}
