"""The reward-model stage: its loss (Bradley-Terry on pairs, BCE on thumbs labels), data, eval, the LP-FT probe
head, and its set-up over the shared loop (`train`). What an RM is (config, init, scores) and how a later stage
restores one is `trained`.
"""
import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from perl_jax import data, lora, losses, models, optimizer, probe, runs, sharding, stats, trained, trainer

log = logging.getLogger("perl_jax")
MODEL_KEYS = ("input_ids", "attention_mask", "label")


def loss_fn(model_cfg, rcfg, trainable, base_params, batch, rng=None) -> tuple[jax.Array, dict]:
  """Bradley-Terry on pairs or BCE on thumbs labels, with the matching running metrics (rng unused)."""
  del rng
  r = trained.batch_scores(model_cfg, rcfg, trainable, base_params, batch)
  if rcfg.loss == "bt":
    loss = losses.bradley_terry_loss(r[:, 0], r[:, 1])
    return loss, {"loss": loss, "accuracy": losses.pairwise_accuracy(r[:, 0], r[:, 1]),
                  "margin": losses.reward_margin(r[:, 0], r[:, 1])}
  if rcfg.loss == "bce":
    label = batch["label"].astype(jnp.float32)
    loss = losses.binary_cross_entropy_loss(r, label, rcfg.pos_weight)
    return loss, {"loss": loss, "accuracy": jnp.mean((r > 0) == (label > 0.5))}
  raise ValueError(f"reward loss must be 'bt' or 'bce', got '{rcfg.loss}'")


def jit_scores(model_cfg, rcfg, trainable_shardings, base_shardings, batch_sharding, replicated, fn=None):
  """Batch rewards (or fn(model_cfg, rcfg, trainable, base, batch), e.g. trained.batch_features), jitted, gathered to
  every host for host-side metrics."""
  fn = fn or trained.batch_scores
  return jax.jit(lambda tr, base, batch: fn(model_cfg, rcfg, tr, base, batch),
                 in_shardings=(trainable_shardings, base_shardings, batch_sharding), out_shardings=replicated)


# ---------------------------------------------------------------- data and eval


def encode(fmt: str, examples, tokenizer, dc) -> tuple[dict, int]:
  encoder = data.encode_pairwise if data.KINDS[fmt] == "pairwise" else data.encode_binary
  return encoder(examples, tokenizer, dc.max_len, min_prompt_tokens=dc.min_prompt_tokens)


def balanced_pos_weight(label_N) -> float:
  """w₊ = n_neg / n_pos, so both classes carry equal total weight in the BCE loss."""
  n_pos = float(np.sum(np.asarray(label_N) > 0.5))
  if n_pos in (0.0, float(len(label_N))):
    raise models.ConfigError("config: field 'balance_classes': the training split has only one class")
  return (len(label_N) - n_pos) / n_pos


def read_data(config) -> tuple[list, list]:
  """(train, eval) examples: a seeded held-out split of data.path, or data.eval_path when given. With
  data.dev_fraction > 0 the eval set is instead a dev split carved from the training part (for choosing recipes
  without looking at the held-out split). Read before any model is loaded, so a bad file, record or format is
  reported first."""
  dc = config.data
  train_ex, eval_ex = data.pipeline.read_train_eval(functools.partial(data.read_examples, dc.format),
                                                    data.split_train_eval, dc)
  if dc.get("dev_fraction", 0.0):
    train_ex, eval_ex = data.split_train_eval(train_ex, dc.dev_fraction, seed=f"dev{dc.seed}")
  if dc.get("bootstrap_seed", -1) >= 0:
    train_ex = bootstrap(train_ex, dc.bootstrap_seed)
  if dc.max_train_examples:
    train_ex = train_ex[: dc.max_train_examples]
  if dc.max_eval_examples:
    eval_ex = eval_ex[: dc.max_eval_examples]
  data.pipeline.check_one_batch(dc, len(train_ex), "examples")
  return train_ex, eval_ex


def bootstrap(examples: list, seed: int) -> list:
  """A bootstrap resample of `examples`: len(examples) draws with replacement, numpy's default_rng(seed), in
  draw order (so an LP-FT probe on the first N rows also sees a member's own subset). Ensemble members trained on
  different resamples differ in data, not only in init and batch order."""
  idx = np.random.default_rng(seed).integers(0, len(examples), size=len(examples))
  return [examples[i] for i in idx]


def load_data(config, tokenizer, records: tuple[list, list] | None = None):
  """Train/eval arrays of `records` (default: read_data(config)) and what they hold."""
  dc = config.data
  train_ex, eval_ex = records or read_data(config)
  train_arrays, n_trunc = encode(dc.format, train_ex, tokenizer, dc)
  eval_arrays, n_trunc_eval = encode(dc.format, eval_ex, tokenizer, dc) if eval_ex else (None, 0)
  log.info("data: %d train / %d eval examples; %d / %d truncated to %d tokens",
           len(train_ex), len(eval_ex), n_trunc, n_trunc_eval, dc.max_len)
  return train_arrays, eval_arrays, {"eval_split": "dev" if dc.get("dev_fraction", 0.0) else "held_out",
                                     "train_examples": len(train_ex), "eval_examples": len(eval_ex),
                                     "truncated_train": n_trunc, "truncated_eval": n_trunc_eval}


def score_all(score_fn, trainable, base, arrays, batch_size: int, mesh,
              progress: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
  """score_fn over every example once, longest first in length buckets (the same outputs as full padding, fewer
  pad tokens): (outputs, their labels or None) in the examples' own order, identical on every host, so two models'
  scores of the same examples pair row by row. With `progress`, logs "progress: done/total examples, ETA" about
  once a minute."""
  it = data.pipeline.eval_iterator({**arrays, "example_index": np.arange(len(arrays["input_ids"]))}, batch_size)
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)) if jax.process_count() > 1 else x
  outs, labels, index = [], [], []
  total, t0, t_log = len(arrays["input_ids"]), time.perf_counter(), time.perf_counter()
  for batch in it:
    valid = gather(batch["valid"]).astype(bool)
    r = np.asarray(score_fn(trainable, base, sharding.global_batch(
        {k: v for k, v in batch.items() if k in MODEL_KEYS}, mesh)))
    outs.append(r[valid])
    index.append(gather(batch["example_index"])[valid])
    done, now = sum(len(o) for o in outs), time.perf_counter()
    if progress and (now - t_log > 60 or done == total):
      log.info("%s: %d/%d examples, %.0f s, ETA %.0f s (longest first)", progress, done, total, now - t0,
               (now - t0) / done * (total - done))
      t_log = now
    if "label" in batch:
      labels.append(gather(batch["label"])[valid])
  order = np.argsort(np.concatenate(index), kind="stable")
  return np.concatenate(outs)[order], (np.concatenate(labels)[order] if labels else None)


def evaluate(score_fn, trainable, base, arrays, batch_size: int, mesh, kind: str, progress: str | None = None) -> dict:
  """Scores every eval example once (score_all, logging `progress`); metrics on the host (balanced accuracy /
  ROC-AUC with its 95% bootstrap interval for binary) do not depend on the order."""
  r, labels = score_all(score_fn, trainable, base, arrays, batch_size, mesh, progress)
  if kind == "pairwise":
    return stats.pairwise_metrics(r[:, 0], r[:, 1])
  return {**stats.binary_metrics(r, labels), **stats.roc_auc_ci(r, labels)}


def probe_key(config, trainable, base, arrays) -> str:
  """What the probe's features depend on: the model (config and weights), the examples and the eval batch size
  (bucket shapes). Untrained adapters (B = 0) add exactly nothing, so every LoRA rank and seed shares one key;
  full tuning (its own backbone copy and program) has its own."""
  weights = {k: v for k, v in trainable.items() if k not in ("head", "lora")}
  b_leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(trainable.get("lora", {}))
              if getattr(path[-1], "key", None) == "b"]
  if any(np.any(np.asarray(b) != 0) for b in b_leaves):
    weights["lora"] = trainable["lora"]  # Adapters that already change the features (none today).
  return probe.digest({"v": 1, "model": repr(config.model.to_dict()), "mode": config.mode,
                       "batch": config.data.eval_batch_size}, weights, base, arrays)


def probe_head(feature_fn, trainable, base, arrays, config, pos_weight: float, mesh) -> tuple[dict, dict]:
  """LP-FT's first stage: the head fit by a cross-validated logistic regression (probe.fit_head) on the
  frozen-model features of the first config.probe_examples training examples (0 = all), as the untrained
  adapters (B = 0) or backbone copy give them; the L2 strength is cross-validated over config.probe_cs.
  Returns (head, info)."""
  n = config.get("probe_examples", 0) or len(arrays["input_ids"])
  sub = {k: v[:n] for k, v in arrays.items()}
  t0 = time.perf_counter()
  cache = config.get("probe_cache", "") if jax.process_count() == 1 else ""
  feats, labels = probe.cached_features(
      cache, cache and probe_key(config, trainable, base, sub),
      lambda: score_all(feature_fn, trainable, base, sub, config.data.eval_batch_size, mesh,
                        progress="LP-FT probe features"))
  cs = tuple(float(c) for c in config.get("probe_cs", probe.DEFAULT_CS))
  head, info = probe.fit_head(feats, labels, pos_weight=pos_weight, cs=cs, seed=config.seed)
  info["seconds"] = time.perf_counter() - t0
  log.info("LP-FT head: logistic probe on %d examples' frozen features, C=%g, train loss %.4f (%.0f s)",
           info["examples"], info["C"], info["train_loss"], info["seconds"])
  return head, info


# ---------------------------------------------------------------- training and restoring


def new_state(config, rcfg: trained.RewardConfig, model_cfg, base_params, optim) -> dict:
  """The checkpointed train state seeded from config.seed; restore targets are this function's shapes, so
  checkpoints and their readers cannot drift apart."""
  trainable = trained.init_reward(jax.random.key(config.seed), rcfg, model_cfg, base_params)
  return trainer.new_state(trainable, optim, jax.random.key(config.seed + 1))


def train(config: ml_collections.ConfigDict, workdir, stop_after: int | None = None):
  """Trains (or resumes) the RM described by `config` in `workdir`; returns (final state, eval metrics)."""
  sharding.initialize_distributed(config.multihost)
  rcfg = trained.reward_config(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  trainer.check_batch_sizes(config, mesh)
  records = read_data(config)
  model_cfg, base, tokenizer = trained.reward_backbone(config, mesh)
  train_arrays, eval_arrays, data_info = load_data(config, tokenizer, records)
  if rcfg.loss == "bce" and config.get("balance_classes", False):
    rcfg = dataclasses.replace(rcfg, pos_weight=balanced_pos_weight(train_arrays["label"]))
    data_info["pos_weight"] = rcfg.pos_weight
    log.info("BCE: positive labels weighted %.4f (n_neg / n_pos of the training split)", rcfg.pos_weight)
  schedule, optim = optimizer.make(config.optim, config.steps)
  state = new_state(config, rcfg, model_cfg, base, optim)
  state, state_sh = trainer.place(state, mesh)
  base, base_sh = trainer.place(trained.reward_frozen(rcfg, base), mesh)
  if rcfg.mode == "lora":
    log.info("PERL reward model: %s", lora.summary(base, state["trainable"]))
  else:
    log.info("full reward model: trainable params %s", f"{models.count_params(state['trainable']):,}")

  step_fn, perf, batch_sh = trainer.array_step(functools.partial(loss_fn, model_cfg, rcfg), optim, state, state_sh,
                                               base, base_sh, train_arrays, MODEL_KEYS, mesh, config.data.batch_size,
                                               config.get("num_microbatches", 1))
  score_fn = jit_scores(model_cfg, rcfg, state_sh["trainable"], base_sh, batch_sh, sharding.replicated(mesh))
  if config.get("head_init", "random") == "probe" and runs.latest_step(workdir) is None:  # A resumed run restores its fitted head.
    feature_fn = jit_scores(model_cfg, rcfg, state_sh["trainable"], base_sh, batch_sh, sharding.replicated(mesh),
                            fn=trained.batch_features)
    head, data_info["head_probe"] = probe_head(feature_fn, state["trainable"], base, train_arrays, config,
                                               rcfg.pos_weight, mesh)
    state["trainable"]["head"] = jax.device_put(head, state_sh["trainable"]["head"])
  kind = data.KINDS[config.data.format]
  evaluate_fn = None if eval_arrays is None else lambda s, f: evaluate(
      score_fn, s["trainable"], f, eval_arrays, config.data.eval_batch_size, mesh, kind)
  return trainer.run(config, workdir, state=state, frozen=base, step_fn=step_fn,
                     batches=data.pipeline.train_iterator(train_arrays, config.data),
                     evaluate=evaluate_fn, schedule=schedule, perf=perf, info=data_info, stop_after=stop_after)


def evaluate_examples(rm: runs.Trained, fmt: str, examples: list, batch_size: int | None = None,
                      where: str = "data") -> dict:
  """`evaluate`'s metrics for read examples, plus num_examples and num_truncated."""
  if not examples:
    raise data.DataError(where, problem="no examples")
  batch_size = batch_size or rm.config.data.eval_batch_size
  shards = rm.mesh.shape["data"] * rm.mesh.shape["fsdp"]
  if batch_size % shards:
    raise models.ConfigError(f"batch_size {batch_size} is not a multiple of the {shards} data shards")
  arrays, num_truncated = encode(fmt, examples, rm.tokenizer, rm.config.data)
  batch_sh = {k: sharding.batch_sharding(rm.mesh, v.ndim) for k, v in arrays.items() if k in MODEL_KEYS}
  score_fn = jit_scores(rm.model_cfg, rm.stage, sharding.shardings(rm.trainable, rm.mesh),
                        sharding.shardings(rm.frozen, rm.mesh), batch_sh, sharding.replicated(rm.mesh))
  metrics = evaluate(score_fn, rm.trainable, rm.frozen, arrays, batch_size, rm.mesh, data.KINDS[fmt], progress="eval")
  return {**metrics, "num_examples": len(examples), "num_truncated": int(num_truncated)}


