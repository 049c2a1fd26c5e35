"""RL learning signal: group advantages (RLOO, GRPO) vs loops, gradient accumulation vs one big batch, the
PPO schedule's length, the zero value head and its warm-up, unfinished responses, config refusals, and a
non-finite reward stopping the step — each against an independent truth."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from perl_jax import heads, lora, losses, models, optimizer, trainer
from perl_jax.rl import RLConfig, learner, roles, rollout
from perl_jax.rl.step import RLStep
from tests.helpers import random_batch, tiny_config

LCFG = lora.LoraConfig(rank=2, alpha=4.0)


def _group_loop(r, k, kind):
  out = np.zeros_like(r, np.float64)
  for g in range(len(r) // k):
    grp = r[g * k:(g + 1) * k]
    for i in range(k):
      if kind == "rloo":
        out[g * k + i] = grp[i] - np.mean([grp[j] for j in range(k) if j != i])
      else:
        out[g * k + i] = (grp[i] - np.mean(grp)) / (np.std(grp) + 1e-6)
  return out


@pytest.mark.parametrize("kind", ["rloo", "grpo"])
def test_group_advantages_vs_numpy_loop(kind):
  r = np.random.default_rng(0).normal(size=12).astype(np.float32)
  fn = losses.rloo_advantages if kind == "rloo" else losses.grpo_advantages
  for k in (2, 3, 4):
    np.testing.assert_allclose(fn(jnp.asarray(r), k), _group_loop(r, k, kind), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(fn(jnp.ones(6), 3)) == 0)         # a group that ties has no signal


def test_group_advantage_is_the_sequence_return_against_the_group_on_every_valid_token():
  rlcfg = RLConfig(algorithm="rloo", samples_per_prompt=2, whiten_advantages=False)
  m = jnp.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], jnp.float32)
  rewards = jnp.array([[0.1, 2.0, 0], [-1.0, 0, 0], [0.0, 0.5, 0.5], [3.0, 0.0, 0]])
  adv, _ = rollout.advantages(rlcfg, rewards, jnp.zeros_like(m), m)
  ret = np.array([2.1, -1.0, 1.0, 3.0])                      # Σ_t r_t per sample
  want = np.array([2.1 - -1.0, -1.0 - 2.1, 1.0 - 3.0, 3.0 - 1.0])
  np.testing.assert_allclose(adv, want[:, None] * np.asarray(m), rtol=1e-6)
  assert ret.shape == (4,)


@pytest.mark.parametrize("field,value,words", [
    ("temperature", 0.0, "rl.temperature"), ("top_k", 40, "rl.top_k"), ("top_p", 0.9, "rl.top_p"),
    ("samples_per_prompt", 0, "rl.samples_per_prompt")])
def test_settings_the_learner_cannot_follow_are_one_line_config_errors(field, value, words):
  with pytest.raises(models.ConfigError, match=words) as e:
    RLConfig(**{field: value})
  assert "\n" not in str(e.value)


def test_group_estimators_need_k_samples_and_reinforce_refuses_off_policy_updates():
  with pytest.raises(models.ConfigError, match="rl.samples_per_prompt"):
    RLConfig(algorithm="rloo", samples_per_prompt=1)
  with pytest.raises(models.ConfigError, match="rl.num_minibatches.*importance ratio"):
    RLConfig(algorithm="reinforce", num_minibatches=2)
  with pytest.raises(models.ConfigError, match="rl.num_minibatches"):
    RLConfig(algorithm="rloo", samples_per_prompt=2, ppo_epochs=2)
  RLConfig(algorithm="ppo", ppo_epochs=2, num_minibatches=2)           # PPO's ratio corrects later updates
  RLConfig(algorithm="reinforce", num_microbatches=4)                  # accumulation is one update


def test_schedule_counts_rl_steps_not_optimizer_updates():
  """PPO with 4 updates per RL step reaches its LR floor at the last RL step, not a quarter of the way in."""
  optim = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=2, weight_decay=0.0, clip_norm=1.0))
  one, _ = optimizer.make(optim, 20)
  four, _ = optimizer.make(optim, 20, updates_per_step=4)
  for s in range(2, 20):                                      # after warm-up (which four ramps in finer steps)
    assert float(four(4 * s)) == pytest.approx(float(one(s)), rel=1e-6)
  assert float(four(4 * 5)) > 5 * float(one(19))               # step 5 of 20 is still near the peak


def _tiny_roles(algorithm="reinforce", **kw):
  cfg = tiny_config()
  base = models.init_params(cfg, jax.random.key(0))
  sft = jax.tree.map(lambda x: x + 0.1, lora.init(jax.random.key(1), base, LCFG))
  rm = {"lora": jax.tree.map(lambda x: x + 0.1, lora.init(jax.random.key(3), base, LCFG)),
        "head": heads.init_head(jax.random.key(5), cfg.hidden_size)}
  rlcfg = RLConfig(algorithm=algorithm, max_new_tokens=6, eos_id=5, temperature=0.9, policy_lora=LCFG,
                   value_lora=LCFG, sft_scale=2.0, reward_scale=2.0, **kw)
  trainable = roles.init_trainable(jax.random.key(6), cfg, rlcfg, base, sft, rm)
  return cfg, rlcfg, trainable, roles.frozen_params(rlcfg, base, sft, rm)


def _prompt_batch(b=8, seed=7):
  ids, mask = random_batch(seed, b, 5, tiny_config().vocab_size, left_pad=(0, 2, 1, 0, 3, 0, 0, 1)[:b])
  return {"input_ids": np.asarray(ids), "attention_mask": np.asarray(mask)}


def test_accumulated_gradient_equals_one_big_batch():
  cfg, rlcfg, trainable, frozen = _tiny_roles(gamma=0.9)
  trainable["policy"] = jax.tree.map(lambda x: x + 0.05, trainable["policy"])   # B ≠ 0: every LoRA leaf has a grad
  p = _prompt_batch()
  batch = rollout.make_rollout(cfg, rlcfg)(trainable, frozen, 0.1, jnp.asarray(p["input_ids"]),
                                           jnp.asarray(p["attention_mask"]), jax.random.key(1))
  lengths = np.asarray(batch["mask_BxN"]).sum(1)
  assert lengths.min() < lengths.max()                       # ragged rows: token weights differ by microbatch
  loss = functools.partial(learner.loss_fn, cfg, rlcfg)
  grads = {m: jax.jit(lambda b, m=m: trainer.loss_and_grads(loss, trainable, frozen, b, None, m,
                                                            learner._valid_tokens))(batch)
           for m in (1, 2, 4)}
  norm = float(optax.global_norm(grads[1][1]))
  for m in (2, 4):   # to 1e-5 of the gradient's norm (float32: per-token terms cancel in each sum)
    diff = float(optax.global_norm(jax.tree.map(jnp.subtract, grads[m][1], grads[1][1])))
    assert diff < 1e-5 * norm, (m, diff, norm)
    assert float(optax.global_norm(grads[m][1]["value"])) > 0.01 * norm   # both roles get a gradient
    assert float(grads[m][0]["loss"]) == pytest.approx(float(grads[1][0]["loss"]), rel=1e-5)


def test_zero_value_head_and_warm_up_train_only_the_value_first():
  cfg, rlcfg, trainable, frozen = _tiny_roles(value_warmup_steps=1)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(trainable["value"]["head"]))
  opt = optimizer.make_optimizer(optax.constant_schedule(1e-2))
  state = learner.new_state(trainable, opt, jax.random.key(2), rlcfg)
  before = jax.device_get(state["trainable"])
  step = RLStep(cfg, rlcfg, opt)
  state, metrics = step(state, frozen, _prompt_batch())
  assert float(metrics["value_mean"]) == 0.0                  # V = 0 before the first update
  after = jax.device_get(state["trainable"])
  jax.tree.map(np.testing.assert_array_equal, after["policy"], before["policy"])   # warm-up: policy frozen
  assert np.abs(after["value"]["head"]["kernel"] - before["value"]["head"]["kernel"]).max() > 0
  state, _ = step(state, frozen, _prompt_batch())
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state["trainable"]["policy"],
                       after["policy"])
  assert max(jax.tree.leaves(moved)) > 0                      # after warm-up the policy learns


def test_rloo_has_no_value_role_and_samples_k_per_prompt():
  cfg, rlcfg, trainable, frozen = _tiny_roles("rloo", samples_per_prompt=3, whiten_advantages=False)
  assert set(trainable) == {"policy"}
  p = _prompt_batch(b=4)
  batch = rollout.to_host(rollout.make_rollout(cfg, rlcfg)(trainable, frozen, 0.1, jnp.asarray(p["input_ids"]),
                                                           jnp.asarray(p["attention_mask"]), jax.random.key(1)))
  assert batch["tokens_BxN"].shape == (12, 6)
  np.testing.assert_array_equal(batch["prompt_BxP"], np.repeat(p["input_ids"], 3, axis=0))
  ret = (batch["rewards_BxN"] * batch["mask_BxN"]).sum(1)
  adv = batch["advantages_BxN"][:, 0]
  np.testing.assert_allclose(adv, _group_loop(ret, 3, "rloo"), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(batch["old_values_BxN"], 0)
  finished = [(5 in row[m > 0]) for row, m in zip(batch["tokens_BxN"], batch["mask_BxN"])]
  np.testing.assert_array_equal(batch["finished_B"], finished)


def test_unfinished_reward_replaces_the_score_of_truncated_responses_only():
  rlcfg = RLConfig(unfinished_reward=-3.0)
  r = rollout.used_reward(rlcfg, jnp.array([1.0, 2.0, 0.5]), jnp.array([1, 0, 1]))
  np.testing.assert_array_equal(r, [1.0, -3.0, 0.5])
  np.testing.assert_array_equal(rollout.used_reward(RLConfig(), jnp.array([1.0, 2.0]), jnp.array([0, 0])),
                                [1.0, 2.0])


def test_non_finite_reward_stops_the_step_naming_it():
  cfg, rlcfg, trainable, frozen = _tiny_roles()
  opt = optimizer.make_optimizer(optax.constant_schedule(1e-2))
  state = learner.new_state(trainable, opt, jax.random.key(2), rlcfg)
  nan_reward = lambda f, ids, mask, p: jnp.where(jnp.arange(ids.shape[0]) == 3, jnp.nan, 1.0)
  with pytest.raises(trainer.TrainingError, match=r"step 1: the reward is not finite for 1 of 8"):
    RLStep(cfg, rlcfg, opt, reward_fn=nan_reward)(state, frozen, _prompt_batch())


@pytest.mark.parametrize("run", [dict(algorithm="rloo", samples_per_prompt=4),
                                 dict(algorithm="ppo", ppo_epochs=2, num_minibatches=2),
                                 dict(algorithm="reinforce", value_warmup_steps=3)])
def test_eval_samples_any_run_once_or_n_times_with_its_sampling_settings(run):
  from perl_jax.rl import evaluate
  rlcfg = RLConfig(temperature=0.7, max_new_tokens=9, eos_id=4, **run)
  for n in (1, 3):
    s = evaluate.sampling_config(rlcfg, n)
    assert (s.samples_per_prompt, s.temperature, s.max_new_tokens, s.eos_id) == (n, 0.7, 9, 4)
