"""Pure-functional LoRA (Hu et al. 2021) over the params pytree: x·W + (α/r)·x·A·B, only A and B trained.

A LoRA tree mirrors the targeted kernels' paths, with {a [L,in,r], b [L,r,out]} in place of each kernel
[L,in,out]. `a` is random and `b` zero, so a fresh adapter leaves the model unchanged. The forward pass
(`models.forward(..., adapters=[(lora_params, lora.scale(cfg))])`) adds the low-rank path without ever
forming W + ΔW; `merge` forms it once, for inference and export.
"""
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import traverse_util

from perl_jax import models
from perl_jax.models import quant

ATTENTION = (r"layers/attn/(q|k|v|o)_proj/kernel",)
ATTENTION_MLP = (r"layers/(attn/(q|k|v|o)|mlp/(gate|up|down))_proj/kernel",)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r, alpha α (scale α/r) and regexes over param paths; the paper adapts attention only."""
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ATTENTION


def scale(cfg: LoraConfig) -> float:
  """The LoRA scale α/r multiplying the low-rank path x·A·B."""
  return cfg.alpha / cfg.rank


def target_paths(params, targets) -> list[str]:
  """Paths ('layers/attn/q_proj/kernel') of the kernels the regexes select; errors on a non-kernel match."""
  flat = traverse_util.flatten_dict(params, sep="/")
  hits = [p for p in flat if any(re.fullmatch(t, p) for t in targets)]
  bad = [p for p in hits if not (p.startswith("layers/") and p.endswith("/kernel") and flat[p].ndim == 3)]
  if bad:
    raise ValueError(f"LoRA targets must select layer kernels [L,in,out]; these do not: {bad}")
  if not hits:
    raise ValueError(f"LoRA targets {list(targets)} match no parameter")
  return sorted(hits)


def init(rng, params, cfg: LoraConfig, dtype=jnp.float32) -> dict:
  """A ~ U(±1/√in) (PEFT's Kaiming-uniform default), B = 0, for every targeted kernel."""
  flat = traverse_util.flatten_dict(params, sep="/")
  paths = target_paths(params, cfg.targets)
  out = {}
  for key, path in zip(jax.random.split(rng, len(paths)), paths):
    layers, d_in, d_out = flat[path].shape
    bound = 1.0 / math.sqrt(d_in)
    prefix = path[: -len("/kernel")]
    out[prefix + "/a"] = jax.random.uniform(key, (layers, d_in, cfg.rank), dtype, -bound, bound)
    out[prefix + "/b"] = jnp.zeros((layers, cfg.rank, d_out), dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def delta(a_LxIxR, b_LxRxO, scale_: float):
  """ΔW = (α/r)·A·B, the weight update an adapter stands for ([L,in,out], float32)."""
  return jnp.einsum("lir,lro->lio", a_LxIxR.astype(jnp.float32), b_LxRxO.astype(jnp.float32)) * scale_


def _combine(params, lora_params, scale_: float, sign: float):
  """W ← W + sign·ΔW for every kernel that `lora_params` adapts, computed in float32, stored in W's dtype (float32
  for a quantized W, which is dequantized)."""
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for path, ab in traverse_util.flatten_dict(lora_params, sep="/", is_leaf=lambda _, x: "a" in x).items():
    kernel = flat[path + "/kernel"]
    dtype = jnp.float32 if quant.is_quantized(kernel) else kernel.dtype  # A quantized kernel merges to float32.
    flat[path + "/kernel"] = (quant.dense_kernel(kernel, jnp.float32) + sign * delta(ab["a"], ab["b"], scale_)
                              ).astype(dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


def merge(params, lora_params, scale_: float):
  """W ← W + ΔW for every adapted kernel; the result runs with no adapter at all."""
  return _combine(params, lora_params, scale_, 1.0)


def unmerge(params, lora_params, scale_: float):
  """W ← W − ΔW: undoes `merge` (exactly in float32 up to rounding)."""
  return _combine(params, lora_params, scale_, -1.0)


def _members(trees) -> list[dict]:
  """The K adapters flattened by path, checked to share their paths and shapes (a one-line ValueError otherwise)."""
  if not trees:
    raise ValueError("lora.average: no adapters to average (an empty list)")
  flat = [traverse_util.flatten_dict(t, sep="/") for t in trees]
  for k, f in enumerate(flat[1:], 1):
    if set(f) != set(flat[0]) or any(f[p].shape != flat[0][p].shape for p in f):
      raise ValueError(f"lora.average: adapter {k} does not match adapter 0 in paths or shapes")
  return flat


def average(trees, scales) -> dict:
  """The exact average of K adapters' updates as ONE adapter of rank K·r, used with scale 1:

      (1/K)·Σ_k s_k·A_k·B_k = [A_1 … A_K] · [s_1·B_1; …; s_K·B_K] / K

  (A's concatenated on the rank axis, B's stacked on it, each scaled by s_k / K). The same model as averaging the
  K merged weight updates, at K times the rank; `scales` are the members' α/r."""
  flat = _members(trees)
  if len(scales) != len(flat):
    raise ValueError(f"lora.average: {len(scales)} scales for {len(flat)} adapters")
  k, out = len(flat), {}
  for path in flat[0]:
    parts = [f[path].astype(jnp.float32) * (s / k if path.endswith("/b") else 1.0) for f, s in zip(flat, scales)]
    out[path] = jnp.concatenate(parts, axis=-1 if path.endswith("/a") else -2)
  return traverse_util.unflatten_dict(out, sep="/")


def factor_average(trees) -> dict:
  """The cheap average: mean of the A's and mean of the B's, rank r, used with the members' common scale. Not the
  average of the updates: mean(A)·mean(B) = (1/K²)·Σ_j Σ_k A_j·B_k carries the cross terms j ≠ k, which are small only
  when the members stay close to one another (WARM averages weights fine-tuned from one shared initialisation; LoRA
  members with different A inits are not that). `factor_average_error` measures the gap."""
  flat = _members(trees)
  return traverse_util.unflatten_dict({p: jnp.mean(jnp.stack([f[p] for f in flat]), 0) for p in flat[0]}, sep="/")


def factor_average_error(trees, scale_: float) -> dict:
  """Per adapted kernel: ‖ΔW(factor_average) − mean_k ΔW_k‖_F / ‖mean_k ΔW_k‖_F (0 when the members are equal)."""
  flat, avg = _members(trees), traverse_util.flatten_dict(factor_average(trees), sep="/")
  out = {}
  for path in sorted(p[: -len("/a")] for p in flat[0] if p.endswith("/a")):
    exact = sum(delta(f[path + "/a"], f[path + "/b"], scale_) for f in flat) / len(flat)
    gap = delta(avg[path + "/a"], avg[path + "/b"], scale_) - exact
    out[path] = float(jnp.linalg.norm(gap) / jnp.maximum(jnp.linalg.norm(exact), 1e-30))
  return out


def closed_form_count(model_cfg, cfg: LoraConfig) -> int:
  """r·(in + out) per adapted kernel per layer: the count a reader can check by hand."""
  shapes = traverse_util.flatten_dict(models.param_shapes(model_cfg), sep="/")
  paths = [p for p in shapes if any(re.fullmatch(t, p) for t in cfg.targets)]
  return sum(L * cfg.rank * (i + o) for L, i, o in (shapes[p] for p in paths))


def summary(base_params, trainable) -> str:
  """'trainable params: 1,234 || all params: 135,000,000 || trainable%: 0.0009' (PEFT's wording)."""
  n_train, n_base = models.count_params(trainable), models.count_params(base_params)
  total = n_base + n_train
  return f"trainable params: {n_train:,} || all params: {total:,} || trainable%: {100 * n_train / total:.4f}"


def config_from(c) -> LoraConfig:
  """LoraConfig from a config's `lora` field {rank, alpha, targets}: targets "attention" (the paper's q/k/v/o),
  "attention_mlp", or one regex over param paths."""
  targets = {"attention": ATTENTION, "attention_mlp": ATTENTION_MLP}.get(c.targets, (c.targets,))
  return LoraConfig(rank=c.rank, alpha=c.alpha, targets=targets)
