"""The four RL roles as forwards over one frozen backbone, and the trainable / frozen pytrees of both modes.

LoRA mode (PERL) — one backbone `base`, adapter sets stacked per role (sets ADD in the forward):
  policy    = base + SFT (frozen) + policy LoRA          reference = base + SFT (policy LoRA not passed)
  value     = base + SFT + value LoRA + scalar head       reward    = base + RM LoRA + RM head (frozen)
  trainable = {"policy": lora, "value": {"lora", "head"}};  frozen = {"base", "sft" (or None), "reward"}
  An ensemble reward (rl.reward_ensemble): frozen["reward"] = {"members": K RM {"lora", "head"} stacked}, scored in
  one pass over the base and combined per row (perl_jax.ensemble).
Full mode (the full-tuning comparison arm): trainable = {"policy": backbone, "value": {"backbone", "head"}}
  (float32 copies);
  frozen = {"reference": params, "reward": {"backbone", "head"}} — four backbones in all.
Sequences are a left-padded prompt [B,P] followed by a right-padded response [B,N]; response token n is
predicted by the hidden state at P−1+n, so per-token log-probs and values read hidden[:, P−1:−1].
"""
import jax
import jax.numpy as jnp

from perl_jax import ensemble, heads, lora, losses, models
from perl_jax.models import quant
from perl_jax.models import ModelConfig


def _sft_adapters(rlcfg, frozen) -> list:
  return [] if frozen.get("sft") is None else [(frozen["sft"], rlcfg.sft_scale)]


def policy_model(rlcfg, trainable, frozen):
  """(params, adapters) of the policy π_θ."""
  if rlcfg.mode == "lora":
    return frozen["base"], _sft_adapters(rlcfg, frozen) + [(trainable["policy"], rlcfg.policy_scale)]
  return trainable["policy"], []


def merged_policy(rlcfg, trainable, frozen):
  """The policy π_θ as one params tree: its adapter sets merged into the backbone (full mode: the policy copy)."""
  params, adapters = policy_model(rlcfg, trainable, frozen)
  for tree, scale in adapters:
    params = lora.merge(params, tree, scale)
  return params


def sampling_model(rlcfg, trainable, frozen, merge: bool = True):
  """(params, adapters) an eval samples the policy from: its adapters merged (one set of weights per decode step),
  except on a quantized base, where merging would make float copies of the adapted kernels: there the adapters
  stay separate and each projection is dequantized as it is used. `merge=False` only says which adapters stay
  separate (nothing is computed)."""
  params, adapters = policy_model(rlcfg, trainable, frozen)
  if quant.base_kind(params) != "none":
    return params, adapters
  if not merge:
    return params, []
  return merged_policy(rlcfg, trainable, frozen), []


def reference_model(rlcfg, frozen):
  """(params, adapters) of the reference π_SFT: the policy's stack without the policy LoRA."""
  if rlcfg.mode == "lora":
    return frozen["base"], _sft_adapters(rlcfg, frozen)
  return frozen["reference"], []


def value_model(rlcfg, trainable, frozen):
  """(params, adapters, head) of the value function V_φ."""
  if rlcfg.mode == "lora":
    adapters = _sft_adapters(rlcfg, frozen) + [(trainable["value"]["lora"], rlcfg.value_scale)]
    return frozen["base"], adapters, trainable["value"]["head"]
  return trainable["value"]["backbone"], [], trainable["value"]["head"]


def reward_model(rlcfg, frozen):
  """(params, adapters, head) of the frozen reward model r(x, y)."""
  rm = frozen["reward"]
  if rlcfg.mode == "lora":
    return frozen["base"], [(rm["lora"], rlcfg.reward_scale)], rm["head"]
  return rm["backbone"], [], rm["head"]


def sequence(prompt_BxP, prompt_mask_BxP, tokens_BxN, mask_BxN):
  """Prompt + response as one [B,P+N] batch (ids, mask)."""
  ids = jnp.concatenate([prompt_BxP, tokens_BxN], axis=1).astype(jnp.int32)
  mask = jnp.concatenate([prompt_mask_BxP, mask_BxN], axis=1).astype(jnp.int32)
  return ids, mask


def _response_hidden(model_cfg, params, adapters, ids_BxS, mask_BxS, prompt_len: int):
  hidden = models.forward(model_cfg, params, ids_BxS, mask_BxS, adapters=adapters, return_logits=False).hidden
  return hidden[:, prompt_len - 1:-1]


def tempered_entropy(logits_BxNxV, temperature: float):
  """H_n = −Σ_v p_v log p_v of softmax(logits / T) at each position (float32)."""
  logp_BxNxV = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32) / temperature, axis=-1)
  return -jnp.sum(jnp.exp(logp_BxNxV) * logp_BxNxV, axis=-1)


def _logprobs(model_cfg, params, adapters, rlcfg, ids_BxS, mask_BxS, prompt_len):
  """(log-probs, entropy) [B,N] of the response tokens: the hidden states from P−1 on, unembedded, through
  losses.token_logprobs (the one next-token log-prob definition SFT and RL share) at the sampling temperature."""
  hidden = models.forward(model_cfg, params, ids_BxS, mask_BxS, adapters=adapters, return_logits=False).hidden
  logits_Bx1pNxV = models.unembed(model_cfg, params, hidden[:, prompt_len - 1:])
  t = rlcfg.temperature if rlcfg.temperature > 0 else 1.0
  logp_BxN = losses.token_logprobs(logits_Bx1pNxV, ids_BxS[:, prompt_len - 1:], t)
  return logp_BxN, tempered_entropy(logits_Bx1pNxV[:, :-1], t)


def policy_logprobs(model_cfg: ModelConfig, rlcfg, trainable, frozen, ids_BxS, mask_BxS, prompt_len: int):
  """(log π_θ(y_n | x, y_<n) at the sampling temperature, entropy), each [B,N]; recomputed, never the sampler's."""
  params, adapters = policy_model(rlcfg, trainable, frozen)
  return _logprobs(model_cfg, params, adapters, rlcfg, ids_BxS, mask_BxS, prompt_len)


def reference_logprobs(model_cfg: ModelConfig, rlcfg, frozen, ids_BxS, mask_BxS, prompt_len: int):
  """log π_ref(y_n | x, y_<n) at the sampling temperature, [B,N]."""
  params, adapters = reference_model(rlcfg, frozen)
  return _logprobs(model_cfg, params, adapters, rlcfg, ids_BxS, mask_BxS, prompt_len)[0]


def values(model_cfg: ModelConfig, rlcfg, trainable, frozen, ids_BxS, mask_BxS, prompt_len: int):
  """V(x, y_<n) for every response token n, [B,N] float32: the value head on the state that predicts y_n."""
  params, adapters, head = value_model(rlcfg, trainable, frozen)
  return heads.head_apply(head, _response_hidden(model_cfg, params, adapters, ids_BxS, mask_BxS, prompt_len))


def rewards(model_cfg: ModelConfig, rlcfg, frozen, ids_BxS, mask_BxS):
  """r(x, y) [B]: the RM head at each row's last real token, i.e. the final response token; an ensemble's members'
  rewards combined per row (rl.reward_ensemble)."""
  if "members" in frozen["reward"]:
    r_KxB = ensemble.member_scores(model_cfg, rlcfg.reward_scale, frozen["reward"]["members"], frozen["base"],
                                   ids_BxS, mask_BxS, in_turn=rlcfg.reward_ensemble_in_turn)
    return ensemble.combine(r_KxB, rlcfg.reward_ensemble, rlcfg.reward_ensemble_lam)
  params, adapters, head = reward_model(rlcfg, frozen)
  hidden = models.forward(model_cfg, params, ids_BxS, mask_BxS, adapters=adapters, return_logits=False).hidden
  return heads.head_scores(head, hidden, mask_BxS)


# ---------------------------------------------------------------- pytrees of both modes


def _copy(tree):
  """Fresh buffers: a trainable copy must never alias a frozen array (the update step donates its state)."""
  return jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), tree)


def _without_lm_head(params):
  return {k: v for k, v in params.items() if k != "lm_head"}


def sft_params(rlcfg, base_params, sft_lora):
  """The SFT model as one params tree (full mode only): base with the SFT adapter merged, or the base."""
  return base_params if sft_lora is None else lora.merge(base_params, sft_lora, rlcfg.sft_scale)


def reward_backbone(rlcfg, base_params, reward_params):
  """The RM's backbone as one params tree: its full backbone, or base ⊕ RM LoRA merged (full mode only)."""
  if "backbone" in reward_params:
    return {**base_params, **reward_params["backbone"]}
  return lora.merge(base_params, reward_params["lora"], rlcfg.reward_scale)


def init_trainable(rng, model_cfg: ModelConfig, rlcfg, base_params, sft_lora=None, reward_params=None) -> dict:
  """{"policy"[, "value"]}: a fresh policy LoRA (B = 0, so π = π_SFT at start) or a float32 copy of the SFT model;
  when the algorithm has a value role, a value LoRA / backbone + head: fresh with a zero head (value_init "zero",
  so V = 0 until the value warm-up teaches it), copied from the RM ("reward"; an ensemble's first member) or fresh
  with a random head."""
  k_policy, k_value, k_head = jax.random.split(rng, 3)
  if reward_params is not None and "members" in reward_params:
    reward_params = jax.tree.map(lambda x: x[0], reward_params["members"])
  policy = (lora.init(k_policy, base_params, rlcfg.policy_lora) if rlcfg.mode == "lora"
            else _copy(sft_params(rlcfg, base_params, sft_lora)))
  if not rlcfg.uses_value:
    return {"policy": policy}
  from_rm = rlcfg.value_init == "reward" and reward_params is not None
  head = _copy(reward_params["head"]) if from_rm else heads.init_head(k_head, model_cfg.hidden_size)
  if rlcfg.value_init == "zero":
    head = jax.tree.map(jnp.zeros_like, head)
  if rlcfg.mode == "lora":
    if from_rm and "lora" not in reward_params:
      raise ValueError("LoRA-mode RL needs a LoRA reward model to start the value LoRA from (or value_init='zero')")
    value_lora = _copy(reward_params["lora"]) if from_rm else lora.init(k_value, base_params, rlcfg.value_lora)
    return {"policy": policy, "value": {"lora": value_lora, "head": head}}
  value_src = reward_backbone(rlcfg, base_params, reward_params) if from_rm else policy
  return {"policy": policy, "value": {"backbone": _copy(_without_lm_head(value_src)), "head": head}}


def frozen_params(rlcfg, base_params, sft_lora=None, reward_params=None) -> dict:
  """LoRA: {"base", "sft", "reward": {"lora", "head"}} — the one backbone; full: {"reference", "reward":
  {"backbone", "head"}}. reward_params None leaves the reward role out (a programmatic reward_fn scores)."""
  if rlcfg.mode == "lora":
    if reward_params is not None and not {"lora", "members"} & set(reward_params):
      raise ValueError("LoRA-mode RL holds one backbone: the reward model must be a LoRA RM on it")
    return {"base": base_params, "sft": sft_lora, "reward": reward_params}
  keep_dtype_copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
  rm = None if reward_params is None else {  # A separate copy, as a separately trained RM would be.
      "backbone": keep_dtype_copy(_without_lm_head(reward_backbone(rlcfg, base_params, reward_params))),
      "head": reward_params["head"]}
  return {"reference": sft_params(rlcfg, base_params, sft_lora), "reward": rm}
