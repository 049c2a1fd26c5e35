"""Trained reward models out of a workdir: restore, evaluate on a file, export for transformers / PEFT.

Hugging Face `*ForSequenceClassification` heads are `nn.Linear(D, 1, bias=False)` and read the score at the
rightmost token != `config.pad_token_id`. Our head has a bias and reads the last attention-mask token, so:
  * the bias is written alongside (config.json "perl_reward_bias" / perl_reward.json "bias"); our score equals
    the HF logit + bias (the bias never changes pairwise rankings; BT training leaves it at its init, 0);
  * the exported pad id differs from eos (our sequences end with eos), so right-padded inputs score alike.
"""
import copy
import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from perl_jax import checkpoint, data, lora, models, reward, sharding, train
from perl_jax.models import loading

log = logging.getLogger("perl_jax")

FORMAT_ALIASES = {"pairwise": "hh_rlhf", "binary": "taskmaster4"}
ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
                 "qwen3": "Qwen3ForSequenceClassification", "gemma2": "Gemma2ForSequenceClassification",
                 "gemma3": "Gemma3TextForSequenceClassification"}
SIDE_FILE = "perl_reward.json"


@dataclasses.dataclass(frozen=True)
class TrainedRM:
  """A restored reward model: frozen params (reward.frozen_params) and trainable, placed on `mesh`."""
  config: ml_collections.ConfigDict
  rcfg: reward.RewardConfig
  model_cfg: models.ModelConfig
  base: dict
  trainable: dict
  tokenizer: Any
  step: int
  mesh: jax.sharding.Mesh
  model_path: str


def read_run(workdir) -> ml_collections.ConfigDict:
  """The config a run was trained with, from WORKDIR/run.json."""
  path = pathlib.Path(workdir) / train.RUN_FILE
  if not path.is_file():
    raise models.ConfigError(f"{path}: no such file (not a train_reward workdir?)")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text())["config"])
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise models.ConfigError(f"{path}: not a run file ({e})") from None


def restore(workdir, *, step: int | None = None, model_path: str | None = None, mesh=None) -> TrainedRM:
  """Rebuilds model + RM from run.json and restores the trained params of checkpoint `step` (default latest).

  `model_path` replaces the run's base model path (e.g. when the base moved since training).
  """
  workdir = pathlib.Path(workdir)
  config = read_run(workdir)
  if model_path is not None:
    config.model.path = model_path
  rcfg = train.reward_config(config)
  model_cfg, base, tokenizer = train.load_model(config.model)
  ckpt_dir = workdir / "checkpoints"
  if not ckpt_dir.is_dir():
    raise models.ConfigError(f"{ckpt_dir}: no such folder (no checkpoint saved yet)")
  if mesh is None:
    mesh = sharding.make_mesh(-1, config.mesh.fsdp, config.mesh.tensor)
  _, optimizer = train.make_optimizer(config)
  abstract = jax.eval_shape(lambda b: train.new_state(config, rcfg, model_cfg, b, optimizer), base)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, sharding.shardings(abstract, mesh))
  ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=None)
  try:
    if ckpt.latest_step() is None:
      raise models.ConfigError(f"{ckpt_dir}: no checkpoint")
    restored_step, state, _ = ckpt.restore(target, step)
  except FileNotFoundError as e:
    raise models.ConfigError(str(e)) from None
  finally:
    ckpt.close()
  base = reward.frozen_params(rcfg, base)
  base = jax.device_put(base, sharding.shardings(base, mesh))
  return TrainedRM(config, rcfg, model_cfg, base, state["trainable"], tokenizer, restored_step, mesh,
                   config.model.path or str(models.default_model_path()))


def resolve_format(fmt: str | None, config) -> str:
  """A READERS key from a reader name, 'pairwise' / 'binary', or None (the run's own format)."""
  fmt = fmt or config.data.format
  return FORMAT_ALIASES.get(fmt, fmt)


def evaluate_examples(rm: TrainedRM, fmt: str, examples: list, batch_size: int | None = None,
                      where: str = "data") -> dict:
  """train.evaluate's metrics for read examples, plus num_examples and num_truncated."""
  if not examples:
    raise data.DataError(where, problem="no examples")
  batch_size = batch_size or rm.config.data.eval_batch_size
  shards = rm.mesh.shape["data"] * rm.mesh.shape["fsdp"]
  if batch_size % shards:
    raise models.ConfigError(f"batch_size {batch_size} is not a multiple of the {shards} data shards")
  arrays, num_truncated = train.encode(fmt, examples, rm.tokenizer, rm.config.data)
  batch_sh = {k: sharding.batch_sharding(rm.mesh, v.ndim) for k, v in arrays.items() if k in train.MODEL_KEYS}
  score_fn = reward.jit_scores(rm.model_cfg, rm.rcfg, sharding.shardings(rm.trainable, rm.mesh),
                               sharding.shardings(rm.base, rm.mesh), batch_sh, sharding.replicated(rm.mesh))
  metrics = train.evaluate(score_fn, rm.trainable, rm.base, arrays, batch_size, rm.mesh, data.KINDS[fmt])
  return {**metrics, "num_examples": len(examples), "num_truncated": int(num_truncated)}


def head_bias(rm: TrainedRM) -> float:
  return float(np.asarray(rm.trainable["head"]["bias"]).reshape(-1)[0])


def _layer_names(cfg: models.ModelConfig) -> dict[tuple, str]:
  """Our per-layer param path -> HF tensor name after 'model.layers.{i}.' (inverse of loading._hf_path)."""
  names = {path: name for name, path in loading._HF_LAYER.items()}
  names[("post_attn_norm" if cfg.sandwich_norm else "mlp_norm", "scale")] = "post_attention_layernorm.weight"
  return names


def hf_state_dict(cfg: models.ModelConfig, params, dtype=jnp.float32) -> dict[str, jax.Array]:
  """Our params as HF tensors: kernels [in,out] -> [out,in], stacked layers -> model.layers.{i}.*."""
  top = {("embed", "embedding"): "model.embed_tokens.weight", ("final_norm", "scale"): "model.norm.weight",
         ("lm_head", "kernel"): "lm_head.weight"}
  layer_names = _layer_names(cfg)
  out = {}
  for path, x in traverse_util.flatten_dict(params).items():
    x = jnp.asarray(x, dtype)
    if path[0] != "layers":
      out[top[path]] = x.T if path[-1] == "kernel" else x
      continue
    for i in range(x.shape[0]):
      out[f"model.layers.{i}.{layer_names[path[1:]]}"] = x[i].T if path[-1] == "kernel" else x[i]
  return out


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


def _save_safetensors(tensors: dict, path: pathlib.Path):
  from safetensors.flax import save_file
  save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def export_merged(rm: TrainedRM, out, dtype: str = "float32") -> pathlib.Path:
  """A self-contained HF folder for AutoModelForSequenceClassification (num_labels=1): LoRA merged into the
  kernels, head as `score.weight`, its bias as config "perl_reward_bias", tokenizer padding with a non-eos id."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  if rm.rcfg.mode == "lora":
    base32 = jax.tree.map(lambda x: np.asarray(x, np.float32), rm.base)
    params = lora.merge(base32, rm.trainable["lora"], lora.scale(rm.rcfg.lora_cfg))
  else:
    params = {**rm.base, **rm.trainable["backbone"]}
  tensors = hf_state_dict(rm.model_cfg, params, jnp.dtype(dtype))
  if rm.model_cfg.tie_embeddings:
    tensors.pop("lm_head.weight", None)
  tensors["score.weight"] = jnp.asarray(rm.trainable["head"]["kernel"], dtype).T
  _save_safetensors(tensors, out / "model.safetensors")

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


def peft_state_dict(cfg: models.ModelConfig, trainable) -> dict[str, jax.Array]:
  """PEFT LoRA names: lora_A [r,in] = a[i].T, lora_B [out,r] = b[i].T; the head as modules_to_save 'score'."""
  layer_names = _layer_names(cfg)
  out = {"base_model.model.score.weight": jnp.asarray(trainable["head"]["kernel"], jnp.float32).T}
  is_ab = lambda _, x: isinstance(x, dict) and "a" in x
  for path, ab in traverse_util.flatten_dict(trainable["lora"]["layers"], is_leaf=is_ab).items():
    module = layer_names[path + ("kernel",)][: -len(".weight")]
    for i in range(ab["a"].shape[0]):
      prefix = f"base_model.model.model.layers.{i}.{module}"
      out[f"{prefix}.lora_A.weight"] = jnp.asarray(ab["a"][i], jnp.float32).T
      out[f"{prefix}.lora_B.weight"] = jnp.asarray(ab["b"][i], jnp.float32).T
  return out


def export_peft(rm: TrainedRM, out) -> pathlib.Path:
  """A PEFT LoRA adapter folder (task SEQ_CLS) for the base model, plus perl_reward.json (bias, pad id)."""
  if rm.rcfg.mode != "lora":
    raise models.ConfigError(f"mode '{rm.rcfg.mode}' trains no adapter: export it with --format merged")
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tensors = peft_state_dict(rm.model_cfg, rm.trainable)
  modules = sorted({name.split(".")[-3] for name in tensors if ".lora_A." in name})
  lcfg = rm.rcfg.lora_cfg
  alpha = int(lcfg.alpha) if float(lcfg.alpha).is_integer() else float(lcfg.alpha)
  adapter = dict(peft_type="LORA", task_type="SEQ_CLS", base_model_name_or_path=rm.model_path, r=lcfg.rank,
                 lora_alpha=alpha, target_modules=modules, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                 use_rslora=False, use_dora=False, modules_to_save=["score"], inference_mode=True)
  (out / "adapter_config.json").write_text(json.dumps(adapter, indent=1))
  _save_safetensors(tensors, out / "adapter_model.safetensors")
  side = {"bias": head_bias(rm), "pad_token_id": _pad_for_export(rm.tokenizer), "step": rm.step}
  (out / SIDE_FILE).write_text(json.dumps(side, indent=1))
  return out
