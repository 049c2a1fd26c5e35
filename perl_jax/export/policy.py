"""A trained RL policy (`rl.setup.restore`) exported for Hugging Face transformers or PEFT.

merged: a self-contained `*ForCausalLM` folder: base ⊕ SFT adapter ⊕ policy adapter merged into the kernels (LoRA
  mode) or the trained policy copy (full mode), with the tokenizer.
peft:   one LoRA adapter (task CAUSAL_LM) for the BASE model that stands for SFT and policy adapters together: ranks
  concatenated, A = [A_sft | A_pol], B = [s_sft·B_sft ; s_pol·B_pol], scale 1 (lora_alpha = r), so
  x·A·B = s_sft·x·A_sft·B_sft + s_pol·x·A_pol·B_pol exactly.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from perl_jax import models, runs
from perl_jax.models import quant
from perl_jax.export import reward as export_reward
from perl_jax.rl import roles, setup
from perl_jax.models import loading

CAUSAL_LM = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def adapter_sets(policy) -> list:
  """[(lora tree, scale), ...]: the SFT adapter (if any) then the policy adapter (LoRA mode)."""
  return roles.policy_model(policy.stage, policy.trainable, policy.frozen)[1]


def merged_params(policy) -> dict:
  """The policy as one params tree in float32: roles.merged_policy, with LoRA adapters merged into a float32 copy of
  the backbone (not into its stored dtype)."""
  f32 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
  frozen = policy.frozen
  if policy.stage.mode == "lora":  # A quantized base is dequantized: the export is a float model.
    frozen = {**frozen, "base": f32(quant.dequantize_base(frozen["base"]))}
  return f32(roles.merged_policy(policy.stage, policy.trainable, frozen))


def combined_adapter(sets) -> tuple[dict, int]:
  """One LoRA tree (scale 1) equal to the sum of `sets`: ranks concatenated, each B pre-scaled; a kernel one set
  does not adapt gets zero blocks there. Returns (tree, total rank)."""
  flats = [traverse_util.flatten_dict(t, is_leaf=lambda _, x: isinstance(x, dict) and "a" in x) for t, _ in sets]
  ranks = [next(iter(f.values()))["a"].shape[-1] for f in flats]
  out = {}
  for path in sorted(set().union(*flats)):
    a_parts, b_parts = [], []
    ref = next(f[path] for f in flats if path in f)
    for f, (_, scale), r in zip(flats, sets, ranks):
      if path in f:
        a_parts.append(jnp.asarray(f[path]["a"], jnp.float32))
        b_parts.append(scale * jnp.asarray(f[path]["b"], jnp.float32))
      else:
        a_parts.append(jnp.zeros(ref["a"].shape[:-1] + (r,), jnp.float32))
        b_parts.append(jnp.zeros(ref["b"].shape[:1] + (r,) + ref["b"].shape[2:], jnp.float32))
    out[path] = {"a": jnp.concatenate(a_parts, -1), "b": jnp.concatenate(b_parts, 1)}
  return traverse_util.unflatten_dict(out), sum(ranks)


def export_merged(policy, out, model_path: str, dtype: str = "float32") -> pathlib.Path:
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tensors = loading.hf_state_dict(policy.model_cfg, merged_params(policy), jnp.dtype(dtype))
  if policy.model_cfg.tie_embeddings:
    tensors.pop("lm_head.weight", None)
  export_reward.save_safetensors(tensors, out / "model.safetensors")
  hf = models.to_hf_dict(policy.model_cfg)
  base_config = pathlib.Path(model_path) / "config.json"
  if base_config.is_file():
    hf.update({k: v for k, v in json.loads(base_config.read_text()).items() if k == "max_position_embeddings"})
  hf.update(architectures=[CAUSAL_LM[policy.model_cfg.family]], dtype=dtype)
  (out / "config.json").write_text(json.dumps(hf, indent=1))
  policy.tokenizer.save_pretrained(str(out))
  return out


def export_peft(policy, out, model_path: str, base_model: str = "") -> pathlib.Path:
  """One CAUSAL_LM adapter for the base model (module docstring), named by its Hub id (export.base; `base_model`
  overrides), plus perl_export.json (the base and its quantization)."""
  if policy.stage.mode != "lora":
    raise models.ConfigError(f"mode '{policy.stage.mode}' trains no adapter: export it with --format merged")
  rm_dir = setup.reward_folders(policy.config)[0]  # Ensemble members share one base (rl.setup checks).
  rm_config = runs.read_config(rm_dir)
  if rm_config.mode == "lora" and rm_config.get("init_from"):
    raise models.ConfigError(f"{rm_dir}: this policy stands on the SFT model of "
                             f"{rm_config.init_from} (its reward model starts there), not on the base model a PEFT "
                             "adapter is for: export it with --format merged")
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tree, rank = combined_adapter(adapter_sets(policy))
  tensors = export_reward.lora_tensors(policy.model_cfg, tree)
  export_reward.write_adapter(out, tensors, "CAUSAL_LM", model_path, rank, rank, base_model=base_model,
                              model_config=policy.config.model)
  return out
