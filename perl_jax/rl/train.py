"""The RL stage over the shared loop: load the RM and SFT runs onto one backbone, read prompts, run RLStep in
trainer.run (resume, cadence, metrics.jsonl / TensorBoard, checkpoints, summary), log sample texts.

RM / SFT folders that are missing, or trained on another backbone or tokenizer, are a ConfigError (the script
prints one line and exits 2). LoRA mode keeps one base: the RM's; the SFT run contributes only its adapter
(an RM trained from an SFT run, `init_from`, already stands on that SFT model: it is the base and the anchor).
"""
import dataclasses
import json
import logging
import pathlib

import jax
import ml_collections
import numpy as np

from perl_jax import checkpoint, data, lora, models, optimizer, reward, runs, sft, sharding, trainer
from perl_jax.data import pipeline
from perl_jax.rl import RLConfig, learner, roles, rollout
from perl_jax.rl.step import RLStep

log = logging.getLogger("perl_jax")
SAMPLES_FILE = "samples.jsonl"


def config_from(config: ml_collections.ConfigDict, model_cfg, tokenizer, rm_scale: float, sft_scale: float,
                value_lora: lora.LoraConfig) -> RLConfig:
  """RLConfig from a run config plus what the loaded runs fix (adapter scales, EOS / pad ids); fields newer than
  a run's config (an older run folder) take their RLConfig defaults."""
  r = config.rl
  return RLConfig(
      mode=config.mode, algorithm=r.algorithm, objective=r.objective, kl_coef=r.kl_coef,
      kl_estimator=r.kl_estimator, kl_target=r.kl_target or None, kl_horizon=r.kl_horizon,
      max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
      eos_id=-1 if model_cfg.eos_token_id is None else model_cfg.eos_token_id, pad_id=pipeline.pad_id(tokenizer),
      samples_per_prompt=r.get("samples_per_prompt", 1), unfinished_reward=r.get("unfinished_reward"),
      gamma=r.gamma, lam=r.lam, whiten_advantages=r.whiten_advantages, clip_eps=r.clip_eps,
      value_clip_eps=r.value_clip_eps or None, vf_coef=r.vf_coef, value_warmup_steps=r.get("value_warmup_steps", 0),
      ppo_epochs=r.ppo_epochs, num_minibatches=r.num_minibatches, num_microbatches=r.get("num_microbatches", 1),
      policy_lora=lora.config_from(config.lora), value_lora=value_lora, value_init=r.value_init,
      sft_scale=sft_scale, reward_scale=rm_scale)


def value_lora_cfg(config, rm_lora_cfg) -> lora.LoraConfig:
  """The value LoRA's shape: the RM's (value_init "reward" copies it) or the policy's."""
  return rm_lora_cfg if config.rl.value_init == "reward" else lora.config_from(config.lora)


def _same_backbone(name: str, workdir, other_cfg, other_tok, model_cfg, tokenizer) -> None:
  same = dataclasses.replace(other_cfg, dtype=model_cfg.dtype, remat=model_cfg.remat, attention=model_cfg.attention)
  if same != model_cfg:
    raise models.ConfigError(f"{workdir}: the {name} run was trained on another backbone than the reward model")
  if other_tok.get_vocab() != tokenizer.get_vocab():
    raise models.ConfigError(f"{workdir}: the {name} run used another tokenizer than the reward model")


def _anchor_is_rm_start(config, rm_start) -> None:
  sft_dir = config.get("sft_workdir") or ""
  if sft_dir and not runs.same_path(sft_dir, rm_start):
    raise models.ConfigError(f"{sft_dir}: the reward model {config.reward_workdir} starts from the SFT run "
                             f"{rm_start}, so RL's anchor is that run; config field 'sft_workdir' must name it or "
                             "be empty")
  log.info("the reward model starts from the SFT run %s: the SFT model (merged) is the backbone and the anchor",
           rm_start)


def load_roles(config, mesh):
  """(model_cfg, tokenizer, base, sft adapter or None, RM {"lora"|"backbone", "head"}, RM scale, SFT scale)."""
  for name in ("reward_workdir", "sft_workdir"):
    path = config.get(name) or ""
    if name == "reward_workdir" and not path:
      raise models.ConfigError("config: field 'reward_workdir': required (an RM run folder)")
    if path:
      runs.require_run_folder(path, name)
  rm = reward.restore(config.reward_workdir, model_path=config.model.path or None, mesh=mesh)
  model_cfg, tokenizer, base = rm.model_cfg, rm.tokenizer, rm.base
  rm_params = {k: v for k, v in rm.trainable.items()}
  if "backbone" in rm_params and config.mode == "lora":
    raise models.ConfigError(f"{config.reward_workdir}: LoRA-mode RL needs a LoRA reward model (one backbone)")
  if "backbone" in rm_params:  # A full RM's frozen part is only an unused LM head: load the base itself.
    model_cfg, base, _ = runs.load_model(rm.config.model)
  elif rm.config.get("init_from"):  # A LoRA RM on an SFT model: that SFT model is the one backbone and the anchor.
    _anchor_is_rm_start(config, rm.config.init_from)
    return model_cfg, tokenizer, base, None, rm_params, lora.scale(rm.rcfg.lora_cfg), 1.0, rm.rcfg.lora_cfg
  sft_lora, sft_scale = None, 1.0
  if config.get("sft_workdir"):
    if not config.model.path:  # Refuse before restoring: another model's checkpoint would not even load.
      a, b = runs.model_path(runs.read_config(config.sft_workdir).model), runs.model_path(rm.config.model)
      if not runs.same_path(a, b):
        raise models.ConfigError(f"{config.sft_workdir}: the SFT run was trained on another backbone ({a}) "
                                 f"than the reward model ({b})")
    pol = sft.restore(config.sft_workdir, model_path=config.model.path or None, mesh=mesh)
    _same_backbone("SFT", config.sft_workdir, pol.model_cfg, pol.tokenizer, model_cfg, tokenizer)
    if pol.scfg.mode == "lora":
      sft_lora, sft_scale = pol.trainable["lora"], lora.scale(pol.scfg.lora_cfg)
    elif config.mode == "lora":
      raise models.ConfigError(f"{config.sft_workdir}: LoRA-mode RL needs a LoRA SFT run (one backbone)")
    else:  # Full SFT under full RL: the SFT backbone is the model everything starts from.
      base = {**base, **pol.trainable["backbone"]}
  return model_cfg, tokenizer, base, sft_lora, rm_params, lora.scale(rm.rcfg.lora_cfg), sft_scale, rm.rcfg.lora_cfg


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


def load_prompts(config, tokenizer):
  """(train prompt arrays, held-out prompts, info). A prompt longer than data.max_prompt_len keeps its last
  tokens (data.truncate_prompts=True, the default) or is a one-line DataError naming the file and conversation."""
  dc = config.data
  prompts = data.read_prompts(dc.format, dc.path, skip_invalid=dc.skip_invalid)
  train, held_out = data.split_by_group(prompts, dc.eval_fraction, seed=dc.seed)
  if dc.max_train_prompts:
    train = train[: dc.max_train_prompts]
  arrays, n_trunc = data.encode_prompts(train, tokenizer, dc.max_prompt_len)
  if n_trunc and not dc.get("truncate_prompts", True):
    lengths = [len(ids) for ids in data.pipeline.tokenize_prompts(tokenizer, [p["prompt"] for p in train])]
    i = next(i for i, n in enumerate(lengths) if n > dc.max_prompt_len)
    raise data.DataError(dc.path, field="prompt", problem=(
        f"{n_trunc} of {len(train)} training prompts exceed data.max_prompt_len={dc.max_prompt_len} tokens (the "
        f"first: conversation {train[i]['group']}, {lengths[i]} tokens); raise it, or set data.truncate_prompts=True "
        "to keep each prompt's last tokens"))
  log.info("prompts: %d train (%d truncated to %d tokens), %d held out", len(train), n_trunc, dc.max_prompt_len,
           len(held_out))
  return arrays, held_out, {"train_prompts": len(train), "held_out_prompts": len(held_out),
                            "truncated_prompts": n_trunc}


def trim_samples(workdir, last_step: int | None) -> None:
  """On resume: drop sample lines of steps after the checkpoint the run restarts from (it redoes those steps, and
  would write their lines again)."""
  path = pathlib.Path(workdir) / SAMPLES_FILE
  if jax.process_index() != 0 or not path.exists():
    return
  keep = [line for line in path.read_text().splitlines(keepends=True)
          if last_step is not None and json.loads(line)["step"] <= last_step]
  path.write_text("".join(keep))


def _write_samples(workdir, step: int, batch, tokenizer, n: int) -> None:
  if jax.process_index() != 0 or n <= 0:
    return
  b = {k: np.asarray(batch[k][:n]) for k in ("prompt_BxP", "prompt_mask_BxP", "tokens_BxN", "mask_BxN", "score_B")}
  with open(pathlib.Path(workdir) / SAMPLES_FILE, "a") as f:
    for i in range(len(b["score_B"])):
      f.write(json.dumps({"step": step, "reward": float(b["score_B"][i]),
                          "prompt": tokenizer.decode(b["prompt_BxP"][i][b["prompt_mask_BxP"][i] > 0]),
                          "response": tokenizer.decode(b["tokens_BxN"][i][b["mask_BxN"][i] > 0])}) + "\n")


def train(config: ml_collections.ConfigDict, workdir, stop_after: int | None = None):
  """Trains (or resumes) the RL policy described by `config` in `workdir`; returns (final state, eval)."""
  sharding.initialize_distributed(config.multihost)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  model_cfg, tokenizer, base, sft_lora, rm_params, rm_scale, sft_scale, rm_lora_cfg = load_roles(config, mesh)
  rlcfg = config_from(config, model_cfg, tokenizer, rm_scale, sft_scale, value_lora_cfg(config, rm_lora_cfg))
  check_context(config, model_cfg)
  check_batch(config, rlcfg, mesh)
  arrays, held_out, info = load_prompts(config, tokenizer)
  if len(arrays["input_ids"]) < config.data.batch_size:
    raise data.DataError(config.data.path, field="prompt", problem=(
        f"{len(arrays['input_ids'])} training prompts, fewer than one batch (data.batch_size="
        f"{config.data.batch_size}); lower data.batch_size or add prompts"))
  schedule, optim = optimizer.make(config.optim, config.steps, rlcfg.num_updates)
  trainable = roles.init_trainable(jax.random.key(config.seed), model_cfg, rlcfg, base, sft_lora, rm_params)
  frozen = roles.frozen_params(rlcfg, base, sft_lora, rm_params)
  state, state_sh = trainer.place(learner.new_state(trainable, optim, jax.random.key(config.seed + 1), rlcfg), mesh)
  frozen, frozen_sh = trainer.place(frozen, mesh)
  del trainable, base
  n_train = models.count_params(state["trainable"])
  log.info("RL (%s, %s): trainable params %s; frozen params %s", rlcfg.mode, rlcfg.algorithm, f"{n_train:,}",
           f"{models.count_params(frozen):,}")
  stop = tuple(config.rl.stop_strings)
  step = RLStep(model_cfg, rlcfg, optim, mesh=mesh, state_sh=state_sh, frozen_sh=frozen_sh,
                decode=tokenizer.decode, stop_strings=stop)

  def step_fn(s, f, b):
    s, metrics = step(s, f, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    k = int(s["step"])
    if trainer.itstime(k, config.log_every, config.steps, first=True):
      _write_samples(workdir, k, step.last_batch, tokenizer, config.num_sample_texts)
    return s, metrics

  batches = data.BatchIterator(arrays, config.data.batch_size, seed=config.data.seed)
  perf = {"trainable_params": n_train, "frozen_params": models.count_params(frozen)}
  # The update is compiled once, ahead of time, from shapes (every rollout batch has the same ones); its compiled
  # peak is the paper's memory figure.
  rows = config.data.batch_size * rlcfg.samples_per_prompt
  step.update, mem = trainer.compile_step(step.update, checkpoint.abstract_like(state),
                                          checkpoint.abstract_like(frozen), rollout.batch_struct(
                                              rows, config.data.max_prompt_len, rlcfg.max_new_tokens))
  perf["compiled_memory_bytes"] = mem["compiled_memory_bytes"]
  n_eval = config.get("eval_prompts", 0)

  def evaluate_fn(s, f):
    """eval_policy's figures on the first `eval_prompts` held-out prompts: reward before / after, KL, win rate."""
    from perl_jax.rl import evaluate  # evaluate imports this module (load_roles)
    policy = evaluate.TrainedPolicy(config, model_cfg, tokenizer, rlcfg, s["trainable"], f, int(s["step"]), mesh)
    result = evaluate.evaluate(policy, held_out[:n_eval],
                               batch_size=config.get("eval_batch_size", 0) or config.data.batch_size)
    return {k: v for k, v in result.items() if isinstance(v, (int, float))}

  with checkpoint.Checkpointer(pathlib.Path(workdir) / runs.CHECKPOINTS) as ckpt:
    trim_samples(workdir, ckpt.latest_step())
  lr_at = lambda s: schedule(s * rlcfg.num_updates)  # The learning rate of RL step s's first update.
  return trainer.run(config, workdir, state=state, frozen=frozen, step_fn=step_fn, batches=batches, perf=perf,
                     info=info, schedule=lr_at, stop_after=stop_after, evaluate=evaluate_fn if n_eval and held_out else None,
                     progress_keys=("reward_mean", "kl_ref", "entropy", "finished_fraction"),
                     tokens_fn=lambda b: int(np.sum(b["attention_mask"])) * jax.process_count())
