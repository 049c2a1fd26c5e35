"""A causal-LM policy as the SFT stage trains it and later stages stand on it: a LoRA over the frozen base (PERL)
or a float32 copy of every base param, LM head included (full tuning). Its trainable tree is {"lora": ...} or
{"backbone": ...}; `frozen_params` is the rest. An RM started from an SFT run (`init_from`) and RL's anchor read an
SFT run through here and `runs`, never through the SFT stage's module.
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from perl_jax import lora, runs
from perl_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
  """How the policy is tuned: mode "lora" (PERL) | "full", and the LoRA shape."""
  mode: str = "lora"
  lora_cfg: lora.LoraConfig = lora.LoraConfig()


def config_from(config: ml_collections.ConfigDict) -> PolicyConfig:
  if config.mode not in ("lora", "full"):
    raise ConfigError(f"config: field 'mode': must be 'lora' or 'full', got '{config.mode}'")
  return PolicyConfig(mode=config.mode, lora_cfg=lora.config_from(config.lora))


def init_trainable(rng, pcfg: PolicyConfig, base_params) -> dict:
  """{"lora": A ~ U(±1/√in), B = 0} (the policy starts as the base) or {"backbone": float32 copy of the base}."""
  if pcfg.mode == "lora":
    return {"lora": lora.init(rng, base_params, pcfg.lora_cfg)}
  if pcfg.mode == "full":
    return {"backbone": jax.tree.map(lambda x: x.astype(jnp.float32), base_params)}
  raise ConfigError(f"config: field 'mode': must be 'lora' or 'full', got '{pcfg.mode}'")


def frozen_params(pcfg: PolicyConfig, base_params) -> dict:
  """The whole base under LoRA; nothing under full tuning (every param is trained)."""
  return base_params if pcfg.mode == "lora" else {}


def model_params(pcfg: PolicyConfig, trainable, frozen) -> tuple[dict, list]:
  """(params, adapters) for models.forward: base + [(LoRA, α/r)], or the trained backbone alone."""
  if pcfg.mode == "lora":
    return frozen, [(trainable["lora"], lora.scale(pcfg.lora_cfg))]
  return {**frozen, **trainable["backbone"]}, []


def merged(pcfg: PolicyConfig, trainable, frozen, like: dict) -> dict:
  """The policy as one params tree in the dtypes of `like` (the base): base ⊕ (α/r)·A·B merged into the kernels
  (LoRA, in float32) or the tuned backbone (full)."""
  params, adapters = model_params(pcfg, trainable, frozen)
  for tree, scale in adapters:
    params = lora.merge(params, tree, scale)
  return jax.tree.map(lambda x, ref: x.astype(ref.dtype), params, like)


def restore(workdir, *, step: int | None = None, model_path: str | None = None, mesh=None,
            loaded=None) -> runs.Trained:
  """An SFT run as a `runs.Trained` (stage: its PolicyConfig; frozen: its whole base), checkpoint `step` (default
  latest); `loaded` = (model_cfg, base, tokenizer) already loaded from the same model (it is not loaded again)."""
  def build(config, mesh):
    pcfg = config_from(config)
    model_cfg, base, tokenizer = loaded or runs.load_model(config.model)
    like = jax.eval_shape(lambda b: init_trainable(jax.random.key(0), pcfg, b), base)
    return model_cfg, tokenizer, base, pcfg, like
  return runs.restore_stage(workdir, build=build, step=step, model_path=model_path, mesh=mesh)
