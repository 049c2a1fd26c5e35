"""The RL stage over the shared loop: its roles from `setup`, prompts read and split, RLStep run in trainer.run
(resume, cadence, metrics.jsonl / TensorBoard, checkpoints, summary), sample texts logged, the held-out eval of
`evaluate` at eval steps: under the RM, and under config.judge_workdir's RM (one the policy does not train against)
when named, so eval/reward_diff and eval/judge_reward_diff against eval/kl trace over-optimisation (Gao et al.).
"""
import json
import logging
import os
import pathlib

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from perl_jax import checkpoint, data, models, optimizer, runs, sharding, trained, trainer
from perl_jax.rl import evaluate, learner, roles, rollout, setup
from perl_jax.rl.step import RLStep

log = logging.getLogger("perl_jax")
SAMPLES_FILE = "samples.jsonl"


def read_prompts(config) -> tuple[list, list]:
  """(train, held-out) prompts of data.path split by conversation; read before any model is loaded, so a bad file,
  record or format is reported first, and so is a training set smaller than one batch."""
  dc = config.data
  prompts = data.read_prompts(dc.format, dc.path, skip_invalid=dc.skip_invalid)
  train, held_out = data.split_by_group(prompts, dc.eval_fraction, seed=dc.seed)
  if dc.max_train_prompts:
    train = train[: dc.max_train_prompts]
  data.pipeline.check_one_batch(dc, len(train), "prompts")
  return train, held_out


def load_prompts(config, tokenizer, records: tuple[list, list] | None = None):
  """(train prompt arrays, held-out prompts, info) of `records` (default: read_prompts(config)). A prompt longer
  than data.max_prompt_len keeps its last tokens (data.truncate_prompts=True, the default) or is a one-line
  DataError naming the file and conversation."""
  dc = config.data
  train, held_out = records or read_prompts(config)
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
  """The first n rollout rows as text lines of samples.jsonl (process 0 writes; with several processes every one
  takes part in gathering just those rows, since the batch is a global array)."""
  if n <= 0:
    return
  keys = ("prompt_BxP", "prompt_mask_BxP", "tokens_BxN", "mask_BxN", "score_B")
  if jax.process_count() > 1:
    b = {k: np.asarray(multihost_utils.process_allgather(batch[k][:n], tiled=True)) for k in keys}
  else:
    b = {k: np.asarray(batch[k][:n]) for k in keys}
  if jax.process_index() != 0:
    return
  with open(pathlib.Path(workdir) / SAMPLES_FILE, "a") as f:
    for i in range(len(b["score_B"])):
      f.write(json.dumps({"step": step, "reward": float(b["score_B"][i]),
                          "prompt": tokenizer.decode(b["prompt_BxP"][i][b["prompt_mask_BxP"][i] > 0]),
                          "response": tokenizer.decode(b["tokens_BxN"][i][b["mask_BxN"][i] > 0])}) + "\n")


def with_reward_folders(config, workdir):
  """`config` with reward_workdir as the folders it names today (a glob's matches, ':'-joined), so run.json records
  them; a resumed run must name the same ones (a one-line ConfigError otherwise)."""
  folders = setup.reward_folders(config)
  if os.pathsep.join(folders) != config.reward_workdir:
    config = config.copy_and_resolve_references()
    config.reward_workdir = os.pathsep.join(folders)
  if (pathlib.Path(workdir) / runs.RUN_FILE).is_file():
    started = setup.reward_folders(runs.read_config(workdir))
    if [pathlib.Path(f).resolve() for f in started] != [pathlib.Path(f).resolve() for f in folders]:
      raise models.ConfigError(f"{workdir}: this run started against the reward model(s) {os.pathsep.join(started)}; "
                               f"config field 'reward_workdir' now names {config.reward_workdir}")
  return config


def load_judge(config, model_cfg, tokenizer, mesh) -> runs.Trained | None:
  """config.judge_workdir's RM (None when empty), on the policy's backbone and tokenizer and not one the policy
  trains against; restored with its own copy of the base model."""
  folder = config.get("judge_workdir") or ""
  if not folder:
    return None
  runs.require_run_folder(folder, "judge_workdir")
  runs.require_stage(folder, "reward", "config field 'judge_workdir'")
  if any(runs.same_path(folder, f) for f in setup.reward_folders(config)):
    raise models.ConfigError(f"{folder}: config field 'judge_workdir' names a reward model the policy trains "
                             "against (in 'reward_workdir'); a judge must be another RM")
  judge = trained.restore_reward(folder, mesh=mesh, model_overrides=setup.run_time_model(config))
  evaluate.check_judge(model_cfg, tokenizer, judge, folder)
  return judge


def train(config: ml_collections.ConfigDict, workdir, stop_after: int | None = None):
  """Trains (or resumes) the RL policy described by `config` in `workdir`; returns (final state, eval)."""
  sharding.initialize_distributed(config.multihost)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  setup.check_batch(config, setup.config_from(config), mesh)  # The config's own checks, before any loading.
  records = read_prompts(config)  # Data errors come first.
  config = with_reward_folders(config, workdir)
  r = setup.load_roles(config, mesh)
  model_cfg, tokenizer, base = r.model_cfg, r.tokenizer, r.base
  rlcfg = setup.config_from(config, r)
  setup.check_context(config, model_cfg)
  judge = load_judge(config, model_cfg, tokenizer, mesh)
  arrays, held_out, info = load_prompts(config, tokenizer, records)
  schedule, optim = optimizer.make(config.optim, config.steps, rlcfg.num_updates)
  trainable = roles.init_trainable(jax.random.key(config.seed), model_cfg, rlcfg, base, r.sft_lora, r.reward)
  frozen = roles.frozen_params(rlcfg, base, r.sft_lora, r.reward)
  state, state_sh = trainer.place(learner.new_state(trainable, optim, jax.random.key(config.seed + 1), rlcfg), mesh)
  frozen, frozen_sh = trainer.place(frozen, mesh)
  del trainable, base, r
  n_train = models.count_params(state["trainable"])
  log.info("RL (%s, %s): trainable params %s; frozen params %s", rlcfg.mode, rlcfg.algorithm, f"{n_train:,}",
           f"{models.count_params(frozen):,}")
  stop = setup.host_stop_strings(config, tokenizer, rlcfg.eos_id)
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
    policy = runs.Trained(config, model_cfg, tokenizer, f, s["trainable"], int(s["step"]), mesh,
                          runs.model_path(config.model), rlcfg)
    result = evaluate.evaluate(policy, held_out[:n_eval], with_texts=True, judge=judge,
                               batch_size=config.get("eval_batch_size", 0) or config.data.batch_size)
    if jax.process_index() == 0:  # The responses themselves, to judge offline (scripts/judge_texts.py).
      with open(evaluate.texts_path(workdir, int(s["step"])), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in result["texts"])
    return {k: v for k, v in result.items() if isinstance(v, (int, float))}

  with checkpoint.Checkpointer(pathlib.Path(workdir) / runs.CHECKPOINTS) as ckpt:
    trim_samples(workdir, ckpt.latest_step())
  lr_at = lambda s: schedule(s * rlcfg.num_updates)  # The learning rate of RL step s's first update.
  return trainer.run(config, workdir, state=state, frozen=frozen, step_fn=step_fn, batches=batches, perf=perf,
                     info=info, schedule=lr_at, stop_after=stop_after, evaluate=evaluate_fn if n_eval and held_out else None,
                     progress_keys=("reward_mean", "kl_ref", "entropy", "finished_fraction"),
                     tokens_fn=lambda b: int(np.sum(b["attention_mask"])) * jax.process_count())
