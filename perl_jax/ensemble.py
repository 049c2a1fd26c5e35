"""Reward-model ensembles on ONE backbone (issue #32): K LoRA reward adapters and their heads stacked on a leading
member axis, scored in one pass, and combined per row.

The member axis is vmapped over the adapters and heads only; the frozen backbone is closed over, not batched, so
memory holds one backbone plus K adapters (never K model copies), and rows × members share every base matmul's
weights. Combinations (Coste et al. 2023, "Reward model ensembles help mitigate overoptimization"):
  mean            r = (1/K)·Σ_k r_k
  min             r = min_k r_k                       (worst case)
  mean_minus_std  r = mean_k r_k − λ·std_k r_k         (uncertainty-weighted; std over members, ddof 0)
"""
from typing import Sequence

import jax
import jax.numpy as jnp

from perl_jax import heads, models

COMBINE = ("mean", "min", "mean_minus_std")


def stack(members: Sequence[dict]) -> dict:
  """K member pytrees ({"lora", "head"} each) as one pytree with a leading member axis K. A one-line ValueError for
  an empty list or members whose paths or shapes differ."""
  if not members:
    raise ValueError("ensemble: no members (an empty list)")
  first = jax.tree.structure(members[0])
  shapes = [x.shape for x in jax.tree.leaves(members[0])]
  for k, m in enumerate(members[1:], 1):
    if jax.tree.structure(m) != first or [x.shape for x in jax.tree.leaves(m)] != shapes:
      raise ValueError(f"ensemble: member {k} does not match member 0 in paths or shapes (same adapter rank and "
                       "targets, same backbone)")
  return jax.tree.map(lambda *x: jnp.stack(x), *members)


def size(stacked: dict) -> int:
  """K, the number of members of a stacked ensemble."""
  return int(jax.tree.leaves(stacked)[0].shape[0])


def _one(model_cfg, scale: float, member: dict, base_params, ids_BxT, mask_BxT):
  hidden = models.forward(model_cfg, base_params, ids_BxT, mask_BxT, adapters=[(member["lora"], scale)],
                          return_logits=False).hidden
  return heads.head_scores(member["head"], hidden, mask_BxT)


def member_scores(model_cfg, scale: float, stacked: dict, base_params, ids_BxT, mask_BxT):
  """r_KxB: every member's reward of every row, in one pass over the one backbone (K = 1 is the single-RM path)."""
  if size(stacked) == 1:
    return _one(model_cfg, scale, jax.tree.map(lambda x: x[0], stacked), base_params, ids_BxT, mask_BxT)[None]
  return jax.vmap(lambda m: _one(model_cfg, scale, m, base_params, ids_BxT, mask_BxT))(stacked)


def combine(r_KxB, how: str = "mean", lam: float = 1.0):
  """The ensemble's reward per row (module docstring); `lam` is λ of mean_minus_std."""
  if how == "mean":
    return jnp.mean(r_KxB, axis=0)
  if how == "min":
    return jnp.min(r_KxB, axis=0)
  if how == "mean_minus_std":
    return jnp.mean(r_KxB, axis=0) - lam * jnp.std(r_KxB, axis=0)
  raise ValueError(f"config: field 'rl.reward_ensemble': must be one of {', '.join(COMBINE)}, got '{how}'")
