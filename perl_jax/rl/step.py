"""One RL step for the shared loop: step(state, frozen, prompt_batch) -> (state, metrics).

rollout (sample with the policy, score with every role, advantages) -> jitted, donated update (epochs ×
minibatches) -> metrics: the update's means, rollout statistics, sampling / update tokens per second.
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
    t0 = time.perf_counter()
    batch = jax.block_until_ready(self.rollout(state["trainable"], frozen, state["kl_coef"], ids, mask, rng))
    t1 = time.perf_counter()
    stats = rollout.rollout_metrics(batch)
    kl_coef = float(state["kl_coef"])  # Read before the update donates the state's buffers.
    state, stacked = self.update(state, frozen, batch)
    jax.block_until_ready(state["step"])
    t2 = time.perf_counter()
    self.last_batch = batch
    response_tokens = float(jnp.sum(batch["mask_BxN"]))
    seq_tokens = response_tokens + float(jnp.sum(batch["prompt_mask_BxP"]))
    metrics = {k: jnp.mean(v) for k, v in stacked.items()}
    metrics.update(stats, kl_coef=kl_coef, first_clip_fraction=stacked["clip_fraction"][0],
                   first_max_abs_log_ratio=stacked["max_abs_log_ratio"][0],
                   sample_tokens_per_s=response_tokens / (t1 - t0), rollout_s=t1 - t0, update_s=t2 - t1,
                   update_tokens_per_s=seq_tokens * self.rlcfg.num_updates / (t2 - t1))
    return state, metrics
