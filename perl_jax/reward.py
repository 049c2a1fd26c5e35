"""Reward model = decoder backbone (+ LoRA) + scalar head on the last non-pad token; train and eval steps.

Trainable state is {"lora": ..., "head": ...} for PERL (backbone frozen, never differentiated) or
{"backbone": ..., "head": ...} for full tuning; the frozen params (`frozen_params`) are a separate argument.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from perl_jax import losses, lora, models
from perl_jax.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """How the RM is built and trained: mode "lora" | "full", loss "bt" (pairwise) | "bce" (binary)."""
  mode: str = "lora"
  loss: str = "bt"
  lora_cfg: lora.LoraConfig = lora.LoraConfig()


def init_head(rng, hidden_size: int) -> dict:
  """A [D,1] projection, N(0, 1/D) so initial rewards are O(1), plus a bias."""
  return {"kernel": jax.random.normal(rng, (hidden_size, 1), jnp.float32) / jnp.sqrt(hidden_size),
          "bias": jnp.zeros((1,), jnp.float32)}


def init_trainable(rng, rcfg: RewardConfig, model_cfg: ModelConfig, base_params) -> dict:
  """The trained pytree: LoRA + head (PERL) or a float32 copy of the backbone + head (full)."""
  k_lora, k_head = jax.random.split(rng)
  head = init_head(k_head, model_cfg.hidden_size)
  if rcfg.mode == "lora":
    return {"lora": lora.init(k_lora, base_params, rcfg.lora_cfg), "head": head}
  if rcfg.mode == "full":
    backbone = {k: v for k, v in base_params.items() if k != "lm_head"}
    return {"backbone": jax.tree.map(lambda x: x.astype(jnp.float32), backbone), "head": head}
  raise ValueError(f"reward mode must be 'lora' or 'full', got '{rcfg.mode}'")


def frozen_params(rcfg: RewardConfig, base_params) -> dict:
  """What stays frozen beside the trainable pytree: the whole base (LoRA), or only an untied LM head the RM
  never reads (full: kept for export, neither trained nor given optimizer state)."""
  if rcfg.mode == "lora":
    return base_params
  return {k: v for k, v in base_params.items() if k == "lm_head"}


def last_token_index(mask_BxT):
  """Index of the last non-pad token per row; right or left padding alike."""
  t = jnp.arange(mask_BxT.shape[-1])
  return jnp.max(jnp.where(mask_BxT.astype(bool), t, -1), axis=-1)


def scores(model_cfg: ModelConfig, rcfg: RewardConfig, trainable, base_params, ids_BxT, mask_BxT):
  """Scalar rewards r_B (float32) read at each row's last non-pad token."""
  if rcfg.mode == "lora":
    params, adapters = base_params, [(trainable["lora"], lora.scale(rcfg.lora_cfg))]
  else:
    params, adapters = {**base_params, **trainable["backbone"]}, []
  hidden = models.forward(model_cfg, params, ids_BxT, mask_BxT, adapters=adapters, return_logits=False).hidden
  idx = last_token_index(mask_BxT)
  h_BxD = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)
  return (h_BxD @ trainable["head"]["kernel"] + trainable["head"]["bias"])[:, 0]


def batch_scores(model_cfg, rcfg, trainable, base_params, batch) -> jax.Array:
  """Rewards for a batch: [B,2] (chosen, rejected) for pairwise data, [B] for binary data."""
  ids, mask = batch["input_ids"], batch["attention_mask"]
  if ids.ndim == 3:
    b, two, t = ids.shape
    return scores(model_cfg, rcfg, trainable, base_params, ids.reshape(b * two, t), mask.reshape(b * two, t)).reshape(b, two)
  return scores(model_cfg, rcfg, trainable, base_params, ids, mask)


def loss_fn(model_cfg, rcfg, trainable, base_params, batch) -> tuple[jax.Array, dict]:
  """Bradley-Terry on pairs or BCE on thumbs labels, with the matching running metrics."""
  r = batch_scores(model_cfg, rcfg, trainable, base_params, batch)
  if rcfg.loss == "bt":
    loss = losses.bradley_terry_loss(r[:, 0], r[:, 1])
    return loss, {"loss": loss, "accuracy": losses.pairwise_accuracy(r[:, 0], r[:, 1]),
                  "margin": losses.reward_margin(r[:, 0], r[:, 1])}
  if rcfg.loss == "bce":
    label = batch["label"].astype(jnp.float32)
    loss = losses.binary_cross_entropy_loss(r, label)
    return loss, {"loss": loss, "accuracy": jnp.mean((r > 0) == (label > 0.5))}
  raise ValueError(f"reward loss must be 'bt' or 'bce', got '{rcfg.loss}'")


def make_schedule(lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up to `lr` (the first update already moves), then cosine decay to lr/10 at `total_steps`."""
  warmup = max(warmup_steps, 1)
  return optax.warmup_cosine_decay_schedule(lr / warmup, lr, warmup, max(total_steps, warmup + 1), lr * 0.1)


def make_optimizer(schedule, weight_decay: float = 0.0, clip_norm: float = 1.0) -> optax.GradientTransformation:
  """AdamW on the schedule, after global-norm clipping."""
  return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))


def train_step(model_cfg, rcfg, optimizer, state: dict[str, Any], base_params, batch):
  """One update of the trainable pytree only; the gradient is never taken w.r.t. base_params."""
  grad_fn = jax.value_and_grad(lambda tr: loss_fn(model_cfg, rcfg, tr, base_params, batch), has_aux=True)
  (_, metrics), grads = grad_fn(state["trainable"])
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
  trainable = optax.apply_updates(state["trainable"], updates)
  metrics["grad_norm"] = optax.global_norm(grads)
  return {**state, "step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, metrics


def init_state(trainable, optimizer, rng_data) -> dict:
  """Everything a resumed run needs besides the data position: step, trainable, optimizer, RNG key data."""
  return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable),
          "rng": rng_data}


def jit_train_step(model_cfg, rcfg, optimizer, state_shardings, base_shardings, batch_sharding, replicated):
  """train_step jitted with explicit in/out shardings; the old state's buffers are donated."""
  return jax.jit(
      lambda state, base, batch: train_step(model_cfg, rcfg, optimizer, state, base, batch),
      in_shardings=(state_shardings, base_shardings, batch_sharding),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def jit_scores(model_cfg, rcfg, trainable_shardings, base_shardings, batch_sharding, replicated):
  """Batch rewards, jitted, gathered to every host for host-side metrics."""
  return jax.jit(lambda tr, base, batch: batch_scores(model_cfg, rcfg, tr, base, batch),
                 in_shardings=(trainable_shardings, base_shardings, batch_sharding), out_shardings=replicated)
