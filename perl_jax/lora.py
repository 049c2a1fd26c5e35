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
  """W ← W + sign·ΔW for every kernel that `lora_params` adapts, computed in float32, stored in W's dtype."""
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for path, ab in traverse_util.flatten_dict(lora_params, sep="/", is_leaf=lambda _, x: "a" in x).items():
    kernel = flat[path + "/kernel"]
    flat[path + "/kernel"] = (kernel.astype(jnp.float32) + sign * delta(ab["a"], ab["b"], scale_)).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


def merge(params, lora_params, scale_: float):
  """W ← W + ΔW for every adapted kernel; the result runs with no adapter at all."""
  return _combine(params, lora_params, scale_, 1.0)


def unmerge(params, lora_params, scale_: float):
  """W ← W − ΔW: undoes `merge` (exactly in float32 up to rounding)."""
  return _combine(params, lora_params, scale_, -1.0)


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
