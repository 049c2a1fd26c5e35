"""The optimizer and learning-rate schedule, built from `config.optim` (one definition for every stage)."""
import jax
import ml_collections
import optax


def make_schedule(lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up to `lr` (the first update already moves), then cosine decay to lr/10 at `total_steps`."""
  warmup = max(warmup_steps, 1)
  return optax.warmup_cosine_decay_schedule(lr / warmup, lr, warmup, max(total_steps, warmup + 1), lr * 0.1)


def make_optimizer(schedule, weight_decay: float = 0.0, clip_norm: float = 1.0) -> optax.GradientTransformation:
  """AdamW on the schedule, after global-norm clipping."""
  return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))


def scale_subtree(name: str, factor: float) -> optax.GradientTransformation:
  """Multiplies the updates of every leaf under a dict key `name` (e.g. the RM's scalar "head") by `factor`:
  with Adam after it, the same as a `factor`× learning rate for that subtree (stateless)."""
  def scale(updates, params=None):
    del params
    under = lambda path: any(getattr(k, "key", None) == name for k in path)
    return jax.tree_util.tree_map_with_path(lambda p, u: u * factor if under(p) else u, updates)
  return optax.stateless(scale)


def make(optim: ml_collections.ConfigDict, total_steps: int,
         updates_per_step: int = 1) -> tuple[optax.Schedule, optax.GradientTransformation]:
  """(schedule, optimizer) from config.optim {lr, warmup_steps, weight_decay, clip_norm[, head_lr_mult]};
  training and restoring a run share this one, so checkpoints and their readers cannot drift apart.

  The schedule counts optimizer updates: a stage making `updates_per_step` of them per training step (PPO's
  epochs × minibatches) gets total_steps and warmup_steps in training steps, stretched by that factor, so its
  learning rate follows the same curve over training steps as a one-update stage's."""
  schedule = make_schedule(optim.lr, total_steps * updates_per_step, optim.warmup_steps * updates_per_step)
  tx = make_optimizer(schedule, optim.weight_decay, optim.clip_norm)
  head_lr_mult = optim.get("head_lr_mult", 1.0)
  if head_lr_mult != 1.0:  # Only then: optimizer states of runs without it keep their structure.
    tx = optax.chain(tx, scale_subtree("head", head_lr_mult))
  return schedule, tx
