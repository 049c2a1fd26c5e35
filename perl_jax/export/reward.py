"""Trained reward models (`reward.restore`) exported for Hugging Face transformers (merged folder) or PEFT (adapter).

Hugging Face `*ForSequenceClassification` heads are `nn.Linear(D, 1, bias=False)` and read the score at the
rightmost token != `config.pad_token_id`. Our head has a bias and reads the last attention-mask token, so:
  * the bias is written alongside (config.json "perl_reward_bias" / perl_reward.json "bias"); our score equals
    the HF logit + bias (the bias never changes pairwise rankings; BT training leaves it at its init, 0);
  * the exported pad id differs from eos (our sequences end with eos), so right-padded inputs score alike.
"""
import copy
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from perl_jax import data, lora, models, runs
from perl_jax.models import quant
from perl_jax.export import base
from perl_jax.models import loading
from perl_jax.trained import head_bias

log = logging.getLogger("perl_jax")

ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
                 "qwen3": "Qwen3ForSequenceClassification", "gemma2": "Gemma2ForSequenceClassification",
                 "gemma3": "Gemma3TextForSequenceClassification"}
SIDE_FILE = "perl_reward.json"


def hf_pad_id(tokenizer) -> int | None:
  """A pad id HF's last-non-pad rule can use: not eos (our sequences end with it) nor bos; None if none."""
  for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id):
    if candidate is not None and candidate not in (tokenizer.eos_token_id, tokenizer.bos_token_id):
      return int(candidate)
  return None


def _pad_for_export(tokenizer) -> int:
  pad = hf_pad_id(tokenizer)
  if pad is None:
    pad = data.pipeline.pad_id(tokenizer)
    log.warning("no pad token distinct from eos: HF will score one token early on inputs ending in eos (id %d)",
                pad)
  return pad


def save_safetensors(tensors: dict, path: pathlib.Path):
  from safetensors.flax import save_file
  save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def export_merged(rm: runs.Trained, out, dtype: str = "float32") -> pathlib.Path:
  """A self-contained HF folder for AutoModelForSequenceClassification (num_labels=1): LoRA merged into the
  kernels, head as `score.weight`, its bias as config "perl_reward_bias", tokenizer padding with a non-eos id."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  if rm.stage.mode == "lora":
    base32 = jax.tree.map(lambda x: np.asarray(x, np.float32), quant.dequantize_base(rm.frozen))
    params = lora.merge(base32, rm.trainable["lora"], lora.scale(rm.stage.lora_cfg))
  else:
    params = {**rm.frozen, **rm.trainable["backbone"]}
  tensors = loading.hf_state_dict(rm.model_cfg, params, jnp.dtype(dtype))
  if rm.model_cfg.tie_embeddings:
    tensors.pop("lm_head.weight", None)
  tensors["score.weight"] = jnp.asarray(rm.trainable["head"]["kernel"], dtype).T
  save_safetensors(tensors, out / "model.safetensors")

  pad = _pad_for_export(rm.tokenizer)
  hf = models.to_hf_dict(rm.model_cfg)
  base_config = pathlib.Path(rm.model_path) / "config.json"
  if base_config.is_file():
    extra = json.loads(base_config.read_text())
    hf.update({k: extra[k] for k in ("max_position_embeddings",) if k in extra})
  hf.update(architectures=[ARCHITECTURES[rm.model_cfg.family]], id2label={"0": "LABEL_0"},
            label2id={"LABEL_0": 0}, pad_token_id=pad, dtype=dtype, perl_reward_bias=head_bias(rm))
  (out / "config.json").write_text(json.dumps(hf, indent=1))
  tokenizer = copy.deepcopy(rm.tokenizer)
  tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
  tokenizer.save_pretrained(str(out))
  return out


def lora_tensors(cfg: models.ModelConfig, lora_tree) -> dict[str, jax.Array]:
  """PEFT LoRA names for a LoRA tree: lora_A [r,in] = a[i].T, lora_B [out,r] = b[i].T, per layer."""
  layer_names = loading.hf_layer_names(cfg)
  out = {}
  is_ab = lambda _, x: isinstance(x, dict) and "a" in x
  for path, ab in traverse_util.flatten_dict(lora_tree["layers"], is_leaf=is_ab).items():
    module = layer_names[path + ("kernel",)][: -len(".weight")]
    for i in range(ab["a"].shape[0]):
      prefix = f"base_model.model.model.layers.{i}.{module}"
      out[f"{prefix}.lora_A.weight"] = jnp.asarray(ab["a"][i], jnp.float32).T
      out[f"{prefix}.lora_B.weight"] = jnp.asarray(ab["b"][i], jnp.float32).T
  return out


def peft_state_dict(cfg: models.ModelConfig, trainable) -> dict[str, jax.Array]:
  """The RM's PEFT tensors: its LoRA (`lora_tensors`) and the head as modules_to_save 'score'."""
  return {"base_model.model.score.weight": jnp.asarray(trainable["head"]["kernel"], jnp.float32).T,
          **lora_tensors(cfg, trainable["lora"])}


def write_adapter(out: pathlib.Path, tensors: dict, task: str, model_path: str, rank: int, alpha: float,
                  modules_to_save=None, base_model: str = "", model_config=None) -> None:
  """adapter_config.json + adapter_model.safetensors of a PEFT LoRA adapter for the base model at `model_path`,
  named by its Hub id (export.base; `base_model` overrides), plus perl_export.json (that base, its quantization,
  and how training stored it: base.training_storage of the run's `model_config`)."""
  record = base.base_record(model_path, base_model)
  if model_config is not None:
    record.update(base.training_storage(model_config))
  modules = sorted({name.split(".")[-3] for name in tensors if ".lora_A." in name})
  alpha = int(alpha) if float(alpha).is_integer() else float(alpha)
  adapter = dict(peft_type="LORA", task_type=task, base_model_name_or_path=record["base_model"], r=rank,
                 lora_alpha=alpha, target_modules=modules, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                 use_rslora=False, use_dora=False, modules_to_save=modules_to_save, inference_mode=True)
  (out / "adapter_config.json").write_text(json.dumps(adapter, indent=1))
  save_safetensors(tensors, out / "adapter_model.safetensors")
  base.write_record(out, record)


def export_peft(rm: runs.Trained, out, base_model: str = "") -> pathlib.Path:
  """A PEFT LoRA adapter folder (task SEQ_CLS) for the base model, named by its Hub id (export.base; `base_model`
  overrides), plus perl_reward.json (bias, pad id) and perl_export.json (the base and its quantization)."""
  if rm.stage.mode != "lora":
    raise models.ConfigError(f"mode '{rm.stage.mode}' trains no adapter: export it with --format merged")
  if rm.config.get("init_from"):
    raise models.ConfigError(f"config field 'init_from': this reward model stands on the SFT model of "
                             f"{rm.config.init_from}, not on the base model a PEFT adapter is for: export it with "
                             "--format merged")
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tensors = peft_state_dict(rm.model_cfg, rm.trainable)
  write_adapter(out, tensors, "SEQ_CLS", rm.model_path, rm.stage.lora_cfg.rank, rm.stage.lora_cfg.alpha, ["score"],
                base_model, model_config=rm.config.model)
  side = {"bias": head_bias(rm), "pad_token_id": _pad_for_export(rm.tokenizer), "step": rm.step}
  (out / SIDE_FILE).write_text(json.dumps(side, indent=1))
  return out
