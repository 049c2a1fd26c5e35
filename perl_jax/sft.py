"""Supervised fine-tuning: masked next-token loss on assistant tokens, its data and eval, and its set-up over the
shared loop (`train`). What it tunes, and how a later stage restores it, is `trained` (a LoRA or a backbone copy).

Batches: input_ids / attention_mask / loss_mask int32[B, T] (data.encode_sft) and valid int32[B].
"""
import functools
import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from perl_jax import data, lora, losses, models, optimizer, runs, sharding, trained, trainer
from perl_jax.models import ModelConfig

log = logging.getLogger("perl_jax")
MODEL_KEYS = ("input_ids", "attention_mask", "loss_mask", "valid")


def logits(model_cfg: ModelConfig, scfg: trained.PolicyConfig, trainable, frozen, ids_BxT, mask_BxT):
  """Policy logits [B, T, V] (float32 from the model's unembedding)."""
  params, adapters = trained.policy_params(scfg, trainable, frozen)
  return models.forward(model_cfg, params, ids_BxT, mask_BxT, adapters=adapters).logits


def target_weights(batch) -> jax.Array:
  """w_Bx(T-1) = loss_mask[:, 1:] · attention_mask[:, 1:] · valid: which next tokens are scored."""
  w = batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]
  if "valid" in batch:
    w = w * batch["valid"][:, None]
  return w.astype(jnp.float32)


def masked_sums(logits_BxTxV, batch) -> dict:
  """Σ w·(−log p(next)), Σ w·[argmax == next], Σ w over the batch: what eval adds up across batches."""
  w = target_weights(batch)
  logp = losses.token_logprobs(logits_BxTxV, batch["input_ids"])
  hit = jnp.argmax(logits_BxTxV[:, :-1], axis=-1) == batch["input_ids"][:, 1:]
  return {"nll_sum": -jnp.sum(w * logp), "correct": jnp.sum(w * hit), "num_tokens": jnp.sum(w)}


def loss_fn(model_cfg: ModelConfig, scfg: trained.PolicyConfig, trainable, frozen, batch,
            rng=None) -> tuple[jax.Array, dict]:
  """Token-weighted mean CE over the loss-mask tokens, loss = Σ w·(−log p) / max(Σ w, 1); metrics loss,
  accuracy (argmax == target on those tokens) and num_tokens. rng unused (no dropout)."""
  del rng
  s = masked_sums(logits(model_cfg, scfg, trainable, frozen, batch["input_ids"], batch["attention_mask"]), batch)
  n = jnp.maximum(s["num_tokens"], 1.0)
  loss = s["nll_sum"] / n
  return loss, {"loss": loss, "accuracy": s["correct"] / n, "num_tokens": s["num_tokens"]}


def make_loss_fn(model_cfg: ModelConfig, scfg: trained.PolicyConfig):
  """loss_fn bound to the model: (trainable, frozen, batch, rng) -> (loss, metrics), trainer's convention."""
  return functools.partial(loss_fn, model_cfg, scfg)


# ---------------------------------------------------------------- data and eval


def read_data(config) -> tuple[list, list]:
  """(train, eval) dialogs of data.path split by conversation (data.eval_fraction, data.seed), or data.eval_path
  when given; read before any model is loaded, so a bad file, record or format is reported first."""
  dc = config.data
  train_d, eval_d = data.pipeline.read_train_eval(functools.partial(data.read_dialogs, dc.format),
                                                  data.split_by_group, dc)
  train_d = train_d[: dc.max_train_examples or None]
  data.pipeline.check_one_batch(dc, len(train_d), "dialogs")
  return train_d, eval_d[: dc.max_eval_examples or None]


def load_data(config, tokenizer, records: tuple[list, list] | None = None):
  """Train/eval arrays of `records` (default: read_data(config))."""
  dc = config.data
  train_d, eval_d = records or read_data(config)
  try:
    train_arrays, n_trunc = data.encode_sft(train_d, tokenizer, dc.max_len)
    eval_arrays, n_trunc_eval = data.encode_sft(eval_d, tokenizer, dc.max_len) if eval_d else (None, 0)
  except ValueError as e:  # The tokenizer's chat template cannot mark assistant turns (see data.chat).
    raise models.ConfigError(f"{runs.model_path(config.model)}: tokenizer: {e}") from None
  info = {"train_examples": len(train_d), "eval_examples": len(eval_d), "truncated_train": n_trunc,
          "truncated_eval": n_trunc_eval, "train_target_tokens": int(train_arrays["loss_mask"].sum())}
  log.info("data: %s (max_len %d)", info, dc.max_len)
  return train_arrays, eval_arrays, info


def jit_sums(model_cfg, scfg, trainable_shardings, frozen_shardings, batch_shardings, replicated):
  """masked_sums of a global batch, jitted, replicated to every host."""
  return jax.jit(lambda tr, fr, b: masked_sums(logits(model_cfg, scfg, tr, fr, b["input_ids"], b["attention_mask"]), b),
                 in_shardings=(trainable_shardings, frozen_shardings, batch_shardings), out_shardings=replicated)


def evaluate(sums_fn, trainable, frozen, arrays, batch_size: int, mesh) -> dict:
  """Held-out loss = Σ nll / Σ tokens over every eval dialog once (length-bucketed, filler rows weigh 0),
  accuracy = Σ correct / Σ tokens, perplexity = exp(loss)."""
  it = data.pipeline.eval_iterator(arrays, batch_size)
  total = {"nll_sum": 0.0, "correct": 0.0, "num_tokens": 0.0}
  for batch in it:
    s = sums_fn(trainable, frozen, sharding.global_batch({k: batch[k] for k in MODEL_KEYS}, mesh))
    total = {k: total[k] + float(s[k]) for k in total}
  n = max(total["num_tokens"], 1.0)
  loss = total["nll_sum"] / n
  return {"loss": loss, "accuracy": total["correct"] / n, "perplexity": math.exp(loss),
          "num_tokens": int(total["num_tokens"])}


# ---------------------------------------------------------------- training and restoring


def new_state(config, scfg: trained.PolicyConfig, base_params, optim) -> dict:
  """The checkpointed train state seeded from config.seed (restore targets are this function's shapes)."""
  trainable = trained.init_policy(jax.random.key(config.seed), scfg, base_params)
  return trainer.new_state(trainable, optim, jax.random.key(config.seed + 1))


def train(config: ml_collections.ConfigDict, workdir, stop_after: int | None = None):
  """Trains (or resumes) the SFT policy described by `config` in `workdir`; returns (final state, eval metrics)."""
  sharding.initialize_distributed(config.multihost)
  scfg = trained.policy_config(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  trainer.check_batch_sizes(config, mesh)
  records = read_data(config)
  model_cfg, base, tokenizer = runs.load_model(config.model)
  train_arrays, eval_arrays, data_info = load_data(config, tokenizer, records)
  schedule, optim = optimizer.make(config.optim, config.steps)
  state, state_sh = trainer.place(new_state(config, scfg, base, optim), mesh)
  frozen, frozen_sh = trainer.place(trained.policy_frozen(scfg, base), mesh)
  log.info("%s policy: %s", "PERL (LoRA)" if scfg.mode == "lora" else "full",
           lora.summary(base if scfg.mode == "lora" else {}, state["trainable"]))
  del base

  train_arrays = {**train_arrays, "valid": np.ones(len(train_arrays["input_ids"]), np.int32)}
  step_fn, perf, batch_sh = trainer.array_step(make_loss_fn(model_cfg, scfg), optim, state, state_sh, frozen,
                                               frozen_sh, train_arrays, MODEL_KEYS, mesh, config.data.batch_size)
  sums_fn = jit_sums(model_cfg, scfg, state_sh["trainable"], frozen_sh, batch_sh, sharding.replicated(mesh))
  evaluate_fn = None if eval_arrays is None else lambda s, f: evaluate(
      sums_fn, s["trainable"], f, eval_arrays, config.data.eval_batch_size, mesh)
  return trainer.run(config, workdir, state=state, frozen=frozen, step_fn=step_fn,
                     batches=data.pipeline.train_iterator(train_arrays, config.data),
                     evaluate=evaluate_fn, schedule=schedule, perf=perf, info=data_info, stop_after=stop_after)
