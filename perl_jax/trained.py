"""What the SFT and RM stages train, as pure functions over (trainable, frozen) pytrees, and their restore from a
run folder: what every later stage, eval and export stands on. The stage modules (sft, reward, rl) import this,
never each other.

Policy (SFT): a LoRA over the frozen base (PERL), {"lora": ...}, or a float32 copy of every base param, LM head
  included (full tuning), {"backbone": ...}.
Reward model: decoder backbone (+ LoRA) + scalar head on the last non-pad token, {"lora" | "backbone", "head"};
  a full RM's frozen part is only an untied LM head it never reads. An RM may start from an SFT run (`init_from`):
  that SFT model, merged, is then its backbone.
"""
import dataclasses
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from perl_jax import data, heads, lora, models, runs
from perl_jax.models import quant
from perl_jax.errors import ConfigError
from perl_jax.models import ModelConfig

log = logging.getLogger("perl_jax")


# ---------------------------------------------------------------- the policy (SFT)


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
  """How the policy is tuned: mode "lora" (PERL) | "full", and the LoRA shape."""
  mode: str = "lora"
  lora_cfg: lora.LoraConfig = lora.LoraConfig()


def check_mode(config: ml_collections.ConfigDict) -> None:
  """mode is "lora" | "full"; a quantized base (config.model.quant) is frozen, so only LoRA mode can stand on it."""
  if config.mode not in ("lora", "full"):
    raise ConfigError(f"config: field 'mode': must be 'lora' or 'full', got '{config.mode}'")
  kind = config.model.get("quant", "none") if "model" in config else "none"
  quant.check_kind(kind)
  quant.check_double(kind, config.model.get("quant_double", False) if "model" in config else False)
  if kind != "none" and config.mode == "full":
    raise ConfigError(f"config: field 'model.quant': '{kind}' stores the frozen base quantized, and full tuning "
                      "(mode 'full') trains every base weight; use mode 'lora' or model.quant 'none'")


def policy_config(config: ml_collections.ConfigDict) -> PolicyConfig:
  check_mode(config)
  return PolicyConfig(mode=config.mode, lora_cfg=lora.config_from(config.lora))


def init_policy(rng, pcfg: PolicyConfig, base_params) -> dict:
  """{"lora": A ~ U(±1/√in), B = 0} (the policy starts as the base) or {"backbone": float32 copy of the base}."""
  if pcfg.mode == "lora":
    return {"lora": lora.init(rng, base_params, pcfg.lora_cfg)}
  if pcfg.mode == "full":
    return {"backbone": jax.tree.map(lambda x: x.astype(jnp.float32), base_params)}
  raise ConfigError(f"config: field 'mode': must be 'lora' or 'full', got '{pcfg.mode}'")


def policy_frozen(pcfg: PolicyConfig, base_params) -> dict:
  """The whole base under LoRA; nothing under full tuning (every param is trained)."""
  return base_params if pcfg.mode == "lora" else {}


def policy_params(pcfg: PolicyConfig, trainable, frozen) -> tuple[dict, list]:
  """(params, adapters) for models.forward: base + [(LoRA, α/r)], or the trained backbone alone."""
  if pcfg.mode == "lora":
    return frozen, [(trainable["lora"], lora.scale(pcfg.lora_cfg))]
  return {**frozen, **trainable["backbone"]}, []


def merged_policy(pcfg: PolicyConfig, trainable, frozen, like: dict) -> dict:
  """The policy as one params tree in the dtypes of `like` (the base): base ⊕ (α/r)·A·B merged into the kernels
  (LoRA, in float32) or the tuned backbone (full). A quantized base is dequantized first: its kernels come out in
  float32."""
  params, adapters = policy_params(pcfg, trainable, frozen)
  params = quant.dequantize_base(params)
  for tree, scale in adapters:
    params = lora.merge(params, tree, scale)
  return jax.tree.map(lambda x, ref: x.astype(getattr(ref, "dtype", jnp.float32)), params, like)


def restore_policy(workdir, *, step: int | None = None, model_path: str | None = None, mesh=None,
                   loaded=None) -> runs.Trained:
  """An SFT run as a `runs.Trained` (stage: its PolicyConfig; frozen: its whole base), checkpoint `step` (default
  latest); `loaded` = (model_cfg, base, tokenizer) already loaded from the same model (it is not loaded again)."""
  def build(config, mesh):
    pcfg = policy_config(config)
    model_cfg, base, tokenizer = loaded or runs.load_model(config.model)
    like = jax.eval_shape(lambda b: init_policy(jax.random.key(0), pcfg, b), base)
    return model_cfg, tokenizer, base, pcfg, like
  return runs.restore_stage(workdir, build=build, step=step, model_path=model_path, mesh=mesh)


# ---------------------------------------------------------------- the reward model


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """How the RM is built and trained: mode "lora" | "full", loss "bt" (pairwise) | "bce" (binary; positive
  labels weighted by pos_weight)."""
  mode: str = "lora"
  loss: str = "bt"
  lora_cfg: lora.LoraConfig = lora.LoraConfig()
  pos_weight: float = 1.0


def reward_config(config: ml_collections.ConfigDict) -> RewardConfig:
  """RewardConfig from a run config: Bradley-Terry for pairwise formats, BCE for binary ones."""
  check_mode(config)
  if config.get("head_init", "random") not in ("random", "probe"):
    raise models.ConfigError(f"config: field 'head_init': must be 'random' or 'probe', got '{config.head_init}'")
  kind = data.KINDS.get(config.data.format)
  if kind is None:
    raise models.ConfigError(f"config: field 'data.format': unknown format '{config.data.format}' "
                             f"(one of {', '.join(sorted(data.KINDS))})")
  return RewardConfig(mode=config.mode, loss="bt" if kind == "pairwise" else "bce",
                      lora_cfg=lora.config_from(config.lora), pos_weight=float(config.get("pos_weight", 1.0)))


def init_reward(rng, rcfg: RewardConfig, model_cfg: ModelConfig, base_params) -> dict:
  """The trained pytree: LoRA + head (PERL) or a float32 copy of the backbone + head (full)."""
  k_lora, k_head = jax.random.split(rng)
  head = heads.init_head(k_head, model_cfg.hidden_size)
  if rcfg.mode == "lora":
    return {"lora": lora.init(k_lora, base_params, rcfg.lora_cfg), "head": head}
  if rcfg.mode == "full":
    backbone = {k: v for k, v in base_params.items() if k != "lm_head"}
    return {"backbone": jax.tree.map(lambda x: x.astype(jnp.float32), backbone), "head": head}
  raise models.ConfigError(f"config: field 'mode': must be 'lora' or 'full', got '{rcfg.mode}'")


def reward_frozen(rcfg: RewardConfig, base_params) -> dict:
  """What stays frozen beside the trainable pytree: the whole base (LoRA), or only an untied LM head the RM
  never reads (full: kept for export, neither trained nor given optimizer state)."""
  if rcfg.mode == "lora":
    return base_params
  return {k: v for k, v in base_params.items() if k == "lm_head"}


def last_hidden(model_cfg: ModelConfig, rcfg: RewardConfig, trainable, base_params, ids_BxT, mask_BxT):
  """h_last [B,D]: the final hidden state the head reads, at each row's last non-pad token."""
  if rcfg.mode == "lora":
    params, adapters = base_params, [(trainable["lora"], lora.scale(rcfg.lora_cfg))]
  else:
    params, adapters = {**base_params, **trainable["backbone"]}, []
  hidden = models.forward(model_cfg, params, ids_BxT, mask_BxT, adapters=adapters, return_logits=False).hidden
  return heads.last_token(hidden, mask_BxT)


def scores(model_cfg: ModelConfig, rcfg: RewardConfig, trainable, base_params, ids_BxT, mask_BxT):
  """Scalar rewards r_B (float32) read at each row's last non-pad token."""
  return heads.head_apply(trainable["head"], last_hidden(model_cfg, rcfg, trainable, base_params, ids_BxT, mask_BxT))


def batch_features(model_cfg, rcfg, trainable, base_params, batch) -> jax.Array:
  """The head's inputs for a batch: [B,2,D] (chosen, rejected) for pairwise data, [B,D] for binary data."""
  ids, mask = batch["input_ids"], batch["attention_mask"]
  if ids.ndim == 3:
    b, two, t = ids.shape
    h = last_hidden(model_cfg, rcfg, trainable, base_params, ids.reshape(b * two, t), mask.reshape(b * two, t))
    return h.reshape(b, two, -1)
  return last_hidden(model_cfg, rcfg, trainable, base_params, ids, mask)


def batch_scores(model_cfg, rcfg, trainable, base_params, batch) -> jax.Array:
  """Rewards for a batch: [B,2] (chosen, rejected) for pairwise data, [B] for binary data."""
  return heads.head_apply(trainable["head"], batch_features(model_cfg, rcfg, trainable, base_params, batch))


def reward_backbone(config, mesh, check: bool = True):
  """(model config, base params, tokenizer) the RM is built on: config.model, or with config.init_from (an SFT run
  folder on that same model; `check` compares the two model paths) the SFT model: its adapter merged into the base,
  or its tuned backbone. Training, restore, export and RL all rebuild the base through here, so they agree on it.
  With config.model.quant the SFT model is quantized after its adapter is merged into the float base."""
  src = config.get("init_from", "")
  model_cfg, base, tokenizer = runs.load_model(config.model, quantize=not src)
  if not src:
    return model_cfg, base, tokenizer
  runs.require_run_folder(src, "init_from")
  theirs, ours = runs.model_path(runs.read_config(src).model), runs.model_path(config.model)
  if check and not runs.same_path(theirs, ours):
    raise models.ConfigError(f"{src}: the SFT run (config field 'init_from') was trained on another backbone "
                             f"({theirs}) than this reward model's ({ours})")
  sft_run = restore_policy(src, model_path=ours, mesh=mesh, loaded=(model_cfg, base, tokenizer))
  log.info("reward model starts from the SFT run %s (step %d, %s)", src, sft_run.step, sft_run.stage.mode)
  merged = merged_policy(sft_run.stage, sft_run.trainable, sft_run.frozen, base)
  return model_cfg, runs.quantize_base(config.model, merged), tokenizer  # Quantized after the merge.


def restore_reward(workdir, *, step: int | None = None, model_path: str | None = None,
                   mesh=None, model_overrides: dict | None = None) -> runs.Trained:
  """An RM run as a `runs.Trained` (stage: its RewardConfig; frozen: the whole backbone it stands on, see
  load_backbone), checkpoint `step` (default latest). `model_path` replaces the run's base model path (e.g. when the
  base moved since training); `model_overrides` replaces other config.model fields (RL computes in its own dtype)."""
  def build(config, mesh):
    rcfg = reward_config(config)
    model_cfg, base, tokenizer = reward_backbone(config, mesh, check=model_path is None)
    like = jax.eval_shape(lambda b: init_reward(jax.random.key(0), rcfg, model_cfg, b), base)
    return model_cfg, tokenizer, base, rcfg, like
  return runs.restore_stage(workdir, build=build, step=step, model_path=model_path, mesh=mesh,
                            model_overrides=model_overrides)


def head_bias(rm: runs.Trained) -> float:
  return float(np.asarray(rm.trainable["head"]["bias"]).reshape(-1)[0])
