"""What an RL run stands on, rebuilt from its config: the RM and SFT runs loaded onto one backbone (`load_roles`,
a `Roles` record), the RLConfig they fix (`config_from`), the checks made before compiling, and the restore of a
finished RL run (`restore`). Training, evaluation and export all go through here.

RM / SFT folders that are missing, or trained on another backbone or tokenizer, are a ConfigError (the script
prints one line and exits 2). `reward_workdir` may name K LoRA RM runs (an ensemble, rl.reward_ensemble): their
adapters and heads are stacked as the reward role's "members" on the one backbone (perl_jax.ensemble).
LoRA mode keeps one base: the RM's; the SFT run contributes only its adapter (an RM trained from an SFT run,
`init_from`, already stands on that SFT model: it is the base and the anchor).
The base model is loaded once: the RM's restore loads it and the SFT run is restored onto it.
"""
import dataclasses
import glob
import logging
import os
from typing import Any

import jax
import ml_collections

from perl_jax import ensemble, lora, models, runs, trained
from perl_jax.data import pipeline
from perl_jax.rl import RLConfig, roles

log = logging.getLogger("perl_jax")


@dataclasses.dataclass(frozen=True)
class Roles:
  """The frozen inputs of the four roles, as read from the RM and SFT runs."""
  model_cfg: models.ModelConfig
  tokenizer: Any
  base: dict  # The one backbone (LoRA mode), or the model the full-mode copies start from.
  sft_lora: dict | None  # The SFT adapter stacked under the policy (LoRA SFT), else None.
  sft_scale: float
  reward: dict  # The RM's trained params: {"lora" | "backbone", "head"}, or an ensemble's {"members": stacked}.
  reward_scale: float
  reward_lora: lora.LoraConfig  # The RM adapter's shape (value_init "reward" copies it).


def config_from(config: ml_collections.ConfigDict, r_: Roles | None = None) -> RLConfig:
  """RLConfig from a run config plus what the loaded runs fix (adapter scales, EOS / pad ids); fields newer than
  a run's config (an older run folder) take their RLConfig defaults. Without roles (the config's own checks, before
  anything is loaded) those fields take placeholders."""
  r = config.rl
  trained.check_mode(config)
  if r_ is None:
    r_ = Roles(None, None, None, None, 1.0, {}, 1.0, lora.config_from(config.lora))
    eos_id, pad_id, stop_ids, compute = -1, 0, (), "float32"
  else:
    eos = r_.model_cfg.eos_token_id
    eos_id, pad_id = -1 if eos is None else eos, pipeline.pad_id(r_.tokenizer)
    stop_ids, compute = stop_sequences(config, r_.tokenizer, eos_id), r_.model_cfg.dtype
  cache = r.get("cache_dtype", "float32")
  return RLConfig(
      mode=config.mode, algorithm=r.algorithm, objective=r.objective, kl_coef=r.kl_coef,
      kl_estimator=r.kl_estimator, kl_target=r.kl_target or None, kl_horizon=r.kl_horizon,
      max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
      eos_id=eos_id, pad_id=pad_id, stop_ids=stop_ids, cache_dtype=compute if cache == "auto" else cache,
      samples_per_prompt=r.get("samples_per_prompt", 1), unfinished_reward=r.get("unfinished_reward"),
      gamma=r.gamma, lam=r.lam, whiten_advantages=r.whiten_advantages, clip_eps=r.clip_eps,
      value_clip_eps=r.value_clip_eps or None, vf_coef=r.vf_coef, value_warmup_steps=r.get("value_warmup_steps", 0),
      ppo_epochs=r.ppo_epochs, num_minibatches=r.num_minibatches, num_microbatches=r.get("num_microbatches", 1),
      policy_lora=lora.config_from(config.lora), value_lora=value_lora_cfg(config, r_.reward_lora),
      value_init=r.value_init, sft_scale=r_.sft_scale, reward_scale=r_.reward_scale,
      reward_ensemble=r.get("reward_ensemble", "none"), reward_ensemble_lam=r.get("reward_ensemble_lam", 1.0),
      reward_ensemble_in_turn=r.get("reward_ensemble_in_turn", False))


def run_time_model(config) -> dict:
  """The RL config's run-time model choices (compute and param dtype, remat, attention, a quantized base): the roles
  are loaded with these, not with the RM run's, so an RL config decides its own precision (dtype "auto": bf16 on
  GPU / TPU) and how the one base is stored (model.quant)."""
  return {k: config.model[k] for k in ("dtype", "param_dtype", "remat", "attention", "quant", "quant_block",
                                         "quant_double")
          if k in config.model}


def _stop_strings_besides_eos(config, tokenizer, eos_id: int) -> tuple:
  """config.rl.stop_strings less the EOS token's own text (the default "<|im_end|>" for chat models): rows already
  end at EOS on device."""
  eos_text = tokenizer.decode([eos_id]) if eos_id >= 0 else None
  return tuple(s for s in config.rl.stop_strings if s != eos_text)


def stop_sequences(config, tokenizer, eos_id: int) -> tuple:
  """The stop strings besides EOS as token-id sequences (each string's own tokenization): the sampler ends a row on
  device when its last tokens spell one (sampling.stop_hit), on any number of processes."""
  return tuple(tuple(int(t) for t in tokenizer(s, add_special_tokens=False)["input_ids"])
               for s in _stop_strings_besides_eos(config, tokenizer, eos_id))


def value_lora_cfg(config, rm_lora_cfg) -> lora.LoraConfig:
  """The value LoRA's shape: the RM's (value_init "reward" copies it) or the policy's."""
  return rm_lora_cfg if config.rl.value_init == "reward" else lora.config_from(config.lora)


def _anchor_is_rm_start(config, rm_start) -> None:
  sft_dir = config.get("sft_workdir") or ""
  if sft_dir and not runs.same_path(sft_dir, rm_start):
    raise models.ConfigError(f"{sft_dir}: the reward model {reward_folders(config)[0]} starts from the SFT run "
                             f"{rm_start}, so RL's anchor is that run; config field 'sft_workdir' must name it or "
                             "be empty")
  log.info("the reward model starts from the SFT run %s: the SFT model (merged) is the backbone and the anchor",
           rm_start)


def reward_folders(config) -> list[str]:
  """config.reward_workdir as RM run folders: one folder, or several joined by os.pathsep (':'), each of which may
  be a glob pattern (its matches sorted), e.g. 'runs/rm_ensemble/member*' for a sweep's K members. A pattern that
  matches nothing is a one-line ConfigError."""
  folders = []
  for part in filter(None, (config.get("reward_workdir") or "").split(os.pathsep)):
    matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
    if not matches:
      raise models.ConfigError(f"config: field 'reward_workdir': '{part}' matches no folder")
    folders += [m for m in matches if m not in folders]
  if not folders:
    raise models.ConfigError("config: field 'reward_workdir': required (an RM run folder)")
  return folders


def _ensemble_members(folders: list[str], configs: list, rm: runs.Trained, mesh) -> dict:
  """{"members": the K RMs' {"lora", "head"} stacked}; member 0 is `rm` (already restored on the base)."""
  like = jax.eval_shape(lambda: rm.trainable)
  members = [rm.trainable]
  for folder, config in zip(folders[1:], configs[1:]):
    problem = ensemble.member_mismatch(configs[0], config)
    if problem:
      raise models.ConfigError(f"{folder}: cannot join the reward ensemble (config field 'reward_workdir'): {problem}")
    members.append(runs.restore_trainable(folder, mesh, like=like)[1])
  log.info("reward ensemble: %d LoRA RMs on one backbone (%s)", len(members), ", ".join(folders))
  return {"members": ensemble.stack(members)}


def load_roles(config, mesh) -> Roles:
  """The RM run(s) (config.reward_workdir) and the SFT run (config.sft_workdir, optional) as one Roles record."""
  folders = reward_folders(config)
  how = config.rl.get("reward_ensemble", "none")
  if len(folders) > 1 and how == "none":
    raise models.ConfigError(f"config: field 'reward_workdir': names {len(folders)} RM runs; set rl.reward_ensemble "
                             f"to one of {', '.join(ensemble.COMBINE)} to combine them")
  configs = []
  for folder in folders:
    runs.require_run_folder(folder, "reward_workdir")
    configs.append(runs.require_stage(folder, "reward", "config field 'reward_workdir'"))
  if config.get("sft_workdir"):
    runs.require_run_folder(config.sft_workdir, "sft_workdir")
  rm = trained.restore_reward(folders[0], model_path=config.model.path or None, mesh=mesh,
                              model_overrides=run_time_model(config))
  model_cfg, tokenizer, base = rm.model_cfg, rm.tokenizer, rm.frozen
  rm_params = dict(rm.trainable)
  rm_scale, rm_lora = lora.scale(rm.stage.lora_cfg), rm.stage.lora_cfg
  if "backbone" in rm_params and config.mode == "lora":
    raise models.ConfigError(f"{folders[0]}: LoRA-mode RL needs a LoRA reward model (one backbone)")
  if how != "none":
    rm_params = _ensemble_members(folders, configs, rm, mesh)
  if "backbone" in rm_params and rm.config.get("init_from"):  # A full RM's own backbone is its trainable copy;
    model_cfg, base, _ = runs.load_model(rm.config.model)      # the roles start from the plain base model.
  elif rm.config.get("init_from"):  # A LoRA RM on an SFT model: that SFT model is the one backbone and the anchor.
    _anchor_is_rm_start(config, rm.config.init_from)
    return Roles(model_cfg, tokenizer, base, None, 1.0, rm_params, rm_scale, rm_lora)
  sft_lora, sft_scale = None, 1.0
  if config.get("sft_workdir"):
    if not config.model.path:  # Refuse before restoring: another model's checkpoint would not even load.
      a, b = runs.model_path(runs.read_config(config.sft_workdir).model), runs.model_path(rm.config.model)
      if not runs.same_path(a, b):
        raise models.ConfigError(f"{config.sft_workdir}: the SFT run was trained on another backbone ({a}) "
                                 f"than the reward model ({b})")
    pol = trained.restore_policy(config.sft_workdir, model_path=config.model.path or None, mesh=mesh,
                         loaded=(model_cfg, base, tokenizer))
    if pol.stage.mode == "lora":
      sft_lora, sft_scale = pol.trainable["lora"], lora.scale(pol.stage.lora_cfg)
    elif config.mode == "lora":
      raise models.ConfigError(f"{config.sft_workdir}: LoRA-mode RL needs a LoRA SFT run (one backbone)")
    else:  # Full SFT under full RL: the SFT backbone is the model everything starts from.
      base = {**base, **pol.trainable["backbone"]}
  return Roles(model_cfg, tokenizer, base, sft_lora, sft_scale, rm_params, rm_scale, rm_lora)


def host_stop_strings(config, tokenizer, eos_id: int) -> tuple:
  """The stop strings the host also cuts at, as text (single process only). The sampler already ends rows on
  device at EOS and at each stop string's own tokenization (stop_sequences); the host's text check also catches a
  stop string the model spelled with other tokens. With several processes the device check is all there is (the
  host cut would pull global samples to one process)."""
  stop = _stop_strings_besides_eos(config, tokenizer, eos_id)
  if stop and jax.process_count() > 1:
    log.info("rl.stop_strings %s end rows on device at their own tokenization only (several processes)", list(stop))
    return ()
  return stop


def check_context(config, model_cfg) -> None:
  """A prompt window plus the response must fit the model's context, or sampling runs past its positions."""
  need, ctx = config.data.max_prompt_len + config.rl.max_new_tokens, model_cfg.max_position_embeddings
  if ctx and need > ctx:
    raise models.ConfigError(f"config: fields 'data.max_prompt_len' + 'rl.max_new_tokens' = {need} tokens exceed "
                             f"the model's context ({ctx} tokens)")


def check_batch(config, rlcfg, mesh) -> None:
  """Prompts per step divide over data × fsdp; the rollout's rows (prompts × samples_per_prompt) over data × fsdp
  × minibatches × microbatches. One line naming the field otherwise."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  b, k = config.data.batch_size, rlcfg.samples_per_prompt
  if b % shards:
    raise models.ConfigError(f"config: field 'data.batch_size': {b} prompts are not divisible by data x fsdp "
                             f"({shards})")
  cuts = shards * rlcfg.num_minibatches * rlcfg.num_microbatches
  if (b * k) % cuts:
    raise models.ConfigError(f"config: field 'data.batch_size': {b} prompts x rl.samples_per_prompt ({k}) = {b * k} "
                             f"rollout rows are not divisible by data x fsdp ({shards}) x rl.num_minibatches "
                             f"({rlcfg.num_minibatches}) x rl.num_microbatches ({rlcfg.num_microbatches})")


def restore(workdir, *, step: int | None = None, mesh=None) -> runs.Trained:
  """An RL run as a `runs.Trained` (stage: its RLConfig; frozen: the roles' frozen tree), its roles rebuilt from its
  RM / SFT folders and its trained policy (and value) restored from checkpoint `step` (default latest)."""
  def build(config, mesh):
    r = load_roles(config, mesh)
    rlcfg = config_from(config, r)
    like = jax.eval_shape(lambda b: roles.init_trainable(jax.random.key(config.seed), r.model_cfg, rlcfg, b,
                                                         r.sft_lora, r.reward), r.base)
    return r.model_cfg, r.tokenizer, roles.frozen_params(rlcfg, r.base, r.sft_lora, r.reward), rlcfg, like
  return runs.restore_stage(workdir, build=build, step=step, mesh=mesh)
