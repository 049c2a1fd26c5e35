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

from perl_jax import heads, lora, models, runs

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


def member_scores(model_cfg, scale: float, stacked: dict, base_params, ids_BxT, mask_BxT, in_turn: bool = False):
  """r_KxB: every member's reward of every row over the one backbone (K = 1 is the single-RM path): in one pass
  (the member axis vmapped: K members' activations live together), or `in_turn` (lax.map: one member's activations
  at a time, K sequential passes)."""
  if size(stacked) == 1:
    return _one(model_cfg, scale, jax.tree.map(lambda x: x[0], stacked), base_params, ids_BxT, mask_BxT)[None]
  one = lambda m: _one(model_cfg, scale, m, base_params, ids_BxT, mask_BxT)
  return jax.lax.map(one, stacked) if in_turn else jax.vmap(one)(stacked)


def combine(r_KxB, how: str = "mean", lam: float = 1.0):
  """The ensemble's reward per row (module docstring); `lam` is λ of mean_minus_std."""
  if how == "mean":
    return jnp.mean(r_KxB, axis=0)
  if how == "min":
    return jnp.min(r_KxB, axis=0)
  if how == "mean_minus_std":
    return jnp.mean(r_KxB, axis=0) - lam * jnp.std(r_KxB, axis=0)
  raise ValueError(f"config: field 'rl.reward_ensemble': must be one of {', '.join(COMBINE)}, got '{how}'")


def member_mismatch(first, other) -> str:
  """Why the RM run configured by `other` cannot join `first`'s ensemble on one backbone and tokenizer: its mode,
  base model, SFT start (init_from) or adapter shape differs ('' when it can)."""
  if other.mode != "lora":
    return f"it is a {other.mode}-mode RM; ensemble members are LoRA RMs on one backbone"
  a, b = runs.model_path(first.model), runs.model_path(other.model)
  if not runs.same_path(a, b):
    return f"it was trained on another backbone and tokenizer ({b}) than the first member ({a})"
  a, b = first.get("init_from") or "", other.get("init_from") or ""
  if (a or b) and not (a and b and runs.same_path(a, b)):
    return f"it starts from another SFT run (init_from '{b}') than the first member ('{a}')"
  if lora.config_from(first.lora) != lora.config_from(other.lora):
    return f"its adapter ({dict(other.lora)}) differs from the first member's ({dict(first.lora)})"
  return ""


AVERAGES = ("exact", "factor")


def average(members: Sequence[dict], scale: float, how: str = "exact") -> tuple[dict, float]:
  """One RM {"lora", "head"} from K LoRA members (WARM-style weight averaging) and the scale it is used with:
    exact   the average of the K updates, (1/K)·Σ_k s·A_k·B_k, as one adapter of rank K·r (lora.average), scale 1;
    factor  mean of the A's and of the B's, rank r, scale s: not the updates' average (lora.factor_average).
  The heads are averaged in both. A one-line ValueError for an unknown `how` or members that do not match."""
  if how not in AVERAGES:
    raise ValueError(f"ensemble.average: 'how' must be one of {', '.join(AVERAGES)}, got '{how}'")
  stack(members)  # The paths-and-shapes check.
  adapters = [m["lora"] for m in members]
  tree, out_scale = ((lora.average(adapters, [scale] * len(members)), 1.0) if how == "exact"
                     else (lora.factor_average(adapters), scale))
  head = jax.tree.map(lambda *h: jnp.mean(jnp.stack(h), axis=0), *[m["head"] for m in members])
  return {"lora": tree, "head": head}, out_scale
