"""One RL step for the shared loop: step(state, frozen, prompt_batch) -> (state, metrics).

rollout (sample with the policy, score, advantages) -> jitted, donated update (epochs × minibatches) ->
metrics: the update's means, rollout statistics, seconds of sampling / scoring / update and per sample.
A reward that is not finite stops the step with a TrainingError before the update.
"""
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from perl_jax import sharding, trainer
from perl_jax.rl import learner, rollout


class RLStep:
  """Callable step; `last_batch` keeps the latest rollout batch (for sample texts and tests)."""

  def __init__(self, model_cfg, rlcfg, optimizer, *, mesh=None, state_sh=None, frozen_sh=None,
               reward_fn: Callable | None = None, decode: Callable | None = None, stop_strings=()):
    self.rlcfg, self.mesh = rlcfg, mesh
    trainable_sh = None if state_sh is None else state_sh["trainable"]
    self.rollout = rollout.make_rollout(model_cfg, rlcfg, mesh=mesh, trainable_sh=trainable_sh,
                                        frozen_sh=frozen_sh, reward_fn=reward_fn, decode=decode,
                                        stop_strings=stop_strings)
    self.update = learner.jit_update(model_cfg, rlcfg, optimizer, state_sh, frozen_sh, mesh)
    self.last_batch = None

  def _prompts(self, prompt_batch):
    ids, mask = np.asarray(prompt_batch["input_ids"]), np.asarray(prompt_batch["attention_mask"])
    if self.mesh is None:
      return jnp.asarray(ids), jnp.asarray(mask)
    g = sharding.global_batch({"ids": ids, "mask": mask}, self.mesh)
    return g["ids"], g["mask"]

  def __call__(self, state, frozen, prompt_batch):
    ids, mask = self._prompts(prompt_batch)
    rng = jax.random.fold_in(trainer.step_rng(state), 0)
    step, timings = int(state["step"]) + 1, {}
    batch = self.rollout(state["trainable"], frozen, state["kl_coef"], ids, mask, rng, timings=timings)
    rows = batch["score_B"].shape[0]
    n_bad = int(jnp.sum(~jnp.isfinite(batch["score_B"])))  # A global reduction: fine across hosts.
    if n_bad:
      raise trainer.TrainingError(f"step {step}: the reward is not finite for {n_bad} of {rows} rollout samples")
    stats = rollout.rollout_metrics(batch)
    kl_coef = float(state["kl_coef"])  # Read before the update donates the state's buffers.
    t1 = time.perf_counter()
    state, stacked = self.update(state, frozen, batch)
    jax.block_until_ready(state["step"])
    update_s = time.perf_counter() - t1
    self.last_batch = batch
    response_tokens = float(jnp.sum(batch["mask_BxN"]))
    seq_tokens = response_tokens + float(jnp.sum(batch["prompt_mask_BxP"]))
    total_s = timings["sample_s"] + timings["score_s"] + update_s
    metrics = {k: jnp.mean(v) for k, v in stacked.items()}
    metrics.update(stats, kl_coef=kl_coef, first_clip_fraction=stacked["clip_fraction"][0],
                   first_max_abs_log_ratio=stacked["max_abs_log_ratio"][0], **timings, update_s=update_s,
                   rollout_s=timings["sample_s"] + timings["score_s"], s_per_sample=total_s / rows,
                   sample_tokens_per_s=response_tokens / timings["sample_s"],
                   update_tokens_per_s=seq_tokens * self.rlcfg.num_updates / update_s)
    return state, metrics
