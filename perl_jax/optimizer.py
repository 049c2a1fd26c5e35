"""The optimizer and learning-rate schedule, built from `config.optim` (one definition for every stage)."""
import ml_collections
import optax


def make_schedule(lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up to `lr` (the first update already moves), then cosine decay to lr/10 at `total_steps`."""
  warmup = max(warmup_steps, 1)
  return optax.warmup_cosine_decay_schedule(lr / warmup, lr, warmup, max(total_steps, warmup + 1), lr * 0.1)


def make_optimizer(schedule, weight_decay: float = 0.0, clip_norm: float = 1.0) -> optax.GradientTransformation:
  """AdamW on the schedule, after global-norm clipping."""
  return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))


def make(optim: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.Schedule, optax.GradientTransformation]:
  """(schedule, optimizer) from config.optim {lr, warmup_steps, weight_decay, clip_norm}; training and restoring
  a run share this one, so checkpoints and their readers cannot drift apart."""
  schedule = make_schedule(optim.lr, total_steps, optim.warmup_steps)
  return schedule, make_optimizer(schedule, optim.weight_decay, optim.clip_norm)
