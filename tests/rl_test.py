"""RL core (perl_jax.rl): every check against an independent truth — plain loops, numpy, exact identities,
byte counts, a second device layout, and learning a programmatic reward."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perl_jax import heads, lora, models, optimizer, sharding
from perl_jax.rl import RLConfig, kl_control, learner, roles, rollout
from perl_jax.rl.step import RLStep
from tests.helpers import random_batch, tiny_config

LCFG = lora.LoraConfig(rank=2, alpha=4.0)
B, P, N = 8, 5, 6
LEFT_PAD = (0, 2, 1, 0, 3, 0, 0, 1)


def _perturb(tree, seed, std):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + std * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _models(mode="lora", **kw):
  """Tiny backbone, a trained-looking SFT adapter and LoRA RM (B ≠ 0), and the RL pytrees on top."""
  cfg = tiny_config()
  base = models.init_params(cfg, jax.random.key(0))
  sft = _perturb(lora.init(jax.random.key(1), base, LCFG), 2, 0.2)
  rm = {"lora": _perturb(lora.init(jax.random.key(3), base, LCFG), 4, 0.2),
        "head": heads.init_head(jax.random.key(5), cfg.hidden_size)}
  rlcfg = RLConfig(mode=mode, max_new_tokens=N, eos_id=-1, policy_lora=LCFG, value_lora=LCFG,
                   sft_scale=lora.scale(LCFG), reward_scale=lora.scale(LCFG), **kw)
  trainable = roles.init_trainable(jax.random.key(6), cfg, rlcfg, base, sft, rm)
  frozen = roles.frozen_params(rlcfg, base, sft, rm)
  return cfg, rlcfg, base, sft, rm, trainable, frozen


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _prompts():
  return random_batch(7, B, P, tiny_config().vocab_size, left_pad=LEFT_PAD)


# ------------------------------------------------------------------ pure functions vs loops


def _loop_returns(r, m, gamma):
  g = np.zeros_like(r, np.float64)
  for b in range(r.shape[0]):
    n = int(m[b].sum())
    for t in range(n):
      g[b, t] = sum(gamma ** (k - t) * r[b, k] for k in range(t, n))
  return g


def test_reinforce_returns_and_advantages_vs_loop():
  rng = np.random.default_rng(0)
  m = (np.arange(5)[None] < np.array([[5], [3], [1]])).astype(np.float32)
  r, v = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
  for gamma in (1.0, 0.9):
    adv, ret = rollout.reinforce_advantages(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma)
    g = _loop_returns(r, m, gamma)
    np.testing.assert_allclose(ret, g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv, (g - v) * m, rtol=1e-5, atol=1e-6)
  rlcfg = RLConfig(algorithm="reinforce", whiten_advantages=True)
  adv, ret = rollout.advantages(rlcfg, jnp.asarray(r), jnp.asarray(v), jnp.asarray(m))
  raw = (_loop_returns(r, m, 1.0) - v)[m > 0]
  np.testing.assert_allclose(np.asarray(adv)[m > 0], (raw - raw.mean()) / raw.std(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ret, _loop_returns(r, m, 1.0), rtol=1e-5, atol=1e-6)   # targets never whitened


def test_token_rewards_perl_and_standard_objectives_by_hand():
  kl = jnp.array([[0.5, -0.2, 0.3, 9.0]])
  m = jnp.array([[1.0, 1.0, 1.0, 0.0]])
  r = jnp.array([2.0])
  perl = rollout.token_rewards(RLConfig(objective="perl"), r, kl, m, 0.1)
  std = rollout.token_rewards(RLConfig(objective="standard"), r, kl, m, 0.1)
  np.testing.assert_allclose(perl, [[-0.05, 0.02, -0.03 + 0.9 * 2.0, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(std, [[-0.05, 0.02, -0.03 + 2.0, 0.0]], rtol=1e-6)


def test_adaptive_kl_controller_by_hand():
  rlcfg = RLConfig(kl_coef=0.1, kl_target=6.0, kl_horizon=10)
  assert float(kl_control.next_kl_coef(rlcfg, 0.1, 9.0)) == pytest.approx(0.1 * (1 + 0.2 / 10))
  assert float(kl_control.next_kl_coef(rlcfg, 0.1, 6.6)) == pytest.approx(0.1 * (1 + 0.1 / 10))
  assert float(kl_control.next_kl_coef(rlcfg, 0.1, 0.0)) == pytest.approx(0.1 * (1 - 0.2 / 10))
  assert kl_control.next_kl_coef(RLConfig(kl_coef=0.1), 0.1, 50.0) == 0.1
  # The default horizon is in RL steps, whatever the batch: a KL far above target moves β by 1% in one step
  # (horizon 10,000 samples moved it by 0.016% at 8 samples a step).
  assert float(kl_control.next_kl_coef(RLConfig(kl_target=1.0), 0.1, 5.0)) == pytest.approx(0.101)


# ------------------------------------------------------------------ rollout and learner vs numpy

STOP = ("x",)
DECODE = staticmethod(lambda ids: "".join("x" if i % 3 == 0 else "y" for i in ids))  # ragged responses


@pytest.fixture(scope="module")
def ppo():
  """PPO (GAE, value clipping, whitening, T = 0.8) pytrees and one compiled rollout with a stop string."""
  cfg, rlcfg, base, sft, rm, trainable, frozen = _models(
      algorithm="ppo", gamma=0.95, lam=0.9, value_clip_eps=0.2, kl_coef=0.1, temperature=0.8,
      ppo_epochs=2, num_minibatches=2, vf_coef=0.3)
  fn = rollout.make_rollout(cfg, rlcfg, decode=DECODE.__func__, stop_strings=STOP)
  return dict(cfg=cfg, rlcfg=rlcfg, base=base, sft=sft, rm=rm, trainable=trainable, frozen=frozen, rollout=fn)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_logp(cfg, params, adapters, ids, mask, temperature):
  """log π of each response token from full-sequence float64 logits, written out in numpy."""
  logits = np.asarray(models.forward(cfg, params, ids, mask, adapters=adapters).logits, np.float64)
  logp = _log_softmax(logits[:, P - 1:-1] / temperature)
  ent = -(np.exp(logp) * logp).sum(-1)
  return np.take_along_axis(logp, np.asarray(ids)[:, P:, None], -1)[..., 0], ent


def _np_hidden(cfg, params, adapters, ids, mask):
  return np.asarray(models.forward(cfg, params, ids, mask, adapters=adapters).hidden, np.float64)


def _np_head(head, h):
  return h @ np.asarray(head["kernel"], np.float64)[:, 0] + float(head["bias"][0])


def _np_gae(r, v, m, gamma, lam):
  adv = np.zeros_like(r)
  for b in range(r.shape[0]):
    n, nxt_adv = int(m[b].sum()), 0.0
    for t in reversed(range(n)):
      v_next = v[b, t + 1] if t + 1 < n else 0.0
      nxt_adv = r[b, t] + gamma * v_next - v[b, t] + gamma * lam * nxt_adv
      adv[b, t] = nxt_adv
  return adv, (adv + v) * m


@pytest.fixture(scope="module")
def moved(ppo):
  """A rollout from a policy moved away from the reference, so KL, ratios and clipping are all non-trivial."""
  tr = {**ppo["trainable"], "policy": _perturb(ppo["trainable"]["policy"], 8, 0.3)}
  ids, mask = _prompts()
  batch = ppo["rollout"](tr, ppo["frozen"], 0.1, ids, mask, jax.random.key(1))
  return tr, batch


def test_kl_is_exactly_zero_when_policy_equals_reference(ppo):
  ids, mask = _prompts()
  batch = rollout.to_host(ppo["rollout"](ppo["trainable"], ppo["frozen"], 0.1, ids, mask, jax.random.key(0)))
  assert np.all(batch["kl_BxN"] == 0)
  np.testing.assert_array_equal(batch["old_logp_BxN"], batch["ref_logp_BxN"])
  # The learner's recomputed log-probs are those of the distribution the sampler drew from.
  np.testing.assert_allclose(batch["old_logp_BxN"], batch["sampler_logp_BxN"], atol=1e-4)


def test_rollout_batch_equals_numpy(ppo, moved):
  tr, batch = moved
  batch = rollout.to_host(batch)
  cfg, rlcfg, base, sft, s = ppo["cfg"], ppo["rlcfg"], ppo["base"], ppo["sft"], lora.scale(LCFG)
  m = batch["mask_BxN"].astype(np.float64)
  lengths = m.sum(1).astype(int)
  assert 1 <= lengths.min() and lengths.min() < N                      # the stop string cut some rows
  for row, n in enumerate(lengths):                                     # ... right after its first "x" token
    hits = [i for i, t in enumerate(batch["tokens_BxN"][row]) if t % 3 == 0]
    assert n == (hits[0] + 1 if hits and hits[0] + 1 <= N else N) or not hits
  ids = np.concatenate([batch["prompt_BxP"], batch["tokens_BxN"]], 1)
  mask = np.concatenate([batch["prompt_mask_BxP"], batch["mask_BxN"]], 1)
  old, _ = _np_logp(cfg, base, [(sft, s), (tr["policy"], s)], ids, mask, 0.8)
  ref, _ = _np_logp(cfg, base, [(sft, s)], ids, mask, 0.8)
  vals = _np_head(tr["value"]["head"], _np_hidden(cfg, base, [(sft, s), (tr["value"]["lora"], s)], ids, mask)
                  [:, P - 1:-1])
  h_rm = _np_hidden(cfg, base, [(ppo["rm"]["lora"], s)], ids, mask)
  score = _np_head(ppo["rm"]["head"], h_rm[np.arange(B), P + lengths - 1])
  np.testing.assert_allclose(batch["old_logp_BxN"], old * m, atol=1e-4)
  np.testing.assert_allclose(batch["ref_logp_BxN"], ref * m, atol=1e-4)
  np.testing.assert_allclose(batch["old_values_BxN"], vals * m, atol=1e-4)
  np.testing.assert_allclose(batch["score_B"], score, atol=1e-4)
  kl = (old - ref) * m
  assert np.abs(kl).max() > 1e-2
  rewards = -0.1 * kl
  rewards[np.arange(B), lengths - 1] += 0.9 * score                     # PERL: (1 − β)·r − β·KL
  adv, ret = _np_gae(rewards, vals * m, m, 0.95, 0.9)
  valid = adv[m > 0]
  np.testing.assert_allclose(batch["kl_BxN"], kl, atol=1e-4)
  np.testing.assert_allclose(batch["rewards_BxN"], rewards, atol=1e-4)
  np.testing.assert_allclose(batch["returns_BxN"], ret, atol=1e-4)
  np.testing.assert_allclose(batch["advantages_BxN"][m > 0], (valid - valid.mean()) / valid.std(), atol=1e-3)


@pytest.mark.parametrize("algorithm", ["ppo", "reinforce"])
def test_learner_loss_equals_numpy(ppo, moved, algorithm):

  _, batch = moved
  cfg, base, sft, s = ppo["cfg"], ppo["base"], ppo["sft"], lora.scale(LCFG)
  one_update = {} if algorithm == "ppo" else dict(ppo_epochs=1, num_minibatches=1)
  rlcfg = dataclasses.replace(ppo["rlcfg"], algorithm=algorithm, **one_update)
  tr = {"policy": _perturb(ppo["trainable"]["policy"], 9, 0.4),
        "value": {"lora": _perturb(ppo["trainable"]["value"]["lora"], 10, 0.3),
                  "head": ppo["trainable"]["value"]["head"]}}
  loss, metrics = jax.jit(functools.partial(learner.loss_fn, cfg, rlcfg))(tr, ppo["frozen"], batch)
  b = rollout.to_host(batch)
  ids = np.concatenate([b["prompt_BxP"], b["tokens_BxN"]], 1)
  mask = np.concatenate([b["prompt_mask_BxP"], b["mask_BxN"]], 1)
  m = b["mask_BxN"].astype(np.float64)
  logp, ent = _np_logp(cfg, base, [(sft, s), (tr["policy"], s)], ids, mask, 0.8)
  v = _np_head(tr["value"]["head"], _np_hidden(cfg, base, [(sft, s), (tr["value"]["lora"], s)], ids, mask)
               [:, P - 1:-1])
  adv, ret, old_v = b["advantages_BxN"], b["returns_BxN"], b["old_values_BxN"]
  mean = lambda x: (x * m).sum() / m.sum()
  ratio = np.exp(logp - b["old_logp_BxN"])
  clip_frac = mean(np.abs(ratio - 1) > 0.2)
  if algorithm == "ppo":
    pg = -mean(np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv))
    vl = 0.5 * mean(np.maximum((v - ret) ** 2, (old_v + np.clip(v - old_v, -0.2, 0.2) - ret) ** 2))
  else:
    pg = -mean(adv * logp)
    vl = 0.5 * mean((v - ret) ** 2)
  assert 0 < clip_frac < 1
  assert float(metrics["policy_loss"]) == pytest.approx(pg, rel=1e-4, abs=1e-5)
  assert float(metrics["value_loss"]) == pytest.approx(vl, rel=1e-4, abs=1e-5)
  assert float(loss) == pytest.approx(pg + 0.3 * vl, rel=1e-4, abs=1e-5)
  assert float(metrics["clip_fraction"]) == pytest.approx(clip_frac, abs=1e-6)
  assert float(metrics["entropy"]) == pytest.approx(mean(ent), rel=1e-4)
  ev = 1 - np.var((ret - v)[m > 0]) / np.var(ret[m > 0])
  assert float(metrics["explained_variance"]) == pytest.approx(ev, rel=1e-3, abs=1e-4)


# ------------------------------------------------------------------ the step: PPO ratio, mesh, memory


def _prompt_batch():
  ids, mask = _prompts()
  return {"input_ids": np.asarray(ids), "attention_mask": np.asarray(mask)}


@pytest.fixture(scope="module")
def ppo_step_one_device(ppo):
  """One PPO step (2 epochs × 2 minibatches) on a single device from the fresh state."""
  opt = optimizer.make_optimizer(optax.constant_schedule(1e-2))
  state = learner.new_state(_copy(ppo["trainable"]), opt, jax.random.key(11), ppo["rlcfg"])  # it gets donated
  step = RLStep(ppo["cfg"], ppo["rlcfg"], opt, decode=DECODE.__func__, stop_strings=STOP)
  new_state, metrics = step(state, ppo["frozen"], _prompt_batch())
  return opt, jax.device_get(new_state), jax.device_get(metrics), rollout.to_host(step.last_batch)


def test_ppo_ratio_is_one_on_first_minibatch_of_first_epoch(ppo_step_one_device):
  _, state, metrics, _ = ppo_step_one_device
  assert metrics["first_clip_fraction"] == 0.0
  assert metrics["first_max_abs_log_ratio"] <= 1e-6       # learner recomputation == rollout's old log-probs
  assert metrics["max_abs_log_ratio"] > 1e-3              # ... and later minibatches see the moved policy
  assert int(state["step"]) == 1 and metrics["loss"] == metrics["loss"]


def test_step_on_2x2x2_mesh_equals_one_device(ppo, ppo_step_one_device):
  opt, state1, metrics1, batch1 = ppo_step_one_device
  mesh = sharding.make_mesh(2, 2, 2)
  state = learner.new_state(ppo["trainable"], opt, jax.random.key(11), ppo["rlcfg"])
  state_sh, frozen_sh = sharding.shardings(state, mesh), sharding.shardings(ppo["frozen"], mesh)
  state, frozen = jax.device_put(state, state_sh), jax.device_put(ppo["frozen"], frozen_sh)
  step = RLStep(ppo["cfg"], ppo["rlcfg"], opt, mesh=mesh, state_sh=state_sh, frozen_sh=frozen_sh,
                decode=DECODE.__func__, stop_strings=STOP)
  state8, metrics8 = step(state, frozen, _prompt_batch())
  assert len(state8["trainable"]["policy"]["layers"]["attn"]["q_proj"]["a"].sharding.device_set) == 8
  batch8 = rollout.to_host(step.last_batch)
  np.testing.assert_array_equal(batch8["tokens_BxN"], batch1["tokens_BxN"])
  for k in rollout.SCORE_KEYS:
    np.testing.assert_allclose(batch8[k], batch1[k], atol=1e-5, err_msg=k)
  for k in ("loss", "policy_loss", "value_loss", "entropy", "kl_ref", "reward_mean"):
    assert float(metrics8[k]) == pytest.approx(float(metrics1[k]), abs=1e-5), k
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
               jax.device_get(state8["trainable"]), state1["trainable"])


def _nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _abstract_batch():
  return rollout.batch_struct(B, P, N)


def _argument_bytes(cfg, rlcfg, trainable, frozen):
  """Argument bytes of the compiled scoring pass (all four roles) and update step (XLA drops unused inputs,
  so each counts only what that program reads)."""
  opt = optax.adam(1e-3)
  state = learner.new_state(trainable, opt, jax.random.key(0), rlcfg)
  batch = _abstract_batch()
  samples = {k: batch[k] for k in rollout.SAMPLE_KEYS}
  score = jax.jit(functools.partial(rollout.score, cfg, rlcfg)).lower(trainable, frozen, 0.1, samples).compile()
  update = learner.jit_update(cfg, rlcfg, opt).lower(state, frozen, batch).compile()
  return score.memory_analysis().argument_size_in_bytes, update.memory_analysis().argument_size_in_bytes


def test_lora_mode_holds_one_backbone_full_mode_four():
  cfg, rlcfg, base, _, _, trainable, frozen = _models("lora")
  base_bytes = _nbytes(base)
  adapter_bytes = 4 * lora.closed_form_count(cfg, LCFG) * 4           # policy, value, SFT, RM sets (float32)
  head_bytes = 2 * (cfg.hidden_size + 1) * 4                          # value head, RM head
  lora_live = _nbytes(trainable) + _nbytes(frozen)
  assert lora_live == base_bytes + adapter_bytes + head_bytes
  lora_score, lora_update = _argument_bytes(cfg, rlcfg, trainable, frozen)
  # The one backbone + adapters (+ Adam moments of the trained sets and the rollout batch in the update).
  assert base_bytes < lora_score < 1.15 * base_bytes
  assert base_bytes < lora_update < 1.3 * base_bytes

  cfg, rlcfg, base, _, _, trainable, frozen = _models("full")
  no_head = base_bytes - _nbytes(base["lm_head"])
  full_live = _nbytes(trainable) + _nbytes(frozen)
  assert full_live == 2 * base_bytes + 2 * no_head + head_bytes        # policy, reference; value, reward
  full_score, full_update = _argument_bytes(cfg, rlcfg, trainable, frozen)
  # REINFORCE's scoring pass reads three backbones (reference, value, reward): the policy's log-probs are the
  # sampler's own; PPO's recomputes them from the fourth.
  assert full_score >= full_live - _nbytes(trainable["policy"]) > 2.5 * base_bytes
  ppo_score, _ = _argument_bytes(cfg, dataclasses.replace(rlcfg, algorithm="ppo"), trainable, frozen)
  assert ppo_score >= full_live > 3.5 * base_bytes
  assert full_update > 3 * _nbytes(trainable)                          # two trained backbones + Adam moments
  print(f"\nargument bytes in backbones (LoRA / full): scoring pass {lora_score / base_bytes:.2f} / "
        f"{full_score / base_bytes:.2f}, update {lora_update / base_bytes:.2f} / {full_update / base_bytes:.2f}")


# ------------------------------------------------------------------ learning a programmatic reward

TARGET = 7


def _target_share(frozen, ids_BxS, mask_BxS, prompt_len):
  """Programmatic reward in place of the RM role: the share of TARGET among the response tokens."""
  resp_BxN = mask_BxS[:, prompt_len:].astype(jnp.float32)
  return jnp.sum((ids_BxS[:, prompt_len:] == TARGET) * resp_BxN, 1) / jnp.maximum(jnp.sum(resp_BxN, 1), 1)


@pytest.mark.parametrize("algorithm", ["reinforce", "rloo", "ppo"])
def test_learns_programmatic_reward_with_bounded_kl(algorithm):
  """Train on 8 prompts, judge on 16 others: the held-out reward of the policy beats its anchor's (same RNG)."""
  cfg = tiny_config(vocab_size=32)
  base = models.init_params(cfg, jax.random.key(0))
  # A 10x LM head so the frozen head can express peaked distributions (N(0, .02) caps logits near ±1).
  base["lm_head"]["kernel"] = base["lm_head"]["kernel"] * 10
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.ATTENTION_MLP)
  ppo_, group = algorithm == "ppo", algorithm == "rloo"
  rlcfg = RLConfig(algorithm=algorithm, max_new_tokens=8, eos_id=-1, kl_coef=0.05, policy_lora=lcfg,
                   value_lora=lcfg, vf_coef=0.5, ppo_epochs=2 if ppo_ else 1, num_minibatches=2 if ppo_ else 1,
                   samples_per_prompt=4 if group else 1, whiten_advantages=not group,
                   value_warmup_steps=2 if algorithm == "reinforce" else 0)
  trainable, frozen = roles.init_trainable(jax.random.key(1), cfg, rlcfg, base), roles.frozen_params(rlcfg, base)
  opt = optimizer.make_optimizer(optax.constant_schedule(5e-3))
  state = learner.new_state(trainable, opt, jax.random.key(2), rlcfg)
  step = RLStep(cfg, rlcfg, opt, reward_fn=_target_share)
  ids, mask = random_batch(0, 8 if group else 32, 4, cfg.vocab_size)     # 32 rollout rows a step either way
  history = []
  for _ in range(60):
    state, metrics = step(state, frozen, {"input_ids": ids, "attention_mask": mask})
    history.append({k: float(metrics[k]) for k in ("reward_mean", "kl_ref", "entropy")})
  held_ids, held_mask = random_batch(1, 16, 4, cfg.vocab_size)
  anchor = {**state["trainable"], "policy": jax.tree.map(jnp.zeros_like, state["trainable"]["policy"])}
  held = {name: float(jnp.mean(step.rollout(tr, frozen, 0.05, held_ids, held_mask, jax.random.key(9))["score_B"]))
          for name, tr in (("after", state["trainable"]), ("before", anchor))}
  kl_after = np.mean([h["kl_ref"] for h in history[-10:]])
  print(f"\n{algorithm}: held-out reward {held['before']:.3f} -> {held['after']:.3f}, KL/sequence {kl_after:.2f}")
  assert held["after"] > held["before"] + 0.05 and held["after"] > 2.5 * held["before"]   # chance: 1/32
  assert kl_after < 10.0                       # bounded: under ~1.25 nats per token
  assert all(np.isfinite(list(h.values())).all() for h in history)


def test_full_mode_step_trains_copies_and_leaves_reference_and_reward_alone():
  cfg, rlcfg, base, sft, rm, trainable, frozen = _models("full", algorithm="reinforce")
  frozen_before = jax.device_get(frozen)
  trainable_before = jax.device_get(trainable)
  opt = optimizer.make_optimizer(optax.constant_schedule(1e-3))
  state = learner.new_state(trainable, opt, jax.random.key(3), rlcfg)
  state, metrics = RLStep(cfg, rlcfg, opt)(state, frozen, _prompt_batch())
  # The policy copy starts equal to the (SFT) reference: KL 0 up to the sampler's KV-cache arithmetic.
  assert abs(float(metrics["kl_ref"])) < 1e-5
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), frozen_before)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state["trainable"], trainable_before)
  assert max(jax.tree.leaves(moved["policy"]["layers"])) > 0 and max(jax.tree.leaves(moved["value"])) > 0
  # The reward role is the RM (base ⊕ RM LoRA merged) and scores like the LoRA-mode RM on the same sequences.
  ids, mask = _prompts()
  lora_frozen = roles.frozen_params(dataclasses.replace(rlcfg, mode="lora"), base, sft, rm)
  r_full = roles.rewards(cfg, rlcfg, frozen, ids, mask)
  r_lora = roles.rewards(cfg, dataclasses.replace(rlcfg, mode="lora"), lora_frozen, ids, mask)
  np.testing.assert_allclose(np.asarray(r_full), np.asarray(r_lora), atol=1e-4)
