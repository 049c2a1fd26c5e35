"""Reward-model training loop: data → jitted sharded step → metrics, eval, resumable Orbax checkpoints."""
import json
import logging

log = logging.getLogger("perl_jax")
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from perl_jax import benchmark, checkpoint, data, lora, losses, metrics, models, reward, sharding

RUN_FILE = "run.json"


def lora_config(c: ml_collections.ConfigDict) -> lora.LoraConfig:
  targets = {"attention": lora.ATTENTION, "attention_mlp": lora.ATTENTION_MLP}.get(c.targets, (c.targets,))
  return lora.LoraConfig(rank=c.rank, alpha=c.alpha, targets=targets)


def reward_config(config) -> reward.RewardConfig:
  kind = data.KINDS.get(config.data.format)
  if kind is None:
    raise data.DataError(config.data.path, field="format", problem=f"unknown format '{config.data.format}'")
  return reward.RewardConfig(mode=config.mode, loss="bt" if kind == "pairwise" else "bce",
                             lora_cfg=lora_config(config.lora))


def load_model(mc: ml_collections.ConfigDict):
  """(model config, frozen base params, tokenizer) from config.model (empty path = embedded SmolLM2)."""
  path = mc.path or str(models.default_model_path())
  cfg, params = models.load_pretrained(path, param_dtype=jnp.dtype(mc.param_dtype), dtype=mc.dtype, remat=mc.remat,
                                       attention=mc.get("attention", "auto"))
  return cfg, params, models.load_tokenizer(path)


def encode(fmt: str, examples, tokenizer, dc) -> tuple[dict, int]:
  encoder = data.encode_pairwise if data.KINDS[fmt] == "pairwise" else data.encode_binary
  return encoder(examples, tokenizer, dc.max_len, min_prompt_tokens=dc.min_prompt_tokens)


def load_data(config, tokenizer):
  """Train/eval arrays: a seeded held-out split of data.path, or data.eval_path when given."""
  dc = config.data
  skipped: list = []
  examples = data.read_examples(dc.format, dc.path, skip_invalid=dc.skip_invalid, skipped=skipped)
  if skipped:
    log.warning("%s: skipped %d invalid lines (data.skip_invalid=True)", dc.path, len(skipped))
  if dc.eval_path:
    train_ex, eval_ex = examples, data.read_examples(dc.format, dc.eval_path, skip_invalid=dc.skip_invalid)
  else:
    train_ex, eval_ex = data.split_train_eval(examples, dc.eval_fraction, seed=dc.seed)
  if dc.max_train_examples:
    train_ex = train_ex[: dc.max_train_examples]
  if dc.max_eval_examples:
    eval_ex = eval_ex[: dc.max_eval_examples]
  train_arrays, n_trunc = encode(dc.format, train_ex, tokenizer, dc)
  eval_arrays, n_trunc_eval = encode(dc.format, eval_ex, tokenizer, dc) if eval_ex else (None, 0)
  log.info("data: %d train / %d eval examples; %d / %d truncated to %d tokens",
           len(train_ex), len(eval_ex), n_trunc, n_trunc_eval, dc.max_len)
  return train_arrays, eval_arrays, {"train_examples": len(train_ex), "eval_examples": len(eval_ex),
                                     "truncated_train": n_trunc, "truncated_eval": n_trunc_eval}


MODEL_KEYS = ("input_ids", "attention_mask", "label")


def train_arrays_head(arrays: dict, config) -> dict:
  """The first global batch's worth of rows on this host, to compile the step before the loop."""
  n = config.data.batch_size // jax.process_count()
  return {k: v[:n] for k, v in arrays.items()}


def evaluate(score_fn, trainable, base, arrays, batch_size: int, mesh, kind: str) -> dict:
  """Scores every eval example once; metrics on the host (balanced accuracy / ROC-AUC for binary)."""
  it = data.BatchIterator(arrays, batch_size, shuffle=False, num_epochs=1, drop_remainder=False)
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)) if jax.process_count() > 1 else x
  outs, labels = [], []
  for batch in it:
    valid = gather(batch["valid"]).astype(bool)
    r = np.asarray(score_fn(trainable, base, sharding.global_batch(
        {k: v for k, v in batch.items() if k in MODEL_KEYS}, mesh)))
    outs.append(r[valid])
    if kind == "binary":
      labels.append(gather(batch["label"])[valid])
  r = np.concatenate(outs)
  if kind == "pairwise":
    return losses.pairwise_metrics(r[:, 0], r[:, 1])
  return losses.binary_metrics(r, np.concatenate(labels))


def make_optimizer(config):
  """(schedule, optimizer) from config.optim and config.steps; training and restoring share this one."""
  schedule = reward.make_schedule(config.optim.lr, config.steps, config.optim.warmup_steps)
  return schedule, reward.make_optimizer(schedule, config.optim.weight_decay, config.optim.clip_norm)


def new_state(config, rcfg: reward.RewardConfig, model_cfg, base_params, optimizer) -> dict:
  """The checkpointed train state (step, trainable, opt_state, rng) seeded from config.seed; restore targets
  are this function's shapes, so checkpoints and their readers cannot drift apart."""
  trainable = reward.init_trainable(jax.random.key(config.seed), rcfg, model_cfg, base_params)
  return reward.init_state(trainable, optimizer, checkpoint.key_to_data(jax.random.key(config.seed + 1)))


def train_reward(config: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None):
  """Trains (or resumes) the RM described by `config` in `workdir`; returns (final state, eval metrics).

  `stop_after` ends the run early at that step with a checkpoint, as a pre-emption would."""
  workdir = pathlib.Path(workdir)
  sharding.initialize_distributed(config.multihost)
  rcfg = reward_config(config)
  model_cfg, base, tokenizer = load_model(config.model)
  train_arrays, eval_arrays, data_info = load_data(config, tokenizer)
  kind = data.KINDS[config.data.format]

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for field in ("batch_size", "eval_batch_size"):
    if config.data[field] % shards:
      raise models.ConfigError(f"config: field 'data.{field}': {config.data[field]} is not divisible by "
                               f"data x fsdp = {shards} devices")
  schedule, optimizer = make_optimizer(config)
  state = new_state(config, rcfg, model_cfg, base, optimizer)
  base = reward.frozen_params(rcfg, base)
  state_sh, base_sh = sharding.shardings(state, mesh), sharding.shardings(base, mesh)
  state, base = jax.device_put(state, state_sh), jax.device_put(base, base_sh)
  if rcfg.mode == "lora":
    log.info("PERL reward model: %s", lora.summary(base, state["trainable"]))
  else:
    log.info("full reward model: trainable params %s", f"{lora.num_params(state['trainable']):,}")

  it = data.BatchIterator(train_arrays, config.data.batch_size, seed=config.data.seed)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
  if ckpt.latest_step() is not None:
    step, state, extra = ckpt.restore(checkpoint.abstract_like(state))
    it.set_state(extra["data"])
    log.info("resumed from step %d", step)
  elif jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RUN_FILE).write_text(json.dumps({"config": config.to_dict(), "data": data_info}, indent=1))

  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in train_arrays.items() if k in MODEL_KEYS}
  step_fn = reward.jit_train_step(model_cfg, rcfg, optimizer, state_sh, base_sh, batch_sh, sharding.replicated(mesh))
  score_fn = reward.jit_scores(model_cfg, rcfg, state_sh["trainable"], base_sh, batch_sh, sharding.replicated(mesh))
  model_batch = lambda b: sharding.global_batch({k: v for k, v in b.items() if k in MODEL_KEYS}, mesh)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, base, model_batch(train_arrays_head(train_arrays, config))).compile()
  perf = {"compile_s": time.perf_counter() - t0, "compiled_memory_bytes":
          benchmark.memory_bytes(compiled.memory_analysis())["compiled_peak_bytes"],
          "trainable_params": lora.num_params(state["trainable"]),
          "total_params": lora.num_params(base) + lora.num_params(state["trainable"])}
  log.info("step compiled in %.1fs; compiler's peak memory estimate %.1f MiB", perf["compile_s"],
           perf["compiled_memory_bytes"] / 2**20)
  writer = metrics.MetricsWriter(workdir)
  start = int(state["step"])
  progress = metrics.Progress(config.steps, start_step=start)
  eval_metrics, step_times, tokens, last = {}, [], 0, (start, time.perf_counter())
  for step in range(start + 1, config.steps + 1):
    batch = next(it)
    tokens += int(batch["attention_mask"].sum()) * jax.process_count()
    state, m = compiled(state, base, model_batch(batch))
    if step % config.log_every == 0 or step == config.steps:
      m = {k: float(v) for k, v in m.items()}
      now = time.perf_counter()
      step_times.append((now - last[1]) / (step - last[0]))
      m.update(lr=float(schedule(step - 1)), step_time_s=step_times[-1], tokens_per_s=tokens / (now - last[1]))
      writer.write(step, {f"train/{k}": v for k, v in m.items()})
      progress.update(step, loss=m["loss"], tokens=tokens, acc=m["accuracy"])
      tokens = 0
    if eval_arrays is not None and (step % config.eval_every == 0 or step == config.steps):
      eval_metrics = evaluate(score_fn, state["trainable"], base, eval_arrays, config.data.eval_batch_size, mesh, kind)
      writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
      log.info("eval step %d: %s", step, json.dumps(eval_metrics))
    if step % config.checkpoint_every == 0 or step == config.steps or step == stop_after:
      ckpt.save(step, state, {"data": it.get_state()})
    if step == stop_after:
      break
    if step % config.log_every == 0:
      last = (step, time.perf_counter())
  ckpt.wait()
  ckpt.close()
  writer.close()
  if jax.process_index() == 0 and eval_metrics and stop_after is None:
    perf["median_step_time_s"] = float(np.median(step_times)) if step_times else None
    (workdir / "eval.json").write_text(json.dumps(eval_metrics, indent=1))
    (workdir / "summary.json").write_text(json.dumps({"eval": eval_metrics, **perf, **data_info}, indent=1))
  return state, eval_metrics

