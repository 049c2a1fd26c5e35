"""A run folder: run.json (config + data info), checkpoints/, metrics.jsonl, tb/, eval.json, summary.json.

Every stage (reward model, SFT, RL) writes the same layout, so a later stage, an eval or an export loads an
earlier run through here: `restore_stage` reads its config back, loads the model and tokenizer it was trained on
(once), and restores its trained params into a `Trained` record.
"""
import contextlib
import dataclasses
import json
import logging
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from perl_jax import checkpoint, models, sharding
from perl_jax.models import quant

log = logging.getLogger("perl_jax")

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"


def write(workdir, config: ml_collections.ConfigDict, info: dict | None = None) -> None:
  """WORKDIR/run.json = {"config": ..., "data": info}, written by process 0 when a run first starts."""
  if jax.process_index() != 0:
    return
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / RUN_FILE).write_text(json.dumps({"config": config.to_dict(), "data": dict(info or {})}, indent=1))


def read_config(workdir) -> ml_collections.ConfigDict:
  """The config a run was trained with, from WORKDIR/run.json; a ConfigError names the file otherwise."""
  path = pathlib.Path(workdir) / RUN_FILE
  if not path.is_file():
    raise models.ConfigError(f"{path}: no such file (not a run folder?)")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text())["config"])
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise models.ConfigError(f"{path}: not a run file ({e})") from None


def model_path(model_config: ml_collections.ConfigDict) -> str:
  """config.model.path (a file, a folder or a Hub id), or the embedded SmolLM2 GGUF when empty."""
  return model_config.path or str(models.default_model_path())


_model_path_of = model_path  # restore_stage's keyword argument shadows the name.


def stage_of(config: ml_collections.ConfigDict) -> str:
  """Which stage wrote a run config: "rl" (it has an `rl` field), "reward" (a reward head: `pos_weight`), or
  "sft"."""
  return "rl" if "rl" in config else "reward" if "pos_weight" in config else "sft"


def require_stage(workdir, stage: str, field: str) -> ml_collections.ConfigDict:
  """WORKDIR's config, or a one-line ConfigError when another stage wrote it (`field`: the config field or flag
  that named the folder)."""
  config = read_config(workdir)
  if stage_of(config) != stage:
    names = {"rl": "an RL run", "reward": "a reward-model run", "sft": "an SFT run"}
    raise models.ConfigError(f"{workdir}: {names[stage_of(config)]}, not {names[stage]} (named by {field})")
  return config


def require_run_folder(path, field: str) -> None:
  """A one-line ConfigError unless `path` holds a run (its run.json); `field` is the config field that named it."""
  if not (pathlib.Path(path) / RUN_FILE).is_file():
    raise models.ConfigError(f"{path}: not a run folder (no {RUN_FILE}); config field '{field}'")


def same_path(a, b) -> bool:
  """Whether two paths name the same file or folder (relative parts and symlinks resolved)."""
  return pathlib.Path(a).resolve() == pathlib.Path(b).resolve()


def on_host_if_quantized(model_config: ml_collections.ConfigDict):
  """A context in which a base that config.model.quant will quantize is loaded (and merged, and quantized): the
  host's CPU device, so an accelerator never holds the float copy (a 7B base in bf16 beside its codes would not fit
  a 16 GB chip); the quantized base is placed on the mesh afterwards. No-op for quant "none" or without a CPU
  backend (JAX_PLATFORMS without cpu)."""
  if model_config.get("quant", "none") == "none":
    return contextlib.nullcontext()
  try:
    return jax.default_device(jax.devices("cpu")[0])
  except RuntimeError:
    return contextlib.nullcontext()


def load_model(model_config: ml_collections.ConfigDict, quantize: bool = True):
  """(model config, frozen base params, tokenizer) from config.model; the base's layer kernels stored as
  config.model.quant says ("none" | "int8" | "nf4" with blocks of config.model.quant_block, their scales
  double-quantized with config.model.quant_double | "gguf": a GGUF file's own blocks, read without a float copy of
  the layers) unless `quantize` is False (a caller that merges an adapter into the float base first, then
  quantizes). A base to be quantized is loaded and quantized on the host (on_host_if_quantized)."""
  path = model_path(model_config)
  revision = model_config.get("revision", "")
  kind = model_config.get("quant", "none")
  quant.check_double(kind, model_config.get("quant_double", False))  # before the load, not after it
  gguf_blocks = quantize and kind == "gguf" and str(path).endswith(".gguf")
  with on_host_if_quantized(model_config):
    cfg, params = models.load_pretrained(
        path, param_dtype=jnp.dtype(models.resolve_dtype(model_config.param_dtype)), revision=revision,
        dtype=models.resolve_dtype(model_config.dtype), remat=model_config.remat,
        attention=model_config.get("attention", "auto"), gguf_blocks=gguf_blocks)
    if gguf_blocks:  # The file's own layer-kernel blocks, read as they are: no float copy of the layers was made.
      log.info("frozen base: the GGUF file's own layer-kernel blocks, kept quantized")
    elif quantize:
      params = quantize_base(model_config, params)
  return cfg, params, models.load_tokenizer(path, revision)


def quantize_base(model_config: ml_collections.ConfigDict, params):
  """Float `params` stored as config.model.quant says (older run folders have no such field: "none"). "gguf" is not
  a quantizer (a one-line error): load_model reads a GGUF file's own blocks instead."""
  kind = model_config.get("quant", "none")
  if kind == "none":
    return params
  block = model_config.get("quant_block", quant.DEFAULT_BLOCK)
  double = model_config.get("quant_double", False)
  params = quant.quantize_base(params, kind, block, double)
  log.info("frozen base quantized: layer kernels %s%s%s", kind, f" (blocks of {block})" if kind == "nf4" else "",
           ", block scales double-quantized" if double else "")
  return params


def latest_step(workdir) -> int | None:
  """The step of WORKDIR's latest checkpoint, or None when it has none (a fresh run)."""
  ckpt_dir = pathlib.Path(workdir) / CHECKPOINTS
  if not ckpt_dir.is_dir():
    return None
  ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=None)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


@dataclasses.dataclass(frozen=True)
class Trained:
  """A run restored for use (a later stage, an eval, an export): the same record for SFT, RM and RL runs."""
  config: ml_collections.ConfigDict  # run.json's config (model.path replaced when the caller asked).
  model_cfg: models.ModelConfig
  tokenizer: Any
  frozen: dict  # What the stage's forwards take beside `trainable` (SFT / RM: the whole base), placed on `mesh`.
  trainable: dict  # The trained pytree of checkpoint `step`, placed on `mesh`.
  step: int
  mesh: jax.sharding.Mesh
  model_path: str  # The base model's path (config.model.path, or the embedded default).
  stage: Any = None  # The stage's settings record (trained.PolicyConfig, trained.RewardConfig, rl.RLConfig).


def restore_stage(workdir, build: Callable, *, step: int | None = None, model_path: str | None = None,
                  mesh=None, model_overrides: dict | None = None) -> Trained:
  """The run in WORKDIR with the trained params of checkpoint `step` (default latest); `model_path` replaces its
  base model's path and `model_overrides` its other config.model fields (run-time choices: dtype, remat, ...).
  build(config, mesh) -> (model_cfg, tokenizer, frozen, stage, like) is the stage's: it rebuilds what the params
  stand on, `like` being their expected shapes (checked before any data is read). Only the trained params are read,
  never the optimizer state."""
  config = read_config(workdir)
  if model_path is not None:
    config.model.path = model_path
  for key, value in (model_overrides or {}).items():
    config.model[key] = value
  mesh = mesh or sharding.make_mesh(-1, config.mesh.fsdp, config.mesh.tensor)
  model_cfg, tokenizer, frozen, stage, like = build(config, mesh)
  restored_step, trainable = restore_trainable(workdir, mesh, step=step, like=like)
  return Trained(config, model_cfg, tokenizer, sharding.shard(frozen, mesh), trainable, restored_step, mesh,
                 _model_path_of(config.model), stage)


def restore_trainable(workdir, mesh, *, step: int | None = None, like=None) -> tuple[int, dict]:
  """(step, state["trainable"]) of checkpoint `step` (default latest) placed on `mesh` under the partition rules;
  a ConfigError naming the folder if there is none, or if the params do not match `like`'s paths and shapes."""
  ckpt_dir = pathlib.Path(workdir) / CHECKPOINTS
  if not ckpt_dir.is_dir():
    raise models.ConfigError(f"{ckpt_dir}: no such folder (no checkpoint saved yet)")
  ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=None)
  try:
    if ckpt.latest_step() is None:
      raise models.ConfigError(f"{ckpt_dir}: no checkpoint")
    return ckpt.restore_subtree("trainable", lambda a: sharding.shardings(a, mesh), step, like=like)
  except FileNotFoundError as e:
    raise models.ConfigError(str(e)) from None
  except ValueError as e:  # Paths or shapes that do not fit the model the run is rebuilt on.
    raise models.ConfigError(" ".join(str(e).split())) from None
  finally:
    ckpt.close()
